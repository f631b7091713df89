"""The sampler in two halves (cpp/upg/sampler.h): the cut of a row on the backend (Backend.top_k,
here the CPU's default: the row downloaded and cut on the host) and the finish from its
candidates pick exactly the token sample_token picks from the whole row, and Session.eval_sample
and Llama's completions through it give the tokens of eval + sample."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from sampler_cases import random_history, random_params, random_row, reference_top_k, sampled_steps
from upg_backend import _core
from upg_backend.builtin import builtin_model_path
from upg_backend.format import UPGFile
from upg_backend.grammar import Grammar
from upg_backend.llama import Llama
from upg_backend.sampling import SamplingParams

SIZES = [1, 2, 7, 64, 300, 2049, 5000]


def on_backend(backend, row):
    buf = backend.alloc(4 * len(row))
    backend.upload(buf, row.view(np.uint8))
    return buf


def pick(fn):
    """fn()'s token, or the ValueError's message."""
    try:
        return fn()
    except ValueError as e:
        return str(e)


@pytest.mark.parametrize("n", SIZES)
def test_top_k_is_the_sorted_best(n):
    rng = np.random.default_rng(n)
    b = _core.CpuBackend(1)
    for _ in range(40):
        row = random_row(rng, n)
        k = int(rng.choice([1, 2, 40, _core.MAX_TOP_K]))
        skip = np.unique(rng.integers(0, n, int(rng.integers(0, 8)))).astype(np.int32)
        ids, values, skipped = b.top_k(on_backend(b, row), n, k, skip)
        want_ids, want_values = reference_top_k(row, k, skip)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(values[ids >= 0].view(np.uint32), want_values.view(np.uint32))  # -0 kept
        np.testing.assert_array_equal(skipped.view(np.uint32), row[skip].view(np.uint32))


@pytest.mark.parametrize("n", SIZES)
def test_candidates_pick_the_full_rows_token(n):
    """Many random rows (ties, bans, NaN), params, histories and biases, each with its own seed."""
    rng = np.random.default_rng(100 + n)
    b = _core.CpuBackend(1)
    cut_on_backend = 0
    for case in range(300):
        row, p, history = random_row(rng, n), random_params(rng, n), random_history(rng, n)
        seed = int(rng.integers(1 << 32))
        want = pick(lambda: _core.sample_token(row, p, history, seed))
        assert pick(lambda: b.sample(on_backend(b, row), n, p, history, seed)) == want, case
        cut_on_backend += p.temperature <= 0 or 1 <= p.top_k <= _core.MAX_TOP_K
    assert cut_on_backend > 200  # the cases are mostly ones the candidates path takes


def test_top_k_refuses_bad_arguments():
    b = _core.CpuBackend(1)
    buf = on_backend(b, np.zeros(10, np.float32))
    for k, skip in [(0, []), (_core.MAX_TOP_K + 1, []), (3, [4, 2]), (3, [2, 2]), (3, [10]), (3, [-1])]:
        with pytest.raises(ValueError, match="top_k"):
            b.top_k(buf, 10, k, np.array(skip, np.int32))
    with pytest.raises(ValueError, match="empty"):
        b.top_k(buf, 0, 3, np.array([], np.int32))


def builtin_session():
    path = builtin_model_path()
    return _core.Session(_core.Model(str(path), UPGFile(path).config.engine_config()), 160, "f16", 2)


PARAMS = [dict(), dict(temperature=1.3, top_k=5, top_p=1.0, min_p=0.0), dict(temperature=0.0, repeat_penalty=1.5),
          dict(temperature=0.9, top_k=_core.MAX_TOP_K, typical_p=0.8, presence_penalty=0.6, frequency_penalty=0.2,
               logit_bias={13: 5.0, 300: -np.inf}),
          dict(temperature=1.0, top_k=0)]  # a cut the backend does not take: the whole row


@pytest.mark.parametrize("kw", PARAMS, ids=lambda kw: ",".join(kw) or "defaults")
def test_eval_sample_is_eval_then_sample(kw):
    p = SamplingParams(**kw).to_core()
    host, dev = builtin_session(), builtin_session()
    prompt = np.arange(40, 60, dtype=np.int32)
    first = host.sample(host.eval(prompt)[-1], p, prompt)
    dev.eval(prompt)
    host.set_seed(11)
    dev.set_seed(11)
    runs = [sampled_steps(step, first, prompt)
            for step in (lambda tok, ids: host.sample(host.eval(np.array([tok], np.int32))[-1], p, ids),
                         lambda tok, ids: dev.eval_sample(tok, p, ids))]
    assert runs[1] == runs[0]
    assert len(set(runs[0])) > 1 or kw.get("temperature") == 0.0
    assert dev.n_past == host.n_past
    last = np.array([runs[0][-1]], np.int32)  # one more token's logits, by both ways
    dev.eval_sample(int(last[0]), p, last)
    np.testing.assert_array_equal(dev.last_logits(), host.eval(last)[-1])


def test_eval_sample_refuses_a_bad_bias_before_the_eval():
    s = builtin_session()
    s.eval(np.arange(1, 5, dtype=np.int32))
    p = _core.SamplingParams()
    p.logit_bias = {10 ** 6: 1.0}
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.eval_sample(7, p, np.array([7], np.int32))
    assert s.n_past == 4
    p.logit_bias = {i: -np.inf for i in range(s.last_logits().size)}
    with pytest.raises(ValueError, match="banned"):
        s.eval_sample(7, p, np.array([7], np.int32))
    assert s.n_past == 5  # evaluated, as eval + sample would have


@pytest.fixture(scope="module")
def pair():
    """The built-in model twice: sampled completions by eval + sample, and by eval_sample."""
    with Llama(n_ctx=512, n_threads=1, verbose=False) as host, Llama(n_ctx=512, n_threads=1, verbose=False) as dev:
        host.sample_on_backend, dev.sample_on_backend = False, True
        yield host, dev


def same_state(host, dev):
    assert dev.input_ids.tolist() == host.input_ids.tolist()
    np.testing.assert_array_equal(dev.scores, host.scores)


COMPLETIONS = [dict(temperature=0.8, top_k=40, seed=3), dict(temperature=1.5, top_k=200, min_p=0.0, seed=4),
               dict(temperature=0.0, repeat_penalty=1.4, seed=5),
               dict(temperature=0.7, top_k=10, presence_penalty=0.8, frequency_penalty=0.3, seed=6),
               dict(temperature=1.0, top_k=0, seed=7), dict(seed=8, stop=["0"])]


@pytest.mark.parametrize("kwargs", COMPLETIONS, ids=lambda k: ",".join(k))
def test_sampled_completion_is_the_host_loops(pair, kwargs):
    host, dev = pair
    ban = {t: -np.inf for t in host._eos_ids}  # the built-in model would end its text in a few tokens
    want = host.create_completion("Once upon a time", max_tokens=48, logit_bias={**ban, 13: 3.0}, **kwargs)
    got = dev.create_completion("Once upon a time", max_tokens=48, logit_bias={**ban, 13: 3.0}, **kwargs)
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    assert got["usage"] == want["usage"] and want["usage"]["completion_tokens"] > 1
    assert len(set(host.input_ids[-8:].tolist())) > 1  # it samples, not only one token
    same_state(host, dev)


def test_generate_is_the_host_loops(pair):
    host, dev = pair
    tokens = [list(itertools.islice(llm.generate(llm.tokenize(b"The river"), temp=0.9, top_k=30, seed=9), 20))
              for llm in pair]
    assert tokens[1] == tokens[0]
    same_state(host, dev)


def test_a_stream_closed_early_leaves_the_same_state(pair):
    host, dev = pair
    for llm in pair:
        stream = llm.create_completion("The river", temperature=0.9, max_tokens=40, stream=True, seed=2)
        for _ in range(3):
            next(stream)
        stream.close()
    same_state(host, dev)
    assert dev.sample(SamplingParams(temperature=0)) == host.sample(SamplingParams(temperature=0))


def test_sampling_that_needs_the_logits_stays_on_the_host(pair, monkeypatch):
    _, dev = pair
    calls = []
    monkeypatch.setattr(dev, "_eval_sample", lambda *a: calls.append(a) or Llama._eval_sample(dev, *a))
    dev.create_completion("The river", temperature=0.9, max_tokens=4, seed=1)
    assert len(calls) == 3  # every token but the first, which the prompt's logits give
    calls.clear()
    dev.create_completion("The river", temperature=0.9, max_tokens=4, seed=1, logprobs=2)
    dev.create_completion("The river", temperature=0.9, max_tokens=4, seed=1, grammar=Grammar.from_gbnf('root ::= [a-z]+'))
    dev.create_completion("The river", temperature=0.9, max_tokens=4, seed=1, logits_processor=[lambda ids, x: x])
    assert calls == []

