"""Analysis `sensitivity`: how much the loss grows when each op (or layer) alone is pruned.

For each unit (an op, or with `granularity: layer` all target ops of one transformer
layer; ops without a layer are their own unit) the unit's weights are pruned to
`sparsity` (magnitude: per tensor; wanda: per output row, statistics of the dense model)
with everything else dense, and the loss is measured in onnxruntime:

- `metric: nll` (the default for a causal LM: one integer token input and a
  `[batch, seq, vocab]` output): mean next-token NLL in nats
  (`sparsegraph.eval.perplexity`) over `samples` windows: `ctx.extras["eval_windows"]`
  (1-D token arrays) when set, else rows of the calibration batches;
- `metric: mse` (the default otherwise): `Σ‖y − y_dense‖² / Σ‖y_dense‖²` over every
  float output and the first calibration batches holding `samples` rows;
- `metric: cosine`: `1 − cos(y, y_dense)` per output (flattened), averaged.

The finding (`SensitivityFinding`, a table with `delta = loss − dense loss` per unit) goes
into the report (`report.json["sensitivity"]`, a `report.md` section and
`sensitivity.png`, Δloss bars). With `allocate: TARGET` the pass also stores a sparsity
plan (`allocate_sparsity`: less sensitive units pruned more, size-weighted mean exactly
TARGET) that the next `magnitude`/`wanda`/`sparsegpt` step applies with
`sparsity: sensitivity` (`sparsegraph.sparsity_plan`)::

    steps:
      - pass: sensitivity
        sparsity: 0.7          # probe level: each unit alone at 70 %
        allocate: 0.7          # then plan a 70 % global budget
      - pass: magnitude
        sparsity: sensitivity

Cost: one onnxruntime session and one evaluation (`samples` windows or rows) per unit,
plus one for the dense model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_graphsurgeon as gs
import pydantic

from sparsegraph.calibration import _run, _session, calibration_of, missing_calibration
from sparsegraph.errors import UsageError
from sparsegraph.eval.perplexity import perplexity
from sparsegraph.feeds import _index_bound
from sparsegraph.model import Model
from sparsegraph.pass_manager import AnalysisPass, PassContext, PassResult, register
from sparsegraph.passes.rewrite.magnitude import magnitude_mask
from sparsegraph.passes.rewrite.targeted import TargetedConfig
from sparsegraph.passes.rewrite.wanda import wanda_mask
from sparsegraph.report_sections import ReportSection, add_section, register_plotter
from sparsegraph.sparsity_plan import SparsityPlan, spread_sparsity, store_plan

from .owl import select_targets
from .roles import Roles
from .sparsifiable import SparsifiableOps, WeightedOp

EVAL_WINDOWS_KEY = "eval_windows"


# ------------------------------------------------------------------------- the finding
@dataclass
class SensitivityRow:
    unit: str  # the op name, or "layer <i>"
    ops: list[str]
    role: str | None  # the op's role ("layer" units: None)
    layer: int | None
    params: int
    loss: float  # loss with this unit alone pruned
    delta: float  # loss - dense loss
    sparsity: float | None = None  # allocated sparsity (with `allocate`)


@dataclass
class SensitivityFinding:
    """Finding of `sensitivity`: the loss change per unit, in graph order."""

    metric: str  # nll | mse | cosine
    method: str  # magnitude | wanda
    sparsity: float  # each unit pruned alone to this
    granularity: str  # op | layer
    baseline: float  # dense loss
    samples: int  # windows (nll) or feed rows scored
    rows: list[SensitivityRow]
    allocation: dict[str, Any] | None = field(default=None)  # {"target", "lambda"} when allocated

    def deltas(self) -> dict[str, float]:
        return {r.unit: r.delta for r in self.rows}

    def sizes(self) -> dict[str, int]:
        return {r.unit: r.params for r in self.rows}

    def ranked(self) -> list[SensitivityRow]:
        """Most sensitive first."""
        return sorted(self.rows, key=lambda r: -r.delta)

    def plan(self) -> SparsityPlan | None:
        if self.allocation is None:
            return None
        return SparsityPlan(
            "sensitivity", self.allocation["target"], {op: r.sparsity for r in self.rows for op in r.ops}
        )

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "rows"}
        out["rows"] = [asdict(r) for r in self.rows]
        return out

    def markdown(self) -> list[str]:
        unit = {"nll": "nats/token", "mse": "relative squared error", "cosine": "1 − cosine"}[self.metric]
        lines = [
            f"Each {'op' if self.granularity == 'op' else 'layer'} alone pruned to {self.sparsity:.0%} "
            f"({self.method}); loss = {self.metric} ({unit}) over {self.samples} "
            f"{'windows' if self.metric == 'nll' else 'rows'}, dense {self.baseline:.6g}. "
            "Most sensitive first.",
        ]
        if self.allocation is not None:
            lines[0] += (
                f" Allocated sparsity: global budget {self.allocation['target']:.1%}, "
                f"λ = {self.allocation['lambda']:g}; applied by the next step with `sparsity: sensitivity`."
            )
        lines += [
            "",
            "| unit | role | layer | params | loss | Δloss | allocated |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.ranked():
            alloc = "–" if r.sparsity is None else f"{r.sparsity:.1%}"
            layer = "" if r.layer is None else r.layer
            lines.append(
                f"| `{r.unit}` | {r.role or '–'} | {layer} | {r.params:,} | {r.loss:.6g} "
                f"| {r.delta:+.4g} | {alloc} |"
            )
        return lines


# ---------------------------------------------------------------------------- the math
def allocate_sparsity(
    sensitivities: Mapping[str, float],
    target: float,
    sizes: Mapping[str, float] | None = None,
    lam: float = 0.2,
) -> dict[str, float]:
    """Per-unit sparsities under a global budget: less sensitive units are pruned more.

    `sensitivities` are loss increases measured with each unit alone pruned (to one common
    sparsity), `sizes` the units' parameter counts (default: equal). Importance is the
    loss increase per parameter on a log scale, `log(max(Δ_i, ε) / size_i)` (ε: a tenth of
    the smallest positive Δ, so units whose pruning did not hurt rank least important),
    spread by `sparsegraph.sparsity_plan.spread_sparsity`: the result's `sizes`-weighted
    mean is exactly `target` (the budget in parameters), each entry lies in
    `[target − lam, target + lam]` ∩ [0, 0.99], and a more sensitive unit never gets a
    higher sparsity than a less sensitive one of the same size. This is a heuristic in the
    spirit of layer-wise sensitivity-based allocation (e.g. OWL's outlier-ratio mapping,
    Yin et al. 2023); it reuses OWL's bounded linear spread.
    """
    units = list(sensitivities)
    if not units:
        return {}
    delta = np.array([float(sensitivities[u]) for u in units])
    if not np.all(np.isfinite(delta)):
        raise ValueError("sensitivities must be finite")
    size = np.ones(len(units)) if sizes is None else np.array([float(sizes[u]) for u in units])
    positive = delta[delta > 0]
    if positive.size == 0:
        return dict.fromkeys(units, float(target))
    floor = positive.min() / 10
    importance = np.log(np.maximum(delta, floor) / size)
    return dict(zip(units, map(float, spread_sparsity(importance, target, lam, size)), strict=True))


def measure_sensitivity(
    model: Model,
    units: Mapping[str, list[str]],
    masks: Mapping[str, np.ndarray],
    loss: Callable[[Any], float],
) -> tuple[float, dict[str, float]]:
    """`(dense loss, {unit: loss with the unit's ops masked})`; `model` is not modified.

    `units` maps a unit to op names, `masks` an op name to its keep-mask of the canonical
    `W[N, K]`, `loss` an onnxruntime session to a number. Works on one copy of the model,
    restoring each unit's weights after measuring it."""
    probe = model.copy()
    ops = SparsifiableOps().analyze(probe, PassContext()).by_name()
    with _session(probe) as sess:
        baseline = float(loss(sess))
    out = {}
    for unit, names in units.items():
        saved = []
        for name in names:
            ref = ops[name].weight
            ref.make_private()
            saved.append((ref, ref.stored().copy()))
            ref.apply_mask(masks[name])
        try:
            with _session(probe) as sess:
                out[unit] = float(loss(sess))
        finally:
            for ref, values in saved:
                ref._write(values)
    return baseline, out


