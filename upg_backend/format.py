"""The UPG file format (docs/FORMAT.md): a streaming writer and a reader over `_core.File`.

The writer knows every tensor's name, type and shape before it reads any weight, so it lays out the
whole file first and then streams tensors one at a time: a model never has to fit in memory.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from . import _core
from ._core import UPGFormatError
from .config import ModelConfig

# The format's constants, as the C++ reader defines them (cpp/upg/format.h, cpp/upg/upg_common.h).
MAGIC = _core.MAGIC
VERSION = _core.FORMAT_VERSION  # the newest version the reader knows; a file is written with the
# oldest version that knows all its types (DTYPE_VERSIONS), so older readers still read it
PREAMBLE_SIZE = _core.PREAMBLE_SIZE
TENSOR_ALIGN = _core.TENSOR_ALIGN
DATA_ALIGN = _core.DATA_ALIGN

DTYPE_CODES: dict[str, int] = dict(_core.DTYPES)
QUANTIZED: tuple[str, ...] = tuple(_core.QUANTIZED_TYPES)
DTYPE_VERSIONS: dict[str, int] = dict(_core.DTYPE_VERSIONS)
EXACT_ZERO = ("q8_0", "q4", "q3")  # quantized types that decode 0 exactly: the ones that carry outliers
BLOCKS = (32, 64)
# numpy dtype a dense tensor is stored as (bf16 is read and written as uint16 bits)
_DENSE = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "i32": np.dtype("<i4")}
OUTLIER_SUFFIXES = (".outlier_rowptr", ".outlier_col", ".outlier_val")

_PREAMBLE = struct.Struct("<8sIIQQQQQQ")


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def tensor_nbytes(dtype: str, dims: Sequence[int], block: int = 0) -> int:
    """Bytes a tensor of this type and shape takes in the data section (FORMAT.md "Tensor types")."""
    if dtype in _DENSE:
        return _DENSE[dtype].itemsize * int(np.prod(dims, dtype=np.int64))
    rows, cols = dims
    return _core.quant_nbytes(dtype, rows, cols, block)


def bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even."""
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


@dataclasses.dataclass(frozen=True)
class TensorSource:
    """One tensor to write: where its values come from and how to store them.

    Attributes:
        name: the tensor name (Hugging Face naming).
        dtype: storage type, one of DTYPE_CODES.
        shape: dims, outermost first.
        load: returns the values (float for float types, integers for i32); called once, when the
            tensor is written.
        block: elements per scale block for quantized types (32 or 64), else 0.
        outliers: for quantized types, the fraction of each row kept exactly in f16 (FORMAT.md
            "Sparse exact outliers").
        importance: for quantized types, float32 [cols] per-column weights of the quantizer's scale
            search (upg_backend.calibrate); None: the plain scale.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    block: int = 0
    outliers: float = 0.0
    importance: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"{self.name}: unknown tensor type {self.dtype!r}; known: {', '.join(DTYPE_CODES)}")
        if not 1 <= len(self.shape) <= 4 or any(int(d) <= 0 for d in self.shape):
            raise ValueError(f"{self.name}: invalid shape {list(self.shape)}")
        if self.dtype in QUANTIZED:
            if len(self.shape) != 2:
                raise ValueError(f"{self.name}: {self.dtype} needs a matrix, got shape {list(self.shape)}")
            if self.block not in BLOCKS:
                raise ValueError(f"{self.name}: block must be 32 or 64, got {self.block}")
            if self.shape[1] % self.block:
                raise ValueError(f"{self.name}: {self.shape[1]} columns are not a multiple of block {self.block}")
            try:
                _core.quant_nbytes(self.dtype, self.shape[0], self.shape[1], self.block)
            except ValueError as e:  # the type's own rule (FORMAT.md "Quantized matrices")
                raise ValueError(f"{self.name}: {e}") from None
            if not 0.0 <= self.outliers < 1.0:
                raise ValueError(f"{self.name}: outlier fraction must be in [0, 1), got {self.outliers}")
            if self.outliers and self.dtype not in EXACT_ZERO:
                raise ValueError(f"{self.name}: {self.dtype} carries no outliers (it does not decode 0 exactly); "
                                 f"use one of {', '.join(EXACT_ZERO)}")
            if self.importance is not None and np.shape(self.importance) != (self.shape[1],):
                raise ValueError(f"{self.name}: importance must have one value per column ({self.shape[1]}), "
                                 f"got shape {list(np.shape(self.importance))}")
        elif self.block or self.outliers or self.importance is not None:
            raise ValueError(f"{self.name}: block, outliers and importance apply to quantized types only")
        if self.dtype == "i32" and len(self.shape) != 1:
            raise ValueError(f"{self.name}: i32 tensors are 1-D, got shape {list(self.shape)}")

    @property
    def outliers_per_row(self) -> int:
        return round(self.outliers * self.shape[1]) if self.dtype in QUANTIZED else 0


@dataclasses.dataclass(frozen=True)
class _Entry:
    """A directory record: a tensor's type, shape and place in the data section."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    block: int
    offset: int

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.dims, self.block)

    def record(self, crc: int) -> bytes:
        name = self.name.encode("utf-8")
        return (struct.pack("<H", len(name)) + name
                + struct.pack(f"<BBH{len(self.dims)}QQQI", DTYPE_CODES[self.dtype], len(self.dims), self.block,
                              *self.dims, self.offset, self.nbytes, crc))


