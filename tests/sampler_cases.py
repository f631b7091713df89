"""Random sampler cases for the split sampler's tests (tests/test_sampler_split.py, and on the GPU
tests/gpu/test_cuda_sampler.py): logits rows full of ties, bans, NaN and signed zeros, and random
params, histories and biases."""
from __future__ import annotations

import numpy as np

from upg_backend import _core


def random_row(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 [n]: normal, few-valued (ties) or constant, with -inf, NaN, +-0 and the odd +inf."""
    kind = rng.integers(4)
    if kind == 0:
        row = rng.standard_normal(n) * 3
    elif kind == 1:
        row = rng.integers(-3, 4, n).astype(np.float64)
    elif kind == 2:
        row = np.round(rng.standard_normal(n), 1)
    else:
        row = np.full(n, 1.5)
    row = row.astype(np.float32)
    u = rng.random(n)
    row[u < 0.05] = -np.inf
    row[(u >= 0.05) & (u < 0.06)] = np.nan
    row[(u >= 0.06) & (u < 0.08)] = 0.0
    row[(u >= 0.08) & (u < 0.10)] = -0.0
    if rng.random() < 0.05:
        row[rng.integers(n)] = np.inf
    return row


def random_params(rng: np.random.Generator, n: int) -> _core.SamplingParams:
    """Mostly cuts a backend's top_k takes (greedy, or top_k in [1, MAX_TOP_K]), some it does not."""
    p = _core.SamplingParams()
    p.temperature = 0.0 if rng.random() < 0.2 else float(rng.uniform(0.1, 2.0))
    p.top_k = int(rng.choice([1, 2, 3, 10, 40, _core.MAX_TOP_K, n, 0, _core.MAX_TOP_K + 1]))
    p.top_p = float(rng.choice([1.0, 0.95, 0.5]))
    p.min_p = float(rng.choice([0.0, 0.05, 0.3]))
    p.typical_p = float(rng.choice([1.0, 1.0, 0.7]))
    p.repeat_penalty = float(rng.choice([1.0, 1.3, 0.8]))
    p.presence_penalty = float(rng.choice([0.0, 0.5]))
    p.frequency_penalty = float(rng.choice([0.0, 0.3, -0.2]))
    p.penalty_last_n = int(rng.choice([-1, 0, 8, 64]))
    ids = rng.choice(n, size=min(n, int(rng.integers(0, 6))), replace=False)
    p.logit_bias = {int(t): float(rng.choice([-np.inf, -2.0, 0.0, 0.5, 30.0])) for t in ids}
    return p


def random_history(rng: np.random.Generator, n: int) -> np.ndarray:
    """int32 token ids, a few of them outside [0, n) (the penalties ignore those)."""
    return rng.integers(-2, n + 2, int(rng.integers(0, 100))).astype(np.int32)


def reference_top_k(row: np.ndarray, k: int, skip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The k best drawable floats of row by value descending then id ascending, skip left out:
    (ids padded with -1, their floats)."""
    ids = np.arange(len(row))
    keep = (row > -np.inf) & ~np.isin(ids, skip)  # NaN fails the comparison
    ids = ids[keep]
    order = np.lexsort((ids, -row[keep].astype(np.float64)))[:k]
    best = ids[order]
    return np.concatenate([best, np.full(k - len(best), -1)]).astype(np.int32), row[best]


def sampled_steps(step, first: int, prompt: np.ndarray, n: int = 60) -> list[int]:
    """n tokens of a sampling loop from `first` after `prompt`: step(token, history) evaluates the
    token and returns the next (eval + sample, or eval_sample), the history ending with the token."""
    tok, ids, out = first, list(prompt), []
    for _ in range(n):
        ids.append(tok)
        tok = step(tok, np.array(ids, np.int32))
        out.append(tok)
    return out
