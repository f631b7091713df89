"""Hugging Face checkpoint -> .upg conversion, and the `upg convert/inspect/verify` commands."""
from __future__ import annotations

import datetime
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PHI4_DIR
from reference.quant import dequantize
from upg_backend.cli import main
from upg_backend.convert import ConversionError, convert_hf
from upg_backend.format import UPGFile


def hf_tensors(src) -> dict[str, np.ndarray]:
    """All checkpoint tensors as float32, read by torch (an independent reader, bf16 included)."""
    out = {}
    for f in sorted(src.glob("*.safetensors")):
        out.update({k: v.float().numpy() for k, v in load_file(f).items()})
    return out


def test_phi3_f32_is_exact_and_header_complete(hf_checkpoint, tmp_path):
    src = hf_checkpoint(architecture="Phi3ForCausalLM")
    out = tmp_path / "m.upg"
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    convert_hf(src, out, type="f32", progress=False)
    upg = UPGFile(out)
    ref = hf_tensors(src)
    assert set(upg.tensors) == set(ref)
    for name, w in ref.items():
        assert upg.tensors[name].dtype == "f32"
        np.testing.assert_array_equal(upg.tensor(name), w)

    h = upg.header
    tok_config = json.loads((PHI4_DIR / "tokenizer_config.json").read_text())
    assert h["architecture"] == "Phi3ForCausalLM"
    assert h["config"] == json.loads((src / "config.json").read_text())
    assert h["tokenizer"] == json.loads((PHI4_DIR / "tokenizer.json").read_text())
    assert h["tokenizer_config"] == {k: v for k, v in tok_config.items() if k != "chat_template"}
    assert h["chat_templates"] == {"default": tok_config["chat_template"]}
    assert h["generation"] == json.loads((src / "generation_config.json").read_text())
    assert h["quantization"] == {"default": "f32", "block": 0, "overrides": {}, "outliers": 0.0}
    prov = h["provenance"]
    assert prov["source"] == src.name and prov["source_format"] == "hf"
    assert prov["converter"].startswith("upg_backend ") and prov["converter"][-1].isdigit()
    created = datetime.datetime.fromisoformat(prov["created"])
    assert before <= created <= datetime.datetime.now(datetime.timezone.utc)
    assert upg.config.num_hidden_layers == 2