def _entries(sources: Sequence[TensorSource]) -> list[list[_Entry]]:
    """Lays out the data section: per source, its tensor and any outlier companions."""
    layout, offset, seen = [], 0, set()
    for src in sources:
        specs = [(src.name, src.dtype, tuple(int(d) for d in src.shape), src.block)]
        k = src.outliers_per_row
        if k:
            rows, nnz = src.shape[0], src.shape[0] * k
            specs += [(src.name + ".outlier_rowptr", "i32", (rows + 1,), 0),
                      (src.name + ".outlier_col", "i32", (nnz,), 0),
                      (src.name + ".outlier_val", "f16", (nnz,), 0)]
        group = []
        for name, dtype, dims, block in specs:
            if name in seen:
                raise ValueError(f"duplicate tensor name {name!r}")
            if not 1 <= len(name.encode("utf-8")) <= 512:
                raise ValueError(f"tensor name {name!r} must be 1..512 bytes of UTF-8")
            seen.add(name)
            group.append(_Entry(name, dtype, dims, block, offset))
            offset = _pad(offset + group[-1].nbytes, TENSOR_ALIGN)
        layout.append(group)
    return layout


def _split_outliers(w: np.ndarray, k: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Takes the k largest-magnitude entries of each row out of w (zeroed) as CSR f16 values."""
    rows = w.shape[0]
    cols = np.sort(np.argpartition(-np.abs(w), k - 1, axis=1)[:, :k], axis=1)
    vals = np.take_along_axis(w, cols, axis=1).astype(np.float16)
    w = w.copy()
    np.put_along_axis(w, cols, 0.0, axis=1)
    rowptr = np.arange(rows + 1, dtype=np.int64) * k
    return w, [rowptr.astype("<i4"), cols.reshape(-1).astype("<i4"), vals.reshape(-1)]


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A quantized matrix already in its type's bytes (FORMAT.md's sections, padded), which a
    TensorSource's `load` may return instead of values: written as is (GGUF import of a type UPG
    holds exactly, without a second rounding)."""

    data: np.ndarray


def _encode(src: TensorSource) -> list[np.ndarray]:
    """The bytes of a source's tensor (and its outlier companions), in directory order."""
    w = src.load()
    if isinstance(w, Encoded):
        if src.dtype not in QUANTIZED or src.outliers_per_row:
            raise ValueError(f"{src.name}: encoded bytes are for quantized matrices without outliers")
        return [np.ascontiguousarray(w.data, dtype=np.uint8).reshape(-1)]
    w = np.asarray(w)
    if tuple(w.shape) != tuple(src.shape):
        raise ValueError(f"{src.name}: got shape {list(w.shape)}, expected {list(src.shape)}")
    if src.dtype == "i32":
        return [np.ascontiguousarray(w, dtype="<i4")]
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise ValueError(f"{src.name}: weights contain NaN or Inf")
    if src.dtype in _DENSE:
        with np.errstate(over="ignore"):  # overflow is reported below, naming the tensor
            out = bf16_bits(w) if src.dtype == "bf16" else w.astype(_DENSE[src.dtype])
        if not np.isfinite(bf16_to_f32(out) if src.dtype == "bf16" else out).all():
            raise ValueError(f"{src.name}: values overflow {src.dtype}")
        return [out]
    companions = []
    if src.outliers_per_row:
        w, companions = _split_outliers(w, src.outliers_per_row)
    return [np.asarray(_core.quantize(src.dtype, src.block, w, importance=src.importance))] + companions


def write_upg(path: str | os.PathLike, header: dict[str, Any], sources: Sequence[TensorSource],
              on_written: Callable[[TensorSource], None] | None = None) -> None:
    """Writes a UPG file, streaming one tensor at a time.

    The file is written to `<path>.tmp`, re-opened and checked (structure and every crc32), and
    only then renamed to `path`; on any failure the temporary file is removed.

    Args:
        path: the .upg file to create (replaced if it exists).
        header: the JSON header (FORMAT.md "JSON header").
        sources: the tensors, in file order; each source's `load` is called once.
        on_written: called after each source is written (progress reporting).

    Raises:
        ValueError: a tensor's name, type, shape or values are invalid.
        UPGFormatError: the written file does not read back.
    """
    sources = list(sources)
    layout = _entries(sources)
    entries = [e for group in layout for e in group]
    header_bytes = json.dumps(header, ensure_ascii=False).encode("utf-8")
    directory_offset = PREAMBLE_SIZE + len(header_bytes)
    directory_size = 4 + sum(len(e.record(0)) for e in entries)
    data_offset = _pad(directory_offset + directory_size, DATA_ALIGN)
    data_end = entries[-1].offset + entries[-1].nbytes if entries else 0
    data_size = _pad(data_end, DATA_ALIGN)
    version = max([1] + [DTYPE_VERSIONS[e.dtype] for e in entries])
    preamble = _PREAMBLE.pack(MAGIC, version, 0, PREAMBLE_SIZE, len(header_bytes), directory_offset,
                              directory_size, data_offset, data_size)

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        crcs = []
        with open(tmp, "wb") as f:
            f.write(preamble + header_bytes)
            f.write(b"\0" * (data_offset - directory_offset))  # the directory goes here once crcs are known
            for src, group in zip(sources, layout):
                for entry, data in zip(group, _encode(src)):
                    raw = memoryview(np.ascontiguousarray(data)).cast("B")
                    if len(raw) != entry.nbytes:
                        raise ValueError(f"{entry.name}: encoded to {len(raw)} bytes, expected {entry.nbytes}")
                    f.write(b"\0" * (data_offset + entry.offset - f.tell()))
                    f.write(raw)
                    crcs.append(zlib.crc32(raw))
                if on_written:
                    on_written(src)
            f.write(b"\0" * (data_offset + data_size - f.tell()))
            f.seek(directory_offset)
            f.write(struct.pack("<I", len(entries)) + b"".join(e.record(c) for e, c in zip(entries, crcs)))
        check = _core.File(str(tmp))
        check.verify()
        del check  # unmap before the rename
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A tensor's directory record."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    block: int
    offset: int
    nbytes: int
    crc32: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64))


