"""Pass `activation_sparsity`: training-free activation sparsity inserted as standard ONNX ops.

Each *site* is one activation tensor `x` and the ops it feeds; the pass zeroes the entries
of `x` with small magnitude so that a fused kernel may skip the matching weight columns:

- `teal` (Liu et al., 2024, arXiv:2408.14690): the input of every targeted linear op
  (q/k/v/o, up/gate/down), one magnitude threshold per input tensor. Ops that share an
  input (q/k/v on the normed hidden state, gate/up on theirs) share one site: ONE `Where`
  feeds all of them (no per-projection thresholds).
- `cats` (Lee et al., 2024, arXiv:2404.08763): the output of the gate projection's
  activation (after SiLU/GELU, before the multiply with `up`), found by data flow from the
  `roles` analysis (`ffn.gate` -> the `Mul` whose other input comes from `ffn.up`); in an
  ungated MLP (one `ffn.up` with an activation) the activation output is the input of
  `ffn.down`.
- `chess` (after He et al., 2024, arXiv:2409.01366): channel-wise thresholds (one per
  channel of the last axis) on the inputs of the FFN projections; attention inputs get one
  tensor-wise threshold (as `teal`). See `chess_thresholds` for how this differs from the paper.
- `topk` (Q-Sparse, Wang et al., 2024, arXiv:2407.10969): the `K = round((1-s)·dim)`
  largest `|x|` of every row (last axis) of each `teal` site are kept.

Thresholding is inserted as exactly `y = Where(Greater(Abs(x), T), x, Z)` (`T`: float
initializer, shape [] or [K] for CHESS; `Z`: float scalar 0), top-K as
`y = ScatterElements(ConstantOfShape(Shape(x)), i, GatherElements(x, i))` with
`i = TopK(Abs(x), K).indices` (axis -1), and only the site's targeted consumers are
rewired to `y`; stock onnxruntime reproduces the accuracy exactly.

Thresholds are quantiles of `|x|` (sparsity `s` = fraction of entries at or below `T`)
from fine log histograms (`calibration.AbsHistogram`) of the calibration data, less the
last `holdout` fraction of its batches, which measure the sparsity reached on data the
thresholds never saw. `allocation: greedy` distributes the budget over the sites of each
transformer block (`scope: block`, TEAL's) or of the whole model (`scope: model`) by
`greedy_allocation`, weighting each site by the weights it feeds; the error is that of
the model's outputs on a few calibration batches (`ActivationSparsity._greedy`).
The report gets an `activation_sparsity` section (per site: threshold, target,
calibration and held-out sparsity) with a plot.

The sparsity each threshold reached (held-out, else calibration) is also stored in the
model, as JSON in the metadata entry `METADATA_KEY`, keyed by `threshold_key` (a digest of
the threshold values and K, which a compiler recomputes from the constant T it finds in
the `Where` pattern, whatever became of node and tensor names); `calibrated_sparsities`
reads it back. The compiled side times its fused kernels at that sparsity.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_graphsurgeon as gs
import pydantic

from sparsegraph.calibration import (
    AbsHistogram,
    Calibration,
    _session,
    calibration_of,
    complete_feeds,
    stream_tensors,
)
from sparsegraph.model import Model, constant_value, producer
from sparsegraph.pass_manager import Change, PassContext, PassResult, register
from sparsegraph.passes.analysis.roles import Roles
from sparsegraph.passes.analysis.sparsifiable import SparsifiableOps, WeightedOp
from sparsegraph.report_sections import ReportSection, add_section, register_plotter

from .targeted import TargetedConfig, TargetedRewrite

SECTION = "activation_sparsity"
METADATA_KEY = "sparsegraph.activation_sparsity"  # model metadata: {threshold_key: sparsity reached}
SEARCH_LIMIT = 64  # nodes visited when walking from the gate to the gating Mul


# ------------------------------------------------------------------------------ the math
def threshold_mask(x: np.ndarray, threshold: np.ndarray | float) -> np.ndarray:
    """`x` with the entries `|x| <= threshold` set to 0 (threshold scalar or per last-axis channel)."""
    return np.where(np.abs(x) > threshold, x, 0).astype(x.dtype)


def topk_mask(x: np.ndarray, k: int) -> np.ndarray:
    """`x` keeping the `k` largest `|x|` of each row (last axis), the rest 0 (Q-Sparse,
    Wang et al., 2024, arXiv:2407.10969: top-K activation sparsification)."""
    if k >= x.shape[-1]:
        return x.copy()
    idx = np.argpartition(-np.abs(x), k - 1, axis=-1)[..., :k]
    out = np.zeros_like(x)
    np.put_along_axis(out, idx, np.take_along_axis(x, idx, axis=-1), axis=-1)
    return out


def keep_count(sparsity: float, dim: int) -> int:
    """Entries kept per row by `topk` at `sparsity` (at least 1)."""
    return max(1, round((1.0 - sparsity) * dim))


def teal_threshold(hist: AbsHistogram, sparsity: float) -> np.ndarray:
    """TEAL's magnitude threshold (Liu et al., 2024, arXiv:2408.14690): the
    `sparsity`-quantile of `|x|` over the calibration activations, so that a fraction
    `sparsity` of the entries falls at or below it. Per input tensor (a scalar)."""
    return np.asarray(hist.quantile(sparsity), dtype=np.float64)


def chess_thresholds(hist: AbsHistogram, sparsity: float) -> np.ndarray:
    """Channel-wise thresholds after CHESS (He et al., 2024, arXiv:2409.01366): channel j
    gets the `sparsity`-quantile of its own `|x_j|` distribution on calibration data, so each
    channel (and hence the tensor, on average) reaches the target sparsity while channels
    with large typical magnitude keep a larger threshold. Shape [K]. (The paper thresholds
    the FFN's intermediate activations per channel and weighs channels by the up
    projection's typical magnitude; the pass applies the per-channel quantile to the FFN
    projections' inputs, as issue 7 asks.)"""
    if not hist.per_channel:
        raise ValueError("CHESS thresholds need a per-channel histogram")
    return np.asarray(hist.quantile(sparsity), dtype=np.float64)


def greedy_allocation(
    error: Callable[[np.ndarray], float],
    weights: Sequence[float],
    budget: float,
    step: float = 0.1,
    max_level: float = 0.99,
) -> np.ndarray:
    """Per-site sparsities meeting a weighted `budget` (TEAL's block-wise greedy
    optimization, Liu et al., 2024, arXiv:2408.14690; the pass calls it per transformer
    block, as TEAL does, or once for the whole model with `scope: model`).

    `error(s)` is the output error with site i at sparsity `s[i]`; `weights[i]` the weight
    size site i feeds. Starting from 0 everywhere, each round tries raising every site by
    `step` and keeps the raise that adds the least error per unit of budget gained
    (`Δerror / (wᵢ · Δsᵢ)`), until `Σ wᵢ sᵢ / Σ wᵢ >= budget`; the last raise is shortened
    so the budget is met exactly (sparsity is continuous).
    """
    w = np.asarray(weights, dtype=np.float64)
    if not 0 <= budget <= max_level:
        raise ValueError(f"budget {budget} outside [0, {max_level}]")
    s = np.zeros(len(w))
    current = error(s)
    while (w * s).sum() < budget * w.sum() - 1e-12:
        best, best_cost, best_err = -1, math.inf, current
        for i in range(len(w)):
            if s[i] >= max_level:
                continue
            trial = s.copy()
            trial[i] = min(s[i] + step, max_level)
            err = error(trial)
            cost = (err - current) / (w[i] * (trial[i] - s[i]))
            if cost < best_cost:
                best, best_cost, best_err = i, cost, err
        if best < 0:
            break
        s[best] = min(s[best] + step, max_level)
        current = best_err
        over = (w * s).sum() - budget * w.sum()
        if over > 0:  # shorten the last raise to land on the budget
            s[best] -= over / w[best]
    return s


# --------------------------------------------------------------------------------- sites
@dataclass
class Site:
    """One activation tensor to sparsify and the consumers rewired to its sparse copy."""

    x: gs.Variable
    consumers: list[gs.Node]  # rewired to y
    ops: list[str]  # weighted ops whose work the zeros skip
    roles: list[str]
    dim: int  # size of the last axis
    params: int  # weights the site feeds (budget weight)
    per_channel: bool = False
    sparsity: float = 0.0
    threshold: np.ndarray | None = None
    knob: gs.Constant | None = None  # the inserted T (thresholds) or K (topk)
    keep: int | None = None  # topk
    measured: dict[str, float] = field(default_factory=dict)


def linear_sites(ops: list[WeightedOp], roles, per_channel_ffn: bool) -> list[Site]:
    """One site per distinct input tensor of the targeted linear ops (TEAL)."""
    sites: dict[int, Site] = {}
    for op in ops:
        node = op.weight.node
        x = node.inputs[0]
        role = roles.get(op.name)
        name = role.role if role else "other"
        site = sites.get(id(x))
        if site is None:
            site = sites[id(x)] = Site(x, [], [], [], op.shape[1], 0, per_channel=per_channel_ffn)
        site.consumers.append(node)
        site.ops.append(op.name)
        site.roles.append(name)
        site.params += op.shape[0] * op.shape[1]
        site.per_channel &= name.startswith("ffn.")
    return list(sites.values())


def gate_activation(gate: gs.Node, ups: list[gs.Node]) -> tuple[gs.Variable, gs.Node, gs.Variable] | None:
    """The gate's activation output `a`, the `Mul(a, u)` that gates it and `u` (from an up
    projection), by data flow: `a` is reached from the gate's output and not from an up's,
    `u` the other way round. None if no such Mul exists."""
    from_gate = _reachable(gate.outputs[0])
    from_up: set[int] = set()
    for up in ups:
        from_up |= _reachable(up.outputs[0])
    queue, seen = deque([gate.outputs[0]]), set()
    while queue and len(seen) < SEARCH_LIMIT:
        t = queue.popleft()
        for node in t.outputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op == "Mul" and len(node.inputs) == 2:
                a, b = node.inputs
                if id(b) in from_gate and id(a) not in from_gate:
                    a, b = b, a
                if (
                    id(a) in from_gate
                    and id(a) not in from_up
                    and id(b) in from_up
                    and id(b) not in from_gate
                ):
                    return a, node, b
            if node.op not in ("MatMul", "Gemm", "Conv"):
                queue.extend(node.outputs)
    return None


def _reachable(tensor: gs.Tensor) -> set[int]:
    """Ids of the tensors reached forward from `tensor` (itself included) without crossing a linear op."""
    out, queue = {id(tensor)}, deque([tensor])
    while queue and len(out) < SEARCH_LIMIT:
        for node in queue.popleft().outputs:
            if node.op in ("MatMul", "Gemm", "Conv"):
                continue
            for t in node.outputs:
                if id(t) not in out:
                    out.add(id(t))
                    queue.append(t)
    return out


def cats_sites(ops: list[WeightedOp], all_ops: dict[str, WeightedOp], roles) -> tuple[list[Site], list[str]]:
    """CATS sites: each targeted `ffn.gate`'s activation output (gated FFN); each targeted
    `ffn.down` of an ungated FFN layer: its input (the activation output)."""
    by_layer: dict[Any, dict[str, list[WeightedOp]]] = {}
    for op in all_ops.values():
        r = roles.get(op.name)
        if r is not None and r.role.startswith("ffn."):
            by_layer.setdefault(r.layer, {}).setdefault(r.role, []).append(op)
    sites, warnings = [], []
    for op in ops:
        r = roles.get(op.name)
        if r is None:
            continue
        group = by_layer.get(r.layer, {})
        if r.role == "ffn.gate":
            ups = [u.weight.node for u in group.get("ffn.up", [])]
            found = gate_activation(op.weight.node, ups)
            downs = group.get("ffn.down", [])
            if found is None or len(downs) != 1:
                warnings.append(f"left {op.name!r} untouched: no gating Mul with an ffn.up found")
                continue
            a, mul, _ = found
            down = downs[0]
            # a zero skips its up row and down column (the gate itself must be computed)
            params = sum(x.shape[0] * x.shape[1] for x in group.get("ffn.up", []))
            params += down.shape[0] * down.shape[1]
            sites.append(
                Site(
                    a,
                    [mul],
                    [*(x.name for x in group.get("ffn.up", [])), down.name],
                    ["ffn.gate"],
                    op.shape[0],
                    params,
                )
            )
        elif r.role == "ffn.down" and "ffn.gate" not in group:
            params = op.shape[0] * op.shape[1]  # the up projection and activation stay dense
            node = op.weight.node
            sites.append(Site(node.inputs[0], [node], [op.name], ["ffn.down"], op.shape[1], params))
    return sites, warnings


# ------------------------------------------------------------------------ graph editing
def insert_threshold(graph: gs.Graph, site: Site, tag: str) -> gs.Variable:
    """Insert `y = Where(Greater(Abs(x), T), x, Z)` and rewire the site's consumers to `y`."""
    x = site.x
    dtype = np.dtype(x.dtype) if x.dtype is not None else np.dtype(np.float32)
    absx = gs.Variable(f"{tag}/abs", dtype=dtype, shape=x.shape)
    gt = gs.Variable(f"{tag}/keep", dtype=np.bool_, shape=x.shape)
    y = gs.Variable(f"{tag}/sparse", dtype=dtype, shape=x.shape)
    t = site.knob = gs.Constant(f"{tag}/threshold", np.asarray(site.threshold, dtype=dtype))
    z = gs.Constant(f"{tag}/zero", np.zeros((), dtype=dtype))
    graph.nodes += [
        gs.Node("Abs", f"{tag}/Abs", inputs=[x], outputs=[absx]),
        gs.Node("Greater", f"{tag}/Greater", inputs=[absx, t], outputs=[gt]),
        gs.Node("Where", f"{tag}/Where", inputs=[gt, x, z], outputs=[y]),
    ]
    _rewire(site, y)
    return y


def insert_topk(graph: gs.Graph, site: Site, tag: str) -> gs.Variable:
    """Insert the top-K mask (module docstring) and rewire the site's consumers to `y`."""
    x = site.x
    dtype = np.dtype(x.dtype) if x.dtype is not None else np.dtype(np.float32)
    v = {
        n: gs.Variable(f"{tag}/{n}", dtype=d)
        for n, d in (
            ("abs", dtype),
            ("values", dtype),
            ("indices", np.int64),
            ("kept", dtype),
            ("shape", np.int64),
            ("zeros", dtype),
        )
    }
    y = gs.Variable(f"{tag}/sparse", dtype=dtype, shape=x.shape)
    k = site.knob = gs.Constant(f"{tag}/k", np.array([site.keep], dtype=np.int64))
    zero = gs.Constant(f"{tag}/zero", np.zeros(1, dtype=dtype))
    graph.nodes += [
        gs.Node("Abs", f"{tag}/Abs", inputs=[x], outputs=[v["abs"]]),
        gs.Node("TopK", f"{tag}/TopK", {"axis": -1}, [v["abs"], k], [v["values"], v["indices"]]),
        gs.Node("GatherElements", f"{tag}/Gather", {"axis": -1}, [x, v["indices"]], [v["kept"]]),
        gs.Node("Shape", f"{tag}/Shape", inputs=[x], outputs=[v["shape"]]),
        gs.Node("ConstantOfShape", f"{tag}/Zeros", {"value": zero}, [v["shape"]], [v["zeros"]]),
        gs.Node(
            "ScatterElements", f"{tag}/Scatter", {"axis": -1}, [v["zeros"], v["indices"], v["kept"]], [y]
        ),
    ]
    _rewire(site, y)
    return y


def _rewire(site: Site, y: gs.Variable) -> None:
    for node in site.consumers:
        for i, t in enumerate(node.inputs):
            if t is site.x:
                node.inputs[i] = y


@dataclass
class Inserted:
    """A thresholding found in a graph: input `x`, output `y`, kind `where` or `topk`."""

    x: str
    y: str
    kind: str
    threshold: np.ndarray | None = None
    keep: int | None = None


def find_inserted(model: Model) -> list[Inserted]:
    """The activation-sparsity patterns of this module in `model`, found by structure."""
    found = []
    for node in model.graph.nodes:
        if node.op == "Where" and len(node.inputs) == 3:
            gt = producer(node.inputs[0])
            z = constant_value(node.inputs[2])
            if gt is None or gt.op != "Greater" or z is None or z.size != 1 or np.any(z != 0):
                continue
            ab = producer(gt.inputs[0])
            t = constant_value(gt.inputs[1])
            if ab is None or ab.op != "Abs" or ab.inputs[0] is not node.inputs[1] or t is None:
                continue
            found.append(Inserted(node.inputs[1].name, node.outputs[0].name, "where", threshold=t))
        elif node.op == "ScatterElements" and len(node.inputs) == 3:
            gather, topk = producer(node.inputs[2]), producer(node.inputs[1])
            if gather is None or topk is None or gather.op != "GatherElements" or topk.op != "TopK":
                continue
            ab = producer(topk.inputs[0])
            k = constant_value(topk.inputs[1])
            if ab is None or ab.op != "Abs" or ab.inputs[0] is not gather.inputs[0] or k is None:
                continue
            found.append(
                Inserted(gather.inputs[0].name, node.outputs[0].name, "topk", keep=int(k.ravel()[0]))
            )
    return found


def measure_activation_sparsity(
    model: Model | str | Path, feeds: Iterable[dict[str, np.ndarray]]
) -> dict[str, float]:
    """Fraction of zeros in the output of each inserted thresholding (keyed by the name of
    its input tensor `x`) when onnxruntime runs `model` on `feeds` (feed dicts; derivable
    inputs are completed as in `sparsegraph.calibration`). Empty if nothing was inserted."""
    model = model if isinstance(model, Model) else Model.load(model)
    sites = find_inserted(model)
    if not sites:
        return {}
    zeros = {s.y: 0 for s in sites}
    count = {s.y: 0 for s in sites}
    batches = (complete_feeds(model, f) for f in feeds)
    for outs in stream_tensors(model, [s.y for s in sites], batches):
        for name, y in outs.items():
            zeros[name] += int(np.count_nonzero(y == 0))
            count[name] += int(y.size)
    return {s.x: zeros[s.y] / max(count[s.y], 1) for s in sites}


# ------------------------------------------------------------------- calibrated sparsity
def threshold_key(t: Any, k: int) -> str:
    """Key of a thresholding by its values: SHA-1 of T as float32 broadcast to ``[K]``, and K.
    The same for a scalar T and a ``[K]`` T of equal values (they threshold alike)."""
    a = np.asarray(t, dtype=np.float32).reshape(-1)
    if a.size == 1:
        a = np.full(k, a[0], dtype=np.float32)
    if a.size != k:
        raise ValueError(f"threshold must be a scalar or have K={k} entries; got {a.size}")
    return f"K{k}:" + hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()[:20]


def record_sparsities(model: Model, sites: list[Site]) -> dict[str, dict[str, Any]]:
    """Store in `model`'s metadata (`METADATA_KEY`) the sparsity each thresholded site
    reached: held-out if measured, else calibration, else the target; merged with earlier
    entries. Sites sharing a key (equal thresholds) keep the mean. Returns the new entries."""
    meta = model.meta.metadata_props
    try:
        entries = json.loads(meta.get(METADATA_KEY, "{}")).get("thresholds", {})
    except (ValueError, AttributeError):
        entries = {}
    new: dict[str, list] = {}
    for s in sites:
        if s.knob is None or s.keep is not None:  # top-K: no threshold to key
            continue
        source = next((k for k in ("held_out", "calibration") if k in s.measured), "target")
        value = s.measured.get(source, s.sparsity)
        new.setdefault(threshold_key(s.knob.values, s.dim), []).append((value, source, s.x.name))
    out = {}
    for key, vals in new.items():
        out[key] = {
            "sparsity": round(float(np.mean([v for v, _, _ in vals])), 6),
            "source": vals[0][1],
            "k": int(key.split(":")[0][1:]),
            "tensor": vals[0][2],  # for people reading the metadata; never used as a key
        }
    entries.update(out)
    if entries:
        meta[METADATA_KEY] = json.dumps({"version": 1, "thresholds": entries}, sort_keys=True)
    return out


def calibrated_sparsities(model: Model | Any) -> dict[str, float]:
    """``{threshold_key: sparsity}`` recorded in a model's metadata (a `Model` or an
    `onnx.ModelProto`); empty when the model carries none or the entry is unreadable."""
    if isinstance(model, Model):
        props = model.meta.metadata_props
    else:
        props = {p.key: p.value for p in model.metadata_props}
    try:
        entries = json.loads(props.get(METADATA_KEY, "{}")).get("thresholds", {})
        return {str(k): float(v["sparsity"]) for k, v in entries.items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}


# ---------------------------------------------------------------------------------- pass
class ActivationSparsityConfig(TargetedConfig):
    method: Literal["teal", "cats", "chess", "topk"] = pydantic.Field(
        "teal",
        description="teal (tensor threshold on linear inputs), cats (gate activation output), "
        "chess (channel-wise thresholds on FFN inputs), topk (K largest |x| per row)",
    )
    sparsity: float = pydantic.Field(ge=0.0, lt=1.0, description="fraction of activations set to zero")
    allocation: Literal["uniform", "greedy"] = pydantic.Field(
        "uniform",
        description="same sparsity everywhere, or TEAL's greedy per-tensor allocation of the budget",
    )
    holdout: float = pydantic.Field(
        0.25,
        ge=0.0,
        lt=1.0,
        description="fraction of calibration batches held out to measure the sparsity reached",
    )
    greedy_batches: int = pydantic.Field(
        2, gt=0, description="greedy: calibration batches on which the output error is measured"
    )
    step: float = pydantic.Field(0.1, gt=0.0, lt=1.0, description="greedy: sparsity step per move")
    scope: Literal["block", "model"] = pydantic.Field(
        "block",
        description="greedy: meet the budget in every transformer block (TEAL's) or over the whole model",
    )
    refine: int = pydantic.Field(
        2, ge=0, description="rounds re-fitting thresholds on the model with every site already sparsified"
    )


@register
class ActivationSparsity(TargetedRewrite):
    """Zero small activations (TEAL / CATS / CHESS thresholds, or top-K) by inserting standard
    ops before the targeted linear ops; calibrated (needs --calib)."""

    name = "activation_sparsity"
    Config = ActivationSparsityConfig
    requires = TargetedRewrite.requires
    supported: ClassVar[tuple[str, ...]] = ("MatMul", "Gemm")
    needs_calibration: ClassVar[bool] = True

    def unsupported_reason(self, op: WeightedOp) -> str | None:
        reason = super().unsupported_reason(op)
        if reason:
            return reason
        node = op.weight.node
        if op.weight.input_index != 1:
            return "the weight is not the second input"
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            return "Gemm with transA=1"
        return None

    def precondition(self, model: Model, ctx: PassContext) -> None:
        calibration_of(ctx, self.name)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        c = self.config
        calib = self._calib = calibration_of(ctx, self.name)
        targets, warnings = self.select(model, ctx)
        roles = ctx.get(Roles, model)
        if c.method == "cats":
            everything = ctx.get(SparsifiableOps, model).by_name()
            sites, more = cats_sites(targets, everything, roles)
            warnings += more
        else:
            sites = linear_sites(targets, roles, per_channel_ffn=c.method == "chess")
        if not sites:
            return PassResult(False, [], [*warnings, "no activation to sparsify among the targets"])
        fit, held = _split(calib, model, c.holdout)
        if not held:
            warnings.append("calibration batches could not be split: no held-out sparsity measured")
        hists = self._collect(model, sites, fit)
        if c.allocation == "greedy":
            alloc = self._greedy(model, sites, hists, fit[: c.greedy_batches], roles)
        else:
            alloc = np.full(len(sites), c.sparsity)
        changes = []
        for i, (site, s) in enumerate(zip(sites, alloc, strict=True)):
            site.sparsity = float(s)
            if s <= 0:
                continue
            tag = f"{site.x.name}/act_sparsity_{i}"
            if c.method == "topk":
                site.keep = keep_count(s, site.dim)
                insert_topk(model.graph, site, tag)
            else:
                site.threshold = (chess_thresholds if site.per_channel else teal_threshold)(hists[i], s)
                insert_threshold(model.graph, site, tag)
        inserted = [s for s in sites if s.sparsity > 0]
        if not inserted:
            return PassResult(False, [], warnings)
        model.graph.cleanup().toposort()
        if c.method != "topk":
            self._refine(model, inserted, fit)
        for label, batches in (("calibration", fit), ("held_out", held)):
            if batches:
                for name, value in measure_activation_sparsity(model, batches).items():
                    for s in inserted:
                        if s.x.name == name:
                            s.measured[label] = value
        record_sparsities(model, inserted)
        for s in inserted:
            changes.append(Change(s.ops[0], self.name, _site_record(s, c.method)))
        add_section(ctx, _section(sites, c))
        return PassResult(True, changes, warnings)

    # --------------------------------------------------------------------- statistics
    def _refine(self, model: Model, sites: list[Site], batches: list) -> None:
        """Re-fit the thresholds on the sparsified model: the sparsity of earlier sites shifts
        the activations of later ones, so the thresholds of the dense model miss the target
        (by up to ~5 % on stories260K); `refine` rounds of quantiles on the rewritten model
        bring every site back to its target on the calibration data."""
        for _ in range(self.config.refine):
            hists = self._collect(model, sites, batches)
            for site, hist in zip(sites, hists, strict=True):
                site.threshold = (chess_thresholds if site.per_channel else teal_threshold)(
                    hist, site.sparsity
                )
                site.knob.values = np.asarray(site.threshold, dtype=site.knob.values.dtype)

    def _collect(self, model: Model, sites: list[Site], batches: list) -> list[AbsHistogram]:
        """Histograms of |x| per site (per channel for CHESS's FFN sites) on `batches`."""
        start = time.perf_counter()
        hists = [AbsHistogram(s.dim, per_channel=s.per_channel) for s in sites]
        for outs in stream_tensors(model, [s.x.name for s in sites], batches, total=len(batches)):
            for hist, s in zip(hists, sites, strict=True):
                hist.update(np.asarray(outs[s.x.name]).reshape(-1, s.dim))
        self._calib.seconds += time.perf_counter() - start
        self._calib.runs += 1
        return hists

    def _greedy(self, model: Model, sites: list[Site], hists: list[AbsHistogram], batches: list, roles):
        """TEAL's greedy allocation (`greedy_allocation`), per block or over the model, with
        the error measured end to end: the relative squared error of the model's float outputs
        on `batches`, with the sites being allocated at their trial sparsity and every other
        site dense (blocks are allocated independently, as in TEAL). The sites are inserted
        into a probe copy whose thresholds (K for topk) are graph inputs."""
        c = self.config
        probe = model.copy()
        tensors = probe.graph.tensors()
        nodes = {n.name: n for n in probe.graph.nodes}
        knobs = []
        for i, site in enumerate(sites):
            shadow = Site(tensors[site.x.name], [nodes[n.name] for n in site.consumers], [], [], site.dim, 0)
            tag = f"{site.x.name}/act_sparsity_greedy_{i}"
            if c.method == "topk":
                shadow.keep = site.dim
                insert_topk(probe.graph, shadow, tag)
            else:
                shadow.threshold = np.zeros(site.dim if site.per_channel else ())
                insert_threshold(probe.graph, shadow, tag)
            const = shadow.knob
            var = gs.Variable(f"{tag}/knob", dtype=const.values.dtype, shape=list(const.values.shape))
            for node in list(const.outputs):
                for j, t in enumerate(node.inputs):
                    if t is const:
                        node.inputs[j] = var
            probe.graph.inputs.append(var)
            knobs.append(var.name)
        probe.graph.cleanup().toposort()
        outputs = [
            t.name for t in probe.graph.outputs if t.dtype is not None and np.dtype(t.dtype).kind == "f"
        ]
        cache: dict[tuple[int, float], np.ndarray] = {}

        def knob(i: int, level: float) -> np.ndarray:
            key = (i, round(float(level), 9))
            if key not in cache:
                site = sites[i]
                if c.method == "topk":
                    cache[key] = np.array([keep_count(level, site.dim) if level > 0 else site.dim], np.int64)
                elif level <= 0:
                    cache[key] = np.zeros(site.dim if site.per_channel else (), np.float32)
                else:
                    t = (chess_thresholds if site.per_channel else teal_threshold)(hists[i], level)
                    cache[key] = np.asarray(t, np.float32)
            return cache[key]

        start = time.perf_counter()
        dense_knobs = {name: knob(i, 0.0) for i, name in enumerate(knobs)}
        alloc = np.zeros(len(sites))
        with _session(probe) as sess:
            dense = [sess.run(outputs, {**feed, **dense_knobs}) for feed in batches]
            norm = sum(float(np.sum(np.square(d, dtype=np.float64))) for ds in dense for d in ds) or 1.0
            for group in _blocks(sites, roles, c.scope):

                def error(levels: np.ndarray, group=group) -> float:
                    trial = dict(dense_knobs)
                    for i, level in zip(group, levels, strict=True):
                        trial[knobs[i]] = knob(i, level)
                    err = 0.0
                    for feed, ref in zip(batches, dense, strict=True):
                        for y, d in zip(sess.run(outputs, {**feed, **trial}), ref, strict=True):
                            err += float(np.sum(np.square(y - d, dtype=np.float64)))
                    return err / norm

                params = [sites[i].params for i in group]
                alloc[group] = greedy_allocation(error, params, c.sparsity, c.step, max(0.99, c.sparsity))
        self._calib.seconds += time.perf_counter() - start
        self._calib.runs += 1
        return alloc


def _blocks(sites: list[Site], roles, scope: str) -> list[list[int]]:
    """Indices of the sites sharing a budget: per transformer block (the `roles` layer of the
    first op a site feeds; sites outside any layer form one group) or all together."""
    if scope == "model":
        return [list(range(len(sites)))]
    groups: dict[Any, list[int]] = {}
    for i, s in enumerate(sites):
        role = roles.get(s.ops[0])
        groups.setdefault(role.layer if role is not None else None, []).append(i)
    return list(groups.values())


def _split(calib: Calibration, model: Model, holdout: float) -> tuple[list, list]:
    """Complete calibration feeds for fitting, and the last `holdout` fraction of the batches
    held out (none when the source is streamed: its batches are not known up front)."""
    batches = list(calib.feeds(model))  # model inputs only (token ids), not activations
    if callable(calib.source) or len(batches) < 2:
        return batches, []
    n_held = min(max(round(holdout * len(batches)), 1), len(batches) - 1)
    if holdout <= 0:
        return batches, []
    return batches[:-n_held], batches[-n_held:]


# ---------------------------------------------------------------------------- reporting
def _site_record(s: Site, method: str) -> dict[str, Any]:
    t = s.threshold
    return {
        "tensor": s.x.name,
        "ops": s.ops,
        "roles": sorted(set(s.roles)),
        "method": method,
        "per_channel": s.per_channel,
        "threshold": None if t is None else float(np.mean(t)),
        "threshold_min": None if t is None else float(np.min(t)),
        "threshold_max": None if t is None else float(np.max(t)),
        "keep": s.keep,
        "dim": s.dim,
        "params": s.params,
        "target": round(s.sparsity, 6),
        "calibration": s.measured.get("calibration"),
        "held_out": s.measured.get("held_out"),
        "key": None if s.knob is None or s.keep is not None else threshold_key(s.knob.values, s.dim),
    }


def _weighted(records: list[dict], key: str) -> float | None:
    pairs = [(r[key], r["params"]) for r in records]
    if not pairs or any(v is None for v, _ in pairs):
        return None
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)


