"""Quantization quality on the testbed, ours and llama.cpp's measured the same way -> docs/QUANTIZATION.md.

As llama-perplexity measures it: the evaluation text is cut into windows of --n-ctx (512) tokens, each
run from an empty context, and the second half of each window is scored: KL(P_f32 || P_quantized)
of the next-token distributions, in nats. Both engines get the same token ids (our tokenizer's), and
every number comes from upg_backend.quality.Scorer. Each quantized file is measured against the f32
model run by the same engine (our f32 .upg; llama.cpp's F32 GGUF, through llama-cpp-python in the
peer venv, benchmarks/peer_logits.py); the row "llama.cpp F32" is llama.cpp's f32 against ours: how
far the two references are apart. All models run in lock step, window by window, so nothing is kept.

Bits per weight count the stored bytes of the transformer blocks' matrices only; the embedding and
output matrix are 8-bit on both sides (llama-quantize --token-embedding-type q8_0
--output-tensor-type q8_0; our recipes store them as q8_0).

    python3 benchmarks/testbed_quality.py --testbed DIR --gguf TESTBED-F32.gguf \\
        [--llama-cpp-bin $LLAMA_CPP_BIN] [--peer-python $PEER_VENV/bin/python] [--max-windows N] \\
        [--only NAME ...] [--doc]

DIR is the testbed checkpoint (or $UPG_TESTBED) with its dev.txt; TESTBED-F32.gguf its f32 GGUF
(docs/QUANTIZATION.md says how to make it). llama.cpp's imatrix is computed by llama-imatrix from
the calibration text that ships with the package (the one our calibration uses), not dev.txt.
Files are cached in --work-dir (llama.cpp's by name; ours are rewritten each run). Calibration runs
once, with the Gram matrices GPTQ's rows need (upg_backend.gptq); the other calibrated rows use its
importance, saved and reloaded as --importance would.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from doc_block import fill
from upg_backend import calibrate
from upg_backend.convert import convert_hf
from upg_backend.format import UPGFile
from upg_backend.quality import Scorer, log_softmax, nll, window_logits
from upg_backend.recipes import EMBED, LM_HEAD, Recipe
from upg_backend.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "QUANTIZATION.md"
PEER_LOGITS = ROOT / "benchmarks" / "peer_logits.py"
LLAMA_TYPES = ("Q4_K_M", "IQ4_XS", "Q4_0", "Q3_K_M", "IQ3_S", "IQ3_XXS")
EIGHT_BIT_ENDS = ((EMBED, "q8_0"), (LM_HEAD, "q8_0"))
# name -> (recipe or --bpw budget, calibration: None, "importance" (importance-weighted rounding) or
# "gptq" (GPTQ error feedback with the Gram matrices of the same calibration run))
_Q4, _Q3 = Recipe("q4", "q4", 32, EIGHT_BIT_ENDS), Recipe("q3", "q3", 32, EIGHT_BIT_ENDS)
_IQ4_XS, _IQ3 = Recipe("iq4_xs", "iq4_xs", 32, EIGHT_BIT_ENDS), Recipe("iq3", "iq3", 32, EIGHT_BIT_ENDS)
OURS = {
    "q4": (_Q4, None),
    "q4 + calibration": (_Q4, "importance"),
    "q4 + GPTQ": (_Q4, "gptq"),
    "q3": (_Q3, None),
    "q3 + calibration": (_Q3, "importance"),
    "q3 + GPTQ": (_Q3, "gptq"),
    "q4/64 + calibration": (Recipe("q4/64", "q4", 64, EIGHT_BIT_ENDS), "importance"),
    "iq4_xs + calibration": (_IQ4_XS, "importance"),
    "iq4_xs + GPTQ": (_IQ4_XS, "gptq"),
    "iq3 + calibration": (_IQ3, "importance"),
    "iq3 + GPTQ": (_IQ3, "gptq"),
    "--bpw 4.25": (4.25, "importance"),
    "--bpw 4.25 --gptq": (4.25, "gptq"),
    "--bpw 3.25": (3.25, "importance"),
    "--bpw 3.25 --gptq": (3.25, "gptq"),
}


def block_bpw_gguf(path: Path) -> float:
    from gguf import GGUFReader

    ts = [t for t in GGUFReader(str(path)).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return 8 * sum(int(t.n_bytes) for t in ts) / sum(int(t.n_elements) for t in ts)


def block_bpw_upg(path: Path) -> float:
    ts = UPGFile(path).tensors
    mats = [t for n, t in ts.items() if n.startswith("model.layers.") and len(t.dims) == 2]
    nbytes = sum(t.nbytes for n, t in ts.items() if n.startswith("model.layers.") and
                 (len(t.dims) == 2 or ".outlier_" in n))
    return 8 * nbytes / sum(t.n_elements for t in mats)


def peer_stream(python: str, model: Path, windows_path: Path, first: int, n_ctx: int, n_vocab: int,
                threads: int) -> Iterator[np.ndarray]:
    """llama.cpp's logits of positions first.. of every window, read from peer_logits.py as it writes them."""
    proc = subprocess.Popen([python, str(PEER_LOGITS), str(model), str(windows_path), str(first), str(threads)],
                            stdout=subprocess.PIPE)
    n = (n_ctx - first) * n_vocab * 4
    try:
        while True:
            buf = proc.stdout.read(n)
            if not buf:
                break
            if len(buf) != n:
                raise RuntimeError(f"{model.name}: llama.cpp's logits ended mid-window")
            yield np.frombuffer(buf, np.float32).reshape(n_ctx - first, n_vocab)
    finally:
        proc.stdout.close()
        if proc.wait() != 0:
            raise RuntimeError(f"{model.name}: peer_logits.py exited with status {proc.returncode}")


