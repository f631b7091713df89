"""GPTQ (Frantar et al. 2022, "OPTQ"): quantization with error feedback.

A matrix W [rows, cols] whose inputs x have the Gram matrix H = sum_t x_t x_t^T (upg_backend.calibrate,
gram=True) is quantized column by column, in order: each column's rounding error is spread over the
columns not yet quantized, by the update that changes the layer's outputs W X least (through the upper
Cholesky factor U of the damped H^-1, with lazy batch updates). Each scale group (a block of 32 or 64
columns; 256 for iq4_xs and iq3, whose sub-block scales share a super-scale) has its scales chosen when
it starts, from the error-updated weights, by the type's own importance-weighted search; each column is
rounded by the type's own rounding under them (`_core.round_to_type`). The bytes are the type's ordinary
bytes (`_core.quantize(..., codes_from=)` writes them): readers and kernels do not change. Once the
codes are fixed, the block scales are fitted again to them by least squares over H (refit_scales).

Memory: while H is factored, two float64 matrices of its size and the float32 factor, 20 bytes per
cols^2 at peak besides the caller's H (6.4 GB at Phi-4's 17920-wide down_proj); then the factor and
six float32 matrices of W's size (the loaded weights, four working copies, the decoded check: 4.4 GB
at Phi-4's 35840 x 5120 gate_up_proj). Time: a Cholesky factorization and a triangular inverse of H (cols^3 / 3
each, float64), 2 * rows * cols^2 flops of updates and as many for the scale refit (three float32
matrices of W's size besides W, and chunks of rows of at most 128 MB) (docs/QUANTIZATION.md "GPTQ").
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


class GPTQError(ValueError):
    """The Gram matrix does not fit the matrix, or is not one of real inputs (not positive definite)."""


def scale_group(type: str, block: int) -> int:
    """Columns that share a scale choice: the block, or the 256 of a super-block."""
    return 256 if type in SUPER_BLOCK_TYPES else block


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
        refit: fit the scales again once the codes are fixed (refit_scales).

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
    return refit_scales(w, h, type, block, data, imp) if refit else data


def refit_scales(w: np.ndarray, h: np.ndarray, type: str, block: int, data: np.ndarray,
                 importance: np.ndarray | None = None) -> np.ndarray:
    """The bytes of W in `type` with every block's scale fitted again to the codes `data` holds.

    Per row, the scales that minimize the output error over the codes' grid values (fitted_values).
    The new values lie on the grid under the new scales, and the type's own encoder writes them: its
    scale search finds the scale of values on its grid where it can, and rounds it to the type's
    precision (f16, or 6 bits under an f16 super-scale). A row takes its refit where that lowers its
    output error, and the result is returned only where the written bytes' error is below data's
    (else data itself): on the testbed it lowers iq3's error by 2-8%, rarely iq4_xs's, whose 6-bit
    scales lose what the fit gains.
    """
    from . import _core

    rows, cols = w.shape
    hd = np.asarray(h, np.float64)
    old = _core.dequantize(type, block, data, rows, cols)
    scales = _core.block_scales(type, block, data, rows, cols)
    new = old.copy()
    step = max(1, (1 << 27) // (8 * cols * cols // block))  # rows a chunk: its G H takes at most 128 MB
    for r0 in range(0, rows, step):
        o = old[r0:r0 + step].astype(np.float64)
        unit = np.repeat(scales[r0:r0 + step].astype(np.float64), block, axis=1)
        g = np.divide(o, unit, out=np.zeros_like(o), where=unit != 0)  # the codes' grid values at scale 1
        vals = fitted_values(w[r0:r0 + step], hd, g, block)
        better = _row_errors(w[r0:r0 + step], vals, hd) < _row_errors(w[r0:r0 + step], o, hd)
        new[r0:r0 + step][better] = vals[better]
    refitted = np.asarray(_core.quantize(type, block, new, importance=importance, codes_from=new))
    decoded = _core.dequantize(type, block, refitted, rows, cols)
    return refitted if output_error(w, decoded, hd) < output_error(w, old, hd) else data


def fitted_values(w: np.ndarray, h: np.ndarray, g: np.ndarray, block: int) -> np.ndarray:
    """Per row r, sum_b s_b g_rb with the block scales s minimizing (w_r - sum_b s_b g_rb) H (...)^T,
    g_rb being row r's grid values g in block b and zero elsewhere: nb unknowns a row, the normal
    equations (G H G^T) s = G H w with H's cross-block terms (GPTQ's errors are correlated across
    blocks); a relative ridge of 1e-9 keeps an all-zero block solvable."""
    rows, cols = g.shape
    nb = cols // block
    gr = np.asarray(g, np.float64).reshape(rows, nb, block)
    z = np.einsum("rbi,bic->rbc", gr, np.asarray(h, np.float64).reshape(nb, block, cols))  # G_r H
    a = np.einsum("rbcj,rcj->rbc", z.reshape(rows, nb, nb, block), gr)  # G_r H G_r^T
    rhs = np.einsum("rbc,rc->rb", z, np.asarray(w, np.float64))  # G_r H w_r
    a[:, np.arange(nb), np.arange(nb)] += (1e-9 * np.trace(a, axis1=1, axis2=2) / nb + 1e-30)[:, None]
    return (gr * np.linalg.solve(a, rhs[..., None])).reshape(rows, cols)


def _row_errors(w: np.ndarray, decoded: np.ndarray, h: np.ndarray) -> np.ndarray:
    d = np.asarray(w, np.float64) - decoded
    return ((d @ h) * d).sum(axis=1)


def output_error(w: np.ndarray, decoded: np.ndarray, h: np.ndarray) -> float:
    """sum_t ||(W - W_q) x_t||^2 = trace((W - W_q) H (W - W_q)^T): what GPTQ minimizes."""
    d = np.asarray(w, np.float64) - np.asarray(decoded, np.float64)
    return float(((d @ np.asarray(h, np.float64)) * d).sum())
