"""How much each transformer-block matrix's noise moves the model's output: KLD weights for --bpw.

Bit allocation's noise is relative to each matrix's own output, so it treats every matrix alike; a
unit of it in one matrix can move the final distribution several times more than in another
(docs/QUANTIZATION.md "Bit allocation"). The weight of a matrix is measured, once per matrix: in an
f16 model (a temporary conversion), that matrix alone is replaced by a probe quantization of itself
(PROBES, by GPTQ when Gram matrices are given, else importance-weighted rounding), the model runs a
few windows of the calibration text, and the mean KL(P_model || P_probed) over their positions,
divided by the probe's relative noise (measured as the allocator measures noise), is its weight:
the first-order cost of a unit of noise there.

The model is f16, not q8_0 as calibration's: the engine rounds the activations of q8_0 matrices to
8 bits, and a probe in an early layer changes how every later activation rounds, which adds the
whole of that rounding's KLD to the probe's (on the testbed it tripled the weights of the first
layers). The probe is written into the model file in place (as f16, so the file keeps its layout)
and the matrix's bytes are put back before the next one; the file is the caller's temporary copy.
Time: one quantization of every block matrix at the probe and n_windows * n_ctx tokens of
evaluation per matrix (the testbed: 32 matrices in about two minutes on two cores; Phi-4's 160 on
two cores: hours, so it is opt-in).
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from .allocate import Candidate, fits, is_block_matrix, output_noise

# The probe: the cheapest candidate, whose noise is far above f16's; q3 for widths iq3
# cannot hold (not a multiple of 256).
PROBES = (Candidate("iq3", 32), Candidate("q3", 32))
N_WINDOWS = 4  # windows of the calibration text each probe is evaluated on


def kld_weights(model_path: str | os.PathLike, windows: list[np.ndarray], columns: Mapping[str, np.ndarray],
                gram: Mapping[str, np.ndarray] | None = None, n_threads: int | None = None) -> dict[str, float]:
    """Each block matrix's KLD per unit of relative noise, measured in the f16 model at model_path.

    Args:
        model_path: a .upg whose block matrices are f16 (a temporary conversion); written in place
            while this runs and restored matrix by matrix.
        windows: token windows to evaluate (a few of the calibration text).
        columns: name -> importance (calibrate.Importance.columns) of the probe's rounding.
        gram: name -> Gram matrix: the probe is GPTQ's and the noise tr(E H E^T) / tr(W H W^T).
        n_threads: engine threads (None: all cores).

    Raises:
        ValueError: a block matrix of the model is not f16.
    """
    from . import _core, gptq
    from .format import UPGFile
    from .quality import log_softmax, window_logits

    upg = UPGFile(model_path)
    names = [n for n, t in upg.tensors.items() if is_block_matrix(n, t.dims)]
    for name in names:
        t = upg.tensors[name]
        if t.dtype != "f16":
            raise ValueError(f"{name}: the probed model's block matrices must be f16, not {t.dtype}")
    kld = lambda lp, logits: float((np.exp(lp) * (lp - log_softmax(logits))).sum(axis=-1).mean())  # noqa: E731
    ref = [log_softmax(x) for x in window_logits(model_path, windows, n_threads)]
    weights = {}
    for name in names:
        t = upg.tensors[name]
        rows, cols = t.dims
        original = np.array(upg.raw(name))
        w = original.view(np.float16).reshape(rows, cols).astype(np.float32)
        h = None if gram is None else gram.get(name)
        imp = columns.get(name)
        probe = next(c for c in PROBES if fits(c, t.dims))
        if h is not None and probe.type in gptq.TYPES:
            data = gptq.quantize(w, h, probe.type, probe.block, imp)
        else:
            data = _core.quantize(probe.type, probe.block, w, importance=imp)
        probed = _core.dequantize(probe.type, probe.block, data, rows, cols).astype(np.float16)
        noise = output_noise(w, probed.astype(np.float32), h, imp)
        where = upg.data_offset + t.offset
        with open(model_path, "r+b") as f:
            f.seek(where)
            f.write(probed.tobytes())
        try:
            logits = window_logits(model_path, windows, n_threads)  # a fresh mapping: the probed bytes
            k = float(np.mean([kld(lp, x) for lp, x in zip(ref, logits)]))
        finally:
            with open(model_path, "r+b") as f:
                f.seek(where)
                f.write(original.tobytes())
        weights[name] = k / max(noise, 1e-30)
    return weights


def measure(model_path: str | os.PathLike, importance, text: str | os.PathLike | None = None, n_ctx: int = 512,
            n_threads: int | None = None) -> dict[str, float]:
    """kld_weights of the f16 model at model_path on N_WINDOWS windows of n_ctx tokens spread over the
    calibration text (None: the shipped one), with the importance's columns and Gram matrices
    (calibrate.Importance)."""
    from pathlib import Path

    from . import calibrate
    from .format import UPGFile

    text_path = Path(text) if text is not None else calibrate.DEFAULT_TEXT
    windows = calibrate._windows(calibrate._tokens(UPGFile(model_path), text_path), n_ctx, N_WINDOWS * n_ctx)
    return kld_weights(model_path, windows, importance.columns, importance.gram, n_threads)
