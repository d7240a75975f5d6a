"""Pass `asvd`: activation-aware low-rank factorisation (Yuan et al., "ASVD: Activation-aware
Singular Value Decomposition for Compressing Large Language Models", 2023, arXiv:2312.05821).

Like `lowrank` (same rank rules, same graph rewrite `(X @ U) @ V`, applied only where it
lowers FLOPs and weights), but the SVD is taken of `W · S` with `S = diag(‖X_j‖₂^α)` from
calibration data, so the truncation keeps what matters for the layer's outputs on real
inputs rather than for `W` itself; `S⁻¹` is folded back into the right factor.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pydantic

from sparsegraph.calibration import calibration_of, tap_unsupported
from sparsegraph.model import Model
from sparsegraph.pass_manager import Change, PassContext, PassResult, register

from .lowrank import LowRank, LowRankConfig, choose_rank, factor_node, lowers_cost


def activation_scale(x_norm: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """ASVD's per-input-channel scale `S_jj = ‖X_j‖₂^α` (Yuan et al. 2023, with the
    L2 norm over calibration tokens as the channel's activation magnitude). Channels never
    active get 0, which is harmless: `asvd_factors` never divides by S."""
    x = np.asarray(x_norm, dtype=np.float64)
    if np.any(x < 0) or not np.all(np.isfinite(x)):
        raise ValueError("x_norm must be finite and non-negative")
    return x**alpha


def asvd_factors(w: np.ndarray, scale: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """`(A[N, r], B[r, K])` from the truncated SVD of `w[N, K] · diag(scale)` (ASVD, Yuan et al. 2023).

    With `W S = U Σ Vᵀ`: `A = U_r Σ_r^½`, `B = Σ_r^½ V_rᵀ S⁻¹`, computed as `Σ_r^-½ U_rᵀ W`
    (equal where S is invertible, and defined where it is not). `A @ B = U_r U_rᵀ W` is the
    rank-r approximation of W minimising `‖(W − A B) S‖_F`: the output error on inputs whose
    channels have the magnitudes S. Components with a zero singular value are dropped (zero
    columns/rows). `scale` = ones gives `low_rank_factors(w, rank)`."""
    w64 = w.astype(np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    if scale.shape != (w.shape[1],):
        raise ValueError(f"scale of shape {scale.shape} does not fit w of shape {w.shape}")
    u, s, _ = np.linalg.svd(w64 * scale[None, :], full_matrices=False)
    u, s = u[:, :rank], s[:rank]
    live = s > s[0] * 1e-12 if s.size and s[0] > 0 else np.zeros(s.shape, dtype=bool)
    root = np.sqrt(np.where(live, s, 1.0))
    a = np.where(live, u * root, 0.0)
    b = np.where(live[:, None], (u.T @ w64) / root[:, None], 0.0)
    return a.astype(w.dtype), b.astype(w.dtype)


class ASVDConfig(LowRankConfig):
    alpha: float = pydantic.Field(0.5, ge=0.0, description="S = diag(||X_j||^alpha); 0 is plain SVD")


@register
class ASVD(LowRank):
    """Factor `X @ W` into `(X @ U) @ V` by the truncated SVD of W scaled by input-activation
    norms (ASVD), where that lowers FLOPs and bytes; rank rules as `lowrank` (applied to the
    scaled spectrum); needs calibration data (--calib)."""

    name = "asvd"
    Config = ASVDConfig
    needs_calibration: ClassVar[bool] = True

    def unsupported_reason(self, op):
        return super().unsupported_reason(op) or tap_unsupported(op.weight.node)

    def precondition(self, model: Model, ctx: PassContext) -> None:
        calibration_of(ctx, self.name)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        targets, warnings = self.select(model, ctx)
        cfg = self.config
        stats = calibration_of(ctx, self.name).statistics(model, targets) if targets else {}
        changes = []
        for op in targets:
            w = op.weight.matrix()
            scale = activation_scale(stats[op.name].norm, cfg.alpha)
            s = np.linalg.svd(w.astype(np.float64) * scale, compute_uv=False)
            rank = choose_rank(s, op.shape, cfg.rank_ratio, cfg.param_ratio, cfg.energy)
            if not lowers_cost(op.shape, rank):
                changes.append(
                    Change(op.name, "skipped", {"rank": rank, "reason": "rank too high to save cost"})
                )
                continue
            a, b = asvd_factors(w, scale, rank)
            err = float(np.linalg.norm(w - a @ b) / max(np.linalg.norm(w), 1e-30))
            werr = float(np.linalg.norm((w - a @ b) * scale) / max(np.linalg.norm(w * scale), 1e-30))
            factor_node(model.graph, op.weight.node, a, b)
            changes.append(Change(op.name, "lowrank", {  # "lowrank": the report counts the factors' params
                "method": "asvd", "alpha": cfg.alpha, "shape": list(op.shape), "rank": rank,
                "params_before": w.size, "params_after": a.size + b.size, "relative_error": err,
                "relative_scaled_error": werr, "calibration_rows": stats[op.name].rows,
            }))  # fmt: skip
        return PassResult(any(c.action == "lowrank" for c in changes), changes, warnings)
