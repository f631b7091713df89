"""The grid types (iq4_nl, iq4_xs, iq3): the writer's search against the numpy reference's plain
rounding, importance weighting, the layout rules and the format version they need."""
import struct

import numpy as np
import pytest

from reference import quant as ref
from upg_backend import _core
from upg_backend.format import TensorSource, UPGFile, UPGFormatError, write_upg
from upg_backend.recipes import Recipe, get_recipe

GRID_TYPES = ref.GRID_TYPES
BITS = {"iq4_nl": 4.5, "iq4_xs": 4.25, "iq3": 3.25}


def _weights(rows, cols, seed):
    """Gaussian rows with heavy-tailed ones among them (a few large weights per row, as in LLM matrices)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[::3] = rng.standard_t(3, (len(w[::3]), cols)).astype(np.float32)
    return w * 0.02


@pytest.mark.parametrize("type_", GRID_TYPES)
def test_bits_per_weight(type_):
    rows, cols = 512, 5120
    assert _core.quant_nbytes(type_, rows, cols, 32) * 8 / (rows * cols) == BITS[type_]


@pytest.mark.parametrize("type_", GRID_TYPES)
def test_writer_codes_are_the_nearest_grid_values(type_):
    """Given the scales the writer stored, each element's code is the grid value nearest it."""
    rows, cols = 12, 512
    w = _weights(rows, cols, seed=1)
    q, scale = ref.grid_parts(type_, _core.quantize(type_, 32, w), rows, cols)
    grid = ref.GRIDS[type_]
    x = w.reshape(rows, -1, 32).astype(np.float64)
    s = scale.astype(np.float64)[..., None]
    assert (s != 0).all()
    got = np.abs(x - s * grid[q])
    best = np.abs(x[..., None] - s[..., None] * grid).min(-1)
    assert (got <= best + 1e-6 * np.abs(s)).all()


@pytest.mark.parametrize("type_", GRID_TYPES)
def test_search_beats_rounding(type_):
    """The writer's scale search: less squared error than the reference's round to nearest."""
    rows, cols = 64, 1024
    w = _weights(rows, cols, seed=2)
    err = lambda data: ((ref.dequantize(type_, 32, data, rows, cols) - w) ** 2).sum()  # noqa: E731
    searched, rounded = err(_core.quantize(type_, 32, w)), err(ref.quantize(type_, 32, w))
    assert searched < 0.93 * rounded, (searched, rounded)


@pytest.mark.parametrize("type_", GRID_TYPES)
def test_importance_lowers_the_weighted_error(type_):
    """With importance on a few columns, their error drops, and so does the importance-weighted
    error of the whole matrix (what the output error of the matrix follows)."""
    rows, cols = 64, 1024
    w = _weights(rows, cols, seed=3)
    rng = np.random.default_rng(4)
    importance = np.exp(2 * rng.standard_normal(cols)).astype(np.float32)
    plain = ref.dequantize(type_, 32, _core.quantize(type_, 32, w), rows, cols)
    weighted = ref.dequantize(type_, 32, _core.quantize(type_, 32, w, importance=importance), rows, cols)
    werr = lambda d: (((d - w) ** 2) * importance).sum()  # noqa: E731
    assert werr(weighted) < 0.9 * werr(plain), (werr(weighted), werr(plain))
    top = importance > np.quantile(importance, 0.9)
    assert ((weighted - w)[:, top] ** 2).sum() < ((plain - w)[:, top] ** 2).sum()


@pytest.mark.parametrize("type_", GRID_TYPES)
def test_writer_is_deterministic_across_threads_and_rows(type_):
    rows, cols = 33, 768
    w = _weights(rows, cols, seed=5)
    importance = np.random.default_rng(6).random(cols).astype(np.float32)
    one = _core.quantize(type_, 32, w, n_threads=1, importance=importance)
    np.testing.assert_array_equal(_core.quantize(type_, 32, w, n_threads=3, importance=importance), one)
    # a row's bytes do not depend on the other rows
    part = _core.quantize(type_, 32, w[7:8], importance=importance)
    np.testing.assert_array_equal(ref.dequantize(type_, 32, part, 1, cols),
                                  ref.dequantize(type_, 32, one, rows, cols)[7:8])


