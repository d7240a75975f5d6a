"""Pass `topk`: keep the K largest-magnitude weights per output row or per tensor."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pydantic

from sparsegraph.errors import RecipeError
from sparsegraph.pass_manager import register

from .targeted import MaskRewrite, TargetedConfig, prune_lowest


def topk_mask(w: np.ndarray, k: int, granularity: Literal["row", "tensor"] = "row") -> np.ndarray:
    """Keep-mask of the `k` largest |w| in each row of `w[N, K]` (or in the whole tensor)."""
    scores = np.abs(w.astype(np.float32))
    n = w.shape[1] if granularity == "row" else w.size
    if not 0 < k <= n:
        raise ValueError(f"k={k} is outside 1..{n} for a {granularity} of shape {w.shape}")
    return prune_lowest(scores, n - k, axis=1 if granularity == "row" else None)


class TopKConfig(TargetedConfig):
    k: int = pydantic.Field(gt=0, description="weights kept per row (or per tensor)")
    granularity: Literal["row", "tensor"] = "row"


@register
class TopK(MaskRewrite):
    """Keep only the `k` largest-magnitude weights of each output row (or of each tensor)."""

    name = "topk"
    Config = TopKConfig
    supported = ("MatMul", "Gemm", "Conv", "Gather")

    def masks(self, weights, ctx):
        try:
            return [topk_mask(w, self.config.k, self.config.granularity) for w in weights]
        except ValueError as exc:
            raise RecipeError(f"pass 'topk': {exc}") from None
