"""Pass `topk_attention`: decode-time top-k attention (SparQ, Ribar et al. 2023).

Per attention site (analysis `attention`, Softmax form) and per query row:

1. pick the `r` channels of q with the largest |q| (SparQ step 1; `r: null` uses all
   channels, i.e. exact scores: oracle top-k);
2. approximate scores `ŝ = q[r] · K[:, r]ᵀ`, passed through the site's own scale and mask
   ops (cloned), so masked positions are never chosen;
3. keep the `k` positions with the largest `ŝ` (`TopK`), and attend exactly to those:
   `logits' = logits + Mbias`, Mbias 0 at the chosen positions, float32 lowest elsewhere.

All standard ops. The approximate scores are computed as `(q ⊙ onehot(r)) · Kᵀ`, the
same values as gathering the r channels. Two forms of step 3:

- `mode: mask` (default): `logits' = logits + Mbias`, Mbias 0 at the chosen positions and
  float32 lowest elsewhere (`TopK`, `ScatterElements`, `Where`); exact top-k numbers, but the
  full Q·Kᵀ and P·V still run. With `decode_only` (default) the selection is active only
  when the step has one query (`Lq == 1`, decode steps of a KV-cache export); prefill
  stays dense.
- `mode: gather`: the chosen K and V rows are gathered (`GatherND` with batch dims) and
  exact attention runs on those `k` rows only, `softmax(q·K[idx]ᵀ + mask[idx]) · V[idx]`,
  replacing the site's Q·Kᵀ / Softmax / P·V. Every step selects (prefill queries too,
  each its own k keys), so it needs `decode_only: false`. The gathered site is no longer
  one the `attention` analysis recognises, so run `kv_cache` before it, not after.

SparQ's mean-value reallocation is not applied.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs
import pydantic

from sparsegraph.errors import UnsupportedOpError
from sparsegraph.model import Model, constant_value
from sparsegraph.pass_manager import Change, PassConfig, PassResult, RewritePass, register

from ..analysis.attention import Attention, AttentionFinding, AttentionSite
from .sparse_attention import OpBuilder, insert_before_softmax, sites_to_change


class TopKAttentionConfig(PassConfig):
    k: int = pydantic.Field(ge=1, description="positions attended per query")
    r: int | None = pydantic.Field(
        None, ge=1, description="query channels used to score (SparQ r); null = all"
    )
    decode_only: bool = pydantic.Field(True, description="select only on single-query (decode) steps")
    mode: Literal["mask", "gather"] = pydantic.Field(
        "mask",
        description="mask: additive mask before the Softmax; gather: attention over the k gathered rows",
    )
    layers: list[int] | None = None

    @pydantic.model_validator(mode="after")
    def _check(self):
        if self.mode == "gather" and self.decode_only:
            raise ValueError("mode gather selects at every step (prefill too); set decode_only: false")
        return self


def topk_attention_mask(q: np.ndarray, kt: np.ndarray, k: int, r: int | None, bias=None, scale: float = 1.0):
    """numpy reference: keep-mask `[..., Lq, Lk]` of SparQ-style top-k attention for
    q `[..., Lq, d]`, Kᵀ `[..., d, Lk]` (`bias` is added to the scaled approximate scores)."""
    if r is not None and r < q.shape[-1]:
        idx = np.argsort(-np.abs(q), axis=-1, kind="stable")[..., :r]
        onehot = np.zeros_like(q)
        np.put_along_axis(onehot, idx, 1.0, axis=-1)
        q = q * onehot
    s = (q @ kt) * scale
    if bias is not None:
        s = s + bias
    top = np.argsort(-s, axis=-1, kind="stable")[..., : min(k, s.shape[-1])]
    keep = np.zeros(s.shape, bool)
    np.put_along_axis(keep, top, True, axis=-1)
    return keep


def _clone_chain(
    graph: gs.Graph, site: AttentionSite, scores: gs.Tensor, b: OpBuilder, adapt=None
) -> gs.Tensor:
    """The site's scale/mask ops applied to `scores` instead of the exact Q·Kᵀ; `adapt` maps
    each other input that is not a scalar (a mask) to the shape of `scores`."""
    nodes = {n.name: n for n in graph.nodes}
    mapping = {site.scores: scores}
    out = scores
    for name in site.chain:
        node = nodes[name]
        inputs = []
        for t in node.inputs:
            value = constant_value(t)
            if t.name in mapping:
                inputs.append(mapping[t.name])
            elif adapt is None or (value is not None and value.size == 1):
                inputs.append(t)
            else:
                inputs.append(adapt(t))
        out = b.op(node.op, *inputs, **dict(node.attrs))
        mapping[node.outputs[0].name] = out
    return out


def _gather_attention(graph, site: AttentionSite, tensors, nodes, approx, top, b: OpBuilder) -> None:
    """Replace the site's attention by exact attention over the `top` [..., Lq, k] rows of K and V."""
    q, kt, v = tensors[site.q], tensors[site.k], tensors[site.v]
    nb = site.rank - 2  # batch dims (batch, heads, ...)
    batch = b.shape_part(q, 0, nb)
    kt = b.op("Expand", kt, b.op("Concat", batch, b.shape_part(kt, nb), axis=0))  # GQA: one copy per q head
    v = b.op("Expand", v, b.op("Concat", batch, b.shape_part(v, nb), axis=0))
    keys = b.op("Transpose", kt, perm=[*range(nb), nb + 1, nb])  # [..., Lk, d]
    flat = b.op("Unsqueeze", b.op("Reshape", top, b.const([0] * nb + [-1])), b.const([-1]))  # [..., Lq*k, 1]
    rows = b.op("Unsqueeze", b.dim(top, -1), b.const([0]))

    def pick(data):  # [..., Lk, d] -> [..., Lq, k, d]
        got = b.op("GatherND", data, flat, batch_dims=nb)
        shape = b.op("Concat", b.const([0] * nb + [-1]), rows, b.shape_part(data, nb + 1), axis=0)
        return b.op("Reshape", got, shape)

    k_sel, v_sel = pick(keys), pick(v)
    perm = [*range(nb + 1), nb + 2, nb + 1]
    scores = b.op("MatMul", b.op("Unsqueeze", q, b.const([-2])), b.op("Transpose", k_sel, perm=perm))
    scores = b.op("Squeeze", scores, b.const([-2]))  # [..., Lq, k]
    full = b.op("Shape", approx)

    def gather_mask(t):
        return b.op("GatherElements", b.op("Expand", t, full), top, axis=-1)

    probs = b.op("Softmax", _clone_chain(graph, site, scores, b, gather_mask), axis=-1)
    out = b.op("MatMul", b.op("Unsqueeze", probs, b.const([-2])), v_sel)  # [..., Lq, 1, dv]
    pv = nodes[site.pv_matmul]
    result = pv.outputs[0]
    pv.outputs[0] = gs.Variable(result.name + ".dense")
    graph.nodes.append(gs.Node("Squeeze", b._name(), {}, [out, b.const([-2])], [result]))


