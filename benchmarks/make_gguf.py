"""GGUF files for the llama.cpp comparison, written with the `gguf` package.

`requantize_gguf` rewrites a GGUF at another weight type (dequantize, quantize again) so that both
engines can run the same weights at the same bits per weight. `shape_gguf` writes a Phi-3
architecture model of a named upg_backend.bench shape whose every matrix is one random quantized tile
repeated: speed depends on shapes and types, not on values, and numpy quantizes a few million
weights a second, far too slow for 14.7B. Both stream tensor by tensor, so memory stays at one
tensor. The vocabulary is Phi-4's (PHI4_TOKENIZER), cut or padded to the shape's size.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

# Phi-4's tokenizer, as the test suite carries it.
PHI4_TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "data" / "phi-4" / "tokenizer.json"
FILE_TYPES = {"F16": 1, "Q8_0": 7, "Q4_0": 2}  # the types written, and their general.file_type (llama_ftype)


def _write(path: Path, arch: str, kv: Callable[[Any], None],
           tensors: Iterable[tuple[str, tuple[int, ...], Any, Callable[[], np.ndarray]]]) -> None:
    """Writes a GGUF: metadata from `kv(writer)`, then (name, dims, GGML type, loader) tensors in order,
    dims outermost first; a loader returns the tensor's bytes (quantized) or values (float)."""
    from gguf import GGUFWriter, GGMLQuantizationType

    tensors = list(tensors)
    tmp = path.with_suffix(".part")
    w = GGUFWriter(str(tmp), arch)
    kv(w)
    for name, dims, qtype, _ in tensors:
        if qtype == GGMLQuantizationType.F32:
            w.add_tensor_info(name, dims, np.dtype(np.float32), int(np.prod(dims)) * 4)
        elif qtype == GGMLQuantizationType.F16:
            w.add_tensor_info(name, dims, np.dtype(np.float16), int(np.prod(dims)) * 2)
        else:
            from gguf.quants import quant_shape_to_byte_shape
            byte_shape = quant_shape_to_byte_shape(dims, qtype)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, _, _, load in tensors:
        w.write_tensor_data(load())
    w.close()
    tmp.rename(path)


def _qtype(gguf_type: str) -> Any:
    from gguf import GGMLQuantizationType

    if gguf_type not in FILE_TYPES:
        raise ValueError(f"GGUF type must be one of {', '.join(FILE_TYPES)}, got {gguf_type!r}")
    return GGMLQuantizationType[gguf_type]


