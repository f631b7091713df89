"""A stand-in for llama-cpp-python's `llama_cpp` module, so programs and libraries written for it
run on upg-backend unchanged.

    import upg_backend.llama_cpp
    upg_backend.llama_cpp.install()      # before importing LangChain, LlamaIndex, ...
    from langchain_community.llms import LlamaCpp

`install()` puts this module (and its submodules) into `sys.modules` as `llama_cpp`; a program of
one's own can also just `import upg_backend.llama_cpp as llama_cpp`. docs/API.md lists what each
llama-cpp-python argument does here.
"""
from __future__ import annotations

import sys
from typing import Callable

import numpy as np

from ..grammar import Grammar
from ..llama import POOLING, Llama, LlamaState
from . import llama_chat_format, llama_grammar, llama_types
from .llama_grammar import LlamaGrammar

# llama-cpp-python's constants that callers pass to Llama
LLAMA_DEFAULT_SEED = 0xFFFFFFFF
LLAMA_POOLING_TYPE_UNSPECIFIED, LLAMA_POOLING_TYPE_NONE, LLAMA_POOLING_TYPE_MEAN = -1, 0, 1
LLAMA_POOLING_TYPE_CLS, LLAMA_POOLING_TYPE_LAST = 2, 3
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1


class LogitsProcessorList(list):
    """Callables `(input_ids, scores) -> scores`, applied in order (llama-cpp-python's)."""

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        for process in self:
            scores = process(input_ids, scores)
        return scores


class StoppingCriteriaList(list):
    """Callables `(input_ids, logits) -> bool`; true when any is (llama-cpp-python's)."""

    def __call__(self, input_ids: np.ndarray, logits: np.ndarray) -> bool:
        return any(stop(input_ids, logits) for stop in self)


LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]
StoppingCriteria = Callable[[np.ndarray, np.ndarray], bool]


class LlamaRAMCache:
    """Accepted for `Llama.set_cache`; not needed here: every call keeps the KV cache of the longest
    prefix it shares with the context (docs/API.md, "Prefix reuse")."""

    def __init__(self, capacity_bytes: int = 2 << 30):
        self.capacity_bytes = capacity_bytes


LlamaCache = LlamaRAMCache
LlamaDiskCache = LlamaRAMCache

_SUBMODULES = {"llama_types": llama_types, "llama_chat_format": llama_chat_format, "llama_grammar": llama_grammar}


def install() -> None:
    """Makes `import llama_cpp` (and `llama_cpp.llama_types`, `.llama_chat_format`,
    `.llama_grammar`) import this module; call it before importing a library that uses llama_cpp.

    Raises:
        RuntimeError: the real llama_cpp is already imported (libraries hold on to its classes).
    """
    current = sys.modules.get("llama_cpp")
    if current is not None and current is not sys.modules[__name__]:
        raise RuntimeError("llama_cpp (llama-cpp-python) is already imported; call install() before anything imports it")
    sys.modules["llama_cpp"] = sys.modules[__name__]
    for name, module in _SUBMODULES.items():
        sys.modules[f"llama_cpp.{name}"] = module


__all__ = ["Llama", "LlamaState", "LlamaGrammar", "LlamaCache", "LlamaRAMCache", "LlamaDiskCache",
           "LogitsProcessorList", "StoppingCriteriaList", "LogitsProcessor", "StoppingCriteria",
           "llama_chat_format", "llama_types", "llama_grammar", "install", "Grammar", "POOLING"]
