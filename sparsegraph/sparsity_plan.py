"""Per-op sparsity plans: one recipe step decides how much to prune each op, a later one prunes.

Two planning steps exist, and one mechanism serves both:

- `owl` (per transformer layer, from the layers' outlier ratios: OWL), and
- `sensitivity` with `allocate: TARGET` (per op or per layer, from the measured loss change
  of pruning each alone).

Each stores a `SparsityPlan` (op name -> sparsity) in `ctx.extras["sparsity_plan"]`; a
later planning step replaces it. A pruning step applies it only when asked: `magnitude`,
`wanda` and `sparsegpt` accept `sparsity: owl` or `sparsity: sensitivity` (the source's
pass name) instead of a number, and then prune each target op to its planned sparsity::

    steps:
      - pass: owl            # per-layer sparsities around 0.7 from outlier ratios
        sparsity: 0.7
      - pass: wanda          # Wanda with each layer's OWL sparsity
        sparsity: owl

Rules (each violation is a `RecipeError` naming the pass):

- `sparsity: owl` needs an earlier `pass: owl` step; `sparsity: sensitivity` an earlier
  `pass: sensitivity` with `allocate:`; the latest plan must come from the named source.
  These are checked when the pruning step runs (a recipe is validated step by step).
- Every target of the pruning step needs a planned sparsity (its targets must be among the
  planning step's). Planned ops it does not target are left alone (a warning says so), so
  several steps may apply one plan to disjoint targets; the plan stays for the whole run.
- A numeric `sparsity` never reads the plan; if no step has applied the plan yet, the
  step's report warnings say the plan was ignored.
- Plans are per op: magnitude `granularity: global` and N:M (`n`/`m`) cannot take one
  (rejected when the recipe is loaded).

`spread_sparsity` is the shared math: importance scores -> sparsities whose size-weighted
mean is exactly the target, each within `[target - lam, target + lam]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import pydantic

from .errors import RecipeError

PLAN_KEY = "sparsity_plan"
#: the planning passes, i.e. the words a pruning step's `sparsity` may name instead of a number
PLAN_SOURCES = ("owl", "sensitivity")
#: planned sparsities never exceed this (a pruning pass needs sparsity < 1)
MAX_PLANNED = 0.99


@dataclass
class SparsityPlan:
    """Sparsity per op name, made by pass `source` around the global `target`."""

    source: str
    target: float
    sparsity: dict[str, float]
    used_by: list[str] = field(default_factory=list)  # pruning passes that applied it

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "sparsity": dict(self.sparsity)}


def store_plan(ctx: Any, plan: SparsityPlan) -> list[str]:
    """Make `plan` the context's current plan; a warning if it replaces one no step applied."""
    old = ctx.extras.get(PLAN_KEY)
    ctx.extras[PLAN_KEY] = plan
    if old is not None and not old.used_by:
        return [f"replaced the sparsity plan from {old.source!r}, which no step applied"]
    return []


def current_plan(ctx: Any) -> SparsityPlan | None:
    return ctx.extras.get(PLAN_KEY)


