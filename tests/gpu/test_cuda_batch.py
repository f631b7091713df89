"""Many sequences in one pass on the CUDA backend (GPU only: UPG_GPU_TESTS=1): the CUDA version of
tests/test_batch.py. A BatchSession's sequences join and leave at different steps, their prompts cut
into chunks beside the others' generated tokens; each sequence's logits must have the bits of that
sequence alone on a CUDA Session of the same generated-row kernels (the mat-vec, or the mat-mul that
BatchSession uses; the kernels are chosen by the kind of token, never by what else a pass holds:
docs/ARCHITECTURE.md "Batch-invariant arithmetic"), and agree with the CPU BatchSession within the
tolerances of test_cuda_model.py (the two backends' arithmetic differs as it does for one
sequence)."""
from __future__ import annotations

import numpy as np
import pytest

from batch_schedule import alone, prompts, run_schedule
from conftest import make_hf_checkpoint
from test_cuda_model import F16_TOL, FLIP_TOL, GRID_TYPES, SMALL
from upg_backend import _core
from upg_backend.convert import convert_hf
from upg_backend.format import UPGFile

# (type, block, outlier fraction) of the converted files, and the CPU tolerance of each
# Against the CPU: a sequence here runs up to 13 generated tokens beside its prompt, so two flipped
# activation codes (test_cuda_model's FLIP_TOL, one flip's bound) can meet in one sequence's KV
# cache: 2 x FLIP_TOL (measured on the H200, 2026-12-01: at most 0.0328, iq4_xs).
BATCH_FLIP_TOL = 2 * FLIP_TOL
TYPES = {"f16": (0, 0.0, F16_TOL), "q8_0": (32, 0.0, BATCH_FLIP_TOL), "q4": (64, 0.0, BATCH_FLIP_TOL),
         "q3": (32, 0.02, BATCH_FLIP_TOL), **{t: (32, 0.0, BATCH_FLIP_TOL) for t in GRID_TYPES}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda-batch")
    src = make_hf_checkpoint(root / "hf", "Phi3ForCausalLM", seed=5, **SMALL)
    # the grid types' files as test_cuda_model's: every matrix a multiple of 256 wide, so of the type
    src_grid = make_hf_checkpoint(root / "hf-grid", "Phi3ForCausalLM", seed=9, **{**SMALL, "intermediate_size": 512})
    out = {}
    for t, (block, outliers, _) in TYPES.items():
        out[t] = root / f"{t}.upg"
        kw = dict(block=block) if block else {}
        if outliers:
            kw["outliers"] = outliers
        convert_hf(src_grid if t in GRID_TYPES else src, out[t], type=t, progress=False, **kw)
    return out


def core_model(path):
    return _core.Model(str(path), UPGFile(path).config.engine_config())


def backend(name, generated="matvec"):
    return _core.CudaBackend(0, generated) if name == "cuda" else None


def run_batch(model, be, ps, n_gen, forced=None, generated="matvec"):
    """tests/batch_schedule.py's schedule on a BatchSession of backend be: each sequence's rows and
    generated tokens."""
    session = _core.BatchSession(model, len(ps), 96, "f16", 2, 64, backend(be, generated))
    return run_schedule(session, ps, n_gen, forced)


@pytest.mark.parametrize("generated", ["matvec", "matmul"])
@pytest.mark.parametrize("type_", list(TYPES))
def test_batch_equals_each_sequence_alone(models, type_, generated):
    """12 sequences through 12 slots: every logits row has the bits of the sequence alone on a CUDA
    Session of the same generated-row kernels, and the CPU BatchSession, fed the same tokens, agrees
    within the type's tolerance."""
    model = core_model(models[type_])
    ps = prompts(12, seed=1)
    n_gen = [3 + (i * 7) % 11 for i in range(len(ps))]
    want = [alone(model, p, g, backend=backend("cuda", generated)) for p, g in zip(ps, n_gen)]
    rows, gen = run_batch(model, "cuda", ps, n_gen, generated=generated)
    for i, (w_rows, w_gen) in enumerate(want):
        assert gen[i] == w_gen, f"sequence {i}"
        np.testing.assert_array_equal(rows[i], w_rows, err_msg=f"sequence {i}")
    cpu_rows, _ = run_batch(model, "cpu", ps, n_gen, forced=gen)
    tol = TYPES[type_][2]
    for i in range(len(ps)):
        rel = np.abs(rows[i] - cpu_rows[i]).max(axis=1) / np.abs(cpu_rows[i]).max(axis=1)
        assert rel.max() <= tol, (i, rel)


@pytest.mark.parametrize("generated", ["matvec", "matmul"])
def test_decode_steps_of_a_batch_replay_one_graph(models, generated):
    """Steps of one generated token for each of 6 sequences have one shape: the first is captured,
    the rest replay it; a sequence leaving changes the shape (captured anew), then that replays."""
    be = _core.CudaBackend(0, generated)
    assert be.generated == generated
    with pytest.raises(ValueError, match="generated must be"):
        _core.CudaBackend(0, "mat-vec")
    b = _core.BatchSession(core_model(models["q4"]), 6, 64, "f16", 2, 64, be)
    for slot in range(6):
        b.step([(slot, np.arange(3, 3 + slot + 2, dtype=np.int32), False, 1)])
    tok = np.array([7], np.int32)
    before = be.replays
    for _ in range(10):
        b.step([(slot, tok, True, 1) for slot in range(6)])
    assert be.replays - before == 9
    for _ in range(5):
        b.step([(slot, tok, True, 1) for slot in range(5)])
    assert be.replays - before == 13



@pytest.mark.parametrize("generated", ["matvec", "matmul"])
@pytest.mark.parametrize("type_", ["q4", "q8_0", "f16"])
def test_argmax_entries_on_the_device(models, type_, generated):
    """logits 3 on CUDA: each id is numpy's argmax (the first maximum) of the row that logits 1
    returns for the same step, other entries' rows unchanged; the steps of argmax entries replay
    one graph like those of rows."""
    be = _core.CudaBackend(0, generated)
    b = _core.BatchSession(core_model(models[type_]), 8, 96, "f16", 2, 256, be)
    ps = prompts(8, seed=4)
    b.step([(s, np.array(p, np.int32), False, 0) for s, p in enumerate(ps)])
    toks = np.arange(3, 11, dtype=np.int32)
    for n in range(3):
        step = [(s, toks[s:s + 1], True) for s in range(8)]
        want = b.step([(*e, 1) for e in step])
        for s in range(8):
            b.truncate(s, len(ps[s]) + n)
        ids = np.full(7, -1, np.int32)
        got = b.step([(*e, 3 if s != 5 else 1) for s, e in enumerate(step)], ids)
        np.testing.assert_array_equal(ids, np.delete(want.argmax(axis=1), 5))
        np.testing.assert_array_equal(got, want[5:6])
        toks = want.argmax(axis=1).astype(np.int32)
    before = be.replays
    for _ in range(4):
        ids = np.empty(8, np.int32)
        b.step([(s, toks[s:s + 1], True, 3) for s in range(8)], ids)
        toks = ids.copy()
    assert be.replays - before == 3
