"""A plain numpy forward pass of the Phi3 graph in float64, over the weights of a .upg file.

Written from docs/FORMAT.md and transformers' Phi3 modeling: RMSNorm, fused qkv_proj (rows Q, K,
V), rotate-half RoPE on the first rotary_dim dims of each head (LongRoPE: per-frequency factors,
long ones once the sequence is longer than original_max_position_embeddings), grouped-query causal
attention, down(silu(gate) * up). Quantized weights are decoded by `reference.quant`; q8_0 and q4
matrices multiply 8-bit activations as the CPU kernels do (`reference.quant.activations_as_used`),
their outliers the activations themselves.
"""
from __future__ import annotations

import numpy as np

from reference.quant import ACT_Q8_TYPES, activations_as_used, add_outliers, dequantize
from upg_backend.format import OUTLIER_SUFFIXES, UPGFile


class Matrix(np.ndarray):
    """A decoded matrix (outliers added) that remembers how the engine multiplies it: `linear`
    quantizes the activations for q8_0 / q4 and applies the outliers (`.outliers`) to x itself."""
    act_type: str | None = None
    block: int = 0
    outliers: np.ndarray | None = None


def load_weights(upg: UPGFile) -> dict[str, np.ndarray]:
    """Every model tensor as float64, quantized ones decoded and their outliers added."""
    weights = {}
    for name, t in upg.tensors.items():
        if name.endswith(OUTLIER_SUFFIXES):
            continue
        if t.dtype in ("f32", "f16", "bf16"):
            weights[name] = np.asarray(upg.tensor(name), np.float64)
            continue
        base = np.asarray(dequantize(t.dtype, t.block, upg.raw(name), *t.dims), np.float64)
        outliers = None
        if name + ".outlier_val" in upg.tensors:
            outliers = add_outliers(np.zeros_like(base), upg.tensor(name + ".outlier_rowptr"),
                                    upg.tensor(name + ".outlier_col"),
                                    upg.tensor(name + ".outlier_val").view(np.uint16))
        m = (base if outliers is None else base + outliers).view(Matrix)
        m.act_type, m.block, m.outliers = t.dtype, t.block, outliers
        weights[name] = m
    return weights


def linear(x, w):
    """x @ w.T as the engine computes it for w's type."""
    if getattr(w, "act_type", None) not in ACT_Q8_TYPES:
        return x @ np.asarray(w).T
    full = np.asarray(w)
    base = full if w.outliers is None else full - w.outliers
    y = activations_as_used(w.act_type, w.block, x) @ base.T
    return y if w.outliers is None else y + x @ w.outliers.T


def _rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope_tables(cfg, n):
    """cos and sin [n, rotary_dim] for positions 0..n-1."""
    rd = cfg.rotary_dim
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, rd, 2, dtype=np.float64) / rd)
    scale = 1.0
    if cfg.rope_type == "longrope":
        factors = cfg.long_factor if n > cfg.original_max_position_embeddings else cfg.short_factor
        inv_freq = inv_freq / np.asarray(factors, np.float64)
        scale = cfg.attention_factor
    angles = np.arange(n, dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles) * scale, np.sin(angles) * scale


def _rope(x, cos, sin, rd):
    """Rotate-half RoPE on the first rd dims of x [n, heads, head_dim]."""
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = np.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    return np.concatenate([rot * cos[:, None, :] + rotated * sin[:, None, :], rest], axis=-1)


def forward(weights: dict[str, np.ndarray], cfg, tokens) -> np.ndarray:
    """Logits float64 [len(tokens), vocab] of a full causal forward pass over `tokens`."""
    n = len(tokens)
    hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    cos, sin = _rope_tables(cfg, n)
    mask = np.triu(np.full((n, n), -np.inf), k=1)
    x = np.asarray(weights["model.embed_tokens.weight"])[np.asarray(tokens)]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        # attention
        h = _rms_norm(x, weights[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        qkv = linear(h, weights[p + "self_attn.qkv_proj.weight"])
        q = qkv[:, :nh * hd].reshape(n, nh, hd)
        k = qkv[:, nh * hd:(nh + nkv) * hd].reshape(n, nkv, hd)
        v = qkv[:, (nh + nkv) * hd:].reshape(n, nkv, hd)
        q, k = _rope(q, cos, sin, cfg.rotary_dim), _rope(k, cos, sin, cfg.rotary_dim)
        group = nh // nkv
        out = np.empty((n, nh, hd))
        for head in range(nh):
            scores = q[:, head] @ k[:, head // group].T / np.sqrt(hd) + mask
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            out[:, head] = probs @ v[:, head // group]
        x = x + linear(out.reshape(n, nh * hd), weights[p + "self_attn.o_proj.weight"])
        # MLP
        h = _rms_norm(x, weights[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate, up = np.split(linear(h, weights[p + "mlp.gate_up_proj.weight"]), 2, axis=-1)
        x = x + linear(up * gate / (1.0 + np.exp(-gate)), weights[p + "mlp.down_proj.weight"])
    x = _rms_norm(x, weights["model.norm.weight"], cfg.rms_norm_eps)
    head = weights["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    return linear(x, head)
