"""Sampling parameters: the one struct every entry point (Llama, server, CLI, plugins) passes around."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from . import _core


@dataclasses.dataclass
class SamplingParams:
    """How the next token is chosen. Defaults are llama-cpp-python's.

    Attributes:
        temperature: softmax temperature; 0 picks the most likely token (greedy).
        top_k: keep the k most likely tokens (0: all).
        top_p: keep the smallest set of tokens whose probability reaches top_p (1: all).
        min_p: drop tokens less likely than min_p times the most likely one (0: none).
        typical_p: locally typical sampling mass (1: off).
        repeat_penalty: divides positive (multiplies negative) logits of recent tokens (1: off).
        presence_penalty: subtracted once from the logit of every recent token.
        frequency_penalty: subtracted from a recent token's logit per occurrence.
        penalty_last_n: how many recent tokens the penalties look at.
        logit_bias: token id -> value added to its logit (-inf bans it).
        seed: re-seeds the sampler's RNG before this request (None: keep the current stream).
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)
    seed: int | None = None

    @property
    def plain_greedy(self) -> bool:
        """The argmax of the raw logits: temperature 0, no penalty and no bias changing them."""
        penalties = self.penalty_last_n and (self.repeat_penalty != 1.0 or self.presence_penalty or self.frequency_penalty)
        return self.temperature <= 0.0 and not penalties and not self.logit_bias

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                     "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("top_k", "penalty_last_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        for name in ("top_p", "min_p", "typical_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        self.logit_bias = _parse_logit_bias(self.logit_bias)

    @classmethod
    def from_kwargs(cls, base: SamplingParams | None = None, **kwargs: Any) -> SamplingParams:
        """`base` (or the defaults) with the named fields replaced; None values keep the base value.

        Raises:
            ValueError: an unknown field name or a bad value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        changes = {k: v for k, v in kwargs.items() if v is not None}
        return dataclasses.replace(base or cls(), **changes)

    def to_core(self) -> _core.SamplingParams:
        """The engine's sampler settings."""
        core = _core.SamplingParams()
        for f in dataclasses.fields(self):
            if f.name not in ("logit_bias", "seed"):
                setattr(core, f.name, getattr(self, f.name))
        core.logit_bias = dict(self.logit_bias)
        return core


def _parse_logit_bias(bias: Mapping[Any, Any] | None) -> dict[int, float]:
    # OpenAI clients send token ids as JSON object keys, i.e. strings
    out = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
            out[token] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias must map token ids to numbers, got {key!r}: {value!r}") from None
        if token < 0 or math.isnan(out[token]):
            raise ValueError(f"logit_bias: bad entry {key!r}: {value!r}")
    return out
