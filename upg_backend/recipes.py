"""Quantization recipes: which type each weight matrix of a model is stored as.

A recipe is a default type and block size, per-tensor overrides chosen by glob over the Hugging Face
tensor names (first match wins), and a fraction of each row of every quantized matrix kept exactly
(FORMAT.md "Sparse exact outliers"). 1-D tensors (norms) are always f32.

A tied embedding is also the output matrix, so an override for `lm_head.weight` applies to
`model.embed_tokens.weight` of a model with tied embeddings (when no rule names the embedding first).
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Callable, Sequence

import numpy as np

from .config import ModelConfig
from .format import BLOCKS, DTYPE_CODES, EXACT_ZERO, QUANTIZED, TENSOR_ALIGN, TensorSource, tensor_nbytes

WEIGHT_TYPES = tuple(t for t in DTYPE_CODES if t != "i32")  # what a weight matrix may be stored as
GRID_TYPES = tuple(t for t in QUANTIZED if t not in EXACT_ZERO)  # block 32 only (FORMAT.md "Grid types")
SUPER_BLOCK_TYPES = ("iq4_xs", "iq3")     # need rows of a multiple of 256 columns
# what a super-block type becomes in a matrix whose rows are not (SmolLM2's 576-wide rows), as
# llama.cpp's IQ4_XS and IQ3 types fall back to IQ4_NL
SUPER_BLOCK_FALLBACK = "iq4_nl"
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the weight matrices of a model are stored.

    Attributes:
        name: the recipe's name (recorded in nothing but messages and tables).
        default: type of every matrix no override names.
        block: elements per scale block of the quantized types, 32 or 64.
        overrides: (glob over tensor names, type) pairs; the first matching pattern wins.
        outliers: fraction of each row of every quantized matrix kept exactly in f16.
        blocks: (glob over tensor names, block) pairs for quantized matrices whose block is not
            `block` (bit allocation chooses blocks per tensor); the first matching pattern wins.
    """

    name: str
    default: str
    block: int = 32
    overrides: tuple[tuple[str, str], ...] = ()
    outliers: float = 0.0
    blocks: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        for pattern, type_ in ((None, self.default), *self.overrides):
            if type_ not in WEIGHT_TYPES:
                where = f" (override {pattern!r})" if pattern else ""
                raise ValueError(f"recipe {self.name!r}: unknown weight type {type_!r}{where}; "
                                 f"choose one of {', '.join(WEIGHT_TYPES)}")
        for pattern, block in ((None, self.block), *self.blocks):
            if block not in BLOCKS:
                where = f" (for {pattern!r})" if pattern else ""
                raise ValueError(f"recipe {self.name!r}: block must be 32 or 64, got {block}{where}")
        if not 0.0 <= self.outliers < 1.0:
            raise ValueError(f"recipe {self.name!r}: outliers must be a fraction in [0, 1), got {self.outliers}")
        if self.outliers and not self.quantized:
            raise ValueError(f"recipe {self.name!r}: outliers need a quantized type")
        if self.outliers and self.default not in EXACT_ZERO:
            raise ValueError(f"recipe {self.name!r}: {self.default} carries no outliers; use one of {', '.join(EXACT_ZERO)}")
        if self.default in GRID_TYPES and self.block != 32:
            raise ValueError(f"recipe {self.name!r}: {self.default} takes block 32, got {self.block}")

    @property
    def quantized(self) -> bool:
        return any(t in QUANTIZED for t in (self.default, *(t for _, t in self.overrides)))

    def type_for(self, name: str, shape: Sequence[int], tied: bool = False) -> str:
        """The storage type of one tensor.

        Args:
            name: the tensor's Hugging Face name.
            shape: its dims; 1-D tensors are f32.
            tied: the model ties its output matrix to the embedding.
        """
        if len(shape) != 2:
            return "f32"
        names = (name, LM_HEAD) if tied and name == EMBED else (name,)
        type_ = next((t for pattern, t in self.overrides if any(fnmatch.fnmatchcase(n, pattern) for n in names)),
                     self.default)
        if type_ in SUPER_BLOCK_TYPES and shape[1] % 256:
            return SUPER_BLOCK_FALLBACK
        return type_

    def block_for(self, name: str) -> int:
        """The block of one quantized tensor."""
        for pattern, block in self.blocks:
            if fnmatch.fnmatchcase(name, pattern):
                return block
        return self.block

    def source(self, name: str, shape: Sequence[int], load: Callable[[], np.ndarray],
               tied: bool = False, importance: np.ndarray | None = None) -> TensorSource:
        """The writer's TensorSource for one tensor stored as this recipe says; importance (per
        column, upg_backend.calibrate) is used if the tensor is stored quantized."""
        type_ = self.type_for(name, shape, tied)
        q = type_ in QUANTIZED
        block = 32 if type_ in GRID_TYPES else self.block_for(name) if q else 0
        return TensorSource(name, type_, tuple(int(d) for d in shape), load, block,
                            self.outliers if type_ in EXACT_ZERO else 0.0, importance if q else None)

    def header(self, sources: Sequence[TensorSource]) -> dict:
        """The header's `quantization` object (FORMAT.md): matrices not of the default type are
        listed in `overrides`."""
        return {"default": self.default, "block": self.block if self.quantized else 0,
                "overrides": {s.name: s.dtype for s in sources if len(s.shape) == 2 and s.dtype != self.default},
                "outliers": self.outliers}


