"""One engine, one model, one fresh process: what compare_llamacpp.py runs for each measurement.

Runs under either Python: `--engine upg` imports upg_backend, `--engine llamacpp` imports llama_cpp
(the peer venv); nothing else beyond numpy and the standard library, so the same measurement code
times both engines. Reads a JSON job on stdin, writes one JSON result on stdout.

Modes:
    bench: load, one-token warm-up (timed: a lazy load pays here), prefill `prompt` random token ids, greedy first token (time to
        first token), then `gen` greedy decode steps.
    logits: teacher-forced top-1 token at every position of `text`, and greedy continuations of
        `prompts`; both on the token ids given (`text_ids`, `prompt_ids`) or, when absent, on the
        engine's own tokenization (which is returned). With `logits_out`, the logits of every
        position of `text` are saved there (.npy).
"""
from __future__ import annotations

import argparse
import importlib
import json
import resource
import sys
import time
from typing import Any

import numpy as np


class _Engine:
    """What both engines share: the llama-cpp-python API of `self.llm`."""

    llm: Any

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def reset(self) -> None:
        self.llm.reset()

    def eval(self, tokens: list[int]) -> None:
        self.llm.eval(tokens)

    def all_logits(self, n: int) -> np.ndarray:
        return self.llm.scores[:n]


class UPG(_Engine):
    def __init__(self, path: str, n_ctx: int, threads: int, logits_all: bool):
        from upg_backend.llama import Llama

        self.llm = Llama(path, n_ctx=n_ctx, n_threads=threads, n_batch=512, logits_all=logits_all)

    def last_logits(self) -> np.ndarray:
        return self.llm.scores[-1]


class LlamaCpp(_Engine):
    def __init__(self, path: str, n_ctx: int, threads: int, logits_all: bool, **options: Any):
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                                   use_mmap=True, use_mlock=False, logits_all=logits_all, verbose=False, **options)

    def last_logits(self) -> np.ndarray:
        # logits_all=False keeps no Python copy: read the last row from the context
        ptr = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),))


def peak_rss() -> int:
    """This process's peak resident set in bytes. Linux keeps ru_maxrss across exec, so a child
    started from a big parent would report the parent's size; VmHWM belongs to the new image."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere


def _greedy(engine, n: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(int(np.argmax(engine.last_logits())))
        engine.eval([out[-1]])
    return out


def bench(engine, job: dict) -> dict:
    rng = np.random.default_rng(job["seed"])
    t0 = time.perf_counter()
    engine.eval([int(rng.integers(job["n_vocab"]))])  # warm-up: weights into the page cache, buffers allocated
    engine.reset()
    warmup_s = time.perf_counter() - t0
    tokens = [int(t) for t in rng.integers(0, job["n_vocab"], job["prompt"])]
    t0 = time.perf_counter()
    engine.eval(tokens)
    tok = int(np.argmax(engine.last_logits()))
    t1 = time.perf_counter()
    generated = [tok]
    for _ in range(job["gen"]):
        engine.eval([tok])
        tok = int(np.argmax(engine.last_logits()))
        generated.append(tok)
    t2 = time.perf_counter()
    return {"warmup_s": warmup_s, "ttft_s": t1 - t0, "prefill_tps": job["prompt"] / (t1 - t0), "decode_tps": job["gen"] / (t2 - t1),
            "generated": generated}


def logits(engine, job: dict) -> dict:
    text_ids = job.get("text_ids") or engine.tokenize(job["text"])
    prompt_ids = job.get("prompt_ids") or [engine.tokenize(p) for p in job["prompts"]]
    engine.reset()
    engine.eval(text_ids)
    all_logits = engine.all_logits(len(text_ids))
    if job.get("logits_out"):  # the whole matrix, for divergences the caller computes
        np.save(job["logits_out"], np.asarray(all_logits, dtype=np.float32))
    top1 = [int(i) for i in np.argmax(all_logits, axis=1)]
    two = np.sort(all_logits, axis=1)[:, -2:]
    gap = [float(g) for g in two[:, 1] - two[:, 0]]  # how close each position is to a tie
    continuations = []
    for ids in prompt_ids:
        engine.reset()
        engine.eval(ids)
        continuations.append(_greedy(engine, job["gen"]))
    return {"text_ids": text_ids, "prompt_ids": prompt_ids, "top1": top1, "gap": gap, "continuations": continuations}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=("upg", "llamacpp"), required=True)
    ap.add_argument("--mode", choices=("bench", "logits"), required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--n-ctx", type=int, required=True)
    args = ap.parse_args()
    job = json.load(sys.stdin)
    importlib.import_module("upg_backend.llama" if args.engine == "upg" else "llama_cpp")  # not part of load time
    t0 = time.perf_counter()
    if args.engine == "upg":
        engine = UPG(args.model, args.n_ctx, args.threads, args.mode == "logits")
    else:
        engine = LlamaCpp(args.model, args.n_ctx, args.threads, args.mode == "logits", **job.get("llamacpp_options", {}))
    load_s = time.perf_counter() - t0
    result = bench(engine, job) if args.mode == "bench" else logits(engine, job)
    result.update(load_s=load_s, peak_rss_bytes=peak_rss())
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
