"""BSR on tensor cores for small batches: ``Y[M, N] = X[M, K] @ W.T``, W in BSR with blocks of
16 x 16 or multiples (fp16), M = 1..64, one ``mma.sync.m16n8k16`` per 16 x 16 sub-block and
8 rows of X.

At M = 16 the CUDA-core block kernel (`cuda_kernels._bsr_blocks_func`) does 16 FMAs per
weight and stops being bound by the weight bytes (on the H100, 8192->28672 BSR 16x16 at
90 %: 6.6x cuBLAS at M = 1, 2.7x at M = 16). Here the tensor cores do those products, so
the kernel can stay bound by the bytes it reads:

* the packed values are stored in the mma A-fragment order (`fragment_order`): lane l's 16
  bytes of a 16 x 16 sub-block are its registers a0..a3 (rows ``l // 4`` and ``l // 4 + 8``,
  columns ``2 (l % 4) + {0, 1}`` and ``+ 8``), so one 16-byte load per lane brings a whole
  sub-block into registers, a 512-byte warp load as in the block kernel, without ldmatrix
  or shared memory;
* A = the W sub-block (16 outputs x 16 input channels), B = 8 rows of X over those 16
  channels (b0, b1: channels ``2 (l % 4) + {0, 1}`` and ``+ 8`` of row ``l // 4``, two
  2-entry loads from global memory, L1/L2-resident; rows past M read as zeros), C = the
  16 x 8 partial of Y^T in fp32 registers;
* `ks` warps share a block row (each takes every ks-th block), `unroll` blocks in flight
  per warp; the warps' C fragments are summed through shared memory and written in X's
  dtype.

Fragment layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type".
Bytes read per weight entry: 2 (the BSR values) plus the block index, as the block kernel.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from tvm.script import tirx as T

from .cuda_kernels import CUDAKernel, block_row_grid
from .cuda_mma import mma_m16n8k16
from .formats import UnfitError

WARP = 32
MAX_M = 64
_SYMBOLS = itertools.count()


def _fragment_index() -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) [32, 8]: the 16 x 16 tile entry lane l holds as its k-th fp16 of a0..a3."""
    lane = np.arange(WARP)[:, None]
    i = np.arange(8)[None, :]
    rows = lane // 4 + 8 * ((i // 2) % 2)
    cols = 2 * (lane % 4) + i % 2 + 8 * (i // 4)
    return rows, cols


def fragment_order(blocks: np.ndarray) -> np.ndarray:
    """BSR block values ``[NB, r, c]`` (r, c multiples of 16; row = output, column = input
    channel) as the flat array the kernel reads: per block, its 16 x 16 sub-blocks in row-major
    order, each as 32 lanes x 8 fp16 in A-fragment order."""
    nb, r, c = blocks.shape
    if r % 16 or c % 16:
        raise ValueError(f"tensor-core BSR needs blocks of multiples of 16; got {r}x{c}")
    rows, cols = _fragment_index()
    sub = blocks.reshape(nb, r // 16, 16, c // 16, 16).transpose(0, 1, 3, 2, 4)  # [NB, RS, CS, 16, 16]
    return np.ascontiguousarray(sub[..., rows, cols]).reshape(-1)


def bsr_mma_func(M: int, N: int, K: int, NB: int, r: int, c: int, xdtype: str, ks: int, unr: int, sms: int):
    """The PrimFunc ``(x[M, K], vals, idx[NB] uint16, ptr[N / r + 1] int32, y[M, N])``; `vals`
    from `fragment_order`. See the module docstring."""
    if not 1 <= M <= MAX_M or r % 16 or c % 16 or N % r or K % c:
        raise ValueError(f"tensor-core BSR: M <= {MAX_M}, blocks of multiples of 16 dividing N and K")
    RS, CS = r // 16, c // 16
    SUB, MT = RS * CS, -(-M // 8)  # 16x16 sub-blocks per block, 8-row tiles of X
    NBR = N // r
    GRID, ITER = block_row_grid(NBR, ks * WARP, sms)
    ACC = RS * MT * 4

    @T.prim_func
    def main(
        x: T.Buffer((M, K), xdtype),
        vals: T.Buffer((NB * r * c,), "float16"),
        idx: T.Buffer((NB,), "uint16"),
        ptr: T.Buffer((NBR + 1,), "int32"),
        y: T.Buffer((M, N), xdtype),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for bx in T.thread_binding(GRID, thread="blockIdx.x"):
            for ty in T.thread_binding(ks, thread="threadIdx.y"):
                for lane in T.thread_binding(WARP, thread="threadIdx.x"):
                    red = T.decl_buffer((ks, ACC, WARP), "float32", scope="shared")
                    af = T.decl_buffer((unr * SUB * 8,), "float16", scope="local")
                    ld = T.decl_buffer((8,), "float16", scope="local")  # one 16-byte load
                    xv = T.decl_buffer((2,), xdtype, scope="local")  # one 4- or 8-byte load
                    bf = T.decl_buffer((MT * 4,), "float16", scope="local")
                    acc = T.decl_buffer((ACC,), "float32", scope="local")
                    g = T.meta_var(lane // 4)
                    t2 = T.meta_var(lane % 4 * 2)
                    for it in range(ITER):
                        br = T.meta_var(bx + it * GRID)
                        if br < NBR:
                            first = T.meta_var(ptr[br] + ty)
                            mine = T.meta_var((ptr[br + 1] - ptr[br] - ty + ks - 1) // ks)
                            for i in T.unroll(ACC):
                                acc[i] = T.float32(0)
                            for j in range((mine + unr - 1) // unr):
                                for u in T.unroll(unr):
                                    if j * unr + u < mine:
                                        for s in T.unroll(SUB):
                                            # through `ld`: a vector-typed `af` would shift the
                                            # mma operands' offsets to vector units
                                            for v in T.vectorized(8):
                                                ld[v] = vals[
                                                    ((first + (j * unr + u) * ks) * SUB + s) * 256
                                                    + lane * 8
                                                    + v
                                                ]
                                            for v in T.unroll(8):
                                                af[(u * SUB + s) * 8 + v] = ld[v]
                                for u in T.unroll(unr):
                                    if j * unr + u < mine:
                                        col0 = T.meta_var(
                                            T.Cast("int32", idx[first + (j * unr + u) * ks]) * c
                                        )
                                        for cs in T.unroll(CS):
                                            for mt in T.unroll(MT):
                                                row = T.meta_var(mt * 8 + g)
                                                for h in T.unroll(2):  # b0, b1: one 2-entry load each
                                                    if row < M:
                                                        for v in T.vectorized(2):
                                                            xv[v] = x[row, col0 + cs * 16 + h * 8 + t2 + v]
                                                    else:
                                                        for v in T.unroll(2):
                                                            xv[v] = T.Cast(xdtype, 0)
                                                    for v in T.unroll(2):
                                                        bf[mt * 4 + h * 2 + v] = T.Cast("float16", xv[v])
                                            for rs in T.unroll(RS):
                                                for mt in T.unroll(MT):
                                                    mma_m16n8k16(
                                                        af,
                                                        (u * SUB + rs * CS + cs) * 8,
                                                        bf,
                                                        mt * 4,
                                                        acc,
                                                        (rs * MT + mt) * 4,
                                                    )
                            for i in T.unroll(ACC):
                                red[ty, i, lane] = acc[i]
                        T.tvm_storage_sync("shared")
                        if br < NBR:
                            if ty == 0:
                                for s in T.unroll(1, ks):
                                    for i in T.unroll(ACC):
                                        acc[i] = acc[i] + red[s, i, lane]
                                # c0, c1: output row g, X rows t2 + {0, 1}; c2, c3: output row g + 8
                                for rs in T.unroll(RS):
                                    for mt in T.unroll(MT):
                                        for h in T.unroll(2):
                                            for v in T.unroll(2):
                                                if mt * 8 + t2 + v < M:
                                                    y[mt * 8 + t2 + v, br * r + rs * 16 + h * 8 + g] = T.Cast(
                                                        xdtype, acc[(rs * MT + mt) * 4 + h * 2 + v]
                                                    )
                        T.tvm_storage_sync("shared")

    return main


def build(packed: Any, m: int, x_dtype: str = "float32", ks: int = 4, unroll: int = 2, sms: int = 132):
    """The tensor-core kernel for a `cuda_kernels.Packed` bsr weight (blocks of multiples of 16)
    at M = m, as a `cuda_kernels.CUDAKernel` whose values are in `fragment_order`."""
    n, k = packed.shape
    r, c = packed.meta["block"]
    nb = packed.meta["NB"]
    if r % 16 or c % 16 or not 1 <= m <= MAX_M:
        raise UnfitError(
            f"tensor-core BSR needs blocks of multiples of 16 and M <= {MAX_M}; got {r}x{c}, M={m}"
        )
    weights = dict(packed.weights)
    weights["data"] = fragment_order(weights["data"].reshape(nb, r, c))
    prim = bsr_mma_func(m, n, k, nb, r, c, x_dtype, ks, unroll, sms)
    symbol = f"sg_cuda_bsr_mma_m{m}_n{n}_k{k}_{next(_SYMBOLS)}"
    sched = {"block": (r, c), "tc": 1, "ks": ks, "unroll": unroll}
    return CUDAKernel(
        "bsr", (m, n, k), prim.with_attr("global_symbol", symbol), weights, symbol, x_dtype, sched
    )