def _section(sites: list[Site], c: ActivationSparsityConfig) -> ReportSection:
    records = [_site_record(s, c.method) for s in sites]
    summary = {k: _weighted(records, k) for k in ("target", "calibration", "held_out")}
    data = {
        "method": c.method,
        "allocation": c.allocation,
        "sparsity": c.sparsity,
        "holdout": c.holdout,
        "weighted": summary,
        "tensors": records,
    }

    def pct(v):
        return "–" if v is None else f"{v:.1%}"

    lines = [
        f"Method `{c.method}`, allocation `{c.allocation}`, budget {c.sparsity:.0%} (weighted by the weights "
        f"each tensor feeds): reached {pct(summary['calibration'])} on calibration data, "
        f"{pct(summary['held_out'])} on the held-out {c.holdout:.0%} of the calibration batches.",
        "",
        "| tensor | feeds | threshold | target | calibration | held-out |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["keep"] is not None:
            thr = f"top-{r['keep']} of {r['dim']}"
        elif r["threshold"] is None:
            thr = "–"
        elif r["per_channel"]:
            thr = f"{r['threshold']:.4g} (channels {r['threshold_min']:.3g}–{r['threshold_max']:.3g})"
        else:
            thr = f"{r['threshold']:.4g}"
        lines.append(
            f"| `{r['tensor']}` | {', '.join(r['roles'])} | {thr} | {pct(r['target'])} "
            f"| {pct(r['calibration'])} | {pct(r['held_out'])} |"
        )
    return ReportSection(SECTION, "Activation sparsity", data, lines, figure="activation_sparsity.png")


def plot_section(data: dict, path: Path) -> None:
    """Target / calibration / held-out sparsity per tensor (bars) and threshold (line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = data["tensors"]
    x = np.arange(len(recs))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(recs) + 2), 3.8))
    for j, key in enumerate(("target", "calibration", "held_out")):
        ax.bar(x + (j - 1) * 0.27, [r[key] or 0 for r in recs], 0.27, label=key.replace("_", "-"))
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.set_xticks(
        x, [f"{i}:{'/'.join(r['roles'])}" for i, r in enumerate(recs)], rotation=60, ha="right", fontsize=7
    )
    thr = [r["threshold"] for r in recs]
    if any(t is not None for t in thr):
        ax2 = ax.twinx()
        ax2.plot(x, [np.nan if t is None else t for t in thr], "k.-", linewidth=1, label="threshold (mean)")
        ax2.set_ylabel("threshold |x|")
        ax2.legend(loc="upper right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title(
        f"activation sparsity: {data['method']}, {data['allocation']}, budget {data['sparsity']:.0%}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


register_plotter(SECTION, plot_section)
