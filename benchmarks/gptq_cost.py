"""GPTQ's time and memory on Phi-4's matrix shapes, measured on one matrix and extrapolated.

Times upg_backend.gptq.quantize on a [rows, cols] matrix of random weights with the Gram matrix of
random correlated inputs (the time does not depend on the values), split into its parts: the inverse
factor of H (float64, cols^3), the column loop and lazy updates (rows * cols^2), and the Gram
accumulation of calibration (float64 x^T x per window of n_ctx tokens, tokens * cols^2). Then
scales each part to every matrix of Phi-4 (40 layers of qkv 7680 x 5120, o 5120 x 5120, gate_up
35840 x 5120, down 5120 x 17920) by its exponents.

    python3 benchmarks/gptq_cost.py [--rows 7680] [--cols 5120] [--type iq4_xs] [--tokens 8192]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import numpy as np

from upg_backend import gptq

PHI4 = {"qkv_proj": (7680, 5120), "o_proj": (5120, 5120), "gate_up_proj": (35840, 5120), "down_proj": (5120, 17920)}
LAYERS = 40


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=7680)
    p.add_argument("--cols", type=int, default=5120)
    p.add_argument("--type", default="iq4_xs")
    p.add_argument("--tokens", type=int, default=8192, help="calibration tokens to extrapolate the Gram sums to")
    p.add_argument("--n-ctx", type=int, default=512)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    rows, cols = args.rows, args.cols

    x = (rng.standard_normal((args.n_ctx, cols // 8)) @ rng.standard_normal((cols // 8, cols))
         + rng.standard_normal((args.n_ctx, cols))).astype(np.float32)
    t0 = time.perf_counter()
    x64 = x.astype(np.float64)
    h = x64.T @ x64
    t_gram = time.perf_counter() - t0  # one window
    w = (0.02 * rng.standard_normal((rows, cols))).astype(np.float32)

    t0 = time.perf_counter()
    gptq.inverse_factor(h)
    t_factor = time.perf_counter() - t0
    t0 = time.perf_counter()
    gptq.quantize(w, h, args.type)
    t_total = time.perf_counter() - t0
    t_loop = t_total - t_factor
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    print(f"{platform.machine()} ({os.cpu_count()} cores), {args.type} {rows} x {cols}: Gram of {args.n_ctx} tokens "
          f"{t_gram:.2f} s, inverse factor {t_factor:.1f} s, column loop and updates {t_loop:.1f} s; peak RSS {peak:.2f} GB")
    total_gram = total_factor = total_loop = 0.0
    for name, (r, c) in PHI4.items():
        g = t_gram * (args.tokens / args.n_ctx) * (c / cols) ** 2
        f = t_factor * (c / cols) ** 3
        lp = t_loop * (r / rows) * (c / cols) ** 2
        total_gram, total_factor, total_loop = total_gram + g, total_factor + f, total_loop + lp
        print(f"  {name:13s} {r:5d} x {c:5d}: Gram {g:7.1f} s, factor {f:7.1f} s, loop {lp:7.1f} s; "
              f"H {8 * c * c / 1e9:.2f} GB")
    print(f"Phi-4 ({LAYERS} layers, {args.tokens} tokens): Gram {LAYERS * total_gram / 60:.0f} min, "
          f"factors {LAYERS * total_factor / 60:.0f} min, loops {LAYERS * total_loop / 60:.0f} min; "
          f"all Gram matrices {LAYERS * sum(8 * c * c for _, c in PHI4.values()) / 1e9:.0f} GB (float64)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
