"""GPTQ (Frantar et al. 2022, "OPTQ"): quantization with error feedback.

A matrix W [rows, cols] whose inputs x have the Gram matrix H = sum_t x_t x_t^T (upg_backend.calibrate,
gram=True) is quantized column by column, in order: each column's rounding error is spread over the
columns not yet quantized, by the update that changes the layer's outputs W X least (through the upper
Cholesky factor U of the damped H^-1, with lazy batch updates). Each scale group (a block of 32 or 64
columns; 256 for iq4_xs and iq3, whose sub-block scales share a super-scale) has its scales chosen when
it starts, from the error-updated weights, by the type's own importance-weighted search; each column is
rounded by the type's own rounding under them (`_core.round_to_type`). The bytes are the type's ordinary
bytes (`_core.quantize(..., codes_from=)` writes them): readers and kernels do not change. Once the
codes are fixed, the block scales are searched again against the output error over H (refit_scales)
and written as given (`_core.quantize(..., scales_from=)`).

Memory: while H is factored, two float64 matrices of its size and the float32 factor, 20 bytes per
cols^2 at peak besides the caller's H (6.4 GB at Phi-4's 17920-wide down_proj); then the factor and
six float32 matrices of W's size (the loaded weights, four working copies, the decoded check: 4.4 GB
at Phi-4's 35840 x 5120 gate_up_proj). Time: a Cholesky factorization and a triangular inverse of H (cols^3 / 3
each, float64), 2 * rows * cols^2 flops of updates and as many for the scale refit's normal equations
(three float32 matrices of W's size besides W, and chunks of rows of at most 128 MB; iq3's search over
at most 128 MB of their [rows, nb, nb] matrices) (docs/QUANTIZATION.md "GPTQ").
"""
from __future__ import annotations

import numpy as np

# Damping: this fraction of H's mean diagonal is added to its diagonal (as GPTQ's reference), which
# makes a Gram matrix of fewer tokens than columns invertible and keeps the updates bounded.
DAMP = 0.01
# Columns per lazy batch. A scale group starts either inside the batch that holds all of it (32, 64)
# or where a batch starts (256), so its weights have every earlier column's error when its scales
# are chosen. The updates inside a batch cost rows * cols * BATCH, memory-bound: smaller is faster
# down to where the batch's product stops being a matrix product.
BATCH = 128
SUPER_BLOCK_TYPES = ("iq4_xs", "iq3")
TYPES = ("q8_0", "q4", "q3", "iq4_nl", "iq4_xs", "iq3")
# The types whose scales are refitted (refit_scales). Not iq4_xs: on the testbed the searched 6-bit
# scales lowered its output error by 2% on average but not its KLD (0.0087 both; p99 0.0515 -> 0.0551),
# and moved the --bpw 4.25 mix from 0.0083 to 0.0084 (docs/QUANTIZATION.md "Explicit scales").
REFIT_TYPES = ("q8_0", "q4", "q3", "iq4_nl", "iq3")


class GPTQError(ValueError):
    """The Gram matrix does not fit the matrix, or is not one of real inputs (not positive definite)."""


def scale_group(type: str, block: int) -> int:
    """Columns that share a scale choice: the block, or the 256 of a super-block."""
    from . import _core

    return _core.SUPER_BLOCK if type in SUPER_BLOCK_TYPES else block


