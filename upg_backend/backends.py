"""The backend registry: which backends this build has and this machine runs, and opening one by
name. `Llama(backend=...)`, `upg ... --backend` and the benchmarks all choose through
`open_backend`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from . import _core

NAMES = ("auto", "cpu", "metal", "cuda")
# What each GPU backend needs, for the error when it is asked for and absent from the build.
_NEEDS = {
    "metal": "a build for macOS with the Metal backend (pip install . on a Mac)",
    "cuda": "a build with the CUDA backend (pip install . where CUDA's nvcc is found)",
}


def built() -> list[str]:
    """The backends compiled into this build, fastest last."""
    return ["cpu"] + [name for name, attr in (("metal", "metal_device"), ("cuda", "CudaBackend"))
                      if hasattr(_core, attr)]


def available() -> list[str]:
    """The backends this build has and this machine can run (a GPU present), fastest last."""
    return list(_core.backends())


def _open(name: str, generated: str) -> Any:
    """The device object of a GPU backend that is built; RuntimeError when it does not open."""
    if name == "cuda":
        if _core.cuda_device_count() == 0:
            raise RuntimeError("no NVIDIA GPU found")
        return _core.CudaBackend(0, generated)
    here = Path(__file__).resolve().parent
    return _core.metal_device(str(here / "upg.metallib"), str(here / "metal"))


GENERATED = ("matvec", "matmul")  # CUDA's kernels of generated tokens (open_backend)


def check_generated(generated: str) -> None:
    if generated not in GENERATED:
        raise ValueError(f"generated must be 'matvec' or 'matmul', got {generated!r}")


def open_backend(backend: Any, *, generated: str = "matvec") -> tuple[str, Any]:
    """(name, the object `_core.Session(backend=...)` takes) for a backend name or object.

    "auto" is the fastest backend built here that opens on this machine (CUDA, then Metal, then
    the CPU; a GPU that is present but fails to open is reported on stderr). A `_core.MetalGpu`
    (the tests' harness) runs the Metal backend on it; a `_core.Backend` is used as it is.
    generated: the CUDA kernels of generated tokens' linear layers, "matvec" (the fastest for up
    to 16 streams) or "matmul" (its tensor-core mat-mul: the fastest for 32; docs/CUDA.md).

    Raises:
        ValueError: an unknown name, or a backend this build or machine lacks (naming what it needs).
    """
    check_generated(generated)
    if isinstance(backend, _core.MetalGpu):
        return "metal", backend
    if isinstance(backend, _core.Backend):
        return backend.name, backend
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {', '.join(NAMES)}, got {backend!r}")
    if backend == "cpu":
        return "cpu", None
    if backend != "auto" and backend not in built():
        raise ValueError(f"backend={backend!r} needs {_NEEDS[backend]}; this build has {', '.join(built())}")
    for name in ("cuda", "metal") if backend == "auto" else (backend,):
        if name not in built():
            continue
        try:
            return name, _open(name, generated)
        except RuntimeError as e:
            if backend == name:
                raise ValueError(f"backend={name!r}: {e}") from e
            if name in available():  # present but failing: say so; absent is the usual case
                print(f"upg_backend: {name} unavailable ({e}); trying the next backend", file=sys.stderr)
    return "cpu", None
