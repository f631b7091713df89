"""GGUF -> .upg: synthetic GGUF files written from random Hugging Face checkpoints, and the real
SmolLM2-135M-Instruct (Q4_1) checked against transformers.

References independent of upg_backend.gguf_source: llama.cpp's `LlamaModel.permute` (re-typed here,
applied forward when writing, inverted by index arithmetic when reading), transformers' torch GGUF
dequantizer and its GGUF tokenizer loader, and transformers' LlamaForCausalLM.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

from chat_model import CORPUS, make_tokenizer_files
from conftest import smollm2_gguf_path
from upg_backend.convert import ConversionError, convert_hf
from upg_backend.format import UPGFile
from upg_backend.gguf_source import convert_gguf
from upg_backend.llama import Llama
from upg_backend.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (n_head already set to n_head_kv for K)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse, found by permuting the row indices and sorting them back."""
    order = llama_cpp_permute(np.arange(w.shape[0]), n_head)
    return w[np.argsort(order)]


def reference_dequant(t) -> np.ndarray:
    """A GGUF tensor as float32 in PyTorch dims, dequantized by transformers' torch code."""
    shape = tuple(int(d) for d in reversed(t.shape))
    if t.tensor_type in (Q.F32, Q.F16):
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    raw = torch.from_numpy(np.ascontiguousarray(t.data).view(np.uint8).reshape(-1).copy())
    return hf_dequantize(raw, int(t.tensor_type)).numpy().reshape(shape)


# where a block's f16 scales lie (ggml-common.h): the types not listed start with d
_SCALES_AT = {Q.Q4_K: slice(0, 4), Q.Q5_K: slice(0, 4), Q.Q6_K: slice(-2, None), Q.Q3_K: slice(-2, None),
              Q.Q2_K: slice(-4, None)}
RANDOM_BLOCK_TYPES = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS, Q.IQ3_S, Q.IQ3_XXS, Q.IQ2_XS)


def random_k_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random bytes of a K- or i-quant tensor (gguf cannot quantize to these), with finite f16 scales."""
    elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // elems, nbytes), dtype=np.uint8)
    at = _SCALES_AT.get(qtype, slice(0, 2))
    n = len(range(nbytes)[at]) // 2
    blocks[:, at] = rng.uniform(-0.05, 0.05, size=(blocks.shape[0], n)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


# ----- synthetic GGUF files -----

def write_gguf(path: Path, hf_dir: Path, arch: str = "llama", types: dict[str, object] | None = None,
               drop: str | None = None, extra: dict[str, np.ndarray] | None = None,
               sentencepiece: list[tuple[str, float, int]] | None = None) -> None:
    """Writes hf_dir's checkpoint (and tokenizer.json) as a GGUF the way llama.cpp's converter does.

    Args:
        types: GGUF tensor name -> GGMLQuantizationType (default F32), or "random" K-quant bytes.
        drop: a GGUF tensor name to leave out.
        extra: additional tensors to write.
        sentencepiece: (token, score, type) of a SentencePiece vocabulary to write instead of
            tokenizer.json's byte-level BPE (ids 0-2: <unk>, <s>, </s>).
    """
    cfg = json.loads((hf_dir / "config.json").read_text())
    sd = {k: v.float().numpy() for k, v in load_file(hf_dir / "model.safetensors").items()}
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.get("tie_word_embeddings"):
        tensors["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        tensors[b + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        tensors[b + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        tensors[b + "attn_output.weight"] = sd[p + "self_attn.o_proj.weight"]
        tensors[b + "ffn_down.weight"] = sd[p + "mlp.down_proj.weight"]
        if arch == "llama":
            tensors[b + "attn_q.weight"] = llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], heads)
            tensors[b + "attn_k.weight"] = llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], kv_heads)
            tensors[b + "attn_v.weight"] = sd[p + "self_attn.v_proj.weight"]
            tensors[b + "ffn_gate.weight"] = sd[p + "mlp.gate_proj.weight"]
            tensors[b + "ffn_up.weight"] = sd[p + "mlp.up_proj.weight"]
        else:  # llama.cpp keeps Phi-3's fused matrices
            tensors[b + "attn_qkv.weight"] = sd[p + "self_attn.qkv_proj.weight"]
            tensors[b + "ffn_up.weight"] = sd[p + "mlp.gate_up_proj.weight"]
    tensors.update(extra or {})
    tensors.pop(drop, None)

    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    added = {a["content"]: a for a in tok["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    tok_config = json.loads((hf_dir / "tokenizer_config.json").read_text())

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(cfg["rope_theta"] if "rope_theta" in cfg else cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    w.add_vocab_size(cfg["vocab_size"])
    if sentencepiece:
        w.add_tokenizer_model("llama")
        w.add_token_list([t for t, _, _ in sentencepiece])
        w.add_token_scores([score for _, score, _ in sentencepiece])
        w.add_token_types([kind for _, _, kind in sentencepiece])
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([3 if t in added else 1 for t in tokens])
        w.add_token_merges(merges)
        w.add_bos_token_id(tok["model"]["vocab"][tok_config["bos_token"]])
        w.add_eos_token_id(tok["model"]["vocab"][tok_config["eos_token"]])
        w.add_add_bos_token(False)
    w.add_chat_template(tok_config["chat_template"])
    rng = np.random.default_rng(0)
    for name, value in tensors.items():
        qtype = (types or {}).get(name, Q.F32)
        value = np.ascontiguousarray(value, dtype=np.float32)
        if qtype in RANDOM_BLOCK_TYPES:
            w.add_tensor(name, random_k_blocks(qtype, *value.shape, rng), raw_dtype=qtype)
        elif qtype in (Q.F32, Q.F16):
            w.add_tensor(name, value.astype(np.float16 if qtype == Q.F16 else np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def reference_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as the reference reads it (float32, PyTorch dims)."""
    return {t.name: reference_dequant(t) for t in gguf.GGUFReader(str(path)).tensors}