def llama_files(args: argparse.Namespace) -> dict[str, Path]:
    """llama.cpp's quantized files (made once): the imatrix from the shipped calibration text."""
    bin_ = Path(args.llama_cpp_bin)
    imatrix = args.work_dir / "imatrix.gguf"
    if not imatrix.is_file():
        subprocess.run([str(bin_ / "llama-imatrix"), "-m", str(args.gguf), "-f", str(calibrate.DEFAULT_TEXT),
                        "-o", str(imatrix), "-c", str(args.n_ctx), "-t", str(args.threads)],
                       check=True, capture_output=True)
    out = {}
    for t in LLAMA_TYPES:
        path = args.work_dir / f"testbed-{t}.gguf"
        if not path.is_file():
            subprocess.run([str(bin_ / "llama-quantize"), "--imatrix", str(imatrix), "--token-embedding-type", "q8_0",
                            "--output-tensor-type", "q8_0", str(args.gguf), str(path), t, str(args.threads)],
                           check=True, capture_output=True)
        out[t] = path
    return out


def our_files(args: argparse.Namespace, ref: Path) -> dict[str, tuple[Path, float]]:
    """Our files and the seconds each conversion took (calibration measured once, reused: the
    importance through its file, as --importance reuses it; the Gram matrices in memory)."""
    imp_path = args.work_dir / "testbed.importance.safetensors"
    t0 = time.perf_counter()
    imp = calibrate.collect(ref, n_threads=args.threads, progress=False, gram=True)
    imp.save(imp_path)
    print(f"calibration: {imp.n_tokens} tokens in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    out = {}
    for name, (how, calibration) in OURS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        path = args.work_dir / ("ours-" + "".join(c if c.isalnum() or c == "." else "-" for c in name) + ".upg")
        t0 = time.perf_counter()
        kw = {"importance": imp if calibration == "gptq" else
              calibrate.Importance.load(imp_path) if calibration else None}
        if isinstance(how, Recipe):
            convert_hf(args.testbed, path, recipe=how, progress=False, **kw)
        else:
            convert_hf(args.testbed, path, bpw=how, progress=False, **kw)
        out[name] = (path, time.perf_counter() - t0)
        print(f"{name}: converted in {out[name][1]:.1f}s", file=sys.stderr)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--testbed", type=Path, default=os.environ.get("UPG_TESTBED"),
                   help="the testbed checkpoint directory, with dev.txt (default: $UPG_TESTBED)")
    p.add_argument("--gguf", type=Path, required=True, help="the testbed as an f32 GGUF")
    p.add_argument("--llama-cpp-bin", default=os.environ.get("LLAMA_CPP_BIN"),
                   help="folder of llama-imatrix and llama-quantize (default: $LLAMA_CPP_BIN)")
    p.add_argument("--peer-python", default=os.path.join(os.environ.get("PEER_VENV", ""), "bin", "python"),
                   help="python of the venv with llama-cpp-python (default: $PEER_VENV/bin/python)")
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "upg-testbed")
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    p.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                   help="measure only our rows whose name contains one of these (llama.cpp's rows always)")
    p.add_argument("--doc", action="store_true", help="write the table into docs/QUANTIZATION.md")
    args = p.parse_args()
    if args.testbed is None or not (args.testbed / "dev.txt").is_file():
        sys.exit("pass --testbed DIR (or set UPG_TESTBED): the testbed checkpoint with its dev.txt")
    if not args.llama_cpp_bin:
        sys.exit("pass --llama-cpp-bin (or set LLAMA_CPP_BIN)")
    args.work_dir.mkdir(parents=True, exist_ok=True)

    ref = args.work_dir / "ours-f32.upg"
    convert_hf(args.testbed, ref, type="f32", progress=False)
    header = UPGFile(ref).header
    tokens = np.asarray(Tokenizer(header["tokenizer"], header["tokenizer_config"]).encode(
        (args.testbed / "dev.txt").read_text(encoding="utf-8")), np.int32)
    n_ctx, first = args.n_ctx, args.n_ctx // 2
    windows = tokens[:len(tokens) // n_ctx * n_ctx].reshape(-1, n_ctx)[:args.max_windows]
    windows_path = args.work_dir / "windows.npy"
    np.save(windows_path, windows)
    n_vocab = header["config"]["vocab_size"]

    lfiles = llama_files(args)
    ofiles = our_files(args, ref)
    peer = lambda path: peer_stream(args.peer_python, path, windows_path, first, n_ctx, n_vocab, 1)  # noqa: E731
    ours_ref = window_logits(ref, list(windows), args.threads, first=first)
    llama_ref = peer(args.gguf)
    ours = {name: window_logits(path, list(windows), args.threads, first=first) for name, (path, _) in ofiles.items()}
    llamas = {t: peer(path) for t, path in lfiles.items()}
    scorers = {name: Scorer() for name in ["llama.cpp F32", *ofiles, *lfiles]}
    nll_ours, nll_llama = [], []
    t0 = time.perf_counter()
    for i, w in enumerate(windows):
        nxt = w[first + 1:]
        lp_ours = log_softmax(next(ours_ref)[:-1])
        lp_llama = log_softmax(next(llama_ref)[:-1])
        nll_ours.append(nll(lp_ours, nxt))
        nll_llama.append(nll(lp_llama, nxt))
        scorers["llama.cpp F32"].add(lp_ours, np.asarray(lp_llama), nxt)
        for name, run in ours.items():
            scorers[name].add(lp_ours, next(run)[:-1], nxt)
        for t, run in llamas.items():
            scorers[t].add(lp_llama, next(run)[:-1], nxt)
        print(f"\rwindow {i + 1}/{len(windows)} {time.perf_counter() - t0:.0f}s", end="", file=sys.stderr)
    print(file=sys.stderr)
    for run in [llama_ref, *llamas.values()]:  # let the peers exit
        for _ in run:
            pass

    rows = [("llama.cpp F32 (against ours f32)", 32.0, scorers["llama.cpp F32"].report(np.concatenate(nll_ours)))]
    for t, path in lfiles.items():
        rows.append((f"llama.cpp {t} + imatrix", block_bpw_gguf(path), scorers[t].report(np.concatenate(nll_llama))))
    for name, (path, secs) in ofiles.items():
        rows.append((f"ours {name}", block_bpw_upg(path), scorers[name].report(np.concatenate(nll_ours))))
    rows.sort(key=lambda r: -r[1])
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {platform.machine()} ({os.cpu_count()} cores), "
        f"`python3 benchmarks/testbed_quality.py --testbed TESTBED --gguf TESTBED-F32.gguf"
        f"{f' --max-windows {args.max_windows}' if args.max_windows else ''}`: "
        f"{len(windows)} windows of {n_ctx} tokens of dev.txt, {rows[0][2].n_tokens} scored tokens; "
        f"perplexity of the f32 model {rows[0][2].reference_perplexity:.3f} (ours), "
        f"{scorers[LLAMA_TYPES[0]].report(np.concatenate(nll_llama)).reference_perplexity:.3f} (llama.cpp).",
        "",
        "| file | block bits per weight | mean KLD | p99 KLD | perplexity | top-1 agreement |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, bpw, r in rows:
        lines.append(f"| {name} | {bpw:.2f} | {r.mean_kld:.4f} | {r.p99_kld:.4f} | {r.perplexity:.3f} | "
                     f"{100 * r.top1_agreement:.1f}% |")
    choices = {name: UPGFile(path).header.get("allocation") for name, (path, _) in ofiles.items()}
    for name, alloc in choices.items():
        if alloc:
            counts: dict[str, int] = {}
            for c in alloc["choices"].values():
                counts[c] = counts.get(c, 0) + 1
            lines.append(f"\n`{name}` chose: " + ", ".join(f"{n} {c}" for c, n in sorted(counts.items())) +
                         " (matrices per type/block).")
    table = "\n".join(lines)
    print(table)
    if args.doc:
        fill(DOC, "testbed-table", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
