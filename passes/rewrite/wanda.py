"""Pass `wanda`: pruning by weights and activations (Sun, Liu, Bair and Kolter, "A Simple and
Effective Pruning Approach for Large Language Models", ICLR 2024, arXiv:2306.11695)."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pydantic

from sparsegraph.pass_manager import register

from .calibrated import CalibratedConfig, CalibratedRewrite, check_target
from .nm import nm_mask
from .targeted import prune_lowest


def wanda_mask(
    w: np.ndarray,
    x_norm: np.ndarray,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    granularity: Literal["row", "tensor"] = "row",
) -> np.ndarray:
    """Keep-mask of `w[N, K]` by the Wanda score `S_ij = |W_ij| · ‖X_j‖₂` (Sun et al., 2023, eq. 1).

    `x_norm[K]` is the L2 norm of input feature j over all calibration tokens. Unstructured
    (`sparsity`): the `floor(sparsity * n)` lowest scores are dropped within each output row
    (`granularity="row"`, the paper's per-output comparison group, n = K) or over the whole
    tensor (`"tensor"`, n = N*K). N:M (`n`, `m`): the `n` highest scores of every `m`
    consecutive inputs are kept (`nm_mask`). Ties go by position (`prune_lowest`).
    """
    check_target(sparsity, n, m)
    x_norm = np.asarray(x_norm, dtype=np.float64)
    if x_norm.shape != (w.shape[1],):
        raise ValueError(f"x_norm of shape {x_norm.shape} does not fit w of shape {w.shape}")
    scores = np.abs(w.astype(np.float64)) * x_norm[None, :]
    if sparsity is None:
        return nm_mask(w, n, m, scores=scores)
    if granularity == "row":
        return prune_lowest(scores, math.floor(sparsity * w.shape[1]), axis=1)
    if granularity == "tensor":
        return prune_lowest(scores, math.floor(sparsity * w.size))
    raise ValueError(f"granularity must be 'row' or 'tensor', got {granularity!r}")


class WandaConfig(CalibratedConfig):
    granularity: Literal["row", "tensor"] = pydantic.Field(
        "row", description="scores compete within each output row (the paper's) or the whole tensor"
    )


@register
class Wanda(CalibratedRewrite):
    """Zero the weights with the smallest |weight| × input-activation norm (Wanda), per output
    row or per tensor, unstructured or N:M; needs calibration data (--calib)."""

    name = "wanda"
    Config = WandaConfig

    def masks(self, weights, ctx):
        c = self.config
        return [
            wanda_mask(w, self.stats_of(i).norm, c.sparsity, c.n, c.m, c.granularity)
            for i, w in enumerate(weights)
        ]