def tiny_checkpoint(hf_checkpoint, arch: str, **config) -> Path:
    """A random checkpoint with a trained byte-level BPE tokenizer and a ChatML template."""
    import shutil

    shape = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    src = hf_checkpoint(architecture="LlamaForCausalLM" if arch == "llama" else "Phi3ForCausalLM",
                        **{**shape, **config})
    tok_dir = src.parent / (src.name + "-tok")
    tok_dir.mkdir()
    make_tokenizer_files(tok_dir)
    for f in tok_dir.iterdir():
        shutil.copy(f, src / f.name)
    return src


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_f32_gguf_equals_the_hf_conversion(hf_checkpoint, tmp_path, arch):
    src = tiny_checkpoint(hf_checkpoint, arch, tie_word_embeddings=arch == "llama")
    gguf_path = tmp_path / "m.gguf"
    write_gguf(gguf_path, src, arch)
    convert_gguf(gguf_path, tmp_path / "g.upg", type="f32", progress=False)
    convert_hf(src, tmp_path / "h.upg", type="f32", progress=False)
    got, want = UPGFile(tmp_path / "g.upg"), UPGFile(tmp_path / "h.upg")
    assert set(got.tensors) == set(want.tensors)
    for name in want.tensors:  # q/k un-permuted back to Hugging Face's rotate-half rows
        np.testing.assert_array_equal(got.tensor(name), want.tensor(name), err_msg=name)
    h = got.header
    assert h["provenance"]["source_format"] == "gguf" and h["provenance"]["source"] == "m.gguf"
    assert h["architecture"] == want.architecture
    # original_max_position_embeddings matters to LongRoPE only (Phi3Config defaults it to 4096)
    assert got.config.rope_type == want.config.rope_type == "default"
    assert dataclasses.replace(got.config, original_max_position_embeddings=0) == \
        dataclasses.replace(want.config, original_max_position_embeddings=0)
    tok_config = json.loads((src / "tokenizer_config.json").read_text())
    assert h["chat_templates"] == {"default": tok_config["chat_template"]}
    assert h["tokenizer_config"]["eos_token"] == tok_config["eos_token"] and not h["tokenizer_config"]["add_bos_token"]

    # the rebuilt tokenizer.json encodes like the original one
    ours = Tokenizer(h["tokenizer"], h["tokenizer_config"])
    original = Tokenizer(json.loads((src / "tokenizer.json").read_text()), tok_config)
    for text in sorted(set(CORPUS)) + ["<|im_start|>user\nhi there<|im_end|>", "  two  spaces\n\nand 123"]:
        assert ours.encode(text, special=True) == original.encode(text, special=True), text
        assert ours.decode(ours.encode(text)) == text.encode()


