"""CPU kernels and quantizers against the numpy reference (tests/reference/quant.py), on every path."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reference import quant as ref
from upg_backend import _core

PATHS = _core.simd_paths()
TYPES = ([(t, 0) for t in ref.DENSE] + [(t, b) for t in ref.UNIFORM for b in (32, 64)]
         + [(t, 32) for t in ref.GRID_TYPES])
TOL = 1e-5  # max|diff| / max|ref| per output vector


def _cols(type_, block):
    """Dense: no multiple of any SIMD width (tails run); quantized: whole groups and a tail block
    (super-block types: three super-blocks, as their rows are whole super-blocks)."""
    if type_ in ref.SUPER_TYPES:
        return 3 * ref.SUPER
    return 333 if block == 0 else 9 * block


def _matrix(rows, cols, seed):
    """Random weights with the cases quantizers must get right in the first rows."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[0] = 0.0                                   # all-zero blocks: d = 0
    w[1, :] = 1e-9                               # d underflows in f16: zero codes
    w[2, ::2], w[2, 1::2] = 0.5, -0.5            # ties between +m and -m
    w[3] = np.round(w[3] * 4) / 4                # many exact half-way quotients
    w[4, :] *= 1000.0
    return w


def _outliers(rows, cols, seed):
    rng = np.random.default_rng(seed)
    per_row = rng.integers(0, 4, rows)
    cols_list = [np.sort(rng.choice(cols, k, replace=False)) for k in per_row]
    rowptr = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    col = np.concatenate(cols_list).astype(np.int32)
    val = (rng.standard_normal(col.size) * 8).astype(np.float16).view(np.uint16)
    return rowptr, col, val


def _rel_err(got, want):
    return np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()


def _product(type_, block, w, x, outliers=None):
    """The reference for the kernels: decoded weights (float64) times the activations as the type
    uses them (ref.activations_as_used), plus the outliers times x itself."""
    y = ref.activations_as_used(type_, block, x) @ np.asarray(w, np.float64).T
    if outliers is not None:
        o = ref.add_outliers(np.zeros_like(w, np.float64), *outliers)
        y = y + np.asarray(x, np.float64) @ o.T
    return y


def _path_env(path):
    env = dict(os.environ)
    if path is None:
        env.pop("UPG_SIMD", None)
    else:
        env["UPG_SIMD"] = path
    return env


@pytest.mark.parametrize("type_,block", [t for t in TYPES if t[0] not in ref.GRID_TYPES])
def test_quantize_matches_reference(type_, block):
    rows, cols = 37, 4 * 64
    w = _matrix(rows, cols, seed=1)
    got = _core.quantize(type_, block, w)
    want = ref.quantize(type_, block, w)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(_core.quantize(type_, block, w, n_threads=3), want)


def test_bf16_reference_rounds_like_torch():
    w = _matrix(8, 96, seed=2)
    w[5, :3] = [np.nan, np.inf, -np.inf]
    want = torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ref.f32_to_bf16_bits(w)[~np.isnan(w)], want[~np.isnan(w)])
    assert np.isnan(ref.dequantize("bf16", 0, ref.quantize("bf16", 0, w), 8, 96)[5, 0])


@pytest.mark.parametrize("type_,block", [t for t in TYPES if t[0] in ref.UNIFORM])
def test_reference_quantizer_error_is_bounded(type_, block):
    """The reference itself: decoded weights within half a step of the input (a whole step on the
    clamped side of q4 / q3, whose grid ends at +(2^(bits-1) - 1) steps)."""
    w = _matrix(16, 128, seed=3)[5:]
    deq = ref.dequantize(type_, block, ref.quantize(type_, block, w), 11, 128)
    levels, bound = {"q8_0": (127, 0.5), "q4": (8, 1.0), "q3": (4, 1.0)}[type_]
    step = np.abs(deq.reshape(11, -1, block)).max(axis=-1, keepdims=True) / levels
    assert np.all(np.abs((deq - w).reshape(11, -1, block)) <= step * bound * (1 + 1e-3))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("type_,block", TYPES)
