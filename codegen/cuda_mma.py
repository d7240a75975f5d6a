"""Dense tensor-core GEMM for CUDA: ``Y[M, N] = X[M, K] @ W[N, K]^T``, W fp16, fp32 accumulation.

The dense fallback that sparse kernels are dispatched against at M >= 16 (prefill), written
by us as a scheduled TVMScript PrimFunc with explicit PTX (TVM's dlight Matmul schedule
reaches 36-53 % of cuBLAS on fp16 NT, and its small-M paths leave most SMs idle).

Contract: W fp16 ``[N, K]`` (K contiguous, the canonical orientation of `formats` /
`cuda_kernels`); X float16 or float32 (cast to fp16 when staged); Y in X's dtype. The
kernel is specialised on (M, N, K) and a schedule (`SCHEDULE_SPACE`); it needs
``N % bn == 0`` and ``K % bk == 0`` (`formats.UnfitError` otherwise); any M >= 1 (rows past
M are loaded clamped to row M - 1 and never stored).

Two kernels, both one thread block per ``bm x bn`` tile of Y (schedule key ``wg``):

``wg = 0`` (mma.sync, any sm_80+ target; `wm x wn x wk` warps):

* Main loop over K in ``bk`` steps, ``stages``-deep software pipeline: the tiles of X and
  W for step ``kt + stages - 1`` are copied global -> shared with ``cp.async.cg`` (16 bytes
  per thread and copy, one commit group per step) while step ``kt`` is computed; a
  ``cp.async.wait_group stages - 2`` plus one barrier per step orders them. fp32 X is
  loaded, converted and stored to shared (plain loads) after the step's math.
* Shared tiles are row-major with rows padded by 16 bytes (``bk + 8`` halves), so the 8 row
  addresses of each ``ldmatrix`` 8x8 matrix fall in distinct bank groups.
* Warp tile ``(bm / wm) x (bn / wn)`` over a ``bk / wk`` slice of each K step: fragments by
  ``ldmatrix.x4`` (A: 16x16, B: two 8-column tiles of 16 K each, straight from W's [N, K]
  rows, no transpose), products by ``mma.sync.m16n8k16.row.col`` f16 x f16 -> f32.
* ``wk > 1`` splits K inside the block (small M: every warp streams its own part of W);
  the partial accumulators are summed through shared memory at the end.
* Blocks are rasterised in groups of up to 16 M tiles (N tiles outer inside a group) so
  a wave of blocks shares its tiles of X and W in L2.

``wg = 1`` (Hopper ``wgmma``, needs an sm_90a target (`hopper_target`) and fp16 X):
``bm / 64`` warpgroups, each issuing ``wgmma.mma_async m64 n{bn} k16`` with both operands
read from shared memory through matrix descriptors; cp.async stores the 64-wide K tiles in
the 128-byte-swizzled K-major layout the descriptors name (see `_wgmma_func`).

Small M (16, 64) is bound by reading W: those schedules take ``bm = 16 / 64`` and narrow
``bn`` (one block per 16-32 columns of W: >= 128 blocks for N = 4096) with ``wk`` warps
splitting K, so all SMs stream W with several ``bk``-steps of copies in flight.

Measured (H100 80GB, fp16, L2 flushed, `benchmarks/gpu_prefill.py`; x cuBLAS = cuBLAS time /
ours, best timed schedule): M = 16: 0.93-0.95 (mma.sync 16-row tiles); M = 64: 0.94-0.99
(wgmma 64-row tiles); M = 256: 0.69-0.78; M = 2048: 0.64-0.72 (wgmma) on 4096x4096,
4096x11008, 11008x4096, 8192x28672 (K x N). mma.sync alone reaches 0.39-0.47 at M >= 256.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from tvm.script import tirx as T

from sparsegraph.codegen import formats as fmts
from sparsegraph.codegen.cuda_kernels import CUDAKernel, cuda_target

__all__ = ["SCHEDULE_SPACE", "build", "hopper_target", "schedules", "smem_bytes"]

WARP = 32
SMEM_MAX = 227 * 1024  # bytes of dynamic shared memory one block may take (sm_90)
GROUP_M = 16  # M tiles per rasterisation group
_SYMBOLS = itertools.count()


def _s(bm, bn, bk, wm, wn, wk, stages):
    return {"wg": 0, "bm": bm, "bn": bn, "bk": bk, "wm": wm, "wn": wn, "wk": wk, "stages": stages}


def _w(bm, bn, stages):
    """A Hopper (wgmma, sm_90a) schedule: bm / 64 warpgroups, K steps of 64."""
    return {"wg": 1, "bm": bm, "bn": bn, "bk": 64, "wm": bm // 64, "wn": 1, "wk": 1, "stages": stages}


#: schedules dispatch times (first = default); keys: block tile bm x bn x bk, warps
#: wm x wn x wk (along M, N and K), pipeline depth
SCHEDULE_SPACE: list[dict[str, int]] = [
    # Hopper wgmma (sm_90a target, fp16 X)
    _w(128, 256, 3),
    _w(128, 128, 4),
    _w(64, 256, 4),
    _w(64, 128, 4),
    _w(64, 64, 6),
    _w(64, 32, 8),
    # large M: compute-bound tiles
    _s(128, 256, 64, 2, 4, 1, 3),
    _s(128, 128, 64, 2, 2, 1, 3),
    _s(64, 128, 32, 2, 2, 1, 4),
    _s(128, 128, 32, 2, 2, 1, 4),
    _s(128, 256, 32, 2, 4, 1, 3),
    _s(128, 128, 32, 2, 4, 1, 4),
    _s(128, 64, 32, 2, 2, 1, 4),
    # small M: stream W with all SMs
    _s(16, 32, 128, 1, 2, 4, 4),
    _s(16, 16, 256, 1, 1, 8, 3),
    _s(16, 64, 128, 1, 4, 2, 4),
    _s(16, 32, 256, 1, 2, 4, 4),
    _s(32, 32, 128, 1, 2, 4, 4),
    _s(64, 32, 128, 2, 2, 2, 4),
    _s(64, 64, 64, 2, 2, 2, 4),
]


def smem_bytes(s: dict[str, int]) -> int:
    """Dynamic shared memory of a schedule: the pipeline's tiles plus the split-K buffer."""
    if s["wg"]:
        return s["stages"] * (s["bm"] + s["bn"]) * 128 + 1024
    tiles = s["stages"] * (s["bm"] + s["bn"]) * (s["bk"] + 8) * 2
    red = (s["wk"] - 1) * s["bm"] * s["bn"] * 4
    return tiles + red


