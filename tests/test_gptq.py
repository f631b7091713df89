"""GPTQ (upg_backend.gptq): the Gram matrices the engine collects, error feedback against plain
importance-weighted rounding, the file it writes, and bad input.

The Gram matrices are checked against a numpy forward pass (tests/reference/forward.py); GPTQ's
layer output error against the type's own importance-weighted rounding of the same weights."""
from __future__ import annotations

import numpy as np
import pytest

from reference import quant as ref
from test_calibration import TEXT, heavy_tailed, matrix_inputs, model  # noqa: F401 (model: the fixture)
from upg_backend import _core, calibrate, cli, gptq
from upg_backend.allocate import is_block_matrix
from upg_backend.convert import convert_hf
from upg_backend.format import UPGFile
from upg_backend.llama import Llama
from upg_backend.tokenizer import Tokenizer

TYPES = (("q4", 32), ("q4", 64), ("q3", 32), ("q8_0", 32), ("iq4_nl", 32), ("iq4_xs", 32), ("iq3", 32))


def reference_grams(upg_path, windows):
    """sum_t x_t x_t^T of every matrix's inputs, from the numpy forward pass."""
    return {n: x.T @ x for n, x in matrix_inputs(upg_path, windows).items()}


def test_gram_matches_numpy_forward(model):  # noqa: F811
    n_ctx = 24
    imp = calibrate.collect(model["f32"], model["text"], n_ctx=n_ctx, n_threads=2, progress=False, gram=True)
    upg = UPGFile(model["f32"])
    tokens = Tokenizer(upg.header["tokenizer"], upg.header["tokenizer_config"]).encode(TEXT)
    want = reference_grams(model["f32"], [tokens[i:i + n_ctx] for i in range(0, len(tokens), n_ctx)])
    blocks = {n for n, t in upg.tensors.items() if is_block_matrix(n, t.dims)}
    assert set(imp.gram) == blocks and len(blocks) == 4 * upg.config.num_hidden_layers
    for name in blocks:
        h = imp.gram[name]
        assert h.dtype == np.float64 and h.shape == (upg.tensors[name].dims[1],) * 2
        np.testing.assert_allclose(h, want[name], rtol=1e-4, atol=1e-5 * np.abs(want[name]).max(), err_msg=name)
        # one statistic: the diagonal over the tokens is the importance (the engine's column squares)
        np.testing.assert_allclose(np.diagonal(h) / imp.n_tokens, imp.columns[name], rtol=1e-6, err_msg=name)
    assert calibrate.collect(model["f32"], model["text"], n_ctx=n_ctx, progress=False).gram is None


