"""Hugging Face checkpoints (config.json, tokenizer files, *.safetensors) -> one .upg file.

Phi3ForCausalLM tensors are written as they are; LlamaForCausalLM is fused to the same layout
(q/k/v -> qkv_proj, gate/up -> gate_up_proj). Every fix-up of checkpoint tensors is in
`tensor_plan`.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from .allocate import allocate, is_block_matrix, recipe_for, sample_rows
from .calibrate import Importance
from .config import ModelConfig
from . import gptq
from .format import Encoded, TensorSource, write_upg
from .recipes import Recipe, get_recipe

# tensors some checkpoints carry that the graph recomputes
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(ValueError):
    """The checkpoint cannot be converted (the message names the file and tensor)."""


class _Checkpoint:
    """The safetensors files of a checkpoint, read one tensor at a time."""

    def __init__(self, src: Path):
        from safetensors import safe_open  # an optional dependency: only conversion needs it

        index = src / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index)["weight_map"]
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not (src / shard).is_file():
                    first = next(n for n, s in weight_map.items() if s == shard)
                    raise ConversionError(f"{index}: shard {shard} (holding {first}) is missing from {src}")
        else:
            shards = sorted(p.name for p in src.glob("*.safetensors"))
            if not shards:
                raise ConversionError(f"{src}: no *.safetensors files")
        self.files = {shard: safe_open(str(src / shard), framework="numpy") for shard in shards}
        self.where: dict[str, str] = {}
        for shard, f in self.files.items():
            for name in f.keys():
                self.where[name] = shard
        if index.is_file():
            for name, shard in weight_map.items():
                if self.where.get(name) != shard:
                    raise ConversionError(f"{index}: tensor {name} is not in its shard {shard}")
        self.src = src

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.files[self.where[name]].get_slice(name).get_shape())

    def load(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """The tensor (or only the given rows of it: bit allocation's sample) as float32; raises
        ConversionError on NaN or Inf."""
        shard = self.where[name]
        f = self.files[shard]
        if f.get_slice(name).get_dtype() == "BF16":
            w = _read_bf16(self.src / shard, name, rows)
        else:
            w = f.get_tensor(name).astype(np.float32)
            w = w if rows is None else w[rows]
        if not np.isfinite(w).all():
            raise ConversionError(f"{shard}: tensor {name} contains NaN or Inf")
        return w


def _read_bf16(path: Path, name: str, rows: np.ndarray | None = None) -> np.ndarray:
    """A bf16 tensor (or the given rows of it, read alone) widened to float32 (safetensors' numpy
    loader has no bfloat16)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n))[name]
    begin, end = meta["data_offsets"]
    shape = meta["shape"]
    if rows is None:
        bits = np.fromfile(path, dtype="<u2", count=(end - begin) // 2, offset=8 + n + begin).reshape(shape)
    else:
        bits = np.array(np.memmap(path, dtype="<u2", mode="r", offset=8 + n + begin, shape=tuple(shape))[rows])
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: {e}") from e


def tensor_plan(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], list[tuple[str, tuple[int, ...]]]]]:
    """The graph's tensors: (UPG name, shape, [(checkpoint name, shape), ...] concatenated by rows)."""
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    llama = cfg.architecture == "LlamaForCausalLM"
    plan = [("model.embed_tokens.weight", (cfg.vocab_size, h), None)]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv = [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
               (p + "self_attn.v_proj.weight", (kv, h))]
        gate_up = [(p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h))]
        plan += [(p + "input_layernorm.weight", (h,), None),
                 (p + "self_attn.qkv_proj.weight", (q + 2 * kv, h), qkv if llama else None),
                 (p + "self_attn.o_proj.weight", (h, q), None),
                 (p + "post_attention_layernorm.weight", (h,), None),
                 (p + "mlp.gate_up_proj.weight", (2 * inter, h), gate_up if llama else None),
                 (p + "mlp.down_proj.weight", (h, inter), None)]
    plan.append(("model.norm.weight", (h,), None))
    if not cfg.tie_word_embeddings:
        plan.append(("lm_head.weight", (cfg.vocab_size, h), None))
    return [(name, shape, parts or [(name, shape)]) for name, shape, parts in plan]


