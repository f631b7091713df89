"""The model configuration: Hugging Face field names, loaded tolerantly.

Every checkpoint quirk (old and new rope field layouts, missing head_dim, Llama's names) is settled
here, once, into the typed config the C++ engine takes (`ModelConfig.engine_config`), which checks it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

SUPPORTED_ARCHITECTURES = ("Phi3ForCausalLM", "LlamaForCausalLM")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    partial_rotary_factor: float
    max_position_embeddings: int
    original_max_position_embeddings: int
    rope_type: str                      # "default" or "longrope"
    short_factor: tuple[float, ...]     # longrope only: one factor per rotary frequency
    long_factor: tuple[float, ...]
    attention_factor: float             # longrope's scale on cos/sin, 1.0 otherwise
    tie_word_embeddings: bool

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def qkv_rows(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    @classmethod
    def from_hf(cls, hf: dict[str, Any], architecture: str | None = None) -> "ModelConfig":
        """Builds the config from a Hugging Face config.json dict; unknown keys are ignored.

        Raises:
            ValueError: the architecture or a rope variant is not supported, or a field is invalid.
        """
        arch = architecture or (hf.get("architectures") or [None])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

        def need(key: str) -> Any:
            if key not in hf or hf[key] is None:
                raise ValueError(f"config is missing {key!r}")
            return hf[key]

        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        # transformers 5 moved rope settings into rope_parameters; older files use rope_scaling
        rope = dict(hf.get("rope_scaling") or {})
        rope.update(hf.get("rope_parameters") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        partial = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
        max_pos = int(hf.get("max_position_embeddings", 4096))
        orig_max = int(rope.get("original_max_position_embeddings", hf.get("original_max_position_embeddings") or max_pos))
        head_dim = int(hf.get("head_dim") or hidden // heads)
        n_freq = int(head_dim * partial) // 2

        short = long = ()
        attention_factor = 1.0
        if rope_type == "longrope":
            short = tuple(float(v) for v in rope["short_factor"])
            long = tuple(float(v) for v in rope["long_factor"])
            if len(short) != n_freq or len(long) != n_freq:
                raise ValueError(f"longrope factors must have {n_freq} entries, got {len(short)} and {len(long)}")
            factor = rope.get("factor") or max_pos / orig_max
            attention_factor = rope.get("attention_factor")
            if attention_factor is None:  # as transformers derives it
                attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig_max))
        elif rope_type != "default":
            raise ValueError(f"unsupported rope type {rope_type!r}")

        cfg = cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            vocab_size=int(need("vocab_size")),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            partial_rotary_factor=partial,
            max_position_embeddings=max_pos,
            original_max_position_embeddings=orig_max,
            rope_type=rope_type,
            short_factor=short,
            long_factor=long,
            attention_factor=float(attention_factor),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
        cfg._check()
        return cfg

    def _check(self) -> None:
        # The engine's config states and checks the graph's invariants; this adds the HF-only field.
        if self.max_position_embeddings <= 0:
            raise ValueError(f"config field max_position_embeddings must be positive, got {self.max_position_embeddings}")
        self.engine_config().check()

    def engine_config(self) -> "_core.ModelConfig":
        """The typed config the C++ `Model` constructor takes."""
        from . import _core

        c = _core.ModelConfig()
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta",
                     "original_max_position_embeddings", "attention_factor", "tie_word_embeddings"):
            setattr(c, name, getattr(self, name))
        c.rotary_dim = self.rotary_dim
        c.longrope = self.rope_type == "longrope"
        c.short_factor = list(self.short_factor)
        c.long_factor = list(self.long_factor)
        return c
