"""Pass `sparsegpt`: one-shot pruning with OBS weight reconstruction (Frantar and Alistarh,
"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML 2023,
arXiv:2301.00774)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import pydantic

from sparsegraph.errors import UnsupportedOpError, UsageError
from sparsegraph.model import Model
from sparsegraph.pass_manager import Change, PassContext, PassResult, register
from sparsegraph.passes.analysis.sparsifiable import WeightedOp
from sparsegraph.weights import WeightRef, _from_canonical, _to_canonical

from .calibrated import CalibratedConfig, CalibratedRewrite, check_target
from .targeted import prune_lowest

MAX_DAMP_RETRIES = 20


def sparsegpt_prune(
    w: np.ndarray,
    hessian: np.ndarray,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Prune `w[N, K]` and update its remaining weights to reconstruct `w @ X` (SparseGPT).

    Frantar & Alistarh 2023, Algorithm 1, in float64: `hessian[K, K]` is the layer-wise
    Hessian `H = 2XᵀX` (any positive scale). Inputs with `H_jj = 0` (dead) get `H_jj = 1`
    and zero weights. `damp * mean(diag H)` is added to the diagonal; when the Cholesky
    factorisations fail (H not positive definite) `damp` is multiplied by 10 (0 becomes
    1e-6) and they are retried. With `H⁻¹ = UᵀU` (U upper), columns are processed in
    blocks of `blocksize` (lazy batch updates). Unstructured: at the start of each block
    the `floor(sparsity * N * blocksize)` weights of the block with the lowest
    `w² / U_jj²` are chosen (adaptive mask selection). N:M: at every group start the `n`
    highest of the next `m` columns are kept per row (blocksize is rounded down to a
    multiple of m). Each pruned column's error `(w - q) / U_jj` is spread over the later
    columns of the block with row `U_j,j:`, then over the later blocks at once.

    Returns `(new_w, info)`: `new_w` (dtype of `w`) is exactly zero where
    `info["mask"]` (keep-mask) is False; info also has `damp` (the relative dampening
    used), `damp_retries`, `dead_inputs` and `loss` (the OBS estimate of the added
    reconstruction error, `Σ (w - q)² / U_jj² / 2`, in the units of `hessian`).
    """
    check_target(sparsity, n, m)
    rows, cols = w.shape
    H = np.array(hessian, dtype=np.float64)
    if H.shape != (cols, cols):
        raise ValueError(f"hessian of shape {H.shape} does not fit w of shape {w.shape}")
    if not np.all(np.isfinite(H)):
        raise ValueError("hessian has NaN or inf entries")
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    if n is not None:
        blocksize = max(m, blocksize - blocksize % m)
    W = w.astype(np.float64)  # a copy
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U, used, retries = _inverse_hessian_factor(H, damp)
    keep = np.ones((rows, cols), dtype=bool)
    keep[:, dead] = False
    loss = 0.0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].copy(), U[i1:i2, i1:i2]
        d = np.diag(U1)
        err = np.zeros_like(W1)
        keep1 = keep[:, i1:i2]  # a view: writes land in `keep`
        if sparsity is not None:
            keep1 &= prune_lowest(W1**2 / d**2, math.floor(sparsity * W1.size))
        for i in range(i2 - i1):
            if n is not None and i % m == 0:
                j = min(i + m, i2 - i1)
                keep1[:, i:j] &= prune_lowest(W1[:, i:j] ** 2 / d[i:j] ** 2, max(j - i - n, 0), axis=1)
            col = W1[:, i]
            q = np.where(keep1[:, i], col, 0.0)
            err[:, i] = (col - q) / d[i]
            loss += float(np.sum(err[:, i] ** 2)) / 2
            W1[:, i:] -= np.outer(err[:, i], U1[i, i:])
            W1[:, i] = q
        W[:, i1:i2] = W1
        W[:, i2:] -= err @ U[i1:i2, i2:]
    info = {
        "mask": keep,
        "damp": used,
        "damp_retries": retries,
        "dead_inputs": int(dead.sum()),
        "loss": loss,
    }
    return W.astype(w.dtype), info


