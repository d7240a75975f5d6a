"""Pass `block`: block sparsity by block norm (Narang et al., "Block-Sparse Recurrent Neural
Networks", 2017; Gray et al., "GPU Kernels for Block-Sparse Weights", 2017)."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pydantic

from sparsegraph.pass_manager import register

from .targeted import MaskRewrite, TargetedConfig, prune_lowest, sparsity_field


def block_norms(w: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """L2 norm of each `r x c` block of `w[N, K]` (edge blocks may be smaller)."""
    r, c = block
    rows, cols = w.shape
    padded = np.pad(w.astype(np.float32), ((0, (-rows) % r), (0, (-cols) % c)))
    blocks = padded.reshape(padded.shape[0] // r, r, padded.shape[1] // c, c)
    return np.sqrt(np.einsum("arbc,arbc->ab", blocks, blocks))


def expand_block_mask(block_keep: np.ndarray, block: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    r, c = block
    return np.repeat(np.repeat(block_keep, r, axis=0), c, axis=1)[: shape[0], : shape[1]]


def block_mask(w: np.ndarray, block: tuple[int, int], sparsity: float) -> np.ndarray:
    """Keep-mask zeroing the `floor(sparsity * blocks)` `r x c` blocks (r outputs x c inputs)
    of `w[N, K]` with the smallest L2 norm."""
    norms = block_norms(w, block)
    keep = prune_lowest(norms, math.floor(sparsity * norms.size))
    return expand_block_mask(keep, block, w.shape)


def global_block_masks(
    weights: list[np.ndarray], block: tuple[int, int], sparsity: float
) -> list[np.ndarray]:
    """Block keep-masks ranked across all weights together (one norm threshold)."""
    norms = [block_norms(w, block) for w in weights]
    flat = np.concatenate([n.ravel() for n in norms]) if norms else np.zeros(0)
    keep = prune_lowest(flat, math.floor(sparsity * flat.size))
    parts = np.split(keep, np.cumsum([n.size for n in norms])[:-1])
    return [
        expand_block_mask(k.reshape(n.shape), block, w.shape)
        for k, n, w in zip(parts, norms, weights, strict=False)
    ]


class BlockConfig(TargetedConfig):
    sparsity: float = sparsity_field("fraction of blocks set to zero, in [0, 1)")
    block: tuple[pydantic.PositiveInt, pydantic.PositiveInt] = pydantic.Field(
        (4, 4), description="[r, c]: r output features x c input features"
    )
    granularity: Literal["tensor", "global"] = "tensor"


@register
class Block(MaskRewrite):
    """Zero whole r x c blocks (r outputs x c inputs) with the smallest L2 norm."""

    name = "block"
    Config = BlockConfig

    def masks(self, weights, ctx):
        block = tuple(self.config.block)
        if self.config.granularity == "global":
            return global_block_masks(weights, block, self.config.sparsity)
        return [block_mask(w, block, self.config.sparsity) for w in weights]
