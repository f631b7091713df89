"""The Metal kernels (metal/*.metal), run on the CPU through the fiber harness and compared with
numpy references on random inputs and ragged shapes (DESIGN.md, "Metal without a Mac").

Quantized weights come from the engine's quantizer (``_core.quantize``); what they decode to comes
from the independent numpy decoder in tests/reference/quant.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from metal_harness import harness
from metal_harness.gpu import HarnessGpu
from reference import quant as ref
from upg_backend import _core

ROOT = Path(__file__).resolve().parents[1]
C = harness.constants()
ARGS = harness.arg_structs()
SENTINEL = np.float32(12345.0)  # fills the guard tail of every output buffer
GUARD = 64

MATRIX_TYPES = [("f32", 0), ("f16", 0), ("bf16", 0), ("q8_0", 32), ("q8_0", 64), ("q4", 32),
                ("q4", 64), ("q3", 32), ("q3", 64), ("iq4_nl", 32), ("iq4_xs", 32), ("iq3", 32)]


def fit(type_: str, cols: int) -> int:
    """cols, rounded up to whole super-blocks for the types that have them."""
    return -(-cols // ref.SUPER) * ref.SUPER if type_ in ref.SUPER_TYPES else cols


def guarded(n: int) -> np.ndarray:
    """An output buffer of n floats followed by a sentinel tail that catches overruns."""
    return np.full(n + GUARD, SENTINEL, np.float32)


def body(buf: np.ndarray, n: int) -> np.ndarray:
    assert np.all(buf[n:] == SENTINEL), "the kernel wrote past the end of its output"
    return buf[:n]


def kname(prefix: str, type_: str, block: int) -> str:
    return f"{prefix}_{type_}" + (f"_b{block}" if block else "")


# ---- weights ----

def random_outliers(rng, rows: int, cols: int):
    """CSR outliers (rowptr, col, f16 bits): 0..3 per row, some rows empty."""
    counts = rng.integers(0, 4, rows)
    rowptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    col = np.concatenate([np.sort(rng.choice(cols, c, replace=False)) for c in counts]).astype(np.int32)
    val = (rng.standard_normal(rowptr[-1]) * 4).astype(np.float16).view(np.uint16)
    return rowptr, col, val


def make_matrix(rng, type_: str, block: int, rows: int, cols: int, outliers: bool):
    """(bytes, args, outlier buffers, the effective float64 matrix) of a random weight."""
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    # the grid types carry no outliers (FORMAT.md)
    o = random_outliers(rng, rows, cols) if outliers and type_ not in ref.GRID_TYPES else None
    if o is not None:  # the writer zeroes outlier positions before quantizing
        for r in range(rows):
            w[r, o[1][o[0][r]:o[0][r + 1]]] = 0.0
    data = _core.quantize(type_, block, w)
    dense = ref.dequantize(type_, block, data, rows, cols)
    eff = ref.add_outliers(dense, *o) if o is not None else dense.astype(np.float64)
    codes = {"q8_0": rows * cols, "q4": rows * cols // 2, "q3": rows * cols // 4, "iq4_nl": rows * cols // 2,
             "iq4_xs": rows * cols // 2, "iq3": rows * cols // 4}.get(type_, 0)
    high = rows * cols // 8 if type_ in ("q3", "iq3") else 0
    sub = rows * (cols // 64 + cols // 128) if type_ in ref.SUPER_TYPES else 0
    args = ARGS["UpgMatArgs"](rows=rows, cols=cols, block=block, high_offset=ref.pad64(codes),
                              scales_offset=ref.pad64(codes) + ref.pad64(high) + ref.pad64(sub),
                              sub_offset=ref.pad64(codes) + ref.pad64(high), has_outliers=int(o is not None))
    bufs = {0: np.ascontiguousarray(data), 3: None, 4: None, 5: None, 6: args}
    if o is not None:
        bufs.update({3: o[0], 4: o[1], 5: o[2]})
    return bufs, args, eff


def close(got, want, rtol=2e-5, atol=1e-4):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * max(1.0, float(np.abs(want).max())))


# ---- the harness itself ----

def test_sources_pass_the_lint():
    assert harness.lint(harness.harness_sources() + harness.kernel_headers()) == []


@pytest.mark.parametrize("snippet, what", [
    ("inline float f(float x) { return std::exp(x); }", "standard library"),
    ("inline void f() { float* p = new float[4]; delete[] p; }", "new/delete"),
    ("struct S { virtual float f(); };", "virtual"),
    ("inline void f() { try { } catch (...) { } }", "exceptions"),
    ("inline void f() { a: goto a; }", "goto"),
    ("thread_local int n;", "thread_local"),
    ("inline double f(float x) { return x; }", "double"),
    ("inline float f(float x) { auto g = [](float y) { return y; }; return g(x); }", "lambda"),
    ("inline float f(float x) { auto g = [=] { return x; }; return g(); }", "lambda"),
    ("inline int f(int n) { return n ? f(n - 1) : 0; }", "recursion"),
    ("inline int g(int n);\ninline int f(int n) { return g(n); }\ninline int g(int n) { return f(n); }", "recursion"),
    ("#include <cmath>", "include"),
    ("inline void f() { threadgroup float a[32]; }", "threadgroup array"),
])
def test_lint_rejects_what_metal_lacks(tmp_path, snippet, what):
    src = tmp_path / "bad.metal"
    src.write_text("#include <metal_stdlib>\n" + snippet + "\n")
    problems = harness.lint([src]) if what != "recursion" else harness._recursion(
        harness._functions(harness._blank_comments_and_strings(src.read_text())))
    assert problems, f"{what} was not caught"


def test_lint_accepts_subscripts_attributes_and_comments(tmp_path):
    src = tmp_path / "good.metal"
    src.write_text('#include <metal_stdlib>\n#include "upg_common.h"\n'
                   "// std::vector new delete virtual goto in a comment\n"
                   "kernel void k(device float* a [[buffer(0)]], uint i [[thread_position_in_grid]]) {\n"
                   "  float b[4]; b[0] = a[i]; a[(i + 1) % 4] = b[0] + a[b[0] > 0 ? 1 : 2];\n}\n")
    assert harness.lint([src]) == []


def test_host_source_list_names_every_kernel_file():
    """The compile-from-source fallback of cpp/metal/metal_backend.mm concatenates every file."""
    host = (ROOT / "cpp" / "metal" / "metal_backend.mm").read_text()
    listed = re.search(r"kSources\[\] = \{(.*?)\};", host, re.S).group(1)
    assert sorted(re.findall(r'"(\w+\.metal)"', listed)) == [p.name for p in harness.metal_sources()]


def test_q3_unpacking_agrees_with_quant_h(tmp_path):
    """Metal's q3 unpacking (metal/upg_dequant.h) decodes every code as cpp/upg/quant.h does (the
    type codes and alignments both read from cpp/upg/upg_common.h)."""
    prog = tmp_path / "check.cpp"
    prog.write_text(r"""
