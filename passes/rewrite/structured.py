"""Structured pruning that shrinks shapes: FFN neurons, attention heads, whole blocks.

The result is a smaller *dense* ONNX model that any runtime runs faster. Each pass takes
the coupled structures from the `roles` analysis (found from data flow, never names) and
removes them exactly: the pruned model computes what the original computes with the
removed structures' weights set to zero.

- `prune_neurons`: FFN intermediate neurons: rows of `ffn.up` (and `ffn.gate`), their
  biases, and the matching input columns of `ffn.down` (the coupled group of LLM-Pruner,
  Ma et al., "LLM-Pruner: On the Structural Pruning of Large Language Models", NeurIPS
  2023, and of Sheared-LLaMA, Xia et al., ICLR 2024).
- `prune_heads`: attention heads: q/k/v rows and biases, o input columns, and every
  head count baked into the graph between them (`channel_layout`). Head importance by
  weight norms follows the head-pruning study of Michel et al., "Are Sixteen Heads Really
  Better than One?", NeurIPS 2019.
- `prune_layers`: whole blocks, bypassed on the residual stream (block importance as the
  relative change a block makes to the stream: Men et al., "ShortGPT", 2024).

Weights are seen as `W[N, K]` (`sparsegraph.weights`); `slice_weight` cuts the stored
initializer in its own layout (MatMul `[K, N]`, Gemm with `transB` 0 or 1, through
Transpose/Cast/DequantizeLinear chains).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs
import pydantic

from sparsegraph.errors import RecipeError, UnsupportedOpError
from sparsegraph.model import Model, constant_value
from sparsegraph.pass_manager import (
    Change,
    PassConfig,
    PassContext,
    PassResult,
    RewritePass,
    check,
    register,
)
from sparsegraph.passes.analysis.roles import RoleMap, Roles
from sparsegraph.passes.analysis.sparsifiable import SparsifiableOps, WeightedOp
from sparsegraph.weights import WeightRef, _dq_params

from .channel_layout import (
    ChannelLayout,
    LayoutError,
    ShapeTable,
    Sym,
    flat,
    infer_dims,
    probe_dims,
    syms,
)
from .targeted import prune_lowest


# ------------------------------------------------------------------------- counting
def nearest_count(x: float) -> int:
    """The whole number nearest to `x`, halves rounded down (never above the request)."""
    return max(0, math.floor(x + 0.5 - 1e-9))


def kept_count(
    total: int, fraction: float | None = None, keep: int | None = None, multiple_of: int = 1
) -> int:
    """How many of `total` channels to keep: `total - nearest(fraction * total)`, or `keep`,
    rounded to the nearest multiple of `multiple_of` (halves down) within `[multiple_of, total]`.
    A request that keeps everything keeps everything, whatever `multiple_of`."""
    kept = min(keep, total) if keep is not None else total - nearest_count((fraction or 0.0) * total)
    if kept >= total:
        return total
    if multiple_of > 1:
        kept = max(multiple_of, nearest_count(kept / multiple_of) * multiple_of)
    return max(1, min(kept, total))


# ----------------------------------------------------------------------- importance
def neuron_importance(
    up: np.ndarray, down: np.ndarray, gate: np.ndarray | None = None, act_norm: np.ndarray | None = None
) -> np.ndarray:
    """Importance of each FFN neuron j (higher = keep).

    `up`, `gate`: canonical `[F, d]` (neuron j is row j); `down`: canonical `[d, F]`
    (neuron j is column j). Without `act_norm`: `‖[up_j, gate_j]‖₂ · ‖down[:, j]‖₂`, the
    magnitude of the coupled group (LLM-Pruner's structure, scored by weight norm). With
    `act_norm` (`‖X_j‖₂` of the down projection's input over calibration data):
    `act_norm_j · ‖down[:, j]‖₂`, the expected size of neuron j's contribution (the
    Wanda criterion `|W|·‖X‖` summed over the neuron's output column).
    """
    down_norm = np.linalg.norm(down.astype(np.float64), axis=0)
    if act_norm is not None:
        return np.asarray(act_norm, dtype=np.float64) * down_norm
    sq = np.sum(up.astype(np.float64) ** 2, axis=1)
    if gate is not None:
        sq = sq + np.sum(gate.astype(np.float64) ** 2, axis=1)
    return np.sqrt(sq) * down_norm


def head_sq_norms(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, o: np.ndarray, groups: int, per_group: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Squared L2 norms per head: `(q and o [K, R], k [K], v [K])`.

    `q [K·R·hd, d]`, `k`/`v [K·hd, d]` (canonical, head-major rows), `o [d, K·R·hd]`
    (canonical, head-major columns); query head `(g, r)` uses KV group `g`."""
    qo = np.sum(q.astype(np.float64).reshape(groups, per_group, -1) ** 2, axis=2)
    qo = qo + np.sum(o.astype(np.float64).T.reshape(groups, per_group, -1) ** 2, axis=2)
    kk = np.sum(k.astype(np.float64).reshape(groups, -1) ** 2, axis=1)
    vv = np.sum(v.astype(np.float64).reshape(groups, -1) ** 2, axis=1)
    return qo, kk, vv


def head_importance(qo: np.ndarray, kk: np.ndarray, vv: np.ndarray, mode: str) -> np.ndarray:
    """L2 norm of each prunable unit (Michel et al. 2019 prune by head; this scores a head
    by the norm of everything removed with it). `kv_groups`: `[K]`, a KV group with its
    query heads' q rows and o columns; `query_heads`: `[K, R]`, a query head's q rows and
    o columns (its group's k/v stay)."""
    if mode == "query_heads":
        return np.sqrt(qo)
    return np.sqrt(qo.sum(axis=1) + kk + vv)


# ------------------------------------------------------------------- weight slicing
def slice_weight(ref: WeightRef, axis: int, keep: np.ndarray) -> None:
    """Keep only the canonical rows (`axis=0`, outputs) or columns (`axis=1`, inputs)
    `keep` of a MatMul/Gemm weight, cutting the stored initializer in its own layout
    (through Transpose/Cast/Identity/DequantizeLinear; per-axis quantization parameters
    are cut too). Rows also cut a Gemm's bias `C`. A shared weight is copied first."""
    node = ref.node
    if node.op == "MatMul":
        eff_axis = 1 - axis
    elif node.op == "Gemm" and not node.attrs.get("transA", 0):
        eff_axis = axis if node.attrs.get("transB", 0) else 1 - axis
    else:
        raise UnsupportedOpError(f"cannot slice the weight of {node.op} {node.name!r}")
    keep = np.asarray(keep, dtype=np.int64)
    ref.make_private()
    stored_axis = eff_axis
    for n in reversed(ref.chain):
        ndim = ref.stored().ndim
        if n.op == "Transpose":
            perm = n.attrs.get("perm") or list(reversed(range(ndim)))
            stored_axis = perm[stored_axis]
        elif n.op == "DequantizeLinear":
            scale, _ = _dq_params(n, ndim)
            if scale.ndim and n.attrs.get("axis", 1) % ndim == stored_axis:
                for i in (1, 2):
                    if i < len(n.inputs) and n.inputs[i].name:
                        v = np.asarray(constant_value(n.inputs[i]))
                        n.inputs[i] = gs.Constant(f"{n.inputs[i].name}__{node.name}", np.take(v, keep))
        n.outputs[0].shape = None
    ref._write(np.ascontiguousarray(np.take(ref.stored(), keep, axis=stored_axis)))
    if node.op == "Gemm" and axis == 0 and len(node.inputs) > 2 and node.inputs[2].name:
        c = node.inputs[2]
        values = constant_value(c)
        if values is None:
            raise UnsupportedOpError(f"Gemm {node.name!r}: its bias is not a constant")
        values = np.asarray(values)
        if values.ndim and values.shape[-1] > 1:
            node.inputs[2] = gs.Constant(f"{c.name}__{node.name}", np.take(values, keep, axis=-1))
    node.outputs[0].shape = None


def slice_unsupported(ref: WeightRef) -> str | None:
    """Why `slice_weight` cannot cut this weight, or None (checked before any rewrite)."""
    node = ref.node
    if node.op not in ("MatMul", "Gemm"):
        return f"cannot slice the weight of a {node.op}"
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return "Gemm with transA"
        if len(node.inputs) > 2 and node.inputs[2].name and constant_value(node.inputs[2]) is None:
            return "Gemm whose bias is not a constant"
    return None


def kept_indices(factors: list, keep: dict, joint: dict) -> np.ndarray:
    """Kept positions of an axis laid out as `factors` (row-major, major first): `keep`
    maps a `Sym` to its kept indices, `joint` a pair of adjacent `Sym`s to the kept flat
    indices of their product (query heads of kept groups); integers keep everything."""
    idx = np.zeros(1, dtype=np.int64)
    i = 0
    while i < len(factors):
        f = factors[i]
        nxt = factors[i + 1] if i + 1 < len(factors) else None
        if (f, nxt) in joint:
            sel, size, i = joint[(f, nxt)], f.value * nxt.value, i + 2
        elif isinstance(f, Sym):
            if f not in keep:
                raise LayoutError(f"an axis {f.name} alone cannot be cut consistently")
            sel, size, i = keep[f], f.value, i + 1
        elif isinstance(f, int):
            sel, size, i = np.arange(f), f, i + 1
        else:
            raise LayoutError(f"an axis of unknown size {f!r} cannot be cut")
        idx = (idx[:, None] * size + np.asarray(sel, dtype=np.int64)[None, :]).ravel()
    return idx


# ---------------------------------------------------------------------------- shared
def with_probe(model: Model, shapes: ShapeTable, attempt):
    """`attempt(suspects)`; if it fails with a `LayoutError` after reading off-path tensors
    whose shapes inference left vague, measure those (`probe_dims`) and try once more."""
    suspects: set[str] = set()
    try:
        return attempt(suspects)
    except LayoutError:
        todo = suspects - shapes.probed
        if not todo:
            raise
        shapes.update(probe_dims(model, todo))
        shapes.probed |= todo
        return attempt(set())


class _Structured(RewritePass):
    requires = (SparsifiableOps, Roles)

    def _setup(self, model: Model, ctx: PassContext):
        ops = ctx.get(SparsifiableOps, model).by_name()
        roles: RoleMap = ctx.get(Roles, model)
        nodes = {n.name: n for n in model.graph.nodes}
        linear = {id(nodes[name]) for name, op in ops.items() if op.is_linear}
        return ops, roles, nodes, linear

    def _where(self, model: Model, layer: int | None = None) -> str:
        return f"pass {self.name!r} on {model.name}" + (f", layer {layer}" if layer is not None else "")


def _check_layers(layers: list[int] | None, known: list[int], where: str) -> None:
    for layer in layers or []:
        if layer not in known:
            raise RecipeError(f"{where}: layers: no layer {layer} (layers: {', '.join(map(str, known))})")


# --------------------------------------------------------------------- prune_neurons
class PruneNeuronsConfig(PassConfig):
    fraction: float | None = pydantic.Field(
        None, ge=0.0, lt=1.0, description="fraction of FFN neurons removed per layer"
    )
    keep: int | None = pydantic.Field(
        None, ge=1, description="FFN neurons kept per layer (instead of fraction)"
    )
    multiple_of: int = pydantic.Field(1, ge=1, description="round the kept count to a multiple of this")
    importance: Literal["magnitude", "activation"] = pydantic.Field(
        "magnitude", description="magnitude (weight norms) or activation (needs calibration data)"
    )
    layers: list[int] | None = pydantic.Field(None, description="layers to prune (default: all)")

    @pydantic.model_validator(mode="after")
    def _one_rule(self):
        if (self.fraction is None) == (self.keep is None):
            raise ValueError("give exactly one of fraction, keep")
        return self


@register
class PruneNeurons(_Structured):
    """Remove FFN intermediate neurons: rows of up (and gate) and their biases, the
    matching input columns of down, and neuron counts baked into shapes between them."""

    name = "prune_neurons"
    Config = PruneNeuronsConfig

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        ops, roles, nodes, linear = self._setup(model, ctx)
        blocks = _ffn_blocks(roles, ops, self._where(model))
        _check_layers(cfg.layers, sorted(blocks), self._where(model))
        chosen = {layer: b for layer, b in blocks.items() if cfg.layers is None or layer in cfg.layers}
        act = self._activation_norms(model, ctx, chosen) if cfg.importance == "activation" else {}
        shapes = infer_dims(model)
        changes, self._expected = [], {}
        for layer, (up, gate, down) in sorted(chosen.items()):
            where = self._where(model, layer)
            total = up.shape[0]
            kept = kept_count(total, cfg.fraction, cfg.keep, cfg.multiple_of)
            if kept == total:
                changes.append(Change(down.name, "skipped", {"layer": layer, "reason": "nothing to remove"}))
                continue
            f_sym = Sym("F", total, kept)
            projections = [p for p in (up, gate) if p is not None]

            def attempt(suspects, projections=projections, down=down, f_sym=f_sym, where=where, total=total):
                layout = ChannelLayout(
                    model.graph,
                    shapes,
                    [(nodes[p.name].outputs[0], nodes[p.name].inputs[0], [f_sym]) for p in projections],
                    [nodes[down.name]],
                    linear - {id(nodes[p.name]) for p in (*projections, down)},
                    where,
                    allow_outputs=False,
                    suspects=suspects,
                ).run()
                arriving = flat(layout.sink_dims[id(nodes[down.name])][-1])
                if arriving != [f_sym]:
                    raise LayoutError(f"{where}: {down.name!r} reads {arriving}, not the {total} neurons")
                return layout

            try:
                layout = with_probe(model, shapes, attempt)
            except LayoutError as exc:
                raise UnsupportedOpError(f"cannot prune FFN neurons: {exc}") from None
            scores = neuron_importance(
                up.weight.matrix(),
                down.weight.matrix(),
                gate.weight.matrix() if gate is not None else None,
                act.get(down.name),
            )
            keep = np.flatnonzero(prune_lowest(scores, total - kept))
            rewritten = layout.apply(
                lambda factors, keep=keep, f=f_sym: kept_indices(factors, {f: keep}, {}), f"ffn{layer}"
            )
            for p in projections:
                slice_weight(p.weight, 0, keep)
                self._expected[p.name] = (kept, p.shape[1])
            slice_weight(down.weight, 1, keep)
            self._expected[down.name] = (down.shape[0], kept)
            for p in (*projections, down):
                before = list(p.shape)
                after = list(self._expected[p.name])
                changes.append(Change(p.name, "prune_neurons", {
                    "layer": layer, "neurons_before": total, "neurons_after": kept,
                    "shape_before": before, "shape_after": after, **rewritten,
                }))  # fmt: skip
            model.graph.toposort()
        return PassResult(any(c.action == self.name for c in changes), changes)

    def _activation_norms(self, model: Model, ctx: PassContext, blocks: dict) -> dict[str, np.ndarray]:
        try:
            from sparsegraph.calibration import calibration_of
        except ImportError:  # pragma: no cover - the calibration module ships with the package
            raise RecipeError(f"pass {self.name!r}: importance 'activation' needs calibration data") from None
        calib = calibration_of(ctx, self.name)
        downs = [down for _, _, down in blocks.values()]
        stats = calib.statistics(model, downs)
        return {down.name: stats[down.name].norm for down in downs}

    def postcondition(self, model: Model, ctx: PassContext, result: PassResult) -> None:
        _check_shapes(model, getattr(self, "_expected", {}), self.name)


def _ffn_blocks(roles: RoleMap, ops: dict[str, WeightedOp], where: str) -> dict[int, tuple]:
    """`layer -> (up, gate or None, down)` from the roles; one FFN per layer."""
    found: dict[int, dict[str, list]] = {}
    for name, role in roles.roles.items():
        if role.role in ("ffn.up", "ffn.gate", "ffn.down") and role.layer is not None:
            found.setdefault(role.layer, {}).setdefault(role.role, []).append(ops[name])
    if not found:
        raise UnsupportedOpError(f"{where}: no feed-forward block found")
    blocks = {}
    for layer, group in found.items():
        ups, gates, downs = group.get("ffn.up", []), group.get("ffn.gate", []), group.get("ffn.down", [])
        if len(ups) != 1 or len(downs) != 1 or len(gates) > 1:
            raise UnsupportedOpError(
                f"{where}, layer {layer}: expected one up, one down and at most one gate projection, found "
                f"{len(ups)} up, {len(gates)} gate, {len(downs)} down"
            )
        up, down = ups[0], downs[0]
        gate = gates[0] if gates else None
        if down.shape[1] != up.shape[0] or (gate is not None and gate.shape[0] != up.shape[0]):
            raise UnsupportedOpError(
                f"{where}, layer {layer}: up {up.shape}, gate {gate.shape if gate else None} and down "
                f"{down.shape} do not share one intermediate width"
            )
        for op in (up, gate, down):
            reason = slice_unsupported(op.weight) if op is not None else None
            if reason:
                raise UnsupportedOpError(f"{where}, layer {layer}: {op.name!r}: {reason}")
        blocks[layer] = (up, gate, down)
    return blocks


def _check_shapes(model: Model, expected: dict[str, tuple[int, int]], name: str) -> None:
    nodes = {n.name: n for n in model.graph.nodes}
    from sparsegraph.weights import find_weight

    for op_name, shape in expected.items():
        ref = find_weight(model.graph, nodes[op_name]) if op_name in nodes else None
        check(ref is not None, name, f"op {op_name!r} lost its weight")
        check(tuple(ref.matrix().shape) == tuple(shape), name, f"op {op_name!r} is not {shape} after slicing")


# ----------------------------------------------------------------------- prune_heads
class PruneHeadsConfig(PassConfig):
    fraction: float = pydantic.Field(
        ge=0.0, lt=1.0, description="fraction of attention heads removed per layer"
    )
    mode: Literal["kv_groups", "query_heads"] = pydantic.Field(
        "kv_groups",
        description="GQA: remove whole KV groups with their query heads, or query heads within every group",
    )
    layers: list[int] | None = pydantic.Field(None, description="layers to prune (default: all)")


@register
class PruneHeads(_Structured):
    """Remove attention heads: q/k/v rows and biases, o input columns, and every head
    count baked into shapes on the attention path (Reshape/Expand/Split constants,
    KV-cache input and output shapes). An unprovable head layout is an error."""

    name = "prune_heads"
    Config = PruneHeadsConfig

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        ops, roles, nodes, linear = self._setup(model, ctx)
        where = self._where(model)
        if not roles.attention:
            raise UnsupportedOpError(f"{where}: no attention block found")
        _check_layers(cfg.layers, [b.layer for b in roles.attention], where)
        shapes = infer_dims(model)
        changes, self._expected = [], {}
        for block in roles.attention:
            if cfg.layers is not None and block.layer not in cfg.layers:
                continue
            changes += self._prune_block(model, block, ops, nodes, linear, shapes)
            model.graph.toposort()
        return PassResult(any(c.action == self.name for c in changes), changes)

    def _prune_block(self, model, block, ops, nodes, linear, shapes) -> list[Change]:
        cfg, layer = self.config, block.layer
        where = self._where(model, layer)
        core = nodes[block.core]
        if core.op != "Softmax":
            raise UnsupportedOpError(f"{where}: fused attention op {core.op} {core.name!r} is not supported")
        fused = len(block.q) == 1 and block.q == block.k == block.v
        if len(block.o) != 1 or not (fused or len(block.q) == len(block.k) == len(block.v) == 1):
            raise UnsupportedOpError(
                f"{where}: expected one q, k, v (or fused qkv) and one o projection, found "
                f"q={block.q} k={block.k} v={block.v} o={block.o}"
            )
        projections = [ops[block.q[0]]] if fused else [ops[block.q[0]], ops[block.k[0]], ops[block.v[0]]]
        o = ops[block.o[0]]
        for op in (*projections, o):
            reason = slice_unsupported(op.weight)
            if reason:
                raise UnsupportedOpError(f"{where}: {op.name!r}: {reason}")
        if fused:
            if projections[0].shape[0] % 3:
                raise UnsupportedOpError(
                    f"{where}: fused qkv width {projections[0].shape[0]} is not 3 equal parts"
                )
            nq = nk = nv = projections[0].shape[0] // 3
        else:
            nq, nk, nv = (p.shape[0] for p in projections)
        if nk != nv or nq % nk or o.shape[1] != nq:
            raise UnsupportedOpError(
                f"{where}: q/k/v/o widths {nq}/{nk}/{nv}/{o.shape[1]} do not form heads of one size"
            )

        def attempt(suspects):
            errors = []  # each candidate's reason: the last alone hid the true head dim's
            for hd in _head_dim_candidates(core, shapes, nq, nk):
                try:
                    args = (projections, o, fused, nq, nk, hd, where, suspects)
                    return (hd, *self._analyze(model, nodes, linear, shapes, *args))
                except LayoutError as exc:
                    errors.append(str(exc))
            if len(errors) <= 1:
                raise LayoutError(errors[0] if errors else "the head dim is not inferable")
            raise LayoutError(f"no head dim gives a consistent layout: {'; '.join(errors)}")

        try:
            hd, layout, (k_sym, r_sym) = with_probe(model, shapes, attempt)
        except LayoutError as exc:
            raise UnsupportedOpError(f"{where}: cannot prove the head layout: {exc}") from None
        groups, per_group = nk // hd, nq // nk
        mode = "query_heads" if cfg.mode == "query_heads" and per_group > 1 else "kv_groups"
        if fused:
            w = projections[0].weight.matrix().reshape(3, nq, -1)
            qo, kk, vv = head_sq_norms(w[0], w[1], w[2], o.weight.matrix(), groups, per_group)
        else:
            q, k, v = (p.weight.matrix() for p in projections)
            qo, kk, vv = head_sq_norms(q, k, v, o.weight.matrix(), groups, per_group)
        scores = head_importance(qo, kk, vv, mode)
        if mode == "kv_groups":
            drop = min(nearest_count(cfg.fraction * groups), groups - 1)
            kept_groups = np.flatnonzero(prune_lowest(scores, drop))
            kept_heads = (kept_groups[:, None] * per_group + np.arange(per_group)[None, :]).ravel()
            new_groups, new_per_group = len(kept_groups), per_group
            keep = {k_sym: kept_groups, r_sym: np.arange(per_group)}
        else:
            drop = min(nearest_count(cfg.fraction * per_group), per_group - 1)
            mask = prune_lowest(scores, drop, axis=1)
            kept_heads = np.flatnonzero(mask.ravel())
            new_groups, new_per_group = groups, per_group - drop
            keep = {k_sym: np.arange(groups)}
            if all((mask[g] == mask[0]).all() for g in range(groups)):
                keep[r_sym] = np.flatnonzero(mask[0])
        heads = groups * per_group
        units = f"{groups} KV groups" if mode == "kv_groups" else f"{per_group} query heads per group"
        if mode == "kv_groups" and groups == 1:
            units += " (a single KV group: use mode query_heads)"
        if drop == 0:
            return [
                Change(
                    o.name, "skipped", {"layer": layer, "reason": f"{cfg.fraction} of {units} rounds to 0"}
                )
            ]
        k_sym.new, r_sym.new = new_groups, new_per_group
        joint = {(k_sym, r_sym): kept_heads}
        try:
            o_factors = flat(layout.sink_dims[id(nodes[o.name])][-1])
            cut = {}
            if fused:
                cut[projections[0].name] = (0, kept_indices([3, *_present(k_sym), hd], keep, joint))
            else:
                cut[projections[0].name] = (0, kept_indices([*_present(k_sym, r_sym), hd], keep, joint))
                for p in projections[1:]:
                    cut[p.name] = (0, kept_indices([*_present(k_sym), hd], keep, joint))
            cut[o.name] = (1, kept_indices(o_factors, keep, joint))
            rewritten = layout.apply(lambda f: kept_indices(f, keep, joint), f"heads{layer}")
        except LayoutError as exc:
            raise UnsupportedOpError(f"{where}: {exc}") from None
        changes = []
        new_heads = new_groups * new_per_group
        for p in (*projections, o):
            axis, idx = cut[p.name]
            before = list(p.shape)
            slice_weight(p.weight, axis, idx)
            after = [len(idx), before[1]] if axis == 0 else [before[0], len(idx)]
            self._expected[p.name] = tuple(after)
            changes.append(Change(p.name, "prune_heads", {
                "layer": layer, "mode": mode, "head_dim": hd, "heads_before": heads, "heads_after": new_heads,
                "kv_groups_before": groups, "kv_groups_after": new_groups,
                "shape_before": before, "shape_after": after, **rewritten,
            }))  # fmt: skip
        return changes

    def _analyze(self, model, nodes, linear, shapes, projections, o, fused, nq, nk, hd, where, suspects):
        groups, per_group = nk // hd, nq // nk
        k_sym, r_sym = Sym("K", groups), Sym("R", per_group)
        if fused:
            if per_group != 1:
                raise LayoutError("a fused qkv projection with grouped-query attention is not supported")
            channels = [[3, *_present(k_sym), hd]]
        else:
            channels = [[*_present(k_sym, r_sym), hd], [*_present(k_sym), hd], [*_present(k_sym), hd]]
        sources = [
            (nodes[p.name].outputs[0], nodes[p.name].inputs[0], ch)
            for p, ch in zip(projections, channels, strict=True)
        ]
        o_node = nodes[o.name]
        layout = ChannelLayout(
            model.graph,
            shapes,
            sources,
            [o_node],
            linear - {id(nodes[p.name]) for p in (*projections, o)},
            f"{where} (head dim {hd})",
            suspects=suspects,
        ).run()
        arriving = flat(layout.sink_dims[id(o_node)][-1])
        heads_first = [f for f in arriving if isinstance(f, Sym)] == _present(k_sym, r_sym) and all(
            isinstance(f, int) for f in arriving[len(_present(k_sym, r_sym)) :]
        )
        if not heads_first or math.prod(f.value if isinstance(f, Sym) else f for f in arriving) != nq:
            raise LayoutError(f"{o.name!r} reads its input as {arriving}, not as [heads, head dim]")
        if not syms(layout.sink_dims[id(o_node)][-1]) and groups * per_group > 1:
            raise LayoutError("no head axis found")
        return layout, (k_sym, r_sym)

    def postcondition(self, model: Model, ctx: PassContext, result: PassResult) -> None:
        _check_shapes(model, getattr(self, "_expected", {}), self.name)


def _present(*symbols: Sym) -> list[Sym]:
    """The symbols that stand for a count above 1 (a count of 1 is no axis)."""
    return [s for s in symbols if s.value > 1]


def _head_dim_candidates(core: gs.Node, shapes: dict, nq: int, nk: int) -> list[int]:
    """The head dim: the scores MatMul's contraction size when shape inference knows it,
    else every divisor of the k width that gives at least two query heads (smallest first:
    a multiple of the true head dim also gives a consistent, coarser layout)."""
    queue, seen = deque([core.inputs[0]]), set()
    while queue and len(seen) < 64:
        t = queue.popleft()
        node = t.inputs[0] if t.inputs else None
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        dynamic = [x for x in node.inputs if constant_value(x) is None and x.name]
        if node.op == "MatMul" and len(dynamic) == 2:
            shape = shapes.get(node.inputs[0].name)
            if shape and isinstance(shape[-1], int) and shape[-1] > 0 and nk % shape[-1] == 0:
                return [shape[-1]]
            break
        queue.extend(dynamic)
    return [d for d in range(1, nk + 1) if nk % d == 0 and nq // d >= 2]


# ---------------------------------------------------------------------- prune_layers
class PruneLayersConfig(PassConfig):
    layers: list[int] | None = pydantic.Field(None, description="indices of the blocks to remove")
    count: int | None = pydantic.Field(None, ge=1, description="number of least important blocks to remove")

    @pydantic.model_validator(mode="after")
    def _one_rule(self):
        if (self.layers is None) == (self.count is None):
            raise ValueError("give exactly one of layers, count")
        return self


@register
class PruneLayers(_Structured):
    """Remove whole transformer blocks by bypassing them on the residual stream: each of
    the block's residual Adds is replaced by its stream input; the block's ops become dead
    and are removed (ops still needed elsewhere, such as a KV-cache output, stay).

    With `count`, blocks are ranked by the relative change they make to the stream,
    `‖x_out - x_in‖ / ‖x_in‖` over `ctx.extras["calibration"]` data when given (ShortGPT's
    block-influence idea), else by the data-free proxy `Σ_branches ‖W_in‖_F · ‖W_out‖_F`
    (v·o for attention, (up, gate)·down for the FFN)."""

    name = "prune_layers"
    Config = PruneLayersConfig

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        ops, roles, _, _ = self._setup(model, ctx)
        where = self._where(model)
        layers = sorted({r.layer for r in roles.roles.values() if r.layer is not None})
        if not layers:
            raise UnsupportedOpError(f"{where}: no transformer block found")
        blocks = {layer: block_residual_adds(model, roles, ops, layer, where) for layer in layers}
        if cfg.layers is not None:
            _check_layers(cfg.layers, layers, where)
            chosen = sorted(set(cfg.layers))
            scores = None
        else:
            if cfg.count >= len(layers):
                raise RecipeError(f"{where}: count: cannot remove {cfg.count} of {len(layers)} blocks")
            scores = self._importance(model, ctx, roles, ops, blocks, layers)
            order = np.argsort([scores[layer] for layer in layers], kind="stable")
            chosen = sorted(layers[i] for i in order[: cfg.count])
        if len(chosen) >= len(layers):
            raise RecipeError(f"{where}: layers: cannot remove every block")
        changes = []
        for layer in chosen:
            for add, stream in blocks[layer]:
                _bypass(model.graph, add, stream)
            for name, role in roles.roles.items():
                if role.layer == layer:
                    detail = {"layer": layer, "role": role.role}
                    if scores is not None:
                        detail["importance"] = float(scores[layer])
                    changes.append(Change(name, "removed_layer", detail))
        self._removed = chosen
        return PassResult(bool(chosen), changes)

    def _importance(self, model, ctx, roles, ops, blocks, layers) -> dict[int, float]:
        calib = ctx.extras.get("calibration")
        if calib is not None:
            return stream_change(model, calib, {layer: blocks[layer] for layer in layers})
        scores = {}
        for layer in layers:
            by_role: dict[str, list[WeightedOp]] = {}
            for name, role in roles.roles.items():
                if role.layer == layer:
                    by_role.setdefault(role.role, []).append(ops[name])

            def norm(*role_names: str, by_role=by_role) -> float:
                sq = sum(float(np.sum(op.weight.matrix().astype(np.float64) ** 2))
                         for r in role_names for op in by_role.get(r, []))  # fmt: skip
                return math.sqrt(sq)

            attn = norm("attn.v", "attn.kv", "attn.qkv") * norm("attn.o")
            ffn = norm("ffn.up", "ffn.gate") * norm("ffn.down")
            scores[layer] = attn + ffn
        return scores


def block_residual_adds(
    model: Model, roles: RoleMap, ops: dict[str, WeightedOp], layer: int, where: str
) -> list[tuple[gs.Node, int]]:
    """The residual Adds that join block `layer` into the stream, in graph order, each with
    the index of its stream input (the input not coming from the block's o/down projection)."""
    residual = set(roles.residual_adds)
    nodes = list(model.graph.nodes)
    by_name = {n.name: n for n in nodes}
    order = {id(n): i for i, n in enumerate(nodes)}
    linear = {name for name, op in ops.items() if op.is_linear}
    ends = [name for b in roles.attention if b.layer == layer for name in b.o]
    ends += [name for name, r in roles.roles.items() if r.role == "ffn.down" and r.layer == layer]
    if not ends:
        raise UnsupportedOpError(f"{where}, layer {layer}: no o or down projection found")
    found: dict[int, tuple[gs.Node, int]] = {}
    for name in ends:
        queue, seen, hit = deque([by_name[name].outputs[0]]), set(), None
        while queue and hit is None and len(seen) < 64:
            t = queue.popleft()
            for node in t.outputs:
                if id(node) in seen or node.name in linear:
                    continue
                seen.add(id(node))
                if node.name in residual:
                    branch = [i for i, x in enumerate(node.inputs) if x is t]
                    if len(node.inputs) != 2 or len(branch) != 1:
                        raise UnsupportedOpError(f"{where}, layer {layer}: residual {node.op} {node.name!r}")
                    hit = (node, 1 - branch[0])
                    break
                queue.extend(node.outputs)
        if hit is None:
            raise UnsupportedOpError(f"{where}, layer {layer}: no residual Add after {name!r}")
        if id(hit[0]) in found and found[id(hit[0])][1] != hit[1]:
            raise UnsupportedOpError(
                f"{where}, layer {layer}: {hit[0].name!r} adds two branches of the block"
            )
        found[id(hit[0])] = hit
    return sorted(found.values(), key=lambda h: order[id(h[0])])


def _bypass(graph: gs.Graph, add: gs.Node, stream_index: int) -> None:
    """Make everything that reads `add`'s output read its stream input instead."""
    stream, out = add.inputs[stream_index], add.outputs[0]
    if any(t is out for t in graph.outputs):
        add.op, add.attrs = "Identity", {}
        other = add.inputs[1 - stream_index]
        add.inputs.clear()
        add.inputs.append(stream)
        del other
        return
    for consumer in list(out.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is out:
                consumer.inputs[i] = stream
    add.inputs.clear()
    add.outputs.clear()


def stream_change(model: Model, calib, blocks: dict[int, list[tuple[gs.Node, int]]]) -> dict[int, float]:
    """`‖x_out - x_in‖ / ‖x_in‖` per block over the calibration batches, where `x_in` is the
    stream entering the block's first residual Add and `x_out` leaves its last one."""
    import onnxruntime as ort

    probe = model.copy()
    pnodes = {n.name: n for n in probe.graph.nodes}
    dtype = next(
        (np.dtype(t.dtype) for t in probe.graph.outputs if t.dtype is not None), np.dtype(np.float32)
    )
    taps, outputs = {}, []
    for layer, adds in blocks.items():
        first, stream = adds[0]
        last = adds[-1][0]
        pair = []
        for tensor in (pnodes[first.name].inputs[stream], pnodes[last.name].outputs[0]):
            out = gs.Variable(f"{tensor.name}__stream_tap_{len(outputs)}", dtype=dtype)
            probe.graph.nodes.append(
                gs.Node("Identity", f"stream_tap_{len(outputs)}", inputs=[tensor], outputs=[out])
            )
            outputs.append(out)
            pair.append(out.name)
        taps[layer] = pair
    probe.graph.outputs = outputs
    probe.graph.cleanup().toposort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(
        probe.to_proto().SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    num = dict.fromkeys(blocks, 0.0)
    den = dict.fromkeys(blocks, 0.0)
    names = [o.name for o in outputs]
    for feed in calib.feeds(model):
        values = dict(zip(names, sess.run(names, feed), strict=True))
        for layer, (x_in, x_out) in taps.items():
            a = values[x_in].astype(np.float64)
            b = values[x_out].astype(np.float64)
            num[layer] += float(np.sum((b - a) ** 2))
            den[layer] += float(np.sum(a**2))
    return {layer: math.sqrt(num[layer] / max(den[layer], 1e-30)) for layer in blocks}
