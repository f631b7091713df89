"""Calibration (upg_backend.calibrate), the importance-weighted quantizer and bit allocation (--bpw).

The quantizer is checked byte for byte against the numpy reference (tests/reference/quant.py), the
collected statistics against a numpy forward pass (tests/reference/forward.py)."""
from __future__ import annotations

import numpy as np
import pytest

import reference.forward as fwd
from reference import quant as ref
from upg_backend import _core, calibrate, cli
from upg_backend.allocate import CANDIDATES, Candidate, _hull, allocate, is_block_matrix
from upg_backend.convert import convert_hf
from upg_backend.format import UPGFile

TYPES = ("q8_0", "q4", "q3")
TEXT = ("def add(a, b):\n    return a + b\n\nThe river runs past the mill; the wheel turns. " * 8
        + "Große Straße, café, 東京. user assistant system: answer the question.")


def heavy_tailed(rng, rows, cols):
    """Weights whose columns differ in scale, as trained models' do."""
    return (rng.standard_normal((rows, cols)) * rng.exponential(1.0, (1, cols))).astype(np.float32)


@pytest.mark.parametrize("type_", TYPES)
@pytest.mark.parametrize("block", (32, 64))
def test_weighted_quantizer_matches_reference(type_, block):
    rng = np.random.default_rng(block + len(type_))
    w = heavy_tailed(rng, 48, 512)
    w[3, :block] = 0  # an all-zero block
    w[5, block:2 * block] = 1e-42  # subnormal
    imp = (rng.exponential(1.0, 512) ** 2).astype(np.float32)
    imp[7:40] = 0  # columns that never see an input
    got = np.asarray(_core.quantize(type_, block, w, n_threads=3, importance=imp))
    np.testing.assert_array_equal(got, ref.quantize(type_, block, w, imp))

    def weighted_error(data):
        return float((imp * (ref.dequantize(type_, block, data, *w.shape) - w) ** 2).sum())

    plain = np.asarray(_core.quantize(type_, block, w))
    np.testing.assert_array_equal(plain, ref.quantize(type_, block, w))  # None: the plain scale
    assert weighted_error(got) < 0.95 * weighted_error(plain)  # the search pays
    # uniform importance still searches (the error of the plain scale is not the least)
    uniform = np.asarray(_core.quantize(type_, block, w, importance=np.ones(512, np.float32)))
    np.testing.assert_array_equal(uniform, ref.quantize(type_, block, w, np.ones(512)))


def test_importance_bad_input():
    w = np.ones((4, 64), np.float32)
    with pytest.raises(ValueError, match="one per column"):
        _core.quantize("q4", 32, w, importance=np.ones(32, np.float32))
    with pytest.raises(ValueError, match=">= 0"):
        _core.quantize("q4", 32, w, importance=-np.ones(64, np.float32))
    with pytest.raises(ValueError, match="finite"):
        _core.quantize("q3", 32, w, importance=np.full(64, np.nan, np.float32))
    dense = np.asarray(_core.quantize("f16", 0, w, importance=np.ones(64, np.float32)))  # dense types ignore it
    np.testing.assert_array_equal(dense, ref.quantize("f16", 0, w))