def _check(m: int, n: int, k: int, s: dict[str, int]) -> None:
    """Raise `formats.UnfitError` unless schedule `s` can run (M, N, K)."""
    bm, bn, bk, wm, wn, wk = (s[key] for key in ("bm", "bn", "bk", "wm", "wn", "wk"))
    if s["wg"] and (
        bk != 64 or bm not in (64, 128) or bn % 16 or bn > 256 or (wm, wn, wk) != (bm // 64, 1, 1)
    ):
        raise fmts.UnfitError(f"wgmma schedule {s}: bk = 64, bm in (64, 128), bn % 16 == 0 and <= 256")
    if m < 1 or n % bn or k % bk:
        raise fmts.UnfitError(f"mma schedule {s} needs N % {bn} == 0 and K % {bk} == 0; got N={n}, K={k}")
    if bm % (16 * wm) or bn % (16 * wn) or bk % (16 * wk) or s["stages"] < 2:
        raise fmts.UnfitError(f"mma schedule {s}: warp tiles must be multiples of 16 and stages >= 2")
    if wm * wn * wk > 32 or smem_bytes(s) > SMEM_MAX:
        raise fmts.UnfitError(f"mma schedule {s}: too many warps or {smem_bytes(s)} bytes of shared memory")


def schedules(m: int, n: int, k: int, x_dtype: str = "float16", wgmma: bool = True) -> list[dict[str, int]]:
    """The schedules of `SCHEDULE_SPACE` that fit (M, N, K) and X's dtype, the likely best
    first: tiles of at most M rows (rounded up to 16), the tallest first, wgmma before
    mma.sync. ``wgmma=False`` leaves out the Hopper schedules (targets other than sm_90a)."""
    fit = []
    for s in SCHEDULE_SPACE:
        if s["wg"] and (not wgmma or x_dtype != "float16"):
            continue
        try:
            _check(m, n, k, s)
        except fmts.UnfitError:
            continue
        fit.append(s)
    mp = -(-m // 16) * 16
    return sorted(fit, key=lambda s: (s["bm"] > mp, -s["bm"] if s["bm"] <= mp else s["bm"], -s["wg"]))


def mma_m16n8k16(a, a_offset, b, b_offset, c, c_offset):
    """``mma.sync.m16n8k16.row.col`` f32 += f16 x f16 on local fragment buffers: A's 8 fp16 at
    ``a[a_offset]``, B's 4 at ``b[b_offset]``, C's 4 fp32 at ``c[c_offset]`` (element offsets;
    the buffers must keep their scalar types, not be rewritten to vector types)."""
    return T.ptx_legacy.mma(
        "m16n8k16", "row", "col", "fp16", "fp16", "fp32",
        a.data, a_offset, b.data, b_offset, c.data, c_offset, False, dtype="float32",
    )  # fmt: skip


def _mma_func(M, N, K, xdtype, bm, bn, bk, wm, wn, wk, stages):
    """The PrimFunc ``main(x[M, K], w[N, K], y[M, N])`` (see the module docstring)."""
    NW = wm * wn * wk
    NT = NW * WARP
    TM, TN, KW = bm // wm, bn // wn, bk // wk  # warp tile and its K slice per step
    MI, NI = TM // 16, TN // 8  # m16 tiles and n8 tiles per warp
    ACC = MI * NI * 4
    LDS = bk + 8  # padded shared row (halves)
    A_ST, B_ST = bm * LDS, bn * LDS  # one stage of each tile
    B0 = stages * A_ST  # W's stages follow X's in shared memory
    CPR = bk // 8  # 16-byte chunks per row
    A_IT, B_IT = -(-bm * CPR // NT), -(-bn * CPR // NT)
    A_EVEN, B_EVEN = bm * CPR % NT == 0, bn * CPR % NT == 0
    KT = K // bk
    GM, GN = -(-M // bm), N // bn
    GROUP = min(GROUP_M, GM)
    FP16 = xdtype == "float16"
    RED = max(1, (wk - 1) * (wm * wn) * WARP * ACC)

    @T.macro
    def load_w(w, Bs, slot, kt, n0, tid):
        for i in T.unroll(B_IT):
            c = T.meta_var(i * NT + tid)
            if B_EVEN or c < bn * CPR:
                T.ptx["cp.async.cg.shared.global"](
                    T.address_of(Bs[B0 + slot * B_ST + c // CPR * LDS + c % CPR * 8]),
                    T.address_of(w[n0 + c // CPR, kt * bk + c % CPR * 8]),
                    16,
                )

    @T.macro
    def load_x16(x, As, slot, kt, m0, tid):
        for i in T.unroll(A_IT):
            c = T.meta_var(i * NT + tid)
            if A_EVEN or c < bm * CPR:
                T.ptx["cp.async.cg.shared.global"](
                    T.address_of(As[slot * A_ST + c // CPR * LDS + c % CPR * 8]),
                    T.address_of(x[T.min(m0 + c // CPR, M - 1), kt * bk + c % CPR * 8]),
                    16,
                )

    @T.macro
    def store_x32(x, As, slot, kt, m0, tid):
        for i in T.unroll(A_IT):
            c = T.meta_var(i * NT + tid)
            if A_EVEN or c < bm * CPR:
                for v in T.vectorized(8):
                    As[slot * A_ST + c // CPR * LDS + c % CPR * 8 + v] = T.Cast(
                        "float16", x[T.min(m0 + c // CPR, M - 1), kt * bk + c % CPR * 8 + v]
                    )

    @T.macro
    def compute(As, Bs, af, bf, acc, slot, wmi, wni, wki, lane):
        for kk in T.unroll(KW // 16):
            k0 = T.meta_var(wki * KW + kk * 16)
            for mi in T.unroll(MI):
                T.ptx_legacy.ldmatrix(
                    False,
                    4,
                    ".b16",
                    af.data,
                    mi * 8,
                    As.data,
                    slot * A_ST + (wmi * TM + mi * 16 + lane % 16) * LDS + k0 + lane // 16 * 8,
                    dtype="float16",
                )
            for nj in T.unroll(NI // 2):
                T.ptx_legacy.ldmatrix(
                    False,
                    4,
                    ".b16",
                    bf.data,
                    nj * 8,
                    Bs.data,
                    B0
                    + slot * B_ST
                    + (wni * TN + nj * 16 + lane % 8 + lane // 16 * 8) * LDS
                    + k0
                    + lane // 8 % 2 * 8,
                    dtype="float16",
                )
            for mi in T.unroll(MI):
                for ni in T.unroll(NI):
                    mma_m16n8k16(af, mi * 8, bf, ni * 4, acc, (mi * NI + ni) * 4)

    @T.prim_func
    def main(x: T.Buffer((M, K), xdtype), w: T.Buffer((N, K), "float16"), y: T.Buffer((M, N), xdtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for bid in T.thread_binding(GM * GN, thread="blockIdx.x"):
            for ty in T.thread_binding(NW, thread="threadIdx.y"):
                for lane in T.thread_binding(WARP, thread="threadIdx.x"):
                    # one dynamic buffer: the X stages, then the W stages (several shared.dyn
                    # buffers would be merged, which breaks the raw pointers of ldmatrix)
                    sm = T.decl_buffer((stages * (A_ST + B_ST),), "float16", scope="shared.dyn")
                    red = T.decl_buffer((RED,), "float32", scope="shared")
                    af = T.decl_buffer((MI * 8,), "float16", scope="local")
                    bf = T.decl_buffer((NI * 4,), "float16", scope="local")
                    acc = T.decl_buffer((ACC,), "float32", scope="local")
                    tid = T.meta_var(ty * WARP + lane)
                    # grouped rasterisation: GROUP M tiles share each N tile's wave
                    gsz = T.meta_var(T.min(GM - bid // (GROUP * GN) * GROUP, GROUP))
                    m0 = T.meta_var((bid // (GROUP * GN) * GROUP + bid % (GROUP * GN) % gsz) * bm)
                    n0 = T.meta_var(bid % (GROUP * GN) // gsz * bn)
                    wki = T.meta_var(ty // (wm * wn))
                    wmi = T.meta_var(ty % (wm * wn) // wn)
                    wni = T.meta_var(ty % wn)
                    for i in T.unroll(ACC):
                        acc[i] = T.float32(0)
                    for s in T.unroll(stages - 1):
                        if s < KT:
                            load_w(w, sm, s, s, n0, tid)
                            if FP16:
                                load_x16(x, sm, s, s, m0, tid)
                            else:
                                store_x32(x, sm, s, s, m0, tid)
                        T.ptx.cp.async_.commit_group()
                    for kt in range(KT):
                        T.ptx.cp.async_.wait_group(stages - 2)
                        T.tvm_storage_sync("shared")
                        if kt + stages - 1 < KT:
                            load_w(w, sm, (kt + stages - 1) % stages, kt + stages - 1, n0, tid)
                            if FP16:
                                load_x16(x, sm, (kt + stages - 1) % stages, kt + stages - 1, m0, tid)
                        T.ptx.cp.async_.commit_group()
                        compute(sm, sm, af, bf, acc, kt % stages, wmi, wni, wki, lane)
                        if not FP16:
                            if kt + stages - 1 < KT:
                                store_x32(x, sm, (kt + stages - 1) % stages, kt + stages - 1, m0, tid)
                    if wk > 1:  # sum the K slices of the wk warp groups through shared memory
                        T.ptx.cp.async_.wait_group(0)
                        T.tvm_storage_sync("shared")
                        if wki > 0:
                            for i in T.unroll(ACC):
                                red[(((wki - 1) * wm * wn + ty % (wm * wn)) * ACC + i) * WARP + lane] = acc[i]
                        T.tvm_storage_sync("shared")
                    if wki == 0:
                        for g in T.unroll(wk - 1):
                            for i in T.unroll(ACC):
                                acc[i] = (
                                    acc[i] + red[((g * wm * wn + ty % (wm * wn)) * ACC + i) * WARP + lane]
                                )
                        for mi in T.unroll(MI):
                            for ni in T.unroll(NI):
                                for h in T.unroll(2):
                                    row = T.meta_var(m0 + wmi * TM + mi * 16 + h * 8 + lane // 4)
                                    if row < M:
                                        for v in T.vectorized(2):
                                            y[row, n0 + wni * TN + ni * 8 + lane % 4 * 2 + v] = T.Cast(
                                                xdtype, acc[(mi * NI + ni) * 4 + h * 2 + v]
                                            )

    return main


def _wgmma_call(n):
    """``wgmma.mma_async m64n{n}k16 f32 += f16 x f16`` with A and B from shared memory (both
    K-major), the accumulator ``acc[0 : n / 2]`` read and written in place."""

    def call(acc, adesc, bdesc):
        op = getattr(T.ptx.wgmma.mma_async.sync.aligned, f"m64n{n}k16").f32.f16.f16
        return op(*[acc[i] for i in range(n // 2)], adesc, bdesc, T.ptx.pred(True), 1, 1, 0, 0)

    return call


def _desc(addr):
    """The wgmma shared-memory matrix descriptor of a K-major tile with 128-byte swizzle
    starting at shared address `addr`: rows of 128 bytes, 8-row groups 1024 bytes apart
    (stride byte offset), leading byte offset unused (1), layout type 1 (128B swizzle)."""
    return (
        T.Cast("uint64", T.bitwise_and(T.shift_right(addr, T.uint32(4)), T.uint32(0x3FFF)))
        | T.shift_left(T.uint64(1), T.uint64(16))
        | T.shift_left(T.uint64(64), T.uint64(32))
        | T.shift_left(T.uint64(1), T.uint64(62))
    )


def _wgmma_func(M, N, K, bm, bn, stages):
    """Hopper variant (sm_90a, fp16 X): ``bm / 64`` warpgroups, each ``wgmma m64 n{bn} k16``
    on ``bm x 64`` / ``bn x 64`` tiles that cp.async writes into shared memory in the
    128-byte-swizzled K-major layout wgmma reads (16-byte chunk j of row r stored at chunk
    ``j ^ (r % 8)``); a ``fence.proxy.async`` makes the copies visible to the tensor cores;
    each K step's 4 wgmmas are committed and waited before the barrier that frees a stage."""
    NWG = bm // 64
    NT = NWG * 128
    A_ST, B_ST = bm * 64, bn * 64  # halves per stage (rows of 64 halves = 128 bytes)
    B0 = stages * A_ST
    A_IT, B_IT = bm * 8 // NT, bn * 8 // NT  # 16-byte chunks per thread and stage
    KT = K // 64
    GM, GN = -(-M // bm), N // bn
    GROUP = min(GROUP_M, GM)
    ACC = bn // 2
    SM = stages * (A_ST + B_ST) + 512  # + 1 KB to align the tiles to the 1024-byte swizzle period
    mma = _wgmma_call(bn)

    @T.macro
    def load(x, w, sm, pad, slot, kt, m0, n0, tid):
        for i in T.unroll(A_IT):
            c = T.meta_var(i * NT + tid)
            T.ptx["cp.async.cg.shared.global"](
                T.address_of(sm[pad + slot * A_ST + c // 8 * 64 + T.bitwise_xor(c % 8, c // 8 % 8) * 8]),
                T.address_of(x[T.min(m0 + c // 8, M - 1), kt * 64 + c % 8 * 8]),
                16,
            )
        for i in T.unroll(B_IT):
            c = T.meta_var(i * NT + tid)
            T.ptx["cp.async.cg.shared.global"](
                T.address_of(sm[pad + B0 + slot * B_ST + c // 8 * 64 + T.bitwise_xor(c % 8, c // 8 % 8) * 8]),
                T.address_of(w[n0 + c // 8, kt * 64 + c % 8 * 8]),
                16,
            )

    @T.prim_func
    def main(x: T.Buffer((M, K), "float16"), w: T.Buffer((N, K), "float16"), y: T.Buffer((M, N), "float16")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for bid in T.thread_binding(GM * GN, thread="blockIdx.x"):
            for tid in T.thread_binding(NT, thread="threadIdx.x"):
                sm = T.decl_buffer((SM,), "float16", scope="shared.dyn")
                acc = T.decl_buffer((ACC,), "float32", scope="local")
                base = T.meta_var(T.cuda.cvta_generic_to_shared(T.address_of(sm[0])))
                pad = T.meta_var(
                    T.Cast(
                        "int32",
                        T.bitwise_and(T.uint32(1024) - T.bitwise_and(base, T.uint32(1023)), T.uint32(1023)),
                    )
                    // 2
                )
                gsz = T.meta_var(T.min(GM - bid // (GROUP * GN) * GROUP, GROUP))
                m0 = T.meta_var((bid // (GROUP * GN) * GROUP + bid % (GROUP * GN) % gsz) * bm)
                n0 = T.meta_var(bid % (GROUP * GN) // gsz * bn)
                g = T.meta_var(tid // 128)
                for i in T.unroll(ACC):
                    acc[i] = T.float32(0)
                for s in T.unroll(stages - 1):
                    if s < KT:
                        load(x, w, sm, pad, s, s, m0, n0, tid)
                    T.ptx.cp.async_.commit_group()
                for kt in range(KT):
                    T.ptx.cp.async_.wait_group(stages - 2)
                    T.ptx["fence.proxy.async.shared::cta"]()
                    T.tvm_storage_sync("shared")
                    if kt + stages - 1 < KT:
                        load(x, w, sm, pad, (kt + stages - 1) % stages, kt + stages - 1, m0, n0, tid)
                    T.ptx.cp.async_.commit_group()
                    T.ptx.wgmma.fence.sync.aligned()
                    for kk in T.unroll(4):
                        mma(
                            acc,
                            _desc(
                                base
                                + T.Cast("uint32", (pad + kt % stages * A_ST + g * 64 * 64) * 2 + kk * 32)
                            ),
                            _desc(base + T.Cast("uint32", (pad + B0 + kt % stages * B_ST) * 2 + kk * 32)),
                        )
                    T.ptx.wgmma.commit_group.sync.aligned()
                    T.ptx.wgmma.wait_group.sync.aligned(0)
                for i in T.unroll(bn // 8):
                    for h in T.unroll(2):
                        row = T.meta_var(m0 + g * 64 + tid % 128 // 32 * 16 + h * 8 + tid % 32 // 4)
                        if row < M:
                            for v in T.vectorized(2):
                                y[row, n0 + i * 8 + tid % 4 * 2 + v] = T.Cast(
                                    "float16", acc[i * 4 + h * 2 + v]
                                )

    return main


def build(w: Any, m: int, target: Any = None, x_dtype: str = "float16", **schedule: int) -> CUDAKernel:
    """The tensor-core kernel for ``Y = X @ W^T`` at M = m (format ``"mma"``).

    `w`: W ``[N, K]`` (any float dtype; stored as fp16). `schedule`: keys of a
    `SCHEDULE_SPACE` entry (missing keys from the first schedule that fits, see
    `schedules`). Returns a `cuda_kernels.CUDAKernel` with weights ``{"w": W fp16 [N, K]}``
    and signature ``(X, w, Y)``. `target`: the target it will be compiled for, when known
    (wgmma schedules need sm_90a; compile those with `hopper_target`). Raises
    `formats.UnfitError` when the schedule cannot run this shape, X dtype or target.
    """
    w16 = np.ascontiguousarray(np.asarray(w).astype(np.float16))
    if w16.ndim != 2:
        raise fmts.UnfitError(f"mma kernel needs a 2-D W [N, K]; got shape {w16.shape}")
    n, k = w16.shape
    if x_dtype not in ("float16", "float32"):
        raise fmts.UnfitError(f"mma kernel takes float16 or float32 X; got {x_dtype}")
    fit = schedules(m, n, k, x_dtype, wgmma=bool(schedule.get("wg", 0)))
    base = fit[0] if fit else SCHEDULE_SPACE[-1]
    sched = {**base, **{key: int(v) for key, v in schedule.items() if key in base}}
    if sched["wg"] and x_dtype != "float16":
        raise fmts.UnfitError("wgmma schedules take float16 X")
    if sched["wg"] and target is not None and str(target.attrs.get("arch", "")) != "sm_90a":
        raise fmts.UnfitError(f"wgmma schedules need an sm_90a target (`hopper_target`); got {target}")
    _check(m, n, k, sched)
    if sched["wg"]:
        prim = _wgmma_func(m, n, k, sched["bm"], sched["bn"], sched["stages"])
    else:
        keys = ("bm", "bn", "bk", "wm", "wn", "wk", "stages")
        prim = _mma_func(m, n, k, x_dtype, *(sched[key] for key in keys))
    symbol = f"sg_cuda_mma_m{m}_n{n}_k{k}_{next(_SYMBOLS)}"
    return CUDAKernel(
        "mma", (m, n, k), prim.with_attr("global_symbol", symbol), {"w": w16}, symbol, x_dtype, sched
    )


def hopper_target() -> Any:
    """The CUDA target wgmma schedules compile for (sm_90a; mma.sync schedules run on it too)."""
    return cuda_target("sm_90a")
