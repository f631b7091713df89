"""`upg bench`: prefill and decode speed, time to first token, load time and peak memory.

Decode streams every weight once per token, so its floor is weight bytes / memory bandwidth; the
report puts the achieved weight bandwidth next to the machine's measured read bandwidth. A model is
a .upg file or a synthetic one of a named shape (random weights, written once and cached).

`upg bench --sampled`: decode also with sampled tokens (llama-cpp-python's defaults: top_k 40,
temperature 0.8), by Session.eval_sample (the backend cuts the candidates; only those leave it) and
by eval + sample (the whole logits row to the host), against greedy decoding.

`upg bench --parallel N ...`: N streams decoding together through a BatchSession (one generated
token of every stream per step, greedy on the host), against one stream measured the same way.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from . import _core
from .backends import NAMES, check_generated, open_backend
from .config import ModelConfig
from .llama import GREEDY_CHUNK

# Real shapes with random weights: speed and memory depend on shapes and types, not on values.
SHAPES: dict[str, dict[str, Any]] = {
    "phi-4": dict(architectures=["Phi3ForCausalLM"], hidden_size=5120, intermediate_size=17920,
                  num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=10, vocab_size=100352,
                  rope_theta=250000.0, rms_norm_eps=1e-5, max_position_embeddings=16384,
                  tie_word_embeddings=False),
    "phi-4-mini": dict(architectures=["Phi3ForCausalLM"], hidden_size=3072, intermediate_size=8192,
                       num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8, vocab_size=200064,
                       rope_theta=10000.0, partial_rotary_factor=0.75, rms_norm_eps=1e-5,
                       max_position_embeddings=131072, tie_word_embeddings=True),
    "small": dict(architectures=["Phi3ForCausalLM"], hidden_size=1024, intermediate_size=3584,
                  num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, vocab_size=32064,
                  rope_theta=250000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
                  tie_word_embeddings=False),
}


def synthetic_model(shape: str, type: str, path: Path, block: int = 32) -> Path:
    """Writes (once) a model of a named shape with random weights of the given type."""
    from .format import TensorSource, write_upg
    from .recipes import graph_tensors

    if path.exists():
        return path
    hf = SHAPES[shape]
    cfg = ModelConfig.from_hf(hf)
    rng = np.random.default_rng(0)
    tile = rng.standard_normal((64, 1 << 16), dtype=np.float32) * 0.02  # repeated: values do not matter

    def random_matrix(rows: int, cols: int) -> np.ndarray:
        reps = -(-rows * cols // tile.size)
        return np.tile(tile.reshape(-1), reps)[: rows * cols].reshape(rows, cols)

    sources = []
    for name, dims in graph_tensors(cfg):
        if len(dims) == 1:
            sources.append(TensorSource(name, "f32", dims, lambda n=dims[0]: np.ones(n, np.float32)))
        else:
            quantized = type in ("q8_0", "q4", "q3")
            sources.append(TensorSource(name, type, dims, lambda d=dims: random_matrix(*d), block=block if quantized else 0))
    header = {"architecture": cfg.architecture, "config": hf, "chat_templates": {},
              "quantization": {"default": type, "block": block}, "provenance": {"source": f"synthetic {shape}"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    total = sum(int(np.prod(s.shape)) for s in sources)
    with tqdm(total=total, unit="w", unit_scale=True, desc=f"writing {path.name}") as bar:
        write_upg(path, header, sources, on_written=lambda s: bar.update(int(np.prod(s.shape))))
    return path


@dataclasses.dataclass
class BenchResult:
    model: str
    type: str
    backend: str
    threads: int
    file_bytes: int
    weight_bytes_per_token: int
    load_s: float
    load_and_first_token_s: float
    prefill_tokens: int
    prefill_tps: float
    ttft_s: float
    decode_tokens: int
    decode_tps: float
    decode_gbps: float
    machine_gbps: float  # the backend's memory read bandwidth (host or GPU) measured in the same run
    peak_rss_bytes: int
    kv_bytes: int
    device_bytes: int = 0  # GPU memory the backend holds (weights, buffers, workspace); 0 on the CPU
    sampled_tps: float = 0.0  # --sampled: decode by eval_sample (0: not measured)
    sampled_host_tps: float = 0.0  # --sampled: decode by eval + sample

    @property
    def roofline(self) -> float:
        return self.decode_gbps / self.machine_gbps if self.machine_gbps else float("nan")

    def table(self) -> str:
        rows = [("model", self.model), ("weights", f"{self.type}, {self.file_bytes / 1e9:.2f} GB file"),
                ("backend", self.backend), ("threads", self.threads),
                ("load", f"{self.load_s:.2f} s (map and check; {self.load_and_first_token_s:.2f} s with a first token)"),
                ("prefill", f"{self.prefill_tps:.1f} tok/s ({self.prefill_tokens} tokens)"),
                ("time to first token", f"{self.ttft_s:.2f} s"),
                ("decode", f"{self.decode_tps:.2f} tok/s ({self.decode_tokens} tokens, median of runs)"),
                ("decode weight bandwidth", f"{self.decode_gbps:.1f} GB/s = {100 * self.roofline:.0f}% of "
                                            f"measured {self.machine_gbps:.1f} GB/s ({'GPU' if self.backend == 'cuda' else 'host'} read)"
                                            if self.machine_gbps else f"{self.decode_gbps:.1f} GB/s (no read probe here)"),
                ("peak RSS", f"{self.peak_rss_bytes / 1e9:.2f} GB (file {self.file_bytes / 1e9:.2f} + KV "
                             f"{self.kv_bytes / 1e9:.2f} + {(self.peak_rss_bytes - self.file_bytes - self.kv_bytes) / 1e6:.0f} MB)")]
        if self.device_bytes:
            rows.append(("GPU memory", f"{self.device_bytes / 1e9:.2f} GB held by the backend"))
        if self.sampled_tps:
            rows.append(("sampled decode", f"{self.sampled_tps:.2f} tok/s by eval_sample (candidates from the backend), "
                                           f"{self.sampled_host_tps:.2f} tok/s by eval + sample (the whole row); "
                                           f"top_k 40, temperature 0.8"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _peak_rss() -> int:
    """This process's peak resident set in bytes (mapped file pages count). VmHWM, unlike
    ru_maxrss, does not inherit the parent's peak across the process start."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: the portable figure


