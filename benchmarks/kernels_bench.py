"""CPU kernel throughput: matvec GB/s (1 and 2 threads) and matmul GFLOP/s, per type and path.

Run: python3 benchmarks/kernels_bench.py [--rows 5120] [--cols 17920] [--types q4,q8_0,...]
     python3 benchmarks/kernels_bench.py --decode smollm2 [--types f16,q4] [--threads 1,2]
     python3 benchmarks/kernels_bench.py --tokens 1,4,8,16 [--types q4,q8_0] [--threads 2]

--decode SHAPE: every matrix of one decode step of that model (smollm2, or a upg_backend.bench
shape), as the engine runs it: enough copies of each matrix to stream from memory, each product
shared by the engine's thread pool, against the read probe (_core.measure_read_bandwidth) measured
just before each row. Medians of --reps passes, ms per product and GB/s of weights.

matvec streams a Phi-4 down_proj-shaped matrix (5120 x 17920); GB/s counts the matrix bytes read
per call, to compare with the machine's memory bandwidth, measured here as a numpy copy of 1 GiB
(bytes read + written / time). Two threads split the rows (the GIL is released while computing).
matmul GFLOP/s is 2 * rows * cols * n / time for n = 64 tokens over a slice of the rows.
"""
import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from upg_backend import _core

TYPES = {"f32": 0, "f16": 0, "bf16": 0, "q8_0": 32, "q4": 32, "q3": 32, "iq4_nl": 32, "iq4_xs": 32, "iq3": 32}


def median_time(fn, reps):
    fn()  # warm up: page faults, caches
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def aligned64(a):
    """A copy of a at a 64-byte aligned address, as tensors in a mapped UPG file are (numpy's
    own large arrays are only 16-byte aligned, which splits every 64-byte load across two lines)."""
    buf = np.empty(a.nbytes + 64, np.uint8)
    start = -buf.ctypes.data % 64
    out = buf[start:start + a.nbytes].view(a.dtype)
    out[...] = a
    return out


def memory_bandwidth():
    """GB/s of a 1 GiB numpy copy, counting bytes read and written."""
    a = np.ones(1 << 28, np.float32)
    b = np.empty_like(a)
    return 2 * a.nbytes / median_time(lambda: np.copyto(b, a), 5) / 1e9


# SmolLM2-135M (the llama.cpp comparison's small model): hidden 576, MLP 1536, 9 heads of 64 of which 3 KV, vocabulary 49152
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
               vocab_size=49152, num_hidden_layers=30)


