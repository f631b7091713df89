"""The UPG writer and reader: round trips of every type, and the reader's rejection of bad files.

Bad files are built byte by byte here (`build_raw`), independently of the writer, from the layout
in docs/FORMAT.md.
"""
from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from reference.quant import dequantize
from upg_backend import _core
from upg_backend.format import TensorSource, UPGFile, UPGFormatError, write_upg

MAGIC = b"UPG\x00\r\n\x1a\n"
CODES = {"f32": 0, "f16": 1, "bf16": 2, "q8_0": 3, "q4": 4, "q3": 5, "i32": 6}


def pad(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def quant_nbytes(dtype: str, rows: int, cols: int, block: int) -> int:
    """FORMAT.md: the sum of the 64-byte padded sections."""
    codes = {"q8_0": [rows * cols], "q4": [rows * cols // 2], "q3": [rows * cols // 4, rows * cols // 8]}[dtype]
    return sum(pad(n, 64) for n in codes + [rows * (cols // block) * 2])


def error_bound(dtype: str, w: np.ndarray, block: int) -> np.ndarray:
    """Per-element bound on |dequant(quant(w)) - w| for FORMAT.md's scale choice: half a step for
    q8_0; a full step for q4/q3, whose positive side is one code short (+7 of -8, +3 of -4); plus
    the f16 rounding of the scale times the largest code."""
    rows, cols = w.shape
    amax = np.abs(w).reshape(rows, -1, block).max(-1, keepdims=True)
    levels, steps = {"q8_0": (127, 0.5), "q4": (8, 1.0), "q3": (4, 1.0)}[dtype]
    bound = amax / levels * steps + amax * 2.0**-10 + 1e-7
    return np.broadcast_to(bound, (rows, cols // block, block)).reshape(rows, cols)


def build_raw(header: bytes, records: list[dict], data: bytes, **preamble) -> bytes:
    """A UPG file from its parts; `preamble` overrides computed preamble fields."""
    directory = struct.pack("<I", len(records))
    for r in records:
        name = r["name"] if isinstance(r["name"], bytes) else r["name"].encode()
        dims = r["dims"]
        directory += struct.pack("<H", len(name)) + name
        directory += struct.pack(f"<BBH{len(dims)}QQQI", r["dtype"], len(dims), r.get("block", 0),
                                 *dims, r["offset"], r["nbytes"], r.get("crc", zlib.crc32(
                                     data[r["offset"]:r["offset"] + r["nbytes"]])))
    fields = dict(magic=MAGIC, version=1, flags=0, header_offset=64, header_size=len(header),
                  directory_offset=64 + len(header), directory_size=len(directory))
    fields["data_offset"] = pad(fields["directory_offset"] + len(directory), 16384)
    fields["data_size"] = pad(len(data), 16384)
    fields.update(preamble)
    body = struct.pack("<8sIIQQQQQQ", *fields.values()) + header + directory
    body += b"\0" * (pad(len(body), 16384) - len(body))
    return body + data + b"\0" * (pad(len(data), 16384) - len(data))


def good_parts():
    """A valid file's parts: two f32 tensors."""
    a = np.arange(12, dtype="<f4").tobytes()
    data = a + b"\0" * (64 - len(a) % 64) + np.ones(16, "<f4").tobytes()
    records = [dict(name="a", dtype=0, dims=[3, 4], offset=0, nbytes=48),
               dict(name="b", dtype=0, dims=[16], offset=64, nbytes=64)]
    return b'{"architecture": "Phi3ForCausalLM"}', records, data


def open_raw(tmp_path, raw: bytes) -> UPGFile:
    """Opens the file with the Python reader (which parses the header) and checks every crc32."""
    path = tmp_path / "bad.upg"
    path.write_bytes(raw)
    upg = UPGFile(path)
    _core.File(str(path)).verify()
    return upg


def test_raw_builder_makes_a_valid_file(tmp_path):
    upg = open_raw(tmp_path, build_raw(*good_parts()))
    assert list(upg.tensors) == ["a", "b"]
    np.testing.assert_array_equal(upg.tensor("a"), np.arange(12).reshape(3, 4))


def _record(i, **changes):
    def mutate(header, records, data):
        records[i].update(changes)
        return build_raw(header, records, data)
    return mutate


def _record_v2(i, **changes):
    """_record in a version 2 file (the grid types)."""
    def mutate(header, records, data):
        records[i].update(changes)
        return build_raw(header, records, data, version=2)
    return mutate


def _preamble(**changes):
    return lambda header, records, data: build_raw(header, records, data, **changes)


BAD_FILES = [
    ("magic", _preamble(magic=b"UPG\x00\n\n\x1a\n"), "magic"),
    ("version", _preamble(version=3), "version 3 .*knows 1..2"),
    ("version 0", _preamble(version=0), "version 0"),
    ("flags", _preamble(flags=1), "flags"),
    ("header offset", _preamble(header_offset=65), "header"),
    ("header size past the file", _preamble(header_size=1 << 40), "header"),
    ("directory size", _preamble(directory_size=3), "directory"),
    ("data offset unaligned", _preamble(data_offset=16384 + 64), "data"),
    ("data size", _preamble(data_size=1 << 20), "data"),
    ("header not JSON", lambda h, r, d: build_raw(b"{not json" + b" " * (len(h) - 9), r, d), "header|JSON"),
    ("header not an object", lambda h, r, d: build_raw(b"[1, 2]", r, d), "header|object"),
    ("offset out of range", _record(1, offset=1 << 20), "offset|range|data"),
    ("offset unaligned", _record(1, offset=32), "align|offset"),
    ("overlap", _record(1, offset=0), "overlap"),
    ("unknown dtype", _record(0, dtype=10), "unknown dtype 10"),
    ("dtype newer than the version", _record(0, dtype=8, dims=[1, 256], block=32, nbytes=256),
     "iq4_xs needs format version 2, the file says 1"),
    ("super-block cols", _record_v2(0, dtype=8, dims=[1, 288], block=32, nbytes=448), "multiple of 256"),
    ("grid type block 64", _record_v2(0, dtype=7, dims=[1, 64], block=64, nbytes=128), "block must be 32"),
    ("zero dim", _record(0, dims=[0, 4], nbytes=0), "dim"),
    ("too many dims", _record(0, dims=[1, 1, 1, 3, 4]), "ndim|dim"),
    ("nbytes wrong", _record(0, nbytes=44), "nbytes|size"),
    ("dims overflow", _record(0, dims=[1 << 40, 1 << 40]), "dim|overflow|nbytes|size"),
    ("quantized not 2-D", _record(0, dtype=3, dims=[1536], block=32, nbytes=1600), "ndim|dim|2-D"),
    ("quantized bad block", _record(0, dtype=3, dims=[1, 48], block=48, nbytes=128), "block"),
    ("quantized cols not a multiple", _record(0, dtype=3, dims=[1, 40], block=32, nbytes=128), "block|col"),
    ("dense with a block", _record(0, block=32), "block"),
    ("i32 not 1-D", _record(0, dtype=6), "i32|ndim|dim"),
    ("duplicate names", _record(1, name="a"), "duplicate"),
    ("empty name", _record(0, name=""), "name"),
    ("name not UTF-8", _record(0, name=b"\xff"), "name|UTF"),
]


@pytest.mark.parametrize("mutate, pattern", [pytest.param(m, p, id=n) for n, m, p in BAD_FILES])
def test_bad_file_is_rejected(tmp_path, mutate, pattern):
    raw = mutate(*good_parts())
    with pytest.raises(UPGFormatError, match=f"(?i){pattern}"):
        open_raw(tmp_path, raw)


@pytest.mark.parametrize("keep", [0, 30, 64, 16384, -16384, -1])
def test_truncated_file_is_rejected(tmp_path, keep):
    raw = build_raw(*good_parts())
    with pytest.raises(UPGFormatError):
        open_raw(tmp_path, raw[:keep])


def test_verify_names_the_corrupted_tensor(tmp_path):
    header, records, data = good_parts()
    raw = bytearray(build_raw(header, records, data))
    path = tmp_path / "bad.upg"
    data_offset = struct.unpack_from("<Q", raw, 48)[0]
    raw[data_offset + 64 + 5] ^= 0x10  # a byte of tensor "b"
    path.write_bytes(bytes(raw))
    f = _core.File(str(path))  # opening does not read tensor bytes
    with pytest.raises(UPGFormatError, match=r"\bb\b.*(?i:crc)|(?i:crc).*\bb\b"):
        f.verify()


def _shifted_parts():
    """good_parts with 64 zero bytes before the first tensor."""
    header, records, data = good_parts()
    for r in records:
        r["offset"] += 64
    return header, records, b"\0" * 64 + data


# Each kind of gap FORMAT.md says is zero: (parts, file offset of a byte in it as a function of the
# preamble's directory end and data offset, what the error names).
GAPS = [
    ("after the directory", good_parts, lambda dir_end, dao: dir_end + 3, "after the directory"),
    ("before the first tensor", _shifted_parts, lambda dir_end, dao: dao + 10, "before the first tensor 'a'"),
    ("between tensors", good_parts, lambda dir_end, dao: dao + 48, "between tensors 'a' and 'b'"),
    ("after the last tensor", good_parts, lambda dir_end, dao: dao + 128, "after the last tensor 'b'"),
    ("last byte of the file", good_parts, lambda dir_end, dao: dao + 16383, "after the last tensor 'b'"),
]


@pytest.mark.parametrize("parts, where, pattern", [pytest.param(p, w, m, id=n) for n, p, w, m in GAPS])
def test_verify_rejects_a_non_zero_gap(tmp_path, parts, where, pattern):
    raw = bytearray(build_raw(*parts()))
    path = tmp_path / "gap.upg"
    path.write_bytes(bytes(raw))
    _core.File(str(path)).verify()  # the intact file passes
    dir_offset, dir_size, dao = struct.unpack_from("<QQQ", raw, 32)
    raw[where(dir_offset + dir_size, dao)] = 0x01
    path.write_bytes(bytes(raw))
    f = _core.File(str(path))  # opening reads no gap
    with pytest.raises(UPGFormatError, match=re.escape(pattern)):
        f.verify()
    result = subprocess.run([sys.executable, "-m", "upg_backend.cli", "verify", str(path)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "non-zero byte" in result.stderr + result.stdout


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        UPGFile(tmp_path / "missing.upg")


# ---- writer / reader round trips ----

def _source(name, dtype, w, block=0, outliers=0.0):
    return TensorSource(name, dtype, tuple(w.shape), lambda: w, block, outliers)


def test_dense_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    w = {f"w.{n}": rng.standard_normal(s).astype(np.float32) for n, s in
         [("f32", (3, 5, 7)), ("f16", (33, 17)), ("bf16", (2, 3, 4, 5))]}
    ids = rng.integers(-2**31, 2**31, size=77).astype(np.int32)
    header = {"architecture": "Phi3ForCausalLM", "config": {"x": [1, 2]}, "chat_templates": {"default": "ü {{x}}"}}
    sources = [_source(n, n.split(".")[1], v) for n, v in w.items()] + [_source("ids", "i32", ids)]
    path = tmp_path / "m.upg"
    write_upg(path, header, sources)
    assert not (tmp_path / "m.upg.tmp").exists()

    upg = UPGFile(path)
    assert upg.header == header
    np.testing.assert_array_equal(upg.tensor("w.f32"), w["w.f32"])
    assert upg.tensor("w.f16").dtype == np.float16
    np.testing.assert_array_equal(upg.tensor("w.f16"), w["w.f16"].astype(np.float16))
    bf16 = torch.from_numpy(w["w.bf16"]).to(torch.bfloat16).float().numpy()  # torch rounds to nearest even
    np.testing.assert_array_equal(upg.tensor("w.bf16"), bf16)
    assert upg.tensor("ids").dtype == np.int32
    np.testing.assert_array_equal(upg.tensor("ids"), ids)

    raw = path.read_bytes()
    magic, version, flags, ho, hs, do, ds, dao, das = struct.unpack_from("<8sIIQQQQQQ", raw)
    assert (magic, version, flags, ho, do) == (MAGIC, 1, 0, 64, 64 + hs)
    assert json.loads(raw[ho:ho + hs]) == header
    assert dao % 16384 == 0 and das % 16384 == 0 and dao + das == len(raw) == upg.file_size
    assert dao >= do + ds and upg.data_offset == dao
    sizes = {"w.f32": 4 * 105, "w.f16": 2 * 33 * 17, "w.bf16": 2 * 120, "ids": 4 * 77}
    end = 0
    for name, t in upg.tensors.items():
        assert t.offset % 64 == 0 and t.offset >= end
        assert raw[dao + end:dao + t.offset] == b"\0" * (t.offset - end)
        end = t.offset + t.nbytes
        assert t.nbytes == sizes[name]
        assert t.crc32 == zlib.crc32(raw[dao + t.offset:dao + end])
    assert [(t.dtype, t.dims, t.block) for t in upg.tensors.values()] == [
        ("f32", (3, 5, 7), 0), ("f16", (33, 17), 0), ("bf16", (2, 3, 4, 5), 0), ("i32", (77,), 0)]


@pytest.mark.parametrize("dtype", ["q8_0", "q4", "q3"])
@pytest.mark.parametrize("block", [32, 64])
def test_quantized_round_trip(tmp_path, dtype, block):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((24, 4 * block)).astype(np.float32)
    path = tmp_path / "q.upg"
    write_upg(path, {}, [_source("w", dtype, w, block)])
    upg = UPGFile(path)
    t = upg.tensors["w"]
    assert (t.dtype, t.dims, t.block) == (dtype, (24, 4 * block), block)
    assert t.nbytes == quant_nbytes(dtype, 24, 4 * block, block)
    raw = upg.tensor("w")
    assert raw.dtype == np.uint8 and raw.shape == (t.nbytes,)
    np.testing.assert_array_equal(raw, _core.quantize(dtype, block, w))
    # decoded with the numpy reference: within the quantization error bound
    got = dequantize(dtype, block, raw, 24, 4 * block)
    assert (np.abs(got - w) <= error_bound(dtype, w, block)).all()


@pytest.mark.parametrize("dtype", ["q8_0", "q4", "q3"])
def test_outliers_are_kept_exactly(tmp_path, dtype):
    rng = np.random.default_rng(2)
    rows, cols, frac = 10, 128, 0.05
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[3, 7] = 40.0  # one huge outlier that would wreck its block's scale
    path = tmp_path / "o.upg"
    write_upg(path, {}, [_source("m.weight", dtype, w, 32, frac)])
    upg = UPGFile(path)
    k = round(frac * cols)
    rowptr = upg.tensor("m.weight.outlier_rowptr")
    col = upg.tensor("m.weight.outlier_col")
    val = upg.tensor("m.weight.outlier_val")
    assert (rowptr.dtype, col.dtype, val.dtype) == (np.int32, np.int32, np.float16)
    np.testing.assert_array_equal(rowptr, np.arange(rows + 1) * k)
    effective = dequantize(dtype, 32, upg.tensor("m.weight"), rows, cols).astype(np.float64)
    for r in range(rows):
        c = col[rowptr[r]:rowptr[r + 1]]
        assert (np.diff(c) > 0).all()
        # the kept entries are the row's k largest magnitudes
        assert np.abs(w[r, c]).min() >= np.abs(np.delete(w[r], c)).max()
        np.testing.assert_array_equal(effective[r, c], 0.0)  # zeroed before quantizing
        effective[r, c] += val[rowptr[r]:rowptr[r + 1]]
    assert 7 in col[rowptr[3]:rowptr[4]]
    outlier = np.zeros_like(w, dtype=bool)
    for r in range(rows):
        outlier[r, col[rowptr[r]:rowptr[r + 1]]] = True
    np.testing.assert_array_equal(effective[outlier], w[outlier].astype(np.float16))
    # without the outliers, the rest of the row keeps a fine scale
    assert (np.abs(effective - w) <= error_bound(dtype, np.where(outlier, 0, w), 32)).all()


def test_failed_write_leaves_no_file(tmp_path):
    def broken():
        raise RuntimeError("disk on fire")
    path = tmp_path / "x.upg"
    sources = [_source("a", "f32", np.ones(4, np.float32)), TensorSource("b", "f32", (4,), broken)]
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_upg(path, {}, sources)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("source, message", [
    (TensorSource("a", "f32", (4,), lambda: np.ones(5, np.float32)), "shape"),
    (TensorSource("a", "f16", (2,), lambda: np.array([1.0, 1e6], np.float32)), "overflow"),
    (TensorSource("a", "f32", (2,), lambda: np.array([1.0, np.nan], np.float32)), "NaN"),
])
def test_writer_rejects_bad_values(tmp_path, source, message):
    with pytest.raises(ValueError, match=f"a: .*{message}"):
        write_upg(tmp_path / "x.upg", {}, [source])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="q5", shape=(4, 32)), "unknown tensor type"),
    (dict(dtype="q4", shape=(4, 32), block=16), "block"),
    (dict(dtype="q4", shape=(4, 48), block=32), "multiple"),
    (dict(dtype="q4", shape=(128,), block=32), "matrix"),
    (dict(dtype="f32", shape=(4, 0)), "shape"),
    (dict(dtype="f32", shape=(4, 4), block=32), "quantized types only"),
    (dict(dtype="q8_0", shape=(4, 32), block=32, outliers=1.0), "outlier"),
])
def test_tensor_source_rejects_bad_specs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TensorSource("t", load=lambda: None, **kwargs)


def test_duplicate_source_names_are_rejected(tmp_path):
    sources = [_source("a", "f32", np.ones(4, np.float32))] * 2
    with pytest.raises(ValueError, match="duplicate"):
        write_upg(tmp_path / "x.upg", {}, sources)