#include <cstdio>
#include "upg/quant.h"
#include <metal_stdlib>
#include "upg_dequant.h"
template <int B> int check() {
  int bad = 0;
  uint8_t ql[B / 4], qh[B / 8];
  for (int v = 0; v < 256; ++v) {
    for (auto& b : ql) b = uint8_t(v * 37 + 11);
    for (int i = 0; i < B / 8; ++i) qh[i] = uint8_t(v + i * 91);
    for (int j = 0; j < B; ++j) bad += upg::q3_code(ql, qh, B, j) != upg_q3_code<B>(ql, qh, j);
  }
  return bad;
}
int main() { std::printf("%d\n", check<32>() + check<64>()); }
""")
    exe = tmp_path / "check"
    subprocess.run([harness.CXX, "-std=c++17", f"-I{ROOT / 'cpp'}", f"-I{harness.COMPAT}",
                    f"-I{harness.METAL}", f"-I{harness.COMMON.parent}", str(prog), "-o", str(exe)], check=True)
    assert subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.strip() == "0"


def test_barrier_waits_for_every_thread(lib):
    for n in (64, 100, 1024):
        out = guarded(n)
        lib.launch("selftest_barrier", {0: out}, (1,), (n,), [4 * n])
        np.testing.assert_array_equal(body(out, n), (np.arange(n) + 1) % n)


def test_simd_functions_and_partial_simdgroups(lib):
    rng = np.random.default_rng(0)
    n = 48  # a full simdgroup and one of 16 lanes
    x = rng.standard_normal(n).astype(np.float32)
    out = guarded(6 * n)
    lib.launch("selftest_simd", {0: x, 1: out}, (1,), (n,))
    got = body(out, 6 * n).reshape(n, 6)
    for lo, hi in ((0, 32), (32, 48)):
        g, lanes = x[lo:hi], np.arange(hi - lo)
        np.testing.assert_allclose(got[lo:hi, 0], np.full(hi - lo, g.sum(dtype=np.float64)), rtol=1e-6)
        np.testing.assert_array_equal(got[lo:hi, 1], np.full(hi - lo, g.max()))
        np.testing.assert_array_equal(got[lo:hi, 2], np.where(lanes + 1 < hi - lo, g[np.minimum(lanes + 1, hi - lo - 1)], g))
        np.testing.assert_array_equal(got[lo:hi, 3], g[lanes ^ 1])
        np.testing.assert_array_equal(got[lo:hi, 4], np.full(hi - lo, g[3]))
        np.testing.assert_array_equal(got[lo:hi, 5], np.full(hi - lo, g.min()))


def test_deadlock_and_divergent_barriers_are_errors(lib):
    with pytest.raises(ValueError, match="deadlock"):
        lib.launch("selftest_deadlock", {0: guarded(64)}, (1,), (64,))
    with pytest.raises(ValueError, match="divergent"):
        lib.launch("selftest_divergent", {0: guarded(64)}, (1,), (64,))


def test_launch_checks_bindings(lib):
    with pytest.raises(ValueError, match="not bound"):
        lib.launch("kernel_add", {0: guarded(4)}, (1,), (32,))
    with pytest.raises(ValueError, match="no kernel"):
        lib.launch("kernel_nope", {}, (1,), (32,))


# ---- mat-vec, mat-mat, embedding ----

@pytest.mark.parametrize("type_, block", MATRIX_TYPES)
@pytest.mark.parametrize("outliers", [False, True])
def test_matvec(lib, type_, block, outliers):
    rng = np.random.default_rng(1)
    rows_per_group = C["UPG_MV_SG"] * C["UPG_MV_ROWS"]
    # rows not a multiple of the rows per simdgroup or threadgroup; cols not a multiple of 256
    for rows, cols in ((37, fit(type_, 320) if block else 100), (5, fit(type_, 64) if block else 7)):
        bufs, _, w = make_matrix(rng, type_, block, rows, cols, outliers)
        x = rng.standard_normal(cols).astype(np.float32)
        y = guarded(rows)
        lib.launch(kname("kernel_matvec", type_, block), {**bufs, 1: x, 2: y},
                   (-(-rows // rows_per_group),), (C["UPG_MV_SG"] * 32,))
        close(body(y, rows), w @ x.astype(np.float64))


def test_matvec_matches_cpu_backend(lib):
    """The same bytes through the C++ CPU backend give the same y. The CPU backend rounds the
    activations of quantized weights to 8 bits (Metal keeps f32), so x is taken on that grid
    already, where the rounding changes nothing."""
    rng = np.random.default_rng(2)
    rows, cols = 29, 192
    bufs, _, _ = make_matrix(rng, "q3", 64, rows, cols, True)
    x = ref.activations_as_used("q3", 64, rng.standard_normal(cols).astype(np.float32)).astype(np.float32)
    np.testing.assert_array_equal(ref.activations_as_used("q3", 64, x), x)
    y = guarded(rows)
    lib.launch("kernel_matvec_q3_b64", {**bufs, 1: x, 2: y}, (-(-rows // 8),), (64,))
    want = _core.matvec("q3", 64, bufs[0], rows, cols, x, outliers=(bufs[3], bufs[4], bufs[5]))
    close(body(y, rows), want)


@pytest.mark.parametrize("type_, block", MATRIX_TYPES)
def test_matmul(lib, type_, block):
    rng = np.random.default_rng(3)
    tm, tn, tk = C["UPG_MM_TM"], C["UPG_MM_TN"], C["UPG_MM_TK"]
    # rows, tokens and (dense) cols not multiples of the tile
    for rows, cols, n, outliers in ((45, fit(type_, 128) if block else 70, 19, True),
                                    (8, fit(type_, 64) if block else 33, 1, False)):
        bufs, args, w = make_matrix(rng, type_, block, rows, cols, outliers)
        ldy = rows + 3
        args.n_tokens, args.ldy = n, ldy
        x = rng.standard_normal((n, cols)).astype(np.float32)
        y = guarded(n * ldy)
        y[: n * ldy] = np.float32(-7.0)  # the ldy padding must stay untouched
        lib.launch(kname("kernel_matmul", type_, block), {**bufs, 1: x, 2: y},
                   (-(-rows // tm), -(-n // tn)), (C["UPG_MM_SG"] * 32,),
                   [4 * tk * tm, 4 * tn * tk, 4 * tn * tm])
        got = body(y, n * ldy).reshape(n, ldy)
        close(got[:, :rows], x.astype(np.float64) @ w.T)
        assert np.all(got[:, rows:] == np.float32(-7.0))


@pytest.mark.parametrize("type_, block", MATRIX_TYPES)
def test_get_rows(lib, type_, block):
    rng = np.random.default_rng(4)
    rows, cols = 23, fit(type_, 192) if block else 75
    bufs, args, w = make_matrix(rng, type_, block, rows, cols, True)
    ids = np.array([3, 0, 22, 3, -1, 23, 11], np.int32)  # repeats, and two ids out of range
    args.n_tokens = len(ids)
    out = guarded(len(ids) * cols)
    lib.launch(kname("kernel_get_rows", type_, block), {**bufs, 1: ids, 2: out}, (len(ids),), (64,))
    got = body(out, len(ids) * cols).reshape(len(ids), cols)
    valid = (ids >= 0) & (ids < rows)
    close(got[valid], w[ids[valid]], rtol=1e-6, atol=1e-6)
    assert np.all(got[~valid] == 0)


# ---- normalization, RoPE, elementwise, argmax ----

def test_rms_norm(lib):
    rng = np.random.default_rng(5)
    for n_tokens, n in ((3, 200), (2, 1000), (1, 5120)):
        x = rng.standard_normal((n_tokens, n)).astype(np.float32)
        w = rng.standard_normal(n).astype(np.float32)
        out = guarded(n_tokens * n)
        lib.launch("kernel_rms_norm", {0: x, 1: w, 2: out, 3: ARGS["UpgNormArgs"](n=n, eps=1e-5)},
                   (n_tokens,), (C["UPG_REDUCE_THREADS"],), [4 * C["UPG_REDUCE_THREADS"] // 32])
        x64 = x.astype(np.float64)
        want = x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + 1e-5) * w
        close(body(out, n_tokens * n).reshape(n_tokens, n), want)


def pass_buffer(n_past: int, n_tokens: int) -> np.ndarray:
    """The per-pass values the kernels read (upg_common.h): UpgPass, an UpgToken per token, the
    one UpgSeq."""
    toks = [[n_past + t, 0, 0, 0] for t in range(n_tokens)]
    return np.array([n_past, n_tokens, 1, 0, *sum(toks, []), 0, n_tokens, n_past, 0, 0, 0, 0, 0], np.int32)


def rope_reference(x, pos0, rot, theta, factors, attn_factor):
    """Rotate-half RoPE on the first rot dims of each head of x [tokens, heads, head_dim]."""
    half = rot // 2
    inv_freq = 1.0 / (factors * theta ** (np.arange(half) * 2.0 / rot))
    ang = (pos0 + np.arange(x.shape[0]))[:, None] * inv_freq  # [tokens, half]
    c, s = (np.cos(ang) * attn_factor)[:, None], (np.sin(ang) * attn_factor)[:, None]
    out = x.astype(np.float64).copy()
    x1, x2 = out[..., :half].copy(), out[..., half:rot].copy()
    out[..., :half], out[..., half:rot] = x1 * c - x2 * s, x2 * c + x1 * s
    return out


@pytest.mark.parametrize("head_dim, rot, longrope", [(32, 32, False), (64, 48, True), (128, 96, False)])
def test_rope(lib, head_dim, rot, longrope):
    """Query and key heads rotate inside a fused qkv row; the V heads stay as they are."""
    rng = np.random.default_rng(6)
    n_tokens, n_heads, n_kv, pos0, theta = 5, 4, 2, 1000, 10000.0
    qkv = rng.standard_normal((n_tokens, (n_heads + 2 * n_kv) * head_dim)).astype(np.float32)
    factors = (rng.uniform(1, 8, rot // 2) if longrope else np.ones(rot // 2)).astype(np.float32)
    attn_factor = 1.19 if longrope else 1.0
    args = ARGS["UpgRopeArgs"](n_tokens=n_tokens, n_heads=n_heads + n_kv, head_dim=head_dim, rot_dims=rot,
                               token_stride=qkv.shape[1], attn_factor=attn_factor)
    inv_freq = (1.0 / (factors * theta ** (np.arange(rot // 2) * 2.0 / rot))).astype(np.float32)  # as the host's
    got = qkv.copy()
    lib.launch("kernel_rope", {0: got, 1: inv_freq, 2: pass_buffer(pos0, n_tokens), 3: args},
               (-(-(rot // 2) // 32), n_heads + n_kv, n_tokens), (32,))
    rotated = (n_heads + n_kv) * head_dim
    want = rope_reference(qkv[:, :rotated].reshape(n_tokens, -1, head_dim), pos0, rot, theta,
                          factors.astype(np.float64), attn_factor)
    close(got[:, :rotated].reshape(n_tokens, -1, head_dim), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got[:, rotated:], qkv[:, rotated:])


def test_rope_layout_matches_transformers(lib):
    """The rotate-half convention is the one transformers' Phi-3 applies (partial rotary)."""
    import torch
    from transformers.models.phi3 import modeling_phi3

    rng = np.random.default_rng(7)
    head_dim, rot, n_tokens = 64, 48, 6
    q = rng.standard_normal((n_tokens, 1, head_dim)).astype(np.float32)
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, rot, 2) / rot))
    freqs = np.arange(n_tokens)[:, None] * inv_freq
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = (torch.tensor(f(emb), dtype=torch.float32)[None] for f in (np.cos, np.sin))
    qt = torch.tensor(q).permute(1, 0, 2)[None]  # [batch, heads, tokens, head_dim]
    want, _ = modeling_phi3.apply_rotary_pos_emb(qt, qt, cos, sin)
    args = ARGS["UpgRopeArgs"](n_tokens=n_tokens, n_heads=1, head_dim=head_dim, rot_dims=rot, token_stride=head_dim,
                               attn_factor=1.0)
    got = q.copy()
    lib.launch("kernel_rope", {0: got, 1: inv_freq.astype(np.float32), 2: pass_buffer(0, n_tokens), 3: args},
               (1, 1, n_tokens), (32,))
    close(got[:, 0], want[0, 0].numpy(), rtol=1e-4, atol=1e-4)


