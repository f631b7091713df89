"""Two builds of upg-backend on the same models, alternating run by run (not a test).

Each build is a Python whose environment has that build installed (a venv per build). Every
measurement is a fresh process of engine_runner.py (`--engine upg`), in the order A B B A for each
round, so drifts of the shared host's speed fall on both builds alike. Prints, per model, the
median prefill and decode tok/s of each build and the ratio B / A with its range over the rounds.

    python3 benchmarks/ab_builds.py --a BEFORE_VENV/bin/python --b AFTER_VENV/bin/python \\
        --models m1.upg,m2.upg --rounds 3 --threads 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare_llamacpp import RUNNER, _run  # noqa: E402  (the comparison's process runner)


def measure(python: str, model: Path, args: argparse.Namespace, n_vocab: int) -> dict:
    cmd = [python, str(RUNNER), "--engine", "upg", "--mode", "bench", "--model", str(model),
           "--threads", str(args.threads), "--n-ctx", str(args.prompt + args.gen + 256)]
    return _run(cmd, {"seed": 0, "n_vocab": n_vocab, "prompt": args.prompt, "gen": args.gen})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="python of build A (the baseline)")
    ap.add_argument("--b", required=True, help="python of build B")
    ap.add_argument("--models", required=True, help="comma-separated .upg files")
    ap.add_argument("--rounds", type=int, default=3, help="ABBA rounds (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    args = ap.parse_args()
    for name in ("rounds", "threads", "prompt", "gen"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name} must be positive")
    for py in (args.a, args.b):
        if not Path(py).exists():
            ap.error(f"{py} does not exist")
    models = [Path(m) for m in args.models.split(",") if m]
    for m in models:
        if not m.is_file():
            ap.error(f"{m} is not a file")

    from upg_backend.format import UPGFile

    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print("| model | A prefill | B prefill | B/A (range) | A decode | B decode | B/A (range) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model in models:
        n_vocab = UPGFile(model).config.vocab_size
        runs = {"a": [], "b": []}
        for _ in range(args.rounds):
            for build in ("a", "b", "b", "a"):
                runs[build].append(measure(getattr(args, build), model, args, n_vocab))
        cells = []
        for key in ("prefill_tps", "decode_tps"):
            a = [r[key] for r in runs["a"]]
            b = [r[key] for r in runs["b"]]
            # rounds pair A's and B's runs: (a1, b1, b2, a2) gives the pairs (a1, b1), (a2, b2)
            ratios = [y / x for x, y in zip(a, b)]
            cells += [f"{statistics.median(a):.1f}", f"{statistics.median(b):.1f}",
                      f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"]
        print(f"| {model.name} | " + " | ".join(cells) + " |", flush=True)
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
