"""Shared adapter for rewrite passes that act on selected weighted ops.

`TargetedRewrite` resolves the recipe's `targets`/`ignore` selectors against the
`sparsifiable` and `roles` findings and rejects ops the pass cannot rewrite.
`MaskRewrite` is the thin adapter every pruning technique uses: the technique supplies
a keep-mask for the canonical `W[N, K]` (one numpy function per technique), the adapter
writes it back through the graph and checks afterwards that the stored weight really
has zeros wherever the mask says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
import pydantic

from sparsegraph.errors import UnsupportedOpError
from sparsegraph.model import Model
from sparsegraph.pass_manager import Change, PassConfig, PassContext, PassResult, RewritePass, check
from sparsegraph.passes.analysis.roles import Roles
from sparsegraph.passes.analysis.sparsifiable import SparsifiableOps, WeightedOp
from sparsegraph.selectors import parse_selector, select


class TargetedConfig(PassConfig):
    targets: list[str] | None = pydantic.Field(
        None, description="selectors of the ops to rewrite (default: all linear ops but heads/embeddings)"
    )
    ignore: list[str] = pydantic.Field(default_factory=list, description="selectors of ops to leave alone")

    @pydantic.field_validator("targets", "ignore")
    @classmethod
    def _parse(cls, texts):
        for text in texts or []:
            parse_selector(text)  # raises ValueError with the reason
        return texts


class TargetedRewrite(RewritePass):
    """A rewrite applied to the ops its selectors pick."""

    Config = TargetedConfig
    requires = (SparsifiableOps, Roles)
    #: op kinds this pass can rewrite (WeightedOp.op_type; "Gather" is an embedding table)
    supported: ClassVar[tuple[str, ...]] = ("MatMul", "Gemm", "Conv")

    def unsupported_reason(self, op: WeightedOp) -> str | None:
        """Why `op` cannot be rewritten by this pass, or None."""
        if op.op_type not in self.supported:
            return f"{op.op_type} ops are not supported (supported: {', '.join(self.supported)})"
        return None

    def select(self, model: Model, ctx: PassContext) -> tuple[list[WeightedOp], list[str]]:
        """Targets this pass will rewrite, and warnings for default targets it skips."""
        return pick_targets(model, ctx, self.name, self.config, self.unsupported_reason)


def pick_targets(
    model: Model,
    ctx: PassContext,
    name: str,
    config: TargetedConfig,
    unsupported_reason: Callable[[WeightedOp], str | None],
) -> tuple[list[WeightedOp], list[str]]:
    """The ops `config`'s targets/ignore pick, and warnings for default targets skipped
    because `unsupported_reason` gives a reason; explicit targets with a reason are an
    `UnsupportedOpError` (named after pass or analysis `name`)."""
    ops = ctx.get(SparsifiableOps, model)
    roles = ctx.get(Roles, model)
    where = f"pass {name!r} on {model.name}"
    chosen = select(ops, roles, config.targets, config.ignore, where)
    keep, warnings = [], []
    for op in chosen:
        reason = unsupported_reason(op)
        if reason is None:
            keep.append(op)
        elif config.targets is not None:
            raise UnsupportedOpError(f"{where}: cannot rewrite op {op.name!r}: {reason}")
        else:
            warnings.append(f"left {op.name!r} untouched: {reason}")
    return keep, warnings


class MaskRewrite(TargetedRewrite):
    """Zero the entries of each target's weight that a technique's keep-mask drops."""

    #: the technique: keep-masks (bool, same shapes) for the canonical weights ``w[N, K]`` of
    #: all targets, ``masks(weights, ctx)``; each subclass that uses `run` defines it
    masks: Callable[[list[np.ndarray], PassContext], list[np.ndarray]]

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        targets, warnings = self.select(model, ctx)
        weights = [op.weight.matrix() for op in targets]
        changes = []
        self._written: list[tuple[WeightedOp, np.ndarray]] = []
        for op, w, keep in zip(targets, weights, self.masks(weights, ctx), strict=True):
            before = float(np.mean(w == 0))
            op.weight.apply_mask(keep)
            self._written.append((op, keep))
            after = float(np.mean((w * keep) == 0))
            changes.append(
                Change(
                    op.name,
                    self.name,
                    {"shape": list(op.shape), "sparsity_before": before, "sparsity_after": after},
                )
            )
        return PassResult(bool(changes), changes, warnings)

    def postcondition(self, model: Model, ctx: PassContext, result: PassResult) -> None:
        for op, keep in getattr(self, "_written", []):
            w = op.weight.matrix()
            check(
                not np.any(w[~keep]), self.name, f"op {op.name!r}: pruned entries are not zero after rewrite"
            )


def prune_lowest(scores: np.ndarray, count: int, axis: int | None = None) -> np.ndarray:
    """Keep-mask dropping the `count` lowest scores (over the whole array, or along `axis`).

    Ties are broken by position (stable sort: the earlier entry is dropped first), so the
    mask is deterministic. `count` must lie in `0..n` (n scores ranked together).
    """
    n = scores.size if axis is None else scores.shape[axis]
    if not 0 <= count <= n:
        raise ValueError(f"cannot drop {count} of {n} scores")
    if axis is None:
        order = np.argsort(scores, axis=None, kind="stable")
        keep = np.ones(scores.size, dtype=bool)
        keep[order[:count]] = False
        return keep.reshape(scores.shape)
    order = np.argsort(scores, axis=axis, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(
        ranks,
        order,
        np.arange(scores.shape[axis]).reshape(
            [-1 if a == axis % scores.ndim else 1 for a in range(scores.ndim)]
        ),
        axis=axis,
    )
    return ranks >= count


def sparsity_field(description: str = "fraction of weights set to zero, in [0, 1)"):
    return pydantic.Field(ge=0.0, lt=1.0, description=description)
