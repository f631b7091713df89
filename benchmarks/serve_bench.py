"""Many clients at once: `upg serve --parallel N` against `llama-server -np N`, same weights, same
prompts, through the OpenAI API (streamed /v1/completions, greedy, end-of-text banned so every
answer runs to max_tokens).

For each model and engine a server starts with N slots (the largest client count), then for each
client count C, C clients send their prompts at once and stream the answers. Per round:

    aggregate   generated tokens after the first of each stream / (last token of any stream -
                first token of the first stream): the decode rate the server sustains
    end to end  all generated tokens / (last token of any stream - the first request sent): what
                the round delivers, prompt evaluation included (a server that streams the first
                answers before the last prompt is read counts the same as one that reads every
                prompt first, which the aggregate favours)
    per stream  the median stream's (tokens - 1) / (its last token - its first token)
    TTFT        time to first token, median and largest (the prompts of later streams wait)

The files come from compare_llamacpp.prepare (cached in --work-dir): `smollm2` is compared as ours
q4 from llama.cpp's Q4_0 file (the same values), `<shape>-q4` as random tiled weights written as a
GGUF Q4_0 and converted. Engines alternate model by model, ours first. Results are printed and, with
--doc, written between the `serve-bench` markers of docs/BENCHMARKS.md.

Example:
    python3 benchmarks/serve_bench.py --llama-server $LLAMA_CPP_BIN/llama-server --threads 2 \\
        --models smollm2,phi-4-q4 --clients 1,4,8,16 --doc docs/BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Distinct prompts (no prefix shared beyond a word or two), repeated to --prompt-words words.
SEEDS = ["The history of the river valley", "A recipe for bread needs", "In the year the comet came",
         "The rules of the card game are", "Our ship left the harbour when", "The theory of heat says",
         "My grandmother kept a garden where", "The city council voted to", "A guide to the mountains:",
         "The machine started to hum and", "Letters from the northern front", "Every morning the baker",
         "The mathematics of voting shows", "Under the old bridge there was", "The orchestra tuned while",
         "A short note on the tides:"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt(i: int, words: int) -> str:
    base = SEEDS[i % len(SEEDS)] + f" (part {i})"
    text = base
    while len(text.split()) < words:
        text += " " + base
    return " ".join(text.split()[:words])


def eos_ids(upg: Path) -> list[int]:
    from upg_backend.llama import Llama

    with Llama(str(upg), n_ctx=16, n_threads=1) as llm:
        return sorted(set(llm._eos_ids))


class Server:
    """A server process on a free port; stops on exit."""

    def __init__(self, cmd: list[str], port: int, log: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 900
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited ({self.proc.returncode}); see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{cmd[0]} did not come up; see {log}")
            time.sleep(0.5)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def stream_one(url: str, body: dict[str, Any], out: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    times = []
    with httpx.Client(timeout=3600) as h, h.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
    out.update(t0=t0, first=times[0], last=times[-1], chunks=len(times))


def round_(url: str, clients: int, args: argparse.Namespace, bias: dict[str, float]) -> dict[str, float]:
    results = [dict() for _ in range(clients)]
    threads = []
    for i in range(clients):
        body = {"prompt": prompt(i, args.prompt_words), "max_tokens": args.gen, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "logit_bias": bias}
        threads.append(threading.Thread(target=stream_one, args=(url, body, results[i])))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tokens = [r.get("tokens", r["chunks"]) for r in results]
    first, last = min(r["first"] for r in results), max(r["last"] for r in results)
    # a stream whose text came in one chunk has no decode span (random weights: pieces of bytes)
    per_stream = [(n - 1) / (r["last"] - r["first"]) for n, r in zip(tokens, results) if r["last"] > r["first"]]
    ttft = [r["first"] - r["t0"] for r in results]
    nan = float("nan")
    return {"aggregate": sum(n - 1 for n in tokens) / (last - first) if last > first else nan,
            "end_to_end": sum(tokens) / (last - min(r["t0"] for r in results)),
            "per_stream": statistics.median(per_stream) if per_stream else nan,
            "ttft": statistics.median(ttft), "ttft_max": max(ttft), "tokens": sum(tokens)}


def commands(engine: str, pair: Any, port: int, slots: int, args: argparse.Namespace) -> list[str]:
    if engine == "ours":
        return [sys.executable, "-m", "upg_backend.cli", "serve", "-m", str(pair.ours), "--backend", "cpu",
                "--port", str(port), "--parallel", str(slots), "--n-ctx", str(args.n_ctx), "--threads",
                str(args.threads), "--queue", "64", *args.ours_args.split()]
    return [args.llama_server, "-m", str(pair.peer), "--port", str(port), "-np", str(slots), "-c",
            str(args.n_ctx * slots), "-t", str(args.threads), "-tb", str(args.threads), "--no-webui",
            *args.peer_args.split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", default=str(Path(os.environ.get("LLAMA_CPP_BIN", ".")) / "llama-server"))
    ap.add_argument("--models", default="smollm2,phi-4-q4")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-words", type=int, default=48)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=512, help="positions per slot")
    ap.add_argument("--engines", default="ours,llama.cpp")
    ap.add_argument("--peer-args", default="", help="more llama-server arguments (e.g. '--poll 0')")
    ap.add_argument("--ours-args", default="", help="more `upg serve` arguments (e.g. '--prefill-chunk 512')")
    ap.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "upg-bench")
    ap.add_argument("--doc", type=Path, help="markdown file with serve-bench markers to fill")
    ap.add_argument("--reuse", type=Path, help="the printed output of an earlier run: its rows of the engines "
                    "not run now go into the report")
    args = ap.parse_args()
    from compare_llamacpp import _machine, core_build, prepare

    clients = [int(c) for c in args.clients.split(",")]
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    engines = args.engines.split(",")
    if args.reuse:
        earlier = [json.loads(line) for line in args.reuse.read_text().splitlines() if line.startswith("{")]
        rows += [r for r in earlier if r["engine"] not in engines]
    for model in args.models.split(","):
        pairs = prepare(model, args.work_dir)
        pair = next(p for p in pairs if p.ours_type == "q4" and p.peer_type == "Q4_0")
        bias = {str(t): -100.0 for t in eos_ids(pair.ours)}
        for engine in engines:
            port = free_port()
            log = args.work_dir / f"serve-{engine}-{model}.log"
            with Server(commands(engine, pair, port, max(clients), args), port, log) as srv:
                round_(srv.url, 1, argparse.Namespace(**{**vars(args), "gen": 4}), bias)  # warm-up
                for c in clients:
                    r = round_(srv.url, c, args, bias)
                    r.update(model=model, engine=engine, clients=c, load=os.getloadavg()[0])
                    print(json.dumps(r), flush=True)
                    rows.append(r)
    text = report(rows, clients, args, started, _machine(), core_build())
    print(text)
    if args.doc:
        from doc_block import fill

        fill(args.doc, "serve-bench", text)


def report(rows: list[dict], clients: list[int], args: argparse.Namespace, started: str, machine: str,
           build: str) -> str:
    out = [f"{started}, {machine}, build {build}, {args.threads} threads; llama-server -np {max(clients)} "
           f"-c {args.n_ctx * max(clients)} {args.peer_args}".rstrip() + f", ours --parallel {max(clients)} --n-ctx {args.n_ctx} "
           f"{args.ours_args}".rstrip() + "; prompts of "
           f"{args.prompt_words} words, {args.gen} greedy tokens each (end of text banned).", "",
           "| model | clients | ours aggregate tok/s | llama-server | ratio | ours end to end tok/s | llama-server | "
           "ratio | ours per stream | llama-server | ours TTFT median / max s | llama-server | load |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["model"], r["engine"], r["clients"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        for c in clients:
            a, b = by.get((model, "ours", c)), by.get((model, "llama.cpp", c))
            if not a or not b:
                continue
            for r in (a, b):  # rows reused from a run before the end-to-end rate was measured
                r.setdefault("end_to_end", float("nan"))
            out.append(f"| {model} | {c} | {a['aggregate']:.1f} | {b['aggregate']:.1f} | "
                       f"{a['aggregate'] / b['aggregate']:.2f}x | {a['end_to_end']:.1f} | {b['end_to_end']:.1f} | "
                       f"{a['end_to_end'] / b['end_to_end']:.2f}x | {a['per_stream']:.1f} | {b['per_stream']:.1f} | "
                       f"{a['ttft']:.2f} / {a['ttft_max']:.2f} | {b['ttft']:.2f} / {b['ttft_max']:.2f} | "
                       f"{a['load']:.1f} / {b['load']:.1f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
