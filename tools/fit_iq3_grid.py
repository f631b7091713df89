"""Fits iq3's 8-value grid (cpp/upg/upg_common.h's UPG_IQ3_GRID) to a checkpoint's weights.

Lloyd iterations over blocks of 32 weights sampled from every transformer-block matrix: each block
takes the signed scale (either end of the grid at its largest element, +-30%, then least squares)
with the least squared error, then each grid value moves to the scale-weighted mean of the
normalized weights it holds. Prints the error relative to sum(w^2) per iteration, the grid rounded
to int8, and the same error for the uniform grid -4..3 (what q3 uses) for comparison.

    python tools/fit_iq3_grid.py CHECKPOINT_DIR   # a Hugging Face safetensors checkpoint
"""
import glob
import sys

import numpy as np
from safetensors.torch import load_file


def sample_blocks(path, per_tensor=4000, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for f in sorted(glob.glob(f"{path}/*.safetensors")):
        for name, t in load_file(f).items():
            if ".layers." in name and t.ndim == 2:
                a = t.float().numpy().reshape(-1, 32)
                out.append(a[rng.choice(len(a), min(len(a), per_tensor), replace=False)])
    return np.concatenate(out)


def assign(x, s, grid):
    return np.searchsorted((grid[1:] + grid[:-1]) / 2, x / s[:, None])


def fit_scales(x, grid):
    """Per block: the scale with the least squared error, and that error."""
    best, scale = np.full(len(x), np.inf), np.zeros(len(x))
    m = x[np.arange(len(x)), np.abs(x).argmax(1)]
    for end in (grid[0], grid[-1]):
        for k in np.linspace(-0.3, 0.3, 25):
            s = m / end * (1 + k)
            s = np.where(s == 0, 1e-12, s)
            q = grid[assign(x, s, grid)]
            s = (x * q).sum(1) / np.maximum((q * q).sum(1), 1e-30)
            s = np.where(s == 0, 1e-12, s)
            err = ((x - s[:, None] * grid[assign(x, s, grid)]) ** 2).sum(1)
            better = err < best
            best[better], scale[better] = err[better], s[better]
    return scale, best


def main():
    x = sample_blocks(sys.argv[1])
    grid = np.array([-1, -0.64, -0.37, -0.13, 0.1, 0.32, 0.56, 0.85])
    total = (x ** 2).sum()
    for it in range(12):
        s, err = fit_scales(x, grid)
        idx = assign(x, s, grid)
        z, wt = x / s[:, None], np.broadcast_to((s * s)[:, None], x.shape)
        grid = np.sort([(z * wt)[idx == v].sum() / wt[idx == v].sum() for v in range(8)])
        grid = grid / (-grid[0] if abs(grid[0]) >= abs(grid[-1]) else grid[-1])
        print(it, err.sum() / total, np.round(grid * 127).astype(int).tolist())
    print("int8 grid", fit_scales(x, np.round(grid * 127) / 127)[1].sum() / total)
    print("uniform -4..3", fit_scales(x, np.arange(-4, 4) / 4.0)[1].sum() / total)


if __name__ == "__main__":
    main()
