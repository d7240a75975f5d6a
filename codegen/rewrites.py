"""Pattern rewrites that run on the imported Relax module before the linear-op swap.

A technique with a fused kernel (a pattern around a matmul, or a subgraph such as
attention) contributes one factory to `FACTORIES`: `factory(ctx) -> rewrite | None`, where
`rewrite(mod) -> mod` replaces the pattern with `call_tir` to its kernel in every
`main_<tag>` function. A rewrite must leave the buckets in `ctx.dense_tags` alone (those
are built as the dense baseline) and append one record per decision to `ctx.decisions`
(shown in the manifest and the report).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import tvm

from .act_kernels import act_sparse_rewrite
from .attention_rewrite import sparse_attention

Rewrite = Callable[[tvm.IRModule], tvm.IRModule]


@dataclass
class RewriteContext:
    target: Any
    cold: bool  # the model's weights exceed the last-level cache: time kernels cold
    db: Any  # dispatch.TuningDB
    dense_tags: frozenset[str] = frozenset()  # buckets that must compile dense only
    decisions: list[dict[str, Any]] = field(default_factory=list)
    #: activation sparsity reached per threshold, `activation_sparsity.calibrated_sparsities`
    act_sparsity: dict[str, float] = field(default_factory=dict)


#: factories, in the order their rewrites run
FACTORIES: list[Callable[[RewriteContext], Rewrite | None]] = [
    act_sparse_rewrite,  # fused threshold + matmul skipping inactive input channels (M <= 8)
    sparse_attention,  # block-sparse attention kernel where the mask is a constant (prefill)
]


def pattern_rewrites(ctx: RewriteContext) -> list[Rewrite]:
    """The rewrites that apply for `ctx` (factories may decline by returning None)."""
    return [r for f in FACTORIES if (r := f(ctx)) is not None]
