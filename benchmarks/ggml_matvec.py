"""llama.cpp's side of `kernels_bench.py --decode`: each decode matrix of a model through ggml.

Runs under the peer venv's Python (benchmarks/README.md) and calls the ggml libraries that
llama-cpp-python installed, through ctypes: per matrix, enough copies to stream from memory, each
one multiplied by one activation vector as llama.cpp's decode graph does (ggml_mul_mat, the
activations converted to the weight type's dot type inside the op, one barrier per op), on the CPU
backend with n threads, weights in the CPU backend's repacking buffer type when it takes the type
(as llama.cpp loads them: Q4_0 is repacked to interleaved rows on AVX2 / AVX-512), else in plain CPU
memory. Prints the same table as kernels_bench.py --decode.

Run: $PEER_VENV/bin/python benchmarks/ggml_matvec.py --types f16,q4 [--threads 1,2] \
         --matrices "$(python3 benchmarks/kernels_bench.py --decode smollm2 --list-matrices)"
"""
import argparse
import ctypes as C
import statistics
import sys
import time
from pathlib import Path

import numpy as np

GGML_TYPES = {"f32": 0, "f16": 1, "q4": 2, "q8_0": 8, "bf16": 30, "iq4_nl": 20, "iq4_xs": 23}  # ours -> ggml's type of the same bits
P = C.c_void_p


class InitParams(C.Structure):
    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", P), ("no_alloc", C.c_bool)]


def load_ggml():
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    base = C.CDLL(str(lib / "libggml-base.so"), mode=C.RTLD_GLOBAL)
    cpu = C.CDLL(str(lib / "libggml-cpu.so"), mode=C.RTLD_GLOBAL)
    ggml = C.CDLL(str(lib / "libggml.so"), mode=C.RTLD_GLOBAL)
    sigs = {
        (base, "ggml_init"): (P, [InitParams]), (base, "ggml_free"): (None, [P]),
        (base, "ggml_new_tensor_2d"): (P, [P, C.c_int, C.c_int64, C.c_int64]),
        (base, "ggml_mul_mat"): (P, [P, P, P]), (base, "ggml_new_graph_custom"): (P, [P, C.c_size_t, C.c_bool]),
        (base, "ggml_build_forward_expand"): (None, [P, P]), (base, "ggml_tensor_overhead"): (C.c_size_t, []),
        (base, "ggml_graph_overhead_custom"): (C.c_size_t, [C.c_size_t, C.c_bool]),
        (base, "ggml_nbytes"): (C.c_size_t, [P]),
        (base, "ggml_quantize_chunk"): (C.c_size_t, [C.c_int, P, P, C.c_int64, C.c_int64, C.c_int64, P]),
        (base, "ggml_backend_alloc_ctx_tensors_from_buft"): (P, [P, P]),
        (base, "ggml_backend_tensor_set"): (None, [P, P, C.c_size_t, C.c_size_t]),
        (base, "ggml_backend_buffer_free"): (None, [P]),
        (base, "ggml_gallocr_new"): (P, [P]), (base, "ggml_gallocr_alloc_graph"): (C.c_bool, [P, P]),
        (base, "ggml_gallocr_free"): (None, [P]),
        (base, "ggml_backend_graph_compute"): (C.c_int, [P, P]),
        (base, "ggml_backend_reg_get_proc_address"): (P, [P, C.c_char_p]),
        (base, "ggml_backend_dev_backend_reg"): (P, [P]),
        (base, "ggml_backend_buft_name"): (C.c_char_p, [P]),
        (ggml, "ggml_backend_dev_by_type"): (P, [C.c_int]),
        (cpu, "ggml_backend_cpu_init"): (P, []), (cpu, "ggml_backend_cpu_set_n_threads"): (None, [P, C.c_int]),
        (cpu, "ggml_backend_cpu_buffer_type"): (P, []),
    }
    fns = {}
    for (so, name), (restype, argtypes) in sigs.items():
        f = getattr(so, name)  # a symbol of the libraries loaded above (RTLD_GLOBAL)
        f.restype, f.argtypes = restype, argtypes
        fns[name] = f
    return fns


