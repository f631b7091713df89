"""Backend plugins: the `local_llm.backends` entry-point group (protocol in docs/PLUGINS.md).

A host tool finds backends through package metadata alone, without importing them first; loading
an entry point gives an object with `name`, `file_types`, `can_load(path)` and
`create(path, **kwargs)`. This module is upg-backend's own entry and the discovery helper.
"""
from __future__ import annotations

import dataclasses
import os
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

ENTRY_POINT_GROUP = "local_llm.backends"


@runtime_checkable
class Backend(Protocol):
    """What a `local_llm.backends` entry point resolves to."""

    name: str
    file_types: tuple[str, ...]

    def can_load(self, path: str | os.PathLike) -> bool: ...

    def create(self, path: str | os.PathLike, **kwargs: Any) -> Any: ...


class UPGBackend:
    """upg-backend as a plugin: loads .upg files into `upg_backend.Llama`."""

    name = "upg"
    file_types = (".upg",)

    def can_load(self, path: str | os.PathLike) -> bool:
        """Whether `path` is a file starting with the UPG magic (cheap: reads 8 bytes)."""
        from ._core import MAGIC

        try:
            with open(path, "rb") as f:
                return f.read(len(MAGIC)) == MAGIC
        except OSError:
            return False

    def create(self, path: str | os.PathLike, **kwargs: Any) -> Any:
        """A `Llama` for the file; kwargs are `Llama`'s keyword arguments (n_ctx, n_threads, ...)."""
        from .llama import Llama

        return Llama(path, **kwargs)


backend = UPGBackend()


@dataclasses.dataclass(frozen=True)
class Discovered:
    """One entry point of the group: its backend object, or why it could not be loaded."""

    entry_point: str   # "name = module:attr"
    distribution: str  # the package that declares it
    backend: Backend | None
    error: str | None = None


def discover() -> list[Discovered]:
    """Loads every backend declared in the `local_llm.backends` group, in name order.

    A broken plugin is reported (`error`), never raised, so one bad package cannot hide the others.
    """
    found = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else "?"
        label = f"{ep.name} = {ep.value}"
        try:
            obj = ep.load()
        except Exception as e:  # a plugin's import error must not break discovery of the others
            found.append(Discovered(label, dist, None, f"cannot load: {type(e).__name__}: {e}"))
            continue
        if not isinstance(obj, Backend) or not isinstance(obj.name, str) or isinstance(obj.file_types, str):
            found.append(Discovered(label, dist, None, "does not follow the backend protocol "
                                    "(name, file_types, can_load, create)"))
            continue
        found.append(Discovered(label, dist, obj))
    return found


def backend_for(path: str | os.PathLike) -> Backend:
    """The first discovered backend that claims the file (by suffix, then `can_load`).

    Raises:
        ValueError: no installed backend can load the file.
    """
    suffix = Path(path).suffix.lower()
    for d in discover():
        if d.backend is not None and suffix in d.backend.file_types and d.backend.can_load(path):
            return d.backend
    raise ValueError(f"no installed backend can load {path}")