def _step_weight_bytes(path: str) -> int:
    """Bytes of weights one decode step reads: every matrix (outliers too), one embedding row, and
    the embedding again as the lm_head when tied (a step of several streams reads them once)."""
    from .format import UPGFile

    upg = UPGFile(path)
    matrices = [t for t in upg.tensors.values() if len(t.dims) == 2 or ".outlier_" in t.name]
    embed = upg.tensors["model.embed_tokens.weight"]
    per_token = sum(t.nbytes for t in matrices) - embed.nbytes + embed.nbytes // embed.dims[0]
    return per_token + (embed.nbytes if upg.config.tie_word_embeddings else 0)


def _measure(path: str, backend: str, threads: int, prompt: int, gen: int, runs: int, kv_type: str,
             sampled: bool) -> dict[str, Any]:
    """Runs in a fresh process so that peak RSS is the engine's alone (the mapped file's pages count)."""
    from .format import UPGFile

    cfg = UPGFile(path).config
    per_token = _step_weight_bytes(path)
    t0 = time.perf_counter()
    model = _core.Model(path, cfg.engine_config())
    backend, device = open_backend(backend)
    session = _core.Session(model, prompt + gen + 1, kv_type, threads, backend=device)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    session.eval(np.array([1], np.int32))  # warm-up: the weights come into the page cache
    session.truncate(0)
    first_token_s = time.perf_counter() - t0

    prefill, ttft, decode, by_backend, by_host = [], [], [], [], []
    greedy, default = _core.SamplingParams(), _core.SamplingParams()
    greedy.temperature = 0.0
    for _ in range(runs):
        session.truncate(0)
        tokens = rng.integers(0, cfg.vocab_size, prompt, dtype=np.int32)
        t0 = time.perf_counter()
        logits = session.eval(tokens)
        tok = session.sample(logits[-1], greedy, tokens)
        t1 = time.perf_counter()
        prefill.append(prompt / (t1 - t0))
        ttft.append(t1 - t0)
        t0 = time.perf_counter()
        if backend == "cpu":
            for _ in range(gen):
                logits = session.eval(np.array([tok], np.int32))
                tok = session.sample(logits[-1], greedy, tokens)
        else:  # as a greedy completion runs on a GPU (llama._GreedyAhead)
            for done in range(0, gen, GREEDY_CHUNK):
                tok = int(session.decode_greedy(tok, min(GREEDY_CHUNK, gen - done))[-1])
        decode.append(gen / (time.perf_counter() - t0))
        if sampled:  # the same gen tokens again after the prompt, sampled each way
            history = tokens[-default.penalty_last_n:]
            for rates, step in ((by_backend, lambda t: session.eval_sample(t, default, history)),
                                (by_host, lambda t: session.sample(session.eval(np.array([t], np.int32))[-1], default,
                                                                   history))):
                session.truncate(prompt)
                t0 = time.perf_counter()
                for _ in range(gen):
                    tok = step(tok)
                rates.append(gen / (time.perf_counter() - t0))
    # The GPU's floor is measured here, in the process that holds the GPU.
    gpu_gbps = _core.cuda_read_bandwidth() if backend == "cuda" else 0.0
    device_bytes = device.device_bytes if backend == "cuda" else 0
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * (prompt + gen + 1) * (2 if kv_type == "f16" else 4)
    tps = statistics.median(decode)
    return dict(backend=backend, file_bytes=os.path.getsize(path), weight_bytes_per_token=per_token, load_s=load_s,
                load_and_first_token_s=first_token_s,
                prefill_tokens=prompt, prefill_tps=statistics.median(prefill), ttft_s=statistics.median(ttft),
                decode_tokens=gen, decode_tps=tps, decode_gbps=per_token * tps / 1e9,
                peak_rss_bytes=_peak_rss(), kv_bytes=kv_bytes, device_bytes=device_bytes, gpu_gbps=gpu_gbps,
                sampled_tps=statistics.median(by_backend) if sampled else 0.0,
                sampled_host_tps=statistics.median(by_host) if sampled else 0.0)


