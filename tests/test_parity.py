"""Engine logits against outside references.

f32 weights: transformers (torch CPU, float32, eager attention) on random small Phi3 and Llama
models: 64-token prefill, then 32 greedy decode steps, both fed the same tokens, on every backend
(the CPU, and the Metal backend's launches on the CPU harness: `engine_backend`).
Quantized weights: a float64 numpy forward pass (tests/reference/forward.py) over the weights as
the numpy reference decoder reads them, on every SIMD path the machine runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from conftest import make_hf_checkpoint
from reference.forward import forward, load_weights
from reference.quant import ACT_Q8_TYPES
from upg_backend import _core
from upg_backend.convert import convert_hf
from upg_backend.format import UPGFile
from upg_backend.llama import Llama

PREFILL, DECODE = 64, 32


def rel_err(got, ref) -> float:
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


def _longrope(n_freq: int) -> dict:
    rng = np.random.default_rng(7)
    return {"type": "longrope", "short_factor": list(1.0 + rng.random(n_freq)),
            "long_factor": list(2.0 + 4.0 * rng.random(n_freq))}


# (architecture, config overrides): GQA 1, 4 and 8; head_dim 64, 96, 128; partial rotary 0.5 and
# 0.75; LongRoPE switching to long factors at position 80 (< PREFILL + DECODE); tied and untied heads.
CONFIGS = {
    "phi3-mha-hd64": ("Phi3ForCausalLM", dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2)),
    "phi3-gqa4-hd96-partial0.5-tied": ("Phi3ForCausalLM", dict(
        hidden_size=384, num_attention_heads=4, num_key_value_heads=1, partial_rotary_factor=0.5,
        tie_word_embeddings=True)),
    "phi3-longrope-partial0.75": ("Phi3ForCausalLM", dict(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.75,
        max_position_embeddings=256, original_max_position_embeddings=80, rope_scaling=_longrope(24))),
    "llama-gqa8-hd128": ("LlamaForCausalLM", dict(
        hidden_size=256, num_attention_heads=8, num_key_value_heads=1, head_dim=128)),
    "llama-gqa4-hd64-tied": ("LlamaForCausalLM", dict(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_pair(request, tmp_path_factory):
    """(HF reference model, converted f32 .upg path, prompt tokens) for one config."""
    arch, overrides = CONFIGS[request.param]
    src = make_hf_checkpoint(tmp_path_factory.mktemp("hf"), arch, seed=1, **overrides)
    path = src.parent / "model.upg"
    convert_hf(src, path, type="f32", progress=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    prompt = np.random.default_rng(3).integers(0, ref.config.vocab_size, PREFILL).tolist()
    return ref, path, prompt


@pytest.fixture(scope="module")
def reference_logits(model_pair):
    """transformers' prefill logits [PREFILL, vocab], the greedy tokens, and each step's logits."""
    ref, _, prompt = model_pair
    with torch.no_grad():
        out = ref(torch.tensor([prompt]), use_cache=True)
        prefill = out.logits[0].double().numpy()
        cache, steps, tokens = out.past_key_values, [], []
        token = int(prefill[-1].argmax())
        for _ in range(DECODE):
            tokens.append(token)
            out = ref(torch.tensor([[token]]), cache=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[0, -1].double().numpy())
            token = int(steps[-1].argmax())
    return prefill, tokens, np.stack(steps)


def _run_engine(path, prompt, tokens, kv_type, backend="cpu"):
    llm = Llama(str(path), n_ctx=128, logits_all=True, kv_type=kv_type, n_threads=2, backend=backend)
    llm.eval(prompt)
    prefill = llm.scores.copy()
    for t in tokens:  # one token per call: the decode path
        llm.eval([t])
    return llm, prefill, llm.scores[len(prompt):].copy()


def test_f32_matches_transformers(model_pair, reference_logits, engine_backend):
    ref_prefill, tokens, ref_steps = reference_logits
    _, prefill, steps = _run_engine(model_pair[1], model_pair[2], tokens, "f32", engine_backend())
    assert prefill.shape == ref_prefill.shape
    assert rel_err(prefill, ref_prefill) <= 1e-4
    for i in range(DECODE):
        assert rel_err(steps[i], ref_steps[i]) <= 1e-4, f"decode step {i}"


def test_f16_kv_cache(model_pair, reference_logits, engine_backend):
    # Keys and values rounded to f16 (relative error <= 2^-12 each) shift attention scores by up to
    # |q||k| 2^-12; with these weights scores reach tens, so softmax outputs move by ~1e-3 relative
    # per layer, and two layers plus the head give up to a few 1e-3 (2e-3 seen). 5e-3 keeps that
    # margin, while a layout or conversion bug in the cache gives errors of order 1.
    ref_prefill, tokens, ref_steps = reference_logits
    _, prefill, steps = _run_engine(model_pair[1], model_pair[2], tokens, "f16", engine_backend())
    assert rel_err(prefill, ref_prefill) <= 5e-3
    assert max(rel_err(steps[i], ref_steps[i]) for i in range(DECODE)) <= 5e-3


def test_prefix_reuse(model_pair, reference_logits):
    _, path, prompt = model_pair
    _, tokens, _ = reference_logits
    llm, _, _ = _run_engine(path, prompt, tokens[:4], "f32")
    # a new prompt sharing the first 40 tokens: the context keeps their KV cache, evaluates the rest
    new_prompt = prompt[:40] + tokens[:10]
    next(llm.generate(new_prompt))
    assert llm.n_tokens == len(new_prompt)
    fresh = Llama(str(path), n_ctx=128, logits_all=True, kv_type="f32", n_threads=2)
    fresh.eval(new_prompt)
    assert rel_err(llm.scores[40:], fresh.scores[40:].astype(np.float64)) <= 1e-5


def test_numpy_reference_matches_transformers(model_pair, reference_logits):
    """The float64 numpy forward used for quantized parity agrees with transformers."""
    _, path, prompt = model_pair
    ref_prefill, tokens, ref_steps = reference_logits
    upg = UPGFile(path)
    weights = load_weights(upg)
    assert rel_err(forward(weights, upg.config, prompt), ref_prefill) <= 1e-5
    if upg.config.rope_type != "longrope":  # one full pass cannot mix short- and long-factor keys
        assert rel_err(forward(weights, upg.config, prompt + tokens)[PREFILL:], ref_steps) <= 1e-5


# ---- quantized types against the numpy reference, on every SIMD path ----

# The grid types last: the 128-wide rows of iq4_xs and iq3 fall back to iq4_nl (recipes.py), the
# 256-wide down_proj rows keep them.
QUANT_CASES = ([(t, b, o) for t in ("q8_0", "q4", "q3") for b in (32, 64) for o in (0.0, 0.02)]
               + [(t, 32, 0.0) for t in ("iq4_nl", "iq4_xs", "iq3")])
Q_PREFILL, Q_DECODE = 24, 8

_ENGINE_SCRIPT = """
import json, sys
import numpy as np
from upg_backend.llama import Llama
out_dir, tokens = sys.argv[1], json.loads(sys.argv[2])
for i, path in enumerate(sys.argv[3:]):
    llm = Llama(path, n_ctx=64, logits_all=True, kv_type="f32", n_threads=2)
    llm.eval(tokens[:%d])
    for t in tokens[%d:]:
        llm.eval([t])
    np.save(f"{out_dir}/{i}.npy", llm.scores)