def test_llama_sharded_bf16_is_fused(hf_checkpoint, tmp_path):
    src = hf_checkpoint(architecture="LlamaForCausalLM", dtype="bfloat16", max_shard_size="100KB",
                        tie_word_embeddings=True)
    assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 2
    out = tmp_path / "m.upg"
    convert_hf(src, out, type="f32", progress=False)
    upg = UPGFile(out)
    ref = hf_tensors(src)
    assert "lm_head.weight" not in upg.tensors
    for i in range(2):
        p = f"model.layers.{i}."
        np.testing.assert_array_equal(upg.tensor(p + "self_attn.qkv_proj.weight"), np.concatenate(
            [ref[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
        np.testing.assert_array_equal(upg.tensor(p + "mlp.gate_up_proj.weight"), np.concatenate(
            [ref[p + "mlp.gate_proj.weight"], ref[p + "mlp.up_proj.weight"]]))
        np.testing.assert_array_equal(upg.tensor(p + "self_attn.o_proj.weight"), ref[p + "self_attn.o_proj.weight"])
    np.testing.assert_array_equal(upg.tensor("model.embed_tokens.weight"), ref["model.embed_tokens.weight"])
    assert len(upg.tensors) == 2 + 6 * 2


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0", "q4", "q3"])
def test_weight_types(hf_checkpoint, tmp_path, dtype):
    src = hf_checkpoint(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
    out = tmp_path / "m.upg"
    block = 64 if dtype == "q3" else 32
    convert_hf(src, out, type=dtype, block=block, progress=False)
    upg = UPGFile(out)
    ref = hf_tensors(src)
    assert upg.header["quantization"]["default"] == dtype
    for name, w in ref.items():
        t = upg.tensors[name]
        if w.ndim == 1:
            assert t.dtype == "f32"
            np.testing.assert_array_equal(upg.tensor(name), w)
        elif dtype in ("f16", "bf16"):
            tw = torch.from_numpy(w).to(getattr(torch, {"f16": "float16", "bf16": "bfloat16"}[dtype]))
            np.testing.assert_array_equal(upg.tensor(name).astype(np.float32), tw.float().numpy())
        else:
            assert (t.dtype, t.block) == (dtype, block)
            got = dequantize(dtype, block, upg.tensor(name), *w.shape)
            assert np.abs(got - w).max() <= np.abs(w).max() / {"q8_0": 100, "q4": 6, "q3": 3}[dtype]


def test_outliers_recipe(hf_checkpoint, tmp_path):
    src = hf_checkpoint(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
    out = tmp_path / "m.upg"
    convert_hf(src, out, type="q4", outliers=0.02, progress=False)
    upg = UPGFile(out)
    assert upg.header["quantization"] == {"default": "q4", "block": 32, "overrides": {}, "outliers": 0.02}
    down = "model.layers.0.mlp.down_proj.weight"  # [64, 128]: round(0.02 * 128) = 3 per row
    assert upg.tensors[down + ".outlier_col"].dims == (64 * 3,)
    assert upg.tensors[down + ".outlier_rowptr"].dims == (65,)
    # [*, 64] matrices: round(1.28) = 1 per row
    assert upg.tensors["model.layers.0.self_attn.o_proj.weight.outlier_val"].dims == (64,)
    assert not any(n.startswith("model.norm.weight.") for n in upg.tensors)


def test_chat_template_forms(hf_checkpoint, tmp_path):
    src = hf_checkpoint()
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": "A"}, {"name": "tool_use", "template": "B"}]
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    convert_hf(src, tmp_path / "a.upg", type="f16", progress=False)
    assert UPGFile(tmp_path / "a.upg").header["chat_templates"] == {"default": "A", "tool_use": "B"}
    (src / "chat_template.jinja").write_text("C {{ messages }}")
    convert_hf(src, tmp_path / "b.upg", type="f16", progress=False)
    assert UPGFile(tmp_path / "b.upg").header["chat_templates"] == {"default": "C {{ messages }}", "tool_use": "B"}
    assert "chat_template" not in UPGFile(tmp_path / "b.upg").header["tokenizer_config"]


# ---- errors: each names the file and tensor, and leaves no output behind ----

def _rewrite(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _missing_shard(src):
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    (src / shard).unlink()
    return rf"{shard}.*(missing|holding)|missing.*{shard}"


def _missing_tensor(src):
    _rewrite(src / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    return "model.layers.1.mlp.down_proj.weight.*missing"


def _wrong_shape(src):
    _rewrite(src / "model.safetensors", lambda t: t.update(
        {"model.layers.0.self_attn.o_proj.weight": torch.zeros(128, 64)}))
    return r"model.safetensors.*model.layers.0.self_attn.o_proj.weight.*shape \[128, 64\]"


def _nan(src):
    def poison(t):
        t["model.layers.1.mlp.gate_up_proj.weight"][3, 5] = float("nan")
    _rewrite(src / "model.safetensors", poison)
    return "model.safetensors.*model.layers.1.mlp.gate_up_proj.weight.*NaN"


def _inf(src):
    def poison(t):
        t["model.embed_tokens.weight"][0, 0] = float("inf")
    _rewrite(src / "model.safetensors", poison)
    return "model.safetensors.*model.embed_tokens.weight.*Inf"


def _architecture(src):
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    return "config.json.*unsupported architecture 'GPT2LMHeadModel'"


def _extra_tensor(src):
    _rewrite(src / "model.safetensors", lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(128)}))
    return "model.safetensors.*model.layers.0.self_attn.o_proj.bias.*not supported"


def _no_tokenizer(src):
    (src / "tokenizer.json").unlink()
    return "tokenizer.json is missing"


def _no_config(src):
    (src / "config.json").unlink()
    return "config.json is missing"


@pytest.mark.parametrize("break_it", [_missing_shard, _missing_tensor, _wrong_shape, _nan, _inf, _architecture,
                                      _extra_tensor, _no_tokenizer, _no_config])
def test_conversion_errors(hf_checkpoint, tmp_path, break_it):
    sharded = break_it is _missing_shard
    src = hf_checkpoint(max_shard_size="100KB" if sharded else None)
    pattern = break_it(src)
    out = tmp_path / "out" / "m.upg"
    out.parent.mkdir()
    with pytest.raises(ConversionError, match=pattern):
        convert_hf(src, out, type="q8_0", progress=False)
    assert list(out.parent.iterdir()) == []


def test_block_must_divide_columns(hf_checkpoint, tmp_path):
    src = hf_checkpoint(hidden_size=96, num_attention_heads=3, num_key_value_heads=1)
    with pytest.raises(ValueError, match="model.embed_tokens.weight.*96.*block 64"):
        convert_hf(src, tmp_path / "m.upg", type="q4", block=64, progress=False)
    assert list(tmp_path.glob("m.upg*")) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(type="q5"), "unknown weight type"), (dict(type="q4", block=16), "block"),
    (dict(type="f16", outliers=0.01), "outliers"), (dict(type="q4", outliers=1.5), "outliers")])
def test_bad_arguments(hf_checkpoint, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        convert_hf(tmp_path, tmp_path / "m.upg", progress=False, **kwargs)


# ---- the command line ----

def test_cli_convert_inspect_verify(hf_checkpoint, tmp_path, capsys):
    src = hf_checkpoint()
    out = tmp_path / "m.upg"
    assert main(["convert", str(src), "-o", str(out), "--type", "q4", "--block", "64", "--outliers", "0.01",
                 "--quiet"]) == 0
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    upg = UPGFile(out)
    for needle in ["Phi3ForCausalLM", "hidden 128", "layers 2", "bits per weight", "upg_backend",
                   "model.layers.1.mlp.gate_up_proj.weight", "512x128", f"{out.stat().st_size:,} bytes"]:
        assert needle in text
    weights = sum(t.n_elements for n, t in upg.tensors.items() if ".outlier_" not in n)
    bpw = 8 * sum(t.nbytes for t in upg.tensors.values()) / weights
    assert f"{bpw:.3f} bits per weight" in text
    assert main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.strip() == "OK"


def test_cli_errors_are_one_line(hf_checkpoint, tmp_path, capsys):
    src = hf_checkpoint()
    out = tmp_path / "m.upg"
    assert main(["convert", str(src), "-o", str(out), "--type", "f16", "--quiet"]) == 0
    upg = UPGFile(out)
    raw = bytearray(out.read_bytes())
    raw[upg.data_offset + upg.tensors["lm_head.weight"].offset + 10] ^= 0xFF
    del upg
    bad = tmp_path / "bad.upg"
    bad.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["verify", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "crc" in err.lower() and "Traceback" not in err

    (src / "config.json").unlink()
    assert main(["convert", str(src), "-o", str(tmp_path / "x.upg"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json is missing" in err

    proc = subprocess.run([sys.executable, "-m", "upg_backend.cli", "inspect", str(tmp_path / "none.upg")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "none.upg" in proc.stderr
