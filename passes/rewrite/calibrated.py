"""Shared adapter for pruning passes that need calibration data (`wanda`, `sparsegpt`).

A `CalibratedRewrite` reads the `Calibration` from `ctx.extras["calibration"]` (set by
`compile_model` / `sparsegraph compile --calib`); without one it is a `RecipeError` that
names the pass. It collects the activation statistics of its targets in one run of the
dense model, or, with `sequential: true`, layer by layer (the `roles` layer index; ops
without a layer last): the statistics of layer L+1 come from the model whose layers <= L
are already pruned, as in the papers' reference code. Within a layer every op's
statistics come from the same run, taken before any of them is pruned.

`sparsity` may also name a sparsity plan of an earlier step (`sparsity: owl`,
`sparsity: sensitivity`; see `sparsegraph.sparsity_plan`): the targets are then pruned in
sub-groups of equal planned sparsity, each with the technique configured at that sparsity.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pydantic

from sparsegraph.calibration import ActivationStats, calibration_of, tap_unsupported
from sparsegraph.model import Model
from sparsegraph.pass_manager import PassContext, PassResult
from sparsegraph.passes.analysis.roles import Roles
from sparsegraph.passes.analysis.sparsifiable import WeightedOp
from sparsegraph.sparsity_plan import PLANNED_DESCRIPTION, PlannedSparsity, is_planned, resolve_sparsity

from .targeted import MaskRewrite, TargetedConfig, TargetedRewrite


def check_target(sparsity: float | str | None, n: int | None, m: int | None) -> None:
    """ValueError unless exactly one of `sparsity` in [0, 1) (or a plan name) or `0 < n <= m` is given."""
    if (sparsity is None) == (n is None and m is None):
        raise ValueError("give either sparsity (unstructured) or n and m (N:M), not both or neither")
    if sparsity is not None and not is_planned(sparsity) and not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    if sparsity is None and (n is None or m is None or not 0 < n <= m):
        raise ValueError(f"N:M needs 0 < N <= M (N kept per group of M), got {n}:{m}")


class CalibratedConfig(TargetedConfig):
    sparsity: PlannedSparsity | None = pydantic.Field(None, description=PLANNED_DESCRIPTION)
    n: int | None = pydantic.Field(
        None, gt=0, description="weights kept in each group of m along K (N of N:M)"
    )
    m: int | None = pydantic.Field(
        None, gt=0, description="group length along the reduction dimension (M of N:M)"
    )
    sequential: bool = pydantic.Field(
        False, description="prune layer by layer, calibrating layer L+1 on the model with layers <= L pruned"
    )

    @pydantic.model_validator(mode="after")
    def _target(self):
        check_target(self.sparsity, self.n, self.m)
        return self


class CalibratedRewrite(MaskRewrite):
    """A `MaskRewrite` whose technique also sees each target's activation statistics."""

    Config = CalibratedConfig
    #: passes with this flag need `ctx.extras["calibration"]` (compile_model checks up front)
    needs_calibration: ClassVar[bool] = True
    #: keyword arguments of `Calibration.statistics` (e.g. hessian=True)
    statistics: ClassVar[dict[str, Any]] = {}
    _group: list[WeightedOp] | None = None
    _stats: dict[str, ActivationStats]

    def unsupported_reason(self, op: WeightedOp) -> str | None:
        return super().unsupported_reason(op) or tap_unsupported(op.weight.node)

    def precondition(self, model: Model, ctx: PassContext) -> None:
        calibration_of(ctx, self.name)

    def select(self, model: Model, ctx: PassContext) -> tuple[list[WeightedOp], list[str]]:
        if self._group is not None:  # inside run(): the layer being pruned
            return self._group, []
        return super().select(model, ctx)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        calib = calibration_of(ctx, self.name)
        targets, warnings = TargetedRewrite.select(self, model, ctx)
        planned, more = resolve_sparsity(self.name, self.config.sparsity, ctx, targets)
        sparsity = {op.name: s for op, s in zip(targets, planned, strict=True)}
        groups = layer_groups(targets, ctx.get(Roles, model)) if self.config.sequential else [targets]
        result = PassResult(False, [], warnings + more)
        written = []
        config = self.config
        try:
            for group in (g for g in groups if g):
                self._stats = calib.statistics(model, group, **self.statistics)
                for value, part_ops in _by_value(group, sparsity):
                    self._group = part_ops
                    if is_planned(config.sparsity):  # run as if configured with this op's sparsity
                        self.config = config.model_copy(update={"sparsity": value})
                    part = self.rewrite(model, ctx)
                    result.modified |= part.modified
                    result.changes += part.changes
                    result.warnings += part.warnings
                    written += self._written
        finally:
            self._group = None
            self.config = config
        self._written = written
        return result

    def rewrite(self, model: Model, ctx: PassContext) -> PassResult:
        """Rewrite the ops of `self._group` with `self._stats` (default: apply `masks`)."""
        return MaskRewrite.run(self, model, ctx)

    def stats_of(self, index: int) -> ActivationStats:
        """Statistics of the `index`-th op of the current group."""
        assert self._group is not None
        return self._stats[self._group[index].name]


def _by_value(ops: list[WeightedOp], value: dict[str, Any]) -> list[tuple[Any, list[WeightedOp]]]:
    """`ops` split into runs sharing `value[op.name]`, in first-seen order of the values."""
    parts: dict[Any, list[WeightedOp]] = {}
    for op in ops:
        parts.setdefault(value[op.name], []).append(op)
    return list(parts.items())


def layer_groups(ops: list[WeightedOp], roles) -> list[list[WeightedOp]]:
    """`ops` grouped by layer index, in increasing order; ops without a layer form the last group."""
    groups: dict[Any, list[WeightedOp]] = {}
    for op in ops:
        role = roles.get(op.name)
        groups.setdefault(role.layer if role is not None else None, []).append(op)
    order = sorted(groups, key=lambda layer: (layer is None, layer if layer is not None else 0))
    return [groups[layer] for layer in order]
