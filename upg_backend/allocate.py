"""Bit allocation: per-tensor types for the transformer blocks' matrices within a bits-per-weight budget.

Each block matrix is quantized (on a sample of its rows) at every candidate of CANDIDATES with its
calibration importance, and its sensitivity to a candidate is the relative output noise that
candidate leaves: sum_c imp_c * sum_r (w - w_q)^2 over sum_c imp_c * sum_r w^2, the expected
||(W - W_q) x||^2 / ||W x||^2 for inputs whose column c has mean square imp_c. With the Gram
matrices H of the inputs (--gptq), it is that ratio itself, tr(E H E^T) / tr(W H W^T) with
E = W - W_q and W_q what GPTQ writes for the candidate (one factor of H per matrix, shared by the
candidates). Starting from the cheapest candidate
everywhere, the upgrade that removes the most noise per added bit is taken (along each matrix's
lower convex hull of bits against noise) while the blocks' matrices stay within the budget
(docs/QUANTIZATION.md "Bit allocation"). The embedding and the output matrix are outside the budget,
as the table of issue #15 counts bits: they keep the type the base recipe gives them.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Callable, Mapping, Sequence

import numpy as np

from .format import tensor_nbytes

BLOCK_MATRICES = "model.layers.*"  # the matrices whose bits the budget counts


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A storage choice for a block matrix: a quantized type and its block."""

    type: str
    block: int

    @property
    def name(self) -> str:
        return f"{self.type}/{self.block}"


# What --bpw chooses among. A new quantized type joins bit allocation by a line here.
CANDIDATES: tuple[Candidate, ...] = (
    Candidate("q3", 64), Candidate("q3", 32), Candidate("iq3", 32), Candidate("q4", 64), Candidate("q4", 32),
    Candidate("iq4_xs", 32), Candidate("iq4_nl", 32), Candidate("q8_0", 32),
)


def fits(c: Candidate, shape: Sequence[int]) -> bool:
    """Whether a matrix of this shape can be stored as c (its block, and a super-block type's 256)."""
    try:
        tensor_nbytes(c.type, shape, c.block)
    except ValueError:
        return False
    return shape[1] % c.block == 0

GRAM_METHOD = "relative output noise tr(E H E^T) / tr(W H W^T) of GPTQ's result, greedy over convex hulls"
SAMPLE_ROWS = 512  # rows of each matrix the noise is measured on (rows quantize independently)


def is_block_matrix(name: str, shape: Sequence[int]) -> bool:
    return len(shape) == 2 and fnmatch.fnmatchcase(name, BLOCK_MATRICES)


def output_noise(w: np.ndarray, wq: np.ndarray, h: np.ndarray | None = None,
                 importance: np.ndarray | None = None) -> float:
    """The relative output noise of wq in place of w: with the Gram matrix h of the inputs,
    tr(E H E^T) / tr(W H W^T), E = W - W_q; without, its diagonal with the importance (None:
    uniform), sum_c imp_c sum_r e^2 over sum_c imp_c sum_r w^2."""
    from . import gptq

    if h is not None:
        return gptq.output_error(w, wq, h) / max(gptq.output_error(w, np.zeros_like(w), h), 1e-30)
    w64 = np.asarray(w, np.float64)
    imp = np.ones(w64.shape[1]) if importance is None else np.asarray(importance, np.float64)
    err = ((np.asarray(wq, np.float64) - w64) ** 2).sum(axis=0)
    return float((imp * err).sum() / max((imp * (w64 ** 2).sum(axis=0)).sum(), 1e-30))


def relative_noise(w: np.ndarray, importance: np.ndarray | None, cand: Candidate) -> float:
    """output_noise of w stored as cand by importance-weighted rounding, without the Gram matrix."""
    from . import _core

    w = np.ascontiguousarray(w, np.float32)
    data = np.asarray(_core.quantize(cand.type, cand.block, w, importance=importance))
    return output_noise(w, _core.dequantize(cand.type, cand.block, data, *w.shape), None, importance)


def gptq_noise(w: np.ndarray, h: np.ndarray, importance: np.ndarray | None, cand: Candidate,
               factor: np.ndarray) -> float:
    """output_noise over H of w stored as cand by GPTQ (gptq.quantize with the matrix's shared
    inverse factor; plain rounding for a type GPTQ does not write): the relative output error over
    the calibration inputs."""
    from . import _core, gptq

    w = np.ascontiguousarray(w, np.float32)
    if cand.type in gptq.TYPES:
        data = gptq.quantize(w, h, cand.type, cand.block, importance, factor=factor)
    else:  # a type GPTQ does not write is rounded plainly, as the writer does
        data = _core.quantize(cand.type, cand.block, w, importance=importance)
    return output_noise(w, _core.dequantize(cand.type, cand.block, data, *w.shape), h)


def sample_rows(rows: int, n: int = SAMPLE_ROWS) -> np.ndarray | None:
    """The rows of a matrix the noise is measured on: n evenly spaced ones (None: all)."""
    return None if rows <= n else np.linspace(0, rows - 1, n).astype(np.int64)


