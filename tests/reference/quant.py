"""Numpy reference quantizers and decoders for every UPG tensor type, written from docs/FORMAT.md.

Independent of the C++ code. Choices the spec leaves to the writer (cpp/kernels/quantize.cpp
makes the same ones): codes are ``round(x / f16(d))`` with ties to even (``np.rint``), against the
scale as stored; a scale that rounds to zero gives zero codes; ``m`` (q4, q3) is the first element
of largest magnitude in the block.

For the grid types (iq4_nl, iq4_xs, iq3) the writer searches scales (importance-weighted), so
``quantize`` here is a plain round-to-nearest encoder of the same layout: the baseline the writer's
search is tested against, and test data for the kernels.
"""

import numpy as np

DENSE = ("f32", "f16", "bf16")
UNIFORM = ("q8_0", "q4", "q3")
GRID_TYPES = ("iq4_nl", "iq4_xs", "iq3")
SUPER_TYPES = ("iq4_xs", "iq3")  # an f16 super-scale per 256 elements, 6-bit sub-scales per 32
QUANTIZED = UNIFORM + GRID_TYPES
# type -> (zero point, lowest code, highest code)
_CODES = {"q8_0": (0, -127, 127), "q4": (8, 0, 15), "q3": (4, 0, 7)}
# docs/FORMAT.md "Grid types": element = scale * GRID[code]
IQ4_GRID = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
IQ3_GRID = np.array([-127, -76, -43, -17, 8, 35, 65, 105], np.float32)
GRIDS = {"iq4_nl": IQ4_GRID, "iq4_xs": IQ4_GRID, "iq3": IQ3_GRID}
SUPER = 256


def pad64(n):
    """Bytes a section of n bytes takes in the file."""
    return (n + 63) & ~63


def _section(a):
    b = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
    return np.concatenate([b, np.zeros(pad64(b.size) - b.size, np.uint8)])


def f32_to_bf16_bits(x):
    """bfloat16 bits of float32 values, rounded to nearest even (NaNs stay quiet NaNs)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), ((bits >> 16) | 0x40).astype(np.uint16), rounded)


def _scales(x, type_):
    """f16 scale of each block of x [rows, nb, B] and the f32 value the codes are computed with."""
    if type_ == "q8_0":
        d = np.abs(x).max(axis=-1) / np.float32(127)
    else:
        m = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)[..., 0]
        d = m / np.float32(-8 if type_ == "q4" else -4)
    d16 = d.astype(np.float16)
    return d16, d16.astype(np.float32)


# type -> (divisor of the plain scale, whether m is the signed largest element)
_PLAIN = {"q8_0": (127.0, False), "q4": (-8.0, True), "q3": (-4.0, True)}


def _nearest(x, d, type_):
    """Codes minus the zero point nearest to x under scales d (broadcast), as float64; 0 where d == 0."""
    zero, lo, hi = _CODES[type_]
    safe = np.where(d == 0, np.float32(1), d).astype(np.float32)
    q = np.clip(np.rint(x / safe) + np.float32(zero), lo, hi) - np.float32(zero)
    return np.where(d == 0, 0.0, q.astype(np.float64))


def _weighted_error(x, wt, d, type_):
    e = x.astype(np.float64) - d.astype(np.float64) * _nearest(x, d, type_)
    return (wt * e * e).sum(axis=-1)


def weighted_scales(type_, x, importance):
    """Scales (f16) of blocks x [rows, nb, B] under per-column importance [nb, B]: the search that
    docs/QUANTIZATION.md describes (the plain scale and 19 least-squares candidates, least weighted
    error wins, the first on ties)."""
    div, signed = _PLAIN[type_]
    if signed:
        m = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    else:
        m = np.abs(x).max(axis=-1)
    x64 = x.astype(np.float64)
    sigma2 = (x64 * x64).sum(axis=-1, keepdims=True) / x.shape[-1]
    wt = importance.astype(np.float32).astype(np.float64) * np.sqrt(sigma2 + x64 * x64)
    best = (m / np.float32(div)).astype(np.float16).astype(np.float32)
    best_err = _weighted_error(x, wt, best[..., None], type_)
    for i in range(-9, 10):
        d = (m.astype(np.float64) / (div + (-0.1 if div < 0 else 0.1) * i)).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            l = _nearest(x, d[..., None], type_)
            sumlx = (wt * l * x64).sum(axis=-1)
            suml2 = (wt * l * l).sum(axis=-1)
            cand = (sumlx / np.where(suml2 > 0, suml2, 1.0)).astype(np.float32).astype(np.float16).astype(np.float32)
        err = _weighted_error(x, wt, cand[..., None], type_)
        better = (suml2 > 0) & (err < best_err) & (m != 0)
        best = np.where(better, cand, best)
        best_err = np.where(better, err, best_err)
    return best.astype(np.float16)


def nearest(grid, v):
    """Index of the grid value nearest each v (ties to the upper value)."""
    return np.searchsorted((grid[1:] + grid[:-1]) / 2, v, side="right")


def _pack_nibbles(q):
    """q4's packing of codes [..., nb, 32]: byte i = element i | element i + 16 << 4."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def _pack_iq3(codes):
    """iq3's packing per group of 128 codes: ql byte i = sum over blocks p of (low 2 bits of element
    32p + i) << 2p; qh byte i = sum over k of (bit 2 of element 16k + i) << k."""
    g = codes.reshape(codes.shape[0], -1, 128)
    ql = ((g.reshape(*g.shape[:2], 4, 32) & 3) << (2 * np.arange(4))[:, None]).sum(axis=-2)
    qh = (((g.reshape(*g.shape[:2], 8, 16) >> 2) & 1) << np.arange(8)[:, None]).sum(axis=-2)
    return ql.astype(np.uint8), qh.astype(np.uint8)


