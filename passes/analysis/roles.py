"""Analysis `roles`: what each weighted op does in a transformer, found from graph structure.

Names are never consulted. The analysis works on data flow only:

1. *Upstream sets.* For every tensor, the set of linear ops reached first when walking
   back along data edges (a linear op's output has just itself; `Shape`/`Size` outputs
   have none, so shape arithmetic never links layers).
2. *Attention.* Each `Softmax` fed by a MatMul of two activations (scores `Q Kᵀ`) and
   feeding a MatMul with a third activation (`P V`) is an attention core; so are the fused
   `Attention` (ai.onnx), `com.microsoft` `MultiHeadAttention`/`GroupQueryAttention` ops.
   The upstream sets of Q, K and V name `attn.q/k/v` (one fused op: `attn.qkv`); the first
   linear ops after the core are `attn.o`. Cores in graph order are the layers.
3. *Residual stream.* An `Add` of two activations with different upstream sets joins a
   block's output into the stream (an `Add` inside a block, e.g. tanh-GELU, mixes
   activations from the same op).
4. *FFN.* Walking forward from a non-attention linear op without crossing the residual
   stream, a normalization or an attention core, the linear ops reached are its `down`
   projections. Feeders whose path holds an activation are `ffn.gate` when another
   feeder has none (`ffn.up`); a single feeder is `ffn.up` (GELU MLP).
5. *Heads.* A linear op after the last layer whose output reaches a graph output without
   an activation is `lm_head` when its N equals an embedding table's row count (or no
   embedding exists), else `head`. Embedding `Gather`s are `embed`.
Layers of FFN ops are the number of attention cores upstream of them, minus one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from sparsegraph.model import Model, constant_value, producer
from sparsegraph.pass_manager import AnalysisPass, register

from .sparsifiable import SparsifiableOps, WeightedOps

ACTIVATIONS = {
    "Sigmoid",
    "Tanh",
    "Relu",
    "Gelu",
    "Erf",
    "Softplus",
    "Elu",
    "Selu",
    "LeakyRelu",
    "HardSigmoid",
    "HardSwish",
    "Mish",
    "Swish",
    "Softsign",
    "PRelu",
    "ThresholdedRelu",
    "Celu",
    "FastGelu",
    "BiasGelu",
    "QuickGelu",
}
NORMALIZATIONS = {
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "RMSNormalization",
    "SkipSimplifiedLayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "BatchNormalization",
}
FUSED_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}
SHAPE_OPS = {"Shape", "Size"}
SEARCH_LIMIT = 256  # nodes visited per local walk


@dataclass
class OpRole:
    role: str  # attn.q, attn.k, attn.v, attn.qkv, attn.o, ffn.up, ffn.gate, ffn.down, lm_head, head, embed
    layer: int | None

    def matches(self, pattern_match) -> bool:
        """True if `pattern_match(role)` holds for the role or one of its fused parts."""
        parts = [self.role]
        if self.role.startswith("attn.") and len(self.role) > 6 and self.role != "attn.o":
            parts += [f"attn.{c}" for c in self.role[5:]]
        return any(pattern_match(p) for p in parts)


@dataclass
class AttentionBlock:
    layer: int
    core: str  # the Softmax or fused attention node
    q: list[str]
    k: list[str]
    v: list[str]
    o: list[str]


@dataclass
class RoleMap:
    """Finding of `roles`: role and layer per weighted op, plus the blocks found."""

    roles: dict[str, OpRole]
    attention: list[AttentionBlock] = field(default_factory=list)
    residual_adds: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def get(self, name: str) -> OpRole | None:
        return self.roles.get(name)

    @property
    def num_layers(self) -> int:
        layers = [r.layer for r in self.roles.values() if r.layer is not None]
        return max(layers) + 1 if layers else 0


@register
class Roles(AnalysisPass):
    """Assign transformer roles (attn.q/k/v/o, ffn.up/gate/down, lm_head, embed) and layer
    indices to weighted ops by structural analysis of the graph."""

    name = "roles"
    requires = (SparsifiableOps,)

    def analyze(self, model: Model, ctx) -> RoleMap:
        ops: WeightedOps = ctx.get(SparsifiableOps, model)
        return _RoleFinder(model.graph, ops).run()


class _RoleFinder:
    def __init__(self, graph: gs.Graph, ops: WeightedOps):
        self.graph = graph
        self.nodes = list(graph.nodes)  # ONNX graphs are topologically sorted
        self.order = {id(n): i for i, n in enumerate(self.nodes)}
        self.linear = [op.name for op in ops.linear]
        self.linear_index = {name: i for i, name in enumerate(self.linear)}
        self.embeds = [op for op in ops if not op.is_linear]
        self.shapes = {op.name: op.shape for op in ops}
        self.graph_outputs = {id(t) for t in graph.outputs}
        self.upstream = self._upstream_sets()
        self.roles: dict[str, OpRole] = {}
        self.notes: list[str] = []
        self.score_nodes: set[int] = set()  # nodes between a scores MatMul and its Softmax

    # -------------------------------------------------------------- data flow
    def _upstream_sets(self) -> dict[int, int]:
        """Bitmask of the first linear ops upstream of each tensor (keyed by id(tensor))."""
        up: dict[int, int] = {}
        for node in self.nodes:
            if node.name in self.linear_index:
                mask = 1 << self.linear_index[node.name]
            elif node.op in SHAPE_OPS:
                mask = 0
            else:
                mask = 0
                for t in node.inputs:
                    mask |= up.get(id(t), 0)
            for t in node.outputs:
                up[id(t)] = mask
        return up

    def _ops_of(self, tensor: gs.Tensor) -> list[str]:
        mask = self.upstream.get(id(tensor), 0)
        return [name for name, i in self.linear_index.items() if mask >> i & 1]

    def _dynamic(self, tensor: gs.Tensor) -> bool:
        return constant_value(tensor) is None and not isinstance(tensor, gs.Constant)

    def _is_dynamic_matmul(self, node: gs.Node) -> bool:
        return (
            node.op == "MatMul"
            and node.name not in self.linear_index
            and all(self._dynamic(t) for t in node.inputs[:2])
        )

    def _is_residual_add(self, node: gs.Node) -> bool:
        if node.op not in ("Add", "Sum") or len(node.inputs) < 2 or id(node) in self.score_nodes:
            return False
        inputs = [t for t in node.inputs if self._dynamic(t)]
        if len(inputs) < 2:
            return False
        sets = {self.upstream.get(id(t), 0) for t in inputs}
        return len(sets) > 1 and any(sets)

    # ------------------------------------------------------------- attention
    def _find_attention(self) -> list[AttentionBlock]:
        cores = []
        for node in self.nodes:
            if node.op == "Softmax":
                block = self._softmax_attention(node)
            elif node.op in FUSED_ATTENTION:
                block = self._fused_attention(node)
            else:
                continue
            if block is not None:
                cores.append(block)
        for i, block in enumerate(cores):
            block.layer = i
        return cores

    def _softmax_attention(self, softmax: gs.Node) -> AttentionBlock | None:
        qk, between = self._walk_back_to_matmul(softmax.inputs[0])
        if qk is None:
            return None
        pv, via = self._walk_forward_to_matmul(softmax.outputs[0])
        if pv is None:
            return None
        self.score_nodes |= between
        v_input = pv.inputs[1] if via is pv.inputs[0] else pv.inputs[0]
        return AttentionBlock(
            layer=-1,
            core=softmax.name,
            q=self._ops_of(qk.inputs[0]),
            k=self._ops_of(qk.inputs[1]),
            v=self._ops_of(v_input),
            o=self._first_linear_after(pv.outputs[0]),
        )

    def _fused_attention(self, node: gs.Node) -> AttentionBlock | None:
        inputs = [t for t in node.inputs[:3] if t.name]  # optional inputs are empty
        if not inputs:
            return None
        q = self._ops_of(inputs[0])
        k = self._ops_of(inputs[1]) if len(inputs) > 1 else q
        v = self._ops_of(inputs[2]) if len(inputs) > 2 else k
        return AttentionBlock(-1, node.name, q, k, v, self._first_linear_after(node.outputs[0]))

    def _walk_back_to_matmul(self, tensor: gs.Tensor) -> tuple[gs.Node | None, set[int]]:
        """Nearest MatMul of two activations upstream of `tensor`, not crossing linear ops,
        and the ids of the nodes visited on the way."""
        queue, seen = deque([tensor]), set()
        while queue and len(seen) < SEARCH_LIMIT:
            t = queue.popleft()
            node = producer(t)
            if node is None or id(node) in seen or node.name in self.linear_index or node.op in SHAPE_OPS:
                continue
            seen.add(id(node))
            if self._is_dynamic_matmul(node):
                return node, seen
            queue.extend(i for i in node.inputs if self._dynamic(i))
        return None, seen

    def _walk_forward_to_matmul(self, tensor: gs.Tensor) -> tuple[gs.Node | None, gs.Tensor | None]:
        """Nearest MatMul of two activations downstream of `tensor`, and the input it arrives by."""
        queue, seen = deque([tensor]), set()
        while queue and len(seen) < SEARCH_LIMIT:
            t = queue.popleft()
            for node in t.outputs:
                if id(node) in seen or node.name in self.linear_index or node.op in SHAPE_OPS:
                    continue
                seen.add(id(node))
                if self._is_dynamic_matmul(node):
                    return node, t
                if node.op not in {"Softmax"} | FUSED_ATTENTION:
                    queue.extend(node.outputs)
        return None, None

    def _first_linear_after(self, tensor: gs.Tensor) -> list[str]:
        return sorted(self._reach(tensor, stop_at_residual=True), key=self.linear_index.get)

    # ---------------------------------------------------------------- forward
    def _reach(self, tensor: gs.Tensor, stop_at_residual: bool) -> dict[str, bool]:
        """Linear ops reached forward from `tensor` -> whether an activation lies on the way."""
        reached: dict[str, bool] = {}
        queue, seen = deque([(tensor, False)]), set()
        while queue and len(seen) < SEARCH_LIMIT:
            t, act = queue.popleft()
            for node in t.outputs:
                if node.name in self.linear_index:
                    reached[node.name] = reached.get(node.name, False) or act
                    continue
                key = (id(node), act)
                if key in seen or node.op in SHAPE_OPS:
                    continue
                seen.add(key)
                if (
                    node.op in NORMALIZATIONS | FUSED_ATTENTION | {"Softmax"}
                    or self._is_dynamic_matmul(node)
                    or (stop_at_residual and self._is_residual_add(node))
                ):
                    continue
                for out in node.outputs:
                    queue.append((out, act or node.op in ACTIVATIONS))
        return reached

    def _reaches_output_passively(self, tensor: gs.Tensor) -> bool:
        queue, seen = deque([tensor]), set()
        while queue and len(seen) < SEARCH_LIMIT:
            t = queue.popleft()
            if id(t) in self.graph_outputs:
                return True
            for node in t.outputs:
                if id(node) in seen or node.name in self.linear_index or node.op in ACTIVATIONS | SHAPE_OPS:
                    continue
                seen.add(id(node))
                queue.extend(node.outputs)
        return False

    # ------------------------------------------------------------------- run
    def run(self) -> RoleMap:
        attention = self._find_attention()
        nodes_by_name = {n.name: n for n in self.nodes}
        for block in attention:
            fused = [name for name in block.q if name in block.k or name in block.v]
            for name in set(block.q + block.k + block.v):
                letters = "".join(
                    c for c, group in zip("qkv", (block.q, block.k, block.v), strict=True) if name in group
                )
                self.roles[name] = OpRole(f"attn.{letters}", block.layer)
            for name in block.o:
                self.roles.setdefault(name, OpRole("attn.o", block.layer))
            if fused:
                self.notes.append(f"layer {block.layer}: fused projection {', '.join(fused)}")

        depth = self._attention_depth(attention)
        self._assign_ffn(nodes_by_name, depth)
        self._assign_heads(nodes_by_name, depth, len(attention))
        for op in self.embeds:
            self.roles[op.name] = OpRole("embed", None)
        residual = [n.name for n in self.nodes if self._is_residual_add(n)]
        if not attention:
            self.notes.append("no attention core found (no Softmax between two activation MatMuls)")
        return RoleMap(self.roles, attention, residual, self.notes)

    def _attention_depth(self, attention: list[AttentionBlock]) -> dict[str, int]:
        """Number of attention cores upstream of each node's inputs, by node name."""
        core_index = {b.core: b.layer + 1 for b in attention}
        depth_t: dict[int, int] = {}
        depth_n: dict[str, int] = {}
        for node in self.nodes:
            d = max((depth_t.get(id(t), 0) for t in node.inputs), default=0)
            depth_n[node.name] = d
            out = max(d, core_index.get(node.name, 0))
            for t in node.outputs:
                depth_t[id(t)] = out
        return depth_n

    def _assign_ffn(self, nodes_by_name: dict[str, gs.Node], depth: dict[str, int]) -> None:
        free = [name for name in self.linear if name not in self.roles]
        feeders: dict[str, dict[str, bool]] = {}
        for name in free:
            for target, act in self._reach(nodes_by_name[name].outputs[0], stop_at_residual=True).items():
                if target in self.roles:  # an attention projection: not an FFN edge
                    continue
                feeders.setdefault(target, {})[name] = act
        downs = [d for d in free if d in feeders]
        for down in sorted(downs, key=self.linear_index.get):
            layer = self._ffn_layer(down, depth)
            self.roles[down] = OpRole("ffn.down", layer)
            group = feeders[down]
            gated = len(group) > 1 and any(group.values()) and not all(group.values())
            for name, act in group.items():
                if name in downs:
                    continue
                role = "ffn.gate" if gated and act else "ffn.up"
                self.roles[name] = OpRole(role, self._ffn_layer(name, depth))

    def _ffn_layer(self, name: str, depth: dict[str, int]) -> int | None:
        d = depth.get(name, 0)
        return d - 1 if d > 0 else None

    def _assign_heads(self, nodes_by_name: dict[str, gs.Node], depth: dict[str, int], n_layers: int) -> None:
        vocab_sizes = {op.shape[0] for op in self.embeds}
        for name in self.linear:
            if name in self.roles:
                continue
            node = nodes_by_name[name]
            if n_layers and depth.get(name, 0) < n_layers:
                continue
            if not self._reaches_output_passively(node.outputs[0]):
                continue
            n_out = self.shapes[name][0]
            self.roles[name] = OpRole("lm_head" if not vocab_sizes or n_out in vocab_sizes else "head", None)