def _chat_templates(src: Path, tokenizer_config: dict[str, Any]) -> dict[str, str]:
    """Named Jinja2 chat templates: tokenizer_config's `chat_template` (a string, or a list of
    {"name", "template"}) and a chat_template.jinja file, which wins for "default"."""
    templates: dict[str, str] = {}
    tpl = tokenizer_config.get("chat_template")
    if isinstance(tpl, str):
        templates["default"] = tpl
    elif isinstance(tpl, list):
        templates.update({t["name"]: t["template"] for t in tpl})
    jinja = src / "chat_template.jinja"
    if jinja.is_file():
        templates["default"] = jinja.read_text(encoding="utf-8")
    return templates


def _package_version() -> str:
    try:
        return importlib.metadata.version("upg-backend")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def check_parts(parts, implied_by: str, shape_of: Callable[[str], tuple | None],
                origin: Callable[[str], Any], check: Callable[[str], None] | None = None) -> set[str]:
    """The source tensors a tensor plan reads, each checked to exist (shape_of gives None when it does
    not) with the shape `implied_by` (the config, the metadata) implies, and by `check`; errors name
    origin(name), the file that holds it. Returns their names."""
    used = set()
    for name, shape in parts:
        got = shape_of(name)
        if got is None:
            raise ConversionError(f"{origin(name)}: tensor {name} is missing")
        if got != shape:
            raise ConversionError(f"{origin(name)}: tensor {name} has shape {list(got)}, {implied_by} implies {list(shape)}")
        if check:
            check(name)
        used.add(name)
    return used


def provenance(source: str, source_format: str) -> dict[str, str]:
    return {"source": source, "source_format": source_format, "converter": f"upg_backend {_package_version()}",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_with_progress(out_path, header: dict, sources: list, progress: bool) -> None:
    """write_upg with a progress bar counted in weights."""
    total = sum(int(np.prod(s.shape)) for s in sources)
    with tqdm(total=total, unit="w", unit_scale=True, desc=Path(out_path).name, disable=not progress) as bar:
        write_upg(out_path, header, sources, on_written=lambda s: bar.update(int(np.prod(s.shape))))


def calibrated_sources(rec: Recipe, plan: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]], tied: bool,
                       importance: Importance | None, bpw: float | None, progress: bool,
                       sampled: Callable[[int], Callable[[], np.ndarray]] | None = None) -> tuple[list, dict[str, Any]]:
    """The writer's sources of (name, shape, load) tensors: stored as `rec` says, or as bit allocation
    chooses within `bpw`; quantized with importance where given. Also the header's `calibration` and
    `allocation` objects (FORMAT.md), those that apply, after the `quantization` object of the recipe
    used. sampled(i): a loader of only the rows of tensor i that allocation measures
    (allocate.sample_rows), where the source can read them alone. With Gram matrices in the importance
    (calibrate.collect(..., gram=True)), the quantized matrices they cover are quantized by GPTQ
    (upg_backend.gptq), unless they carry outliers."""
    extra: dict[str, Any] = {}
    imp: Callable[[str, int], np.ndarray | None] = lambda name, cols: None  # noqa: E731
    if importance is not None:
        importance.check({name: shape[1] for name, shape, _ in plan if len(shape) == 2})
        imp = importance.for_matrix
        extra["calibration"] = {"text": importance.text, "n_tokens": importance.n_tokens}
        if importance.gram is not None:
            extra["calibration"]["gptq"] = {"damp": gptq.DAMP}
    if bpw is not None:
        matrices = [(name, shape, sampled(i) if sampled else load) for i, (name, shape, load) in enumerate(plan)
                    if is_block_matrix(name, shape)]
        with tqdm(total=sum(s[0] * s[1] for _, s, _ in matrices), unit="w", unit_scale=True, desc="allocation",
                  disable=not progress) as bar:
            allocation = allocate(matrices, imp, bpw, progress=bar.update,
                                  gram=importance.gram if importance is not None else None)
        rec = recipe_for(allocation)
        extra["allocation"] = allocation.header()
    sources = [rec.source(name, shape, load, tied, imp(name, shape[1]) if len(shape) == 2 else None)
               for name, shape, load in plan]
    if importance is not None and importance.gram is not None:
        sources = [_with_gptq(s, importance.gram[s.name]) if s.name in importance.gram and s.dtype in gptq.TYPES
                   and not s.outliers_per_row else s for s in sources]
    return sources, {"quantization": rec.header(sources), **extra}


