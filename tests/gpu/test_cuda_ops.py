"""The CUDA kernels (cpp/cuda/) against the numpy references of tests/reference, on the GPU.

Fresh random inputs for every case, ragged shapes, outputs poisoned with NaN before each launch.
Errors are ||out - ref|| / ||ref|| against a float64 reference; tolerances: f32 arithmetic 1e-5
(mat-vec and the 8-bit tensor-core mat-mul, against x rounded as the CPU rounds it; norms,
elementwise, rope), 1e-4 where __expf enters (attention), 3e-3 for the f16 tensor-core mat-mul of
dense weights (W and x rounded to f16). The grid types (iq4_nl, iq4_xs, iq3) take the 1e-5 of the
8-bit path too: their codes become exact int8 grid values, so every block's sum is an exact
integer, as q4's. Runs with UPG_GPU_TESTS=1 (conftest.py).
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from reference.quant import GRID_TYPES, SUPER_TYPES, activations_as_used, add_outliers, dequantize, quantize

from cuda_lib import Lib, Weight, batch_pass, pass_tensor

SMALL = os.environ.get("UPG_GPU_SMALL") == "1"  # compute-sanitizer runs: fewer, smaller cases
TYPES = [("f32", 0), ("f16", 0), ("bf16", 0), ("q8_0", 32), ("q8_0", 64), ("q4", 32), ("q4", 64), ("q3", 32),
         ("q3", 64), ("iq4_nl", 32), ("iq4_xs", 32), ("iq3", 32)]
# The grid types carry no outliers (FORMAT.md): no case pairs them.
WEIGHT_CASES = [(d, b, o) for d, b in TYPES for o in (False, True) if not (o and d in GRID_TYPES)]


@pytest.fixture(scope="module")
def lib():
    return Lib()


def rel_err(out, ref):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    assert np.all(np.isfinite(out)), "unwritten (NaN) or non-finite outputs"
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def dev(a, dtype=None):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return (t if dtype is None else t.to(dtype)).cuda()


def nan(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def random_outliers(rng, rows, cols, frac=0.02):
    """CSR outliers: rowptr, col (strictly increasing per row), f16 value bits."""
    counts = rng.binomial(cols, frac, size=rows)
    counts[rng.integers(rows)] = 0  # a row without outliers
    cols_list = [np.sort(rng.choice(cols, size=c, replace=False)) for c in counts]
    rowptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    col = (np.concatenate(cols_list) if rowptr[-1] else np.zeros(0)).astype(np.int32)
    val = (rng.standard_normal(len(col)) * 2).astype(np.float16).view(np.uint16)
    return rowptr, col, val


def make_weight(rng, dtype, block, rows, cols, outliers, split=False):
    """(device Weight, float64 effective matrix), or with split (Weight, dense part, outlier part)."""
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    data = quantize(dtype, block, w)
    ref = dequantize(dtype, block, data, rows, cols).astype(np.float64)
    dense = ref
    dev_outliers = None
    if outliers:
        rowptr, col, val = random_outliers(rng, rows, cols)
        ref = add_outliers(ref, rowptr, col, val)
        # a CSR of nnz 0 still needs valid pointers
        dev_outliers = (dev(rowptr), dev(col if len(col) else np.zeros(1, np.int32)),
                        dev(val.view(np.int16) if len(val) else np.zeros(1, np.int16)))
    weight = Weight(dtype, rows, cols, block, dev(data), dev_outliers)
    return (weight, dense, ref - dense) if split else (weight, ref)


def matvec_reference(dtype, block, dense, outl, x):
    """What the mat-vec computes: the dense part times the activations as the CPU kernels round them
    for quantized types (reference.quant.activations_as_used), the outliers times x itself."""
    return dense @ activations_as_used(dtype, block, np.asarray(x, np.float32)) + outl @ np.asarray(x, np.float64)


def matrix_shapes(dtype, block):
    if dtype in ("f32", "f16", "bf16"):
        shapes = [(37, 100), (300, 1000), (64, 256)]  # cols 100, 1000 leave the 16-byte path
    elif dtype in SUPER_TYPES:  # whole super-blocks of 256; iq3's mat-vec takes 128 columns a lane
        shapes = [(37, 256 * 3), (300, 256 * 5), (5, 256)]
    else:
        # odd block counts; 12 blocks: cols a multiple of 128 at either block (the mat-mul's token
        # tiles then take their scales by cp.async)
        shapes = [(37, block * 7), (300, block * 10), (5, block * 12)]
    if not SMALL:  # iq4_xs, iq3: 21 super-blocks, more chunks than lanes and not a multiple of 32
        shapes.append((1030, 256 * 21 if dtype in SUPER_TYPES else 2048 if block != 32 or dtype not in ("q3", "iq4_nl") else 2080))
    return shapes


@pytest.mark.parametrize("dtype,block,outliers", WEIGHT_CASES)
def test_matvec(lib, dtype, block, outliers):
    rng = np.random.default_rng()
    for rows, cols in matrix_shapes(dtype, block):
        w, dense, outl = make_weight(rng, dtype, block, rows, cols, outliers, split=True)
        x = rng.standard_normal(cols).astype(np.float32)
        y = nan(rows)
        lib.matvec(w, dev(x), y)
        err = rel_err(y.cpu().numpy(), matvec_reference(dtype, block, dense, outl, x))
        assert err < 1e-5, (rows, cols, err)


@pytest.mark.parametrize("dtype,block,outliers", WEIGHT_CASES)
def test_matvec_n_has_the_bits_of_one_token(lib, dtype, block, outliers):
    """The mat-vec of several tokens (a step's generated tokens): every token's row has the bits of
    the one-token mat-vec of that token alone, for counts inside one launch, over several launches
    and ragged; at down's width (17920) too, where a launch of dense weights takes fewer tokens."""
    rng = np.random.default_rng()
    shapes = matrix_shapes(dtype, block)[:2 if SMALL else None] + ([] if SMALL else [(70, 17920)])
    counts = [2, 5] if SMALL else [3, 16, 21, 33]
    for rows, cols in shapes:
        w, dense, outl = make_weight(rng, dtype, block, rows, cols, outliers, split=True)
        if cols == 17920 and dtype == "f32":
            assert lib.matvec_tokens(w) < 16  # x of 16 tokens is more than shared memory holds
        for n in counts:
            x = (rng.standard_normal((n, cols)) * rng.uniform(0.1, 10, (n, 1))).astype(np.float32)
            x[0, :cols // 3] = 0  # activation blocks of zeros
            xd = dev(x)
            got = nan(n, rows)
            lib.matvec_n(w, xd, got, n)
            want = nan(n, rows)
            for t in range(n):
                lib.matvec(w, xd[t], want[t])
            got = got.cpu().numpy()
            np.testing.assert_array_equal(got, want.cpu().numpy(), err_msg=f"{rows}x{cols}, {n} tokens")
            assert rel_err(got[-1], matvec_reference(dtype, block, dense, outl, x[-1])) < 1e-5


@pytest.mark.parametrize("dtype,block", [("q4", 32), ("q3", 64), ("f16", 0), ("iq4_xs", 32), ("iq3", 32)])
def test_matvec_fused(lib, dtype, block):
    """The prologue fusions (rms_norm, silu_mul) and the accumulating epilogue. For quantized
    weights the prologue's f32 result (the norm, __expf) is rounded to 8 bits in the kernel, and a
    value that lands next to a rounding boundary may take the neighbouring code: about 1e-3 of the
    product per such code at these widths, so those types are held to 5e-3 (a wrong fusion is off by
    order 1)."""
    rng = np.random.default_rng()
    rows, cols = 129, 256 * 3 if dtype in SUPER_TYPES else (block or 32) * 9
    tol = 5e-3 if block else 1e-5
    w, dense, outl = make_weight(rng, dtype, block, rows, cols, dtype not in GRID_TYPES, split=True)
    x = rng.standard_normal(cols).astype(np.float32)
    nw = (1 + 0.2 * rng.standard_normal(cols)).astype(np.float32)
    eps = 1e-5
    xn = x / np.sqrt(np.mean(x.astype(np.float64) ** 2) + eps) * nw
    y = nan(rows)
    lib.matvec(w, dev(x), y, norm_weight=dev(nw), eps=eps)
    assert rel_err(y.cpu().numpy(), matvec_reference(dtype, block, dense, outl, xn)) < tol

    gu = rng.standard_normal(2 * cols).astype(np.float32)
    g, u = gu[:cols].astype(np.float64), gu[cols:].astype(np.float64)
    y0 = rng.standard_normal(rows).astype(np.float32)
    y = dev(y0)
    lib.matvec(w, dev(gu), y, silu=True, accumulate=True)
    act = g / (1 + np.exp(-g)) * u
    assert rel_err(y.cpu().numpy(), y0 + matvec_reference(dtype, block, dense, outl, act)) < tol


@pytest.mark.parametrize("dtype,block", [("q4", 32), ("q8_0", 32), ("q3", 64), ("f16", 0), ("iq4_xs", 32)])
def test_matvec_fused_has_the_bits_of_the_ops(lib, dtype, block):
    """The engine fuses a pass's lone generated token (CudaBackend::norm_linear, linear_add,
    silu_linear_add) and runs several tokens' ops one by one, so the fused mat-vec must give the bits
    of rms_norm then matvec, and of silu_mul, matvec, add; dense rows of 1001 take the float (not
    16-byte) paths of both."""
    rng = np.random.default_rng()
    rows = 131
    shapes = [256 * 3 if dtype in SUPER_TYPES else (block or 32) * 9] + ([1001] if not block else [])
    one = pass_tensor(0, 1)
    for cols in shapes:
        w, _, _ = make_weight(rng, dtype, block, rows, cols, dtype not in GRID_TYPES, split=True)
        x = dev((rng.standard_normal(cols) * rng.uniform(0.1, 10)).astype(np.float32))
        nw = dev((1 + 0.2 * rng.standard_normal(cols)).astype(np.float32))
        got, xn, want = nan(rows), nan(cols), nan(rows)
        lib.matvec(w, x, got, norm_weight=nw, eps=1e-5)
        lib.rms_norm(x, nw, xn, cols, 1e-5, 1, False, one)
        lib.matvec(w, xn, want)
        np.testing.assert_array_equal(got.cpu().numpy(), want.cpu().numpy(), err_msg=f"norm, {cols} columns")

        gu = dev((rng.standard_normal(2 * cols) * 3).astype(np.float32))
        y0 = rng.standard_normal(rows).astype(np.float32)
        got, want, act, proj = dev(y0), dev(y0), nan(cols), nan(rows)
        lib.matvec(w, gu, got, silu=True, accumulate=True)
        lib.silu_mul(gu, act, cols, 1, 2 * cols, one)
        lib.matvec(w, act, proj)
        lib.add(want, proj, rows, 1, one)
        np.testing.assert_array_equal(got.cpu().numpy(), want.cpu().numpy(), err_msg=f"silu_mul, add, {cols} columns")


@pytest.mark.parametrize("dtype,block,outliers", WEIGHT_CASES)
def test_matmul(lib, dtype, block, outliers):
    rng = np.random.default_rng()
    # (the pass's tokens, the launch's capacity): capacities 3 and 8: the 8-token tile; 40 to 64: the
    # 32-token tile (two of them); beyond: the prompt tile. A pass may hold more tokens than the
    # launch (a batch's generated rows beside its prompt rows): the first `capacity` are computed.
    tokens = [(1, 3), (5, 3), (5, 70), (70, 70)] if SMALL else [
        (1, 3), (5, 3), (8, 8), (20, 40), (45, 42), (50, 64), (5, 70), (70, 70), (130, 200)]
    for rows, cols in matrix_shapes(dtype, block)[:3 if SMALL else 4]:
        w, dense, outl = make_weight(rng, dtype, block, rows, cols, outliers, split=True)
        for n_pass, capacity in tokens:
            n, ldy = min(n_pass, capacity), rows + 3
            x = rng.standard_normal((n, cols)).astype(np.float32)
            xd = torch.zeros(capacity, cols, device="cuda")
            xd[:n] = dev(x)
            y = nan(capacity, ldy)
            lib.matmul(w, xd, y, capacity, ldy, pass_tensor(11, n_pass))
            y = y.cpu().numpy()
            assert np.all(np.isnan(y[n:])), "rows past the pass's token count were written"
            assert np.all(np.isnan(y[:n, rows:])), "the ldy gap was written"
            # quantized weights: int8 codes times x rounded as the mat-vec rounds it (exact sums per
            # block); dense ones: W and x rounded to f16 on the tensor cores
            want = np.stack([matvec_reference(dtype, block, dense, outl, row) for row in x])
            err = rel_err(y[:n, :rows], want)
            assert err < (1e-5 if block else 3e-3), (rows, cols, n, err)


@pytest.mark.parametrize("dtype,block,outliers", [(t, b, t in ("q4", "q3")) for t, b in TYPES if b])
def test_matmul_tiles_have_the_same_bits(lib, dtype, block, outliers):
    """The quantized mat-mul picks its token tile by the launch's capacity (8, 32 or 64 tokens): a
    token's row has the same bits in every tile, so a step's generated tokens get the same sums
    however many streams the step holds (docs/ARCHITECTURE.md "Batch-invariant arithmetic")."""
    rng = np.random.default_rng()
    for rows, cols in matrix_shapes(dtype, block)[:2 if SMALL else 4]:
        w, _, _ = make_weight(rng, dtype, block, rows, cols, outliers, split=True)
        n = 7
        x = dev((rng.standard_normal((n, cols)) * rng.uniform(0.1, 10, (n, 1))).astype(np.float32))
        got = {}
        for capacity in (n, 33, 200):
            xd = torch.zeros(capacity, cols, device="cuda")
            xd[:n] = x
            y = nan(capacity, rows)
            lib.matmul(w, xd, y, capacity, rows, pass_tensor(0, n))
            got[capacity] = y[:n].cpu().numpy()
        for capacity in (33, 200):
            np.testing.assert_array_equal(got[capacity], got[n], err_msg=f"{rows}x{cols}, capacity {capacity}")


@pytest.mark.parametrize("dtype,block", TYPES)
def test_get_rows(lib, dtype, block):
    rng = np.random.default_rng()
    rows, cols = 41, 512 if dtype in SUPER_TYPES else (block or 8) * 5 + (3 if block == 0 else 0)
    w, ref = make_weight(rng, dtype, block, rows, cols, dtype not in GRID_TYPES)
    ids = np.array([3, 0, 40, -1, 41, 7, 3], np.int32)
    out = nan(9, cols)
    lib.get_rows(w, dev(ids), out, 9, pass_tensor(0, len(ids)))
    out = out.cpu().numpy()
    want = np.where(((ids >= 0) & (ids < rows))[:, None], ref[np.clip(ids, 0, rows - 1)], 0.0)
    assert rel_err(out[:len(ids)], want) < 1e-6
    assert np.all(np.isnan(out[len(ids):]))


@pytest.mark.parametrize("dtype", GRID_TYPES)
def test_grid_types_match_cpu_backend(lib, dtype):
    """Mat-vec and mat-mul of matrices written by the package's own quantizer (its importance-weighted
    scale search, not the reference's rounding) against the CPU backend's kernels on the same bytes
    and inputs: both round x to 8 bits per block the same way, so only f32 summation order differs."""
    from upg_backend import _core

    rng = np.random.default_rng()
    rows, cols, n = (77, 512, 5) if SMALL else (515, 256 * 11, 37)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    data = np.asarray(_core.quantize(dtype, 32, w, importance=rng.random(cols).astype(np.float32) + 0.1))
    weight = Weight(dtype, rows, cols, 32, dev(data))
    x = rng.standard_normal((n, cols)).astype(np.float32)
    y = nan(rows)
    lib.matvec(weight, dev(x[0]), y)
    assert rel_err(y.cpu().numpy(), _core.matvec(dtype, 32, data, rows, cols, x[0])) < 1e-5
    y = nan(n, rows)
    lib.matmul(weight, dev(x), y, n, rows, pass_tensor(0, n))
    assert rel_err(y.cpu().numpy(), _core.matmul(dtype, 32, data, rows, cols, x)) < 1e-5


def test_rms_norm(lib):
    rng = np.random.default_rng()
    n, cap, tokens, eps = 1001, 6, 4, 1e-5
    x = rng.standard_normal((cap, n)).astype(np.float32) * 3
    w = (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)
    ref = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=1, keepdims=True) + eps) * w
    out = nan(cap, n)
    lib.rms_norm(dev(x), dev(w), out, n, eps, cap, False, pass_tensor(0, tokens))
    out = out.cpu().numpy()
    assert rel_err(out[:tokens], ref[:tokens]) < 1e-5 and np.all(np.isnan(out[tokens:]))
    out = nan(cap, n)
    lib.rms_norm(dev(x), dev(w), out, n, eps, cap, True, pass_tensor(0, tokens))
    out = out.cpu().numpy()
    assert rel_err(out[0], ref[tokens - 1]) < 1e-5 and np.all(np.isnan(out[1:]))


