"""Every op of the backend seam (cpp/upg/backend.h) on every backend against numpy.

The backends: the CPU, and the Metal backend's launches on the CPU harness (tests/metal_harness).
Inputs are random with ragged shapes; each output buffer is poisoned first and has a guard tail, so
an element left unwritten or a write past the end fails. The references are float64 numpy
(tests/reference/quant.py decodes the weights); the CPU multiplies quantized weights with 8-bit
activations, the Metal kernels with f32 ones (docs/ARCHITECTURE.md), and each is held to its own.
"""
from __future__ import annotations

import numpy as np
import pytest

from reference import quant as ref
from upg_backend import _core

POISON = np.float32(np.nan)
GUARD = 16  # floats after every output, which no op may touch
TYPES = ([(t, 0) for t in ref.DENSE] + [(t, b) for t in ref.UNIFORM for b in (32, 64)]
         + [(t, 32) for t in ref.GRID_TYPES])


def width(type_: str) -> int:
    """Columns of the test matrices: 320 (not a multiple of 256), whole super-blocks where needed."""
    return 512 if type_ in ref.SUPER_TYPES else 320


@pytest.fixture(params=["cpu", "metal-harness"])
def be(request):
    if request.param == "cpu":
        return _core.CpuBackend(2)
    from metal_harness.gpu import HarnessGpu

    return _core.MetalBackend(HarnessGpu(request.getfixturevalue("lib")))


def put(be, a: np.ndarray):
    """A new buffer holding a's bytes."""
    a = np.ascontiguousarray(a)
    buf = be.alloc(a.nbytes)
    be.upload(buf, a.view(np.uint8).reshape(-1))
    return buf


def out_buffer(be, n: int, dtype=np.float32):
    """A buffer of n elements poisoned with NaN (floats) or -7, plus a guard tail."""
    fill = POISON if dtype == np.float32 else -7
    return put(be, np.full(n + GUARD, fill, dtype))


def get(be, buf, n: int, dtype=np.float32) -> np.ndarray:
    """The first n elements of buf; the guard tail must be as poisoned."""
    a = be.download(buf, (n + GUARD) * np.dtype(dtype).itemsize).view(dtype)
    tail = a[n:]
    assert (np.isnan(tail).all() if dtype == np.float32 else (tail == -7).all()), "an op wrote past its output"
    return a[:n]


def pass_record(seqs, n_decode=0) -> np.ndarray:
    """UpgPass, its UpgToken and UpgSeq entries (int32 fields, upg_common.h) for sequences
    [(n_past, n_tokens, kv_base)]."""
    n = sum(s[1] for s in seqs)
    head, toks, entries, first = [[seqs[0][0], n, len(seqs), n_decode]], [], [], 0
    for i, (n_past, n_tokens, kv_base) in enumerate(seqs):
        toks += [[n_past + t, kv_base, 0, i] for t in range(n_tokens)]
        entries.append([first, n_tokens, n_past, kv_base, 0, 0, 0, 0])
        first += n_tokens
    return np.concatenate([np.array(r, np.int32) for r in head + toks + entries])


def pass_buffer(be, n_past: int, n_tokens: int, generated: bool | None = None):
    """The per-pass values the position-dependent ops read: one sequence; its tokens generated
    (decode paths) when generated, else prompt tokens (None: generated when it is one token)."""
    generated = n_tokens == 1 if generated is None else generated
    return put(be, pass_record([(n_past, n_tokens, 0)], n_tokens if generated else 0))


def run(be, op, *args, n_past=0, n_tokens=1):
    be.begin(pass_buffer(be, n_past, n_tokens))
    op(*args)
    be.end()