def correlated_inputs(rng, n, cols):
    """Inputs whose columns are correlated and differ in scale, as a layer's activations do."""
    z = rng.standard_normal((n, cols // 8))
    x = z @ rng.standard_normal((cols // 8, cols)) + 0.3 * rng.standard_normal((n, cols))
    return (x * rng.exponential(1.0, cols)).astype(np.float32)


@pytest.mark.parametrize("type_,block", TYPES)
def test_gptq_output_error_below_rounding(type_, block):
    rng = np.random.default_rng(len(type_) + block)
    rows, cols = 48, 512
    w = heavy_tailed(rng, rows, cols)
    x = correlated_inputs(rng, 2048, cols)
    h = x.astype(np.float64).T @ x.astype(np.float64)
    imp = (np.diagonal(h) / len(x)).astype(np.float32)
    plain = _core.dequantize(type_, block, _core.quantize(type_, block, w, importance=imp), rows, cols)
    data = gptq.quantize(w, h, type_, block)
    assert data.dtype == np.uint8 and data.shape == (_core.quant_nbytes(type_, rows, cols, block),)
    ours = _core.dequantize(type_, block, data, rows, cols)
    e_plain, e_gptq = gptq.output_error(w, plain, h), gptq.output_error(w, ours, h)
    assert e_gptq < 0.5 * e_plain, (e_gptq, e_plain)
    # the bytes are the type's: the engine's kernels multiply them as any matrix of that type
    y = _core.matvec(type_, block, data, rows, cols, x[0])
    np.testing.assert_allclose(y, ours @ x[0], rtol=0.02, atol=0.02 * np.abs(ours @ x[0]).max())


@pytest.mark.parametrize("type_,block", TYPES)
def test_split_rounding_is_the_quantizers(type_, block):
    """block_scales, round_to_type and codes_from compose to the quantizer's own bytes: GPTQ's
    rounding is the type's one definition."""
    rng = np.random.default_rng(7)
    w = heavy_tailed(rng, 16, 512)
    imp = rng.exponential(1.0, 512).astype(np.float32)
    data = np.asarray(_core.quantize(type_, block, w, importance=imp))
    np.testing.assert_array_equal(_core.quantize(type_, block, w, importance=imp, codes_from=w), data)
    scales = np.repeat(_core.block_scales(type_, block, data, 16, 512), 32 if type_ in ("iq4_xs", "iq3") else block,
                       axis=1)
    np.testing.assert_allclose(_core.round_to_type(type_, w, scales), _core.dequantize(type_, block, data, 16, 512),
                               rtol=1e-6, atol=1e-30)
    # codes of other values under w's scales: each decodes to the grid point nearest it
    v = w + 0.1 * rng.standard_normal(w.shape).astype(np.float32)
    moved = _core.quantize(type_, block, w, importance=imp, codes_from=v)
    np.testing.assert_allclose(_core.dequantize(type_, block, moved, 16, 512), _core.round_to_type(type_, v, scales),
                               rtol=1e-6, atol=1e-30)
    with pytest.raises(ValueError, match="shape of w"):
        _core.quantize(type_, block, w, codes_from=w[:, :256])
    with pytest.raises(ValueError, match="same shape"):
        _core.round_to_type(type_, w, scales[:, :8])


def test_gptq_bad_input():
    rng = np.random.default_rng(1)
    w = heavy_tailed(rng, 8, 64)
    x = correlated_inputs(rng, 256, 64).astype(np.float64)
    h = x.T @ x
    with pytest.raises(gptq.GPTQError, match=r"shape \[32, 32\].*needs \[64, 64\]"):
        gptq.quantize(w, h[:32, :32], "q4")
    # fewer tokens than columns: rank 16 of 64. (One duplicated column left a single zero pivot,
    # whose rounding came out positive with one machine's LAPACK and negative with another's.)
    few = correlated_inputs(rng, 16, 64).astype(np.float64)
    singular = few.T @ few
    with pytest.raises(gptq.GPTQError, match="not positive definite with damping 0"):
        gptq.quantize(w, singular, "q4", damp=0.0)
    assert gptq.quantize(w, singular, "q4").size  # the default damping makes it invertible
    indefinite = np.eye(64)  # symmetric, positive diagonal, an eigenvalue of -1: no inputs give it
    indefinite[0, 1] = indefinite[1, 0] = 2.0
    with pytest.raises(gptq.GPTQError, match="not positive definite"):
        gptq.quantize(w, indefinite, "q4")
    with pytest.raises(gptq.GPTQError, match="negative diagonal"):
        gptq.quantize(w, -np.eye(64), "q4")
    with pytest.raises(gptq.GPTQError, match="not symmetric"):
        gptq.quantize(w, h + np.triu(np.ones_like(h)), "q4")
    with pytest.raises(gptq.GPTQError, match="NaN"):
        gptq.quantize(w, np.full_like(h, np.nan), "q4")
    with pytest.raises(ValueError, match="GPTQ quantizes"):
        gptq.quantize(w, h, "f16")
    with pytest.raises(ValueError, match="multiple of 256"):
        gptq.quantize(w, h, "iq4_xs")
    bad = w.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq.quantize(bad, h, "q4")
    dead = h.copy()  # a column that never saw an input: no error, its error moves nothing
    dead[:, 5] = dead[5, :] = 0
    assert gptq.quantize(w, dead, "q3").size


def test_gptq_conversion_reads_back_and_decodes(model, tmp_path):  # noqa: F811
    imp = calibrate.collect(model["f32"], model["text"], n_ctx=24, progress=False, gram=True)
    plain, out = tmp_path / "plain.upg", tmp_path / "gptq.upg"
    convert_hf(model["src"], plain, type="q4", importance=calibrate.Importance(imp.columns, imp.n_tokens, imp.text),
               progress=False)
    convert_hf(model["src"], out, type="q4", importance=imp, progress=False)
    upg, ref = UPGFile(out), UPGFile(model["f32"])
    assert upg.header["calibration"]["gptq"] == {"damp": gptq.DAMP}
    assert "gptq" not in UPGFile(plain).header["calibration"]
    name = next(iter(imp.gram))
    wrong = calibrate.Importance(imp.columns, imp.n_tokens, imp.text, {**imp.gram, name: imp.gram[name][:8, :8]})
    with pytest.raises(calibrate.ImportanceError, match=f"Gram matrix of {name} has shape \\[8, 8\\]"):
        convert_hf(model["src"], tmp_path / "bad.upg", type="q4", importance=wrong, progress=False)
    negative = calibrate.Importance(imp.columns, imp.n_tokens, imp.text, {**imp.gram, name: -imp.gram[name]})
    with pytest.raises(gptq.GPTQError, match=f"{name}: .*negative diagonal"):
        convert_hf(model["src"], tmp_path / "bad.upg", type="q4", importance=negative, progress=False)
    assert not (tmp_path / "bad.upg").exists()
    for name, t in upg.tensors.items():
        if name in imp.gram:  # GPTQ's bytes for the block matrices
            w = ref.tensor(name)
            want = gptq.quantize(w, imp.gram[name], "q4", 32, imp.columns[name])
            np.testing.assert_array_equal(upg.raw(name), want, err_msg=name)
            assert not np.array_equal(upg.raw(name), UPGFile(plain).raw(name)), name
    # the engine runs the file: its logits stay near the f32 model's, as the plain file's do
    tokens = Tokenizer(ref.header["tokenizer"], ref.header["tokenizer_config"]).encode(TEXT)[:48]

    def logits(path):
        llm = Llama(str(path), n_ctx=64, logits_all=True)
        llm.eval(tokens)
        return np.asarray(llm.scores[:len(tokens)], np.float64)

    def kld(p_logits, q_logits):
        lp = p_logits - np.logaddexp.reduce(p_logits, axis=1, keepdims=True)
        lq = q_logits - np.logaddexp.reduce(q_logits, axis=1, keepdims=True)
        return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())

    f32 = logits(model["f32"])
    k_gptq, k_plain = kld(f32, logits(out)), kld(f32, logits(plain))
    assert np.isfinite(k_gptq) and k_gptq < 2 * k_plain + 1e-3, (k_gptq, k_plain)


def test_cli_gptq(model, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "m.upg"
    assert cli.main(["convert", str(model["src"]), "-o", str(out), "--type", "q3", "--gptq", "--calibration",
                     str(model["text"]), "--quiet"]) == 0
    assert UPGFile(out).header["calibration"]["gptq"] == {"damp": gptq.DAMP}
    imp = tmp_path / "imp.safetensors"
    assert cli.main(["convert", str(model["src"]), "-o", str(tmp_path / "b.upg"), "--bpw", "4", "--gptq",
                     "--calibration", str(model["text"]), "--save-importance", str(imp), "--quiet"]) == 0
    assert UPGFile(tmp_path / "b.upg").header["calibration"]["gptq"]
    capsys.readouterr()
    assert cli.main(["convert", str(model["src"]), "-o", str(tmp_path / "bad.upg"), "--gptq", "--importance",
                     str(imp), "--quiet"]) != 0
    assert "--gptq needs the Gram matrices" in capsys.readouterr().err
    assert not (tmp_path / "bad.upg").exists()


@pytest.mark.parametrize("type_,block", (("iq3", 32), ("q4", 64), ("iq4_xs", 32), ("q8_0", 32)))
def test_allocation_noise_is_the_written_output_error(type_, block):
    """With Gram matrices, a candidate's noise is ||(W - W_q) X||^2 / ||W X||^2 over the calibration
    inputs X, W_q being GPTQ's bytes for it (computed with the factor allocation shares)."""
    from upg_backend.allocate import Candidate, gptq_noise, relative_noise

    rng = np.random.default_rng(block)
    w = heavy_tailed(rng, 40, 512)
    x = correlated_inputs(rng, 1024, 512).astype(np.float64)
    h = x.T @ x
    imp = (np.diagonal(h) / len(x)).astype(np.float32)
    cand = Candidate(type_, block)
    got = gptq_noise(w, h, imp, cand, gptq.inverse_factor(h))
    data = gptq.quantize(w, h, type_, block, imp)
    wq = _core.dequantize(type_, block, data, *w.shape).astype(np.float64)
    want = (((w - wq) @ x.T) ** 2).sum() / ((w.astype(np.float64) @ x.T) ** 2).sum()
    assert got == pytest.approx(want, rel=1e-9)
    # plain rounding's diagonal estimate sees none of GPTQ's gain
    plain = _core.dequantize(type_, block, _core.quantize(type_, block, w, importance=imp), *w.shape)
    assert got < (((w - plain) @ x.T) ** 2).sum() / ((w.astype(np.float64) @ x.T) ** 2).sum()
    assert relative_noise(w, imp, cand) > got


def test_bpw_with_gptq_allocates_by_the_written_error(model, tmp_path):  # noqa: F811
    """--bpw with --gptq: the budget holds, the header records the choices, and each matrix's noise
    is the relative output error its written bytes leave (the model's matrices have fewer rows than
    the sample, so allocation sees all of them)."""
    from upg_backend.allocate import GRAM_METHOD, allocate

    imp = calibrate.collect(model["f32"], model["text"], n_ctx=24, progress=False, gram=True)
    ref = UPGFile(model["f32"])
    out = tmp_path / "m.upg"
    convert_hf(model["src"], out, bpw=4.25, importance=imp, progress=False)
    upg = UPGFile(out)
    blocks = [(n, tuple(t.dims)) for n, t in ref.tensors.items() if is_block_matrix(n, t.dims)]
    alloc = allocate([(n, s, lambda n=n: ref.tensor(n)) for n, s in blocks], imp.for_matrix, 4.25, gram=imp.gram)
    header = upg.header["allocation"]
    assert header["method"] == GRAM_METHOD and header["choices"] == {n: c.name for n, c in alloc.choices.items()}
    nbytes = sum(upg.tensors[n].nbytes for n, _ in blocks)
    assert 8 * nbytes / sum(s[0] * s[1] for _, s in blocks) <= 4.25
    for name, (rows, cols) in blocks:
        t = upg.tensors[name]
        assert f"{t.dtype}/{t.block}" == header["choices"][name]
        w, h = ref.tensor(name), imp.gram[name]
        written = _core.dequantize(t.dtype, t.block, upg.raw(name), rows, cols)
        assert alloc.noise[name] == pytest.approx(gptq.output_error(w, written, h) / gptq.output_error(w, 0 * w, h),
                                                  rel=1e-6), name


@pytest.mark.parametrize("type_,block", TYPES)
def test_scale_refit_lowers_the_output_error(type_, block):
    """The scales searched again against H for GPTQ's codes (refit_scales): never a larger output
    error than GPTQ's own scales, never below the continuous optimum for those codes; clearly lower
    for the super-block types, whose 6-bit sub-scales the search sets (the encoder's own search, which
    sees no H, kept iq4_xs's error within 0.5% of GPTQ's). gptq.quantize refits REFIT_TYPES."""
    rng = np.random.default_rng(11 + block)
    rows, cols = 24, 512
    w = heavy_tailed(rng, rows, cols)
    x = correlated_inputs(rng, 2048, cols).astype(np.float64)
    h = x.T @ x
    before = gptq.quantize(w, h, type_, block, refit=False)
    after = gptq.refit_scales(w, h, type_, block, before)
    expected = after if type_ in gptq.REFIT_TYPES else before
    np.testing.assert_array_equal(gptq.quantize(w, h, type_, block), expected)
    old = _core.dequantize(type_, block, before, rows, cols)
    e_before = gptq.output_error(w, old, h)
    e_after = gptq.output_error(w, _core.dequantize(type_, block, after, rows, cols), h)
    # the codes are GPTQ's: only the scales moved
    unit = np.repeat(_core.block_scales(type_, block, before, rows, cols), 32 if type_ in gptq.SUPER_BLOCK_TYPES
                     else block, axis=1)
    g = np.divide(old, unit, out=np.zeros_like(old), where=unit != 0)
    s = gptq.fitted_scales(*gptq.normal_equations(w, h, g, block))
    cont = (g.reshape(rows, -1, block) * s[..., None]).reshape(rows, cols)
    assert gptq.output_error(w, cont, h) * (1 - 1e-9) <= e_after <= e_before
    if type_ in gptq.SUPER_BLOCK_TYPES:
        assert e_after < 0.98 * e_before, (e_after, e_before)


def test_fitted_scales_are_the_least_squares_scales():
    """fitted_scales over normal_equations against numpy's lstsq on the inputs themselves:
    min_s ||X (w_r - G_r^T s)||^2."""
    rng = np.random.default_rng(5)
    rows, cols, block = 6, 256, 32
    w = heavy_tailed(rng, rows, cols).astype(np.float64)
    x = correlated_inputs(rng, 1024, cols).astype(np.float64)
    g = rng.integers(-4, 4, (rows, cols)).astype(np.float64)  # grid values at scale 1
    g[0, :block] = 0  # an all-zero block: its scale multiplies nothing
    got = gptq.fitted_scales(*gptq.normal_equations(w, x.T @ x, g, block))
    assert got[0, 0] == 0
    for r in range(rows):
        gr = np.zeros((cols // block, cols))
        for b in range(cols // block):
            gr[b, b * block:(b + 1) * block] = g[r, b * block:(b + 1) * block]
        s = np.linalg.lstsq(x @ gr.T, x @ w[r], rcond=None)[0]
        np.testing.assert_allclose(got[r] @ gr, s @ gr, rtol=1e-6, atol=1e-9 * np.abs(w[r]).max())


@pytest.mark.parametrize("type_", gptq.SUPER_BLOCK_TYPES)
def test_searched_scales_are_a_lattice_minimum(type_):
    """refit_scales of a super-block type: no single step of one block's ls - 32 by one under its
    super-scale lowers the output error, which is checked here from H itself."""
    rng = np.random.default_rng(3)
    rows, cols, block = 5, 512, 32
    w = heavy_tailed(rng, rows, cols)
    x = correlated_inputs(rng, 1024, cols).astype(np.float64)
    h = x.T @ x
    data = gptq.refit_scales(w, h, type_, block, gptq.quantize(w, h, type_, block, refit=False))
    dec = _core.dequantize(type_, block, data, rows, cols).astype(np.float64)
    sc = _core.block_scales(type_, block, data, rows, cols).astype(np.float64)
    g = np.divide(dec, np.repeat(sc, block, axis=1), out=np.zeros_like(dec), where=np.repeat(sc, block, axis=1) != 0)
    base = gptq.output_error(w, dec, h)
    sup = _core.super_scales(type_, data, rows, cols)
    for r in range(rows):
        for b in range(cols // block):
            d = float(sup[r, b // 8])
            ls = round(sc[r, b] / d) if d else 0
            for v in [d * (ls + k) for k in (-1, 1) if d and -32 <= ls + k <= 31]:
                moved = dec.copy()
                moved[r, b * block:(b + 1) * block] = g[r, b * block:(b + 1) * block] * float(v)
                assert gptq.output_error(w, moved, h) >= base * (1 - 1e-9)


@pytest.mark.parametrize("type_,block", TYPES)
def test_given_scales_are_written_as_given(type_, block):
    """_core.quantize(..., scales_from=, super_from=): the bytes hold exactly the given scales and the
    codes nearest w under them, as the numpy reference decodes them (tests/reference/quant.py); the
    type's own scales given back reproduce its bytes."""
    rng = np.random.default_rng(17)
    rows, cols = 8, 512
    w = heavy_tailed(rng, rows, cols)
    nb = cols // block
    data = np.asarray(_core.quantize(type_, block, w, importance=rng.exponential(1.0, cols).astype(np.float32)))
    own = _core.block_scales(type_, block, data, rows, cols)
    sup = _core.super_scales(type_, data, rows, cols) if type_ in gptq.SUPER_BLOCK_TYPES else None
    np.testing.assert_array_equal(_core.quantize(type_, block, w, scales_from=own, super_from=sup), data)
    # other scales: random f16 values (super-block types: random f16 super-scales, random 6-bit ls)
    amax = np.abs(w).reshape(rows, nb, block).max(axis=2)
    if sup is None:
        scales = (amax * rng.uniform(0.005, 0.2, (rows, nb))).astype(np.float16).astype(np.float32)
        scales[0, 0] = 0.0
        d = None
    else:
        d = (amax.reshape(rows, -1, 8).max(axis=2) * rng.uniform(0.0002, 0.005, (rows, cols // 256))
             ).astype(np.float16).astype(np.float32)
        ls = rng.integers(-32, 32, (rows, nb)).astype(np.float32)
        ls[0, 0] = 0.0
        scales = np.repeat(d, 8, axis=1) * ls
    got = np.asarray(_core.quantize(type_, block, w, scales_from=scales, super_from=d))
    unit = np.repeat(scales, block, axis=1)
    if type_ in ref.GRID_TYPES:
        grid = ref.GRIDS[type_]
        codes = np.where(unit == 0, ref.nearest(grid, np.float32(0)),
                         ref.nearest(grid, w / np.where(unit == 0, 1, unit)))
        expected = ref.pack_grid(type_, codes, scales.astype(np.float16) if d is None else d.astype(np.float16),
                                 None if d is None else ls + 32)
        np.testing.assert_array_equal(got, expected)
    else:
        zero, lo, hi = {"q8_0": (0, -127, 127), "q4": (8, 0, 15), "q3": (4, 0, 7)}[type_]
        q = np.where(unit == 0, 0, np.clip(np.rint(w / np.where(unit == 0, 1, unit)), lo - zero, hi - zero))
        np.testing.assert_array_equal(ref.dequantize(type_, block, got, rows, cols), unit * q)


def test_given_scales_bad_input():
    w = np.ones((4, 512), np.float32)
    ok = np.full((4, 16), 0.5, np.float32)
    with pytest.raises(ValueError, match="scales_from must be float32"):
        _core.quantize("q4", 32, w, scales_from=ok[:, :8])
    with pytest.raises(ValueError, match="not an f16 value"):
        _core.quantize("q4", 32, w, scales_from=ok + 1e-4)
    with pytest.raises(ValueError, match="not an f16 value"):
        _core.quantize("iq4_nl", 32, w, scales_from=np.where(ok > 0, np.inf, ok).astype(np.float32))
    with pytest.raises(ValueError, match="quantized types only"):
        _core.quantize("f16", 0, w, scales_from=ok)
    with pytest.raises(ValueError, match="super_from applies to iq4_xs and iq3"):
        _core.quantize("q4", 32, w, scales_from=ok, super_from=np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match="needs scales_from"):
        _core.quantize("iq4_xs", 32, w, super_from=np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match="needs super_from"):
        _core.quantize("iq4_xs", 32, w, scales_from=ok)
    d = np.full((4, 2), 0.25, np.float32)
    with pytest.raises(ValueError, match=r"super_from must be float32 \[rows, cols / 256\]"):
        _core.quantize("iq3", 32, w, scales_from=ok, super_from=d[:, :1])
    with pytest.raises(ValueError, match="times an integer in"):
        _core.quantize("iq4_xs", 32, w, scales_from=np.full((4, 16), 0.3, np.float32), super_from=d)
    with pytest.raises(ValueError, match="times an integer in"):  # ls - 32 = 32 does not fit 6 bits
        _core.quantize("iq4_xs", 32, w, scales_from=np.full((4, 16), 8.0, np.float32), super_from=d)
    with pytest.raises(ValueError, match="not an f16 value"):
        _core.quantize("iq3", 32, w, scales_from=ok, super_from=d + 1e-5)
    with pytest.raises(ValueError, match="has no super-scales"):
        _core.super_scales("iq4_nl", np.zeros(16, np.uint8), 1, 32)
    # the same scales, valid: written
    written = _core.quantize("iq4_xs", 32, w, scales_from=ok, super_from=d)
    np.testing.assert_array_equal(_core.block_scales("iq4_xs", 32, written, 4, 512), ok)