def extra_bufts(g):
    """The CPU device's extra buffer types (the repacking one), as llama.cpp asks for them."""
    dev = g["ggml_backend_dev_by_type"](0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    reg = g["ggml_backend_dev_backend_reg"](dev)
    addr = g["ggml_backend_reg_get_proc_address"](reg, b"ggml_backend_dev_get_extra_bufts")
    if not addr:
        return []
    arr = C.CFUNCTYPE(C.POINTER(P), P)(addr)(dev)
    out, i = [], 0
    while arr and arr[i]:
        out.append(arr[i])
        i += 1
    return out


def time_matrix(g, backend, type_, rows, cols, copies, passes, rng, bufts):
    """(seconds per product, bytes per matrix, buffer type name) for `copies` matrices in one graph."""
    gt = GGML_TYPES[type_]
    ctx_w = g["ggml_init"](InitParams(g["ggml_tensor_overhead"]() * (copies + 1), None, True))
    ws = [g["ggml_new_tensor_2d"](ctx_w, gt, cols, rows) for _ in range(copies)]
    ctx_x = g["ggml_init"](InitParams(g["ggml_tensor_overhead"]() * 2, None, True))
    x = g["ggml_new_tensor_2d"](ctx_x, 0, cols, 1)
    # On x86 llama.cpp repacks only Q4_0 (to 8 interleaved rows, rows % 8 == 0) of these types
    # (ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type); the rest stay in plain CPU memory.
    buf_w, name = None, "CPU"
    if type_ == "q4" and rows % 8 == 0 and bufts:
        buf_w = g["ggml_backend_alloc_ctx_tensors_from_buft"](ctx_w, bufts[0])
        name = g["ggml_backend_buft_name"](bufts[0]).decode()
    if not buf_w:
        buf_w = g["ggml_backend_alloc_ctx_tensors_from_buft"](ctx_w, g["ggml_backend_cpu_buffer_type"]())
    buf_x = g["ggml_backend_alloc_ctx_tensors_from_buft"](ctx_x, g["ggml_backend_cpu_buffer_type"]())
    src = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02)
    nbytes = g["ggml_nbytes"](ws[0])
    q = np.empty(nbytes, np.uint8)
    g["ggml_quantize_chunk"](gt, src.ctypes.data, q.ctypes.data, 0, rows, cols, None)
    for w in ws:
        g["ggml_backend_tensor_set"](w, q.ctypes.data, 0, nbytes)
    xv = rng.standard_normal(cols, dtype=np.float32)
    g["ggml_backend_tensor_set"](x, xv.ctypes.data, 0, xv.nbytes)
    nodes = copies + 8
    ctx_g = g["ggml_init"](InitParams(g["ggml_tensor_overhead"]() * nodes + g["ggml_graph_overhead_custom"](nodes, False), None, True))
    gf = g["ggml_new_graph_custom"](ctx_g, nodes, False)
    for w in ws:
        g["ggml_build_forward_expand"](gf, g["ggml_mul_mat"](ctx_g, w, x))
    galloc = g["ggml_gallocr_new"](g["ggml_backend_cpu_buffer_type"]())
    if not g["ggml_gallocr_alloc_graph"](galloc, gf):
        raise RuntimeError("ggml_gallocr_alloc_graph failed")
    times = []
    for p in range(passes + 1):
        t0 = time.perf_counter()
        if g["ggml_backend_graph_compute"](backend, gf) != 0:
            raise RuntimeError("ggml_backend_graph_compute failed")
        if p:
            times.append((time.perf_counter() - t0) / copies)
    g["ggml_gallocr_free"](galloc)
    for b in (buf_w, buf_x):
        g["ggml_backend_buffer_free"](b)
    for c in (ctx_g, ctx_x, ctx_w):
        g["ggml_free"](c)
    return statistics.median(times), nbytes, name


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrices", required=True,
                    help="name:ROWSxCOLSxPER_TOKEN,... (kernels_bench.py --decode SHAPE --list-matrices)")
    ap.add_argument("--types", default="f16,q8_0,q4")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--stream-mb", type=int, default=256)
    args = ap.parse_args()
    g = load_ggml()
    bufts = extra_bufts(g)
    threads = [int(t) for t in args.threads.split(",")]
    backend = g["ggml_backend_cpu_init"]()
    rng = np.random.default_rng(0)
    matrices = [(n, *map(int, dims.split("x"))) for n, dims in (m.split(":") for m in args.matrices.split(","))]
    print(f"llama.cpp (ggml) decode matrices; extra buffer types: "
          f"{', '.join(g['ggml_backend_buft_name'](b).decode() for b in bufts) or 'none'}\n")
    print("| type | matrix | rows x cols | MB | per token | buffer | " + " | ".join(f"{t}T ms | {t}T GB/s" for t in threads) + " |")
    print("|---|---|---|---:|---:|---|" + "---:|---:|" * len(threads))
    for type_ in args.types.split(","):
        token_s = {t: 0.0 for t in threads}
        token_bytes = 0
        for name, rows, cols, per_token in matrices:
            cells = []
            for t in threads:
                g["ggml_backend_cpu_set_n_threads"](backend, t)
                one = rows * cols * {"f16": 2, "bf16": 2, "f32": 4, "q8_0": 34 / 32, "q4": 18 / 32, "iq4_nl": 18 / 32,
                                     "iq4_xs": 136 / 256}[type_]
                copies = max(2, int(-(-args.stream_mb * 1e6 // one)))
                s, nbytes, buf = time_matrix(g, backend, type_, rows, cols, copies, args.reps, rng, bufts)
                token_s[t] += s * per_token
                cells += [f"{s * 1e3:.3f}", f"{nbytes / s / 1e9:.1f}"]
            token_bytes += nbytes * per_token
            print(f"| {type_} | {name} | {rows} x {cols} | {nbytes / 1e6:.2f} | {per_token} | {buf} | " + " | ".join(cells) + " |",
                  flush=True)
        print(f"| {type_} | **all (one token)** | | {token_bytes / 1e6:.1f} | | | " + " | ".join(
            f"{token_s[t] * 1e3:.2f} | {token_bytes / token_s[t] / 1e9:.1f}" for t in threads) + " |", flush=True)


if __name__ == "__main__":
    main()