def decode_matrices(shape):
    """(name, rows, cols, matrices of that shape per token) of one decode step."""
    if shape == "smollm2":
        c = SMOLLM2
    else:
        from upg_backend.bench import SHAPES
        c = SHAPES[shape]
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hd = c.get("head_dim", h // c["num_attention_heads"])
    qkv = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * hd
    return [("qkv", qkv, h, layers), ("o", h, c["num_attention_heads"] * hd, layers),
            ("gate_up", 2 * inter, h, layers), ("down", h, inter, layers), ("lm_head", c["vocab_size"], h, 1)]


def decode_table(args):
    """Per matrix of one decode step: ms per product and GB/s, at each thread count, against the probe."""
    threads = [int(t) for t in args.threads.split(",")]
    rng = np.random.default_rng(0)
    print(f"decode matrices of {args.decode}, path {args.paths.split(',')[-1]}; copies of each matrix "
          f"totalling >= {args.stream_mb} MB stream from memory\n")
    print("| type | matrix | rows x cols | MB | per token | " + " | ".join(
        f"{t}T ms | {t}T GB/s | {t}T probe GB/s" for t in threads) + " |")
    print("|---|---|---|---:|---:|" + "---:|---:|---:|" * len(threads))
    path = args.paths.split(",")[-1]
    for type_ in args.types.split(","):
        block = TYPES[type_]
        token_s = {t: 0.0 for t in threads}
        token_bytes = 0
        for name, rows, cols, per_token in decode_matrices(args.decode):
            w = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
            one = _core.quantize(type_, block, w)
            copies = max(2, -(-args.stream_mb * 10**6 // one.nbytes))
            data = aligned64(np.tile(one, copies))
            x = rng.standard_normal(cols, dtype=np.float32)
            cells = []
            for t in threads:
                probe = _core.measure_read_bandwidth(1 << 28, t, 3)
                s = statistics.median(_core.time_matvec(type_, block, data, rows, cols, copies, x, path,
                                                        n_threads=t, passes=args.reps))
                token_s[t] += s * per_token
                cells += [f"{s * 1e3:.3f}", f"{one.nbytes / s / 1e9:.1f}", f"{probe:.1f}"]
            token_bytes += one.nbytes * per_token
            print(f"| {type_} | {name} | {rows} x {cols} | {one.nbytes / 1e6:.2f} | {per_token} | "
                  + " | ".join(cells) + " |", flush=True)
            del data
        print(f"| {type_} | **all (one token)** | | {token_bytes / 1e6:.1f} | | " + " | ".join(
            f"{token_s[t] * 1e3:.2f} | {token_bytes / token_s[t] / 1e9:.1f} | " for t in threads) + " |", flush=True)


def tokens_table(args):
    """matvec of n generated tokens at once (matvec_n) from memory, n_threads sharing the rows as the
    engine's pool does: ms per call, per token, and the token rate against n = 1."""
    rows, cols = args.rows, args.cols
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    ns = [int(n) for n in args.tokens.split(",")]
    threads = int(args.threads.split(",")[-1])
    print(f"matvec_n {rows} x {cols} from memory, {threads} threads (the engine's pool), medians of {args.reps}\n")
    print("| type | tokens | ms a call | ms a token | tokens/s against 1 token |")
    print("|---|---:|---:|---:|---:|")
    for type_ in args.types.split(","):
        block = TYPES[type_]
        one = aligned64(_core.quantize(type_, block, w))
        copies = [one] + [aligned64(one) for _ in range(max(1, args.stream_mb * 2**20 // one.nbytes) - 1)]
        base = None
        for n in ns:
            x = rng.standard_normal((n, cols), dtype=np.float32) if n > 1 else rng.standard_normal(cols, dtype=np.float32)

            def calls():
                for c in copies:
                    _core.matvec(type_, block, c, rows, cols, x, n_threads=threads)

            t = median_time(calls, args.reps) / len(copies)
            base = base or t
            print(f"| {type_} | {n} | {t * 1e3:.2f} | {t / n * 1e3:.3f} | {n * base / t:.2f}x |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5120)
    ap.add_argument("--cols", type=int, default=17920)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--paths", default=",".join(_core.simd_paths()))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--decode", help="a model's decode matrices: smollm2 or a upg_backend.bench shape")
    ap.add_argument("--threads", default="1,2", help="--decode: thread counts")
    ap.add_argument("--stream-mb", type=int, default=256, help="--decode: bytes of copies per matrix")
    ap.add_argument("--tokens", help="matvec_n: token counts (e.g. 1,4,8,16; the first is the baseline)")
    ap.add_argument("--list-matrices", action="store_true",
                    help="--decode: print the matrices as ggml_matvec.py --matrices takes them, and exit")
    args = ap.parse_args()
    if args.decode and args.list_matrices:
        return print(",".join(f"{n}:{r}x{c}x{k}" for n, r, c, k in decode_matrices(args.decode)))
    if args.decode:
        return decode_table(args)
    if args.tokens:
        return tokens_table(args)
    rows, cols = args.rows, args.cols
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    x = rng.standard_normal(cols, dtype=np.float32)
    x64 = rng.standard_normal((64, cols), dtype=np.float32)
    pool = ThreadPoolExecutor(2)

    print(f"memory bandwidth (numpy copy, read + write): {memory_bandwidth():.1f} GB/s")
    print(f"matvec {rows} x {cols}; matmul n = 64\n")
    print("| type | path | MB | matvec 1T ms | 1T GB/s | matvec 2T ms | 2T GB/s | matmul GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for type_ in args.types.split(","):
        block = TYPES[type_]
        data = aligned64(_core.quantize(type_, block, w))
        mb = data.nbytes / 1e6
        for path in args.paths.split(","):
            reps = 1 if path == "scalar" else args.reps
            t1 = median_time(lambda: _core.matvec(type_, block, data, rows, cols, x, path), reps)
            half = rows // 2

            def two_threads():
                parts = [pool.submit(_core.matvec, type_, block, data, rows, cols, x, path, r0=r0, r1=r1)
                         for r0, r1 in ((0, half), (half, rows))]
                for p in parts:
                    p.result()

            t2 = median_time(two_threads, reps)
            mm_rows = min(rows, 32 if path == "scalar" else 1024)  # a row slice keeps the slow path short
            tm = median_time(lambda: _core.matmul(type_, block, data, rows, cols, x64, path, r1=mm_rows),
                             reps)
            gflops = 2 * mm_rows * cols * 64 / tm / 1e9
            print(f"| {type_} | {path} | {mb:.0f} | {t1 * 1e3:.2f} | {data.nbytes / t1 / 1e9:.1f} "
                  f"| {t2 * 1e3:.2f} | {data.nbytes / t2 / 1e9:.1f} | {gflops:.1f} |", flush=True)


if __name__ == "__main__":
    main()
