"""KLD weights of bit allocation (upg_backend.sensitivity): each matrix's measured KLD per unit of
noise against a numpy forward pass of the same probed model, the file put back, and their use by
--bpw (allocation, header, command line)."""
from __future__ import annotations

import numpy as np
import pytest

import reference.forward as fwd
from test_calibration import TEXT, block_bpw, model  # noqa: F401 (model: the fixture)
from upg_backend import _core, calibrate, cli, gptq, sensitivity
from upg_backend.allocate import Candidate, allocate, is_block_matrix, relative_noise
from upg_backend.convert import convert_hf
from upg_backend.format import UPGFile
from upg_backend.quality import log_softmax
from upg_backend.tokenizer import Tokenizer


def mean_kld(lp, lq):
    return float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())


def test_kld_weights_match_numpy_forward(model, tmp_path):  # noqa: F811
    f16 = tmp_path / "f16.upg"
    convert_hf(model["src"], f16, type="f16", progress=False)
    imp = calibrate.collect(f16, model["text"], n_ctx=24, progress=False, gram=True)
    upg = UPGFile(f16)
    tokens = np.asarray(Tokenizer(upg.header["tokenizer"], upg.header["tokenizer_config"]).encode(TEXT), np.int32)
    windows = [tokens[i:i + 24] for i in (0, 40)]
    before = f16.read_bytes()
    weights = sensitivity.kld_weights(f16, windows, imp.columns, imp.gram, n_threads=2)
    assert f16.read_bytes() == before  # every probe was put back
    blocks = [n for n, t in upg.tensors.items() if is_block_matrix(n, t.dims)]
    assert sorted(weights) == sorted(blocks)
    ref = fwd.load_weights(upg)
    ref_lp = [log_softmax(fwd.forward(ref, upg.config, w)) for w in windows]
    for name in blocks:
        # the probe built here from the type's own functions (iq3 needs widths of 256: q3 here),
        # stored as f16, in the numpy forward pass
        rows, cols = upg.tensors[name].dims
        w, h = upg.tensor(name).astype(np.float32), imp.gram[name]
        q3 = _core.dequantize("q3", 32, gptq.quantize(w, h, "q3", 32, imp.columns[name]), rows, cols)
        probed = q3.astype(np.float16).astype(np.float64)
        noise = gptq.output_error(w, probed, h) / gptq.output_error(w, 0 * w, h)
        k = np.mean([mean_kld(lp, log_softmax(fwd.forward({**ref, name: probed}, upg.config, x)))
                     for lp, x in zip(ref_lp, windows)])
        assert k > 0 and weights[name] == pytest.approx(k / noise, rel=0.05), name
    assert len({round(v, 6) for v in weights.values()}) > 1  # matrices differ
    plain = sensitivity.kld_weights(f16, windows, imp.columns)  # without Gram matrices: a rounded probe
    assert sorted(plain) == sorted(blocks) and all(v > 0 for v in plain.values()) and f16.read_bytes() == before
    q8 = tmp_path / "q8.upg"
    convert_hf(model["src"], q8, type="q8_0", progress=False)
    with pytest.raises(ValueError, match="must be f16"):
        sensitivity.kld_weights(q8, windows, imp.columns)


def test_weights_move_the_bits():
    """Two matrices of equal noise: the upgrade goes to the one whose noise costs more KLD."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((64, 256)) * rng.exponential(1.0, (1, 256))).astype(np.float32)
    mats = [(f"model.layers.0.{n}.weight", (64, 256), lambda: w) for n in ("a", "b")]
    imp = lambda name, cols: None  # noqa: E731
    cands = (Candidate("q3", 64), Candidate("q4", 64))
    for heavy in ("a", "b"):
        weights = {"model.layers.0.a.weight": 1.0, "model.layers.0.b.weight": 1.0, f"model.layers.0.{heavy}.weight": 3.0}
        alloc = allocate(mats, imp, 3.75, candidates=cands, weights=weights)
        assert {n[-8] for n, c in alloc.choices.items() if c.name == "q4/64"} == {heavy}
        assert alloc.header()["kld_weights"] == weights and "KLD" in alloc.header()["method"]
        for name, c in alloc.choices.items():  # the recorded noise is the matrix's own, not weighted
            assert alloc.noise[name] == relative_noise(w, None, c)

def test_cli_kld_weights(model, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "m.upg"
    assert cli.main(["convert", str(model["src"]), "-o", str(out), "--bpw", "4", "--gptq", "--kld-weights",
                     "--calibration", str(model["text"]), "--calibration-tokens", "96", "--quiet"]) == 0
    upg = UPGFile(out)
    alloc = upg.header["allocation"]
    blocks = {n for n, t in upg.tensors.items() if is_block_matrix(n, t.dims)}
    assert set(alloc["kld_weights"]) == blocks and all(v >= 0 for v in alloc["kld_weights"].values())
    assert "KLD" in alloc["method"] and block_bpw(out) <= 4
    assert not list(tmp_path.glob("upg-calibration-*"))  # the probed temporary model is gone
    capsys.readouterr()
    imp = tmp_path / "imp.safetensors"
    calibrate.collect(model["f32"], model["text"], progress=False).save(imp)
    for argv, message in ((["--type", "q4", "--kld-weights", "--calibration"], "needs --bpw"),
                          (["--bpw", "4", "--kld-weights", "--importance", str(imp)], "--kld-weights needs the model")):
        assert cli.main(["convert", str(model["src"]), "-o", str(tmp_path / "bad.upg"), "--quiet", *argv]) != 0
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad.upg").exists()
