"""Analysis `sparsifiable`: the ops whose weight is a constant a rewrite can change."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsegraph.model import Model
from sparsegraph.pass_manager import AnalysisPass, register
from sparsegraph.weights import LINEAR_OPS, WeightRef, find_weight


@dataclass
class WeightedOp:
    """An op with a constant weight: a linear op (`MatMul`/`Gemm`/`Conv`) or an embedding `Gather`."""

    name: str
    op_type: str
    weight: WeightRef
    shape: tuple[int, int]  # canonical (N outputs, K reduction)
    dtype: str

    @property
    def is_linear(self) -> bool:
        return self.op_type in LINEAR_OPS


@dataclass
class WeightedOps:
    """Finding of `sparsifiable`: weighted ops in graph order, by node name."""

    ops: list[WeightedOp]

    def __iter__(self):
        return iter(self.ops)

    def __len__(self) -> int:
        return len(self.ops)

    def by_name(self) -> dict[str, WeightedOp]:
        return {op.name: op for op in self.ops}

    @property
    def linear(self) -> list[WeightedOp]:
        return [op for op in self.ops if op.is_linear]


@register
class SparsifiableOps(AnalysisPass):
    """Find MatMul/Gemm/Conv ops with a constant weight (also through Transpose, Cast,
    Identity and DequantizeLinear chains) and embedding Gathers with a constant table."""

    name = "sparsifiable"

    def analyze(self, model: Model, ctx) -> WeightedOps:
        model.ensure_node_names()
        found = []
        for node in model.graph.nodes:
            ref = find_weight(model.graph, node)
            if ref is None:
                continue
            w = ref.matrix()
            if not np.issubdtype(w.dtype, np.floating):
                continue
            found.append(
                WeightedOp(node.name, node.op, ref, (int(w.shape[0]), int(w.shape[1])), str(w.dtype))
            )
        return WeightedOps(found)
