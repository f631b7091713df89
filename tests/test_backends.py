"""The backend registry (upg_backend/backends.py, `_core.backends()`) and how a backend is chosen:
`Llama(backend=...)`, `_core.Session(backend=...)` and `--backend` on the `upg` commands."""
from __future__ import annotations

import subprocess
import sys

import pytest

from upg_backend import _core
from upg_backend.backends import NAMES, available, built, open_backend
from upg_backend.builtin import builtin_model_path
from upg_backend.format import UPGFile
from upg_backend.llama import Llama


def test_built_and_available_list_known_backends_cpu_first():
    names = built()
    assert names[0] == "cpu" and set(names) <= set(NAMES) - {"auto"}
    assert ("metal" in names) == hasattr(_core, "metal_device")
    assert available()[0] == "cpu" and set(available()) <= set(names)
    if "cuda" in names:
        assert ("cuda" in available()) == (_core.cuda_device_count() > 0)


def test_auto_and_cpu():
    llm = Llama(backend="auto")
    assert llm.backend == next(n for n in ("cuda", "metal", "cpu") if n in available())
    assert Llama(backend="cpu").backend == "cpu"


@pytest.mark.parametrize("name, needs", [(n, w) for n, w in (("cuda", "CUDA"), ("metal", "macOS")) if n not in built()])
def test_absent_backend_says_what_it_needs(name, needs):
    with pytest.raises(ValueError, match=f"{needs}.*this build has cpu"):
        open_backend(name)
    with pytest.raises(ValueError, match=needs):
        Llama(backend=name)


@pytest.mark.parametrize("case", ["CUDA built, no GPU"] if "cuda" in built() and "cuda" not in available() else [])
def test_cuda_built_without_a_gpu_says_so(case):  # CI's case
    with pytest.raises(ValueError, match="backend='cuda': no NVIDIA GPU found"):
        open_backend("cuda")


@pytest.mark.parametrize("bad", ["gpu", "CPU", "", None, 3])
def test_unknown_backend_is_refused(bad):
    with pytest.raises(ValueError, match="backend must be one of auto, cpu, metal, cuda"):
        open_backend(bad)


def test_session_refuses_an_object_that_is_no_backend():
    path = str(builtin_model_path())
    model = _core.Model(path, UPGFile(path).config.engine_config())
    with pytest.raises(ValueError, match="backend must be None, a _core.Backend or a _core.MetalGpu"):
        _core.Session(model, 8, backend=object())
    session = _core.Session(model, 8, "f32", 1, backend=_core.CpuBackend(1))
    assert session.backend == "cpu" and _core.Session(model, 8).backend == "cpu"


def upg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "upg_backend.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_backend_option():
    r = upg("complete", "--backend", "cpu", "--max-tokens", "2", "--temperature", "0", "12 + 30 =")
    assert r.returncode == 0, r.stderr
    if "cuda" not in available():
        r = upg("complete", "--backend", "cuda", "hi")
        assert r.returncode == 1 and "upg complete: error: backend='cuda'" in r.stderr
    for cmd in (["chat"], ["complete", "hi"], ["serve"], ["bench", "small"], ["quality", "m.upg", "--reference", "r", "--text", "t"]):
        r = upg(*cmd, "--backend", "tpu")
        assert r.returncode == 2 and "invalid choice: 'tpu'" in r.stderr, cmd