def requantize_gguf(src: Path, out: Path, gguf_type: str) -> Path:
    """Writes (once) `src` with every matrix converted to `gguf_type` (F16, Q8_0, Q4_0); metadata and
    1-D tensors are copied unchanged."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, quants

    if out.exists():
        return out
    qtype = _qtype(gguf_type)
    r = GGUFReader(str(src))

    def kv(w: Any) -> None:
        for name, field in r.fields.items():
            if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), vtype, sub)
        w.add_file_type(FILE_TYPES[gguf_type])

    def loader(t: Any) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            x = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            if len(t.shape) == 1:
                return x.reshape(-1)
            return x.astype(np.float16) if qtype == GGMLQuantizationType.F16 else quants.quantize(x, qtype)
        return load

    tensors = [(t.name, tuple(int(d) for d in reversed(t.shape)),
                GGMLQuantizationType.F32 if len(t.shape) == 1 else qtype, loader(t)) for t in r.tensors]
    _write(out, r.fields["general.architecture"].contents(), kv, tensors)
    return out


def _vocabulary(n_vocab: int) -> tuple[list[str], list[int], list[str], int]:
    """Phi-4's byte-level BPE vocabulary cut or padded to n_vocab tokens: (tokens, token types,
    merges, end-of-text id). llama.cpp needs as many tokens as embedding rows."""
    tj = json.loads(PHI4_TOKENIZER.read_text())
    tokens = [""] * len(tj["model"]["vocab"])
    for t, i in tj["model"]["vocab"].items():
        tokens[i] = t
    types = [1] * len(tokens)  # llama.cpp's LLAMA_TOKEN_TYPE_NORMAL
    for a in tj["added_tokens"]:
        tokens += [""] * (a["id"] + 1 - len(tokens))
        types += [1] * (len(tokens) - len(types))
        tokens[a["id"]], types[a["id"]] = a["content"], 3 if a["special"] else 4  # CONTROL, USER_DEFINED
    tokens, types = tokens[:n_vocab], types[:n_vocab]
    types += [3] * (n_vocab - len(tokens))
    tokens += [f"<|pad_{i}|>" for i in range(len(tokens), n_vocab)]
    ids = set(tokens)
    merges = [f"{a} {b}" for a, b in (m if isinstance(m, list) else m.split(" ", 1) for m in tj["model"]["merges"])
              if a in ids and b in ids and a + b in ids]
    eot = tokens.index("<|endoftext|>") if "<|endoftext|>" in tokens else n_vocab - 1
    return tokens, types, merges, eot


def shape_gguf(hf: dict[str, Any], out: Path, gguf_type: str, seed: int = 0) -> Path:
    """Writes (once) a phi3 GGUF with the hyper-parameters of a Hugging Face Phi-3 config dict and
    weights from one random tile (std 0.02) per matrix width, quantized to `gguf_type`."""
    from gguf import GGMLQuantizationType, quants

    if out.exists():
        return out
    qtype = _qtype(gguf_type)
    h, inter, n_layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    heads, kv_heads, vocab = hf["num_attention_heads"], hf["num_key_value_heads"], hf["vocab_size"]
    head_dim = hf.get("head_dim", h // heads)
    rot = int(head_dim * hf.get("partial_rotary_factor", 1.0))
    tied = hf.get("tie_word_embeddings", False)
    rng = np.random.default_rng(seed)
    tiles: dict[int, np.ndarray] = {}

    def matrix(rows: int, cols: int) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            if cols not in tiles:  # 64 random rows, quantized once, repeated down the matrix
                x = rng.standard_normal((64, cols), dtype=np.float32) * 0.02
                tiles[cols] = x.astype(np.float16) if qtype == GGMLQuantizationType.F16 else quants.quantize(x, qtype)
            t = tiles[cols]
            return np.tile(t, (-(-rows // len(t)), 1))[:rows]
        return load

    def norm(n: int) -> Callable[[], np.ndarray]:
        return lambda: np.ones(n, np.float32)

    f32 = GGMLQuantizationType.F32
    tensors = [("token_embd.weight", (vocab, h), qtype, matrix(vocab, h))]
    for i in range(n_layers):
        b = f"blk.{i}."
        tensors += [(b + "attn_norm.weight", (h,), f32, norm(h)),
                    (b + "attn_qkv.weight", ((heads + 2 * kv_heads) * head_dim, h), qtype,
                     matrix((heads + 2 * kv_heads) * head_dim, h)),
                    (b + "attn_output.weight", (h, heads * head_dim), qtype, matrix(h, heads * head_dim)),
                    (b + "ffn_norm.weight", (h,), f32, norm(h)),
                    (b + "ffn_up.weight", (2 * inter, h), qtype, matrix(2 * inter, h)),  # gate and up, fused
                    (b + "ffn_down.weight", (h, inter), qtype, matrix(h, inter))]
    tensors.append(("output_norm.weight", (h,), f32, norm(h)))
    if not tied:
        tensors.append(("output.weight", (vocab, h), qtype, matrix(vocab, h)))
    tokens, types, merges, eot = _vocabulary(vocab)

    def kv(w: Any) -> None:
        # not "phi3" in the name: llama.cpp then sets attributes of "</s>", which this vocabulary lacks
        w.add_name(f"random {h}x{n_layers} ({gguf_type})")
        w.add_file_type(FILE_TYPES[gguf_type])
        w.add_context_length(hf["max_position_embeddings"])
        w.add_embedding_length(h)
        w.add_feed_forward_length(inter)
        w.add_block_count(n_layers)
        w.add_head_count(heads)
        w.add_head_count_kv(kv_heads)
        w.add_rope_dimension_count(rot)
        w.add_rope_freq_base(float(hf.get("rope_theta", 10000.0)))
        w.add_layer_norm_rms_eps(float(hf.get("rms_norm_eps", 1e-5)))
        w.add_rope_scaling_orig_ctx_len(hf.get("original_max_position_embeddings", hf["max_position_embeddings"]))
        w.add_vocab_size(vocab)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("dbrx")  # cl100k's split: known to llama.cpp and to upg_backend.gguf_source
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(eot)
        w.add_eos_token_id(eot)
        w.add_add_bos_token(False)

    _write(out, "phi3", kv, tensors)
    return out
