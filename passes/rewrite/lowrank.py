"""Pass `lowrank`: replace `X @ W` by `(X @ U) @ V` from a truncated SVD (Eckart–Young:
the rank-r SVD truncation is the best rank-r approximation in Frobenius norm; applied to
network weights by Denton et al., "Exploiting Linear Structure Within Convolutional
Networks for Efficient Evaluation", NeurIPS 2014)."""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs
import pydantic

from sparsegraph.model import Model
from sparsegraph.pass_manager import Change, PassContext, PassResult, register

from .targeted import TargetedConfig, TargetedRewrite


def choose_rank(
    singular_values: np.ndarray,
    shape: tuple[int, int],
    rank_ratio: float | None = None,
    param_ratio: float | None = None,
    energy: float | None = None,
) -> int:
    """Rank for a `W[N, K]` with the given singular values, chosen by exactly one rule:

    - `rank_ratio`: `round(rank_ratio * min(N, K))`;
    - `param_ratio`: the largest r with `r * (N + K) <= param_ratio * N * K`;
    - `energy`: the smallest r whose singular values keep that fraction of `sum(s**2)`.
    The result is at least 1.
    """
    n, k = shape
    if rank_ratio is not None:
        r = round(rank_ratio * min(n, k))
    elif param_ratio is not None:
        r = math.floor(param_ratio * n * k / (n + k) + 1e-9)  # in floats 0.15 * 24 * 30 / 54 < 2
    else:
        sq = np.asarray(singular_values, dtype=np.float64) ** 2
        total = sq.sum()
        r = int(np.searchsorted(np.cumsum(sq) / total, energy - 1e-12) + 1) if total > 0 else 1
    return max(1, min(r, min(n, k)))


def low_rank_factors(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """`(A[N, r], B[r, K])` with `A @ B` the best rank-`rank` approximation of `w[N, K]`;
    the singular values are split evenly (`sqrt(s)` into each factor)."""
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    return (u[:, :rank] * root).astype(w.dtype), (root[:, None] * vt[:rank]).astype(w.dtype)


def lowers_cost(shape: tuple[int, int], rank: int) -> bool:
    """True when two factors of rank r need fewer multiply-adds and weights than `W[N, K]`."""
    n, k = shape
    return rank * (n + k) < n * k


class LowRankConfig(TargetedConfig):
    rank_ratio: float | None = pydantic.Field(None, gt=0, le=1, description="rank as a fraction of min(N, K)")
    param_ratio: float | None = pydantic.Field(None, gt=0, lt=1, description="fraction of the weights kept")
    energy: float | None = pydantic.Field(None, gt=0, le=1, description="fraction of sum(s^2) kept")

    @pydantic.model_validator(mode="after")
    def _one_rule(self):
        given = [k for k in ("rank_ratio", "param_ratio", "energy") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of rank_ratio, param_ratio, energy (got {given or 'none'})")
        return self


@register
class LowRank(TargetedRewrite):
    """Factor `X @ W` into `(X @ U) @ V` by truncated SVD where that lowers FLOPs and bytes."""

    name = "lowrank"
    Config = LowRankConfig
    supported = ("MatMul", "Gemm")

    def unsupported_reason(self, op):
        if op.op_type == "Gemm" and op.weight.node.attrs.get("transA", 0):
            return "Gemm with transA is not supported"
        return super().unsupported_reason(op)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        targets, warnings = self.select(model, ctx)
        cfg = self.config
        changes = []
        for op in targets:
            w = op.weight.matrix()
            s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
            rank = choose_rank(s, op.shape, cfg.rank_ratio, cfg.param_ratio, cfg.energy)
            if not lowers_cost(op.shape, rank):
                reason = "rank too high to save cost"
                changes.append(Change(op.name, "skipped", {"rank": rank, "reason": reason}))
                continue
            a, b = low_rank_factors(w, rank)
            err = float(np.linalg.norm(w - a @ b) / max(np.linalg.norm(w), 1e-30))
            factor_node(model.graph, op.weight.node, a, b)
            changes.append(Change(op.name, "lowrank", {
                "shape": list(op.shape), "rank": rank, "params_before": w.size,
                "params_after": a.size + b.size, "relative_error": err,
            }))  # fmt: skip
        return PassResult(any(c.action == "lowrank" for c in changes), changes, warnings)


def factor_node(graph: gs.Graph, node: gs.Node, a: np.ndarray, b: np.ndarray) -> None:
    """Rewrite `node` (MatMul or Gemm computing X @ W.T with W ≈ a @ b, `a[N, r]`, `b[r, K]`)
    as `(X @ b.T) @ a.T` (two MatMuls; Gemm's alpha folded into the second factor, its bias
    added after). Node and tensor names derive from `node.name` (`<name>/lowrank_*`)."""
    x, out = node.inputs[0], node.outputs[0]
    base = node.name
    first = gs.Variable(f"{base}/lowrank_mid", dtype=out.dtype)
    u = gs.Constant(f"{base}/lowrank_U", np.ascontiguousarray(b.T))  # [K, r]
    v = gs.Constant(f"{base}/lowrank_V", np.ascontiguousarray(a.T))  # [r, N]
    new = [gs.Node("MatMul", f"{base}/lowrank_0", inputs=[x, u], outputs=[first])]
    if node.op == "MatMul":
        new.append(gs.Node("MatMul", f"{base}/lowrank_1", inputs=[first, v], outputs=[out]))
    else:  # Gemm: Y = alpha * X @ W.T + beta * C
        alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0)
        c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        v_scaled = gs.Constant(v.name, (v.values * alpha).astype(v.values.dtype))
        bias = gs.Variable(f"{base}/lowrank_beta", dtype=out.dtype) if c is not None and beta != 1.0 else c
        if c is None:
            new.append(gs.Node("MatMul", f"{base}/lowrank_1", inputs=[first, v_scaled], outputs=[out]))
        else:
            second = gs.Variable(f"{base}/lowrank_y", dtype=out.dtype)
            new.append(gs.Node("MatMul", f"{base}/lowrank_1", inputs=[first, v_scaled], outputs=[second]))
            if bias is not c:
                scale = gs.Constant(f"{base}/lowrank_beta_value", np.array(beta, dtype=v.values.dtype))
                new.append(gs.Node("Mul", f"{base}/lowrank_beta_mul", inputs=[c, scale], outputs=[bias]))
            new.append(gs.Node("Add", f"{base}/lowrank_bias", inputs=[second, bias], outputs=[out]))
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.extend(new)