@pytest.mark.parametrize("type_", GRID_TYPES)
def test_zero_and_tiny_blocks_decode_to_zero(type_):
    w = np.zeros((3, 512), np.float32)
    w[1] = 1e-9  # every scale underflows in f16
    w[2, 256:] = 0.5  # one super-block of zeros, one of equal values
    deq = ref.dequantize(type_, 32, _core.quantize(type_, 32, w), 3, 512)
    np.testing.assert_array_equal(deq[:2], 0.0)
    np.testing.assert_array_equal(deq[2, :256], 0.0)
    np.testing.assert_allclose(deq[2, 256:], 0.5, rtol=0.02)


def test_importance_is_checked():
    w = np.ones((2, 256), np.float32)
    for bad, match in [(np.ones(255, np.float32), "1-D array of 256 values"),
                       (np.full(256, -1, np.float32), "finite and >= 0"),
                       (np.full(256, np.nan, np.float32), "finite and >= 0")]:
        with pytest.raises(ValueError, match=match):
            _core.quantize("iq4_xs", 32, w, importance=bad)


@pytest.mark.parametrize("type_,cols,block,match", [
    ("iq4_xs", 288, 32, "multiple of 256"),
    ("iq3", 320, 32, "multiple of 256"),
    ("iq4_nl", 128, 64, "block must be 32"),
])
def test_shape_rules(type_, cols, block, match):
    with pytest.raises(ValueError, match=match):
        _core.quantize(type_, block, np.ones((2, cols), np.float32))
    with pytest.raises(ValueError, match=match):
        TensorSource("w", type_, (2, cols), lambda: None, block)


def test_grid_types_carry_no_outliers():
    with pytest.raises(ValueError, match="carries no outliers"):
        TensorSource("w", "iq4_xs", (2, 256), lambda: None, 32, outliers=0.01)
    with pytest.raises(ValueError, match="carries no outliers"):
        get_recipe(None, type="iq3", outliers=0.01)


def test_recipe_falls_back_where_rows_are_not_super_blocks():
    r = get_recipe("iq4_xs")
    assert r.type_for("model.layers.0.mlp.down_proj.weight", (576, 1536)) == "iq4_xs"
    assert r.type_for("model.layers.0.mlp.gate_up_proj.weight", (3072, 576)) == "iq4_nl"
    with pytest.raises(ValueError, match="takes block 32"):
        Recipe("x", "iq3", 64)


def _version(path):
    return struct.unpack_from("<I", path.read_bytes(), 8)[0]


def test_files_say_the_version_their_types_need(tmp_path):
    """FORMAT.md "Versions": 1 for the version-1 types only, 2 with a grid type, which reads back."""
    w = _weights(4, 256, seed=7)
    old, new = tmp_path / "old.upg", tmp_path / "new.upg"
    write_upg(old, {}, [TensorSource("a", "q4", w.shape, lambda: w, 32)])
    write_upg(new, {}, [TensorSource("a", "q4", w.shape, lambda: w, 32),
                        TensorSource("b", "iq4_xs", w.shape, lambda: w, 32)])
    assert (_version(old), _version(new)) == (1, 2)
    upg = UPGFile(new)
    np.testing.assert_array_equal(upg.tensor("b"), _core.quantize("iq4_xs", 32, w))
    # the same file claiming version 1 is refused, naming the type
    raw = bytearray(new.read_bytes())
    raw[8:12] = struct.pack("<I", 1)
    new.write_bytes(bytes(raw))
    with pytest.raises(UPGFormatError, match="iq4_xs needs format version 2, the file says 1"):
        UPGFile(new)


def test_unknown_type_code_is_a_clear_error(tmp_path):
    """A type code from a newer writer: the reader says so instead of misreading the bytes."""
    w = _weights(4, 256, seed=8)
    path = tmp_path / "f.upg"
    write_upg(path, {}, [TensorSource("b", "iq3", w.shape, lambda: w, 32)])
    raw = bytearray(path.read_bytes())
    at = raw.index(b"\x01\x00b") + 3  # the directory record: u16 name length, name, then u8 dtype
    assert raw[at] == _core.DTYPES["iq3"]
    raw[at] = 42
    path.write_bytes(bytes(raw))
    with pytest.raises(UPGFormatError, match="tensor 'b': unknown dtype 42 .*newer upg_backend"):
        UPGFile(path)