def test_dequantize_matches_reference():
    rng = np.random.default_rng(3)
    w = heavy_tailed(rng, 8, 128)
    for t in TYPES:
        data = np.asarray(_core.quantize(t, 32, w))
        np.testing.assert_array_equal(_core.dequantize(t, 32, data, 8, 128), ref.dequantize(t, 32, data, 8, 128))
    with pytest.raises(ValueError, match="bytes"):
        _core.dequantize("q4", 32, np.zeros(10, np.uint8), 8, 128)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny Phi-3 checkpoint with a trained tokenizer, its f32 .upg and a calibration text."""
    from conftest import make_hf_checkpoint
    from test_gguf import tiny_checkpoint

    tmp = tmp_path_factory.mktemp("calibration")
    src = tiny_checkpoint(lambda **kw: make_hf_checkpoint(tmp / "hf", **kw), "phi3",
                          initializer_range=0.3)
    f32 = tmp / "f32.upg"
    convert_hf(src, f32, type="f32", progress=False)
    text = tmp / "calibration.txt"
    text.write_text(TEXT, encoding="utf-8")
    return {"src": src, "f32": f32, "text": text, "tmp": tmp}


def matrix_inputs(upg_path, windows):
    """Every matrix's inputs (the rows of x it multiplies, float64), by matrix name, from the numpy
    forward pass of each window."""
    upg = UPGFile(upg_path)
    weights = fwd.load_weights(upg)
    names = {id(w): n for n, w in weights.items()}
    inputs = {}
    plain = fwd.linear

    def recording(x, w):
        inputs.setdefault(names[id(w)], []).append(np.asarray(x, np.float64))
        return plain(x, w)

    fwd.linear = recording
    try:
        for w in windows:
            fwd.forward(weights, upg.config, w)
    finally:
        fwd.linear = plain
    return {n: np.concatenate(xs) for n, xs in inputs.items()}


def reference_squares(upg_path, windows):
    """Mean square of each input column of every matrix, from the numpy forward pass."""
    return {n: (x ** 2).mean(axis=0) for n, x in matrix_inputs(upg_path, windows).items()}


@pytest.mark.parametrize("n_ctx", (512, 24))
def test_statistics_match_numpy_forward(model, n_ctx):
    imp = calibrate.collect(model["f32"], model["text"], n_ctx=n_ctx, n_threads=2, progress=False)
    upg = UPGFile(model["f32"])
    from upg_backend.tokenizer import Tokenizer

    tokens = Tokenizer(upg.header["tokenizer"], upg.header["tokenizer_config"]).encode(TEXT)
    assert imp.n_tokens == len(tokens) > 2 * 24
    want = reference_squares(model["f32"], [tokens[i:i + n_ctx] for i in range(0, len(tokens), n_ctx)])
    layers = upg.config.num_hidden_layers
    assert set(imp.columns) == set(want) and len(want) == 4 * layers + 1  # 4 per layer and lm_head
    for name, v in want.items():
        np.testing.assert_allclose(imp.columns[name], v, rtol=1e-4, err_msg=name)
    assert imp.text.startswith("calibration.txt sha256:")
    capped = calibrate.collect(model["f32"], model["text"], n_ctx=n_ctx, max_tokens=30, progress=False)
    assert capped.n_tokens == 30


def test_capped_windows_spread_over_the_text():
    windows = calibrate._windows(np.arange(100), 24, 60)  # 60 tokens: windows of 24, 24, 12
    assert [len(w) for w in windows] == [24, 24, 12]
    assert [int(w[0]) for w in windows] == [0, 38, 76]  # first to last stretch of the text
    assert [len(w) for w in calibrate._windows(np.arange(100), 24, None)] == [24, 24, 24, 24, 4]


def test_importance_file_round_trip_and_errors(model, tmp_path):
    imp = calibrate.collect(model["f32"], model["text"], progress=False)
    path = tmp_path / "m.importance.safetensors"
    imp.save(path)
    back = calibrate.Importance.load(path)
    assert back.n_tokens == imp.n_tokens and back.text == imp.text and set(back.columns) == set(imp.columns)
    for name, v in imp.columns.items():
        np.testing.assert_array_equal(back.columns[name], v)
    # a conversion with the loaded file equals one with the measured statistics, and differs from plain
    a, b, plain = tmp_path / "a.upg", tmp_path / "b.upg", tmp_path / "plain.upg"
    convert_hf(model["src"], a, type="q4", importance=imp, progress=False)
    convert_hf(model["src"], b, type="q4", importance=back, progress=False)
    convert_hf(model["src"], plain, type="q4", progress=False)
    name = "model.layers.0.mlp.down_proj.weight"
    assert np.array_equal(UPGFile(a).raw(name), UPGFile(b).raw(name))
    assert not np.array_equal(UPGFile(a).raw(name), UPGFile(plain).raw(name))
    assert UPGFile(a).header["calibration"] == {"text": imp.text, "n_tokens": imp.n_tokens}
    # each matrix was written by the weighted quantizer with its own columns' importance
    w = np.asarray(UPGFile(model["f32"]).tensor(name))
    np.testing.assert_array_equal(UPGFile(a).raw(name), ref.quantize("q4", 32, w, imp.columns[name]))

    with pytest.raises(FileNotFoundError):
        calibrate.Importance.load(tmp_path / "absent")
    (tmp_path / "junk").write_bytes(b"not safetensors")
    with pytest.raises(calibrate.ImportanceError, match="not a safetensors file"):
        calibrate.Importance.load(tmp_path / "junk")
    from safetensors.numpy import save_file

    save_file({"x": np.ones(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(calibrate.ImportanceError, match="not an importance file"):
        calibrate.Importance.load(tmp_path / "other.safetensors")
    wrong = calibrate.Importance({name: np.ones(7, np.float32)}, 1, "x")
    with pytest.raises(calibrate.ImportanceError, match="another model"):
        convert_hf(model["src"], tmp_path / "c.upg", type="q4", importance=wrong, progress=False)
    alien = calibrate.Importance({"model.layers.99.mlp.down_proj.weight": np.ones(7, np.float32)}, 1, "x")
    with pytest.raises(calibrate.ImportanceError, match="does not have"):
        convert_hf(model["src"], tmp_path / "c.upg", type="q4", importance=alien, progress=False)
    assert not (tmp_path / "c.upg").exists()
    with pytest.raises(FileNotFoundError, match="calibration text"):
        calibrate.collect(model["f32"], tmp_path / "absent.txt", progress=False)


def block_bpw(path):
    ts = UPGFile(path).tensors
    mats = {n: t for n, t in ts.items() if is_block_matrix(n, t.dims)}
    return 8 * sum(t.nbytes for t in mats.values()) / sum(t.n_elements for t in mats.values())


@pytest.mark.parametrize("bpw", (3.3, 3.9, 4.25, 5.0))
def test_bpw_stays_within_budget(model, tmp_path, bpw):
    imp = calibrate.collect(model["f32"], model["text"], progress=False)
    out = tmp_path / "m.upg"
    convert_hf(model["src"], out, bpw=bpw, importance=imp, progress=False)
    upg = UPGFile(out)
    got = block_bpw(out)
    alloc = upg.header["allocation"]
    assert got <= bpw and alloc["bpw"] == bpw and alloc["block_bits_per_weight"] == pytest.approx(got, abs=1e-4)
    for name, t in upg.tensors.items():  # the header records what the file holds
        if is_block_matrix(name, t.dims):
            assert alloc["choices"][name] == f"{t.dtype}/{t.block}"
            q = upg.header["quantization"]
            assert q["overrides"].get(name, q["default"]) == t.dtype
    assert upg.tensors["lm_head.weight"].dtype == "q8_0" == upg.tensors["model.embed_tokens.weight"].dtype
    assert upg.header["quantization"]["default"] == "q8_0" and upg.header["quantization"]["block"] == 32
    assert got > bpw - 0.5  # the budget is spent, not left over


def test_bpw_bad_budget(model, tmp_path):
    with pytest.raises(ValueError, match="cheapest candidates"):
        convert_hf(model["src"], tmp_path / "m.upg", bpw=2.0, progress=False)
    with pytest.raises(ValueError, match="either bpw or recipe"):
        convert_hf(model["src"], tmp_path / "m.upg", bpw=4.0, recipe="q4", progress=False)
    assert not (tmp_path / "m.upg").exists()


def test_allocation_spends_bits_where_noise_falls_most():
    rng = np.random.default_rng(0)
    easy = rng.integers(-4, 4, (64, 256)).astype(np.float32) * 0.25  # on q3's grid: stored exactly
    easy[:, ::64] = -1.0  # each block's largest magnitude, which sets the scale 0.25
    hard = heavy_tailed(rng, 64, 256)
    mats = [("model.layers.0.a.weight", (64, 256), lambda: easy), ("model.layers.0.b.weight", (64, 256), lambda: hard)]
    imp = lambda name, cols: np.ones(cols, np.float32)  # noqa: E731
    # a budget of one upgrade of one matrix from q3/64 to q4/64 (4.25) goes to the harder one
    alloc = allocate(mats, imp, 3.75, candidates=(Candidate("q3", 64), Candidate("q4", 64)))
    assert alloc.choices["model.layers.0.b.weight"].name == "q4/64"
    assert alloc.choices["model.layers.0.a.weight"].name == "q3/64"
    assert alloc.bpw <= 3.75
    # with room for everything: the most precise candidate where it removes noise, none where none is left
    full = allocate(mats, imp, 9.0)
    assert full.choices["model.layers.0.b.weight"] == CANDIDATES[-1]
    assert full.choices["model.layers.0.a.weight"].name == "q3/64" and full.noise["model.layers.0.a.weight"] == 0


def test_hull_drops_dominated_candidates():
    # (bits, noise, index): index 1 costs more than 0 and is noisier; 3 lies above the chord 2-4
    pts = [(3.0, 1.0, 0), (3.5, 1.2, 1), (4.0, 0.5, 2), (6.0, 0.4, 3), (8.0, 0.01, 4)]
    assert [p[2] for p in _hull(pts)] == [0, 2, 4]


def test_cli_convert_calibrated(model, tmp_path, capsys):
    out, imp = tmp_path / "m.upg", tmp_path / "m.importance.safetensors"
    assert cli.main(["convert", str(model["src"]), "-o", str(out), "--bpw", "4.0", "--calibration", str(model["text"]),
                     "--save-importance", str(imp), "--quiet"]) == 0
    assert block_bpw(out) <= 4.0 and imp.is_file()
    again = tmp_path / "again.upg"
    assert cli.main(["convert", str(model["src"]), "-o", str(again), "--bpw", "4.0", "--importance", str(imp),
                     "--quiet"]) == 0
    for name in UPGFile(out).tensors:  # the saved file reproduces the conversion
        assert np.array_equal(UPGFile(out).raw(name), UPGFile(again).raw(name)), name
    default = tmp_path / "default.upg"  # --calibration without TEXT: the shipped text
    assert cli.main(["convert", str(model["src"]), "-o", str(default), "--type", "q4", "--calibration",
                     "--calibration-tokens", "64", "--quiet"]) == 0
    assert UPGFile(default).header["calibration"]["text"].startswith("calibration.txt sha256:")
    assert UPGFile(default).header["calibration"]["n_tokens"] == 64
    capsys.readouterr()
    for argv, message in (
        (["--bpw", "4", "--importance", str(imp), "--calibration"], "--importance excludes"),
        (["--bpw", "4", "--importance", str(imp), "--calibration-tokens", "9"], "--importance excludes"),
        (["--calibration", str(tmp_path / "absent.txt")], "no such calibration text"),
        (["--save-importance", str(tmp_path / "x")], "need --calibration or --bpw"),
        (["--bpw", "4", "--recipe", "q4"], "either --bpw or --recipe"),
    ):
        assert cli.main(["convert", str(model["src"]), "-o", str(tmp_path / "bad.upg"), "--quiet", *argv]) != 0
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad.upg").exists()


def test_shipped_calibration_text():
    text = calibrate.DEFAULT_TEXT.read_text(encoding="utf-8")
    assert len(text) > 100_000  # enough for an imatrix of a few hundred windows


def test_allocation_on_sampled_rows_equals_full_loads(hf_checkpoint):
    """Allocation reads only the rows it measures where the source allows (bf16 safetensors)."""
    from upg_backend.allocate import sample_rows
    from upg_backend.convert import _Checkpoint

    src = hf_checkpoint(dtype="bfloat16", intermediate_size=384)  # gate_up: 768 rows, more than the sample
    ckpt = _Checkpoint(src)
    name = "model.layers.0.mlp.gate_up_proj.weight"
    rows = sample_rows(768)
    assert rows is not None and len(rows) == 512
    full = ckpt.load(name)
    np.testing.assert_array_equal(ckpt.load(name, rows), full[rows])
    imp = lambda name, cols: None  # noqa: E731
    a = allocate([(name, full.shape, lambda: full)], imp, 4.0)
    b = allocate([(name, full.shape, lambda: full[rows])], imp, 4.0)
    assert a == b


def test_cli_calibrates_a_gguf(tmp_path):
    """A GGUF source is calibrated through a temporary q8_0 conversion of itself, as a checkpoint is."""
    from conftest import make_hf_checkpoint
    from test_gguf import tiny_checkpoint, write_gguf

    src = tiny_checkpoint(lambda **kw: make_hf_checkpoint(tmp_path / "hf", **kw), "phi3")
    gguf = tmp_path / "m.gguf"
    write_gguf(gguf, src, "phi3")
    out, imp = tmp_path / "m.upg", tmp_path / "imp.safetensors"
    assert cli.main(["convert", str(gguf), "-o", str(out), "--type", "q4", "--calibration",
                     "--calibration-tokens", "256", "--save-importance", str(imp), "--quiet"]) == 0
    loaded = calibrate.Importance.load(imp)
    assert loaded.n_tokens == 256 and UPGFile(out).header["calibration"]["n_tokens"] == 256
    name = "model.layers.1.self_attn.o_proj.weight"
    w = np.asarray(convert_and_read_f32(gguf, tmp_path, name))
    np.testing.assert_array_equal(UPGFile(out).raw(name), ref.quantize("q4", 32, w, loaded.columns[name]))
    assert not list(tmp_path.glob("upg-calibration-*"))  # the temporary model is gone


def convert_and_read_f32(gguf, tmp_path, name):
    from upg_backend.gguf_source import convert_gguf

    convert_gguf(gguf, tmp_path / "f32.upg", type="f32", progress=False)
    return UPGFile(tmp_path / "f32.upg").tensor(name)
