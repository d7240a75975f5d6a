"""Pass `owl`: Outlier Weighed Layerwise sparsity (Yin et al., "Outlier Weighed Layerwise
Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity", ICML 2024,
arXiv:2310.05175).

OWL does not prune: it gives each transformer layer its own sparsity, lower for layers
with more outlier Wanda scores, and stores them as a sparsity plan that the next pruning
step applies with `sparsity: owl` (`sparsegraph.sparsity_plan`)::

    steps:
      - pass: owl
        sparsity: 0.7       # the global target
        lam: 0.08           # layers get sparsities within [0.62, 0.78]
        M: 5                # an outlier scores above 5x its layer's mean
      - pass: wanda
        sparsity: owl
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pydantic

from sparsegraph.calibration import calibration_of, tap_unsupported
from sparsegraph.model import Model
from sparsegraph.pass_manager import AnalysisPass, PassContext, PassResult, register
from sparsegraph.passes.rewrite.targeted import TargetedConfig, pick_targets
from sparsegraph.report_sections import ReportSection, add_section
from sparsegraph.sparsity_plan import SparsityPlan, spread_sparsity, store_plan

from .roles import Roles
from .sparsifiable import SparsifiableOps, WeightedOp


def outlier_ratio(scores: list[np.ndarray], m: float = 5.0) -> float:
    """Fraction of the entries of `scores` (all arrays together: one layer) above `m` × their mean.

    OWL's layerwise outlier distribution (Yin et al. 2023; the reference code's
    `check_outlier_mean`), applied to Wanda scores `|W_ij| · ‖X_j‖₂`."""
    flat = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in scores])
    if flat.size == 0:
        raise ValueError("no scores")
    return float(np.count_nonzero(flat > m * flat.mean()) / flat.size)


def owl_sparsities(
    ratios: list[float] | np.ndarray,
    target: float,
    lam: float = 0.08,
    sizes: list[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Per-layer sparsities from per-layer outlier ratios (OWL, Yin et al. 2023).

    Layers with more outliers get lower sparsity: `s_l = target + c · (mean(r̂) - r̂_l)` with
    `r̂` the min-max normalised ratios, so the `sizes`-weighted mean (parameters per layer;
    equal by default, as in the paper where all layers have the same shape) is exactly
    `target`, and every `s_l` lies in `[target - lam, target + lam]` (clipped to [0, 0.99]).
    The reference code uses `c = 2·lam`, which can leave that range unless the normalised
    ratios average 0.5; here `c` is the largest value <= `2·lam` that stays inside it
    (`sparsegraph.sparsity_plan.spread_sparsity`)."""
    return spread_sparsity(ratios, target, lam, sizes)


@dataclass
class OwlLayer:
    layer: int | None  # roles layer index; None: an op without one (its own group)
    ops: list[str]
    params: int
    outlier_ratio: float
    sparsity: float


@dataclass
class OwlFinding:
    """Finding of `owl`: per-layer outlier ratios and sparsities (and the plan they make)."""

    target: float
    lam: float
    m: float
    layers: list[OwlLayer]

    def plan(self) -> SparsityPlan:
        return SparsityPlan("owl", self.target, {op: g.sparsity for g in self.layers for op in g.ops})

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "lambda": self.lam,
            "M": self.m,
            "layers": [vars(g) for g in self.layers],
        }

    def markdown(self) -> list[str]:
        lines = [
            f"Global target {self.target:.1%}, λ = {self.lam:g}, outliers: Wanda scores above "
            f"{self.m:g} × the layer mean. Applied by the next step with `sparsity: owl`.",
            "",
            "| layer | ops | params | outlier ratio | sparsity |",
            "|---|---|---|---|---|",
        ]
        for g in self.layers:
            name = "–" if g.layer is None else g.layer
            ops = g.ops[0] if len(g.ops) == 1 else f"{len(g.ops)} ops"
            lines.append(f"| {name} | {ops} | {g.params:,} | {g.outlier_ratio:.3%} | {g.sparsity:.1%} |")
        return lines


class OwlConfig(TargetedConfig):
    sparsity: float = pydantic.Field(ge=0.0, lt=1.0, description="global target sparsity, in [0, 1)")
    lambda_: float = pydantic.Field(
        0.08,
        ge=0.0,
        lt=1.0,
        validation_alias=pydantic.AliasChoices("lambda_", "lam", "lambda"),
        description="layer sparsities lie within sparsity ± lambda (alias lam)",
    )
    M: float = pydantic.Field(5.0, gt=0.0, description="outlier threshold: scores above M x the layer mean")


@register
class Owl(AnalysisPass):
    """OWL: per-layer sparsities from outlier ratios of Wanda scores (|W| x input norm), mean
    equal to `sparsity`; the next magnitude/wanda/sparsegpt step applies them with
    `sparsity: owl`. Needs calibration data (--calib)."""

    name = "owl"
    Config = OwlConfig
    requires = (SparsifiableOps, Roles)
    needs_calibration: ClassVar[bool] = True

    def precondition(self, model: Model, ctx: PassContext) -> None:
        calibration_of(ctx, self.name)

    def analyze(self, model: Model, ctx: PassContext) -> OwlFinding:
        cfg = self.config
        targets, self._warnings = select_targets(self, model, ctx)
        roles = ctx.get(Roles, model)
        stats = calibration_of(ctx, self.name).statistics(model, targets) if targets else {}
        groups: dict[Any, list[WeightedOp]] = {}
        for op in targets:
            role = roles.get(op.name)
            key = role.layer if role is not None and role.layer is not None else ("op", op.name)
            groups.setdefault(key, []).append(op)
        ratios, sizes = [], []
        for ops in groups.values():
            scores = [np.abs(op.weight.matrix().astype(np.float64)) * stats[op.name].norm for op in ops]
            ratios.append(outlier_ratio(scores, cfg.M))
            sizes.append(sum(op.shape[0] * op.shape[1] for op in ops))
        sparsity = owl_sparsities(ratios, cfg.sparsity, cfg.lambda_, sizes)
        layers = [
            OwlLayer(key if isinstance(key, int) else None, [op.name for op in ops], size, ratio, float(s))
            for (key, ops), size, ratio, s in zip(groups.items(), sizes, ratios, sparsity, strict=True)
        ]
        return OwlFinding(cfg.sparsity, cfg.lambda_, cfg.M, layers)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        finding = self.analyze(model, ctx)
        ctx.store(type(self), finding)
        warnings = self._warnings + store_plan(ctx, finding.plan())
        add_section(ctx, ReportSection("owl", "OWL layer sparsities", finding.to_dict(), finding.markdown()))
        return PassResult(modified=False, warnings=warnings)


def select_targets(
    analysis: AnalysisPass,
    model: Model,
    ctx: PassContext,
    supported: tuple[str, ...] = ("MatMul", "Gemm", "Conv"),
    calibrated: bool = True,
) -> tuple[list[WeightedOp], list[str]]:
    """The ops an analysis's `targets`/`ignore` pick, as a rewrite would pick them: explicit
    targets of another kind than `supported` (or, if `calibrated`, whose input calibration
    cannot tap) are an `UnsupportedOpError`; such default targets are skipped with a warning."""

    def unsupported_reason(op: WeightedOp) -> str | None:
        if op.op_type not in supported:
            return f"{op.op_type} ops are not supported (supported: {', '.join(supported)})"
        if calibrated and op.op_type != "Gather":
            return tap_unsupported(op.weight.node)
        return None

    config = TargetedConfig(targets=analysis.config.targets, ignore=analysis.config.ignore)
    return pick_targets(model, ctx, analysis.name, config, unsupported_reason)
