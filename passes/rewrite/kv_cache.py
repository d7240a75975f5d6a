"""Pass `kv_cache`: bounded KV cache by eviction, as a rewrite of KV-cache exports.

For every attention site with a KV cache (analysis `attention`: a `Concat` of a past
input with the new K/V that is a graph output), the step still attends to the whole
`past + new` cache, but the `present` key/value outputs are cut to at most `budget`
positions, so a decode loop that feeds present back as past holds at most
`budget + step length` positions at any sequence length.

Policies:
- `window_sink` (StreamingLLM, Xiao et al. 2023): keep the first `sinks` positions
  (attention sinks) and the last `budget - sinks`.
- `heavy_hitter` (H2O, Zhang et al. 2023): keep the last `recent` positions (default
  `budget // 2`) and, among the older ones, the `budget - recent` with the largest
  attention accumulated over all steps so far, per KV head (summed over the query heads
  of its group and the step's queries). This adds one state pair per layer:
  input `past_attn_score.<layer>` float32 `[batch, kv_heads, past_len]` and output
  `present_attn_score.<layer>` `[batch, kv_heads, kept]`, fed back like the cache (zeros of
  length 0 at the first step). Kept positions stay in their original order.

Positions and masks: the model keeps reading its `position_ids` input for RoPE, so the
caller feeds absolute positions (`past tokens seen + i`); cached keys keep the rotation of
their original position. The `attention_mask` input must cover the *kept* cache plus the
new tokens (`kept_len + step_len` ones). `sparsegraph.decode.KVDecoder` drives such a loop.
The pass records the state pairs in the model metadata `sparsegraph.kv_cache` (JSON).
Batches are evicted per row and head alike, so left padding is not supported (feed
unpadded rows).
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs
import pydantic

from sparsegraph.errors import UnsupportedOpError
from sparsegraph.model import Model
from sparsegraph.pass_manager import Change, PassConfig, PassResult, RewritePass, register

from ..analysis.attention import Attention, AttentionFinding, AttentionSite
from .sparse_attention import OpBuilder

METADATA_KEY = "sparsegraph.kv_cache"


class KVCacheConfig(PassConfig):
    policy: Literal["window_sink", "heavy_hitter"]
    budget: int = pydantic.Field(ge=1, description="positions kept in the present cache")
    sinks: int = pydantic.Field(4, ge=0, description="window_sink: first positions always kept")
    recent: int | None = pydantic.Field(None, ge=0, description="heavy_hitter: last positions always kept")

    @pydantic.model_validator(mode="after")
    def _check(self):
        if self.policy == "window_sink" and self.sinks > self.budget:
            raise ValueError(f"sinks ({self.sinks}) exceeds budget ({self.budget})")
        if self.recent is not None and self.recent > self.budget:
            raise ValueError(f"recent ({self.recent}) exceeds budget ({self.budget})")
        return self


def window_sink_indices(length: int, budget: int, sinks: int) -> np.ndarray:
    """Positions StreamingLLM keeps out of `length`: the first `sinks` and the last `budget - sinks`."""
    if length <= budget:
        return np.arange(length)
    return np.concatenate([np.arange(sinks), np.arange(length - (budget - sinks), length)])


def heavy_hitter_indices(scores: np.ndarray, budget: int, recent: int) -> np.ndarray:
    """Positions H2O keeps given accumulated attention `scores[..., L]`: the last `recent`
    and the `budget - recent` highest-scoring older ones, in position order (`[..., kept]`)."""
    length = scores.shape[-1]
    r = min(recent, length)
    cand = length - r
    kh = min(budget - recent, cand)
    top = np.sort(np.argsort(-scores[..., :cand], axis=-1, kind="stable")[..., :kh], axis=-1)
    tail = np.broadcast_to(np.arange(cand, length), (*scores.shape[:-1], r))
    return np.concatenate([top, tail], axis=-1)


def _unsqueeze0(b: OpBuilder, scalar):
    return b.op("Unsqueeze", scalar, b.const([0]))


def _replace_output(graph: gs.Graph, full: gs.Tensor, bounded: gs.Variable) -> None:
    """Make `bounded` the graph output that `full` was, under `full`'s name."""
    name = full.name
    full.name = name + ".unbounded"
    bounded.name, bounded.dtype = name, full.dtype
    if full.shape is not None:
        bounded.shape = [d if i != len(full.shape) - 2 else "kv_kept" for i, d in enumerate(full.shape)]
    graph.outputs = [bounded if t is full else t for t in graph.outputs]


