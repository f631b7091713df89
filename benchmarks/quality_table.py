"""Quantization quality of SmolLM2-135M-Instruct for every type and recipe -> docs/QUANTIZATION.md.

The reference is the GGUF (Q4_1) dequantized to f32; each recipe converts that same GGUF, so the
table measures what our quantization adds on top of the file's own. Measured with upg_backend.quality
on benchmarks/data/river.txt in windows of --n-ctx tokens.

    python3 benchmarks/quality_table.py [--gguf PATH] [--n-ctx 512] [--threads 2]

The GGUF is looked up in $UPG_TEST_CACHE or ~/.cache/upg-test (where tests/test_gguf.py puts it).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from doc_block import fill
from upg_backend import calibrate
from upg_backend.format import UPGFile, iter_model_tensors
from upg_backend.gguf_source import convert_gguf
from upg_backend.quality import compare_many
from upg_backend.recipes import RECIPES
from upg_backend.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "QUANTIZATION.md"
TEXT = ROOT / "benchmarks" / "data" / "river.txt"
VARIANTS = ("f16", "q8_0", "q4", "q4-mixed", "q3", "q3-mixed", "q3-outliers")
CALIBRATED = ("q4", "q4-mixed", "q3", "q3-mixed")  # also with importance from the shipped calibration text


def main() -> int:
    cache = Path(os.environ.get("UPG_TEST_CACHE") or Path.home() / ".cache" / "upg-test")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, default=cache / "SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if not args.gguf.is_file():
        sys.exit(f"{args.gguf} not found: run tests/test_gguf.py once to fetch it, or pass --gguf")

    rows = []
    with tempfile.TemporaryDirectory(prefix="upg-quality-") as tmp:
        ref = Path(tmp) / "f32.upg"
        convert_gguf(args.gguf, ref, type="f32", progress=False)
        header = UPGFile(ref).header
        tokens = Tokenizer(header["tokenizer"], header["tokenizer_config"]).encode(TEXT.read_text(encoding="utf-8"))
        importance = calibrate.collect(ref, n_threads=args.threads, progress=False)
        files = []
        for name, calibrated in [(v, False) for v in VARIANTS] + [(v, True) for v in CALIBRATED]:
            out = Path(tmp) / f"{name}{'-calibrated' if calibrated else ''}.upg"
            convert_gguf(args.gguf, out, recipe=name, progress=False, importance=importance if calibrated else None)
            name = name + " + calibration" if calibrated else name
            upg = UPGFile(out)
            weights = sum(t.n_elements for t in iter_model_tensors(upg))
            files.append((name, 8 * sum(t.nbytes for t in upg.tensors.values()) / weights, upg.file_size, out))
        t0 = time.perf_counter()
        reports = compare_many([f[3] for f in files], ref, tokens, n_ctx=args.n_ctx, n_threads=args.threads)
        print(f"measured in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        rows = [(name, RECIPES[name.split(" ")[0]], bpw, size, r) for (name, bpw, size, _), r in zip(files, reports)]

    ref_ppl = rows[0][4].reference_perplexity
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {platform.machine()} ({os.cpu_count()} cores), "
        f"`python3 benchmarks/quality_table.py --n-ctx {args.n_ctx}`: SmolLM2-135M-Instruct from "
        f"`{args.gguf.name}`, {rows[0][4].n_tokens} predicted tokens of `benchmarks/data/river.txt`. "
        f"Reference (the GGUF dequantized to f32) perplexity: {ref_ppl:.3f}. \"+ calibration\": importance "
        f"measured on the text that ships with the package ({importance.n_tokens} tokens).",
        "",
        "| recipe | default / block | overrides | outliers | bits per weight | file size | mean KLD | p99 KLD | perplexity | top-1 agreement |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rec, bpw, size, r in rows:
        overrides = ", ".join(f"`{g}` {t}" for g, t in rec.overrides) or "-"
        block = f" / {rec.block}" if rec.quantized else ""
        label = f"`{name.split(' ')[0]}`" + (" + calibration" if " " in name else "")
        lines.append(f"| {label} | {rec.default}{block} | {overrides} | {rec.outliers:g} | {bpw:.3f} | "
                     f"{size / 2**20:.1f} MiB | {r.mean_kld:.5f} | {r.p99_kld:.4f} | {r.perplexity:.3f} | "
                     f"{100 * r.top1_agreement:.1f}% |")
    table = "\n".join(lines)
    print(table)
    fill(DOC, "quality-table", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
