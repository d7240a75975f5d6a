"""Pass `nm`: N:M semi-structured sparsity along the reduction dimension (Mishra et al.,
"Accelerating Sparse Deep Neural Networks", 2021; Zhou et al., "Learning N:M Fine-grained
Structured Sparse Neural Networks From Scratch", ICLR 2021)."""

from __future__ import annotations

import numpy as np
import pydantic

from sparsegraph.pass_manager import register

from .targeted import MaskRewrite, TargetedConfig, prune_lowest


def nm_mask(w: np.ndarray, n: int, m: int, scores: np.ndarray | None = None) -> np.ndarray:
    """Keep-mask with at most `n` kept entries in every group of `m` consecutive entries along
    K of `w[N, K]` (the layout sparse tensor cores need): the `n` largest scores (default |w|).

    When K is not a multiple of m, the last, shorter group keeps at most n entries too.
    """
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < N <= M, got {n}:{m}")
    scores = np.abs(w.astype(np.float32)) if scores is None else scores.astype(np.float32)
    rows, k = scores.shape
    pad = (-k) % m
    padded = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    groups = padded.reshape(rows, -1, m)
    keep = prune_lowest(groups, m - n, axis=2)
    return keep.reshape(rows, -1)[:, :k]


class NMConfig(TargetedConfig):
    n: int = pydantic.Field(2, gt=0, description="weights kept in each group")
    m: int = pydantic.Field(4, gt=0, description="group length along the reduction dimension")

    @pydantic.model_validator(mode="after")
    def _n_le_m(self):
        if self.n > self.m:
            raise ValueError(f"N must not exceed M (got N={self.n}, M={self.m})")
        return self


@register
class NM(MaskRewrite):
    """Keep the N largest of every M consecutive weights along the reduction dimension (2:4, 4:8, ...)."""

    name = "nm"
    Config = NMConfig

    def masks(self, weights, ctx):
        return [nm_mask(w, self.config.n, self.config.m) for w in weights]
