"""Analysis `weight_stats`: sparsity, norms and a magnitude histogram per weighted op."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from sparsegraph.model import Model
from sparsegraph.pass_manager import AnalysisPass, register

from .sparsifiable import SparsifiableOps

#: histogram bin edges of log10|w| (zeros are counted apart)
LOG10_EDGES = np.linspace(-8.0, 2.0, 21)


@dataclass
class WeightStat:
    name: str
    shape: tuple[int, int]
    dtype: str
    params: int
    nonzeros: int
    sparsity: float
    l1: float
    l2: float
    max_abs: float
    mean_abs: float
    zeros: int
    log10_hist: list[int]  # counts per LOG10_EDGES bin of the nonzero entries

    def to_dict(self) -> dict:
        return asdict(self)


def weight_stat(name: str, w: np.ndarray) -> WeightStat:
    a = np.abs(w.astype(np.float64))
    nz = a[a > 0]
    hist, _ = np.histogram(np.log10(nz), bins=LOG10_EDGES) if nz.size else (np.zeros(20, int), None)
    return WeightStat(
        name,
        tuple(int(d) for d in w.shape),
        str(w.dtype),
        int(w.size),
        int(nz.size),
        float(1 - nz.size / w.size) if w.size else 0.0,
        float(a.sum()),
        float(np.sqrt((a * a).sum())),
        float(a.max(initial=0.0)),
        float(a.mean()) if a.size else 0.0,
        int(w.size - nz.size),
        [int(c) for c in hist],
    )


@register
class WeightStats(AnalysisPass):
    """Per weighted op: params, nonzeros, sparsity, L1/L2 norm, max/mean |w|, log10|w| histogram."""

    name = "weight_stats"
    requires = (SparsifiableOps,)

    def analyze(self, model: Model, ctx) -> dict[str, WeightStat]:
        return {op.name: weight_stat(op.name, op.weight.matrix()) for op in ctx.get(SparsifiableOps, model)}
