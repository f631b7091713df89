"""Writes upg_backend/data/calibration.txt, the text `upg convert` calibrates with by default.

The text is the project's own writing (MIT, as the package): its README and docs, the essay
benchmarks/data/river.txt (CC0), and its Python source, in that order, cut at a line boundary at
LIMIT characters. Prose and code both, as Phi models are asked for both. Rerun to refresh it:

    python3 tools/make_calibration_text.py
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "upg_backend" / "data" / "calibration.txt"
LIMIT = 400_000  # characters; the size of llama.cpp imatrix runs of issue #15's table
SOURCES = ["README.md", "docs/*.md", "benchmarks/data/river.txt", "upg_backend/*.py", "training/*.py"]


def main() -> None:
    parts, size = [], 0
    for pattern in SOURCES:
        for path in sorted(ROOT.glob(pattern)):
            for line in path.read_text(encoding="utf-8").splitlines(keepends=True) + ["\n"]:
                if size + len(line) > LIMIT:
                    OUT.write_text("".join(parts), encoding="utf-8")
                    return
                parts.append(line)
                size += len(line)
    OUT.write_text("".join(parts), encoding="utf-8")


if __name__ == "__main__":
    main()
