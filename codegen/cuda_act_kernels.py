"""Fused activation-sparse GEMV/GEMM for CUDA: ``Y = where(|X| > T, X, 0) @ W`` for M <= 8.

``X[M, K]`` float16 or float32, ``W[K, N]`` fp16 as ONNX stores it (one contiguous row per
input channel), fp32 thresholds ``T[K]``, fp32 accumulation, ``Y[M, N]`` in X's dtype.
TEAL's decode kernel (Liu et al., "Training-Free Activation Sparsity in Large Language
Models", 2024) with the union of active channels over the M rows, in one launch and
without workspaces:

* a block owns ``32 * vec`` outputs; a cluster of ``cluster`` blocks (Hopper thread-block
  clusters) owns the same outputs, each block a slice of K, and each of a block's
  ``warps`` warps a part of that slice;
* a warp tests its channels ``chunk`` at a time (all X and T loads issued first, then one
  ``__ballot_sync`` per 32 channels), compacts the active ones and their thresholded x
  values into its shared-memory list, then walks the list ``unroll`` channels at a time,
  each lane loading ``vec`` contiguous fp16 weights of the channel's row;
* the block folds its warps' partial sums in shared memory; after a cluster barrier,
  block r of the cluster sums columns ``r`` of every block's partials through distributed
  shared memory (``mapa`` + ``ld.shared::cluster``), in a fixed order, and writes Y. No
  atomics: the result is deterministic, and nothing needs zeroing between calls.

Needs ``N % vec == 0`` and sm_90 or newer (clusters); on older GPUs `decide_cuda` keeps
the dense matmul and says why. Function attributes ``tirx.noalias`` and
``tirx.is_scheduled``.

Measured (`benchmarks/act_kernels.py --gpu`, H100, L2 flushed, vs cuBLAS ``F.linear``
fp16): see `benchmarks/results/act_kernels_gpu.md`. The previous version split K over
independent blocks and reduced with fp32 atomics, a ``__threadfence`` and a last-block
pass; the cluster reduction and more warps per SM took 4096x11008 at 70 % from 2.17x to
2.35x and M = 4 from 0.79-0.93x to 0.91-1.06x (same run).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from tvm.script import tirx as T

__all__ = ["CUDAActKernel", "act_cuda_func", "decide_cuda", "has_clusters", "plan"]

_COUNTER = itertools.count()


@dataclass(frozen=True)
class CUDAActKernel:
    """The PrimFunc and its launch plan; call as ``f(X, T, W, Y)``."""

    prim_func: Any
    shape: tuple[int, int, int]  # (M, N, K)
    warps: int  # per block, each on its own channels of the block's K slice
    cluster: int  # blocks per cluster, each on its own K slice of the cluster's outputs
    unroll: int  # W loads in flight per thread
    chunk: int  # channels a warp compacts at a time
    vec: int = 4  # outputs per lane (fp16 W: 4 = 8-byte loads); a block owns 32 * vec outputs
    x_dtype: str = "float16"

    @property
    def symbol(self) -> str:
        return str(self.prim_func.attrs["global_symbol"])


#: static shared memory a block may use
SMEM_BYTES = 48 * 1024


def plan(m: int, n: int, k: int, vec: int = 4, sms: int = 132) -> tuple[int, int]:
    """(warps per block, blocks per cluster): clusters of 8 (the portable limit; fewer
    when K is short), then the most warps per block (a power of two <= 8) that keeps the
    grid within ~22 warps per SM and the warps' partial sums within 2/3 of `SMEM_BYTES`.
    On the H100 (`benchmarks/act_kernels.py --gpu`) the fastest layouts had 16-21 warps
    per SM: more loads in flight than fewer warps give, without the per-warp fixed cost
    (compaction, reduction) of more."""
    tile = 32 * vec
    nt = -(-n // tile)
    cluster = next((c for c in (8, 4, 2) if k >= c * 64), 1)
    cap = min(8, 22 * sms // (nt * cluster), SMEM_BYTES * 2 // 3 // (m * tile * 4) - 1)
    return 1 << max(0, cap.bit_length() - 1), cluster


def act_cuda_func(
    m: int,
    n: int,
    k: int,
    warps: int | None = None,
    cluster: int | None = None,
    unroll: int | None = None,
    chunk: int | None = None,
    vec: int = 4,
    x_dtype: str = "float16",
):
    """Build the `CUDAActKernel` for ``(M, N, K)``; see the module docstring. Defaults:
    `plan`, 16 channel loads in flight per thread, 4 outputs per lane."""
    if not 1 <= m <= 8:
        raise ValueError(f"the CUDA activation-sparse kernel handles 1 <= M <= 8; got M={m}")
    if x_dtype not in ("float16", "float32"):
        raise ValueError(f"X must be float16 or float32; got {x_dtype}")
    if vec not in (2, 4, 8) or n % vec:
        raise ValueError(
            f"the CUDA activation-sparse kernel needs vec in (2, 4, 8) dividing N; got {vec}, N={n}"
        )
    pw, pc = plan(m, n, k, vec)
    G, CS = int(warps or pw), int(cluster or pc)
    if CS not in (1, 2, 4, 8) or not 1 <= G <= 16:
        raise ValueError(f"cluster must be 1, 2, 4 or 8 and warps 1..16; got {CS}, {G}")
    SP = -(-k // (CS * G))  # channels per warp
    TILE = 32 * vec
    part_bytes = (G + 1) * m * TILE * 4
    fit = (SMEM_BYTES - part_bytes) // (G * (m + 1) * 4) // 32 * 32
    CH = int(chunk or min(-(-SP // 32) * 32, 256, fit))
    if CH < 32 or CH % 32 or CH > fit:
        raise ValueError(f"chunk must be a multiple of 32 that fits shared memory (<= {fit}); got {CH}")
    NCH = -(-SP // CH)
    U = int(unroll or 16)
    M, N, K, XD, NT, TPB, CPR, V = m, n, k, x_dtype, -(-n // TILE), G * 32, TILE // CS, vec
    NQ = CH // 32
    NRED = -(-(M * TILE) // TPB)  # partial sums each thread folds over the warps
    NOUT = -(-(M * CPR) // TPB)  # outputs each thread finishes over the cluster

    @T.prim_func
    def main(
        X: T.Buffer((M, K), XD),
        TH: T.Buffer((K,), "float32"),
        W: T.Buffer((K, N), "float16"),
        Y: T.Buffer((M, N), XD),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for bx in T.thread_binding(NT * CS, thread="blockIdx.x"):
            for r in T.thread_binding(CS, thread="clusterCtaIdx.x"):
                for tx in T.thread_binding(TPB, thread="threadIdx.x"):
                    idx = T.decl_buffer((G, CH), "int32", scope="shared")
                    xs = T.decl_buffer((G, CH, M), "float32", scope="shared")
                    part = T.decl_buffer((G, M, TILE), "float32", scope="shared")
                    bsum = T.decl_buffer((M, TILE), "float32", scope="shared")
                    cnt = T.decl_buffer((1,), "int32", scope="local")
                    bal = T.decl_buffer((1,), "uint32", scope="local")
                    act = T.decl_buffer((NQ,), "int32", scope="local")
                    xv = T.decl_buffer((NQ, M), "float32", scope="local")
                    acc = T.decl_buffer((M, V), "float32", scope="local")
                    wv = T.decl_buffer((U, vec), "float16", scope="local")
                    rsum = T.decl_buffer((1,), "float32", scope="local")
                    addr = T.decl_buffer((1,), "uint32", scope="local")
                    rv = T.decl_buffer((1,), "float32", scope="local")
                    w = T.meta_var(tx // 32)
                    lane = T.meta_var(tx % 32)
                    n0 = T.meta_var((bx // CS) * TILE + lane * V)
                    k0 = T.meta_var((r * G + w) * SP)  # this warp's channels: [k0, k0 + SP)
                    for i in T.unroll(M):
                        for v in T.unroll(V):
                            acc[i, v] = T.float32(0)
                    for ch in range(NCH):
                        # compaction of CH channels: all loads first, then one ballot per 32
                        for q in T.unroll(NQ):
                            c = T.meta_var(k0 + ch * CH + q * 32 + lane)
                            act[q] = 0
                            if ch * CH + q * 32 + lane < SP and c < K:
                                for i in T.unroll(M):
                                    xv[q, i] = T.Cast("float32", X[i, c])
                                    act[q] = T.max(act[q], T.Cast("int32", T.fabs(xv[q, i]) > TH[c]))
                        cnt[0] = 0
                        for q in T.unroll(NQ):
                            c = T.meta_var(k0 + ch * CH + q * 32 + lane)
                            below = T.meta_var(T.shift_left(T.uint32(1), T.Cast("uint32", lane)) - 1)
                            bal[0] = T.call_extern("uint32", "__ballot_sync", T.uint32(0xFFFFFFFF), act[q])
                            if act[q] > 0:
                                pos = T.meta_var(cnt[0] + T.popcount(T.bitwise_and(bal[0], below)))
                                idx[w, pos] = c
                                for i in T.unroll(M):
                                    xs[w, pos, i] = T.if_then_else(T.fabs(xv[q, i]) > TH[c], xv[q, i], 0.0)
                            cnt[0] = cnt[0] + T.popcount(bal[0])
                        T.evaluate(T.call_extern("void", "__syncwarp"))
                        if n0 < N:
                            for jo in range((cnt[0] + U - 1) // U):
                                for u in T.unroll(U):
                                    if jo * U + u < cnt[0]:
                                        for v in T.vectorized(V):
                                            wv[u, v] = W[idx[w, jo * U + u], n0 + v]
                                for u in T.unroll(U):
                                    if jo * U + u < cnt[0]:
                                        for i in T.unroll(M):
                                            for v in T.unroll(V):
                                                acc[i, v] = acc[i, v] + xs[w, jo * U + u, i] * T.Cast(
                                                    "float32", wv[u, v]
                                                )
                        T.evaluate(T.call_extern("void", "__syncwarp"))
                    # the block's sum over its warps
                    for i in T.unroll(M):
                        for v in T.vectorized(V):
                            part[w, i, lane * V + v] = acc[i, v]
                    T.tvm_storage_sync("shared")
                    for e in T.unroll(NRED):
                        if e * TPB + tx < M * TILE:
                            rsum[0] = T.float32(0)
                            for g in T.unroll(G):
                                rsum[0] = rsum[0] + part[g, (e * TPB + tx) // TILE, (e * TPB + tx) % TILE]
                            bsum[(e * TPB + tx) // TILE, (e * TPB + tx) % TILE] = rsum[0]
                    T.tvm_storage_sync("shared")
                    # the cluster's sum: block r finishes columns [r * CPR, +CPR) from every
                    # block's bsum (distributed shared memory, fixed order: deterministic)
                    T.cuda.cluster_sync()
                    for e in T.unroll(NOUT):
                        row = T.meta_var((e * TPB + tx) // CPR)
                        col = T.meta_var(r * CPR + (e * TPB + tx) % CPR)  # within the tile
                        if e * TPB + tx < M * CPR:
                            rsum[0] = T.float32(0)
                            for q in T.unroll(CS):
                                T.evaluate(
                                    T.ptx.mapa.shared__cluster.u32(
                                        addr[0],
                                        T.cuda.cvta_generic_to_shared(T.address_of(bsum[row, col])),
                                        T.uint32(q),
                                    )
                                )
                                T.evaluate(T.ptx.ld.shared__cluster.f32(rv[0], addr[0]))
                                rsum[0] = rsum[0] + rv[0]
                            if (bx // CS) * TILE + col < N:
                                Y[row, (bx // CS) * TILE + col] = T.Cast(XD, rsum[0])
                    T.cuda.cluster_sync()  # no block leaves while others read its shared memory

    sym = f"sg_act_cuda_m{m}_n{n}_k{k}_{next(_COUNTER)}"
    return CUDAActKernel(main.with_attr("global_symbol", sym), (m, n, k), G, CS, U, CH, V, XD)


# --------------------------------------------------------------------------- dispatch


def has_clusters(target: Any) -> bool:
    """True for a CUDA target of compute capability 9.0 or newer (thread-block clusters)."""
    digits = "".join(ch for ch in str(target.attrs.get("arch", "")) if ch.isdigit())
    return int(digits or 0) >= 90


#: fixed cost per call the bytes model charges the fused kernel (compaction + the last
#: block's pass; the W bytes it skips must pay for it)
MODEL_FIXED_SECONDS = 3e-6


def decide_cuda(ctx: Any, w: np.ndarray, th: np.ndarray, m: int, kind: str, cache: dict) -> tuple[Any, dict]:
    """The CUDA counterpart of `act_kernels._decide` (same record, same `GUARD` rule):
    the fused kernel for W_onnx[K, N] (fp16 in the kernel), thresholds th[K] and M = m,
    against the dense matmul the model would run otherwise -- the best of dlight on the
    model's float32 W, our fp16 dense row kernel (`cuda_kernels`) and cuBLAS where it
    loads. Measured on the GPU (L2 flushed, `cuda_dispatch.GPUTimer`) when one is
    visible, at the model's calibrated activation sparsity (else `ASSUMED_SPARSITY`) and
    at `GUARD_FRACTION` of it; without a GPU a bytes model decides (fp16 W bytes of the
    union of active channels over the M rows, plus `MODEL_FIXED_SECONDS`), and the record
    says ``measured: false``. Decisions go to ``ctx.db`` under keys that say whether they
    were measured."""
    from . import act_kernels as ak
    from . import cublas
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
        return ak._Chosen(kern.symbol, kern.prim_func, {"th": th32, "w": w16})

    stored = ctx.db.get(key)
    if stored is not None:
        rec = dict(stored, from_db=True)
        cache[key] = (chosen(rec["kernel"]) if rec["chosen"] == "fused" else None, rec)
        return cache[key]
    declined = (
        "the CUDA kernel needs sm_90+ (thread-block clusters)" if not has_clusters(ctx.target)
        else "the CUDA kernel needs N % 4 == 0" if n % 4 else None
    )  # fmt: skip
    if declined:
        return None, {"technique": "activation_sparsity", "M": m, "weight_shape": [k, n], "threshold": kind,
                      "chosen": "dense", "reason": declined}  # fmt: skip
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
        if cublas.available():  # dispatch may give the dense matmul to cuBLAS
            dense_s["cublas"] = timer.kernel(ck.build("cublas", w_nk, m, ctx.target, "float16"), m, k)
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
