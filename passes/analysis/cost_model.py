"""Analysis `cost_model`: FLOPs and weight bytes per op, dense and in each sparse format.

FLOPs are per row of the activation (one token): `2 * N * K` dense, `2 * nnz` when only
nonzeros are multiplied. Bytes come from `sparsegraph.codegen.formats` (the same layouts
the kernels read). At decode, a linear op streams its weight once per step, so the bytes
ratio `dense / best format` bounds the speedup a memory-bound kernel can reach.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from sparsegraph.codegen.formats import BSR, UnfitError, format_bytes
from sparsegraph.model import Model
from sparsegraph.pass_manager import AnalysisPass, register

from .sparsifiable import SparsifiableOps

NM_CANDIDATES = ((2, 4), (4, 8), (1, 4))
BSR_BLOCKS = ((16, 1), (4, 4), (16, 16))


@dataclass
class OpCost:
    name: str
    flops_dense: int
    flops_sparse: int
    bytes_dense: int
    bytes_by_format: dict[str, int]
    best_format: str

    @property
    def bytes_best(self) -> int:
        return self.bytes_by_format[self.best_format]

    @property
    def bytes_bound(self) -> float:
        """Dense bytes / best-format bytes: the memory-bound speedup limit."""
        return self.bytes_dense / max(self.bytes_best, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "bytes_best": self.bytes_best, "bytes_bound": self.bytes_bound}


def op_cost(name: str, w: np.ndarray) -> OpCost:
    """Cost of one canonical weight `w[N, K]` in every format that can hold it."""
    nnz = int(np.count_nonzero(w))
    sizes = format_bytes(w, nm=None)
    nm = next((p for p in NM_CANDIDATES if w.shape[1] % p[1] == 0 and _is_nm(w, *p)), None)
    if nm is not None:
        sizes[f"nm{nm[0]}:{nm[1]}"] = format_bytes(w, nm=nm)["nm"]
    sizes.pop("bsr", None)
    for block in BSR_BLOCKS:  # the BSR size alone: `format_bytes` would price every format again
        try:
            sizes[f"bsr{block[0]}x{block[1]}"] = BSR.packed_nbytes(w, block=block)
        except UnfitError:
            continue
    best = min(sizes, key=sizes.get)
    return OpCost(name, 2 * w.size, 2 * nnz, sizes["dense"], sizes, best)


def _is_nm(w: np.ndarray, n: int, m: int) -> bool:
    groups = (w != 0).reshape(w.shape[0], -1, m).sum(axis=2)
    return bool(np.all(groups <= n))


@register
class CostModel(AnalysisPass):
    """Per weighted op: FLOPs per token (dense, nonzeros only) and weight bytes dense vs
    CSR, BSR, N:M (when the weight is N:M) and bitmap; the smallest format and its bound."""

    name = "cost_model"
    requires = (SparsifiableOps,)

    def analyze(self, model: Model, ctx) -> dict[str, OpCost]:
        return {op.name: op_cost(op.name, op.weight.matrix()) for op in ctx.get(SparsifiableOps, model)}
