"""Micro-benchmarks of the CUDA kernels (cpp/cuda/) on one GPU, through tests/gpu/cuda_lib.py.

  python benchmarks/cuda_ops.py [--json out.json] [--quick] [--types q4,iq4_xs,...] [--step-types q4,...] [--tokens]

Prints, with the peer measured in the same run (a device-to-device copy, bytes read + written):
mat-vec GB/s per type for the Phi-4 matrices, decode attention at 4096 positions, and a whole
Phi-4-shaped decode step (40 layers, captured once as a CUDA graph that also feeds the argmax
back as the next token) as tokens/s, unfused (one launch per graph op) and fused (rms_norm and
silu_mul folded into the mat-vec prologue, the residual adds into its epilogue). --tokens instead:
the mat-vec of several tokens (matvec_n, a step's generated tokens) and the mat-mul in its token
tiles per Phi-4 matrix for 1 to 32 tokens, the sum of a decode step's linear layers by each, and
decode attention of 32 sequences. Weights are random
codes and scales (never zeros) in the file layout; every timing is the median of CUDA-event-timed
graph replays, over enough weight copies to defeat the 60 MB L2.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "gpu"))
from cuda_lib import Lib, Weight, batch_pass, pass_tensor  # noqa: E402

PHI4 = dict(hidden=5120, heads=40, kv_heads=10, head_dim=128, inter=17920, vocab=100352, layers=40,
            theta=250000.0, eps=1e-5)
SHAPES = {"qkv": (7680, 5120), "o": (5120, 5120), "gate_up": (35840, 5120), "down": (5120, 17920),
          "lm_head": (100352, 5120)}
BLOCK = 32
GRID_TYPES = ("iq4_nl", "iq4_xs", "iq3")
SUPER_TYPES = ("iq4_xs", "iq3")  # 6-bit sub-block scales, an f16 scale per 256
DENSE = ("f32", "f16", "bf16")


def pad64(n):
    return (n + 63) & ~63


def sections(dtype, rows, cols, block=BLOCK):
    """(codes, high, sub, scales) padded byte sizes of a tensor (docs/FORMAT.md)."""
    n, nb = rows * cols, cols // block
    if dtype in DENSE:
        return n * {"f32": 4, "f16": 2, "bf16": 2}[dtype], 0, 0, 0
    codes = {"q8_0": n, "q4": n // 2, "q3": n // 4, "iq4_nl": n // 2, "iq4_xs": n // 2, "iq3": n // 4}[dtype]
    high = n // 8 if dtype in ("q3", "iq3") else 0
    if dtype in SUPER_TYPES:
        return pad64(codes), pad64(high), pad64(rows * (nb // 2 + nb // 4)), pad64(rows * (cols // 256) * 2)
    return pad64(codes), pad64(high), 0, pad64(rows * nb * 2)


def random_weight(dtype, rows, cols):
    """Random codes (and sub-block scales), random f16 scales."""
    *parts, scales = sections(dtype, rows, cols)
    if dtype in DENSE:
        t = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
        data = (torch.randn(rows, cols, device="cuda") * 0.02).to(t).view(torch.uint8).reshape(-1)
    else:
        data = torch.randint(0, 256, (sum(parts) + scales,), dtype=torch.uint8, device="cuda")
        data[sum(parts):] = (torch.randn(scales // 2, device="cuda") * 0.01).half().view(torch.uint8)
    return Weight(dtype, rows, cols, BLOCK if dtype not in DENSE else 0, data)


def time_graph(fn, reps=20, warmup=3):
    """Median milliseconds of one replay of a CUDA graph that captured fn()."""
    fn()  # loads the kernels
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(warmup):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), g


def copy_bandwidth():
    """Device-to-device copy of 4 GiB, bytes read + written per second (GB/s), after a warm-up
    long enough for the clocks to rise from idle."""
    n = 4 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms, _ = time_graph(lambda: b.copy_(a), reps=20, warmup=100)
    af, bf = a.view(torch.float32), b.view(torch.float32)
    ms_k, _ = time_graph(lambda: torch.mul(af, 1.0, out=bf), reps=20, warmup=20)
    return 2 * n / ms / 1e6, 2 * n / ms_k / 1e6  # cudaMemcpy (copy engines), an SM kernel


def bench_matvec(lib, types, shapes):
    rows_out = []
    for dtype in types:
        for name, (rows, cols) in shapes.items():
            nbytes = sum(sections(dtype, rows, cols))
            copies = max(2, math.ceil(1.5e9 / nbytes))  # 1.5 GB of weights per replay
            ws = [random_weight(dtype, rows, cols) for _ in range(copies)]
            x = torch.randn(cols, device="cuda")
            y = torch.empty(rows, device="cuda")
            ms, _ = time_graph(lambda: [lib.matvec(w, x, y) for w in ws])
            us = ms * 1e3 / copies
            rows_out.append(dict(type=dtype, matrix=name, rows=rows, cols=cols, bytes=nbytes, us=us,
                                 gbps=nbytes / us / 1e3))
            print(f"matvec {dtype:5s} {name:8s} {rows}x{cols}: {us:8.1f} us  {nbytes / us / 1e3:7.0f} GB/s", flush=True)
            del ws
            torch.cuda.empty_cache()
    return rows_out


def bench_matvec_n(lib, types, counts=(1, 4, 8, 16, 32)):
    """matvec_n (the generated tokens' kernel) and matmul (the prompt tokens') per Phi-4 matrix and
    token count (us per launch set and per token), and a decode step's linear layers (40 layers of
    qkv, o, gate_up, down, and the lm_head) per token count, each kernel."""
    rows_out = []
    for dtype in types:
        step = {(op, n): 0.0 for op in ("matvec_n", "matmul") for n in counts}
        for name, (rows, cols) in SHAPES.items():
            nbytes = sum(sections(dtype, rows, cols))
            copies = max(2, math.ceil(1.5e9 / nbytes))
            ws = [random_weight(dtype, rows, cols) for _ in range(copies)]
            x = torch.randn(max(counts), cols, device="cuda")
            y = torch.empty(max(counts), rows, device="cuda")
            per_launch = lib.matvec_tokens(ws[0])
            for op in ("matvec_n", "matmul"):
                for n in counts:
                    if op == "matmul":
                        p = pass_tensor(0, n)
                        ms, _ = time_graph(lambda: [lib.matmul(w, x, y, n, rows, p) for w in ws])
                    elif n == 1:
                        ms, _ = time_graph(lambda: [lib.matvec(w, x[0], y[0]) for w in ws])
                    else:
                        ms, _ = time_graph(lambda: [lib.matvec_n(w, x, y, n) for w in ws])
                    us = ms * 1e3 / copies
                    step[op, n] += us * (1 if name == "lm_head" else PHI4["layers"])
                    rows_out.append(dict(op=op, type=dtype, matrix=name, tokens=n, per_launch=per_launch, us=us,
                                         us_per_token=us / n, weight_gbps=nbytes / us / 1e3))
                    print(f"{op:8s} {dtype:5s} {name:8s} {rows}x{cols} {n:2d} tokens"
                          f"{f' ({per_launch} a launch)' if op == 'matvec_n' else ''}: "
                          f"{us:8.1f} us, {us / n:7.1f} us a token, weights {nbytes / us / 1e3:5.0f} GB/s", flush=True)
            del ws
            torch.cuda.empty_cache()
        for (op, n), us in step.items():
            rows_out.append(dict(op=op, type=dtype, matrix="step", tokens=n, us=us, us_per_token=us / n))
            print(f"{op:8s} {dtype:5s} decode step's linear layers, {n:2d} tokens: {us / 1e3:6.2f} ms "
                  f"({us / n / 1e3:5.3f} ms a token)", flush=True)
    return rows_out


def bench_attention_batch(lib, n_seq=32, slot_len=577, layers=40):
    """Decode attention of n_seq sequences of slot_len - 1 positions each in one launch, per layer."""
    c = PHI4
    nh, nkv, hd = c["heads"], c["kv_heads"], c["head_dim"]
    stride = (nh + 2 * nkv) * hd
    caches = [(torch.randn(nkv, n_seq * slot_len, hd, device="cuda").half(),
               torch.randn(nkv, n_seq * slot_len, hd, device="cuda").half()) for _ in range(layers)]
    qkv = torch.randn(n_seq, stride, device="cuda")
    o = torch.empty(n_seq, nh * hd, device="cuda")
    out = []
    for n in (1, n_seq):
        ws = lib.decode_workspace(nh, nkv, hd, n_seq * slot_len, slot_len, n)
        p = batch_pass([(s, slot_len - 1, 1) for s in range(n)], n, slot_len)
        ms, _ = time_graph(lambda: [lib.attention_decode(qkv, k, v, o, nh, nkv, hd, n_seq * slot_len, stride,
                                                         1 / math.sqrt(hd), ws, p, n_decode=n, slot_len=slot_len)
                                    for k, v in caches])
        us = ms * 1e3 / layers
        out.append(dict(sequences=n, positions=slot_len, us_per_layer=us))
        print(f"attention decode f16 cache, {n} sequences of {slot_len} positions, Phi-4 layer: {us:6.1f} us", flush=True)
    del caches
    torch.cuda.empty_cache()
    return out


def bench_attention(lib, n_ctx=4096, layers=40, n_kv=4096):
    c = PHI4
    nh, nkv, hd = c["heads"], c["kv_heads"], c["head_dim"]
    stride = (nh + 2 * nkv) * hd
    out = []
    for kv_dtype in (torch.float16, torch.float32):
        caches = [(torch.randn(nkv, n_ctx, hd, device="cuda").to(kv_dtype),
                   torch.randn(nkv, n_ctx, hd, device="cuda").to(kv_dtype)) for _ in range(layers)]
        qkv = torch.randn(stride, device="cuda")
        o = torch.empty(nh * hd, device="cuda")
        ws = lib.decode_workspace(nh, nkv, hd, n_ctx)
        p = pass_tensor(n_kv - 1, 1, n_decode=1)
        ms, _ = time_graph(lambda: [lib.attention_decode(qkv, k, v, o, nh, nkv, hd, n_ctx, stride, 1 / math.sqrt(hd), ws, p)
                                    for k, v in caches])
        us = ms * 1e3 / layers
        nbytes = 2 * nkv * n_kv * hd * caches[0][0].element_size()
        name = "f16" if kv_dtype == torch.float16 else "f32"
        out.append(dict(kv=name, n_ctx=n_ctx, positions=n_kv, us_per_layer=us, gbps=nbytes / us / 1e3))
        print(f"attention decode {name} cache, {n_kv} positions, Phi-4 layer: {us:6.1f} us ({nbytes / us / 1e3:5.0f} GB/s)",
              flush=True)
        del caches
        torch.cuda.empty_cache()
    return out


def bench_prefill(lib, types, n=512):
    """Tensor-core mat-mul TFLOP/s for n tokens, and prefill attention per layer."""
    out = []
    for dtype in types:
        kernel = "f16" if dtype in DENSE else "s8"
        for name in ("qkv", "o", "gate_up", "down"):
            rows, cols = SHAPES[name]
            w = random_weight(dtype, rows, cols)
            x = torch.randn(n, cols, device="cuda")
            y = torch.empty(n, rows, device="cuda")
            p = pass_tensor(0, n)
            ms, _ = time_graph(lambda: [lib.matmul(w, x, y, n, rows, p) for _ in range(5)])
            us = ms * 1e3 / 5
            tflops = 2 * rows * cols * n / us / 1e6
            out.append(dict(op="matmul", type=dtype, kernel=kernel, matrix=name, tokens=n, us=us, tflops=tflops))
            print(f"matmul {dtype:5s} {kernel} {name:8s} {rows}x{cols} x {n} tokens: {us:8.1f} us  {tflops:6.1f} TFLOP/s",
                  flush=True)
    c = PHI4
    nh, nkv, hd, n_ctx = c["heads"], c["kv_heads"], c["head_dim"], 4096
    stride = (nh + 2 * nkv) * hd
    qkv = torch.randn(n, stride, device="cuda")
    k = torch.randn(nkv, n_ctx, hd, device="cuda").half()
    v = torch.randn(nkv, n_ctx, hd, device="cuda").half()
    o = torch.empty(n, nh * hd, device="cuda")
    p = pass_tensor(0, n)
    ms, _ = time_graph(lambda: [lib.attention_prefill(qkv, k, v, o, nh, nkv, hd, n_ctx, stride, n, 1 / math.sqrt(hd), p)
                                for _ in range(5)])
    us = ms * 1e3 / 5
    flops = 4 * nh * hd * n * (n + 1) / 2  # QK^T and PV over the causal half
    out.append(dict(op="attention_prefill", tokens=n, us=us, tflops=flops / us / 1e6))
    print(f"attention prefill f16 cache, {n} tokens, Phi-4 layer: {us:8.1f} us  {flops / us / 1e6:5.1f} TFLOP/s", flush=True)
    return out


class DecodeStep:
    """A Phi-4-shaped model of random weights of one type, its buffers and one decode step."""

    def __init__(self, lib, dtype, n_ctx=4096):
        c = PHI4
        self.lib, self.c, self.n_ctx = lib, c, n_ctx
        h, nh, nkv, hd, inter = c["hidden"], c["heads"], c["kv_heads"], c["head_dim"], c["inter"]
        self.qkv_rows = (nh + 2 * nkv) * hd
        self.embed = random_weight(dtype, c["vocab"], h)
        self.lm_head = random_weight(dtype, c["vocab"], h)
        self.layers = [dict(qkv=random_weight(dtype, self.qkv_rows, h), o=random_weight(dtype, h, nh * hd),
                            gate_up=random_weight(dtype, 2 * inter, h), down=random_weight(dtype, h, inter),
                            n1=1 + 0.1 * torch.randn(h, device="cuda"), n2=1 + 0.1 * torch.randn(h, device="cuda"),
                            k=torch.zeros(nkv, n_ctx, hd, dtype=torch.float16, device="cuda"),
                            v=torch.zeros(nkv, n_ctx, hd, dtype=torch.float16, device="cuda")) for _ in range(c["layers"])]
        self.final_norm = 1 + 0.1 * torch.randn(h, device="cuda")
        f = lambda n: torch.zeros(n, device="cuda")  # noqa: E731
        self.x, self.xn, self.qkv, self.attn = f(h), f(h), f(self.qkv_rows), f(nh * hd)
        self.proj, self.gu, self.act, self.logits = f(h), f(2 * inter), f(inter), f(c["vocab"])
        self.ids = torch.zeros(4, dtype=torch.int32, device="cuda")
        self.ws = lib.decode_workspace(nh, nkv, hd, n_ctx)
        self.pass_ = pass_tensor(0, 1, n_decode=1)
        self.generated = torch.zeros(n_ctx + 256, dtype=torch.int32, device="cuda")  # next_token's output
        self.inv_freq = 1.0 / c["theta"] ** (torch.arange(0, hd, 2, device="cuda", dtype=torch.float64) / hd)
        self.inv_freq = self.inv_freq.float()
        self.weight_bytes = sum(w.data.numel() for L in self.layers for w in (L["qkv"], L["o"], L["gate_up"], L["down"]))
        self.weight_bytes += self.lm_head.data.numel()

    def attention(self, L):
        lib, c, p = self.lib, self.c, self.pass_
        nh, nkv, hd = c["heads"], c["kv_heads"], c["head_dim"]
        lib.rope(self.qkv, self.inv_freq, 1, nh + nkv, hd, hd, self.qkv_rows, 1.0, p)
        lib.kv_store(self.qkv, L["k"], L["v"], nh, nkv, hd, self.n_ctx, self.qkv_rows, 1, p)
        lib.attention_decode(self.qkv, L["k"], L["v"], self.attn, nh, nkv, hd, self.n_ctx, self.qkv_rows,
                             1 / math.sqrt(hd), self.ws, p)

    def step(self, fused):
        lib, c, p = self.lib, self.c, self.pass_
        h, inter, eps = c["hidden"], c["inter"], c["eps"]
        lib.get_rows(self.embed, self.ids, self.x, 1, p)
        for L in self.layers:
            if fused:
                lib.matvec(L["qkv"], self.x, self.qkv, norm_weight=L["n1"], eps=eps)
                self.attention(L)
                lib.matvec(L["o"], self.attn, self.x, accumulate=True)
                lib.matvec(L["gate_up"], self.x, self.gu, norm_weight=L["n2"], eps=eps)
                lib.matvec(L["down"], self.gu, self.x, silu=True, accumulate=True)
            else:
                lib.rms_norm(self.x, L["n1"], self.xn, h, eps, 1, False, p)
                lib.matvec(L["qkv"], self.xn, self.qkv)
                self.attention(L)
                lib.matvec(L["o"], self.attn, self.proj)
                lib.add(self.x, self.proj, h, 1, p)
                lib.rms_norm(self.x, L["n2"], self.xn, h, eps, 1, False, p)
                lib.matvec(L["gate_up"], self.xn, self.gu)
                lib.silu_mul(self.gu, self.act, inter, 1, 2 * inter, p)
                lib.matvec(L["down"], self.act, self.proj)
                lib.add(self.x, self.proj, h, 1, p)
        if fused:
            lib.matvec(self.lm_head, self.x, self.logits, norm_weight=self.final_norm, eps=eps)
        else:
            lib.rms_norm(self.x, self.final_norm, self.xn, h, eps, 1, True, p)
            lib.matvec(self.lm_head, self.xn, self.logits)
        lib.argmax(self.logits, c["vocab"], self.ids)
        lib.next_token(p, self.ids, self.generated)

    def tokens_per_s(self, fused, n_past, steps=128):
        """Replays the captured step `steps` times from position n_past; tokens per second."""
        _, g = time_graph(lambda: self.step(fused), reps=1, warmup=0)
        self.pass_.copy_(pass_tensor(n_past, 1, n_decode=1))
        g.replay()  # warm
        self.pass_.copy_(pass_tensor(n_past, 1, n_decode=1))
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            g.replay()
        b.record()
        b.synchronize()
        assert self.pass_.cpu().tolist()[:2] == [n_past + steps, 1]
        return steps / (a.elapsed_time(b) / 1e3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="q4 and q8_0 mat-vecs only")
    ap.add_argument("--types", help="comma-separated types of the mat-vecs and mat-muls, or of --tokens (instead of the default list)")
    ap.add_argument("--step-types", default="q4,q8_0", help="comma-separated types of the decode steps")
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--prefill-only", action="store_true", help="the prefill mat-muls and attention only")
    ap.add_argument("--tokens", action="store_true", help="matvec_n for 1 to 32 tokens and batched decode attention only")
    args = ap.parse_args()
    torch.manual_seed(0)
    lib = Lib()
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    if args.tokens:
        tokens_types = ["q4", "q8_0"] if args.quick else ["q4", "q8_0", "q3", *GRID_TYPES]
        res["matvec_n"] = bench_matvec_n(lib, args.types.split(",") if args.types else tokens_types)
        res["attention_batch"] = bench_attention_batch(lib)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        return
    res["copy_gbps"], res["copy_kernel_gbps"] = copy_bandwidth()
    print(f"device-to-device copy (read + write): cudaMemcpy {res['copy_gbps']:.0f} GB/s, "
          f"SM kernel {res['copy_kernel_gbps']:.0f} GB/s", flush=True)
    types = ["q4", "q8_0"] if args.quick else ["q4", "q3", "q8_0", *GRID_TYPES, "f16", "bf16", "f32"]
    prefill = ["q4", "q8_0", "q3"] if args.quick else ["q4", "q8_0", "q3", *GRID_TYPES, "f16"]
    if args.types:
        types = prefill = args.types.split(",")
    res["matvec"] = [] if args.prefill_only else bench_matvec(lib, types, SHAPES)
    res["attention"] = [] if args.prefill_only else bench_attention(lib) + bench_attention(lib, n_kv=64)
    res["prefill"] = bench_prefill(lib, prefill)
    res["decode_step"] = []
    if not (args.skip_step or args.prefill_only):
        for dtype in args.step_types.split(","):
            m = DecodeStep(lib, dtype)
            for fused, pdl in ((False, True), (True, False), (True, True)):
                lib.set_programmatic_launch(pdl)
                for n_past in (0, 3968):
                    tps = m.tokens_per_s(fused, n_past)
                    r = dict(type=dtype, fused=fused, pdl=pdl, n_past=n_past, tok_s=tps,
                             weight_gbps=m.weight_bytes * tps / 1e9)
                    res["decode_step"].append(r)
                    print(f"decode step {dtype} {'fused' if fused else 'unfused'} pdl={int(pdl)} positions "
                          f"{n_past}..{n_past + 127}: {tps:6.1f} tok/s ({r['weight_gbps']:.0f} GB/s of weights)", flush=True)
            lib.set_programmatic_launch(True)
            del m
            torch.cuda.empty_cache()
    res["copy_gbps_end"], res["copy_kernel_gbps_end"] = copy_bandwidth()
    print("\nsummary (copy peer, cudaMemcpy / SM kernel: %.0f / %.0f GB/s at the start, %.0f / %.0f at the end)"
          % (res["copy_gbps"], res["copy_kernel_gbps"], res["copy_gbps_end"], res["copy_kernel_gbps_end"]))
    for name in SHAPES:
        print(f"  {name:8s} " + "  ".join(f"{r['type']}:{r['gbps']:5.0f}" for r in res["matvec"] if r["matrix"] == name))
    for r in res["decode_step"]:
        print(f"  step {r['type']:5s} {'fused  ' if r['fused'] else 'unfused'} pdl={int(r['pdl'])} n_past {r['n_past']:5d}: "
              f"{r['tok_s']:6.1f} tok/s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