def inverse_factor(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """The upper triangular U (float32) with U^T U = (H + damp * mean(diag H) * I)^-1.

    Columns whose input was always 0 (diag 0) get 1 on the diagonal: their error moves no output.
    Computed as U = P M^-1 P with M the lower Cholesky factor of P H P (P reverses the order), one
    factorization and one inverse.

    Raises:
        GPTQError: H is not square, not finite, not symmetric, or not positive definite after damping.
    """
    h = np.array(h, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise GPTQError(f"the Gram matrix must be square, got shape {list(h.shape)}")
    if not np.isfinite(h).all():
        raise GPTQError("the Gram matrix has NaN or Inf values")
    if not np.allclose(h, h.T, rtol=1e-6, atol=1e-12 * max(1.0, float(np.abs(h).max(initial=0.0)))):
        raise GPTQError("the Gram matrix is not symmetric")
    if damp < 0:
        raise GPTQError(f"damp must be >= 0, got {damp}")
    diag = np.diagonal(h).copy()
    if (diag < 0).any():
        raise GPTQError("the Gram matrix has negative diagonal values: it is not sum x x^T of any inputs")
    dead = diag == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diagonal(h)))
    try:
        m = np.linalg.cholesky(h[::-1, ::-1])
    except np.linalg.LinAlgError:
        raise GPTQError(f"the Gram matrix is not positive definite with damping {damp} (singular, or not sum x x^T "
                        "of real inputs); a larger damp makes a singular one invertible") from None
    del h  # its factor is all that is needed: one float64 copy fewer while m is inverted
    return np.ascontiguousarray(np.linalg.inv(m)[::-1, ::-1], dtype=np.float32)


