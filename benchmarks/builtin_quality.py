"""Quantization quality of the built-in model at every type -> docs/QUANTIZATION.md (not a test).

The reference is the trained checkpoint (tests/data/builtin-hf) at f32; the text is 200 held-out
conversations (question and expected answer) rendered with the model's chat template. Perplexity is
left out: the questions' random operands are unpredictable by design (the model learned to answer,
not to ask), so it would measure the questions, not the quantization.

    python3 benchmarks/builtin_quality.py [--threads 2]
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import sys
import tempfile
from pathlib import Path

from doc_block import fill
from upg_backend import Llama, calibrate
from upg_backend.convert import convert_hf
from upg_backend.quality import compare_many

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "tests" / "data" / "builtin-hf"
DOC = ROOT / "docs" / "QUANTIZATION.md"
TYPES = ("f16", "q8_0", "q4", "q3")
CALIBRATED = ("q4", "q3")  # also converted with importance from the shipped calibration text


def heldout_text_tokens(llm: Llama, n: int) -> list[int]:
    spec = importlib.util.spec_from_file_location("builtin_training_data", ROOT / "training" / "data.py")
    data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data)
    tokens: list[int] = []
    for messages, answer in data.heldout(n, seed=2):
        text = llm.chat_template.render(messages + [{"role": "assistant", "content": answer}],
                                        add_generation_prompt=False)
        tokens += llm.tokenize(text.encode(), add_bos=False, special=True)
    return tokens


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--conversations", type=int, default=200)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="upg-builtin-quality-") as tmp:
        paths = {t: Path(tmp) / f"{t}.upg" for t in ("f32", *TYPES)}
        for t, path in paths.items():
            convert_hf(CHECKPOINT, path, type=t, progress=False)
        importance = calibrate.collect(paths["f32"], n_threads=args.threads, progress=False)
        for t in CALIBRATED:
            paths[f"{t} + calibration"] = Path(tmp) / f"{t}-calibrated.upg"
            convert_hf(CHECKPOINT, paths[f"{t} + calibration"], type=t, importance=importance, progress=False)
        rows = [t for t in paths if t != "f32"]
        tokens = heldout_text_tokens(Llama(str(paths["f32"]), n_ctx=64), args.conversations)
        reports = compare_many([paths[t] for t in rows], paths["f32"], tokens, n_ctx=512, n_threads=args.threads)
        sizes = {t: paths[t].stat().st_size for t in rows}
    lines = [f"Measured {datetime.date.today().isoformat()}, `python3 benchmarks/builtin_quality.py`: "
             f"{reports[0].n_tokens} predicted tokens of {args.conversations} held-out conversations; reference: "
             f"the checkpoint at f32. Calibration: the text that ships with the package ({importance.n_tokens} "
             f"tokens).",
             "", "| type | file size | mean KLD | p99 KLD | top-1 agreement |", "|---|---:|---:|---:|---:|"]
    for t, r in zip(rows, reports):
        lines.append(f"| `{t}` | {sizes[t] / 2**20:.1f} MiB | {r.mean_kld:.5f} | {r.p99_kld:.4f} | "
                     f"{100 * r.top1_agreement:.1f}% |")
    table = "\n".join(lines)
    print(table)
    fill(DOC, "builtin-quality", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
