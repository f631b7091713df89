"""The backend registry: which backends this build and machine can run, and opening one by name.

`Llama(backend=...)`, `upg ... --backend` and the benchmarks all choose through `open_backend`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from . import _core

NAMES = ("auto", "cpu", "metal", "cuda")
# What each backend needs, for the error when it is asked for and absent.
_NEEDS = {
    "metal": "a build for macOS with the Metal backend (pip install . on a Mac)",
    "cuda": "a build with the CUDA backend, which this version does not have yet",
}


def built() -> list[str]:
    """The backends compiled into this build, fastest last."""
    return list(_core.backends())


def open_backend(backend: Any) -> tuple[str, Any]:
    """(name, the object `_core.Session(backend=...)` takes) for a backend name or object.

    "auto" is the fastest backend built here that opens on this machine (Metal where a GPU opens,
    else the CPU, saying why on stderr). A `_core.MetalGpu` (the tests' harness) runs the Metal
    backend on it.

    Raises:
        ValueError: an unknown name, or a backend this build or machine lacks (naming what it needs).
    """
    if isinstance(backend, _core.MetalGpu):
        return "metal", backend
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {', '.join(NAMES)}, got {backend!r}")
    if backend == "cpu":
        return "cpu", None
    if backend != "auto" and backend not in built():
        raise ValueError(f"backend={backend!r} needs {_NEEDS[backend]}; this build has {', '.join(built())}")
    if backend in ("auto", "metal") and "metal" in built():
        here = Path(__file__).resolve().parent
        try:
            return "metal", _core.metal_device(str(here / "upg.metallib"), str(here / "metal"))
        except RuntimeError as e:
            if backend == "metal":
                raise ValueError(f"backend='metal': no Metal GPU opened ({e})") from e
            print(f"upg_backend: Metal unavailable ({e}); running on the CPU", file=sys.stderr)
    return "cpu", None
