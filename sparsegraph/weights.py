"""The constant weight behind a linear op, seen in one canonical orientation.

Every technique works on the weight as a matrix `W[N, K]`: N output features (rows),
K reduction features (columns), which is torch's `Linear.weight` layout. `WeightRef`
maps that view onto what the graph stores: a `MatMul`/`Gemm`/`Conv` weight input or an
embedding `Gather` table, reached from an initializer through any chain of `Transpose`,
`Cast`, `Identity` and `DequantizeLinear` nodes. Masks computed on the canonical view
are written back through the chain (a pruned quantized entry becomes its zero point),
and a weight shared with another op is copied first so that only this op changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .model import constant_value, producer

#: Ops a weight may pass through between its initializer and the op that uses it.
CHAIN_OPS = ("Transpose", "Cast", "Identity", "DequantizeLinear")
LINEAR_OPS = ("MatMul", "Gemm", "Conv")


@dataclass
class WeightRef:
    """The weight input `input_index` of `node`, stored in `source` and reached through `chain`."""

    graph: gs.Graph
    node: gs.Node
    input_index: int
    source: gs.Tensor  # a gs.Constant, or the output of a `Constant` node
    chain: list[gs.Node]  # from the source towards `node`

    # ------------------------------------------------------------------ values
    def stored(self) -> np.ndarray:
        value = constant_value(self.source)
        assert value is not None
        return np.asarray(value)

    def effective(self) -> np.ndarray:
        """The tensor `node` receives (after the chain), as numpy."""
        x = self.stored()
        for n in self.chain:
            if n.op == "Transpose":
                x = np.transpose(x, n.attrs.get("perm"))
            elif n.op == "Cast":
                x = x.astype(_cast_dtype(n.attrs["to"]))
            elif n.op == "DequantizeLinear":
                scale, zero = _dq_params(n, x.ndim)
                x = ((x.astype(np.float32) - zero) * scale).astype(scale.dtype)
        return x

    def matrix(self) -> np.ndarray:
        """The canonical `W[N, K]` (outputs x reduction)."""
        return _to_canonical(self.node, self.effective())

    @property
    def shape(self) -> tuple[int, int]:
        """Canonical (N, K) without loading values where possible."""
        return tuple(self.matrix().shape)  # type: ignore[return-value]

    @property
    def kind(self) -> str:
        return "embedding" if self.node.op == "Gather" else self.node.op

    @property
    def quantized(self) -> bool:
        return any(n.op == "DequantizeLinear" for n in self.chain)

    @property
    def name(self) -> str:
        return self.source.name

    # ---------------------------------------------------------------- mutation
    def apply_mask(self, keep: np.ndarray) -> None:
        """Zero every canonical entry where `keep` is False (in the stored tensor).

        `keep` has the canonical shape `(N, K)`; any other shape is a ValueError."""
        keep = np.asarray(keep, dtype=bool)
        effective = self.effective()
        if keep.shape != _to_canonical(self.node, effective).shape:
            raise ValueError(f"mask of shape {keep.shape} does not fit {self.name!r} of shape {self.shape}")
        eff_keep = _from_canonical(self.node, keep, effective.shape)
        stored_keep = eff_keep
        zero: np.ndarray | float = 0
        for n in reversed(self.chain):
            if n.op == "Transpose":
                perm = n.attrs.get("perm") or list(reversed(range(stored_keep.ndim)))
                stored_keep = np.transpose(stored_keep, np.argsort(perm))
                if np.ndim(zero):  # a per-axis zero point taken after this Transpose
                    zero = np.transpose(zero, np.argsort(perm))
            elif n.op == "DequantizeLinear":
                _, zero = _dq_params(n, stored_keep.ndim)
        self.make_private()
        values = self.stored().copy()
        if np.ndim(zero) == 0:
            values[~stored_keep] = zero
        else:
            values = np.where(stored_keep, values, np.broadcast_to(zero, values.shape).astype(values.dtype))
        self._write(values)

    def make_private(self) -> None:
        """Copy the source (and chain) if anything besides this op reads them."""
        tensors = [self.source] + [n.outputs[0] for n in self.chain]
        if all(len(t.outputs) == 1 for t in tensors):
            return
        suffix = f"__{self.node.name or 'op'}"
        src = gs.Constant(self.source.name + suffix, self.stored().copy())
        current: gs.Tensor = src
        chain = []
        for n in self.chain:
            out = gs.Variable(n.outputs[0].name + suffix, dtype=n.outputs[0].dtype, shape=n.outputs[0].shape)
            clone = gs.Node(n.op, (n.name or n.op) + suffix, dict(n.attrs), [current, *n.inputs[1:]], [out])
            chain.append(clone)
            current = out
        at = _index(self.graph, self.node)  # insert before the op: the graph stays topologically sorted
        self.graph.nodes[at:at] = chain
        self.node.inputs[self.input_index] = current
        self.source, self.chain = src, chain

    def _write(self, values: np.ndarray) -> None:
        if isinstance(self.source, gs.Constant):
            self.source.values = values
        else:  # output of a Constant node: replace it with an initializer of the same name
            const_node = producer(self.source)
            new = gs.Constant(self.source.name, values)
            for consumer in list(self.source.outputs):
                for i, t in enumerate(consumer.inputs):
                    if t is self.source:
                        consumer.inputs[i] = new
            const_node.outputs.clear()
            if _index(self.graph, const_node) < len(self.graph.nodes):
                del self.graph.nodes[_index(self.graph, const_node)]
            self.source = new


def find_weight(graph: gs.Graph, node: gs.Node) -> WeightRef | None:
    """The constant weight of a linear op or embedding table, or None if it has none.

    Recognised: `MatMul(X, W)` with W 2-D, `Gemm(A, B)` with `transA == 0`, `Conv(X, W)`,
    and `Gather(table, ids)` with a 2-D float table and `axis == 0` (an embedding).
    """
    if node.op in ("MatMul", "Gemm", "Conv"):
        if len(node.inputs) < 2 or _is_constant_chain(node.inputs[0]):
            return None
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            return None
        ref = _trace(graph, node, 1)
        if ref is None:
            return None
        ndim = ref.stored().ndim
        if (node.op != "Conv" and ndim != 2) or (node.op == "Conv" and ndim < 3):
            return None
        return ref
    if node.op == "Gather" and node.attrs.get("axis", 0) == 0 and len(node.inputs) == 2:
        if _is_constant_chain(node.inputs[1]):
            return None
        ref = _trace(graph, node, 0)
        if ref is not None and ref.stored().ndim == 2 and np.issubdtype(ref.effective().dtype, np.floating):
            return ref
    return None


def _trace(graph: gs.Graph, node: gs.Node, index: int) -> WeightRef | None:
    chain: list[gs.Node] = []
    tensor = node.inputs[index]
    while True:
        if constant_value(tensor) is not None:
            return WeightRef(graph, node, index, tensor, list(reversed(chain)))
        prod = producer(tensor)
        if prod is None or prod.op not in CHAIN_OPS:
            return None
        if prod.op == "DequantizeLinear" and (
            prod.attrs.get("block_size", 0) or not all(_is_constant_chain(t) for t in prod.inputs[1:])
        ):
            return None
        chain.append(prod)
        tensor = prod.inputs[0]


def _index(graph: gs.Graph, node: gs.Node) -> int:
    """Position of `node` (by identity) in `graph.nodes`, or `len(graph.nodes)`."""
    return next((i for i, n in enumerate(graph.nodes) if n is node), len(graph.nodes))


def _is_constant_chain(tensor: gs.Tensor) -> bool:
    while True:
        if constant_value(tensor) is not None:
            return True
        prod = producer(tensor)
        if prod is None or prod.op not in CHAIN_OPS:
            return False
        tensor = prod.inputs[0]


def _to_canonical(node: gs.Node, eff: np.ndarray) -> np.ndarray:
    if node.op == "MatMul":
        return eff.T
    if node.op == "Gemm":
        return eff if node.attrs.get("transB", 0) else eff.T
    if node.op == "Conv":
        return eff.reshape(eff.shape[0], -1)
    return eff  # embedding table: one row per token


def _from_canonical(node: gs.Node, canon: np.ndarray, eff_shape: tuple[int, ...]) -> np.ndarray:
    if node.op == "MatMul" or (node.op == "Gemm" and not node.attrs.get("transB", 0)):
        return canon.T
    return canon.reshape(eff_shape)


def _dq_params(node: gs.Node, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    scale = np.asarray(constant_value(node.inputs[1]))
    zero = np.asarray(constant_value(node.inputs[2])) if len(node.inputs) > 2 else np.zeros((), np.int8)
    if scale.ndim == 1:  # per-axis
        axis = node.attrs.get("axis", 1) % ndim
        shape = [1] * ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return scale, zero


def _cast_dtype(to: int) -> np.dtype:
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(to))