@register
class TopKAttention(RewritePass):
    """Attend only to the top-k positions of approximate scores from the r largest-|q|
    channels (SparQ); decode steps of KV-cache exports by default."""

    name = "topk_attention"
    Config = TopKAttentionConfig
    requires = (Attention,)

    def run(self, model: Model, ctx) -> PassResult:
        c: TopKAttentionConfig = self.config
        finding: AttentionFinding = ctx.get(Attention, model)
        sites, warnings = sites_to_change(finding, c.layers, self.name)
        graph = model.graph
        nodes = {n.name: n for n in graph.nodes}
        tensors = graph.tensors()
        changes = []
        for site in sites:
            softmax = nodes[site.node]
            b = OpBuilder(graph, f"topk_attention.{site.layer}")
            q, kt = tensors[site.q], tensors[site.k]
            if c.r is not None:
                d = b.dim(q, -1)
                r = b.op("Unsqueeze", b.op("Min", d, b.const(c.r)), b.const([0]))
                _, ch = b.op("TopK", b.op("Abs", q), r, n_out=2, axis=-1, largest=1, sorted=1)
                ones = b.op("Expand", b.const(1.0, np.float32), b.op("Shape", ch))
                onehot = b.op("ScatterElements", b.op("ConstantOfShape", b.op("Shape", q)), ch, ones, axis=-1)
                approx = _clone_chain(graph, site, b.op("MatMul", b.op("Mul", q, onehot), kt), b)
            else:
                approx = softmax.inputs[0]
            lq, lk = b.dim(approx, -2), b.dim(approx, -1)
            k = b.op("Min", lk, b.const(c.k))
            if c.decode_only:
                k = b.op("Where", b.op("Equal", lq, b.const(1)), k, lk)
            _, top = b.op(
                "TopK", approx, b.op("Unsqueeze", k, b.const([0])), n_out=2, axis=-1, largest=1, sorted=0
            )
            if c.mode == "gather":
                if site.rank is None or site.rank < 3:
                    raise UnsupportedOpError(
                        f"pass {self.name!r}: {site.node}: rank of q unknown, cannot gather"
                    )
                _gather_attention(graph, site, tensors, nodes, approx, top, b)
                changes.append(Change(site.node, "topk_attention", {"layer": site.layer, **c.model_dump()}))
                continue
            ones = b.op("Expand", b.const(1.0, np.float32), b.op("Shape", top))
            hits = b.op("ScatterElements", b.op("ConstantOfShape", b.op("Shape", approx)), top, ones, axis=-1)
            keep = b.op("Greater", hits, b.const(0.5, np.float32))
            insert_before_softmax(graph, softmax, b.bias(keep), b)
            changes.append(Change(site.node, "topk_attention", {"layer": site.layer, **c.model_dump()}))
        return PassResult(True, changes, warnings)


__all__ = ["TopKAttention", "TopKAttentionConfig", "topk_attention_mask"]