@pytest.mark.parametrize("with_outliers", [False, True])
def test_matvec(path, type_, block, with_outliers):
    rows, cols = 37, _cols(type_, block)  # 37: no multiple of any row tile
    w = _matrix(rows, cols, seed=4)
    data = ref.quantize(type_, block, w)
    out = _outliers(rows, cols, seed=5) if with_outliers else None
    want_w = ref.dequantize(type_, block, data, rows, cols).astype(np.float64)
    x = np.random.default_rng(6).standard_normal(cols).astype(np.float32)
    if out is not None and type_ in ref.GRID_TYPES:  # FORMAT.md: their grids have no 0
        with pytest.raises(ValueError, match="carries no outliers"):
            _core.matvec(type_, block, data, rows, cols, x, path, out)
        return
    want = _product(type_, block, want_w, x, out)
    y = _core.matvec(type_, block, data, rows, cols, x, path, out)
    assert y.shape == (rows,) and y.dtype == np.float32
    assert _rel_err(y[5:], want[5:]) <= TOL  # rows 0..4 are the special ones: compared on their own
    np.testing.assert_allclose(y[:5], want[:5], rtol=1e-5, atol=1e-5 * np.abs(want[:5]).max())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("type_,block", [("q4", 32), ("q3", 64), ("f16", 0)])
def test_matvec_row_range(path, type_, block):
    rows, cols = 53, _cols(type_, block)
    w = _matrix(rows, cols, seed=7)
    data = ref.quantize(type_, block, w)
    out = _outliers(rows, cols, seed=8)
    x = np.ones(cols, np.float32)
    dense = ref.dequantize(type_, block, data, rows, cols)
    want = _product(type_, block, dense, x, out)
    scale = np.abs(dense).sum(axis=1) + 1  # per row, of its terms: x is all ones and row sums cancel
    for r0, r1 in [(0, 1), (3, 10), (7, 53), (17, 18), (5, 5)]:
        y = _core.matvec(type_, block, data, rows, cols, x, path, out, r0=r0, r1=r1)
        assert np.isnan(y[:r0]).all() and np.isnan(y[r1:]).all()
        assert np.all(np.abs(y[r0:r1] - want[r0:r1]) <= TOL * scale[r0:r1])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("type_,block", TYPES)
def test_matmul(path, type_, block):
    rows, cols = 43, _cols(type_, block)
    w = _matrix(rows, cols, seed=9)
    data = ref.quantize(type_, block, w)
    want_w = ref.dequantize(type_, block, data, rows, cols).astype(np.float64)
    x = np.random.default_rng(10).standard_normal((70, cols)).astype(np.float32)
    # Every token count 1..70 for the main types, a spread of them for the others.
    counts = range(1, 71) if type_ in ("q4", "f16") else (1, 2, 3, 5, 6, 7, 12, 13, 64, 65, 70)
    for n in counts:
        y = _core.matmul(type_, block, data, rows, cols, x[:n], path)
        assert y.shape == (n, rows)
        assert _rel_err(y[:, 5:], _product(type_, block, want_w[5:], x[:n])) <= TOL, n


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("type_,block", [("q4", 64), ("q8_0", 32), ("bf16", 0)])
def test_matmul_long_rows_outliers_and_range(path, type_, block):
    """K longer than one decoded tile (1024), outliers, and row sub-ranges (wide enough for the
    two-vector row tiles, and not)."""
    rows, cols = 45, 2560 if block else 2411
    w = _matrix(rows, cols, seed=11)[::-1].copy()
    data = ref.quantize(type_, block, w)
    out = _outliers(rows, cols, seed=12)
    x = np.random.default_rng(13).standard_normal((67, cols)).astype(np.float32)
    want = _product(type_, block, ref.dequantize(type_, block, data, rows, cols), x, out)
    for n, r0, r1 in [(67, 0, 45), (7, 3, 40), (1, 44, 45), (66, 1, 6)]:
        y = _core.matmul(type_, block, data, rows, cols, x[:n], path, out, r0=r0, r1=r1)
        assert np.isnan(y[:, :r0]).all() and np.isnan(y[:, r1:]).all()
        assert _rel_err(y[:, r0:r1], want[:n, r0:r1]) <= TOL


