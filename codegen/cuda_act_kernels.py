"""Fused activation-sparse GEMV/GEMM for CUDA: ``Y = where(|X| > T, X, 0) @ W`` for M <= 8.

fp16 storage (``X[M, K]``, ``W[K, N]`` as ONNX stores it: one contiguous row per input
channel, ``Y[M, N]``), fp32 thresholds ``T[K]`` and fp32 accumulation. TEAL's decode kernel
(Liu et al., "Training-Free Activation Sparsity in Large Language Models", 2024) with the
union of active channels over the M rows. One PrimFunc, two kernel launches:

1. ``grid = NT x KS`` blocks of ``threads`` threads: block (t, s) owns outputs
   ``[t * threads * 8, +threads * 8)`` and the input slice ``[s * SL, +SL)`` (SL <=
   threads). Thread i tests channel ``s * SL + i``; the block compacts the active channels
   into shared memory (``__ballot_sync`` per warp, popcounts, a prefix over the warps:
   deterministic order), with their thresholded x values beside them; then each thread
   walks the active list, ``unroll`` channels at a time, with one 16-byte load of 8 fp16
   weights per channel (a warp reads 512 contiguous bytes of a row), and writes its fp32
   partial sums to the workspace ``WS[KS, M, N]``.
2. a reduction over the KS partials, cast to fp16.

The split over K (``KS`` slices) gives enough blocks to fill an H100 at N = 4096.
Needs ``N % 8 == 0``. Function attributes ``tirx.noalias`` and ``tirx.is_scheduled``.

Measured (`benchmarks/act_kernels.py --gpu`, H200, L2 flushed, vs cuBLAS ``F.linear`` fp16,
W 4096x11008 / 11008x4096, M = 1): 0.90-0.95x at 0 % activation sparsity, 1.34-1.36x at
50 %, 1.71-1.74x at 70 %, 2.3-2.4x at 90 %; max relative error <= 4.4e-4. About 5 µs per
call are fixed cost (compaction before the first W load, the second launch and the fp32
partials), which caps the gain at low sparsity. M = 4 / 8: the union of independent rows is
dense (0.94 / 1.00 of the channels at 50 %), and the kernel is 0.6-0.8x cuBLAS there, so a
dispatcher must keep cuBLAS for M > 1 unless the rows share their active channels. An
earlier version (warp 0 compacting serially, 4 loads in flight) was 1.0x at 50 %.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from tvm.script import tirx as T

__all__ = ["CUDAActKernel", "act_cuda_func", "plan"]

_COUNTER = itertools.count()


@dataclass(frozen=True)
class CUDAActKernel:
    """The PrimFunc and its launch plan; call as ``f(X, T, W, WS, Y)`` (WS fp32 ``ws_shape``)."""

    prim_func: Any
    shape: tuple[int, int, int]  # (M, N, K)
    threads: int
    k_slices: int
    unroll: int

    @property
    def ws_shape(self) -> tuple[int, int, int]:
        m, n, _ = self.shape
        return (self.k_slices, m, n)

    @property
    def symbol(self) -> str:
        return str(self.prim_func.attrs["global_symbol"])


def plan(m: int, n: int, k: int, threads: int = 128, blocks_per_sm: int = 4, sms: int = 132) -> int:
    """K slices: at most `threads` channels each (one per thread for the compaction), and
    enough to give about `blocks_per_sm` blocks per SM (fewer for large M, whose fp32
    partials grow with the slice count)."""
    nt = -(-n // (threads * 8))
    per_sm = blocks_per_sm if m <= 2 else max(1, blocks_per_sm // 2)
    return max(-(-k // threads), min(k // 16, -(-(per_sm * sms) // nt)))


def act_cuda_func(m: int, n: int, k: int, threads: int = 128, k_slices: int | None = None, unroll: int = 8):
    """Build the `CUDAActKernel` for ``(M, N, K)``; see the module docstring."""
    if not 1 <= m <= 8:
        raise ValueError(f"the CUDA activation-sparse kernel handles 1 <= M <= 8; got M={m}")
    if n % 8:
        raise ValueError(f"the CUDA activation-sparse kernel needs N % 8 == 0; got N={n}")
    if threads % 32 or not 32 <= threads <= 1024:
        raise ValueError(f"threads must be a multiple of 32 in [32, 1024]; got {threads}")
    ks = int(k_slices or plan(m, n, k, threads))
    sl = -(-k // ks)
    if sl > threads:
        raise ValueError(
            f"a K slice of {sl} channels exceeds the {threads} threads of a block; use more slices"
        )
    ks = -(-k // sl)
    nt = -(-n // (threads * 8))
    M, N, K, TPB, KS, SL, NT, U = m, n, k, threads, ks, sl, nt, unroll
    NW = TPB // 32
    RB = 256  # threads per block of the reduction kernel
    NR = -(-(M * N) // RB)
    RU = 4  # partials summed per step of the reduction

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float16"),
        TH: T.Buffer((K,), "float32"),
        W: T.Buffer((K, N), "float16"),
        WS: T.Buffer((KS, M, N), "float32"),
        Y: T.Buffer((M, N), "float16"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for bx in T.thread_binding(NT * KS, thread="blockIdx.x"):
            for tx in T.thread_binding(TPB, thread="threadIdx.x"):
                idx = T.decl_buffer((SL,), "int32", scope="shared")
                xs = T.decl_buffer((SL, M), "float32", scope="shared")
                wcnt = T.decl_buffer((NW,), "int32", scope="shared")
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
                    for i in T.unroll(M):
                        for v in T.unroll(8):
                            WS[s, i, n0 + v] = acc[i, v]
        for rb in T.thread_binding(NR, thread="blockIdx.x"):
            for rt in T.thread_binding(RB, thread="threadIdx.x"):
                r = T.decl_buffer((RU,), "float32", scope="local")
                e = T.meta_var(rb * RB + rt)
                if e < M * N:
                    for u in T.unroll(RU):
                        r[u] = T.float32(0)
                    for q in range((KS + RU - 1) // RU):
                        for u in T.unroll(RU):
                            if q * RU + u < KS:
                                r[u] = r[u] + WS[q * RU + u, e // N, e % N]
                    for u in T.unroll(RU - 1):
                        r[0] = r[0] + r[u + 1]
                    Y[e // N, e % N] = T.Cast("float16", r[0])

    sym = f"sg_act_cuda_m{m}_n{n}_k{k}_{next(_COUNTER)}"
    return CUDAActKernel(main.with_attr("global_symbol", sym), (m, n, k), TPB, KS, U)
