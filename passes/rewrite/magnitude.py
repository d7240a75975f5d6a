"""Pass `magnitude`: unstructured magnitude pruning (Han et al., "Learning both Weights and
Connections for Efficient Neural Networks", NeurIPS 2015)."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pydantic

from sparsegraph.pass_manager import register
from sparsegraph.sparsity_plan import PLANNED_DESCRIPTION, PlannedSparsity, is_planned, resolve_sparsity

from .targeted import MaskRewrite, TargetedConfig, prune_lowest


def magnitude_mask(
    w: np.ndarray, sparsity: float, granularity: Literal["tensor", "row"] = "tensor"
) -> np.ndarray:
    """Keep-mask zeroing the `floor(sparsity * n)` smallest-|w| entries of `w[N, K]`.

    `granularity="tensor"` ranks all entries together (n = N*K); `"row"` ranks each output
    row on its own (n = K), so every output keeps the same number of weights.
    """
    scores = np.abs(w.astype(np.float32))
    if granularity == "row":
        return prune_lowest(scores, math.floor(sparsity * w.shape[1]), axis=1)
    return prune_lowest(scores, math.floor(sparsity * w.size))


def global_magnitude_masks(weights: list[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """Keep-masks for several weights ranked together: one |w| threshold across all of them."""
    flat = np.concatenate([np.abs(w.astype(np.float32)).ravel() for w in weights]) if weights else np.zeros(0)
    keep = prune_lowest(flat, math.floor(sparsity * flat.size))
    splits = np.cumsum([w.size for w in weights])[:-1]
    return [k.reshape(w.shape) for k, w in zip(np.split(keep, splits), weights, strict=False)]


class MagnitudeConfig(TargetedConfig):
    sparsity: PlannedSparsity = pydantic.Field(description=PLANNED_DESCRIPTION)
    granularity: Literal["tensor", "row", "global"] = "tensor"

    @pydantic.model_validator(mode="after")
    def _plan_is_per_op(self):
        if is_planned(self.sparsity) and self.granularity == "global":
            raise ValueError(f"sparsity: {self.sparsity} (a per-op plan) cannot use granularity: global")
        return self


@register
class Magnitude(MaskRewrite):
    """Zero the smallest-magnitude weights: per tensor, per output row, or globally across
    all selected ops (one threshold); `sparsity: owl|sensitivity` applies an earlier step's
    per-op plan (`sparsegraph.sparsity_plan`)."""

    name = "magnitude"
    Config = MagnitudeConfig
    supported = ("MatMul", "Gemm", "Conv", "Gather")

    def select(self, model, ctx):
        targets, warnings = super().select(model, ctx)
        self._sparsity, more = resolve_sparsity(self.name, self.config.sparsity, ctx, targets)
        return targets, warnings + more

    def masks(self, weights, ctx):
        if self.config.granularity == "global":
            return global_magnitude_masks(weights, self.config.sparsity)
        return [
            magnitude_mask(w, s, self.config.granularity)
            for w, s in zip(weights, self._sparsity, strict=True)
        ]