class NllLoss:
    """Mean next-token NLL (nats) of a causal LM session over `windows` (1-D token arrays)."""

    def __init__(self, windows: list[np.ndarray], input_name: str, output_name: str):
        self.windows, self.input_name, self.output_name = windows, input_name, output_name

    def __call__(self, session) -> float:
        total, count = 0.0, 0
        for i in range(0, len(self.windows), 20):  # chunks of <= 20: perplexity() shows no progress bar
            r = perplexity(session, self.windows[i : i + 20], self.input_name, self.output_name)
            total, count = total + r.mean_nll * r.n_tokens, count + r.n_tokens
        return total / count


class OutputLoss:
    """Distance of a session's float outputs from the dense model's on `feeds`:
    `mse` = Σ‖y − y₀‖² / Σ‖y₀‖², `cosine` = mean over outputs of 1 − cos(y, y₀)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], outputs: list[str], metric: str):
        self.feeds, self.outputs, self.metric = feeds, outputs, metric
        self.reference: list[list[np.ndarray]] | None = None

    def __call__(self, session) -> float:
        got = [
            [np.asarray(y, np.float64) for y in _run(session, self.outputs, f).values()] for f in self.feeds
        ]
        if self.reference is None:  # the first session measured is the dense model
            self.reference = got
        if self.metric == "mse":
            num = sum(
                float(np.sum((y - y0) ** 2))
                for b, b0 in zip(got, self.reference, strict=True)
                for y, y0 in zip(b, b0, strict=True)
            )
            den = sum(float(np.sum(y0**2)) for b0 in self.reference for y0 in b0)
            return num / max(den, 1e-300)
        cos = []
        for i in range(len(self.outputs)):
            y = np.concatenate([b[i].ravel() for b in got])
            y0 = np.concatenate([b[i].ravel() for b in self.reference])
            cos.append(float(y @ y0) / max(float(np.linalg.norm(y) * np.linalg.norm(y0)), 1e-300))
        return float(np.mean([1 - c for c in cos]))


# ---------------------------------------------------------------------------- the pass
class SensitivityConfig(TargetedConfig):
    sparsity: float = pydantic.Field(0.5, ge=0.0, lt=1.0, description="each unit alone is pruned to this")
    method: Literal["magnitude", "wanda"] = pydantic.Field(
        "magnitude", description="pruning used to probe (magnitude per tensor, wanda per row)"
    )
    granularity: Literal["op", "layer"] = pydantic.Field("op", description="probe each op, or each layer")
    metric: Literal["auto", "nll", "mse", "cosine"] = pydantic.Field(
        "auto", description="loss: next-token NLL (auto for causal LMs), else output error vs dense"
    )
    samples: int = pydantic.Field(32, gt=0, description="evaluation windows (nll) or calibration rows scored")
    allocate: float | None = pydantic.Field(
        None,
        ge=0.0,
        lt=1.0,
        description="global target sparsity to plan for the next step (sparsity: sensitivity)",
    )
    lambda_: float = pydantic.Field(
        0.2,
        ge=0.0,
        lt=1.0,
        validation_alias=pydantic.AliasChoices("lambda_", "lam", "lambda"),
        description="allocated sparsities lie within allocate ± lambda (alias lam)",
    )


@register
class Sensitivity(AnalysisPass):
    """Loss change when each op (or layer) alone is pruned (NLL for causal LMs, else output
    error vs dense), reported as a table and a plot; with `allocate: TARGET`, per-op
    sparsities under that global budget for the next step (`sparsity: sensitivity`).
    Needs calibration data (--calib)."""

    name = "sensitivity"
    Config = SensitivityConfig
    requires = (SparsifiableOps, Roles)
    needs_calibration: ClassVar[bool] = True

    def precondition(self, model: Model, ctx: PassContext) -> None:
        has_windows = ctx.extras.get(EVAL_WINDOWS_KEY) is not None
        if ctx.extras.get("calibration") is None and (self.config.method == "wanda" or not has_windows):
            raise missing_calibration(self.name)

    def analyze(self, model: Model, ctx: PassContext) -> SensitivityFinding:
        cfg = self.config
        supported = ("MatMul", "Gemm", "Conv") + (("Gather",) if cfg.method == "magnitude" else ())
        targets, self._warnings = select_targets(
            self, model, ctx, supported, calibrated=cfg.method == "wanda"
        )
        roles = ctx.get(Roles, model)
        masks = self._masks(model, ctx, targets)
        units: dict[str, list[WeightedOp]] = {}
        for op in targets:
            role = roles.get(op.name)
            layered = cfg.granularity == "layer" and role is not None and role.layer is not None
            units.setdefault(f"layer {role.layer}" if layered else op.name, []).append(op)
        metric, loss, samples = self._loss(model, ctx)
        baseline, losses = measure_sensitivity(
            model, {u: [op.name for op in ops] for u, ops in units.items()}, masks, loss
        )
        rows = []
        for unit, ops in units.items():
            role = roles.get(ops[0].name)
            rows.append(
                SensitivityRow(
                    unit,
                    [op.name for op in ops],
                    role.role if role is not None and len(ops) == 1 else None,
                    role.layer if role is not None else None,
                    sum(op.shape[0] * op.shape[1] for op in ops),
                    losses[unit],
                    losses[unit] - baseline,
                )
            )
        finding = SensitivityFinding(
            metric, cfg.method, cfg.sparsity, cfg.granularity, baseline, samples, rows
        )
        if cfg.allocate is not None:
            alloc = allocate_sparsity(finding.deltas(), cfg.allocate, finding.sizes(), cfg.lambda_)
            for r in rows:
                r.sparsity = alloc[r.unit]
            finding.allocation = {"target": cfg.allocate, "lambda": cfg.lambda_}
        return finding

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        finding = self.analyze(model, ctx)
        ctx.store(type(self), finding)
        plan = finding.plan()
        warnings = list(self._warnings) + (store_plan(ctx, plan) if plan is not None else [])
        section = ReportSection(
            "sensitivity", "Sensitivity", finding.to_dict(), finding.markdown(), figure="sensitivity.png"
        )
        add_section(ctx, section)
        return PassResult(modified=False, warnings=warnings)

    # -------------------------------------------------------------------------- parts
    def _masks(self, model: Model, ctx: PassContext, targets: list[WeightedOp]) -> dict[str, np.ndarray]:
        cfg = self.config
        if cfg.method == "magnitude":
            return {op.name: magnitude_mask(op.weight.matrix(), cfg.sparsity) for op in targets}
        stats = calibration_of(ctx, self.name).statistics(model, targets) if targets else {}
        return {op.name: wanda_mask(op.weight.matrix(), stats[op.name].norm, cfg.sparsity) for op in targets}

    def _loss(self, model: Model, ctx: PassContext) -> tuple[str, Callable[[Any], float], int]:
        cfg = self.config
        metric = cfg.metric
        if metric == "auto":
            metric = "nll" if causal_lm_io(model) is not None else "mse"
        if metric == "nll":
            io = causal_lm_io(model)
            if io is None:
                raise UsageError(
                    f"pass {self.name!r}: metric nll needs a causal LM (one integer token input, a "
                    "[batch, seq, vocab] output); use metric: mse or cosine"
                )
            windows = ctx.extras.get(EVAL_WINDOWS_KEY)
            if windows is None:
                calib = calibration_of(ctx, self.name)
                windows = [row for batch in calib.batches() for row in np.asarray(batch[io[0]])]
            windows = [np.asarray(w, dtype=np.int64) for w in windows if len(w) >= 2][: cfg.samples]
            if not windows:
                raise UsageError(f"pass {self.name!r}: no evaluation window has 2 or more tokens")
            return metric, NllLoss(windows, *io), len(windows)
        calib = calibration_of(ctx, self.name)
        feeds, rows = [], 0
        for feed in calib.feeds(model):
            feeds.append(feed)
            rows += next(iter(feed.values())).shape[0] if next(iter(feed.values())).ndim else 1
            if rows >= cfg.samples:
                break
        outputs = [
            t.name for t in model.graph.outputs if t.dtype is not None and np.dtype(t.dtype).kind == "f"
        ]
        if not outputs:
            raise UsageError(f"pass {self.name!r}: the model has no float output to compare")
        return metric, OutputLoss(feeds, outputs, metric), rows


def causal_lm_io(model: Model) -> tuple[str, str] | None:
    """`(token input, logits output)` if `model` looks like a causal LM: exactly one graph
    input, an integer one, and a rank-3 float output (`logits` if several) whose static last
    dim, if any, equals the row count of the constant table the input indexes."""
    inputs = [t for t in model.graph.inputs if not isinstance(t, gs.Constant)]
    if len(inputs) != 1 or inputs[0].dtype is None or np.dtype(inputs[0].dtype).kind not in "iu":
        return None
    rank3 = [
        t
        for t in model.graph.outputs
        if t.shape is not None and len(t.shape) == 3 and t.dtype is not None and np.dtype(t.dtype).kind == "f"
    ]
    if not rank3:
        return None
    out = next((t for t in rank3 if t.name == "logits"), rank3[0])
    bound = _index_bound(inputs[0])
    if isinstance(out.shape[-1], int) and bound is not None and out.shape[-1] != bound:
        return None
    return inputs[0].name, out.name


# ---------------------------------------------------------------------------- the plot
def plot_sensitivity(finding: SensitivityFinding | dict[str, Any], path: str | Path) -> Path:
    """Δloss per unit (bars, graph order; symlog scale), and the allocated sparsities if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = finding.to_dict() if isinstance(finding, SensitivityFinding) else finding
    rows = data["rows"]
    labels = [r["unit"] for r in rows]
    delta = np.array([r["delta"] for r in rows])
    allocated = data.get("allocation") is not None
    height = max(3.0, 0.22 * len(rows) + 1.5)
    fig, axes = plt.subplots(1, 2 if allocated else 1, figsize=(11 if allocated else 8, height), sharey=True,
                             squeeze=False)  # fmt: skip
    ax = axes[0][0]
    y = np.arange(len(rows))
    roles = sorted({r["role"] or "layer" for r in rows})
    colors = {role: plt.cm.tab10(i % 10) for i, role in enumerate(roles)}
    ax.barh(y, delta, color=[colors[r["role"] or "layer"] for r in rows])
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    positive = np.abs(delta[delta != 0])
    if positive.size and positive.max() / positive.min() > 100:
        ax.set_xscale("symlog", linthresh=float(positive.min()))
    ax.set_xlabel(f"Δ{data['metric']} when pruned alone to {data['sparsity']:.0%} ({data['method']})")
    ax.set_title(f"sensitivity (dense {data['metric']} {data['baseline']:.4g})", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[r]) for r in roles]
    ax.legend(handles, roles, fontsize=7, loc="lower right")
    if allocated:
        ax2 = axes[0][1]
        ax2.barh(y, [100 * r["sparsity"] for r in rows], color="tab:gray")
        ax2.axvline(100 * data["allocation"]["target"], color="k", linestyle="--", linewidth=1)
        ax2.set_xlabel("allocated sparsity (%)")
        ax2.set_xlim(0, 100)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


register_plotter("sensitivity", plot_sensitivity)