def _hull(points: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """The lower convex hull of (bits, noise, candidate) points, by increasing bits: the choices worth
    making (a candidate that costs more and removes less noise per bit than a neighbour is skipped)."""
    pts = sorted(points)
    pruned = []
    for p in pts:  # keep strictly decreasing noise as bits grow
        if not pruned or p[1] < pruned[-1][1]:
            if pruned and p[0] == pruned[-1][0]:
                pruned.pop()
            pruned.append(p)
    hull: list[tuple[float, float, int]] = []
    for p in pruned:
        while len(hull) >= 2:
            (b0, n0, _), (b1, n1, _) = hull[-2], hull[-1]
            if (n1 - n0) * (p[0] - b0) >= (p[1] - n0) * (b1 - b0):  # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


@dataclasses.dataclass(frozen=True)
class Allocation:
    """What allocate chose.

    Attributes:
        choices: block matrix name -> candidate.
        bpw: bits per weight the blocks' matrices average (their stored bytes, padding included).
        budget: the budget asked for.
        noise: matrix name -> relative noise of the chosen candidate.
        method: how the noise was measured and the choice made (the header's `method`).
    """

    choices: Mapping[str, Candidate]
    bpw: float
    budget: float
    noise: Mapping[str, float]
    method: str = "importance-weighted relative output noise, greedy over convex hulls"

    def header(self) -> dict:
        """The header's `allocation` object (FORMAT.md)."""
        return {"bpw": self.budget, "block_bits_per_weight": round(self.bpw, 4), "method": self.method,
                "choices": {name: c.name for name, c in self.choices.items()}}


def allocate(matrices: Sequence[tuple[str, tuple[int, int], Callable[[], np.ndarray]]],
             importance: Callable[[str, int], np.ndarray | None], bpw: float,
             candidates: Sequence[Candidate] = CANDIDATES, n_sample: int = SAMPLE_ROWS,
             progress: Callable[[int], None] | None = None, gram: Mapping[str, np.ndarray] | None = None) -> Allocation:
    """Chooses a candidate for every block matrix so that they average at most `bpw` bits per weight.

    Args:
        matrices: (name, shape, load) of the block matrices; load returns the float32 values, all of
            them or only the rows sample_rows(rows, n_sample) names.
        importance: (name, cols) -> the matrix's per-column importance, or None (uniform).
        bpw: the budget, bits per weight over these matrices.
        candidates: the choices (one that cannot hold a matrix's width is skipped for it: fits).
        n_sample: rows of each matrix the noise is measured on.
        progress: called with each matrix's element count once it is measured.
        gram: name -> the Gram matrix of the matrix's inputs (calibrate.collect(..., gram=True)): the
            matrices it covers are measured as GPTQ writes them (gptq_noise), the others by
            relative_noise.

    Raises:
        ValueError: the budget is below what the cheapest candidates cost.
    """
    from . import gptq

    if not matrices:
        raise ValueError("no block matrices to allocate bits to")
    points_of, n_weights = {}, 0
    for name, shape, load in matrices:
        rows, cols = shape
        w = np.asarray(load(), np.float32)
        if w.shape[0] == rows and (idx := sample_rows(rows, n_sample)) is not None:
            w = w[idx]
        imp = importance(name, cols)
        h = None if gram is None else gram.get(name)
        if h is None:
            noise = lambda c: relative_noise(w, imp, c)  # noqa: E731
        else:  # one factor of H for every candidate
            try:
                factor = gptq.inverse_factor(h)
            except gptq.GPTQError as e:
                raise gptq.GPTQError(f"{name}: {e}") from None
            noise = lambda c: gptq_noise(w, h, imp, c, factor)  # noqa: E731
        points = [(8.0 * tensor_nbytes(c.type, shape, c.block), noise(c), i)
                  for i, c in enumerate(candidates) if fits(c, shape)]
        if not points:
            raise ValueError(f"{name}: no candidate fits its {cols} columns")
        points_of[name] = points
        n_weights += rows * cols
        if progress:
            progress(rows * cols)
    picked, used = choose(points_of, bpw * n_weights)
    if picked is None:
        raise ValueError(f"--bpw {bpw}: the cheapest candidates already take {used / n_weights:.3f} bits per weight")
    return Allocation({name: candidates[p[2]] for name, p in picked.items()}, used / n_weights, bpw,
                      {name: p[1] for name, p in picked.items()},
                      GRAM_METHOD if gram is not None else Allocation.method)


def choose(points_of: Mapping[str, Sequence[tuple[float, float, int]]], budget_bits: float):
    """Each matrix's point among its (bits, noise, candidate) points so that the bits stay within the
    budget: from the cheapest everywhere, the step along a matrix's lower convex hull that removes the
    most noise per added bit, while one fits. Returns (name -> point, bits used), or (None, the bits
    of the cheapest points) when those do not fit."""
    hulls = {name: _hull(list(points)) for name, points in points_of.items()}
    at = {name: 0 for name in hulls}  # position on each hull
    used = sum(h[0][0] for h in hulls.values())
    if used > budget_bits:
        return None, used
    while True:  # the steepest step that still fits, until none does
        best = None
        for name, h in hulls.items():
            i = at[name]
            if i + 1 < len(h):
                d_bits, d_noise = h[i + 1][0] - h[i][0], h[i][1] - h[i + 1][1]
                if used + d_bits <= budget_bits and (best is None or d_noise / d_bits > best[0]):
                    best = (d_noise / d_bits, name, d_bits)
        if best is None:
            break
        at[best[1]] += 1
        used += best[2]
    return {name: hulls[name][at[name]] for name in hulls}, used


def recipe_for(allocation: Allocation, rest: str = "q8_0", block: int = 32):
    """The recipe that stores the allocation's choices, and every other matrix (the embedding, the
    output matrix) as `rest`."""
    from .recipes import Recipe

    return Recipe(f"bpw-{allocation.budget:g}", rest, block,
                  tuple((name, c.type) for name, c in allocation.choices.items()),
                  blocks=tuple((name, c.block) for name, c in allocation.choices.items() if c.block != block))