def quantize(w: np.ndarray, h: np.ndarray, type: str, block: int = 32, importance: np.ndarray | None = None,
             damp: float = DAMP, factor: np.ndarray | None = None, refit: bool = True) -> np.ndarray:
    """W's bytes in `type` (FORMAT.md), by GPTQ with the Gram matrix h of its inputs.

    Args:
        w: float32 [rows, cols].
        h: [cols, cols], sum over calibration tokens of x x^T.
        type, block: the quantized type (q8_0, q4, q3: block 32 or 64; the grid types: 32).
        importance: per-column weights of the scale search; None: diag(h) (the mean squared input up to
            a constant factor, which the search does not see: calibrate's importance).
        damp: fraction of H's mean diagonal added to its diagonal.
        factor: inverse_factor(h, damp), when the caller has it already (bit allocation quantizes one
            matrix at every candidate); None: computed here.
        refit: fit the scales again once the codes are fixed (refit_scales), for REFIT_TYPES.

    Raises:
        GPTQError: h does not fit w or is not positive definite after damping.
        ValueError: the type, block or shape is invalid, or w has NaN or Inf.
    """
    from . import _core

    if type not in TYPES:
        raise ValueError(f"GPTQ quantizes {', '.join(TYPES)}, not {type!r}")
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"w must be a matrix, got shape {list(w.shape)}")
    rows, cols = w.shape
    if np.shape(h) != (cols, cols):
        raise GPTQError(f"the Gram matrix has shape {list(np.shape(h))}; a matrix of {cols} columns needs [{cols}, {cols}]")
    if not np.isfinite(w).all():
        raise ValueError("w has NaN or Inf values")
    _core.quant_nbytes(type, rows, cols, block)  # the type's shape rules, with its own message
    group = scale_group(type, block)
    imp = np.ascontiguousarray(np.diagonal(h) if importance is None else importance, dtype=np.float32)
    if imp.shape != (cols,):
        raise ValueError(f"importance must have {cols} values, got shape {list(imp.shape)}")
    u = inverse_factor(h, damp) if factor is None else np.asarray(factor, np.float32)
    if u.shape != (cols, cols):
        raise GPTQError(f"the factor has shape {list(u.shape)}; a matrix of {cols} columns needs [{cols}, {cols}]")

    wt = np.array(w.T, dtype=np.float32, order="C")  # [cols, rows]: a column is a contiguous row here
    start = np.empty_like(wt)    # each group's weights when it started: what its scales are chosen for
    rounded = np.empty_like(wt)  # each column's weights when it was rounded: what its codes are of
    q = np.empty_like(wt)
    err = np.empty((BATCH, rows), np.float32)
    scales = None
    for i1 in range(0, cols, BATCH):
        i2 = min(i1 + BATCH, cols)
        for i in range(i1, i2):
            if i % group == 0:
                start[i:i + group] = wt[i:i + group]
                data = _core.quantize(type, block, start[i:i + group].T, importance=imp[i:i + group])
                scales = np.ascontiguousarray(_core.block_scales(type, block, data, rows, group).T)
            rounded[i] = wt[i]
            q[i] = _core.round_to_type(type, wt[i], scales[(i % group) // block])
            e = (wt[i] - q[i]) / u[i, i]
            wt[i + 1:i2] -= np.outer(u[i, i + 1:i2], e)
            err[i - i1] = e
        wt[i2:] -= u[i1:i2, i2:].T @ err[:i2 - i1]
    data = _core.quantize(type, block, start.T, importance=imp, codes_from=rounded.T)
    decoded = _core.dequantize(type, block, data, rows, cols)
    if not np.allclose(decoded, q.T, rtol=1e-6, atol=1e-6 * float(np.abs(q).max(initial=0.0))):
        raise RuntimeError(f"GPTQ's {type} bytes do not decode to the values it chose")  # a bug, not bad input
    del wt, start, rounded, q, decoded  # the refit's memory in their place
    return refit_scales(w, h, type, block, data) if refit and type in REFIT_TYPES else data


def refit_scales(w: np.ndarray, h: np.ndarray, type: str, block: int, data: np.ndarray) -> np.ndarray:
    """The bytes of W in `type` with every block's scale fitted again to the codes `data` holds.

    Per row, the output error (w - sum_b s_b g_b) H (...)^T over the codes' grid values g_b is
    quadratic in the block scales s (normal_equations); the scales are searched on what the bytes can
    hold, against that error (search_scales): f16 values, or for iq4_xs / iq3 f16 super-scales times
    6-bit integers. The encoder writes them as given (`_core.quantize(..., scales_from=)`). data's own
    scales are among the candidates, so no row's output error rises.
    """
    from . import _core

    rows, cols = w.shape
    hd = np.asarray(h, np.float64)
    old = _core.dequantize(type, block, data, rows, cols)
    scales = _core.block_scales(type, block, data, rows, cols)
    supers = _core.super_scales(type, data, rows, cols) if type in SUPER_BLOCK_TYPES else None
    new = np.empty_like(old)
    nb = cols // block
    step = max(1, (1 << 27) // (8 * cols * nb))  # rows whose G H (normal_equations) takes at most 128 MB
    search = max(step, (1 << 27) // (8 * nb * nb))  # rows searched at once: their A takes at most 128 MB
    for r0 in range(0, rows, search):
        rs = slice(r0, min(r0 + search, rows))
        unit = np.repeat(scales[rs].astype(np.float64), block, axis=1)
        g = np.divide(old[rs], unit, out=np.zeros_like(unit), where=unit != 0)  # the codes' grid values at scale 1
        parts = [normal_equations(w[rs][i:i + step], hd, g[i:i + step], block) for i in range(0, len(g), step)]
        a, rhs = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        del parts
        sc, sup = search_scales(a, rhs, scales[rs], None if supers is None else supers[rs])
        scales[rs] = sc
        if supers is not None:
            supers[rs] = sup
        new[rs] = g * np.repeat(sc.astype(np.float64), block, axis=1)
    refitted = np.asarray(_core.quantize(type, block, new, scales_from=scales, super_from=supers))
    decoded = _core.dequantize(type, block, refitted, rows, cols)
    if not np.allclose(decoded, new, rtol=1e-6, atol=1e-6 * float(np.abs(new).max(initial=0.0))):
        raise RuntimeError(f"the refit {type} bytes do not decode to the values it chose")  # a bug, not bad input
    return refitted


def normal_equations(w: np.ndarray, h: np.ndarray, g: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row r, the output error (w_r - sum_b s_b g_rb) H (...)^T = s A_r s - 2 rhs_r s + const of the
    block scales s, g_rb being row r's grid values g in block b and zero elsewhere: A_r = G_r H G_r^T
    (H's cross-block terms included: GPTQ's errors are correlated across blocks), rhs_r = G_r H w_r.
    Returns (A [rows, nb, nb], rhs [rows, nb]), float64."""
    rows, cols = g.shape
    nb = cols // block
    gr = np.asarray(g, np.float64).reshape(rows, nb, block)
    z = np.einsum("rbi,bic->rbc", gr, np.asarray(h, np.float64).reshape(nb, block, cols))  # G_r H
    a = np.einsum("rbcj,rcj->rbc", z.reshape(rows, nb, nb, block), gr)  # G_r H G_r^T
    return a, np.einsum("rbc,rc->rb", z, np.asarray(w, np.float64))


def fitted_scales(a: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """The continuous minimizer of s A s - 2 rhs s per row (the lower bound of what stored scales can
    reach); a relative ridge of 1e-9 keeps an all-zero block solvable (its scale comes out 0)."""
    nb = a.shape[1]
    a = a.copy()
    a[:, np.arange(nb), np.arange(nb)] += (1e-9 * np.trace(a, axis1=1, axis2=2) / nb + 1e-30)[:, None]
    return np.linalg.solve(a, rhs[..., None])[..., 0]


# The super-scales the search starts from besides the bytes' own: the super-block's largest fitted
# scale mapped to ls - 32 = -(32 + k), each followed by REFIT_ROUNDS least-squares refits of the
# super-scales to the chosen ls, each start descended.
SUPER_STARTS = (0.0, 1.0)
REFIT_ROUNDS = 1
SWEEPS = 10  # at most this many coordinate-descent passes over the blocks of a row (it stops when none moves)


def search_scales(a: np.ndarray, rhs: np.ndarray, scales: np.ndarray,
                  supers: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Block scales (float32 [rows, nb], and for a super-block type the f16 super-scales [rows, nb / 8])
    that the bytes can hold, of least output error s A s - 2 rhs s per row (normal_equations), and
    never above that of the bytes' own scales (`scales`, `supers`), which are one of the candidates.
    One f16 scale a block: the continuous optimum rounded to f16 is the other. Super-blocks (iq3):
    from the continuous optimum's super-scales (SUPER_STARTS, REFIT_ROUNDS), the 6-bit ls nearest it,
    then coordinate descent, each block's ls moving by one while that lowers the error (their 6 bits
    cannot hold the continuous optimum: rounding each alone loses what the fit gains). Each row keeps
    its best candidate. A block whose grid values are all 0 keeps scale 0 (it decodes to 0 whatever
    its scale)."""
    from . import _core

    rows, nb = rhs.shape
    diag = a[:, np.arange(nb), np.arange(nb)]
    dead = diag <= 0
    cont = fitted_scales(a, rhs)
    cont[dead] = 0.0

    def error(s):
        return np.einsum("rb,rbc,rc->r", s, a, s) - 2.0 * (rhs * s).sum(axis=1)

    if supers is None:
        found = [np.where(dead, 0.0, np.asarray(scales, np.float64)), cont.astype(np.float16).astype(np.float64)]
        best = np.stack([error(s) for s in found]).argmin(axis=0)
        return np.stack(found)[best, np.arange(rows)].astype(np.float32), None

    per = _core.SUPER_BLOCK // 32  # blocks per super-block (its blocks are 32 wide)
    ns = nb // per
    bias = _core.SUB_SCALE_BIAS

    def descend(s, moves):  # coordinate descent: per block, the move of moves(s, b) that lowers the error most
        s = s.copy()
        grad = np.einsum("rbc,rc->rb", a, s) - rhs
        for _ in range(SWEEPS):
            moved = False
            for b in range(nb):
                best_gain, best_step = np.zeros(rows), np.zeros(rows)
                for cand in moves(s, b):
                    step = np.where(np.isfinite(cand) & ~dead[:, b], cand - s[:, b], 0.0)
                    gain = diag[:, b] * step * step + 2.0 * step * grad[:, b]
                    take = gain < best_gain
                    best_gain[take], best_step[take] = gain[take], step[take]
                if best_step.any():
                    moved = True
                    s[:, b] += best_step
                    grad += a[:, :, b] * best_step[:, None]
            if not moved:
                break
        return s

    def states_from(d, ls):  # (d [rows, ns], ls [rows, nb]) -> block scales
        return np.repeat(d, per, axis=1) * ls

    def codes_for(d):  # ls nearest the continuous optimum under d
        dd = np.repeat(d, per, axis=1)
        ls = np.rint(np.divide(cont, dd, out=np.zeros_like(cont), where=dd != 0))
        return np.where(dead, 0.0, np.clip(ls, -bias, bias - 1))

    def refit_d(ls):  # least-squares super-scales for fixed ls, rounded to f16
        ad = (a * ls[:, :, None] * ls[:, None, :]).reshape(rows, ns, per, ns, per).sum(axis=(2, 4))
        ad[:, np.arange(ns), np.arange(ns)] += 1e-30 + 1e-9 * np.trace(ad, axis1=1, axis2=2)[:, None] / ns
        d = np.linalg.solve(ad, (ls * rhs).reshape(rows, ns, per).sum(axis=2)[..., None])[..., 0]
        return np.asarray(d).astype(np.float16).astype(np.float64)

    results = []  # (d, ls) after descent

    def run(d, ls):  # descent from (d, ls); appends its result, returns its ls
        dd = np.repeat(d, per, axis=1)

        def moves(s, b):  # ls - 32 one up or down, within the 6 bits
            ls_b = np.rint(np.divide(s[:, b], dd[:, b], out=np.zeros(rows), where=dd[:, b] != 0))
            fits = lambda k: (dd[:, b] != 0) & (ls_b + k >= -bias) & (ls_b + k <= bias - 1)  # noqa: E731
            return [np.where(fits(k), s[:, b] + k * dd[:, b], np.nan) for k in (-1.0, 1.0)]

        s = descend(states_from(d, ls), moves)
        ls = np.rint(np.divide(s, dd, out=np.zeros_like(s), where=dd != 0))
        results.append((d, ls))
        return ls

    d_old = np.asarray(supers, np.float64)
    dd_old = np.repeat(d_old, per, axis=1)
    run(d_old, np.rint(np.divide(np.asarray(scales, np.float64), dd_old, out=np.zeros_like(dd_old), where=dd_old != 0)))
    cb = cont.reshape(rows, ns, per)
    smax = np.take_along_axis(cb, np.abs(cb).argmax(axis=2)[..., None], axis=2)[..., 0]
    for k in SUPER_STARTS:
        d = np.asarray(-smax / (bias + k)).astype(np.float16).astype(np.float64)
        ls = run(d, codes_for(d))
        for _ in range(REFIT_ROUNDS):
            d2 = refit_d(ls)
            ok = np.isfinite(d2).all(axis=1, keepdims=True)
            d = np.where(ok, d2, d)
            ls = run(d, codes_for(d))
    errs = np.stack([error(states_from(d, ls)) for d, ls in results])
    best = errs.argmin(axis=0)
    d = np.stack([r[0] for r in results])[best, np.arange(rows)]
    ls = np.stack([r[1] for r in results])[best, np.arange(rows)]
    return (np.repeat(d.astype(np.float32), per, axis=1) * ls.astype(np.float32)), d.astype(np.float32)


def _row_errors(w: np.ndarray, decoded: np.ndarray, h: np.ndarray) -> np.ndarray:
    d = np.asarray(w, np.float64) - decoded
    return ((d @ h) * d).sum(axis=1)


def output_error(w: np.ndarray, decoded: np.ndarray, h: np.ndarray) -> float:
    """sum_t ||(W - W_q) x_t||^2 = trace((W - W_q) H (W - W_q)^T): what GPTQ minimizes."""
    d = np.asarray(w, np.float64) - np.asarray(decoded, np.float64)
    return float(((d @ np.asarray(h, np.float64)) * d).sum())