def close(got, want, tol):
    got = np.asarray(got, np.float64)
    assert not np.isnan(got).any(), "an output element was not written"
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def weight_matrix(be, type_, block, rows, cols, seed, outliers):
    """(Matrix in a buffer of be, float64 dense weights without outliers, outlier matrix or None)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    data = _core.quantize(type_, block, w)
    dense = ref.dequantize(type_, block, data, rows, cols).astype(np.float64)
    if not outliers:
        return _core.Matrix(type_, block, rows, cols, put(be, data)), dense, None
    per_row = rng.integers(0, 4, rows)
    rowptr = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    col = np.concatenate([np.sort(rng.choice(cols, k, replace=False)) for k in per_row]).astype(np.int32)
    val = (rng.standard_normal(col.size) * 8).astype(np.float16).view(np.uint16)
    o = ref.add_outliers(np.zeros((rows, cols)), rowptr, col, val)
    m = _core.Matrix(type_, block, rows, cols, put(be, data), put(be, rowptr), put(be, col), put(be, val))
    return m, dense, o


@pytest.mark.parametrize("type_,block", TYPES)
def test_get_rows(be, type_, block):
    rows, cols = 13, width(type_)
    m, dense, o = weight_matrix(be, type_, block, rows, cols, 1, outliers=type_ in ref.UNIFORM)
    ids = np.array([4, 0, 12, 4, 7], np.int32)
    out = out_buffer(be, ids.size * cols)
    run(be, be.get_rows, m, put(be, ids), ids.size, out)
    want = (dense if o is None else dense + o)[ids]
    close(get(be, out, ids.size * cols).reshape(ids.size, cols), want, 1e-6)


@pytest.mark.parametrize("type_,block", TYPES)
@pytest.mark.parametrize("n_tokens", [1, 5, 19])  # mat-vec; mat-mat with partial token tiles
def test_linear(be, type_, block, n_tokens):
    rows, cols = 45, width(type_)  # rows: no multiple of any backend's row tile
    m, dense, o = weight_matrix(be, type_, block, rows, cols, 2, outliers=type_ in ref.UNIFORM)
    x = np.random.default_rng(3).standard_normal((n_tokens, cols)).astype(np.float32)
    y = out_buffer(be, n_tokens * rows)
    run(be, be.linear, m, put(be, x), n_tokens, y)
    acts = ref.activations_as_used(type_, block, x) if be.name == "cpu" else x.astype(np.float64)
    want = acts @ dense.T + (0 if o is None else x.astype(np.float64) @ o.T)
    close(get(be, y, n_tokens * rows).reshape(n_tokens, rows), want, 2e-5)


def test_rms_norm(be):
    n_tokens, n = 3, 333
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((n_tokens, n)) * 3).astype(np.float32)
    w = (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)
    out = out_buffer(be, n_tokens * n)
    run(be, be.rms_norm, put(be, x), put(be, w), out, n_tokens, n, 1e-5)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + 1e-5) * w
    close(get(be, out, n_tokens * n).reshape(n_tokens, n), want, 1e-5)


@pytest.mark.parametrize("head_dim, rot", [(64, 64), (96, 48), (128, 96)])  # partial rotary 0.5, 0.75
def test_rope(be, head_dim, rot):
    """Q and K heads of fused qkv rows rotate at positions n_past + t; the V heads stay."""
    rng = np.random.default_rng(5)
    n_tokens, n_heads, n_kv, n_past, attn_factor = 6, 4, 2, 1234, 1.19
    qkv = rng.standard_normal((n_tokens, (n_heads + 2 * n_kv) * head_dim)).astype(np.float32)
    inv_freq = (1.0 / (rng.uniform(1, 8, rot // 2) * 10000.0 ** (np.arange(rot // 2) * 2.0 / rot))).astype(np.float32)
    buf = put(be, np.concatenate([qkv.reshape(-1), np.full(GUARD, POISON, np.float32)]))
    args = _core.RopeArgs(n_tokens, n_heads + n_kv, head_dim, rot, qkv.shape[1], attn_factor)
    run(be, be.rope, buf, put(be, inv_freq), args, n_past=n_past, n_tokens=n_tokens)
    got = get(be, buf, qkv.size).reshape(qkv.shape)
    half, rotated = rot // 2, (n_heads + n_kv) * head_dim
    ang = (n_past + np.arange(n_tokens))[:, None] * inv_freq.astype(np.float64)
    c, s = (np.cos(ang) * attn_factor)[:, None], (np.sin(ang) * attn_factor)[:, None]
    want = qkv[:, :rotated].reshape(n_tokens, -1, head_dim).astype(np.float64)
    x1, x2 = want[..., :half].copy(), want[..., half:rot].copy()
    want[..., :half], want[..., half:rot] = x1 * c - x2 * s, x2 * c + x1 * s
    close(got[:, :rotated].reshape(want.shape), want, 1e-4)
    np.testing.assert_array_equal(got[:, rotated:], qkv[:, rotated:])


def attention_case(be, rng, f16, n_heads, n_kv_heads, head_dim, n_past, n_tokens, generated=None):
    """(buffers and args for kv_store + attention, the queries, the cache as it must end up)."""
    n_ctx = n_past + n_tokens + 3  # room past the attended positions
    kv_type = np.float16 if f16 else np.float32
    q_stride = (n_heads + 2 * n_kv_heads) * head_dim
    qkv = (rng.standard_normal((n_tokens, q_stride)) * 0.5).astype(np.float32)
    k = rng.standard_normal((n_kv_heads, n_ctx, head_dim)).astype(kv_type)
    v = rng.standard_normal((n_kv_heads, n_ctx, head_dim)).astype(kv_type)
    heads = qkv.reshape(n_tokens, n_heads + 2 * n_kv_heads, head_dim)
    want_k, want_v = k.copy(), v.copy()  # the cached positions, then this pass's keys and values
    want_k[:, n_past:n_past + n_tokens] = heads[:, n_heads:n_heads + n_kv_heads].transpose(1, 0, 2)
    want_v[:, n_past:n_past + n_tokens] = heads[:, n_heads + n_kv_heads:].transpose(1, 0, 2)
    args = _core.AttnArgs(n_heads, n_kv_heads, head_dim, n_ctx, q_stride, n_tokens, 1.0 / np.sqrt(head_dim))
    bufs = dict(qkv=put(be, qkv), k=put(be, k), v=put(be, v), pass_=pass_buffer(be, n_past, n_tokens, generated))
    return bufs, args, heads[:, :n_heads], want_k, want_v


@pytest.mark.parametrize("f16", [False, True])
def test_kv_store(be, f16):
    rng = np.random.default_rng(6)
    bufs, args, _, want_k, want_v = attention_case(be, rng, f16, 8, 2, 64, 5, 4)
    be.begin(bufs["pass_"])
    be.kv_store(bufs["qkv"], bufs["k"], bufs["v"], f16, args)
    be.end()
    kv_type = np.float16 if f16 else np.float32
    got_k = be.download(bufs["k"], want_k.nbytes).view(kv_type).reshape(want_k.shape)
    got_v = be.download(bufs["v"], want_v.nbytes).view(kv_type).reshape(want_v.shape)
    np.testing.assert_array_equal(got_k, want_k)
    np.testing.assert_array_equal(got_v, want_v)


@pytest.mark.parametrize("f16", [False, True])
@pytest.mark.parametrize("n_heads, n_kv_heads, head_dim", [(4, 4, 64), (8, 2, 96), (8, 1, 128)])  # GQA 1, 4, 8
@pytest.mark.parametrize("n_past, n_tokens, generated", [(0, 1, True), (36, 1, True), (36, 1, False), (0, 7, False),
                                                      (5, 20, False), (5, 3, True)])  # decode and prompt paths
def test_attention(be, f16, n_heads, n_kv_heads, head_dim, n_past, n_tokens, generated):
    """kv_store then attention: token t attends positions [0, n_past + t] of the cache."""
    rng = np.random.default_rng(7)
    bufs, args, q, k, v = attention_case(be, rng, f16, n_heads, n_kv_heads, head_dim, n_past, n_tokens, generated)
    out = out_buffer(be, n_tokens * n_heads * head_dim)
    be.begin(bufs["pass_"])
    be.kv_store(bufs["qkv"], bufs["k"], bufs["v"], f16, args)
    be.attention(bufs["qkv"], bufs["k"], bufs["v"], out, f16, args)
    be.end()
    want = np.zeros((n_tokens, n_heads, head_dim))
    for t in range(n_tokens):
        n = n_past + t + 1
        for h in range(n_heads):
            g = h // (n_heads // n_kv_heads)
            s = k[g, :n].astype(np.float64) @ q[t, h].astype(np.float64) / np.sqrt(head_dim)
            p = np.exp(s - s.max())
            want[t, h] = p @ v[g, :n].astype(np.float64) / p.sum()
    close(get(be, out, want.size).reshape(want.shape), want, 1e-4)


@pytest.mark.parametrize("f16", [False, True])
def test_attention_batch(be, f16):
    """A pass of several sequences: generated and prompt tokens, each sequence in its own slot of
    the cache, each token attending its own slot only; every token's output has the bits of its
    sequence's tokens run alone in a pass of the same kind."""
    n_heads, n_kv, hd, n_slot = 8, 2, 64, 40
    # (n_past, n_tokens, generated) per slot; generated sequences first (UpgPass::n_decode)
    seqs = [(7, 1, True), (30, 1, True), (0, 9, False), (12, 20, False)]
    rng = np.random.default_rng(9)
    kv_type = np.float16 if f16 else np.float32
    q_stride = (n_heads + 2 * n_kv) * hd
    n = sum(s[1] for s in seqs)
    qkv = (rng.standard_normal((n, q_stride)) * 0.5).astype(np.float32)
    k = rng.standard_normal((n_kv, len(seqs) * n_slot, hd)).astype(kv_type)
    v = rng.standard_normal((n_kv, len(seqs) * n_slot, hd)).astype(kv_type)
    n_decode = sum(s[1] for s in seqs if s[2])

    def attend(qkv_rows, record, n_tokens):
        kb, vb = put(be, k), put(be, v)
        out = out_buffer(be, n_tokens * n_heads * hd)
        args = _core.AttnArgs(n_heads, n_kv, hd, len(seqs) * n_slot, q_stride, n_tokens, 1.0 / np.sqrt(hd))
        qb = put(be, qkv_rows)
        be.begin(put(be, record))
        be.kv_store(qb, kb, vb, f16, args)
        be.attention(qb, kb, vb, out, f16, args)
        be.end()
        return get(be, out, n_tokens * n_heads * hd).reshape(n_tokens, n_heads, hd)

    record = pass_record([(p, m, i * n_slot) for i, (p, m, _) in enumerate(seqs)], n_decode)
    got = attend(qkv, record, n)
    first = 0
    heads = qkv.reshape(n, n_heads + 2 * n_kv, hd)
    for i, (n_past, m, generated) in enumerate(seqs):
        alone = attend(qkv[first:first + m], pass_record([(n_past, m, i * n_slot)], m if generated else 0), m)
        np.testing.assert_array_equal(got[first:first + m], alone)
        kc, vc = k[:, i * n_slot:(i + 1) * n_slot].copy(), v[:, i * n_slot:(i + 1) * n_slot].copy()
        kc[:, n_past:n_past + m] = heads[first:first + m, n_heads:n_heads + n_kv].transpose(1, 0, 2)
        vc[:, n_past:n_past + m] = heads[first:first + m, n_heads + n_kv:].transpose(1, 0, 2)
        want = np.zeros((m, n_heads, hd))
        for t in range(m):
            for h in range(n_heads):
                g = h // (n_heads // n_kv)
                s = kc[g, :n_past + t + 1].astype(np.float64) @ heads[first + t, h].astype(np.float64) / np.sqrt(hd)
                p = np.exp(s - s.max())
                want[t, h] = p @ vc[g, :n_past + t + 1].astype(np.float64) / p.sum()
        close(got[first:first + m], want, 1e-4)
        first += m