def _mixed(name: str, default: str, block: int, overrides: dict[str, str], outliers: float = 0.0) -> Recipe:
    return Recipe(name, default, block, tuple(overrides.items()), outliers)


# Bits per weight over the Phi-4 shape (tests/test_recipes.py checks the q3 family stays <= 3.3):
# q3 at block 64 is 3.25; lm_head at q4 adds ~0.035 and the first layer's attention ~0.005.
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("f32", "f32"),
    Recipe("f16", "f16"),
    Recipe("bf16", "bf16"),
    Recipe("q8_0", "q8_0", 32),
    Recipe("q4", "q4", 32),
    Recipe("q3", "q3", 32),
    Recipe("iq4_nl", "iq4_nl", 32),
    Recipe("iq4_xs", "iq4_xs", 32),
    Recipe("iq3", "iq3", 32),
    _mixed("q4-mixed", "q4", 32, {EMBED: "q8_0", LM_HEAD: "q8_0"}),
    _mixed("q3-mixed", "q3", 64, {LM_HEAD: "q4", "model.layers.0.self_attn.*": "q4"}),
    Recipe("q3-outliers", "q3", 64, outliers=0.0008),
)}


def get_recipe(recipe: str | Recipe | None = None, type: str = "f16", block: int = 32,
               outliers: float = 0.0) -> Recipe:
    """The recipe a conversion uses.

    Args:
        recipe: a Recipe, the name of one in RECIPES, or None for "every matrix as `type`".
        type, block, outliers: the single-type recipe used when `recipe` is None.

    Raises:
        ValueError: an unknown recipe name or invalid type, block or outlier fraction.
    """
    if isinstance(recipe, Recipe):
        return recipe
    if recipe is None:
        return Recipe(type, type, block, outliers=outliers)
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    return RECIPES[recipe]


def graph_tensors(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the graph needs (docs/FORMAT.md "Model tensors")."""
    from .convert import tensor_plan  # the one definition of the graph's tensors

    return [(name, shape) for name, shape, _ in tensor_plan(cfg)]


def layout_bytes(cfg: ModelConfig, recipe: Recipe) -> tuple[int, int]:
    """(bytes of the data section, number of weights) of a model stored with `recipe`, from the
    file layout: every tensor and outlier companion, each padded to 64 bytes."""
    pad = lambda n: -(-n // TENSOR_ALIGN) * TENSOR_ALIGN  # noqa: E731
    total = weights = 0
    for name, shape in graph_tensors(cfg):
        src = recipe.source(name, shape, lambda: None, cfg.tie_word_embeddings)
        total += pad(tensor_nbytes(src.dtype, src.shape, src.block))
        nnz = src.shape[0] * src.outliers_per_row
        if nnz:
            total += pad(4 * (src.shape[0] + 1)) + pad(4 * nnz) + pad(2 * nnz)
        weights += int(np.prod(shape))
    return total, weights


def bits_per_weight(cfg: ModelConfig, recipe: Recipe) -> float:
    """Bits of the file's tensor data per model weight (norms and outliers included)."""
    nbytes, weights = layout_bytes(cfg, recipe)
    return 8 * nbytes / weights
