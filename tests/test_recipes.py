"""Quantization recipes: per-tensor types, bits per weight over the Phi-4 shape, and what a recipe
writes decoding to what the numpy reference quantizer (tests/reference/quant.py) gives."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import PHI4_DIR
from reference import quant as ref
from test_gguf import tiny_checkpoint, write_gguf
from upg_backend.config import ModelConfig
from upg_backend.format import UPGFile, tensor_nbytes
from upg_backend.gguf_source import convert_gguf
from upg_backend.recipes import RECIPES, Recipe, bits_per_weight, get_recipe


@pytest.fixture(scope="module")
def phi4() -> ModelConfig:
    return ModelConfig.from_hf(json.loads((PHI4_DIR / "config.json").read_text()))


def phi4_bits(cfg: ModelConfig, recipe: Recipe) -> float:
    """Bits per weight from the tensor list FORMAT.md gives, with format.tensor_nbytes (no file)."""
    h, hd, inter, L = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.num_hidden_layers
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd
    matrices = [("model.embed_tokens.weight", (cfg.vocab_size, h)), ("lm_head.weight", (cfg.vocab_size, h))]
    for i in range(L):
        p = f"model.layers.{i}."
        matrices += [(p + "self_attn.qkv_proj.weight", (qkv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                     (p + "mlp.gate_up_proj.weight", (2 * inter, h)), (p + "mlp.down_proj.weight", (h, inter))]
    pad = lambda n: (n + 63) // 64 * 64  # noqa: E731
    nbytes = (2 * L + 1) * pad(4 * h)  # the f32 norms
    weights = (2 * L + 1) * h
    for name, shape in matrices:
        t = recipe.type_for(name, shape)
        block = recipe.block if t in ref.QUANTIZED else 0
        nbytes += pad(tensor_nbytes(t, shape, block))
        k = round(recipe.outliers * shape[1]) if t in ref.QUANTIZED else 0
        if k:  # CSR companions: i32 rowptr, i32 col, f16 val
            nbytes += pad(4 * (shape[0] + 1)) + pad(4 * shape[0] * k) + pad(2 * shape[0] * k)
        weights += shape[0] * shape[1]
    return 8 * nbytes / weights


def test_phi4_shape_bits_per_weight(phi4):
    assert phi4.vocab_size == 100352 and phi4.num_hidden_layers == 40 and not phi4.tie_word_embeddings
    for name, recipe in RECIPES.items():
        assert bits_per_weight(phi4, recipe) == pytest.approx(phi4_bits(phi4, recipe), rel=1e-12), name
    # plain types: the FORMAT.md figure (code bits + 16 / block) plus a sliver of f32 norms
    for name, nominal in (("f16", 16), ("q8_0", 8.5), ("q4", 4.5), ("q3", 3.5)):
        assert nominal < bits_per_weight(phi4, RECIPES[name]) < nominal + 0.002, name
    for name in ("q3-mixed", "q3-outliers"):
        assert 3.25 < bits_per_weight(phi4, RECIPES[name]) <= 3.3, name
    assert RECIPES["q3-outliers"].outliers > 0
    assert bits_per_weight(phi4, RECIPES["q4"]) < bits_per_weight(phi4, RECIPES["q4-mixed"]) < 5


def test_type_for_overrides_and_tied_output():
    r = RECIPES["q4-mixed"]
    assert r.type_for("model.embed_tokens.weight", (10, 64)) == "q8_0"
    assert r.type_for("lm_head.weight", (10, 64)) == "q8_0"
    assert r.type_for("model.layers.3.mlp.down_proj.weight", (64, 128)) == "q4"
    assert r.type_for("model.norm.weight", (64,)) == "f32"
    r = RECIPES["q3-mixed"]
    assert r.type_for("model.layers.0.self_attn.qkv_proj.weight", (96, 64)) == "q4"
    assert r.type_for("model.layers.10.self_attn.qkv_proj.weight", (96, 64)) == "q3"
    # a tied embedding is the output matrix: lm_head's rule applies to it, only when tied
    assert r.type_for("model.embed_tokens.weight", (10, 64), tied=True) == "q4"
    assert r.type_for("model.embed_tokens.weight", (10, 64), tied=False) == "q3"
    first = Recipe("x", "q4", overrides=(("model.embed_tokens.weight", "q8_0"), ("lm_head.weight", "f16")))
    assert first.type_for("model.embed_tokens.weight", (10, 64), tied=True) == "q8_0"


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="x", default="q2"), "unknown weight type 'q2'"),
    (dict(name="x", default="q4", overrides=(("lm_head.weight", "int8"),)), "override 'lm_head.weight'"),
    (dict(name="x", default="q4", block=48), "block must be 32 or 64"),
    (dict(name="x", default="q4", outliers=1.5), "outliers must be a fraction"),
    (dict(name="x", default="f16", outliers=0.01), "outliers need a quantized type"),
])
def test_bad_recipes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Recipe(**kwargs)


def test_get_recipe():
    assert get_recipe("q3-mixed") is RECIPES["q3-mixed"]
    assert get_recipe(None, "q4", 64, 0.01) == Recipe("q4", "q4", 64, outliers=0.01)
    with pytest.raises(ValueError, match="unknown recipe 'q5'.*q4-mixed"):
        get_recipe("q5")


def test_mixed_recipe_file_decodes_like_the_reference_quantizer(hf_checkpoint, tmp_path):
    """Every matrix of a converted file: its type is the recipe's, and its bytes decode (reference
    decoder) to the reference quantizer's output on the source weights, outliers exactly kept."""
    src = tiny_checkpoint(hf_checkpoint, "llama", hidden_size=128, intermediate_size=256)
    write_gguf(tmp_path / "m.gguf", src)
    convert_gguf(tmp_path / "m.gguf", tmp_path / "f32.upg", type="f32", progress=False)
    recipe = Recipe("test", "q3", 32, (("lm_head.weight", "q8_0"), ("*.mlp.*", "q4"), ("*.o_proj.*", "f16")),
                    outliers=1 / 32)
    convert_gguf(tmp_path / "m.gguf", tmp_path / "mixed.upg", recipe=recipe, progress=False)
    full, mixed = UPGFile(tmp_path / "f32.upg"), UPGFile(tmp_path / "mixed.upg")
    seen = set()
    for name, info in full.tensors.items():
        w = full.tensor(name)
        got = mixed.tensors[name]
        want_type = recipe.type_for(name, w.shape)
        assert got.dtype == want_type, name
        seen.add(want_type)
        if want_type not in ref.QUANTIZED:
            want = w if want_type == "f32" else w.astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(mixed.tensor(name), want)
            continue
        rows, cols = w.shape
        k = cols // 32  # outliers: the k largest magnitudes of each row, exactly
        top = np.argsort(-np.abs(w), axis=1, kind="stable")[:, :k]
        rowptr, col = mixed.tensor(name + ".outlier_rowptr"), mixed.tensor(name + ".outlier_col")
        np.testing.assert_array_equal(rowptr, np.arange(rows + 1) * k)
        np.testing.assert_array_equal(col.reshape(rows, k), np.sort(top, axis=1))
        rest = w.copy()
        np.put_along_axis(rest, top, 0.0, axis=1)
        want = ref.dequantize(want_type, 32, ref.quantize(want_type, 32, rest), rows, cols)
        np.testing.assert_array_equal(ref.dequantize(want_type, 32, mixed.tensor(name), rows, cols), want)
        effective = ref.add_outliers(want, rowptr, col, mixed.raw(name + ".outlier_val").view(np.uint16))
        np.testing.assert_array_equal(np.take_along_axis(effective, top, axis=1),
                                      np.take_along_axis(w, top, axis=1).astype(np.float16).astype(np.float64))
    assert seen == {"f32", "f16", "q8_0", "q4", "q3"}
    q = mixed.header["quantization"]
    assert q["default"] == "q3" and q["block"] == 32 and q["outliers"] == 1 / 32
    assert q["overrides"]["lm_head.weight"] == "q8_0" and q["overrides"]["model.layers.1.mlp.down_proj.weight"] == "q4"
    assert "model.layers.0.self_attn.qkv_proj.weight" not in q["overrides"]