def pack_grid(type_, codes, scales, sub=None):
    """The bytes of a grid-type matrix from its parts: codes [rows, cols] (grid indices), scales
    (f16: [rows, cols/32] for iq4_nl, [rows, cols/256] for the super-block types) and, for those,
    sub [rows, cols/32], the 6-bit codes ls (sub-block scale = d * (ls - 32))."""
    codes = np.asarray(codes, np.int64)
    rows, cols = codes.shape
    q = codes.reshape(rows, cols // 32, 32)
    sections = [_pack_nibbles(q)] if type_ != "iq3" else list(_pack_iq3(codes))
    if type_ in SUPER_TYPES:
        ls = np.asarray(sub, np.int64).reshape(rows, -1)
        lo = (ls[:, 0::2] & 15) | ((ls[:, 1::2] & 15) << 4)
        hb = (ls >> 4) & 3
        hi = hb[:, 0::4] | (hb[:, 1::4] << 2) | (hb[:, 2::4] << 4) | (hb[:, 3::4] << 6)
        sections.append(np.concatenate([lo, hi], axis=1).astype(np.uint8))
    sections.append(np.asarray(scales, np.float16))
    return np.concatenate([_section(a) for a in sections])


def _quantize_grid(type_, w):
    """Round to nearest: each block's (or sub-block's) element of largest magnitude m maps to the
    grid's first value; super-block types take d = -max scale / 32 and ls = rint(scale / d) + 32."""
    grid = GRIDS[type_]
    rows, cols = w.shape
    x = w.reshape(rows, cols // 32, 32)
    m = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    s = m / grid[0]
    sub = None
    if type_ in SUPER_TYPES:
        sup = s.reshape(rows, -1, 8)
        smax = np.take_along_axis(sup, np.abs(sup).argmax(axis=-1)[..., None], axis=-1)
        d16 = (-smax / np.float32(32)).astype(np.float16)
        d = d16.astype(np.float32)
        l = np.clip(np.rint(sup / np.where(d == 0, 1, d)), -32, 31)
        l = np.where(d == 0, 0, l)
        sub = (l + 32).astype(np.int64).reshape(rows, -1)
        scales, eff = d16[..., 0], (d * l).reshape(rows, -1)
    else:
        scales = s.astype(np.float16)
        eff = scales.astype(np.float32)
    codes = nearest(grid, x / np.where(eff == 0, 1, eff)[..., None])
    codes = np.where(eff[..., None] == 0, nearest(grid, np.float32(0)), codes)
    return pack_grid(type_, codes.reshape(rows, cols), scales, sub)


def quantize(type_, block, w, importance=None):
    """The file bytes (uint8) of a float32 [rows, cols] matrix stored as type_; importance: per-column
    weights [cols] of the scale search of q8_0 / q4 / q3 (None: the plain scale). Grid types are
    rounded to nearest here; the writer's importance-weighted search is checked by its properties."""
    w = np.ascontiguousarray(w, np.float32)
    if type_ in GRID_TYPES:
        return _quantize_grid(type_, w)
    if type_ == "f32":
        return w.view(np.uint8).reshape(-1).copy()
    if type_ == "f16":
        return w.astype(np.float16).view(np.uint8).reshape(-1)
    if type_ == "bf16":
        return f32_to_bf16_bits(w).view(np.uint8).reshape(-1)
    rows, cols = w.shape
    B = block
    x = w.reshape(rows, cols // B, B)
    d16, d = _scales(x, type_)
    if importance is not None:
        d16 = weighted_scales(type_, x, np.asarray(importance, np.float32).reshape(cols // B, B))
        d = d16.astype(np.float32)
    zero, lo, hi = _CODES[type_]
    safe = np.where(d == 0, np.float32(1), d)[..., None]
    q = np.clip(np.rint(x / safe) + zero, lo, hi).astype(np.int64)
    q = np.where(d[..., None] == 0, zero, q)
    if type_ == "q8_0":
        return np.concatenate([_section(q.astype(np.int8)), _section(d16)])
    if type_ == "q4":
        codes = q[..., : B // 2] | (q[..., B // 2 :] << 4)
        return np.concatenate([_section(codes.astype(np.uint8)), _section(d16)])
    # q3: ql byte i holds the low bits of elements i + k*B/4 at bits 2k; qh byte i the high bit of
    # element i + k*B/8 at bit k.
    q4k = q.reshape(rows, -1, 4, B // 4)
    ql = ((q4k & 3) << (2 * np.arange(4))[:, None]).sum(axis=-2)
    q8k = q.reshape(rows, -1, 8, B // 8)
    qh = (((q8k >> 2) & 1) << np.arange(8)[:, None]).sum(axis=-2)
    return np.concatenate([_section(ql.astype(np.uint8)), _section(qh.astype(np.uint8)), _section(d16)])


def dequantize(type_, block, data, rows, cols):
    """The float32 [rows, cols] matrix that the bytes of a type_ tensor encode."""
    data = np.asarray(data, np.uint8)
    if type_ == "f32":
        return data.view(np.float32).reshape(rows, cols).copy()
    if type_ == "f16":
        return data.view(np.float16).astype(np.float32).reshape(rows, cols)
    if type_ == "bf16":
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(rows, cols)
    if type_ in GRID_TYPES:
        return _dequantize_grid(type_, data, rows, cols)
    B, nb = block, cols // block
    n_codes = {"q8_0": rows * cols, "q4": rows * cols // 2, "q3": rows * cols // 4}[type_]
    n_high = rows * cols // 8 if type_ == "q3" else 0
    start = pad64(n_codes) + pad64(n_high)
    d = data[start : start + rows * nb * 2].view(np.float16).astype(np.float32).reshape(rows, nb, 1)
    j = np.arange(B)
    if type_ == "q8_0":
        q = data[:n_codes].view(np.int8).astype(np.int64).reshape(rows, nb, B)
    elif type_ == "q4":
        by = data[:n_codes].astype(np.int64).reshape(rows, nb, B // 2)
        q = np.where(j < B // 2, by[..., j % (B // 2)] & 15, by[..., j % (B // 2)] >> 4) - 8
    else:
        ql = data[:n_codes].astype(np.int64).reshape(rows, nb, B // 4)
        qh = data[pad64(n_codes) : pad64(n_codes) + n_high].astype(np.int64).reshape(rows, nb, B // 8)
        low = (ql[..., j % (B // 4)] >> (2 * (j // (B // 4)))) & 3
        high = (qh[..., j % (B // 8)] >> (j // (B // 8))) & 1
        q = (low | (high << 2)) - 4
    return (d * q.astype(np.float32)).reshape(rows, cols)


def grid_parts(type_, data, rows, cols):
    """A grid-type matrix's codes [rows, nb, 32] (grid indices) and block scales [rows, nb] (f32)."""
    nb, j = cols // 32, np.arange(32)
    if type_ == "iq3":
        n_codes, n_high = rows * cols // 4, rows * cols // 8
        ql = data[:n_codes].astype(np.int64).reshape(rows, -1, 1, 32)
        qh = data[pad64(n_codes) : pad64(n_codes) + n_high].astype(np.int64).reshape(rows, -1, 1, 16)
        e = np.arange(128).reshape(4, 32)  # element of the group, [block p][j]
        low = (ql[..., e % 32] >> (2 * (e // 32))) & 3
        high = (qh[..., e % 16] >> (e // 16)) & 1
        q = (low | (high << 2)).reshape(rows, nb, 32)
    else:
        n_codes, n_high = rows * cols // 2, 0
        by = data[:n_codes].astype(np.int64).reshape(rows, nb, 16)
        q = np.where(j < 16, by[..., j % 16] & 15, by[..., j % 16] >> 4)
    start = pad64(n_codes) + pad64(n_high)
    if type_ in SUPER_TYPES:
        n_sub = rows * (nb // 2 + nb // 4)
        sub = data[start : start + n_sub].astype(np.int64).reshape(rows, -1)
        b = np.arange(nb)
        ls = ((sub[:, b // 2] >> (4 * (b % 2))) & 15) | (((sub[:, nb // 2 + b // 4] >> (2 * (b % 4))) & 3) << 4)
        start += pad64(n_sub)
        d = data[start : start + rows * (cols // SUPER) * 2].view(np.float16).astype(np.float32).reshape(rows, -1)
        scale = d[:, b // 8] * (ls - 32).astype(np.float32)
    else:
        scale = data[start : start + rows * nb * 2].view(np.float16).astype(np.float32).reshape(rows, nb)
    return q, scale


def _dequantize_grid(type_, data, rows, cols):
    q, scale = grid_parts(type_, data, rows, cols)
    return (scale[..., None] * GRIDS[type_][q]).reshape(rows, cols)


def add_outliers(w, rowptr, col, val_bits):
    """W + the CSR outliers (values as f16 bits), as float64."""
    out = np.asarray(w, np.float64).copy()
    vals = np.asarray(val_bits, np.uint16).view(np.float16).astype(np.float64)
    for r in range(out.shape[0]):
        for i in range(rowptr[r], rowptr[r + 1]):
            out[r, col[i]] += vals[i]
    return out


# Quantized weights multiply activations quantized like this (docs/ARCHITECTURE.md), as llama.cpp's
# Q8_0 activations: per block, d = f16(amax / 127), codes rint(x * (127 / amax)).
ACT_Q8_TYPES = QUANTIZED


def quantize_activations(x, block):
    """x [..., cols] float32 -> (int codes, f32 scales [..., cols / block]), computed in float32
    step by step as the kernels do, so that the codes come out the same."""
    x = np.asarray(x, np.float32)
    xb = x.reshape(*x.shape[:-1], -1, block)
    amax = np.abs(xb).max(axis=-1)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(xb * inv[..., None])
    return q.reshape(x.shape).astype(np.int32), d


def activations_as_used(type_, block, x):
    """The activations the kernels multiply type_'s weights with, as float64: x itself, or its
    8-bit quantization decoded."""
    if type_ not in ACT_Q8_TYPES:
        return np.asarray(x, np.float64)
    q, d = quantize_activations(x, block)
    xb = q.reshape(*q.shape[:-1], -1, block).astype(np.float64) * d[..., None]
    return xb.reshape(q.shape)