@pytest.mark.parametrize("path", [p for p in PATHS if p != "scalar"])
@pytest.mark.parametrize("type_,block", [("q4", 32), ("q8_0", 32), ("f16", 0)])
def test_matmul_more_tokens_than_one_block(path, type_, block):
    """600 tokens: past the 512 tokens that share one packing of a weight tile (both kernels)."""
    rows, cols = 50, 4 * 32
    w = _matrix(rows, cols, seed=20)
    data = ref.quantize(type_, block, w)
    x = np.random.default_rng(21).standard_normal((600, cols)).astype(np.float32)
    want = _product(type_, block, ref.dequantize(type_, block, data, rows, cols).astype(np.float64), x)
    y = _core.matmul(type_, block, data, rows, cols, x, path)
    assert _rel_err(y[:, 5:], want[:, 5:]) <= TOL


@pytest.mark.parametrize("path", PATHS)
def test_matvec_long_rows(path):
    """A Phi-4-length row (17920) on a few rows: accumulation over many blocks stays accurate."""
    rows, cols = 9, 17920
    w = np.random.default_rng(14).standard_normal((rows, cols)).astype(np.float32)
    x = np.random.default_rng(15).standard_normal(cols).astype(np.float32)
    for type_, block in [("q4", 32), ("q3", 32), ("q8_0", 64), ("f32", 0), ("iq4_xs", 32), ("iq3", 32)]:
        data = _core.quantize(type_, block, w)
        want = _product(type_, block, ref.dequantize(type_, block, data, rows, cols), x)
        assert _rel_err(_core.matvec(type_, block, data, rows, cols, x, path), want) <= TOL


def test_paths_listed_match_cpu():
    """simd_paths() against the CPU flags the kernel reports (an outside source)."""
    assert PATHS[0] == "scalar"
    if platform.machine() not in ("x86_64", "AMD64"):
        assert PATHS == ["scalar"]
        return
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    want = ["scalar"]
    if {"avx2", "fma", "f16c"} <= flags:
        want.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= flags:
            want.append("avx512")
    assert PATHS == want


_SELECT = """
import numpy as np
from upg_backend import _core
rng = np.random.default_rng(0)
w = rng.standard_normal((64, 4099)).astype(np.float32)
x = rng.standard_normal(4099).astype(np.float32)
data = _core.quantize("f32", 0, w)
np.save({out!r}, np.stack([_core.matvec("f32", 0, data, 64, 4099, x)]
                          + [_core.matvec("f32", 0, data, 64, 4099, x, p) for p in _core.simd_paths()]))
"""


def test_each_path_is_selectable_by_upg_simd(tmp_path):
    # Each path sums in its own order, so its bits identify it; UPG_SIMD must select exactly it.
    for path in PATHS + [None]:
        out = tmp_path / f"{path}.npy"
        subprocess.run([sys.executable, "-c", _SELECT.format(out=str(out))], env=_path_env(path), check=True)
        chosen, *by_path = np.load(out)
        want = PATHS[-1] if path is None else path  # unset: the best path
        np.testing.assert_array_equal(chosen, by_path[PATHS.index(want)])
        for i, other in enumerate(PATHS):
            if other != want:
                assert not np.array_equal(chosen, by_path[i]), (want, other)