GGUF_TYPES = [Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", GGUF_TYPES, ids=lambda q: q.name)
def test_gguf_types_dequantize_like_transformers(hf_checkpoint, tmp_path, qtype):
    # K-quants use 256-element super-blocks: make every matrix's columns a multiple of 256
    src = tiny_checkpoint(hf_checkpoint, "llama", hidden_size=256, intermediate_size=256)
    matrices = ["token_embd.weight", "output.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
                "blk.1.attn_v.weight", "blk.1.ffn_gate.weight", "blk.1.ffn_down.weight"]
    write_gguf(tmp_path / "m.gguf", src, types={n: qtype for n in matrices})
    ref = reference_tensors(tmp_path / "m.gguf")
    convert_gguf(tmp_path / "m.gguf", tmp_path / "m.upg", type="f32", progress=False)
    upg = UPGFile(tmp_path / "m.upg")
    heads, kv_heads = 4, 2
    tol = dict(rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(upg.tensor("model.embed_tokens.weight"), ref["token_embd.weight"], **tol)
    np.testing.assert_allclose(upg.tensor("lm_head.weight"), ref["output.weight"], **tol)
    q, k = ref["blk.0.attn_q.weight"], ref["blk.0.attn_k.weight"]
    qkv = upg.tensor("model.layers.0.self_attn.qkv_proj.weight")
    np.testing.assert_allclose(qkv[:len(q)], llama_cpp_unpermute(q, heads), **tol)
    np.testing.assert_allclose(qkv[len(q):len(q) + len(k)], llama_cpp_unpermute(k, kv_heads), **tol)
    gate_up = upg.tensor("model.layers.1.mlp.gate_up_proj.weight")
    np.testing.assert_allclose(gate_up[:256], ref["blk.1.ffn_gate.weight"], **tol)
    np.testing.assert_allclose(upg.tensor("model.layers.1.mlp.down_proj.weight"), ref["blk.1.ffn_down.weight"], **tol)


EXACT = {Q.Q8_0: "q8_0", Q.Q4_0: "q4", Q.IQ4_NL: "iq4_nl", Q.IQ4_XS: "iq4_xs"}


@pytest.mark.parametrize("qtype", list(EXACT), ids=lambda q: q.name)
@pytest.mark.parametrize("how", ["source", "same type"])
def test_types_upg_holds_import_without_rounding(hf_checkpoint, tmp_path, qtype, how):
    """GGUF Q8_0, Q4_0, IQ4_NL and IQ4_XS matrices, permuted and fused as the graph wants, decode
    (numpy reference of FORMAT.md) to exactly gguf-py's dequantization of the GGUF blocks."""
    from reference import quant as ref

    src = tiny_checkpoint(hf_checkpoint, "llama", hidden_size=256, intermediate_size=256)
    matrices = ["output.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight",
                "blk.1.ffn_gate.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.weight"]
    write_gguf(tmp_path / "m.gguf", src, types={n: qtype for n in matrices})
    want = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
            for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    ours = EXACT[qtype]
    convert_gguf(tmp_path / "m.gguf", tmp_path / "m.upg", type="source" if how == "source" else ours, progress=False)
    upg = UPGFile(tmp_path / "m.upg")

    def decoded(name):
        t = upg.tensors[name]
        assert t.dtype == ours, name
        return ref.dequantize(ours, 32, upg.tensor(name), *t.dims)

    np.testing.assert_array_equal(decoded("lm_head.weight"), want["output.weight"])
    qkv = decoded("model.layers.0.self_attn.qkv_proj.weight")
    q, k = want["blk.0.attn_q.weight"], want["blk.0.attn_k.weight"]
    np.testing.assert_array_equal(qkv, np.concatenate([llama_cpp_unpermute(q, 4), llama_cpp_unpermute(k, 2),
                                                       want["blk.0.attn_v.weight"]]))
    np.testing.assert_array_equal(decoded("model.layers.1.mlp.gate_up_proj.weight"),
                                  np.concatenate([want["blk.1.ffn_gate.weight"], want["blk.1.ffn_up.weight"]]))
    np.testing.assert_array_equal(decoded("model.layers.1.mlp.down_proj.weight"), want["blk.1.ffn_down.weight"])
    if how == "source":  # f32 matrices of the GGUF: kept unrounded, as f16 (no UPG type is f32-exact... f16 is the fallback)
        assert upg.tensors["model.layers.1.self_attn.o_proj.weight"].dtype == "f16"


@pytest.mark.parametrize("qtype", [Q.IQ3_S, Q.IQ3_XXS, Q.IQ2_XS, Q.Q2_K, Q.Q3_K], ids=lambda q: q.name)
def test_other_i_and_k_quants_import(hf_checkpoint, tmp_path, qtype):
    """Types no UPG type holds: dequantized (gguf-py) and stored as asked, here iq4_xs."""
    from reference import quant as ref

    src = tiny_checkpoint(hf_checkpoint, "llama", hidden_size=256, intermediate_size=256)
    write_gguf(tmp_path / "m.gguf", src, types={"blk.1.ffn_down.weight": qtype})
    want = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
            for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}["blk.1.ffn_down.weight"]
    convert_gguf(tmp_path / "m.gguf", tmp_path / "m.upg", type="iq4_xs", progress=False)
    upg = UPGFile(tmp_path / "m.upg")
    got = ref.dequantize("iq4_xs", 32, upg.tensor("model.layers.1.mlp.down_proj.weight"), 256, 256)
    assert np.abs(got - want).max() <= 0.15 * np.abs(want).max()  # one 4-bit rounding of random codes


def _no_output(tmp_path: Path) -> None:
    assert not list(tmp_path.glob("*.upg*")), "a failed conversion left a file behind"


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"m\.gguf: tensor blk\.1\.ffn_down\.weight is missing"),
    ("type", r"m\.gguf: tensor blk\.0\.attn_v\.weight has GGUF type MXFP4"),
    ("extra", r"m\.gguf: tensor rope_freqs\.weight is not supported"),
    ("architecture", r"m\.gguf: architecture 'gemma' is not supported"),
])
def test_errors_name_file_and_tensor(hf_checkpoint, tmp_path, case, pattern):
    src = tiny_checkpoint(hf_checkpoint, "llama")
    path = tmp_path / "m.gguf"
    write_gguf(path, src, drop="blk.1.ffn_down.weight" if case == "missing" else None,
               types={"blk.0.attn_v.weight": Q.MXFP4} if case == "type" else None,
               extra={"rope_freqs.weight": np.ones(8, np.float32)} if case == "extra" else None)
    if case == "architecture":  # same file, another general.architecture
        data = path.read_bytes()
        path.write_bytes(data.replace(b"\x05\x00\x00\x00\x00\x00\x00\x00llama", b"\x05\x00\x00\x00\x00\x00\x00\x00gemma", 1))
    with pytest.raises(ConversionError, match=pattern):
        convert_gguf(path, tmp_path / "out.upg", type="q4", progress=False)
    _no_output(tmp_path)


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "out.upg", progress=False)
    with pytest.raises(ValueError, match="weight type"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "out.upg", type="q2", progress=False)
    _no_output(tmp_path)