@pytest.mark.parametrize("type_, block", [("q4", 32), ("q8_0", 32), ("f16", 0)])
def test_linear_rows_by_kind(be, type_, block):
    """linear: generated rows (the first n_decode) have the bits of the mat-vec of each row alone,
    prompt rows those of the mat-mat of each row alone, whatever the call's token count."""
    rows, cols, n, n_decode = 45, 320, 11, 4
    m, _, _ = weight_matrix(be, type_, block, rows, cols, 2, outliers=block > 0)
    x = np.random.default_rng(3).standard_normal((n, cols)).astype(np.float32)

    def linear(xs, n_dec):
        y = out_buffer(be, len(xs) * rows)
        run(be, be.linear, m, put(be, xs), len(xs), y, n_dec, n_tokens=len(xs))
        return get(be, y, len(xs) * rows).reshape(len(xs), rows)

    got = linear(x, n_decode)
    for t in range(n):
        np.testing.assert_array_equal(got[t], linear(x[t:t + 1], int(t < n_decode))[0])


@pytest.mark.parametrize("n_tokens", [1, 3])
def test_fused_runs_have_the_bits_of_their_ops(be, n_tokens):
    """norm_linear, linear_add and silu_linear_add (the runs of ops a backend may do in one launch)
    against the ops one by one, bit for bit: one generated token, and three prompt tokens."""
    rng = np.random.default_rng(11)
    rows, cols, n_dec = 45, 320, int(n_tokens == 1)
    m, _, _ = weight_matrix(be, "q4", 32, rows, cols, 12, outliers=True)
    x = (rng.standard_normal((n_tokens, cols)) * 3).astype(np.float32)
    nw = put(be, (1 + 0.2 * rng.standard_normal(cols)).astype(np.float32))
    res = rng.standard_normal((n_tokens, rows)).astype(np.float32)
    gu = (rng.standard_normal((n_tokens, 2 * cols)) * 3).astype(np.float32)

    def each(*ops):  # the ops in one pass
        be.begin(pass_buffer(be, 0, n_tokens))
        for op, *args in ops:
            op(*args)
        be.end()

    xb, y, xn = put(be, x), out_buffer(be, n_tokens * rows), out_buffer(be, n_tokens * cols)
    each((be.norm_linear, xb, nw, 1e-5, out_buffer(be, n_tokens * cols), m, n_tokens, n_dec, y))
    want = out_buffer(be, n_tokens * rows)
    each((be.rms_norm, xb, nw, xn, n_tokens, cols, 1e-5), (be.linear, m, xn, n_tokens, want, n_dec))
    np.testing.assert_array_equal(get(be, y, n_tokens * rows), get(be, want, n_tokens * rows))

    got, want = put(be, res), put(be, res)
    each((be.linear_add, m, xb, n_tokens, n_dec, out_buffer(be, n_tokens * rows), got))
    tmp = out_buffer(be, n_tokens * rows)
    each((be.linear, m, xb, n_tokens, tmp, n_dec), (be.add, want, tmp, n_tokens * rows))
    np.testing.assert_array_equal(be.download(got, res.nbytes), be.download(want, res.nbytes))

    got, want, gub = put(be, res), put(be, res), put(be, gu)
    each((be.silu_linear_add, m, gub, n_tokens, n_dec, out_buffer(be, n_tokens * cols), out_buffer(be, n_tokens * rows), got))
    act, tmp = out_buffer(be, n_tokens * cols), out_buffer(be, n_tokens * rows)
    each((be.silu_mul, gub, act, n_tokens, cols), (be.linear, m, act, n_tokens, tmp, n_dec), (be.add, want, tmp, n_tokens * rows))
    np.testing.assert_array_equal(be.download(got, res.nbytes), be.download(want, res.nbytes))