@register
class KVCache(RewritePass):
    """Bound the KV cache to `budget` positions: window + attention sinks (StreamingLLM) or
    heavy hitters + recent window (H2O); adds a score state per layer for heavy_hitter."""

    name = "kv_cache"
    Config = KVCacheConfig
    requires = (Attention,)

    def run(self, model: Model, ctx) -> PassResult:
        c: KVCacheConfig = self.config
        finding: AttentionFinding = ctx.get(Attention, model)
        sites = [s for s in finding.sites if s.kind == "softmax" and s.has_kv_cache]
        warnings = [f"{s.node}: fused {s.kind} left unchanged" for s in finding.sites if s.kind != "softmax"]
        if not sites:
            raise UnsupportedOpError(
                f"pass {self.name!r} on {model.name}: no attention site with a KV cache (past input Concat"
                " → present output)"
            )
        graph = model.graph
        tensors = graph.tensors()
        states, changes = [], []
        for site in sites:
            b = OpBuilder(graph, f"kv_cache.{site.layer}")
            full_k, full_v = tensors[site.present_key], tensors[site.present_value]
            axis = site.kv_concat_axis if site.kv_concat_axis is not None else -2
            rank = len(full_k.shape) if full_k.shape is not None else None
            if c.policy == "window_sink":
                bounded = [self._window_sink(b, t, axis) for t in (full_k, full_v)]
            else:
                if rank != 4 or axis not in (2, -2):
                    raise UnsupportedOpError(
                        f"pass {self.name!r}: {site.node}: heavy_hitter needs a [batch, heads, len, d] cache"
                    )
                bounded, score_pair = self._heavy_hitter(b, graph, site, tensors, full_k, full_v)
            for full, new in zip((full_k, full_v), bounded, strict=True):
                _replace_output(graph, full, new)
            states += [[site.past_key, site.present_key], [site.past_value, site.present_value]]
            if c.policy == "heavy_hitter":
                states.append(score_pair)
            changes.append(Change(site.node, "kv_cache", {"layer": site.layer, **c.model_dump()}))
        model.meta.metadata_props[METADATA_KEY] = json.dumps({**c.model_dump(), "states": states})
        return PassResult(True, changes, warnings)

    def _window_sink(self, b: OpBuilder, full: gs.Tensor, axis: int) -> gs.Variable:
        c = self.config
        length = b.dim(full, axis)
        sinks = b.op("Min", length, b.const(c.sinks))
        start = b.op("Max", b.op("Sub", length, b.const(c.budget - c.sinks)), sinks)
        ax = b.const([axis])
        head = b.op("Slice", full, b.const([0]), _unsqueeze0(b, sinks), ax)
        tail = b.op("Slice", full, _unsqueeze0(b, start), _unsqueeze0(b, length), ax)
        return b.op("Concat", head, tail, axis=axis)

    def _heavy_hitter(self, b, graph, site: AttentionSite, tensors, full_k, full_v):
        c = self.config
        recent = c.budget // 2 if c.recent is None else c.recent
        probs = tensors[site.probs]
        kvh = b.dim(full_k, 1)
        lk = b.dim(probs, -1)
        grouped = b.op(
            "Concat",
            _unsqueeze0(b, b.dim(probs, 0)),
            _unsqueeze0(b, kvh),
            b.const([-1]),
            _unsqueeze0(b, lk),
            axis=0,
        )
        step = b.op("ReduceSum", b.op("Reshape", probs, grouped), b.const([2]), keepdims=0)  # [B, kvh, Lk]
        past = gs.Variable(
            f"past_attn_score.{site.layer}", np.float32, [full_k.shape[0], full_k.shape[1], "past_len"]
        )
        graph.inputs.append(past)
        grow = b.op("Sub", lk, b.dim(past, 2))
        pads = b.op("Concat", b.const([0, 0, 0, 0, 0]), _unsqueeze0(b, grow), axis=0)
        acc = b.op("Add", step, b.op("Pad", past, pads))
        r = b.op("Min", lk, b.const(recent))
        cand = b.op("Sub", lk, r)
        kh = b.op("Min", cand, b.const(c.budget - recent))
        cand_scores = b.op("Slice", acc, b.const([0]), _unsqueeze0(b, cand), b.const([2]))
        _, top = b.op("TopK", cand_scores, _unsqueeze0(b, kh), n_out=2, axis=-1, largest=1, sorted=1)
        ordered, _ = b.op(
            "TopK", b.op("Cast", top, to=1), _unsqueeze0(b, kh), n_out=2, axis=-1, largest=0, sorted=1
        )
        top = b.op("Cast", ordered, to=7)
        tail_shape = b.op("Concat", b.shape_part(top, 0, 2), _unsqueeze0(b, r), axis=0)
        tail = b.op("Expand", b.op("Range", cand, lk, b.const(1)), tail_shape)
        idx = b.op("Concat", top, tail, axis=-1)  # [B, kvh, kept]
        gather_shape = b.op("Concat", b.op("Shape", idx), b.shape_part(full_k, 3), axis=0)
        idx4 = b.op("Expand", b.op("Unsqueeze", idx, b.const([-1])), gather_shape)
        bounded = [b.op("GatherElements", t, idx4, axis=2) for t in (full_k, full_v)]
        kept = b.op("GatherElements", acc, idx, axis=2)
        present = gs.Variable(
            f"present_attn_score.{site.layer}", np.float32, [full_k.shape[0], full_k.shape[1], "kv_kept"]
        )
        graph.nodes.append(gs.Node("Identity", b._name(), {}, [kept], [present]))
        graph.outputs.append(present)
        return bounded, [past.name, present.name]


__all__ = ["METADATA_KEY", "KVCache", "KVCacheConfig", "heavy_hitter_indices", "window_sink_indices"]