# ------------------------------------------------------------------ the `sparsity` field
def _check_planned(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        if value in PLAN_SOURCES:
            return value
        raise ValueError(
            f"sparsity must be a number in [0, 1) or one of {', '.join(map(repr, PLAN_SOURCES))} "
            "(apply the plan of an earlier step of that pass)"
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("sparsity must be a number in [0, 1) or a plan name")
    if not 0 <= value < 1:
        raise ValueError(f"sparsity must lie in [0, 1), got {value}")
    return float(value)


#: a `sparsity` parameter that is a number in [0, 1) or the name of a planning pass
PlannedSparsity = Annotated[float | str, pydantic.BeforeValidator(_check_planned)]
PLANNED_DESCRIPTION = (
    "fraction of weights set to zero, in [0, 1); or 'owl' / 'sensitivity': each op's sparsity "
    "from the plan of an earlier owl / sensitivity step"
)


def is_planned(sparsity: Any) -> bool:
    return isinstance(sparsity, str)


def resolve_sparsity(
    pass_name: str, sparsity: float | str | None, ctx: Any, ops: Sequence[Any]
) -> tuple[list[float | None], list[str]]:
    """Each op's sparsity for a pruning step configured with `sparsity`, and warnings.

    A number (or None) is returned for every op. A plan name returns the planned sparsity of
    each op (by `op.name`) from the context's plan, following the module's rules."""
    plan = current_plan(ctx)
    if not is_planned(sparsity):
        warnings = []
        if plan is not None and not plan.used_by and sparsity is not None:
            warnings.append(
                f"a sparsity plan from {plan.source!r} is in the context but this step's sparsity is "
                f"{sparsity:g}; the plan is not applied (write sparsity: {plan.source} to apply it)"
            )
        return [sparsity] * len(ops), warnings
    where = f"pass {pass_name!r}: sparsity: {sparsity}"
    if plan is None:
        extra = " with allocate:" if sparsity == "sensitivity" else ""
        raise RecipeError(f"{where} needs an earlier step 'pass: {sparsity}'{extra}; none has run")
    if plan.source != sparsity:
        raise RecipeError(f"{where}: the latest sparsity plan comes from {plan.source!r}, not {sparsity!r}")
    missing = [op.name for op in ops if op.name not in plan.sparsity]
    if missing:
        raise RecipeError(
            f"{where}: op {missing[0]!r} has no planned sparsity (the {sparsity} step did not target "
            f"it; {len(missing)} such op(s))"
        )
    plan.used_by.append(pass_name)
    warnings = []
    left = len(set(plan.sparsity) - {op.name for op in ops})
    if left:
        warnings.append(
            f"{left} op(s) of the {sparsity} plan are not targets of this step and keep their weights"
        )
    return [plan.sparsity[op.name] for op in ops], warnings


# --------------------------------------------------------------------------- the math
def spread_sparsity(
    importance: Sequence[float] | np.ndarray,
    target: float,
    lam: float,
    sizes: Sequence[float] | np.ndarray | None = None,
    max_sparsity: float = MAX_PLANNED,
) -> np.ndarray:
    """Sparsities for units of given `importance` (higher = prune less) around `target`.

    Contract: the result `s` is a decreasing affine function of the min-max normalised
    importance `r ∈ [0, 1]`, `s_i = target + c · (mean_w(r) - r_i)`, whose `sizes`-weighted
    mean is exactly `target` (up to float rounding; default sizes: equal) and whose entries
    lie in `[max(0, target - lam), min(target + lam, max_sparsity)]`. The spread `c` is the
    largest value <= `2·lam` (the range OWL's reference code uses) that keeps every entry
    within those bounds. Equal importances (or one unit) give `target` everywhere.
    """
    r = np.asarray(importance, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError("importance must be one-dimensional")
    if not 0 <= target < 1:
        raise ValueError(f"target sparsity must lie in [0, 1), got {target}")
    if lam < 0 or not np.all(np.isfinite(r)):
        raise ValueError("lam must be >= 0 and importances finite")
    w = np.ones_like(r) if sizes is None else np.asarray(sizes, dtype=np.float64)
    if w.shape != r.shape or np.any(w <= 0):
        raise ValueError("sizes must be positive, one per importance")
    out = np.full(r.shape, float(target))
    span = r.max() - r.min() if r.size else 0.0
    if span <= 0 or lam == 0:
        return out
    rn = (r - r.min()) / span
    dev = float(np.dot(w, rn) / w.sum()) - rn  # weighted mean 0; > 0: less important than average
    lo, hi = max(0.0, target - lam), max(min(target + lam, max_sparsity), target)
    c = 2.0 * lam
    if dev.max() > 0:
        c = min(c, (hi - target) / dev.max())
    if dev.min() < 0:
        c = min(c, (target - lo) / -dev.min())
    return np.clip(target + max(c, 0.0) * dev, lo, hi)
