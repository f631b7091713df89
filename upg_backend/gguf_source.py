"""GGUF files (llama.cpp) -> .upg: configuration, tokenizer and tensors rebuilt in Hugging Face form.

The GGUF metadata gives the config.json fields, the vocabulary and merges give a tokenizer.json,
and every tensor is dequantized to float32 with `gguf.quants.dequantize` and renamed to the UPG
(Hugging Face, fused) layout. Every GGUF fix-up is in `_tensor_plan`: llama.cpp's converter
permutes the Q and K rows of Llama models for its adjacent-pairs RoPE, and this undoes it.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import ModelConfig
from .calibrate import Importance
from .convert import ConversionError, calibrated_sources, check_parts, provenance, write_with_progress
from .format import TENSOR_ALIGN, Encoded
from .recipes import Recipe, get_recipe

ARCHITECTURES = {"llama": "LlamaForCausalLM", "phi3": "Phi3ForCausalLM"}
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS")
# GGUF types that a UPG type holds exactly (its bytes regrouped, FORMAT.md): these import without a
# second rounding when the recipe stores the matrix as that type (and `type="source"` chooses it).
EXACT_TYPES = {"Q8_0": "q8_0", "Q4_0": "q4", "IQ4_NL": "iq4_nl", "IQ4_XS": "iq4_xs"}
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4

# tokenizer.ggml.pre -> pre-tokenizer of the byte-level BPE: llama.cpp's split for that name
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS: dict[str, tuple[str, str | None]] = {
    # name: (kind, regex); "gpt2" is GPT-2's own split, built into the ByteLevel pre-tokenizer
    "default": ("gpt2", None), "gpt2": ("gpt2", None), "gpt-2": ("gpt2", None),  # llama.cpp names it gpt-2
    "smollm": ("digits+gpt2", None),  # as SmolLM's tokenizer.json: each digit alone, then GPT-2's split
    **{n: ("split", _LLAMA3_SPLIT) for n in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3")},
    **{n: ("split", _QWEN2_SPLIT) for n in ("qwen2", "deepseek-r1-qwen")},
}


class _GGUF:
    """A GGUF file: its metadata as Python values and its tensors by name."""

    def __init__(self, path: Path):
        from gguf import GGUFReader  # an optional dependency: only GGUF conversion needs it

        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        try:
            self.reader = GGUFReader(str(path))
        except (ValueError, OSError, KeyError) as e:
            raise ConversionError(f"{path}: not a readable GGUF file: {e}") from e
        self.path = path
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch = self.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise ConversionError(f"{path}: architecture {arch!r} is not supported; supported: "
                                  f"{', '.join(ARCHITECTURES)}")
        self.arch = arch

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ConversionError(f"{self.path}: metadata key {key} is missing")
        return value

    def shape(self, name: str) -> tuple[int, ...]:
        """Dims outermost first, as PyTorch (GGUF lists them innermost first)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape))

    def kind(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def sections(self, name: str) -> list[np.ndarray]:
        """A matrix of an EXACT_TYPES type as its UPG type's sections, each [rows, bytes of a row]:
        GGUF's blocks split into their fields, each field's bytes of a row concatenated."""
        rows, cols = self.shape(name)
        raw = np.asarray(self.tensors[name].data).view(np.uint8).reshape(rows, -1)
        if self.kind(name) == "IQ4_XS":  # per 256: d (f16), scales_h (u16), scales_l[4], qs[128]
            b = raw.reshape(rows, cols // 256, 136)
            field = lambda lo, hi: b[:, :, lo:hi].reshape(rows, -1)  # noqa: E731
            return [field(8, 136), np.concatenate([field(4, 8), field(2, 4)], axis=1), field(0, 2)]
        b = raw.reshape(rows, cols // 32, -1)  # Q8_0, Q4_0, IQ4_NL: d (f16), then the codes of 32
        return [b[:, :, 2:].reshape(rows, -1), b[:, :, :2].reshape(rows, -1)]

    def load(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, in PyTorch dims."""
        from gguf import quants

        t = self.tensors[name]
        kind = t.tensor_type.name
        if kind not in TENSOR_TYPES:
            raise ConversionError(f"{self.path}: tensor {name} has GGUF type {kind}, which is not supported; "
                                  f"supported: {', '.join(TENSOR_TYPES)}")
        w = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(self.shape(name))
        if not np.isfinite(w).all():
            raise ConversionError(f"{self.path}: tensor {name} contains NaN or Inf")
        return w


def _f32(value: Any) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _hf_config(g: _GGUF, tied: bool) -> dict[str, Any]:
    """config.json fields from the `<arch>.*` metadata keys."""
    a = g.arch
    hidden = int(g.need(f"{a}.embedding_length"))
    heads = int(g.need(f"{a}.attention.head_count"))
    head_dim = int(g.get(f"{a}.attention.key_length") or hidden // heads)
    tokens = g.get("tokenizer.ggml.tokens") or []
    vocab = int(g.get(f"{a}.vocab_size")
                or (g.shape("token_embd.weight")[0] if "token_embd.weight" in g.tensors else len(tokens)))
    context = int(g.need(f"{a}.context_length"))
    scaling = g.get(f"{a}.rope.scaling.type")
    if scaling not in (None, "none") and a == "llama":
        raise ConversionError(f"{g.path}: rope scaling {scaling!r} is not supported")
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[a]],
        "model_type": a,
        "hidden_size": hidden,
        "intermediate_size": int(g.need(f"{a}.feed_forward_length")),
        "num_hidden_layers": int(g.need(f"{a}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g.get(f"{a}.attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": _f32(g.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(g.get(f"{a}.rope.freq_base", 10000.0)),
        "max_position_embeddings": context,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    rope_dim = g.get(f"{a}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        if a == "llama":
            raise ConversionError(f"{g.path}: partial rotary ({rope_dim} of {head_dim} dims) needs phi3")
        config["partial_rotary_factor"] = int(rope_dim) / head_dim
    for key, field in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                       ("pad_token_id", "padding_token_id")):
        if (value := g.get(f"tokenizer.ggml.{field}")) is not None:
            config[key] = int(value)
    if "rope_factors_long.weight" in g.tensors:  # Phi-3 LongRoPE: the factors are tensors in a GGUF
        original = int(g.need(f"{a}.rope.scaling.original_context_length"))
        config["original_max_position_embeddings"] = original
        config["rope_scaling"] = {
            "type": "longrope", "rope_type": "longrope",
            "long_factor": [float(x) for x in g.load("rope_factors_long.weight")],
            "short_factor": [float(x) for x in g.load("rope_factors_short.weight")],
            "original_max_position_embeddings": original}
        if (attn := g.get(f"{a}.rope.scaling.attn_factor")) is not None:
            config["rope_scaling"]["attention_factor"] = float(attn)
    return config


def _pre_tokenizer(g: _GGUF) -> Any:
    from tokenizers import Regex, pre_tokenizers

    name = g.get("tokenizer.ggml.pre", "default")
    if name not in _PRE_TOKENIZERS:
        raise ConversionError(f"{g.path}: pre-tokenizer {name!r} (tokenizer.ggml.pre) is not supported; "
                              f"supported: {', '.join(_PRE_TOKENIZERS)}")
    kind, regex = _PRE_TOKENIZERS[name]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind != "split")
    if kind == "split":
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"), byte_level])
    if kind == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _sentencepiece_bpe(g: _GGUF, vocab: dict[str, int]) -> Any:
    """A SentencePiece BPE vocabulary (tokens and scores, no merges) as a `tokenizers` BPE with byte
    fallback, built as transformers builds one from a GGUF: the merges are every split of a token
    into two tokens, best score first (ties: longer left, then longer right piece). Phi-3's
    tokenizer marks word starts with a normalizer, Llama's with `Metaspace` (they differ only on
    text that starts with a space)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    scores = dict(zip(vocab, g.need("tokenizer.ggml.scores")))
    merges = []
    for piece, score in scores.items():
        splits = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges += sorted(splits, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges], fuse_unk=True, byte_fallback=True))
    if g.arch == "phi3":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    return tok


def _tokenizer_json(g: _GGUF) -> dict[str, Any]:
    """tokenizer.json of the BPE the GGUF describes: byte-level with merges ('gpt2'), or SentencePiece
    with scores ('llama'); control tokens special, user-defined ones added."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model = g.get("tokenizer.ggml.model")
    tokens = list(g.need("tokenizer.ggml.tokens"))
    types = list(g.get("tokenizer.ggml.token_type") or [])
    vocab = {t: i for i, t in enumerate(tokens)}
    if model == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in g.need("tokenizer.ggml.merges")]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
        tok.pre_tokenizer = _pre_tokenizer(g)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    elif model == "llama":
        tok = _sentencepiece_bpe(g, vocab)
    else:
        raise ConversionError(f"{g.path}: tokenizer model {model!r} (tokenizer.ggml.model) is not supported; "
                              "byte-level BPE ('gpt2') and SentencePiece BPE ('llama') are")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == _USER_DEFINED])
    return json.loads(tok.to_str())


def _tokenizer_config(g: _GGUF) -> dict[str, Any]:
    tokens = g.get("tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {}
    for key, field in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                       ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        if (i := g.get(f"tokenizer.ggml.{field}")) is not None and 0 <= int(i) < len(tokens):
            config[key] = tokens[int(i)]
    # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise.
    config["add_bos_token"] = bool(g.get("tokenizer.ggml.add_bos_token", g.get("tokenizer.ggml.model") == "llama"))
    config["add_eos_token"] = bool(g.get("tokenizer.ggml.add_eos_token", False))
    return config


def _generation(g: _GGUF) -> dict[str, Any]:
    """generation_config.json: BOS, and every end-of-turn id the file names (EOS first)."""
    eos = [int(i) for key in ("eos_token_id", "eot_token_id", "eom_token_id")
           if (i := g.get(f"tokenizer.ggml.{key}")) is not None]
    generation: dict[str, Any] = {"eos_token_id": list(dict.fromkeys(eos))}
    if (bos := g.get("tokenizer.ggml.bos_token_id")) is not None:
        generation["bos_token_id"] = int(bos)
    return generation


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `LlamaModel.permute`, which reorders each head's rows from
    rotate-half (first half, second half) to adjacent pairs: reshape(n_head, 2, d/2, ...).swapaxes(1, 2)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


Loader = Callable[[], np.ndarray]


def _tensor_plan(g: _GGUF, cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], Loader, list[str]]]:
    """The graph's tensors: (UPG name, shape, loader, GGUF tensors it reads)."""
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    q, kv = heads * hd, kv_heads * hd
    llama = g.arch == "llama"

    def part(name: str, shape: tuple[int, ...], permuted_heads: int = 0):
        return name, shape, permuted_heads if llama else 0  # llama.cpp permutes Llama's Q and K only

    def rows(*parts) -> tuple[Loader, list[tuple[str, tuple[int, ...]]]]:  # stacked by rows, as fused
        def load(dtype: str | None = None) -> np.ndarray | Encoded:
            if dtype is not None and all(EXACT_TYPES.get(g.kind(name)) == dtype for name, _, _ in parts):
                return _exact(parts)
            arrays = [_unpermute(g.load(name), n) if n else g.load(name) for name, _, n in parts]
            return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        return load, [(name, shape) for name, shape, _ in parts]

    def _exact(parts) -> Encoded:
        """The matrix's bytes from GGUF blocks of the type UPG stores it as: rows moved, never rounded."""
        per_part = [[_unpermute(s, n) if n else s for s in g.sections(name)] for name, _, n in parts]
        sections = [np.concatenate(group) for group in zip(*per_part)]
        pad = lambda b: np.pad(b, (0, -b.size % TENSOR_ALIGN))  # noqa: E731
        return Encoded(np.concatenate([pad(s.reshape(-1)) for s in sections]))

    plan = [("model.embed_tokens.weight", (cfg.vocab_size, h), rows(part("token_embd.weight", (cfg.vocab_size, h))))]
    for i in range(cfg.num_hidden_layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        if b + "attn_qkv.weight" in g.tensors:
            qkv = rows(part(b + "attn_qkv.weight", (q + 2 * kv, h)))
        else:
            qkv = rows(part(b + "attn_q.weight", (q, h), heads), part(b + "attn_k.weight", (kv, h), kv_heads),
                       part(b + "attn_v.weight", (kv, h)))
        if b + "ffn_gate.weight" in g.tensors:
            gate_up = rows(part(b + "ffn_gate.weight", (inter, h)), part(b + "ffn_up.weight", (inter, h)))
        else:  # Phi-3 files keep gate_up_proj fused under the name ffn_up
            gate_up = rows(part(b + "ffn_up.weight", (2 * inter, h)))
        plan += [(p + "input_layernorm.weight", (h,), rows(part(b + "attn_norm.weight", (h,)))),
                 (p + "self_attn.qkv_proj.weight", (q + 2 * kv, h), qkv),
                 (p + "self_attn.o_proj.weight", (h, q), rows(part(b + "attn_output.weight", (h, q)))),
                 (p + "post_attention_layernorm.weight", (h,), rows(part(b + "ffn_norm.weight", (h,)))),
                 (p + "mlp.gate_up_proj.weight", (2 * inter, h), gate_up),
                 (p + "mlp.down_proj.weight", (h, inter), rows(part(b + "ffn_down.weight", (h, inter))))]
    plan.append(("model.norm.weight", (h,), rows(part("output_norm.weight", (h,)))))
    if not cfg.tie_word_embeddings:
        plan.append(("lm_head.weight", (cfg.vocab_size, h), rows(part("output.weight", (cfg.vocab_size, h)))))
    return [(name, shape, load, parts) for name, shape, (load, parts) in plan]


# tensors a GGUF may carry that the plan does not read: consumed into the config, or recomputed
_CONSUMED = ("rope_factors_long.weight", "rope_factors_short.weight")


def convert_gguf(src: str | os.PathLike, out_path: str | os.PathLike, type: str = "f16", block: int = 32,
                 outliers: float = 0.0, recipe: str | Recipe | None = None, progress: bool = True,
                 importance: Importance | None = None, bpw: float | None = None) -> None:
    """Converts a GGUF file (architecture llama or phi3, byte-level BPE tokenizer) to a .upg file.

    Args:
        src: the .gguf file.
        out_path: the .upg file to write; it exists only if conversion succeeded.
        type: weight type of the matrices (recipes.WEIGHT_TYPES; 1-D tensors are f32), or "source":
            each matrix as the UPG type that holds its GGUF type exactly (EXACT_TYPES), else f16.
            A matrix whose GGUF type the chosen UPG type holds exactly is copied, not rounded again.
        block: elements per scale block of quantized types, 32 or 64.
        outliers: fraction of each row of a quantized matrix kept exactly in f16.
        recipe: a recipe (or the name of one in recipes.RECIPES) that replaces type, block and outliers.
        progress: show a progress bar with an ETA on stderr.
        importance, bpw: calibration and bit allocation, as convert.convert_hf takes them.

    Raises:
        ConversionError: the file, a metadata key or a tensor is missing or unsupported (the message
            names the file and tensor).
        ValueError: the arguments are invalid.
        ImportanceError: the importance belongs to another model.
    """
    if bpw is not None and recipe is not None:
        raise ValueError("bpw chooses the types itself: pass either bpw or recipe")
    source = type == "source" and recipe is None and bpw is None  # the recipe follows the file's types (below)
    rec = None if source else get_recipe(recipe, type, block, outliers)
    g = _GGUF(Path(src))
    tied = "output.weight" not in g.tensors
    hf_config = _hf_config(g, tied)
    try:
        cfg = ModelConfig.from_hf(hf_config)
    except ValueError as e:
        raise ConversionError(f"{g.path}: {e}") from e

    plan = _tensor_plan(g, cfg)
    if source:
        kinds = {name: {g.kind(p) for p, _ in parts} for name, shape, _, parts in plan if len(shape) == 2}
        rec = Recipe("source", "f16", overrides=tuple(
            (name, EXACT_TYPES[next(iter(k))]) for name, k in kinds.items() if len(k) == 1 and next(iter(k)) in EXACT_TYPES))

    def supported_type(name: str) -> None:
        if g.tensors[name].tensor_type.name not in TENSOR_TYPES:
            raise ConversionError(f"{g.path}: tensor {name} has GGUF type {g.tensors[name].tensor_type.name}, "
                                  f"which is not supported; supported: {', '.join(TENSOR_TYPES)}")

    used = set(_CONSUMED) | check_parts([p for *_, parts in plan for p in parts], "the metadata",
                                        lambda name: g.shape(name) if name in g.tensors else None,
                                        lambda name: g.path, supported_type)
    unused = sorted(set(g.tensors) - used)
    if unused:
        raise ConversionError(f"{g.path}: tensor {unused[0]} is not supported by the {cfg.architecture} graph")

    sources, quantization = calibrated_sources(rec, [(name, shape, load) for name, shape, load, _ in plan], tied,
                                              importance, bpw, progress)
    # A matrix stored as the UPG type that holds its GGUF type exactly is copied, not rounded again
    # (GGUF's Q8_0, Q4_0 and IQ4 blocks are of 32; outliers would change the codes).
    sources = [dataclasses.replace(s, load=lambda load=s.load, exact=(s.dtype if s.block == 32 and not s.outliers_per_row
                                                                      else None): load(exact))
               for s in sources]
    template = g.get("tokenizer.chat_template")
    header = {
        "architecture": cfg.architecture,
        "config": hf_config,
        "tokenizer": _tokenizer_json(g),
        "tokenizer_config": _tokenizer_config(g),
        "chat_templates": {"default": template} if template else {},
        "generation": _generation(g),
        "provenance": provenance(g.path.name, "gguf"),
        **quantization,
    }
    write_with_progress(out_path, header, sources, progress)
