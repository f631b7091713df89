"""Calibration: how much each input column of every weight matrix matters, measured by our engine.

A model runs a calibration text in windows of n_ctx tokens (each from an empty context) on the CPU
backend with column-square collection on (cpp/cpu/backend.h): for every matrix the graph multiplies
(qkv_proj, o_proj, gate_up_proj, down_proj, lm_head), the mean over all tokens of the square of each
input column is that column's importance, as llama.cpp's imatrix. The quantizer weights each
element's squared error by it (docs/QUANTIZATION.md "Calibration").

With gram=True it also sums, per transformer-block matrix, the Gram matrix of its inputs,
H = sum_t x_t x_t^T (float64 [cols, cols]; its diagonal is the column squares above), which GPTQ
(upg_backend.gptq) needs: the engine hands over each window's inputs and numpy adds x^T x.

Memory: the statistics are one float64 per input column per matrix (10 MB for Phi-4); the model is
the mapped file, read as the engine reads it. The Gram matrices take 8 * cols^2 bytes each (the
testbed's 32: 200 MB; Phi-4's 160: 128 GB, docs/QUANTIZATION.md "GPTQ"), plus one window's inputs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np

DEFAULT_TEXT = Path(__file__).parent / "data" / "calibration.txt"
# Tokens measured by default, in 16 windows spread over the text: on the testbed, q3's KLD with
# this many is within 1% of all 117k tokens' (docs/QUANTIZATION.md), and Phi-4 on two cores stays
# inside the hour a conversion may take.
DEFAULT_TOKENS = 8192
FORMAT = "upg-importance"
VERSION = 1


class ImportanceError(ValueError):
    """An importance file is unreadable, or does not fit the model being converted."""


@dataclasses.dataclass(frozen=True)
class Importance:
    """Per-input-column importance of a model's matrices.

    Attributes:
        columns: Hugging Face tensor name -> float32 [cols], the mean square of each input column.
        n_tokens: calibration tokens measured.
        text: what was measured: the text's file name and the sha256 of its UTF-8 bytes.
        gram: Hugging Face tensor name -> float64 [cols, cols], sum over the tokens of x x^T (the
            transformer blocks' matrices, for GPTQ); None: not measured. Not saved by `save`.
    """

    columns: Mapping[str, np.ndarray]
    n_tokens: int
    text: str
    gram: Mapping[str, np.ndarray] | None = dataclasses.field(default=None, repr=False)

    def save(self, path: str | os.PathLike) -> None:
        """Writes a safetensors file (docs/QUANTIZATION.md "Importance files")."""
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in self.columns.items()}, str(path),
                  metadata={"format": FORMAT, "version": str(VERSION), "n_tokens": str(self.n_tokens),
                            "text": self.text})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Importance":
        """Reads a file `save` wrote.

        Raises:
            FileNotFoundError: no such file.
            ImportanceError: not an importance file of a version this build reads, or invalid values.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such importance file: {path}")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                columns = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise ImportanceError(f"{path}: not a safetensors file ({e})") from None
        if meta.get("format") != FORMAT:
            raise ImportanceError(f"{path}: not an importance file (metadata format {meta.get('format')!r})")
        if meta.get("version") != str(VERSION):
            raise ImportanceError(f"{path}: importance file version {meta.get('version')!r}; this build reads {VERSION}")
        for name, v in columns.items():
            if v.ndim != 1 or v.dtype != np.float32 or not (np.isfinite(v).all() and (v >= 0).all()):
                raise ImportanceError(f"{path}: {name} must be finite float32 values >= 0 in one dimension")
        return cls(columns, int(meta.get("n_tokens", 0)), meta.get("text", ""))

    def for_matrix(self, name: str, cols: int) -> np.ndarray | None:
        """The importance of one matrix (None: not measured, e.g. the embedding), its width checked.

        Raises:
            ImportanceError: it was measured at another width (another model's file).
        """
        v = self.columns.get(name)
        if v is not None and v.shape != (cols,):
            raise ImportanceError(f"importance of {name} has {v.shape[0]} columns, the matrix {cols}: "
                                  "the importance file belongs to another model")
        return v

    def check(self, matrices: Mapping[str, int]) -> None:
        """Checks that the file is this model's: every entry names one of `matrices` (name -> cols)
        at its width, and at least one is present.

        Raises:
            ImportanceError: what does not fit.
        """
        unknown = sorted(set(self.columns) - set(matrices))
        if unknown:
            raise ImportanceError(f"the importance file names matrices this model does not have: {', '.join(unknown[:3])}")
        if not self.columns:
            raise ImportanceError("the importance file has no matrices")
        for name in self.columns:
            self.for_matrix(name, matrices[name])
        for name, h in (self.gram or {}).items():
            if name not in matrices or np.shape(h) != (matrices[name],) * 2:
                raise ImportanceError(f"the Gram matrix of {name} has shape {list(np.shape(h))}; the model has "
                                      + (f"[{matrices[name]}, {matrices[name]}]" if name in matrices else "no such matrix"))


def text_id(path: str | os.PathLike) -> str:
    data = Path(path).read_bytes()
    return f"{Path(path).name} sha256:{hashlib.sha256(data).hexdigest()[:16]}"


def collect(model_path: str | os.PathLike, text: str | os.PathLike | None = None, n_ctx: int = 512,
            max_tokens: int | None = DEFAULT_TOKENS, n_threads: int | None = None, progress: bool = True,
            gram: bool = False) -> Importance:
    """Measures the importance of every matrix of a .upg model on a calibration text.

    Args:
        model_path: the .upg model to run (any type; quantized activations do not enter the statistics,
            which are taken of each matrix's float32 input).
        text: a UTF-8 text file; None: the text that ships with the package (DEFAULT_TEXT).
        n_ctx: window length in tokens.
        max_tokens: measure this many tokens of the text, in windows spread evenly over it (None: all).
        n_threads: engine threads (None: all cores).
        progress: show a progress bar counted in tokens on stderr.
        gram: also sum the Gram matrix of every transformer-block matrix's inputs (Importance.gram).

    Raises:
        FileNotFoundError: the text does not exist.
        ValueError: the text has fewer than 2 tokens, or n_ctx / max_tokens are invalid.
    """
    from tqdm import tqdm

    from . import _core
    from .format import UPGFile
    from .llama import Llama

    text_path = Path(text) if text is not None else DEFAULT_TEXT
    if not text_path.is_file():
        raise FileNotFoundError(f"no such calibration text: {text_path}")
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be at least 2, got {n_ctx}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    upg = UPGFile(model_path)
    windows = _windows(_tokens(upg, text_path), n_ctx, max_tokens)
    n_tokens = sum(len(w) for w in windows)
    by_offset = {t.offset: name for name, t in upg.tensors.items()}
    from .allocate import is_block_matrix

    gram_offsets = [t.offset for name, t in upg.tensors.items() if gram and is_block_matrix(name, t.dims)]
    del upg

    backend = _core.CpuBackend(n_threads or 0)
    llm = Llama(str(model_path), n_ctx=max(len(w) for w in windows), n_threads=n_threads, logits_all=True,
                kv_type="f32", backend=backend)
    backend.collect_column_squares(True)
    backend.capture_inputs(gram_offsets)
    grams: dict[str, np.ndarray] = {}
    with tqdm(total=n_tokens, unit="tok", desc="calibration", disable=not progress) as bar:
        for window in windows:
            llm.reset()
            llm.eval(window)
            for offset, x in backend.take_inputs().items():
                x = x.astype(np.float64)
                name = by_offset[offset]
                grams[name] = grams[name] + x.T @ x if name in grams else x.T @ x
            bar.update(len(window))
    backend.collect_column_squares(False)
    backend.capture_inputs([])
    columns = {}
    for offset, (sums, rows) in backend.column_squares().items():
        columns[by_offset[offset]] = (sums / rows).astype(np.float32)
    return Importance(columns, int(n_tokens), text_id(text_path), grams if gram else None)


def _tokens(upg, text_path: Path) -> np.ndarray:
    """The text's tokens by the model's tokenizer."""
    from .tokenizer import Tokenizer

    header = upg.header
    tokens = np.asarray(Tokenizer(header.get("tokenizer"), header.get("tokenizer_config")).encode(
        text_path.read_text(encoding="utf-8")), np.int32)
    if len(tokens) < 2:
        raise ValueError(f"{text_path}: the calibration text has fewer than 2 tokens")
    return tokens


def _windows(tokens: np.ndarray, n_ctx: int, max_tokens: int | None) -> list[np.ndarray]:
    """The text in consecutive windows of n_ctx tokens; with max_tokens below its length, windows
    that total max_tokens, their starts spread evenly over the text (prose and code alike)."""
    if max_tokens is None or max_tokens >= len(tokens):
        return [tokens[i:i + n_ctx] for i in range(0, len(tokens), n_ctx)]
    length = min(n_ctx, max_tokens)
    n = -(-max_tokens // length)
    sizes = [length] * (n - 1) + [max_tokens - length * (n - 1)]
    starts = [round(i * (len(tokens) - length) / max(1, n - 1)) for i in range(n)]
    return [tokens[s:s + size] for s, size in zip(starts, sizes)]


def collect_source(src: str | os.PathLike, text: str | os.PathLike | None = None, n_ctx: int = 512,
                   max_tokens: int | None = DEFAULT_TOKENS, n_threads: int | None = None, progress: bool = True,
                   work_dir: str | os.PathLike | None = None, gram: bool = False) -> Importance:
    """`collect` for a conversion's source (a Hugging Face checkpoint directory or a .gguf file): it is
    converted to a temporary q8_0 .upg (in work_dir, default the system's temporary directory;
    removed before this returns) and measured on that. 8-bit weights move the activations by a
    fraction of a percent and halve the memory and time of bf16."""
    if str(src).endswith(".gguf"):
        from .gguf_source import convert_gguf as convert
    else:
        from .convert import convert_hf as convert
    with tempfile.TemporaryDirectory(prefix="upg-calibration-", dir=work_dir) as tmp:
        model = Path(tmp) / "calibration-q8_0.upg"
        convert(src, model, type="q8_0", progress=progress)
        return collect(model, text, n_ctx, max_tokens, n_threads, progress, gram)