def _with_gptq(src: TensorSource, h: np.ndarray) -> TensorSource:
    """The source, its matrix quantized by GPTQ with its inputs' Gram matrix h when written."""
    def load():
        try:
            return Encoded(gptq.quantize(src.load(), h, src.dtype, src.block, src.importance))
        except gptq.GPTQError as e:
            raise gptq.GPTQError(f"{src.name}: {e}") from None
    return dataclasses.replace(src, load=load)


def convert_hf(src_dir: str | os.PathLike, out_path: str | os.PathLike, type: str = "f16", block: int = 32,
               outliers: float = 0.0, recipe: str | Recipe | None = None, progress: bool = True,
               importance: Importance | None = None, bpw: float | None = None) -> None:
    """Converts a Hugging Face checkpoint directory to a .upg file.

    Args:
        src_dir: directory with config.json, tokenizer.json, *.safetensors (and optionally
            tokenizer_config.json, generation_config.json, chat_template.jinja).
        out_path: the .upg file to write; it exists only if conversion succeeded.
        type: weight type of the matrices: f32, f16, bf16, q8_0, q4 or q3 (1-D tensors are f32).
        block: elements per scale block of quantized types, 32 or 64.
        outliers: fraction of each row of a quantized matrix kept exactly in f16.
        recipe: a named or custom mixed recipe (upg_backend.recipes); replaces type, block and outliers.
        progress: show a progress bar with an ETA on stderr.
        importance: calibration statistics (upg_backend.calibrate) that weight the quantizer's
            scale search of every quantized matrix they cover; None: plain scales.
        bpw: choose the types of the transformer blocks' matrices so that they average at most this
            many bits per weight (upg_backend.allocate, by the importance-weighted noise of each
            candidate); the embedding and output matrix are stored as q8_0. Replaces type and recipe.

    Raises:
        ConversionError: a file or tensor is missing or invalid, or the model is not supported.
        ValueError: the arguments are invalid.
        ImportanceError: the importance belongs to another model.
    """
    if bpw is not None and recipe is not None:
        raise ValueError("bpw chooses the types itself: pass either bpw or recipe")
    rec = get_recipe(recipe, type, block, outliers)

    src = Path(src_dir)
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{src}: config.json is missing")
    hf_config = _read_json(config_path)
    try:
        cfg = ModelConfig.from_hf(hf_config)
    except ValueError as e:
        raise ConversionError(f"{config_path}: {e}") from e
    if not (src / "tokenizer.json").is_file():
        raise ConversionError(f"{src}: tokenizer.json is missing")
    tokenizer_config = _read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    generation = _read_json(src / "generation_config.json") if (src / "generation_config.json").is_file() else {}

    ckpt = _Checkpoint(src)
    plan = tensor_plan(cfg)
    used = check_parts([p for _, _, parts in plan for p in parts], "config.json",
                       lambda name: ckpt.shape(name) if name in ckpt.where else None,
                       lambda name: ckpt.where.get(name, src))
    for name in ckpt.where:
        ignorable = name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_word_embeddings)
        if name not in used and not ignorable:
            raise ConversionError(f"{ckpt.where[name]}: tensor {name} is not supported by the "
                                  f"{cfg.architecture} graph")

    def loader(parts, rows=None):
        def load():  # Llama's separate projections are stacked by rows into the fused matrix
            if len(parts) == 1:
                return ckpt.load(parts[0][0], rows)
            w = np.concatenate([ckpt.load(name) for name, _ in parts])
            return w if rows is None else w[rows]
        return load

    sources, quantization = calibrated_sources(rec, [(name, shape, loader(parts)) for name, shape, parts in plan],
                                              cfg.tie_word_embeddings, importance, bpw, progress,
                                              sampled=lambda i: loader(plan[i][2], sample_rows(plan[i][1][0])))

    header = {
        "architecture": cfg.architecture,
        "config": hf_config,
        "tokenizer": _read_json(src / "tokenizer.json"),
        "tokenizer_config": {k: v for k, v in tokenizer_config.items() if k != "chat_template"},
        "chat_templates": _chat_templates(src, tokenizer_config),
        "generation": generation,
        "provenance": provenance(src.resolve().name, "hf"),
        **quantization,
    }
    write_with_progress(out_path, header, sources, progress)

