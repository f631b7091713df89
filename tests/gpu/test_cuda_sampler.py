"""The sampler's cut on the CUDA backend (CudaBackend.top_k, cpp/cuda/top_k.cu) against the CPU
backend's default (the row downloaded and cut on the host), bit for bit; and sampled decoding on
CUDA by Session.eval_sample (only the candidates downloaded) against eval + sample (the whole row
downloaded) on the same backend: the same tokens for the same seed. GPU only: UPG_GPU_TESTS=1."""
from __future__ import annotations

import numpy as np
import pytest

from sampler_cases import random_history, random_params, random_row, reference_top_k, sampled_steps
from upg_backend import _core
from upg_backend.builtin import builtin_model_path
from upg_backend.format import UPGFile
from upg_backend.llama import Llama

# ragged sizes around the kernel's chunks of 2048, one chunk, many, and Phi-4's vocabulary
SIZES = [1, 31, 2047, 2048, 2049, 6145, 100352, 100357]
KS = [1, 2, 40, _core.MAX_TOP_K]


@pytest.fixture(scope="module")
def backends():
    return _core.CudaBackend(0), _core.CpuBackend(1)


def on_backend(backend, row):
    buf = backend.alloc(4 * len(row))
    backend.upload(buf, row.view(np.uint8))
    return buf


def bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def cuts(backends, row, k, skip):
    return [b.top_k(on_backend(b, row), len(row), k, skip) for b in backends]


@pytest.mark.parametrize("n", SIZES)
def test_top_k_is_the_cpus(backends, n):
    rng = np.random.default_rng(n)
    for case in range(12):
        row = random_row(rng, n)
        k = KS[case % len(KS)]
        skip = np.unique(rng.integers(0, n, int(rng.integers(0, 70)))).astype(np.int32)
        (ids, values, skipped), (cpu_ids, cpu_values, cpu_skipped) = cuts(backends, row, k, skip)
        np.testing.assert_array_equal(ids, cpu_ids)
        np.testing.assert_array_equal(bits(values[ids >= 0]), bits(cpu_values[cpu_ids >= 0]))  # -0 stays -0
        np.testing.assert_array_equal(bits(skipped), bits(cpu_skipped))
        np.testing.assert_array_equal(ids, reference_top_k(row, k, skip)[0])


@pytest.mark.parametrize("k", [1, _core.MAX_TOP_K])
def test_ties_across_chunks_go_by_id(backends, k):
    n = 100352
    row = np.full(n, 0.25, np.float32)
    skip = np.arange(0, 40, 3, dtype=np.int32)
    ids, values, _ = cuts(backends, row, k, skip)[0]
    want = np.setdiff1d(np.arange(n), skip)[:k]
    np.testing.assert_array_equal(ids, want)
    row[[70000, 99999]] = 0.5  # two leaders in late chunks, then the ties from the first
    ids, _, _ = cuts(backends, row, k, skip)[0]
    np.testing.assert_array_equal(ids, np.concatenate([[70000, 99999], want])[:k])


def test_a_banned_row_has_no_candidates(backends):
    row = np.full(5000, -np.inf, np.float32)
    row[17] = np.nan
    ids, _, skipped = cuts(backends, row, 40, np.array([17], np.int32))[0]
    assert (ids == -1).all() and np.isnan(skipped[0])


def test_top_k_refuses_bad_arguments(backends):
    b = backends[0]
    buf = on_backend(b, np.zeros(10, np.float32))
    for k, skip in [(0, []), (_core.MAX_TOP_K + 1, []), (3, [4, 2]), (3, [10])]:
        with pytest.raises(ValueError, match="top_k"):
            b.top_k(buf, 10, k, np.array(skip, np.int32))


@pytest.mark.parametrize("n", [64, 2049, 100352])
def test_candidates_pick_the_full_rows_token(backends, n):
    rng = np.random.default_rng(200 + n)
    cuda = backends[0]
    for case in range(60 if n > 10000 else 200):
        row, p, history = random_row(rng, n), random_params(rng, n), random_history(rng, n)
        seed = int(rng.integers(1 << 32))
        try:
            want = _core.sample_token(row, p, history, seed)
        except ValueError as e:
            with pytest.raises(ValueError, match=str(e)):
                cuda.sample(on_backend(cuda, row), n, p, history, seed)
            continue
        assert cuda.sample(on_backend(cuda, row), n, p, history, seed) == want, case


def test_eval_sample_is_eval_then_sample_on_cuda():
    """One CUDA session: 60 steps of eval + sample, then the same steps again by eval_sample."""
    path = builtin_model_path()
    s = _core.Session(_core.Model(str(path), UPGFile(path).config.engine_config()), 160, "f16",
                      backend=_core.CudaBackend(0))
    p = _core.SamplingParams()
    p.temperature, p.top_k, p.presence_penalty, p.logit_bias = 0.9, 40, 0.5, {13: 2.0}
    prompt = np.arange(40, 60, dtype=np.int32)
    first = s.sample(s.eval(prompt)[-1], p, prompt)
    runs = []
    for step in (lambda tok, ids: s.sample(s.eval(np.array([tok], np.int32))[-1], p, ids),
                 lambda tok, ids: s.eval_sample(tok, p, ids)):
        s.truncate(len(prompt))
        s.set_seed(5)
        runs.append(sampled_steps(step, first, prompt))
    assert runs[1] == runs[0] and len(set(runs[0])) > 2


@pytest.mark.parametrize("kwargs", [dict(temperature=0.8, top_k=40, seed=3), dict(temperature=0, repeat_penalty=1.3),
                                    dict(temperature=1.2, top_k=_core.MAX_TOP_K, min_p=0.0, typical_p=0.9, seed=4)],
                         ids=["defaults", "greedy-penalized", "top_k-bound"])
def test_sampled_completion_on_cuda_is_the_host_loops(kwargs):
    with Llama(backend="cuda", n_ctx=256, verbose=False) as host, Llama(backend="cuda", n_ctx=256, verbose=False) as dev:
        host.sample_on_backend = False
        ban = {t: -np.inf for t in host._eos_ids}  # the built-in model would end its text in a few tokens
        want = host.create_completion("Once upon a time", max_tokens=64, logit_bias=ban, **kwargs)
        got = dev.create_completion("Once upon a time", max_tokens=64, logit_bias=ban, **kwargs)
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
        assert got["usage"]["completion_tokens"] == 64
        np.testing.assert_array_equal(dev.scores, host.scores)
