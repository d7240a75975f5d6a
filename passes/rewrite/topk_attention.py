"""Pass `topk_attention`: decode-time top-k attention (SparQ, Ribar et al. 2023).

Per attention site (analysis `attention`, Softmax form) and per query row:

1. pick the `r` channels of q with the largest |q| (SparQ step 1; `r: null` uses all
   channels, i.e. exact scores: oracle top-k);
2. approximate scores `ŝ = q[r] · K[:, r]ᵀ`, passed through the site's own scale and mask
   ops (cloned), so masked positions are never chosen;
3. keep the `k` positions with the largest `ŝ` (`TopK`), and attend exactly to those:
   `logits' = logits + Mbias`, Mbias 0 at the chosen positions, float32 lowest elsewhere.

All standard ops (`Abs`, `TopK`, `ScatterElements`, `MatMul`, `Where`). The portable model
computes the approximate scores as `(q ⊙ onehot(r)) · Kᵀ`, the same values as gathering
the r channels, and applies the selection as a mask: it gives exactly the numbers of
top-k attention but not its memory traffic saving, which needs a gathering kernel.
SparQ's mean-value reallocation is not applied. With `decode_only` (default) the
selection is active only when the step has one query (`Lq == 1`, decode steps of a
KV-cache export); prefill stays dense.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pydantic

from sparsegraph.model import Model
from sparsegraph.pass_manager import Change, PassConfig, PassResult, RewritePass, register

from ..analysis.attention import Attention, AttentionFinding, AttentionSite
from .sparse_attention import OpBuilder, insert_before_softmax, sites_to_change


class TopKAttentionConfig(PassConfig):
    k: int = pydantic.Field(ge=1, description="positions attended per query")
    r: int | None = pydantic.Field(
        None, ge=1, description="query channels used to score (SparQ r); null = all"
    )
    decode_only: bool = pydantic.Field(True, description="select only on single-query (decode) steps")
    layers: list[int] | None = None


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


def _clone_chain(graph: gs.Graph, site: AttentionSite, scores: gs.Tensor, b: OpBuilder) -> gs.Tensor:
    """The site's scale/mask ops applied to `scores` instead of the exact Q·Kᵀ."""
    nodes = {n.name: n for n in graph.nodes}
    mapping = {site.scores: scores}
    out = scores
    for name in site.chain:
        node = nodes[name]
        inputs = [mapping.get(t.name, t) for t in node.inputs]
        out = b.op(node.op, *inputs, **dict(node.attrs))
        mapping[node.outputs[0].name] = out
    return out


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
            ones = b.op("Expand", b.const(1.0, np.float32), b.op("Shape", top))
            hits = b.op("ScatterElements", b.op("ConstantOfShape", b.op("Shape", approx)), top, ones, axis=-1)
            keep = b.op("Greater", hits, b.const(0.5, np.float32))
            insert_before_softmax(graph, softmax, b.bias(keep), b)
            changes.append(Change(site.node, "topk_attention", {"layer": site.layer, "k": c.k, "r": c.r}))
        return PassResult(True, changes, warnings)


__all__ = ["TopKAttention", "TopKAttentionConfig", "topk_attention_mask"]