@pytest.mark.parametrize("value", ["bogus", "AVX2", "sse"])
def test_unknown_upg_simd_is_refused(value):
    code = ("import numpy as np; from upg_backend import _core; "
            "_core.matvec('f32', 0, np.zeros(4, np.uint8), 1, 1, np.zeros(1, np.float32))")
    proc = subprocess.run([sys.executable, "-c", code], env=_path_env(value), capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"UPG_SIMD={value}" in proc.stderr


def test_unknown_path_argument_is_refused():
    with pytest.raises(ValueError, match="path"):
        _core.matvec("f32", 0, np.zeros(4, np.uint8), 1, 1, np.zeros(1, np.float32), "avx1024")


def _q4():
    rows, cols = 4, 64
    return rows, cols, ref.quantize("q4", 32, np.ones((rows, cols), np.float32)), np.ones(cols, np.float32)


@pytest.mark.parametrize("kwargs,match", [
    (dict(type_="q5"), "unknown tensor type"),
    (dict(type_="i32"), "unknown tensor type"),
    (dict(block=16), "block"),
    (dict(cols=96, block=64), "multiple of block"),
    (dict(rows=5), "bytes"),
    (dict(cols=32), "bytes"),
    (dict(type_="f32", block=32), "block 0"),
    (dict(data=np.zeros(10, np.uint8)), "bytes"),
    (dict(x=np.ones(63, np.float32)), "x must be"),
    (dict(rows=0), "rows and cols"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    rows, cols, data, x = _q4()
    a = dict(type_="q4", block=32, data=data, rows=rows, cols=cols, x=x) | kwargs
    with pytest.raises(ValueError, match=match):
        _core.matvec(a["type_"], a["block"], a["data"], a["rows"], a["cols"], a["x"])
    with pytest.raises(ValueError, match=match):
        x2 = a["x"][None] if a["x"].ndim == 1 else a["x"]
        _core.matmul(a["type_"], a["block"], a["data"], a["rows"], a["cols"], x2)


@pytest.mark.parametrize("rowptr,col,match", [
    ([0, 1, 1, 1], [0], "rows \\+ 1"),           # too short
    ([1, 1, 1, 1, 1], [0], "from 0 to nnz"),
    ([0, 1, 1, 1, 2], [0], "from 0 to nnz"),      # nnz != len(col)
    ([0, 2, 1, 2, 2], [0, 1], "non-decreasing"),
    ([0, 1, 1, 1, 1], [64], "0..cols-1"),
    ([0, 1, 1, 1, 1], [-1], "0..cols-1"),
    ([0, 2, 2, 2, 2], [3, 3], "strictly increasing"),
])
def test_bad_outliers_raise_value_error(rowptr, col, match):
    rows, cols, data, x = _q4()
    rp, c = np.array(rowptr, np.int32), np.array(col, np.int32)
    out = (rp, c, np.zeros(len(col), np.uint16))
    with pytest.raises(ValueError, match=match):
        _core.matvec("q4", 32, data, rows, cols, x, None, out)
    with pytest.raises(ValueError, match=match):
        _core.matmul("q4", 32, data, rows, cols, x[None], None, out)


def test_bad_outlier_lengths_and_ranges_raise_value_error():
    rows, cols, data, x = _q4()
    rp = np.array([0, 1, 1, 1, 1], np.int32)
    with pytest.raises(ValueError, match="equal length"):
        _core.matvec("q4", 32, data, rows, cols, x, None, (rp, np.zeros(1, np.int32), np.zeros(2, np.uint16)))
    for r0, r1 in [(-1, 2), (3, 2), (0, 5)]:
        with pytest.raises(ValueError, match="r0"):
            _core.matvec("q4", 32, data, rows, cols, x, r0=r0, r1=r1)


def test_quantize_rejects_bad_input():
    w = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError, match="multiple of block"):
        _core.quantize("q4", 64, w[:, :32])
    with pytest.raises(ValueError, match="2-D"):
        _core.quantize("q4", 32, w[0])
    w[1, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        _core.quantize("q8_0", 32, w)
    with pytest.raises(ValueError, match="n_threads"):
        _core.quantize("q4", 32, w, n_threads=-1)


@pytest.mark.parametrize("path", PATHS)
def test_concurrent_calls_on_disjoint_rows(path):
    """The engine's pattern: several threads, one matrix, disjoint row ranges (GIL released)."""
    from concurrent.futures import ThreadPoolExecutor

    rows, cols = 203, 1024
    w = np.random.default_rng(17).standard_normal((rows, cols)).astype(np.float32)
    xs = np.random.default_rng(18).standard_normal((4, cols)).astype(np.float32)
    for type_, block in [("q4", 32), ("q3", 64), ("f16", 0)]:
        data = _core.quantize(type_, block, w, n_threads=2)
        want = [_core.matvec(type_, block, data, rows, cols, x, path) for x in xs]
        bounds = [0, 50, 51, 140, 203]

        def part(j):  # thread j: rows of slice j, with its own x
            r0, r1 = bounds[j], bounds[j + 1]
            return [_core.matvec(type_, block, data, rows, cols, xs[j], path, r0=r0, r1=r1)[r0:r1]
                    for _ in range(20)]

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(part, range(4)))
        for j, reps in enumerate(results):
            for y in reps:
                np.testing.assert_array_equal(y, want[j][bounds[j]:bounds[j + 1]])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("type_,block", TYPES)
def test_rows_shared_by_threads_give_the_same_bits(path, type_, block):
    """The engine's work split (ThreadPool::parallel_for): chunks of rows taken by whichever thread
    is free. Every split, thread count and chunk size gives the bits of one thread doing all rows,
    for decode (mat-vec) and prefill (mat-mul), outliers included."""
    rows, cols = 1000, _cols(type_, block)  # 1000: chunks of 16 and 48 leave a short last one
    w = _matrix(rows, cols, seed=21)
    data = ref.quantize(type_, block, w)
    out = None if type_ in ref.GRID_TYPES else _outliers(rows, cols, seed=22)
    rng = np.random.default_rng(23)
    x, xs = rng.standard_normal(cols).astype(np.float32), rng.standard_normal((7, cols)).astype(np.float32)
    want_v = _core.matvec(type_, block, data, rows, cols, x, path, out)
    want_m = _core.matmul(type_, block, data, rows, cols, xs, path, out)
    assert _rel_err(want_v[5:], _product(type_, block, ref.dequantize(type_, block, data, rows, cols), x, out)[5:]) <= TOL
    for n_threads, chunk in [(2, 0), (2, 16), (3, 48), (3, 0), (4, 112)]:
        y = _core.matvec(type_, block, data, rows, cols, x, path, out, n_threads=n_threads, chunk_rows=chunk)
        np.testing.assert_array_equal(y, want_v, err_msg=f"matvec, {n_threads} threads, chunks of {chunk}")
        y = _core.matmul(type_, block, data, rows, cols, xs, path, out, n_threads=n_threads, chunk_rows=chunk)
        np.testing.assert_array_equal(y, want_m, err_msg=f"matmul, {n_threads} threads, chunks of {chunk}")
    y = _core.matvec(type_, block, data, rows, cols, x, path, out, r0=100, r1=700, n_threads=2, chunk_rows=32)
    assert np.isnan(y[:100]).all() and np.isnan(y[700:]).all()
    np.testing.assert_array_equal(y[100:700], want_v[100:700])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("type_,block", TYPES)
def test_decode_of_many_tokens_gives_each_its_bits_alone(path, type_, block):
    """matvec of n tokens at once (the generated tokens of a batch, matvec_n): every token's row has
    the bits of matvec of that token alone, for any token count (whole groups of the path's tokens
    per pass and the rest), short and long rows (whose blocks fill whole vectors of four blocks, leave
    two or one: the token kernel's rows and the others), outliers included, rows shared by threads, more
    tokens than the token kernel lays out at a time (64)."""
    rng = np.random.default_rng(31)
    # rows past kShortRowBytes
    long_cols = [4 * 333] if block == 0 else [n * block for n in ((137, 136, 138) if block == 32 else (69, 68))]
    short_cols = [_cols(type_, block)] + ([18 * block] if block == 32 else [])  # 18 blocks: SmolLM2's 576
    if type_ in ref.SUPER_TYPES:
        long_cols, short_cols = [17 * ref.SUPER, 16 * ref.SUPER], [_cols(type_, block)]
    for rows, cols in [(37, c) for c in short_cols] + [(70, c) for c in long_cols]:
        w = _matrix(rows, cols, seed=32)
        data = ref.quantize(type_, block, w)
        out = None if type_ in ref.GRID_TYPES else _outliers(rows, cols, seed=33)  # grids have no 0
        xs = rng.standard_normal((67, cols)).astype(np.float32)
        alone = np.stack([_core.matvec(type_, block, data, rows, cols, x, path, out) for x in xs])
        for n in (1, 2, 3, 5, 9, 11, 17, 67):
            y = _core.matvec(type_, block, data, rows, cols, xs[:n], path, out, n_threads=2, chunk_rows=16)
            assert y.shape == (n, rows)
            np.testing.assert_array_equal(y, alone[:n], err_msg=f"{n} tokens, {rows} x {cols}")


def test_row_sharing_rejects_bad_arguments():
    rows, cols, data, x = _q4()
    for kwargs, match in [(dict(n_threads=0), "n_threads"), (dict(chunk_rows=24), "multiple of 16"),
                          (dict(chunk_rows=-16), "multiple of 16")]:
        with pytest.raises(ValueError, match=match):
            _core.matvec("q4", 32, data, rows, cols, x, **kwargs)
        with pytest.raises(ValueError, match=match):
            _core.matmul("q4", 32, data, rows, cols, x[None], **kwargs)


def test_time_matvec_times_each_pass():
    rows, cols = 64, 256
    w = _matrix(rows, cols, seed=24)
    data = ref.quantize("q8_0", 32, w)
    x = np.ones(cols, np.float32)
    times = _core.time_matvec("q8_0", 32, np.tile(data, 3), rows, cols, 3, x, n_threads=2, passes=4)
    assert len(times) == 4 and all(t > 0 for t in times)
    with pytest.raises(ValueError, match="copies"):
        _core.time_matvec("q8_0", 32, data, rows, cols, 2, x)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("block", [32, 64])
def test_activation_quantization_matches_reference(path, block):
    """The 8-bit activations of q8_0 / q4 products: same codes and scales as the numpy statement
    (llama.cpp's Q8_0 rule), bit for bit, on every path."""
    rng = np.random.default_rng(19)
    x = (rng.standard_normal((40, block)) * rng.random((40, 1)) * 4).astype(np.float32)
    x[0] = 0.0                                        # amax 0: codes and scale 0
    x[1] = 1e-6 * np.sign(x[1])                       # scale below the f16 normal range
    x[2] = 127.0 * np.arange(block) / block - 50.5    # x * 127 / amax on many half-way points
    x[3, :] = -2.0                                    # all at -amax
    x[4] *= 1e4
    x[5] = np.round(x[5] * 8) / 8
    q, d = _core.quantize_act(x.ravel(), block, path)
    want_q, want_d = ref.quantize_activations(x, block)
    np.testing.assert_array_equal(q.reshape(x.shape), want_q)
    np.testing.assert_array_equal(d, want_d.ravel())
    assert np.abs(q).max() == 127 and (q[:block] == 0).all() and d[0] == 0.0
    np.testing.assert_array_equal(q[3 * block:4 * block], -127)


def test_activation_quantization_rejects_bad_input():
    with pytest.raises(ValueError, match="block"):
        _core.quantize_act(np.ones(64, np.float32), 16)
    with pytest.raises(ValueError, match="multiple of block"):
        _core.quantize_act(np.ones(40, np.float32), 32)


@pytest.mark.parametrize("path", PATHS)
def test_exp_and_silu_match_numpy(path):
    """The softmax and SiLU helpers against float64 numpy, including lengths with SIMD tails and
    arguments past the float range (clamped to finite values, never NaN)."""
    rng = np.random.default_rng(20)
    for n in (1, 7, 16, 37, 1000):
        x = (rng.standard_normal(n) * 30).astype(np.float32)
        shift = np.float32(x.max())
        y, s = _core.exp_shift_sum(x, shift, path)
        want = np.exp((x - shift).astype(np.float64))  # x - shift is taken in float32
        np.testing.assert_allclose(y, want, rtol=3e-7, atol=1e-37)
        assert s == pytest.approx(want.sum(), rel=1e-6)
        g, u = (rng.standard_normal(n) * 8).astype(np.float32), rng.standard_normal(n).astype(np.float32)
        want = g / (1 + np.exp(-g.astype(np.float64))) * u
        np.testing.assert_allclose(_core.silu_mul(g, u, path), want, rtol=1e-6, atol=1e-7)
    grid = np.linspace(-87, 88, 100001, dtype=np.float32)  # the whole range where e^x is a normal float
    y, _ = _core.exp_shift_sum(grid, np.float32(0), path)
    np.testing.assert_allclose(y, np.exp(grid.astype(np.float64)), rtol=3e-7)
    far = np.array([-1e4, -200, -88.5, 89, 100, 1e4], np.float32)
    y, _ = _core.exp_shift_sum(far, np.float32(0), path)
    assert not np.isnan(y).any() and (y[:3] < 1e-37).all() and (y[3:] > 1e38).all()  # SIMD clamps, scalar is IEEE
    np.testing.assert_allclose(_core.silu_mul(far, np.ones(6, np.float32), path), [0, 0, 0, 89, 100, 1e4], atol=1e-30)