def _inverse_hessian_factor(H: np.ndarray, damp: float) -> tuple[np.ndarray, float, int]:
    """Upper `U` with `(H + λI)⁻¹ = UᵀU`, λ = damp·mean(diag H), raising damp ×10 until it works."""
    scale = float(np.mean(np.diag(H)))
    scale = scale if scale > 0 else 1.0
    eye = np.eye(len(H))
    for retries in range(MAX_DAMP_RETRIES + 1):
        try:
            L = np.linalg.cholesky(H + damp * scale * eye)
            L_inv = np.linalg.solve(L, eye)
            U = np.linalg.cholesky(L_inv.T @ L_inv).T
            if np.all(np.isfinite(U)) and np.all(np.diag(U) > 0):
                return U, damp, retries
        except np.linalg.LinAlgError:
            pass
        damp = damp * 10 if damp > 0 else 1e-6
    raise ValueError(f"hessian is not positive definite even with dampening {damp / 10:g}")


def set_matrix(ref: WeightRef, w: np.ndarray) -> None:
    """Store the canonical `w[N, K]` as the weight `ref.node` receives.

    Supported chains: a plain initializer or `Constant` node, then any `Transpose`, `Cast`
    and `Identity` nodes (values are cast to the stored dtype). A weight shared with other
    ops is copied first. Quantized chains (`DequantizeLinear`) are an `UnsupportedOpError`.
    """
    if ref.quantized:
        raise UnsupportedOpError(
            f"op {ref.node.name!r}: weight {ref.name!r} is quantized (DequantizeLinear); new weight "
            "values cannot be written back without requantizing (use wanda or magnitude)"
        )
    effective = ref.effective()
    if w.shape != _to_canonical(ref.node, effective).shape:
        raise ValueError(f"matrix of shape {w.shape} does not fit {ref.name!r} of shape {ref.shape}")
    values = _from_canonical(ref.node, w, effective.shape)
    for node in reversed(ref.chain):
        if node.op == "Transpose":
            perm = node.attrs.get("perm") or list(reversed(range(values.ndim)))
            values = np.transpose(values, np.argsort(perm))
    ref.make_private()
    ref._write(np.ascontiguousarray(values).astype(ref.stored().dtype))


class SparseGPTConfig(CalibratedConfig):
    blocksize: int = pydantic.Field(128, gt=0, description="columns per lazy update / mask selection block")
    damp: float = pydantic.Field(
        0.01, ge=0.0, description="dampening added to the Hessian diagonal, as a fraction of its mean"
    )


@register
class SparseGPT(CalibratedRewrite):
    """Prune with SparseGPT: OBS row-wise reconstruction from the calibration Hessian (2XᵀX),
    unstructured or N:M, remaining weights updated; needs calibration data (--calib)."""

    name = "sparsegpt"
    Config = SparseGPTConfig
    statistics: ClassVar[dict[str, Any]] = {"hessian": True}

    def unsupported_reason(self, op: WeightedOp) -> str | None:
        reason = super().unsupported_reason(op)
        if reason is None and op.weight.quantized:
            return "quantized weights (DequantizeLinear) cannot take reconstructed values"
        return reason

    def rewrite(self, model: Model, ctx: PassContext) -> PassResult:
        c = self.config
        changes, warnings, self._written = [], [], []
        for i, op in enumerate(self._group or []):
            w = op.weight.matrix()
            try:
                new_w, info = sparsegpt_prune(
                    w, self.stats_of(i).hessian(), c.sparsity, c.n, c.m, c.blocksize, c.damp
                )
            except ValueError as exc:
                raise UsageError(f"pass {self.name!r}: op {op.name!r}: {exc}") from None
            set_matrix(op.weight, new_w)
            self._written.append((op, info["mask"]))
            if info["damp_retries"]:
                warnings.append(
                    f"op {op.name!r}: Hessian not positive definite with damp={c.damp:g}; "
                    f"used damp={info['damp']:g} after {info['damp_retries']} retries"
                )
            changes.append(
                Change(
                    op.name,
                    self.name,
                    {
                        "shape": list(op.shape),
                        "sparsity_before": float(np.mean(w == 0)),
                        "sparsity_after": float(np.mean(new_w == 0)),
                        "damp": info["damp"],
                        "damp_retries": info["damp_retries"],
                        "dead_inputs": info["dead_inputs"],
                        "loss": info["loss"],
                        "calibration_rows": self.stats_of(i).rows,
                    },
                )
            )
        return PassResult(bool(changes), changes, warnings)
