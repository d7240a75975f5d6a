"""Pass `sparse_attention`: sparse attention patterns inserted as additive masks.

Each recognised attention site (analysis `attention`, Softmax form) gets
`logits' = Add(logits, Mbias)` directly before its Softmax, after any existing scale and
mask. `Mbias` is 0 where a position is kept and `np.finfo(np.float32).min` where it is
dropped, broadcastable to `[B, H, Lq, Lk]`; the Softmax then gives exact zeros there, so
the portable model is exact sparse attention in stock onnxruntime.

Positions come from the logits' own shape: `Lq = shape[-2]`, `Lk = shape[-1]`, query `i`
sits at absolute position `Lk - Lq + i` (queries are the last `Lq` keys: prefill, and
decode steps with a full KV cache; not a cache pruned by `kv_cache`, whose slots no
longer hold consecutive positions) and key `j` at `j`. For static patterns `Mbias` is built
from `Shape`/`Range`/comparisons/`Where` only, so once a compiler fixes the shapes and
folds constants it is a constant `[Lq, Lk]` tensor; `pattern_mask` computes the same mask
in numpy (True = kept) and is the reference both sides agree on.

Patterns (q, k absolute positions):
- `window` (Longformer, Beltagy et al. 2020): keep `|q - k| < window`, plus `globals`
  global tokens (`k < globals` or `q < globals`); under a causal mask this is a sliding
  window with attention sinks.
- `strided` (Sparse Transformer, Child et al. 2019): keep `|q - k| < stride` or
  `|q - k| % stride == 0`, plus globals.
- `block` (BigBird, Zaheer et al. 2020): keep `layout[q // b, k // b]` for a block layout,
  given (`layout`, a 0/1 matrix of query blocks × key blocks) or BigBird's (`block_window`
  neighbouring blocks, `block_globals` global blocks, `block_random` random blocks per row,
  seeded) over `max_len` positions. Positions beyond the layout are an onnxruntime error.
- `dynamic_block` (training-free block top-k for prefill, after MInference, Jiang et al.
  2024, and SeerAttention, Gao et al. 2024): see `dynamic_block_mask`; computed at run time.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import onnx_graphsurgeon as gs
import pydantic

from sparsegraph.errors import UnsupportedOpError
from sparsegraph.model import Model
from sparsegraph.pass_manager import Change, PassConfig, PassResult, RewritePass, register

from ..analysis.attention import Attention, AttentionFinding, AttentionSite

NEG = np.float32(np.finfo(np.float32).min)


class SparseAttentionConfig(PassConfig):
    pattern: Literal["window", "strided", "block", "dynamic_block"]
    window: int = pydantic.Field(64, ge=1, description="window: keep |q - k| < window")
    globals: int = pydantic.Field(0, ge=0, description="window/strided: global tokens (attention sinks)")
    stride: int = pydantic.Field(16, ge=1, description="strided: local width and stride")
    block_size: int = pydantic.Field(16, ge=1, description="block/dynamic_block: block edge in positions")
    layout: list[list[int]] | None = pydantic.Field(None, description="block: explicit 0/1 block layout")
    block_window: int = pydantic.Field(3, ge=1, description="block (BigBird): neighbouring blocks kept")
    block_globals: int = pydantic.Field(1, ge=0, description="block (BigBird): global blocks")
    block_random: int = pydantic.Field(0, ge=0, description="block (BigBird): random blocks per row")
    max_len: int = pydantic.Field(2048, ge=1, description="block: positions the generated layout covers")
    seed: int = 0
    keep_ratio: float | None = pydantic.Field(
        None, gt=0, le=1, description="dynamic_block: fraction of the allowed key blocks kept per query block"
    )
    top_k_blocks: int | None = pydantic.Field(
        None, ge=1, description="dynamic_block: key blocks kept per query block"
    )
    layers: list[int] | None = pydantic.Field(None, description="attention layers to change (default all)")

    @pydantic.model_validator(mode="after")
    def _check(self):
        if self.pattern == "dynamic_block" and (self.keep_ratio is None) == (self.top_k_blocks is None):
            raise ValueError("dynamic_block needs exactly one of keep_ratio and top_k_blocks")
        if self.layout is not None:
            rows = {len(r) for r in self.layout}
            if len(rows) != 1 or not self.layout:
                raise ValueError("layout must be a non-empty rectangular 0/1 matrix")
        return self


# ----------------------------------------------------------------------------- the patterns
def _config(pattern_config: Any) -> SparseAttentionConfig:
    if isinstance(pattern_config, SparseAttentionConfig):
        return pattern_config
    return SparseAttentionConfig.model_validate(dict(pattern_config))


def block_layout(pattern_config: Any) -> np.ndarray:
    """The `[query blocks, key blocks]` bool layout of the `block` pattern (BigBird's when none
    is given: `block_window` blocks around the diagonal, `block_globals` global rows and
    columns, `block_random` seeded random key blocks per query block)."""
    c = _config(pattern_config)
    if c.layout is not None:
        return np.asarray(c.layout, dtype=bool)
    nb = math.ceil(c.max_len / c.block_size)
    i, j = np.arange(nb)[:, None], np.arange(nb)[None, :]
    layout = (np.abs(i - j) <= c.block_window // 2) | (i < c.block_globals) | (j < c.block_globals)
    rng = np.random.default_rng(c.seed)
    for row in range(nb):
        if c.block_random:
            layout[row, rng.choice(nb, size=min(c.block_random, nb), replace=False)] = True
    return layout


def pattern_mask(pattern_config: Any, lq: int, lk: int, q_offset: int | None = None) -> np.ndarray:
    """Keep-mask `[lq, lk]` (True = kept) of a static pattern; query `i` is at position
    `q_offset + i` (default `lk - lq`), key `j` at `j`. The graph's `Mbias` is exactly
    `np.where(pattern_mask(...), 0, finfo(float32).min)`. Causality is not part of the
    pattern (the model's own mask applies)."""
    c = _config(pattern_config)
    off = lk - lq if q_offset is None else q_offset
    q = np.arange(off, off + lq)[:, None]
    k = np.arange(lk)[None, :]
    dist = np.abs(q - k)
    if c.pattern == "window":
        keep = dist < c.window
    elif c.pattern == "strided":
        keep = (dist < c.stride) | (dist % c.stride == 0)
    elif c.pattern == "block":
        layout = block_layout(c)
        qb, kb = q // c.block_size, k // c.block_size
        if qb.max(initial=0) >= layout.shape[0] or kb.max(initial=0) >= layout.shape[1]:
            raise ValueError(f"block layout {layout.shape} does not cover {off + lq} x {lk} positions")
        keep = layout[qb, kb]
    else:
        raise ValueError(f"pattern {c.pattern!r} is computed at run time; see dynamic_block_mask")
    if c.pattern in ("window", "strided") and c.globals:
        keep = keep | (k < c.globals) | (q < c.globals)
    return np.broadcast_to(keep, (lq, lk)).copy()


def dynamic_block_mask(
    q: np.ndarray, kt: np.ndarray, block: int, keep_ratio: float | None, top_k: int | None, causal: bool
) -> np.ndarray:
    """Training-free dynamic block selection (MInference, Jiang et al. 2024; SeerAttention,
    Gao et al. 2024): mean-pool Q `[..., Lq, d]` over blocks of `block` queries and Kᵀ
    `[..., d, Lk]` over blocks of `block` keys (by absolute position, queries at
    `Lk - Lq + i`), score blocks by `Q̄ K̄ᵀ`, and per query block keep the top
    `max(1, ceil(keep_ratio * n_allowed))` (or `top_k`) key blocks among those allowed (all,
    or with `causal` those starting at or before the block's last query), plus always key
    block 0 (sink) and the key blocks overlapping the query block (diagonal). Returns the
    keep-mask `[..., Lq, Lk]` (the graph computes the same with standard ops)."""
    lq, lk = q.shape[-2], kt.shape[-1]
    off = lk - lq
    nq, nk = math.ceil(lq / block), math.ceil(lk / block)
    pq = (np.arange(lq)[None, :] // block == np.arange(nq)[:, None]).astype(np.float32)
    pk = (np.arange(lk)[None, :] // block == np.arange(nk)[:, None]).astype(np.float32)
    pq /= pq.sum(1, keepdims=True)
    pk /= pk.sum(1, keepdims=True)
    s = (pq @ q) @ (kt @ pk.T)  # [..., nq, nk]
    qmin = off + np.arange(nq)[:, None] * block
    qmax = off + np.minimum((np.arange(nq)[:, None] + 1) * block, lq) - 1
    kb = np.arange(nk)[None, :]
    allowed = (kb * block <= qmax) if causal else np.ones((nq, nk), bool)
    forced = (kb == 0) | ((kb * block <= qmax) & ((kb + 1) * block > qmin))
    s = np.where(allowed, s, NEG)
    order = np.argsort(-s, axis=-1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(nk), order.shape), axis=-1)
    n_allowed = allowed.sum(-1, keepdims=True)
    k_row = (
        np.maximum(1, np.ceil(keep_ratio * n_allowed)) if top_k is None else np.full_like(n_allowed, top_k)
    )
    keep_b = ((rank < k_row) & allowed) | forced
    qb = np.arange(lq) // block
    kbp = np.arange(lk) // block
    return np.take(np.take(keep_b, qb, axis=-2), kbp, axis=-1)


# ----------------------------------------------------------------------- graph building
class OpBuilder:
    """Appends standard ops to a graph with fresh tensor names (`<prefix>/<n>`)."""

    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph, self.prefix, self.n = graph, prefix, 0
        taken = set(graph.tensors())
        while any(name.startswith(prefix + "/") for name in taken):
            self.prefix = prefix = prefix + "_"

    def _name(self) -> str:
        self.n += 1
        return f"{self.prefix}/{self.n}"

    def const(self, value, dtype=np.int64) -> gs.Constant:
        return gs.Constant(self._name(), np.asarray(value, dtype=dtype))

    def op(self, op: str, *inputs, n_out: int = 1, **attrs):
        inputs = [i if isinstance(i, gs.Tensor) else self.const(i) for i in inputs]
        outs = [gs.Variable(self._name()) for _ in range(n_out)]
        self.graph.nodes.append(gs.Node(op, self._name(), attrs, inputs, outs))
        return outs[0] if n_out == 1 else outs

    def dim(self, tensor: gs.Tensor, axis: int) -> gs.Variable:
        """`tensor.shape[axis]` as an int64 scalar."""
        return self.op("Gather", self.op("Shape", tensor), self.const(axis), axis=0)

    def shape_part(self, tensor: gs.Tensor, start: int, end: int | None = None) -> gs.Variable:
        """`tensor.shape[start:end]` as int64 [n] (Slice of Shape: opset 13 has no Shape start/end)."""
        end = np.iinfo(np.int64).max if end is None else end
        return self.op(
            "Slice", self.op("Shape", tensor), self.const([start]), self.const([end]), self.const([0])
        )

    def positions(self, logits: gs.Tensor) -> tuple[gs.Variable, gs.Variable, gs.Variable, gs.Variable]:
        """(query positions [Lq, 1], key positions [1, Lk], Lq, Lk) of a `[..., Lq, Lk]` tensor."""
        lq, lk = self.dim(logits, -2), self.dim(logits, -1)
        off = self.op("Sub", lk, lq)
        qpos = self.op("Unsqueeze", self.op("Range", off, lk, self.const(1)), self.const([1]))
        kpos = self.op("Unsqueeze", self.op("Range", self.const(0), lk, self.const(1)), self.const([0]))
        return qpos, kpos, lq, lk

    def bias(self, keep: gs.Tensor) -> gs.Variable:
        """0 where `keep`, float32 lowest elsewhere."""
        return self.op("Where", keep, self.const(0.0, np.float32), self.const(NEG, np.float32))


def insert_before_softmax(graph: gs.Graph, softmax: gs.Node, bias: gs.Tensor, b: OpBuilder) -> None:
    """Make `softmax` read `Add(its input, bias)`."""
    softmax.inputs[0] = b.op("Add", softmax.inputs[0], bias)


def sites_to_change(
    finding: AttentionFinding, layers: list[int] | None, pass_name: str
) -> tuple[list[AttentionSite], list[str]]:
    """Softmax-form sites in `layers` (all by default); fused ops and Softmax nodes that are
    not attention are left alone with a warning."""
    fused = [s for s in finding.sites if s.kind != "softmax"]
    warnings = [
        f"{s.node}: fused {s.kind} left unchanged ({pass_name} rewrites the Softmax form only)" for s in fused
    ] + [f"{node}: Softmax left unchanged, not attention ({reason})" for node, reason in finding.unrecognised]
    sites = [s for s in finding.sites if s.kind == "softmax" and (layers is None or s.layer in layers)]
    if layers is not None:
        missing = sorted(set(layers) - {s.layer for s in finding.sites})
        if missing:
            raise UnsupportedOpError(f"pass {pass_name!r}: no attention layer {missing} in this model")
    if not sites:
        raise UnsupportedOpError(
            f"pass {pass_name!r}: no attention (Softmax between two activation MatMuls) to rewrite"
            + (f"; {len(fused)} fused attention ops are not supported" if fused else "")
        )
    return sites, warnings


def static_keep(c: SparseAttentionConfig, qpos, kpos, b: OpBuilder) -> gs.Variable:
    """The graph form of `pattern_mask`: bool `[Lq, Lk]` from position tensors."""
    dist = b.op("Abs", b.op("Sub", qpos, kpos))
    if c.pattern == "window":
        keep = b.op("Less", dist, b.const(c.window))
    elif c.pattern == "strided":
        local = b.op("Less", dist, b.const(c.stride))
        step = b.op("Equal", b.op("Mod", dist, b.const(c.stride)), b.const(0))
        keep = b.op("Or", local, step)
    else:
        layout = b.const(block_layout(c), np.bool_)
        qb = b.op("Div", qpos, b.const(c.block_size))  # [Lq, 1]
        kb = b.op("Div", kpos, b.const(c.block_size))  # [1, Lk]
        rows = b.op("Gather", layout, b.op("Squeeze", qb, b.const([1])), axis=0)  # [Lq, nb]
        return b.op("Gather", rows, b.op("Squeeze", kb, b.const([0])), axis=1)  # [Lq, Lk]
    if c.globals:
        g = b.op("Or", b.op("Less", kpos, b.const(c.globals)), b.op("Less", qpos, b.const(c.globals)))
        keep = b.op("Or", keep, g)
    return keep


def dynamic_keep(c: SparseAttentionConfig, site: AttentionSite, tensors, logits, b: OpBuilder) -> gs.Variable:
    """The graph form of `dynamic_block_mask`: bool `[..., Lq, Lk]` computed at run time."""
    q, kt = tensors[site.q], tensors[site.k]
    _, kpos, lq, lk = b.positions(logits)
    bs = b.const(c.block_size)
    one = b.const(1)
    nq = b.op("Div", b.op("Add", lq, b.const(c.block_size - 1)), bs)
    nk = b.op("Div", b.op("Add", lk, b.const(c.block_size - 1)), bs)
    qloc = b.op("Range", b.const(0), lq, one)
    qb_of = b.op("Div", qloc, bs)  # [Lq] local query block
    kb_of = b.op("Div", b.op("Squeeze", kpos, b.const([0])), bs)  # [Lk]

    def pool(of, n):  # [n, L] mean-pooling matrix
        eq = b.op(
            "Cast",
            b.op(
                "Equal",
                b.op("Unsqueeze", of, b.const([0])),
                b.op("Unsqueeze", b.op("Range", b.const(0), n, one), b.const([1])),
            ),
            to=1,
        )
        return b.op("Div", eq, b.op("ReduceSum", eq, b.const([1]), keepdims=1))

    pq, pk = pool(qb_of, nq), pool(kb_of, nk)
    qbar = b.op("MatMul", pq, q)  # [..., nq, d]
    kbar = b.op("MatMul", kt, b.op("Transpose", pk, perm=[1, 0]))  # [..., d, nk]
    s = b.op("MatMul", qbar, kbar)  # [..., nq, nk]
    off = b.op("Sub", lk, lq)
    qblk = b.op("Unsqueeze", b.op("Range", b.const(0), nq, one), b.const([1]))  # [nq, 1]
    qmin = b.op("Add", off, b.op("Mul", qblk, bs))
    qmax = b.op("Sub", b.op("Add", off, b.op("Min", b.op("Mul", b.op("Add", qblk, one), bs), lq)), one)
    kblk = b.op("Unsqueeze", b.op("Range", b.const(0), nk, one), b.const([0]))  # [1, nk]
    kstart = b.op("Mul", kblk, bs)
    before = b.op("LessOrEqual", kstart, qmax)  # [nq, nk]
    allowed = before if site.causal else b.op("Or", before, b.op("Not", before))
    forced = b.op(
        "Or",
        b.op("Equal", kblk, b.const(0)),
        b.op("And", before, b.op("Greater", b.op("Add", kstart, bs), qmin)),
    )
    s = b.op("Where", allowed, s, b.const(NEG, np.float32))
    _, order = b.op("TopK", s, b.op("Unsqueeze", nk, b.const([0])), n_out=2, axis=-1, largest=1, sorted=1)
    ranks = b.op("Expand", b.op("Range", b.const(0), nk, one), b.op("Shape", order))
    rank = b.op("ScatterElements", b.op("Mul", order, b.const(0)), order, ranks, axis=-1)
    n_allowed = b.op("ReduceSum", b.op("Cast", allowed, to=1), b.const([-1]), keepdims=1)  # [nq, 1]
    if c.top_k_blocks is not None:
        k_row = b.const(c.top_k_blocks)
    else:
        k_row = b.op(
            "Max",
            b.op("Cast", b.op("Ceil", b.op("Mul", n_allowed, b.const(c.keep_ratio, np.float32))), to=7),
            b.const(1),
        )
    keep_b = b.op("Or", b.op("And", b.op("Less", rank, k_row), allowed), forced)  # [..., nq, nk]
    rows = b.op("Gather", keep_b, qb_of, axis=-2)
    return b.op("Gather", rows, kb_of, axis=-1)


@register
class SparseAttention(RewritePass):
    """Insert a sparse attention pattern (window, strided, block, dynamic block top-k) as an
    additive mask before every attention Softmax; exact in onnxruntime."""

    name = "sparse_attention"
    Config = SparseAttentionConfig
    requires = (Attention,)

    def run(self, model: Model, ctx) -> PassResult:
        c: SparseAttentionConfig = self.config
        finding: AttentionFinding = ctx.get(Attention, model)
        sites, warnings = sites_to_change(finding, c.layers, self.name)
        graph = model.graph
        nodes = {n.name: n for n in graph.nodes}
        tensors = graph.tensors()
        changes = []
        for site in sites:
            softmax = nodes[site.node]
            logits = softmax.inputs[0]
            b = OpBuilder(graph, f"sparse_attention.{site.layer}")
            if c.pattern == "dynamic_block":
                keep = dynamic_keep(c, site, tensors, logits, b)
            else:
                qpos, kpos, _, _ = b.positions(logits)
                keep = static_keep(c, qpos, kpos, b)
            insert_before_softmax(graph, softmax, b.bias(keep), b)
            detail = {"pattern": c.pattern, "layer": site.layer, "causal": site.causal}
            changes.append(Change(site.node, "sparse_attention", detail))
        return PassResult(True, changes, warnings)


__all__ = [
    "NEG",
    "OpBuilder",
    "SparseAttention",
    "SparseAttentionConfig",
    "block_layout",
    "dynamic_block_mask",
    "insert_before_softmax",
    "pattern_mask",
    "sites_to_change",
]
