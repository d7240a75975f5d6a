"""Fused activation-sparse GEMV/GEMM for CUDA: ``Y = where(|X| > T, X, 0) @ W`` for M <= 8.

``X[M, K]`` float16 or float32, ``W[K, N]`` fp16 as ONNX stores it (one contiguous row per
input channel), fp32 thresholds ``T[K]``, fp32 accumulation, ``Y[M, N]`` in X's dtype.
TEAL's decode kernel (Liu et al., "Training-Free Activation Sparsity in Large Language
Models", 2024) with the union of active channels over the M rows, in one launch:

``grid = NT x KS`` blocks of ``threads`` threads: block (t, s) owns outputs
``[t * threads * 8, +threads * 8)`` and the input slice ``[s * SL, +SL)`` (SL <= threads).
Thread i tests channel ``s * SL + i``; the block compacts the active channels into shared
memory (``__ballot_sync`` per warp, popcounts, a prefix over the warps), with their
thresholded x values beside them; then each thread walks the active list, ``unroll``
channels at a time, with one 16-byte load of 8 fp16 weights per channel (a warp reads 512
contiguous bytes of a row). The block's fp32 partial sums go through shared memory into
``ACC[M, N]`` with ``atomicAdd`` (a warp's 32 atomics on 128 consecutive bytes). After a
``__threadfence`` the block counts itself in ``CNT[t]``; the last of the KS blocks of tile
t (threadFenceReduction pattern) reads the tile's sums from L2
(``__ldcg``), writes Y, and puts zeros back into ACC and CNT. So ``ACC`` and ``CNT`` are
workspaces that must be zero before the first call and stay zero between calls (the
compiled model holds them as zero constants). Float atomics make the summation order, and
so the last bits of Y, vary from call to call (fp32 rounding, ~1e-7 relative).

The split over K (``KS`` slices) gives enough blocks to fill an H100 at N = 4096.
Needs ``N % 8 == 0``. Function attributes ``tirx.noalias`` and ``tirx.is_scheduled``.

Measured (`benchmarks/act_kernels.py --gpu`, H100, L2 flushed, vs cuBLAS ``F.linear`` fp16,
M = 1, W 4096x11008 / 11008x4096): 1.00x / 0.98x with every channel active, 1.65x / 1.56x
at 50 %, 2.22x / 2.18x at 70 % activation sparsity. The time does not fall in proportion
to the skipped bytes: at 70 % about 6 µs of the 17 µs are not W traffic (the channel test
and compaction before the first W load, a few dependent rounds of loads per thread, the
atomics and the finishing block). The earlier two-launch version (fp32 partials and a
reduction kernel) was 1.34x / 1.71x at 50 / 70 % on an H200.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from tvm.script import tirx as T

__all__ = ["CUDAActKernel", "act_cuda_func", "decide_cuda", "plan"]

_COUNTER = itertools.count()


@dataclass(frozen=True)
class CUDAActKernel:
    """The PrimFunc and its launch plan; call as ``f(X, T, W, ACC, CNT, Y)`` with the zeroed
    workspaces ``ACC`` (fp32 `acc_shape`) and ``CNT`` (int32 `cnt_shape`)."""

    prim_func: Any
    shape: tuple[int, int, int]  # (M, N, K)
    threads: int
    k_slices: int
    unroll: int
    x_dtype: str = "float16"

    @property
    def acc_shape(self) -> tuple[int, int]:
        m, n, _ = self.shape
        return (m, n)

    @property
    def cnt_shape(self) -> tuple[int]:
        return (-(-self.shape[1] // (self.threads * 8)),)

    @property
    def symbol(self) -> str:
        return str(self.prim_func.attrs["global_symbol"])


def plan(m: int, n: int, k: int, threads: int = 128, blocks_per_sm: int = 2, sms: int = 132) -> int:
    """K slices: at most `threads` channels each (one per thread for the compaction), and
    enough to give about `blocks_per_sm` blocks per SM (fewer for large M)."""
    nt = -(-n // (threads * 8))
    per_sm = blocks_per_sm if m <= 2 else max(1, blocks_per_sm // 2)
    return max(-(-k // threads), min(k // 16, -(-(per_sm * sms) // nt)))


def act_cuda_func(
    m: int,
    n: int,
    k: int,
    threads: int = 128,
    k_slices: int | None = None,
    unroll: int | None = None,
    x_dtype: str = "float16",
):
    """Build the `CUDAActKernel` for ``(M, N, K)``; see the module docstring. Defaults: the
    fastest of the schedules timed on an H100 (`benchmarks/act_kernels.py --gpu`): 128
    threads, 2 blocks per SM, 16 channel loads in flight per thread (8 for M > 2)."""
    if not 1 <= m <= 8:
        raise ValueError(f"the CUDA activation-sparse kernel handles 1 <= M <= 8; got M={m}")
    if n % 8:
        raise ValueError(f"the CUDA activation-sparse kernel needs N % 8 == 0; got N={n}")
    if threads % 32 or not 32 <= threads <= 1024:
        raise ValueError(f"threads must be a multiple of 32 in [32, 1024]; got {threads}")
    if x_dtype not in ("float16", "float32"):
        raise ValueError(f"X must be float16 or float32; got {x_dtype}")
    ks = int(k_slices or plan(m, n, k, threads))
    sl = -(-k // ks)
    if sl > threads:
        raise ValueError(
            f"a K slice of {sl} channels exceeds the {threads} threads of a block; use more slices"
        )
    ks = -(-k // sl)
    nt = -(-n // (threads * 8))
    unroll = unroll or (16 if m <= 2 else 8)
    M, N, K, TPB, KS, SL, NT, U, XD = m, n, k, threads, ks, sl, nt, unroll, x_dtype
    NW = TPB // 32

    @T.prim_func
    def main(
        X: T.Buffer((M, K), XD),
        TH: T.Buffer((K,), "float32"),
        W: T.Buffer((K, N), "float16"),
        ACC: T.Buffer((M, N), "float32"),
        CNT: T.Buffer((NT,), "int32"),
        Y: T.Buffer((M, N), XD),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for bx in T.thread_binding(NT * KS, thread="blockIdx.x"):
            for tx in T.thread_binding(TPB, thread="threadIdx.x"):
                idx = T.decl_buffer((SL,), "int32", scope="shared")
                xs = T.decl_buffer((SL, M), "float32", scope="shared")
                wcnt = T.decl_buffer((NW,), "int32", scope="shared")
                last = T.decl_buffer((1,), "int32", scope="shared")
                red = T.decl_buffer((M, TPB * 8), "float32", scope="shared")
                run = T.decl_buffer((1,), "int32", scope="local")
                act = T.decl_buffer((1,), "int32", scope="local")
                bal = T.decl_buffer((1,), "uint32", scope="local")
                xv = T.decl_buffer((M,), "float32", scope="local")
                acc = T.decl_buffer((M, 8), "float32", scope="local")
                wv = T.decl_buffer((U, 8), "float16", scope="local")
                t = T.meta_var(bx // KS)
                s = T.meta_var(bx % KS)
                n0 = T.meta_var(t * (TPB * 8) + tx * 8)
                kk = T.meta_var(s * SL + tx)
                # compaction: thread tx tests channel s*SL + tx; ballot per warp, prefix over warps
                act[0] = 0
                if tx < SL and kk < K:
                    for i in T.unroll(M):
                        xv[i] = T.Cast("float32", X[i, kk])
                        act[0] = T.max(act[0], T.Cast("int32", T.fabs(xv[i]) > TH[kk]))
                bal[0] = T.call_extern("uint32", "__ballot_sync", T.uint32(0xFFFFFFFF), act[0])
                if tx % 32 == 0:
                    wcnt[tx // 32] = T.popcount(bal[0])
                T.tvm_storage_sync("shared")
                run[0] = 0
                for q in T.unroll(NW):
                    if q < tx // 32:
                        run[0] = run[0] + wcnt[q]
                if act[0] > 0:
                    pos = T.meta_var(
                        run[0]
                        + T.popcount(
                            T.bitwise_and(
                                bal[0], T.shift_left(T.uint32(1), T.Cast("uint32", tx % 32)) - T.uint32(1)
                            )
                        )
                    )
                    idx[pos] = kk
                    for i in T.unroll(M):
                        xs[pos, i] = T.if_then_else(T.fabs(xv[i]) > TH[kk], xv[i], T.float32(0))
                run[0] = 0
                for q in T.unroll(NW):
                    run[0] = run[0] + wcnt[q]
                T.tvm_storage_sync("shared")
                if run[0] > 0:  # (uniform over the block)
                    for i in T.unroll(M):
                        for v in T.unroll(8):
                            acc[i, v] = T.float32(0)
                    if n0 < N:
                        for jo in range((run[0] + U - 1) // U):
                            for u in T.unroll(U):
                                if jo * U + u < run[0]:
                                    for v in T.vectorized(8):
                                        wv[u, v] = W[idx[jo * U + u], n0 + v]
                            for u in T.unroll(U):
                                if jo * U + u < run[0]:
                                    for i in T.unroll(M):
                                        for v in T.unroll(8):
                                            acc[i, v] = acc[i, v] + xs[jo * U + u, i] * T.Cast(
                                                "float32", wv[u, v]
                                            )
                    # through shared memory, so that a warp's atomics hit 128 consecutive bytes
                    for i in T.unroll(M):
                        for v in T.vectorized(8):
                            red[i, tx * 8 + v] = acc[i, v]
                    T.tvm_storage_sync("shared")
                    for i in T.unroll(M):
                        for e in T.unroll(8):
                            if t * (TPB * 8) + e * TPB + tx < N:
                                T.evaluate(
                                    T.call_extern(
                                        "float32",
                                        "atomicAdd",
                                        T.address_of(ACC[i, t * (TPB * 8) + e * TPB + tx]),
                                        red[i, e * TPB + tx],
                                    )
                                )
                    T.evaluate(T.call_extern("void", "__threadfence"))
                # the last block of tile t to arrive finishes it (threadFenceReduction)
                T.tvm_storage_sync("shared")
                if tx == 0:
                    last[0] = T.call_extern("int32", "atomicAdd", T.address_of(CNT[t]), 1)
                T.tvm_storage_sync("shared")
                act[0] = last[0]  # (a shared load cannot be a branch condition)
                if act[0] == KS - 1:
                    if n0 < N:
                        for i in T.unroll(M):
                            for v in T.unroll(8):
                                Y[i, n0 + v] = T.Cast(
                                    XD, T.call_extern("float32", "__ldcg", T.address_of(ACC[i, n0 + v]))
                                )
                                ACC[i, n0 + v] = T.float32(0)
                    if tx == 0:
                        CNT[t] = 0

    sym = f"sg_act_cuda_m{m}_n{n}_k{k}_{next(_COUNTER)}"
    return CUDAActKernel(main.with_attr("global_symbol", sym), (m, n, k), TPB, KS, U, XD)


# --------------------------------------------------------------------------- dispatch

#: fixed cost per call the bytes model charges the fused kernel (compaction + the last
#: block's pass; the W bytes it skips must pay for it)
MODEL_FIXED_SECONDS = 3e-6


def decide_cuda(ctx: Any, w: np.ndarray, th: np.ndarray, m: int, kind: str, cache: dict) -> tuple[Any, dict]:
    """The CUDA counterpart of `act_kernels._decide` (same record, same `GUARD` rule):
    the fused kernel for W_onnx[K, N] (fp16 in the kernel), thresholds th[K] and M = m,
    against the dense matmul the model would run otherwise -- the best of dlight on the
    model's float32 W and our fp16 dense row kernel (`cuda_kernels`). Measured on the GPU
    (L2 flushed, `cuda_dispatch.GPUTimer`) when one is visible, at the model's calibrated
    activation sparsity (else `ASSUMED_SPARSITY`) and at `GUARD_FRACTION` of it; without a
    GPU a bytes model decides (fp16 W bytes of the union of active channels over the M
    rows, plus `MODEL_FIXED_SECONDS`), and the record says ``measured: false``. Decisions
    go to ``ctx.db`` under keys that say whether they were measured."""
    from . import act_kernels as ak
    from . import cuda_kernels as ck
    from .cuda_dispatch import MODEL_BANDWIDTH, GPUTimer, gpu_visible

    k, n = w.shape
    measured = gpu_visible()
    cal, s = ak.timed_sparsity(ctx, th)
    key = ak.decision_key(ctx.target, w, th, m, True, None if cal is None else s)
    key += "|measured" if measured else "|bytes-model"
    if key in cache:
        return cache[key]
    w16 = np.ascontiguousarray(w, dtype=np.float16)
    th32 = np.ascontiguousarray(th, dtype=np.float32)

    def chosen(_name: str) -> Any:
        kern = act_cuda_func(m, n, k, x_dtype="float32")
        ws = {"acc": np.zeros(kern.acc_shape, np.float32), "cnt": np.zeros(kern.cnt_shape, np.int32)}
        return ak._Chosen(kern.symbol, kern.prim_func, {"th": th32, "w": w16, **ws})

    stored = ctx.db.get(key)
    if stored is not None:
        rec = dict(stored, from_db=True)
        cache[key] = (chosen(rec["kernel"]) if rec["chosen"] == "fused" else None, rec)
        return cache[key]
    if n % 8:
        return None, {"technique": "activation_sparsity", "M": m, "weight_shape": [k, n], "threshold": kind,
                      "chosen": "dense", "reason": "the CUDA kernel needs N % 8 == 0"}  # fmt: skip
    x_s, x_g = ak.probe_inputs(th32, m, s)
    wsp = float(1 - np.count_nonzero(w) / w.size)
    if measured:
        import tvm

        timer = GPUTimer(ctx.target)
        w_nk = np.ascontiguousarray(w.T)
        row = ck.build("dense", w_nk, m, ctx.target, x_dtype="float32") if k % 8 == 0 else None
        dense_s = {"dlight": timer.dense(w_nk, m)}
        if row is not None:
            dense_s["dense_fp16"] = timer.kernel(row, m, k)
        kern = chosen("act_cuda")

        def run(x: np.ndarray) -> float:
            args = [tvm.runtime.tensor(a, timer.dev) for a in (x, *kern.weights.values())]
            args.append(tvm.runtime.empty((m, n), "float32", timer.dev))
            return timer._time(kern.prim_func, kern.symbol, args)

        fused = {"act_cuda": (run(x_s), run(x_g))}
    else:
        dense_bytes = k * n * 2
        dense_s = {"dense_fp16": dense_bytes / MODEL_BANDWIDTH}

        def model(x: np.ndarray) -> float:  # bytes of the active channels + the fixed cost
            return float((x != 0).any(axis=0).mean()) * dense_bytes / MODEL_BANDWIDTH + MODEL_FIXED_SECONDS

        fused = {"act_cuda": (model(x_s), model(x_g))}
    kern_rec = ak._record(ctx, key, cache, chosen, kind, k, n, m, wsp, dense_s, fused, (cal, s))
    kern_rec[1]["measured"] = measured
    return kern_rec
