"""Analysis `attention`: every attention site of a graph, found by data flow.

A *site* is either

- a `Softmax` over the last axis whose input chain reaches a MatMul of two activations
  (scores `Q·Kᵀ`) and whose output reaches a second one (`P·V`), with only elementwise
  ops (scale `Mul`/`Div`, mask `Add`/`Where`, `Cast`) between the scores and the Softmax;
  the MatMul walks are `roles`' own helpers, so both analyses agree on what is attention;
- a fused `Attention` / `MultiHeadAttention` / `GroupQueryAttention` node (ai.onnx or
  `com.microsoft`), read from its inputs, outputs and attributes.

Per site it records the q / kᵀ / v / scores / logits (Softmax input) / probs (the tensor
entering `P·V`) / output tensor names, the constant scale, the mask inputs and whether a
causal mask is among them (a `Trilu`, or a comparison of two `Range`-derived position
tensors, upstream of a mask input), heads and KV heads where shapes prove them, a GQA
repeat (`Expand` on the K/V path), and the KV cache: the `Concat` of a graph input
(past) with the new K or V whose output is a graph output (present). Names are only
reported, never interpreted. Softmax nodes that are not attention are listed in
`unrecognised` with the reason.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sparsegraph.model import Model, constant_value, producer
from sparsegraph.pass_manager import AnalysisPass, register

from .roles import FUSED_ATTENTION, SHAPE_OPS, _RoleFinder
from .sparsifiable import SparsifiableOps

#: ops allowed between the scores MatMul and the Softmax (scale, mask, dtype changes)
CHAIN_OPS = {"Mul", "Div", "Add", "Sub", "Where", "Cast", "Identity", "Max", "Min", "Clip", "Tanh"}
#: ops a K/V tensor may pass through between the cache Concat and the attention MatMul
KV_PATH_OPS = {"Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Identity", "Cast", "Mul", "Tile"}
COMPARISONS = {"Less", "LessOrEqual", "Greater", "GreaterOrEqual"}
SEARCH_LIMIT = 256


@dataclass
class AttentionSite:
    """One attention core. Tensor fields are names in the graph; None when absent/unknown."""

    layer: int
    kind: str  # "softmax" or the fused op type ("com.microsoft.GroupQueryAttention", ...)
    node: str  # Softmax node or fused node
    q: str | None = None  # left input of Q·Kᵀ: [..., Lq, d]
    k: str | None = None  # right input of Q·Kᵀ (Kᵀ): [..., d, Lk]
    v: str | None = None  # right input of P·V: [..., Lk, d]
    scores: str | None = None  # Q·Kᵀ output
    logits: str | None = None  # Softmax input (scores after scale and mask)
    probs: str | None = None  # tensor entering P·V (Softmax output, maybe after a NaN guard)
    output: str | None = None  # P·V output (or the fused node's first output)
    qk_matmul: str | None = None
    pv_matmul: str | None = None
    chain: list[str] = field(default_factory=list)  # nodes from the scores to the Softmax input
    scale: float | None = None
    mask_inputs: list[str] = field(default_factory=list)
    causal: bool = False
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    rank: int | None = None  # rank of q (4: [B, H, L, d]; 5: [B, KVH, rep, L, d])
    repeat_kv: bool = False
    past_key: str | None = None
    past_value: str | None = None
    present_key: str | None = None
    present_value: str | None = None
    kv_concat_axis: int | None = None

    @property
    def has_kv_cache(self) -> bool:
        return None not in (self.past_key, self.past_value, self.present_key, self.present_value)


@dataclass
class AttentionFinding:
    """Finding of `attention`: sites in graph order and the Softmax nodes that are not attention."""

    sites: list[AttentionSite]
    unrecognised: list[tuple[str, str]] = field(default_factory=list)  # (node, reason)

    def summary(self) -> dict:
        return {
            "sites": len(self.sites),
            "kinds": sorted({s.kind for s in self.sites}),
            "kv_cache": sum(s.has_kv_cache for s in self.sites),
            "causal": sum(s.causal for s in self.sites),
            "unrecognised": [f"{n}: {r}" for n, r in self.unrecognised],
        }


@register
class Attention(AnalysisPass):
    """Find attention sites (Softmax between two activation MatMuls, fused attention ops) with
    their tensors, scale, causal mask, heads and KV-cache inputs/outputs."""

    name = "attention"
    requires = (SparsifiableOps,)

    def analyze(self, model: Model, ctx) -> AttentionFinding:
        return _SiteFinder(model, ctx.get(SparsifiableOps, model)).run()


class _SiteFinder:
    def __init__(self, model: Model, ops):
        self.graph = model.graph
        self.roles = _RoleFinder(model.graph, ops)  # its MatMul walks define attention
        self.inputs = {id(t) for t in self.graph.inputs}
        self.outputs = {id(t) for t in self.graph.outputs}
        self._shapes: dict[str, list] | None = None
        self._model = model

    # ---------------------------------------------------------------- helpers
    def shape(self, tensor: gs.Tensor) -> list | None:
        """Shape from the graph, else from ONNX shape inference (run once, lazily)."""
        if tensor.shape is not None and all(isinstance(d, int) for d in tensor.shape):
            return list(tensor.shape)
        if self._shapes is None:
            self._shapes = {}
            try:
                proto = onnx.shape_inference.infer_shapes(self._model.to_proto(), data_prop=True)
                for vi in list(proto.graph.value_info) + list(proto.graph.output):
                    dims = vi.type.tensor_type.shape.dim
                    self._shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
            except Exception:  # shape inference is a best effort
                pass
        inferred = self._shapes.get(tensor.name)
        if inferred is not None and (tensor.shape is None or len(inferred) == len(tensor.shape)):
            return [
                i if i is not None else d for i, d in zip(inferred, tensor.shape or inferred, strict=True)
            ]
        return list(tensor.shape) if tensor.shape is not None else None

    # ------------------------------------------------------------------- run
    def run(self) -> AttentionFinding:
        sites, unrecognised = [], []
        for node in self.graph.nodes:
            if node.op == "Softmax":
                site, reason = self._softmax_site(node)
                if site is None:
                    unrecognised.append((node.name, reason))
                    continue
            elif node.op in FUSED_ATTENTION:
                site = self._fused_site(node)
            else:
                continue
            site.layer = len(sites)
            sites.append(site)
        return AttentionFinding(sites, unrecognised)

    def _softmax_site(self, softmax: gs.Node) -> tuple[AttentionSite | None, str]:
        rank = len(softmax.inputs[0].shape) if softmax.inputs[0].shape is not None else None
        axis = softmax.attrs.get("axis", -1)
        if axis != -1 and (rank is None or axis != rank - 1):
            return None, f"Softmax over axis {axis}, not the last axis"
        qk, _ = self.roles._walk_back_to_matmul(softmax.inputs[0])
        if qk is None:
            return None, "no MatMul of two activations (Q·Kᵀ) upstream"
        pv, via = self.roles._walk_forward_to_matmul(softmax.outputs[0])
        if pv is None:
            return None, "no MatMul of two activations (P·V) downstream"
        if via is not pv.inputs[0]:
            return None, "probabilities are not the left operand of P·V"
        chain = self._chain(qk.outputs[0], softmax.inputs[0])
        if chain is None:
            return None, "non-elementwise op between Q·Kᵀ and Softmax"
        site = AttentionSite(
            layer=-1,
            kind="softmax",
            node=softmax.name,
            q=qk.inputs[0].name,
            k=qk.inputs[1].name,
            v=pv.inputs[1].name,
            scores=qk.outputs[0].name,
            logits=softmax.inputs[0].name,
            probs=via.name,
            output=pv.outputs[0].name,
            qk_matmul=qk.name,
            pv_matmul=pv.name,
            chain=[n.name for n in chain],
        )
        on_chain = {id(qk.outputs[0])} | {id(n.outputs[0]) for n in chain}
        masks = []
        for n in chain:
            for t in n.inputs:
                if id(t) in on_chain:
                    continue
                value = constant_value(t)
                if value is not None and value.size == 1 and n.op in ("Mul", "Div"):
                    s = float(value.reshape(()))
                    site.scale = (site.scale or 1.0) * (s if n.op == "Mul" else 1.0 / s)
                elif n.op in ("Add", "Sub", "Where"):
                    masks.append(t)
        site.mask_inputs = [t.name for t in masks]
        site.causal = any(self._is_causal(t) for t in masks)
        for side in (qk.inputs[0], qk.inputs[1]):  # a d^-1/4 scale on each of Q and K (sdpa export)
            node = producer(side)
            if node is not None and node.op in ("Mul", "Div"):
                for t in node.inputs[1:]:
                    value = constant_value(t)
                    if value is not None and value.size == 1:
                        s = float(value.reshape(()))
                        site.scale = (site.scale or 1.0) * (s if node.op == "Mul" else 1.0 / s)
        self._heads(site, qk, pv)
        self._kv_cache(site, qk.inputs[1], pv.inputs[1])
        return site, ""

    def _chain(self, scores: gs.Tensor, logits: gs.Tensor) -> list[gs.Node] | None:
        """Nodes from the scores to the Softmax input, in order, if all are elementwise."""
        chain, t = [], logits
        while t is not scores:
            node = producer(t)
            if node is None or node.op not in CHAIN_OPS or len(chain) > 16:
                return None
            chain.append(node)
            nxt = [i for i in node.inputs if self._reaches(scores, i)]
            if len(nxt) != 1:
                return None
            t = nxt[0]
        return chain[::-1]

    def _reaches(self, src: gs.Tensor, dst: gs.Tensor) -> bool:
        queue, seen = deque([dst]), set()
        while queue and len(seen) < 32:
            t = queue.popleft()
            if t is src:
                return True
            node = producer(t)
            if node is None or id(node) in seen or node.op not in CHAIN_OPS:
                continue
            seen.add(id(node))
            queue.extend(node.inputs)
        return False

    def _is_causal(self, mask: gs.Tensor) -> bool:
        """A Trilu, a comparison of two position (Range) tensors, or a constant triangle upstream."""
        queue, seen = deque([mask]), set()
        while queue and len(seen) < SEARCH_LIMIT:
            t = queue.popleft()
            value = constant_value(t)
            if value is not None:
                if value.ndim >= 2 and value.shape[-1] == value.shape[-2] > 1:
                    m = value.reshape(-1, *value.shape[-2:])[0].astype(bool)
                    if np.array_equal(m, np.tril(np.ones_like(m))) or np.array_equal(
                        m, np.triu(np.ones_like(m), 1)
                    ):
                        return True
                continue
            node = producer(t)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op == "Trilu":
                return True
            if node.op in COMPARISONS and all(self._from_range(i) for i in node.inputs):
                return True
            queue.extend(node.inputs)
        return False

    def _from_range(self, tensor: gs.Tensor) -> bool:
        queue, seen = deque([tensor]), set()
        while queue and len(seen) < 32:
            node = producer(queue.popleft())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op == "Range":
                return True
            if node.op in ("Unsqueeze", "Reshape", "Add", "Sub", "Cast", "Expand", "Squeeze", "Identity"):
                queue.extend(
                    node.inputs[:1] if node.op in ("Unsqueeze", "Reshape", "Expand") else node.inputs
                )
        return False

    def _heads(self, site: AttentionSite, qk: gs.Node, pv: gs.Node) -> None:
        q_shape = self.shape(qk.inputs[0])
        site.rank = len(q_shape) if q_shape else None
        if q_shape and isinstance(q_shape[-1], int):
            site.head_dim = q_shape[-1]
        if q_shape and len(q_shape) == 4 and isinstance(q_shape[1], int):
            site.heads = q_shape[1]
        elif q_shape and len(q_shape) == 5 and all(isinstance(d, int) for d in q_shape[1:3]):
            site.heads, site.kv_heads = q_shape[1] * q_shape[2], q_shape[1]  # [B, KVH, rep, T, d]

    def _kv_cache(self, site: AttentionSite, k: gs.Tensor, v: gs.Tensor) -> None:
        for which, tensor in (("key", k), ("value", v)):
            concat, repeat, pre_repeat = self._walk_to_cache(tensor)
            site.repeat_kv = site.repeat_kv or repeat
            if pre_repeat is not None and site.kv_heads is None:
                shape = self.shape(pre_repeat)
                if shape and len(shape) >= 3 and isinstance(shape[1], int):
                    site.kv_heads = shape[1]
            if concat is None:
                continue
            past = next((t for t in concat.inputs if id(t) in self.inputs), None)
            present = concat.outputs[0]
            if past is None or id(present) not in self.outputs:
                continue
            setattr(site, f"past_{which}", past.name)
            setattr(site, f"present_{which}", present.name)
            site.kv_concat_axis = concat.attrs.get("axis")
            shape = self.shape(past)
            if shape and len(shape) == 4 and isinstance(shape[1], int):
                site.kv_heads = shape[1]
        if site.kv_heads is None and site.heads is not None and not site.repeat_kv:
            site.kv_heads = site.heads

    def _walk_to_cache(self, tensor: gs.Tensor) -> tuple[gs.Node | None, bool, gs.Tensor | None]:
        """(cache Concat, whether an Expand/Tile repeat lies on the way, the tensor before it)."""
        repeat, pre, t = False, None, tensor
        for _ in range(16):
            node = producer(t)
            if node is None:
                return None, repeat, pre
            if node.op == "Concat" and any(id(i) in self.inputs for i in node.inputs):
                return node, repeat, pre if repeat else node.outputs[0]
            if node.op not in KV_PATH_OPS:
                return None, repeat, pre
            if node.op in ("Expand", "Tile"):
                repeat, pre = True, node.inputs[0]
                inner = producer(pre)
                if inner is not None and inner.op == "Unsqueeze":
                    pre = inner.inputs[0]
            t = node.inputs[0]
        return None, repeat, pre

    def _fused_site(self, node: gs.Node) -> AttentionSite:
        domain = node.domain or "ai.onnx"
        site = AttentionSite(layer=-1, kind=f"{domain}.{node.op}", node=node.name)
        names = [t.name if t.name else None for t in node.inputs]
        site.q = names[0] if names else None
        site.output = node.outputs[0].name
        heads = node.attrs.get("num_heads", node.attrs.get("q_num_heads"))
        site.heads = int(heads) if heads is not None else None
        kv = node.attrs.get("kv_num_heads")
        site.kv_heads = int(kv) if kv is not None else site.heads
        if node.op == "Attention" and domain == "com.microsoft":
            site.causal = bool(node.attrs.get("unidirectional", 0))
            past = node.inputs[4] if len(node.inputs) > 4 and node.inputs[4].name else None
            present = node.outputs[1] if len(node.outputs) > 1 and node.outputs[1].name else None
            if past is not None and present is not None:  # one stacked [2, B, H, L, d] cache
                site.past_key = site.past_value = past.name
                site.present_key = site.present_value = present.name
            return site
        if node.op == "Attention":  # ai.onnx opset 23: Q, K, V, mask, past_key, past_value
            site.causal = bool(node.attrs.get("is_causal", 0))
            pk, pv = 4, 5
        elif node.op == "GroupQueryAttention":
            site.causal = True  # GQA is causal by definition
            pk, pv = 3, 4
        else:  # MultiHeadAttention: q, k, v, bias, key_padding_mask, attention_bias, past_key, past_value
            site.causal = bool(node.attrs.get("unidirectional", 0))
            pk, pv = 6, 7
        site.k = names[1] if len(names) > 1 else None
        site.v = names[2] if len(names) > 2 else None
        if len(names) > pv and names[pk] and names[pv] and len(node.outputs) >= 3:
            site.past_key, site.past_value = names[pk], names[pv]
            site.present_key, site.present_value = node.outputs[1].name, node.outputs[2].name
        return site


def fused_nodes(finding: AttentionFinding) -> list[str]:
    """Names of fused attention nodes (which mask-based rewrites cannot change)."""
    return [s.node for s in finding.sites if s.kind != "softmax"]


__all__ = ["CHAIN_OPS", "SHAPE_OPS", "Attention", "AttentionFinding", "AttentionSite", "fused_nodes"]