def inv_freq(rot, theta, factors):
    """RoPE's inverse frequencies as the host computes them (float32; LongRoPE factors applied)."""
    inv = 1.0 / (theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot))
    return (inv if factors is None else inv / factors.astype(np.float64)).astype(np.float32)


def rope_ref(x, pos, rot, inv, attn_factor):
    """x [n, heads, hd] float64, positions pos [n], inverse frequencies inv [rot / 2]."""
    half = rot // 2
    ang = pos[:, None].astype(np.float64) * inv[None].astype(np.float64)
    c, s = np.cos(ang)[:, None] * attn_factor, np.sin(ang)[:, None] * attn_factor
    out = x.copy()
    x0, x1 = x[..., :half], x[..., half:rot]
    out[..., :half] = x0 * c - x1 * s
    out[..., half:rot] = x1 * c + x0 * s
    return out


@pytest.mark.parametrize("hd,rot", [(64, 64), (96, 72), (128, 96)])
@pytest.mark.parametrize("longrope", [False, True])
def test_rope(lib, hd, rot, longrope):
    rng = np.random.default_rng()
    nh, nkv, cap, n, n_past = 6, 2, 5, 3, 70000
    stride = (nh + 2 * nkv) * hd + 5
    qkv = rng.standard_normal((cap, stride)).astype(np.float32)
    factors = (1 + 4 * rng.random(rot // 2)).astype(np.float32) if longrope else None
    attn_factor = 1.19 if longrope else 1.0
    d = dev(qkv)
    inv = inv_freq(rot, 10000.0, factors)
    lib.rope(d, dev(inv), cap, nh + nkv, hd, rot, stride, attn_factor, pass_tensor(n_past, n))
    out = d.cpu().numpy()
    heads = qkv[:n, :(nh + nkv) * hd].reshape(n, nh + nkv, hd).astype(np.float64)
    ref = rope_ref(heads, n_past + np.arange(n), rot, inv, attn_factor)
    assert rel_err(out[:n, :(nh + nkv) * hd].reshape(n, nh + nkv, hd), ref) < 1e-5
    assert np.array_equal(out[:n, (nh + nkv) * hd:], qkv[:n, (nh + nkv) * hd:]), "values rotated"
    assert np.array_equal(out[n:], qkv[n:]), "tokens past the pass rotated"


@pytest.mark.parametrize("hd,rot", [(64, 64), (96, 72)])
def test_rope_several_sequences(lib, hd, rot):
    """A pass of three sequences at their own positions, the middle one on LongRoPE's long set
    (rope_set 1: the second half of the inverse-frequency table)."""
    rng = np.random.default_rng()
    nh, nkv = 4, 2
    seqs, sets = [(0, 5, 3), (3, 70000, 2), (1, 0, 4)], [0, 1, 0]
    n = sum(q[2] for q in seqs)
    stride = (nh + 2 * nkv) * hd
    qkv = rng.standard_normal((n, stride)).astype(np.float32)
    short, long_ = inv_freq(rot, 10000.0, None), inv_freq(rot, 10000.0, (1 + 4 * rng.random(rot // 2)).astype(np.float32))
    d = dev(qkv)
    lib.rope(d, dev(np.concatenate([short, long_])), n, nh + nkv, hd, rot, stride, 1.0, batch_pass(seqs, 0, 100000, sets))
    out = d.cpu().numpy()
    t = 0
    for (_, n_past, m), rs in zip(seqs, sets):
        heads = qkv[t:t + m, :(nh + nkv) * hd].reshape(m, nh + nkv, hd).astype(np.float64)
        ref = rope_ref(heads, n_past + np.arange(m), rot, long_ if rs else short, 1.0)
        assert rel_err(out[t:t + m, :(nh + nkv) * hd].reshape(m, nh + nkv, hd), ref) < 1e-5, (n_past, rs)
        t += m


def attention_ref(q, k, v, n_past, scale):
    """q [n, nh, hd]; k, v [nkv, >= n_past + n, hd]; causal; float64 out [n, nh, hd]."""
    n, nh, _ = q.shape
    group = nh // k.shape[0]
    out = np.empty_like(q)
    for t in range(n):
        keys = n_past + t + 1
        for h in range(nh):
            s = k[h // group, :keys] @ q[t, h] * scale
            p = np.exp(s - s.max())
            out[t, h] = p @ v[h // group, :keys] / p.sum()
    return out


ATTN_SHAPES = [(4, 4, 64), (8, 4, 96), (16, 4, 128), (32, 4, 128), (8, 1, 64), (40, 10, 128)]


def attn_setup(rng, nh, nkv, hd, n_ctx, n_past, n, kv_dtype):
    """Random qkv rows [n], a cache holding n_past random positions; returns device and host copies."""
    stride = (nh + 2 * nkv) * hd
    qkv = rng.standard_normal((n, stride)).astype(np.float32)
    kc = nan(nkv, n_ctx, hd, dtype=kv_dtype)
    vc = nan(nkv, n_ctx, hd, dtype=kv_dtype)
    kc[:, :n_past] = torch.randn(nkv, n_past, hd, device="cuda").to(kv_dtype)
    vc[:, :n_past] = torch.randn(nkv, n_past, hd, device="cuda").to(kv_dtype)
    return stride, qkv, kc, vc


def check_cache_and_ref(kc, vc, qkv, nh, nkv, hd, n_past, n):
    """The stored positions equal the qkv K/V rows (as rounded to the cache type); returns the
    cache contents as float64 for the reference."""
    k = kc.float().cpu().numpy().astype(np.float64)
    v = vc.float().cpu().numpy().astype(np.float64)
    kt = torch.from_numpy(qkv[:, nh * hd:(nh + nkv) * hd].reshape(n, nkv, hd)).to(kc.dtype).float().numpy()
    vt = torch.from_numpy(qkv[:, (nh + nkv) * hd:].reshape(n, nkv, hd)).to(kc.dtype).float().numpy()
    assert np.array_equal(k[:, n_past:n_past + n], kt.transpose(1, 0, 2))
    assert np.array_equal(v[:, n_past:n_past + n], vt.transpose(1, 0, 2))
    assert np.all(np.isnan(k[:, n_past + n:])), "kv_store wrote past the pass"
    return k, v


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("nh,nkv,hd,n_ctx", [(*s, 301 if SMALL else 1001) for s in (ATTN_SHAPES[:3] if SMALL else ATTN_SHAPES)]
                         + [(40, 10, 128, 5001), (32, 4, 96, 5001)])
def test_attention_decode(lib, kv_dtype, nh, nkv, hd, n_ctx):
    """n_ctx 5001: 79 splits of 64 positions for the combine to merge."""
    rng = np.random.default_rng()
    for n_past in ([0, 257] if SMALL or n_ctx > 1001 else [0, 63, 64, 600, n_ctx - 1]) + ([n_ctx - 1] if n_ctx > 1001 else []):
        stride, qkv, kc, vc = attn_setup(rng, nh, nkv, hd, n_ctx, n_past, 1, kv_dtype)
        p = pass_tensor(n_past, 1, n_decode=1)
        d = dev(qkv)
        lib.kv_store(d, kc, vc, nh, nkv, hd, n_ctx, stride, 1, p)
        out = nan(nh * hd)
        ws = lib.decode_workspace(nh, nkv, hd, n_ctx)
        scale = 1 / math.sqrt(hd)
        lib.attention_decode(d, kc, vc, out, nh, nkv, hd, n_ctx, stride, scale, ws, p)
        k, v = check_cache_and_ref(kc, vc, qkv, nh, nkv, hd, n_past, 1)
        ref = attention_ref(qkv[:, :nh * hd].reshape(1, nh, hd).astype(np.float64), k, v, n_past, scale)
        assert rel_err(out.cpu().numpy(), ref.reshape(-1)) < 1e-4, n_past


# Prefill attention with an f16 cache of head_dim 64, 96 or 128 runs on the tensor cores: Q and the
# softmax weights P are rounded to f16 (2^-11 relative each; K and V are f16 already), which moves
# the output by a few 1e-4 relative on these random inputs (docs/CUDA.md); other head dims and the
# f32 cache run the f32 kernel.
PREFILL_MMA_TOL = 2e-3


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("nh,nkv,hd", (ATTN_SHAPES[:3] if SMALL else ATTN_SHAPES) + [(8, 2, 32), (4, 1, 256)])
def test_attention_prefill(lib, kv_dtype, nh, nkv, hd):
    tol = PREFILL_MMA_TOL if kv_dtype == torch.float16 and hd in (64, 96, 128) else 1e-4
    rng = np.random.default_rng()
    n_ctx, cap = 301, 80
    for n_past, n in ([(0, 17), (37, 5)] if SMALL else [(0, 1), (0, 17), (37, 50), (200, 80)]):
        stride, qkv, kc, vc = attn_setup(rng, nh, nkv, hd, n_ctx, n_past, n, kv_dtype)
        qd = torch.zeros(cap, stride, device="cuda")
        qd[:n] = dev(qkv)
        p = pass_tensor(n_past, n)
        lib.kv_store(qd, kc, vc, nh, nkv, hd, n_ctx, stride, cap, p)
        out = nan(cap, nh * hd)
        scale = 1 / math.sqrt(hd)
        lib.attention_prefill(qd, kc, vc, out, nh, nkv, hd, n_ctx, stride, cap, scale, p)
        k, v = check_cache_and_ref(kc, vc, qkv, nh, nkv, hd, n_past, n)
        ref = attention_ref(qkv[:, :nh * hd].reshape(n, nh, hd).astype(np.float64), k, v, n_past, scale)
        out = out.cpu().numpy()
        assert rel_err(out[:n], ref.reshape(n, -1)) < tol, (n_past, n)
        assert np.all(np.isnan(out[n:]))


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("nh,nkv,hd", [(8, 4, 96), (8, 2, 32)] + ([] if SMALL else [(40, 10, 128), (16, 4, 128)]))
def test_attention_several_sequences(lib, kv_dtype, nh, nkv, hd):
    """One pass of generated tokens of four sequences (one of them two tokens) and prompt chunks of
    three more, each in its own slot of one cache, ragged lengths: kv_store puts every token in its
    slot, each generated token attends its own sequence (flash-decoding), each prompt chunk in
    tiles of its own (flash attention); against the numpy reference per sequence, and each
    sequence's outputs have the bits of a pass holding that sequence alone."""
    tol = PREFILL_MMA_TOL if kv_dtype == torch.float16 and hd in (64, 96, 128) else 1e-4
    rng = np.random.default_rng()
    slot_len = 301
    decode = [(0, 0, 1), (2, 63, 1), (3, 64, 1), (5, slot_len - 2, 2)]
    prompt = [(1, 0, 17), (4, 37, 70), (6, 5, 1)] if not SMALL else [(1, 0, 17), (6, 5, 1)]
    seqs = decode + prompt
    n_dec, n = sum(q[2] for q in decode), sum(q[2] for q in seqs)
    kv_stride = 7 * slot_len
    stride = (nh + 2 * nkv) * hd
    scale = 1 / math.sqrt(hd)
    qkv = rng.standard_normal((n, stride)).astype(np.float32)
    kc, vc = nan(nkv, kv_stride, hd, dtype=kv_dtype), nan(nkv, kv_stride, hd, dtype=kv_dtype)
    for slot, n_past, _ in seqs:
        base = slot * slot_len
        kc[:, base:base + n_past] = torch.randn(nkv, n_past, hd, device="cuda").to(kv_dtype)
        vc[:, base:base + n_past] = torch.randn(nkv, n_past, hd, device="cuda").to(kv_dtype)
    qd = dev(qkv)
    p = batch_pass(seqs, n_dec, slot_len)
    lib.kv_store(qd, kc, vc, nh, nkv, hd, kv_stride, stride, n, p)
    out = nan(n, nh * hd)
    ws = lib.decode_workspace(nh, nkv, hd, kv_stride, slot_len, n_dec)
    lib.attention_decode(qd, kc, vc, out, nh, nkv, hd, kv_stride, stride, scale, ws, p, n_decode=n_dec, slot_len=slot_len)
    lib.attention_prefill(qd, kc, vc, out, nh, nkv, hd, kv_stride, stride, n, scale, p, n_decode=n_dec,
                          n_seqs=len(seqs), slot_len=slot_len)
    k = kc.float().cpu().numpy().astype(np.float64)
    v = vc.float().cpu().numpy().astype(np.float64)
    got = out.cpu().numpy()
    first = 0
    for i, (slot, n_past, m) in enumerate(seqs):
        base, rows = slot * slot_len, qkv[first:first + m]
        kt = torch.from_numpy(rows[:, nh * hd:(nh + nkv) * hd].reshape(m, nkv, hd)).to(kv_dtype).double().numpy()
        assert np.array_equal(k[:, base + n_past:base + n_past + m], kt.transpose(1, 0, 2)), f"sequence {i}: K not in its slot"
        if n_past + m < slot_len:
            assert np.all(np.isnan(k[:, base + n_past + m:base + slot_len])), f"sequence {i}: stored past its tokens"
        ref = attention_ref(rows[:, :nh * hd].reshape(m, nh, hd).astype(np.float64), k[:, base:base + slot_len],
                            v[:, base:base + slot_len], n_past, scale)
        assert rel_err(got[first:first + m], ref.reshape(m, -1)) < (1e-4 if i < len(decode) else tol), f"sequence {i}"
        # the same sequence alone in a pass: the same bits
        alone = nan(m, nh * hd)
        qa = qd[first:first + m].contiguous()
        if i < len(decode):
            pa = batch_pass([(slot, n_past, m)], m, slot_len)
            wa = lib.decode_workspace(nh, nkv, hd, kv_stride, slot_len, m)
            lib.attention_decode(qa, kc, vc, alone, nh, nkv, hd, kv_stride, stride, scale, wa, pa, n_decode=m,
                                 slot_len=slot_len)
        else:
            pa = batch_pass([(slot, n_past, m)], 0, slot_len)
            lib.attention_prefill(qa, kc, vc, alone, nh, nkv, hd, kv_stride, stride, m, scale, pa, slot_len=slot_len)
        np.testing.assert_array_equal(alone.cpu().numpy(), got[first:first + m], err_msg=f"sequence {i} alone")
        first += m


def test_silu_mul_add(lib):
    rng = np.random.default_rng()
    n, cap, tokens, stride = 1003, 5, 3, 2 * 1003 + 7
    gu = rng.standard_normal((cap, stride)).astype(np.float32) * 3
    out = nan(cap, n)
    lib.silu_mul(dev(gu), out, n, cap, stride, pass_tensor(0, tokens))
    g, u = gu[:tokens, :n].astype(np.float64), gu[:tokens, n:2 * n].astype(np.float64)
    o = out.cpu().numpy()
    assert rel_err(o[:tokens], g / (1 + np.exp(-g)) * u) < 1e-5 and np.all(np.isnan(o[tokens:]))
    x = rng.standard_normal((cap, n)).astype(np.float32)
    y = rng.standard_normal((cap, n)).astype(np.float32)
    xd = dev(x)
    lib.add(xd, dev(y), n, cap, pass_tensor(0, tokens))
    xo = xd.cpu().numpy()
    assert np.array_equal(xo[:tokens], x[:tokens] + y[:tokens]) and np.array_equal(xo[tokens:], x[tokens:])


@pytest.mark.parametrize("n", [1, 1001, 100352])
def test_argmax(lib, n):
    rng = np.random.default_rng()
    x = rng.standard_normal(n).astype(np.float32)
    if n > 10:
        x[[n // 3, n // 2, n - 1]] = x.max() + 1  # ties: the lowest index wins
    out = torch.full((1,), -7, dtype=torch.int32, device="cuda")
    lib.argmax(dev(x), n, out)
    assert int(out.item()) == int(np.argmax(x))


def test_captured_decode_replays_with_device_pass(lib):
    """rope + kv_store + attention captured once as a CUDA graph, replayed at new positions by
    writing the pass buffer only (next_token inside the graph)."""
    rng = np.random.default_rng()
    nh, nkv, hd, n_ctx = 8, 2, 64, 700
    stride = (nh + 2 * nkv) * hd
    scale = 1 / math.sqrt(hd)
    qkv_in = torch.zeros(stride, device="cuda")
    qkv = torch.zeros(stride, device="cuda")
    kc = torch.zeros(nkv, n_ctx, hd, dtype=torch.float16, device="cuda")
    vc = torch.zeros_like(kc)
    out = torch.zeros(nh * hd, device="cuda")
    ws = lib.decode_workspace(nh, nkv, hd, n_ctx)
    p = pass_tensor(0, 1, n_decode=1)
    token = torch.tensor([4321], dtype=torch.int32, device="cuda")
    generated = torch.full((n_ctx,), -7, dtype=torch.int32, device="cuda")
    inv = inv_freq(hd, 10000.0, None)
    inv_dev = dev(inv)

    def step():
        qkv.copy_(qkv_in)
        lib.rope(qkv, inv_dev, 1, nh + nkv, hd, hd, stride, 1.0, p)
        lib.kv_store(qkv, kc, vc, nh, nkv, hd, n_ctx, stride, 1, p)
        lib.attention_decode(qkv, kc, vc, out, nh, nkv, hd, n_ctx, stride, scale, ws, p)
        lib.next_token(p, token, generated)

    step()  # loads the kernels before the capture
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g, stream=s):
            step()
    torch.cuda.current_stream().wait_stream(s)
    p.copy_(pass_tensor(0, 1, n_decode=1))
    rows = []
    for step in range(520):  # crosses two split boundaries (256 positions each)
        row = rng.standard_normal(stride).astype(np.float32)
        rows.append(row)
        qkv_in.copy_(dev(row))
        g.replay()
        if step in (0, 255, 256, 519):
            torch.cuda.synchronize()
            seq = np.stack(rows).astype(np.float64)
            pos = np.arange(len(rows))
            heads = rope_ref(seq[:, :(nh + nkv) * hd].reshape(-1, nh + nkv, hd), pos, hd, inv, 1.0)
            k = torch.from_numpy(heads[:, nh:].astype(np.float32)).half().double().numpy().transpose(1, 0, 2)
            v = torch.from_numpy(seq[:, (nh + nkv) * hd:].astype(np.float32)).half().double().numpy()
            v = v.reshape(-1, nkv, hd).transpose(1, 0, 2)
            ref = attention_ref(heads[-1:, :nh], k, v, step, scale)
            assert rel_err(out.cpu().numpy(), ref.reshape(-1)) < 1e-4, step
    assert p.cpu().tolist()[:2] == [520, 1]
    assert (generated[:520] == 4321).all() and (generated[520:] == -7).all()


def test_bad_input_raises(lib):
    w = Weight("q4", 4, 48, 48, torch.zeros(1024, dtype=torch.uint8, device="cuda"))
    with pytest.raises(RuntimeError, match="block must be 32 or 64"):
        lib.matvec(w, torch.zeros(48, device="cuda"), torch.zeros(4, device="cuda"))
    for dtype, block, cols, msg in [("iq4_xs", 32, 96, "multiple of 256"), ("iq4_nl", 64, 128, "block must be 32")]:
        w = Weight(dtype, 4, cols, block, torch.zeros(1024, dtype=torch.uint8, device="cuda"))
        with pytest.raises(RuntimeError, match=msg):
            lib.matvec(w, torch.zeros(cols, device="cuda"), torch.zeros(4, device="cuda"))
        with pytest.raises(RuntimeError, match=msg):
            lib.matmul(w, torch.zeros(2, cols, device="cuda"), torch.zeros(2, 4, device="cuda"), 2, 4, pass_tensor(0, 2))
    i32 = Weight("i32", 4, 32, 0, torch.zeros(1024, dtype=torch.uint8, device="cuda"))
    with pytest.raises(RuntimeError, match="not a weight type"):
        lib.matvec(i32, torch.zeros(32, device="cuda"), torch.zeros(4, device="cuda"))
    wide = Weight("q8_0", 1, 64000, 32, torch.zeros(1024, dtype=torch.uint8, device="cuda"))
    with pytest.raises(RuntimeError, match="cols too large"):
        lib.matvec(wide, torch.zeros(64000, device="cuda"), torch.zeros(1, device="cuda"))
    with pytest.raises(RuntimeError, match="bad attention shape"):
        z = torch.zeros(64, device="cuda")
        lib.attention_prefill(z, z, z, z, 2, 1, 12, 4, 64, 1, 1.0, pass_tensor(0, 1))