# ----- the real model: SmolLM2-135M-Instruct, Q4_1 -----

@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_upg(smollm2_gguf, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("smollm2")
    paths = {t: out / f"{t}.upg" for t in ("f32", "f16")}
    for t, p in paths.items():
        convert_gguf(smollm2_gguf, p, type=t, progress=False)
    return paths


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """transformers' LlamaForCausalLM with the GGUF's weights, read without upg_backend."""
    import transformers

    r = gguf.GGUFReader(str(smollm2_gguf))
    meta = lambda key: r.fields[key].contents()  # noqa: E731
    heads, kv_heads = meta("llama.attention.head_count"), meta("llama.attention.head_count_kv")
    config = transformers.LlamaConfig(
        vocab_size=meta("llama.vocab_size"), hidden_size=meta("llama.embedding_length"),
        intermediate_size=meta("llama.feed_forward_length"), num_hidden_layers=meta("llama.block_count"),
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=meta("llama.context_length"),
        rms_norm_eps=meta("llama.attention.layer_norm_rms_epsilon"), rope_theta=meta("llama.rope.freq_base"),
        tie_word_embeddings="output.weight" not in {t.name for t in r.tensors})
    model = transformers.LlamaForCausalLM(config).eval()
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    state = {}
    for t in r.tensors:
        parts = t.name.split(".")
        w = reference_dequant(t)
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{names[parts[2]]}.weight"
            w = {"attn_q": lambda: llama_cpp_unpermute(w, heads),
                 "attn_k": lambda: llama_cpp_unpermute(w, kv_heads)}.get(parts[2], lambda: w)()
        else:
            name = names[parts[0]] + ".weight"
        state[name] = torch.from_numpy(np.array(w, dtype=np.float32))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


PROMPT_TEXT = ("The history of natural science begins with the earliest attempts to explain the world: "
               "why the sun rises, how plants grow, and what the stars are made of. 1234 + 5678 = 6912.")


def _logits(path: Path, tokens: list[int]) -> np.ndarray:
    llm = Llama(path, n_ctx=256, kv_type="f32", logits_all=True)
    llm.eval(tokens)
    return llm.scores.copy()


@pytest.mark.parametrize("weights, tol", [("f32", 1e-4), ("f16", 1e-4)])
def test_smollm2_logits_match_transformers(smollm2_upg, smollm2_hf, weights, tol):
    tokens = Tokenizer(UPGFile(smollm2_upg[weights]).header["tokenizer"]).encode(PROMPT_TEXT, add_bos=False)
    assert len(tokens) > 30
    got = _logits(smollm2_upg[weights], tokens)
    with torch.no_grad():  # f16: the reference runs with the weights rounded to f16 as the file stores them
        model = smollm2_hf if weights == "f32" else type(smollm2_hf)(smollm2_hf.config).eval()
        if weights == "f16":
            model.load_state_dict({k: v.half().float() for k, v in smollm2_hf.state_dict().items()})
        want = model(torch.tensor([tokens])).logits[0].numpy()
    rel = np.abs(got - want).max() / np.abs(want).max()
    print(f"{weights}: max |engine - transformers| / max |logit| = {rel:.2e}")
    assert rel <= tol


TOKENIZER_CORPUS = [
    "Hello world", " leading space", "trailing space ", "  two  spaces\tand\ttabs\n\nnewlines\r\n",
    "Numbers: 0 7 42 1234567890 3.14159 -2e10 1,000,000", "don't won't it's we'll they're I'd",
    "Große Straße, café, naïve, 東京, Привет мир, مرحبا, 🎉🚀 emoji", "def f(x):\n    return x ** 2  # square",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|><repo_name>a/b<file_sep>",
    "UPPER lower MiXeD", "a" * 50, "!!!???...,,,;;;", "https://example.com/path?q=1&r=2",
]


def test_smollm2_tokenizer_matches_transformers_gguf_loader(smollm2_gguf, smollm2_upg):
    from transformers import AutoTokenizer

    header = UPGFile(smollm2_upg["f16"]).header
    ours = Tokenizer(header["tokenizer"], header["tokenizer_config"])
    theirs = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    for text in TOKENIZER_CORPUS:
        ids = ours.encode(text, add_bos=True, special=True)
        assert ids == theirs.encode(text, add_special_tokens=True), text
        assert ours.decode(ids, special=True) == text.encode()
    assert ours.add_bos is False and ours.eos_id == 2 and header["generation"]["eos_token_id"] == [2]


def test_smollm2_greedy_chat_matches_transformers(smollm2_upg, smollm2_hf):
    llm = Llama(smollm2_upg["f32"], n_ctx=256, kv_type="f32")
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = llm.chat_template.render(messages, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    eos, ours = llm.token_eos(), []
    llm.eval(tokens)
    while len(ours) < 40:
        nxt = int(np.argmax(llm.scores[-1]))
        if nxt == eos:
            break
        ours.append(nxt)
        llm.eval([nxt])
    with torch.no_grad():
        out = smollm2_hf.generate(torch.tensor([tokens]), max_new_tokens=40, do_sample=False, eos_token_id=eos,
                                  pad_token_id=eos)
    theirs = [t for t in out[0, len(tokens):].tolist() if t != eos]
    answer = llm.detokenize(ours).decode()
    print("SmolLM2 answer:", answer)
    assert ours == theirs
    assert "Paris" in answer


def sentencepiece_vocab(size: int) -> list[tuple[str, float, int]]:
    """A SentencePiece BPE vocabulary of `size` tokens as llama.cpp writes one: <unk>, <s>, </s>,
    the 256 byte tokens, then word pieces (spaces as U+2581) with scores best first."""
    text = ("the quick brown fox jumps over the lazy dog and then the dog sleeps in the sun while "
            "the fox runs into the forest where other animals live together in peace")
    pieces = ["\u2581"] + sorted(set(text.replace(" ", "")))
    words = [("\u2581" + w) for w in text.split()]
    for n in range(2, 9):  # prefixes of words, then pieces inside them, most frequent first
        for w in sorted(set(words), key=lambda w: (-words.count(w), w)):
            if len(w) >= n and w[:n] not in pieces:
                pieces.append(w[:n])
    for n in range(2, 4):
        for w in sorted(set(words), key=lambda w: (-words.count(w), w)):
            pieces += [p for i in range(2, len(w) - n + 1) if (p := w[i:i + n]) not in pieces]
    special = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    byte_tokens = [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    pieces = pieces[:size - len(special) - len(byte_tokens)]
    assert len(special) + len(byte_tokens) + len(pieces) == size
    return special + byte_tokens + [(p, -float(i), 1) for i, p in enumerate(pieces)]


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_sentencepiece_vocabulary_tokenizes_as_transformers(hf_checkpoint, tmp_path, arch):
    """A GGUF with a SentencePiece vocabulary (most Phi-3 GGUFs): our rebuilt tokenizer against
    transformers' GGUF tokenizer, on text with spaces at the start, runs of spaces, newlines and
    characters outside the vocabulary (byte fallback)."""
    from transformers import AutoTokenizer

    src = tiny_checkpoint(hf_checkpoint, arch)
    vocab = sentencepiece_vocab(384)
    write_gguf(tmp_path / "m.gguf", src, arch, sentencepiece=vocab)
    convert_gguf(tmp_path / "m.gguf", tmp_path / "m.upg", type="f32", progress=False)
    ours = Llama(str(tmp_path / "m.upg"), n_ctx=64)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    texts = ["the quick brown fox", " the lazy dog sleeps", "forest  animals\nlive", "Große Straße, café 🎉",
             "   leading spaces", "x"]
    for text in texts:
        want = theirs.encode(text, add_special_tokens=False)
        assert ours.tokenize(text.encode(), add_bos=False) == want, text
        # Decoding: the same text, except that transformers strips the space SentencePiece puts
        # before the first word and our byte-exact pieces keep it (as llama.cpp's token pieces do).
        got, expected = ours.detokenize(want).decode(), theirs.decode(want)
        assert got == expected or (got == " " + expected), (text, got, expected)
    assert ours.tokenize(b"the dog")[0] == 1  # BOS: llama.cpp adds it to SentencePiece vocabularies
    assert any(t >= 3 + 256 for t in ours.tokenize(b"the forest", add_bos=False))  # word pieces, not bytes