def test_silu_mul_and_add(lib):
    rng = np.random.default_rng(8)
    n_tokens, n = 3, 333
    gu = rng.standard_normal((n_tokens, 2 * n + 5)).astype(np.float32) * 4  # padded rows
    out = guarded(n_tokens * n)
    args = ARGS["UpgEltArgs"](n=n, n_tokens=n_tokens, in_stride=gu.shape[1])
    lib.launch("kernel_silu_mul", {0: gu, 1: out, 2: args}, (-(-n_tokens * n // 256),), (256,))
    g, u = gu[:, :n].astype(np.float64), gu[:, n:2 * n].astype(np.float64)
    close(body(out, n_tokens * n).reshape(n_tokens, n), g / (1 + np.exp(-g)) * u)

    x = rng.standard_normal(n_tokens * n + GUARD).astype(np.float32)
    y = rng.standard_normal(n_tokens * n).astype(np.float32)
    want = x.copy()
    want[: n_tokens * n] += y
    lib.launch("kernel_add", {0: x, 1: y, 2: args}, (-(-n_tokens * n // 256),), (256,))
    np.testing.assert_array_equal(x, want)


@pytest.mark.parametrize("n, where", [(1000, "random"), (100352, "last"), (77, "tie"), (5, "negative")])
def test_argmax(lib, n, where):
    rng = np.random.default_rng(9)
    x = rng.standard_normal(n).astype(np.float32)
    if where == "last":
        x[-1] = 100.0
    elif where == "tie":
        x[[40, 9, 70]] = 50.0  # the lowest index wins
    elif where == "negative":
        x = -np.abs(x) - 1
    out = np.full(2, -5, np.int32)
    lib.launch("kernel_argmax", {0: x, 1: out, 2: ARGS["UpgEltArgs"](n=n, n_tokens=1, in_stride=0)},
               (1,), (C["UPG_REDUCE_THREADS"],), [4 * C["UPG_REDUCE_THREADS"] // 32] * 2)
    assert out[0] == np.argmax(x) and out[1] == -5


# ---- attention ----

def attention_reference(q, k, v, n_kv_heads, scale, lengths):
    """q [tokens, heads, hd]; k, v [kv_heads, positions, hd]; token t attends lengths[t] positions."""
    n_heads = q.shape[1]
    out = np.zeros(q.shape, np.float64)
    for t, n in enumerate(lengths):
        for h in range(n_heads):
            kvh = h // (n_heads // n_kv_heads)
            s = k[kvh, :n].astype(np.float64) @ q[t, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[t, h] = p @ v[kvh, :n].astype(np.float64) / p.sum()
    return out


def run_attention(lib, rng, kind, kv_type, n_heads, n_kv_heads, head_dim, n_kv, n_tokens):
    """decode: one token attends n_kv positions (it sits at n_kv - 1); prefill: n_tokens tokens
    after n_kv cached ones, each attending causally."""
    n_ctx = n_kv + n_tokens + 3  # the cache has room beyond the attended positions
    k = rng.standard_normal((n_kv_heads, n_ctx, head_dim)).astype(kv_type)
    v = rng.standard_normal((n_kv_heads, n_ctx, head_dim)).astype(kv_type)
    q_stride = (n_heads + 2 * n_kv_heads) * head_dim  # queries sit in the fused qkv rows
    qkv = (rng.standard_normal((n_tokens, q_stride)) * 0.5).astype(np.float32)
    scale = 1.0 / np.sqrt(head_dim)
    args = ARGS["UpgAttnArgs"](n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                               kv_stride=n_ctx, q_stride=q_stride, n_tokens=n_tokens, scale=scale)
    out = guarded(n_tokens * n_heads * head_dim)
    suffix = "f16" if kv_type == np.float16 else "f32"
    n_past = n_kv - 1 if kind == "decode" else n_kv
    lib.launch(f"kernel_attn_{suffix}", {0: qkv, 1: k, 2: v, 3: out, 4: pass_buffer(n_past, n_tokens), 5: args},
               (n_heads, n_tokens), (C["UPG_ATTN_SG"] * 32,), [4 * C["UPG_ATTN_SG"] * (head_dim + 2)])
    q = qkv[:, : n_heads * head_dim].reshape(n_tokens, n_heads, head_dim)
    lengths = [n_kv] if kind == "decode" else [n_kv + t + 1 for t in range(n_tokens)]
    want = attention_reference(q, k, v, n_kv_heads, scale, lengths)
    close(body(out, out.size - GUARD).reshape(want.shape), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kv_type", [np.float16, np.float32])
@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (8, 2), (8, 1)])  # GQA ratios 1, 4, 8
def test_attention_decode(lib, kv_type, n_heads, n_kv_heads):
    rng = np.random.default_rng(10)
    for head_dim, n_kv in ((64, 1), (96, 37), (128, 6)):  # fewer positions than simdgroups, ragged
        run_attention(lib, rng, "decode", kv_type, n_heads, n_kv_heads, head_dim, n_kv, 1)


@pytest.mark.parametrize("kv_type", [np.float16, np.float32])
@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (8, 2), (8, 1)])
def test_attention_prefill(lib, kv_type, n_heads, n_kv_heads):
    rng = np.random.default_rng(11)
    for head_dim, n_past, n_tokens in ((64, 0, 7), (96, 5, 11)):
        run_attention(lib, rng, "prefill", kv_type, n_heads, n_kv_heads, head_dim, n_past, n_tokens)


@pytest.mark.parametrize("kv_type", [np.float16, np.float32])
def test_kv_store(lib, kv_type):
    """K and V heads of fused qkv rows land at positions n_past + t of their head's cache rows."""
    rng = np.random.default_rng(12)
    n_heads, n_kv_heads, head_dim, n_kv, n_tokens, n_ctx = 8, 2, 64, 5, 4, 11
    q_stride = (n_heads + 2 * n_kv_heads) * head_dim
    qkv = rng.standard_normal((n_tokens, q_stride)).astype(np.float32)
    k = np.full((n_kv_heads, n_ctx, head_dim), 9, kv_type)
    v = np.full((n_kv_heads, n_ctx, head_dim), 9, kv_type)
    args = ARGS["UpgAttnArgs"](n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                               kv_stride=n_ctx, q_stride=q_stride, n_tokens=n_tokens, scale=1.0)
    suffix = "f16" if kv_type == np.float16 else "f32"
    lib.launch(f"kernel_kv_store_{suffix}", {0: qkv, 1: k, 2: v, 3: pass_buffer(n_kv, n_tokens), 4: args},
               (-(-head_dim // 32), n_kv_heads, n_tokens), (32,))
    heads = qkv.reshape(n_tokens, n_heads + 2 * n_kv_heads, head_dim)
    want_k, want_v = np.full_like(k, 9), np.full_like(v, 9)
    want_k[:, n_kv:n_kv + n_tokens] = heads[:, n_heads:n_heads + n_kv_heads].transpose(1, 0, 2)
    want_v[:, n_kv:n_kv + n_tokens] = heads[:, n_heads + n_kv_heads:].transpose(1, 0, 2)
    np.testing.assert_array_equal(k, want_k)
    np.testing.assert_array_equal(v, want_v)


# ---- the whole forward pass: the one graph (cpp/graph.cpp) on the Metal backend's launches, on the harness ----

@pytest.fixture(scope="module")
def graph_models(tmp_path_factory):
    """A small Phi3 (GQA 2:1, partial rotary) as f32, f16 and q3 with outliers, and a LongRoPE one."""
    from conftest import make_hf_checkpoint
    from upg_backend.convert import convert_hf

    root = tmp_path_factory.mktemp("metal-graph")
    small = dict(hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1,
                 num_hidden_layers=2, partial_rotary_factor=0.5)
    src = make_hf_checkpoint(root / "hf", "Phi3ForCausalLM", seed=5, **small)
    rope = {"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [2.0 + 0.3 * i for i in range(8)]}
    src_long = make_hf_checkpoint(root / "hf-long", "Phi3ForCausalLM", seed=6, rope_scaling=rope,
                                  original_max_position_embeddings=8, **small)
    out = {}
    for name, source, kw in [("f32", src, dict(type="f32")), ("f16", src, dict(type="f16")),
                             ("q3", src, dict(type="q3", block=32, outliers=0.02)),
                             ("longrope", src_long, dict(type="f32"))]:
        out[name] = root / f"{name}.upg"
        convert_hf(source, out[name], progress=False, **kw)
    return out


@pytest.mark.parametrize("model,kv_type", [("f32", "f32"), ("f16", "f16"), ("longrope", "f32"), ("q3", "f32")])
def test_forward_pass_matches_cpu_engine(lib, graph_models, model, kv_type):
    """The Metal backend end to end without a Mac: Llama(backend=...) runs cpp/metal/session.cpp and
    graph.cpp, whose launches execute on the harness. A 9-token prefill in batches of 4 (mat-mat
    kernels, and one single-token batch) and 3 decode steps (mat-vec kernels) against the CPU engine
    on the same file; LongRoPE switches to its long factors past 8 positions. q3 (with outliers) is
    compared with the float64 numpy forward pass instead, with f32 activations as the Metal kernels
    use them (the CPU engine rounds them to 8 bits for quantized weights)."""
    from reference import forward
    from upg_backend.format import UPGFile
    from upg_backend.llama import Llama

    tokens = np.random.default_rng(7).integers(0, 300, 12).tolist()
    gpu = HarnessGpu(lib)
    llm = Llama(str(graph_models[model]), n_ctx=32, logits_all=True, kv_type=kv_type, n_batch=4, backend=gpu)
    llm.eval(tokens[:9])
    for t in tokens[9:]:
        llm.eval([t])
    got = np.asarray(llm.scores[:12], np.float64)
    assert llm.backend == "metal" and gpu.launches > 0  # the harness ran the passes, not the CPU
    if model == "q3":
        upg = UPGFile(graph_models[model])
        forward.ACT_Q8_TYPES, saved = (), forward.ACT_Q8_TYPES
        try:
            want = forward.forward(forward.load_weights(upg), upg.config, tokens)
        finally:
            forward.ACT_Q8_TYPES = saved
    else:
        cpu = Llama(str(graph_models[model]), n_ctx=32, logits_all=True, kv_type=kv_type, n_batch=4, backend="cpu")
        cpu.eval(tokens[:9])
        for t in tokens[9:]:
            cpu.eval([t])
        want = np.asarray(cpu.scores[:12], np.float64)
    rel = np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)
    # An f16 KV cache rounds keys and values to 11 bits: where the two backends' f32 sums differ in
    # the last bit, a stored value can land on the neighbouring f16, which moves later logits by
    # ~1e-4 (two builds of the CPU engine alone differ that much); a wrong cache is off by far more.
    assert rel.max() <= (1e-5 if kv_type == "f32" else 1e-3), rel


def test_generation_and_state_on_metal_graph(lib, graph_models):
    """The Llama API over the Metal session: greedy text as on the CPU, and a saved state (the KV
    cache read back from GPU buffers) that restores the same continuation."""
    from upg_backend.llama import Llama

    path = str(graph_models["f32"])
    cpu = Llama(path, n_ctx=64, backend="cpu")
    gpu = Llama(path, n_ctx=64, backend=HarnessGpu(lib))
    prompt = [12, 250, 7, 99]  # ids: the tiny model's vocabulary is 320 tokens of the Phi-4 tokenizer
    want = cpu.create_completion(prompt, max_tokens=6, temperature=0)["choices"][0]["text"]
    assert gpu.create_completion(prompt, max_tokens=6, temperature=0)["choices"][0]["text"] == want
    gpu.reset()
    gpu.eval([3, 14, 15])
    state = gpu.save_state()
    gpu.eval([92])
    first = gpu.scores[-1].copy()
    gpu.load_state(state)
    gpu.eval([92])
    np.testing.assert_array_equal(gpu.scores[-1], first)
    cpu.reset()
    cpu.eval([3, 14, 15, 92])
    np.testing.assert_allclose(first, cpu.scores[-1], rtol=0, atol=1e-5 * np.abs(cpu.scores[-1]).max())