def test_silu_mul_add_argmax(be):
    rng = np.random.default_rng(8)
    n_tokens, n = 3, 333
    gu = (rng.standard_normal((n_tokens, 2 * n)) * 4).astype(np.float32)
    act = out_buffer(be, n_tokens * n)
    run(be, be.silu_mul, put(be, gu), act, n_tokens, n)
    g, u = gu[:, :n].astype(np.float64), gu[:, n:].astype(np.float64)
    close(get(be, act, n_tokens * n).reshape(n_tokens, n), g / (1 + np.exp(-g)) * u, 1e-5)

    x, y = (rng.standard_normal(n * n_tokens).astype(np.float32) for _ in range(2))
    xb = put(be, np.concatenate([x, np.full(GUARD, POISON, np.float32)]))
    run(be, be.add, xb, put(be, y), x.size)
    np.testing.assert_array_equal(get(be, xb, x.size), x + y)

    z = rng.standard_normal(100352).astype(np.float32)  # Phi-4's vocabulary
    z[[40, 9000, 70000]] = 50.0  # a tie: the lowest index wins
    idx = out_buffer(be, 1, np.int32)
    run(be, be.argmax, put(be, z), z.size, idx)
    assert get(be, idx, 1, np.int32)[0] == 40


def test_next_token(be):
    """Greedy decoding's step: the token argmax left is stored at the position it follows, and the
    pass (one generated token of one sequence) moves on to the next position."""
    record = pass_record([(7, 1, 0)], 1)
    p = put(be, record)
    out = out_buffer(be, 12, np.int32)
    be.begin(p)
    be.next_token(p, put(be, np.array([1234, 99], np.int32)), out)
    be.end()
    got = get(be, out, 12, np.int32)
    assert got[7] == 1234 and (np.delete(got, 7) == -7).all()
    assert be.download(p, record.nbytes).view(np.int32).tolist() == pass_record([(8, 1, 0)], 1).tolist()