""" % (Q_PREFILL, Q_PREFILL)


@pytest.fixture(scope="module")
def quantized_models(tmp_path_factory):
    """Converted files of one Phi3 model for every QUANT_CASE, and the token sequence."""
    root = tmp_path_factory.mktemp("quant")
    src = make_hf_checkpoint(root / "hf", "Phi3ForCausalLM", seed=2, hidden_size=128, intermediate_size=256,
                             num_attention_heads=4, num_key_value_heads=1, partial_rotary_factor=0.75)
    paths = []
    for dtype, block, outliers in QUANT_CASES:
        paths.append(root / f"{dtype}-{block}-{outliers}.upg")
        convert_hf(src, paths[-1], type=dtype, block=block, outliers=outliers, progress=False)
    tokens = np.random.default_rng(4).integers(0, 320, Q_PREFILL + Q_DECODE).tolist()
    return paths, tokens


@pytest.fixture(scope="module", params=_core.simd_paths())
def engine_logits(request, quantized_models, tmp_path_factory):
    """Engine logits of every quantized file with UPG_SIMD set (a fresh process per path: the
    variable is read once per process)."""
    paths, tokens = quantized_models
    out = tmp_path_factory.mktemp(f"simd-{request.param}")
    env = {**os.environ, "UPG_SIMD": request.param}
    subprocess.run([sys.executable, "-c", _ENGINE_SCRIPT, str(out), json.dumps(tokens), *map(str, paths)],
                   env=env, check=True, timeout=600)
    return [np.load(out / f"{i}.npy") for i in range(len(paths))]


@pytest.mark.parametrize("case", range(len(QUANT_CASES)), ids=[f"{t}-b{b}-o{o}" for t, b, o in QUANT_CASES])
def test_quantized_matches_numpy_reference(quantized_models, engine_logits, case):
    paths, tokens = quantized_models
    upg = UPGFile(paths[case])
    ref = forward(load_weights(upg), upg.config, tokens)
    got = engine_logits[case]
    assert got.shape == ref.shape
    if upg.tensors["lm_head.weight"].dtype not in ACT_Q8_TYPES:
        assert rel_err(got[:Q_PREFILL], ref[:Q_PREFILL]) <= 1e-3
        for i in range(Q_PREFILL, len(tokens)):
            assert rel_err(got[i], ref[i]) <= 1e-3, f"decode step {i - Q_PREFILL}"
        return
    # 8-bit activations: f32 rounding (summation order differs by path) can put an activation on
    # the other side of a rounding boundary, and on this 128-wide model one code off by one moves
    # the logits by about 3e-3. Such flips are rare and local; a kernel bug moves every position.
    errs = np.array([rel_err(got[i], ref[i]) for i in range(len(tokens))])
    assert np.median(errs) <= 1e-5, errs
    assert errs.max() <= 3e-2, errs


@pytest.mark.parametrize("case", [1, 7, 11], ids=["q8_0-b32-o0.02", "q4-b64-o0.02", "q3-b64-o0.02"])
def test_logits_do_not_depend_on_thread_count(quantized_models, case):
    """Threads split rows, heads and tokens, never one sum: 1, 2 and 3 threads give the same bits,
    so results (and comparisons against other engines) reproduce on any machine's core count."""
    paths, tokens = quantized_models
    runs = []
    for n_threads in (1, 2, 3):
        with Llama(str(paths[case]), n_ctx=64, logits_all=True, n_threads=n_threads) as llm:
            llm.eval(tokens[:Q_PREFILL])
            for t in tokens[Q_PREFILL:]:
                llm.eval([t])
            runs.append(np.array(llm.scores))
    np.testing.assert_array_equal(runs[1], runs[0])
    np.testing.assert_array_equal(runs[2], runs[0])