def _model_path(model: str, type: str, cache_dir: Path | None) -> tuple[Path, str]:
    """The .upg file to run and its weight type: `model` itself, or the synthetic model of that shape."""
    from .recipes import WEIGHT_TYPES

    if model in SHAPES:
        if type not in WEIGHT_TYPES:
            raise ValueError(f"unknown weight type {type!r}; choose one of {', '.join(WEIGHT_TYPES)}")
        cache = cache_dir or Path(os.environ.get("UPG_CACHE", Path.home() / ".cache" / "upg"))
        return synthetic_model(model, type, cache / f"synthetic-{model}-{type}.upg"), type
    path = Path(model)
    return path, json.loads(_core.File(str(path)).header).get("quantization", {}).get("default", "?")


def _check_arguments(prompt: int, gen: int, runs: int, threads: int, backend: str) -> None:
    for name, value in (("prompt", prompt), ("gen", gen), ("runs", runs)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if threads < 0:
        raise ValueError(f"threads must be 0 (one per core) or more, got {threads}")
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {', '.join(NAMES)}, got {backend!r}")


def run_bench(model: str, type: str = "q4", threads: int = 0, prompt: int = 512, gen: int = 128, runs: int = 3,
              kv_type: str = "f16", cache_dir: Path | None = None, backend: str = "auto",
              sampled: bool = False) -> BenchResult:
    """Benchmarks a .upg file, or a synthetic model when `model` names a shape in SHAPES, on a
    backend (backends.NAMES). sampled: also decode with sampled tokens, both ways (module doc).

    Raises:
        ValueError: a count is not positive, the weight type is unknown, or the backend is unknown
            or absent.
        UPGFormatError: the file is not a valid model.
    """
    _check_arguments(prompt, gen, runs, threads, backend)
    path, type = _model_path(model, type, cache_dir)
    threads = threads or os.cpu_count() or 1
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        r = pool.apply(_measure, (str(path), backend, threads, prompt, gen, runs, kv_type, sampled))
    # here, so its buffer stays out of the child's RSS; the host's memory is the decode floor on the CPU only
    gpu_gbps = r.pop("gpu_gbps")
    machine = _core.measure_read_bandwidth(1 << 30, threads) if r["backend"] == "cpu" else gpu_gbps
    return BenchResult(model=model, type=type, threads=threads, machine_gbps=machine, **r)


# ---- several streams in one pass ----


@dataclasses.dataclass
class ParallelRow:
    streams: int
    aggregate_tps: float  # generated tokens of all streams per second (median of runs)
    per_stream_tps: float
    vs_one_stream: float  # aggregate tok/s over one stream's
    step_ms: float  # one step (median of runs), the greedy choice included
    host_ms: float  # of which the argmax of the step's logits rows on the host (0 where the backend chooses)
    weights_gbps: float  # the weights a step reads (once for all its streams) over the step's time


@dataclasses.dataclass
class ParallelResult:
    model: str
    type: str
    backend: str
    threads: int
    prompt_tokens: int  # each stream's context before it decodes
    decode_steps: int
    rows: list[ParallelRow]
    generated: str  # CUDA's kernels of the generated tokens (open_backend)
    machine_gbps: float  # the backend's memory read bandwidth (host or GPU) measured in the same run

    def table(self) -> str:
        kernels = f", generated tokens by the {self.generated}" if self.backend == "cuda" else ""
        head = (f"{self.model} ({self.type}) on {self.backend}, {self.threads} threads: each stream "
                f"{self.prompt_tokens} prompt tokens, then {self.decode_steps} steps of one generated token per "
                f"stream (BatchSession{kernels}, greedy on the {'host' if self.backend == 'cpu' else 'backend'}; "
                f"medians of runs)")
        probe = (f"{'GPU' if self.backend == 'cuda' else 'host'} read probe {self.machine_gbps:.0f} GB/s"
                 if self.machine_gbps else "no read probe here")
        lines = [head, f"{'streams':>8}  {'aggregate tok/s':>15}  {'per stream':>10}  {'x one stream':>12}  "
                       f"{'step ms':>8}  {'host argmax ms':>14}  {'weights GB/s':>12}  {'of probe':>8}  ({probe})"]
        lines += [f"{r.streams:>8}  {r.aggregate_tps:>15.1f}  {r.per_stream_tps:>10.2f}  {r.vs_one_stream:>12.2f}  "
                  f"{r.step_ms:>8.2f}  {r.host_ms:>14.2f}  {r.weights_gbps:>12.1f}  "
                  + (f"{100 * r.weights_gbps / self.machine_gbps:>7.0f}%" if self.machine_gbps else f"{'-':>8}")
                  for r in self.rows]
        return "\n".join(lines)


def _measure_parallel(path: str, backend: str, threads: int, streams: list[int], prompt: int, gen: int, runs: int,
                      kv_type: str, generated: str) -> tuple[str, list[tuple[float, float]], float]:
    """(backend, (seconds a step, of which the host's argmax) of each stream count (medians of
    runs), the GPU's read bandwidth or 0), in a fresh process (a fresh backend each). Greedy as a
    batch's views choose it: on the host on the CPU, else on the backend (BatchSession's argmax
    entries)."""
    from .format import UPGFile

    cfg = UPGFile(path).config
    model = _core.Model(path, cfg.engine_config())
    rng = np.random.default_rng(1)
    out, name = [], backend
    for n in streams:
        name, device = open_backend(backend, generated=generated)
        b = _core.BatchSession(model, n, prompt + gen + 1, kv_type, threads, max(n, prompt), device)
        for slot in range(n):
            b.step([(slot, rng.integers(0, cfg.vocab_size, prompt, dtype=np.int32), False, 0)])
        steps, host = [], []
        for _ in range(runs):
            for slot in range(n):
                b.truncate(slot, prompt)
            toks = np.full(n, 1, np.int32)
            argmax_s = 0.0
            t0 = time.perf_counter()
            for _ in range(gen):
                if name != "cpu":
                    ids = np.empty(n, np.int32)
                    b.step([(slot, toks[slot:slot + 1], True, 3) for slot in range(n)], ids)
                    toks = ids
                    continue
                logits = b.step([(slot, toks[slot:slot + 1], True, 1) for slot in range(n)])
                t1 = time.perf_counter()
                toks = logits.argmax(axis=1).astype(np.int32)
                argmax_s += time.perf_counter() - t1
            steps.append((time.perf_counter() - t0) / gen)
            host.append(argmax_s / gen)
        out.append((statistics.median(steps), statistics.median(host)))
        del b, device
    # the GPU's floor is measured here, in the process that holds the GPU
    return name, out, _core.cuda_read_bandwidth() if name == "cuda" else 0.0


def run_parallel_bench(model: str, streams: list[int], type: str = "q4", threads: int = 0, prompt: int = 512,
                       gen: int = 128, runs: int = 3, kv_type: str = "f16", cache_dir: Path | None = None,
                       backend: str = "auto", generated: str = "matvec") -> ParallelResult:
    """Decode speed of several streams in one pass: for each count in `streams` (and 1, the
    reference), that many sequences of `prompt` tokens each decode `gen` steps together.
    generated: the CUDA kernels of the generated tokens (open_backend).

    Raises:
        ValueError: a count is not positive, the weight type is unknown, or the backend is unknown
            or absent.
        UPGFormatError: the file is not a valid model.
    """
    _check_arguments(prompt, gen, runs, threads, backend)
    if not streams or min(streams) < 1:
        raise ValueError(f"parallel stream counts must be at least 1, got {streams}")
    check_generated(generated)
    path, type = _model_path(model, type, cache_dir)
    threads = threads or os.cpu_count() or 1
    counts = sorted(set(streams) | {1})
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        name, times, gpu_gbps = pool.apply(_measure_parallel, (str(path), backend, threads, counts, prompt, gen, runs,
                                                                kv_type, generated))
    machine = _core.measure_read_bandwidth(1 << 30, threads) if name == "cpu" else gpu_gbps
    one, per_step = 1 / times[0][0], _step_weight_bytes(str(path))
    rows = [ParallelRow(n, n / s, 1 / s, n / s / one, 1e3 * s, 1e3 * h, per_step / s / 1e9)
            for n, (s, h) in zip(counts, times)]
    return ParallelResult(model=model, type=type, backend=name, threads=threads, prompt_tokens=prompt,
                          decode_steps=gen, rows=rows, generated=generated, machine_gbps=machine)