class UPGFile:
    """A UPG file opened for reading (memory-mapped and validated by `_core.File`).

    Args:
        path: the .upg file.

    Raises:
        UPGFormatError: the file is not a valid UPG file.
        FileNotFoundError: the file does not exist.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such file: {self.path}")
        self._file = _core.File(str(self.path))
        try:
            self.header: dict[str, Any] = json.loads(self._file.header)
        except json.JSONDecodeError as e:
            raise UPGFormatError(f"{self.path}: header is not valid JSON: {e}") from e
        if not isinstance(self.header, dict):
            raise UPGFormatError(f"{self.path}: header is not a JSON object")
        self.tensors: dict[str, TensorInfo] = {
            t["name"]: TensorInfo(t["name"], t["dtype"], tuple(t["dims"]), t["block"], t["offset"], t["nbytes"],
                                  t["crc32"])
            for t in self._file.tensors}

    @property
    def architecture(self) -> str:
        return self.header.get("architecture", "")

    @property
    def config(self) -> ModelConfig:
        """The model configuration (raises ValueError when it is missing or unsupported)."""
        if not isinstance(self.header.get("config"), dict):
            raise UPGFormatError(f"{self.path}: header has no 'config' object")
        return ModelConfig.from_hf(self.header["config"], self.header.get("architecture"))

    @property
    def file_size(self) -> int:
        return self._file.file_size

    @property
    def data_offset(self) -> int:
        return self._file.data_offset

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes: a read-only uint8 view into the mapping."""
        if name not in self.tensors:
            raise KeyError(f"no tensor {name!r} in {self.path}")
        return self._file.data(name)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as numpy: dense types in their dtype (bf16 widened to float32) and shape,
        quantized types as their raw uint8 bytes (FORMAT.md layout)."""
        raw = self.raw(name)
        info = self.tensors[name]
        if info.dtype in QUANTIZED:
            return raw
        values = raw.view(_DENSE[info.dtype]).reshape(info.dims)
        return bf16_to_f32(values) if info.dtype == "bf16" else values

    def verify(self) -> None:
        """Checks every tensor's crc32, then that the engine accepts the model (every graph tensor
        present with the shape the configuration gives, outlier companions valid).

        Raises:
            UPGFormatError: naming the first bad tensor or field.
        """
        self._file.verify()
        try:
            config = self.config
        except UPGFormatError:
            raise
        except ValueError as e:
            raise UPGFormatError(f"{self.path}: bad model config: {e}") from e
        _core.Model(str(self.path), config.engine_config())


def iter_model_tensors(upg: UPGFile) -> Iterable[TensorInfo]:
    """The file's tensors that hold model weights (outlier companions left out)."""
    return (t for t in upg.tensors.values() if not t.name.endswith(OUTLIER_SUFFIXES))
