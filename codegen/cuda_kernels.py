"""Sparse decode kernels for CUDA: ``Y[M, N] = X[M, K] @ W.T`` for M = 1..16 (64 on tensor
cores), W in fp16.

W comes in the canonical orientation ``W[N, K]`` (see `formats`). Every kernel stores W's
values in fp16 (accumulating in fp32) whatever X's dtype (float16 or float32; Y has X's
dtype), is specialised on (M, N, K, pattern sizes) and is written directly as a scheduled
TVMScript PrimFunc (thread bindings, vector loads, warp shuffles):

* X is staged once per thread block into shared memory as fp16, transposed to
  ``xs[k * MG + m]`` so one nonzero's M activations are one vector load (padded by a
  vector every 8 columns against bank conflicts). When
  ``K * M * 2`` bytes would not fit (``SMEM_LIMIT``), M is cut into groups of MG rows and
  a second grid dimension runs the groups (W is then read once per group). For csr, a
  cluster of two blocks can split X (and W) by column halves instead (``split``, see
  `_row_func`), so that each block stages all M rows of its half and W is read once.
* ``csr`` / ``dcsr`` / ``dcsr6`` / ``nm`` ("row kernels"): ``lpr`` lanes per output row (a warp per
  row, or 2 / 4 rows side by side per warp for short rows; ``rpw`` rows per warp, strided
  over the grid), ``wpb`` warps per block. A lane takes chunks of 8 stored entries of its
  row (lane, lane + lpr, ...): one 16-byte load of 8 fp16 values, their 8
  columns decoded from the format's index -- ``csr``: 8 uint16 columns (16-byte load; a
  row's entries in `bank_order`, so a quarter warp's X loads at M = 16 avoid bank conflicts);
  ``dcsr`` (`formats.DeltaCSR`): a uint16 base plus 8 4-bit steps (2 + 4 bytes); ``dcsr6``
  (`formats.DeltaCSR6`): the first column and 7 6-bit steps in one uint64 (8 bytes; the
  delta formats load a batch's index words with its values, `PREFETCH_INDEX`); ``nm``
  (n:4, `formats.NM`): the group from the position in the row plus 8 2-bit positions
  (2 bytes) -- then 8 x M FMAs with X from shared memory. ``unroll`` chunks are loaded
  before the first FMA. Partial sums are reduced with (segmented) warp shuffles; the
  row's first lane writes.
* ``bsr`` (`formats.BSR` with blocks r x c, c % 8 == 0): two kernels. The row kernel above
  (a warp per output row reads 16 bytes of each block of its block row, so 16 warps share
  each 16x16 block), and for blocks of a multiple of 256 entries the block kernel
  (`_bsr_blocks_func`, scheduled first): ``ks`` warps per block row, each loading whole
  blocks (lane l takes chunks ``l + 32 h`` of a block: a 16x16 block is one 512-byte warp
  load), X read from global memory, lanes of a row summed with shuffles and the ``ks``
  warps through shared memory. On the H100 at M = 1 it is 4-12 % faster than the row
  kernel, at M = 4 20-45 % (`benchmarks/gpu_decode_kernels.py`). For blocks of multiples of
  16, a third on tensor cores (`cuda_sparse_mma`, ``tc=1``, M <= 64), scheduled first
  from M = 2: at M = 16 it keeps ~90 % of the M = 1 ratio where the block kernel keeps 40 %.
* ``nm`` 2:4 also runs on sparse tensor cores (`cuda_sparse_mma`, ``tc=1``, M <= 64:
  ``mma.sp.m16n8k32``, the kept values in A-fragment order, blocks of 16-64 rows sharing
  each X fragment), scheduled first at every M: on the H100 it keeps 88-99 % of its M = 1
  ratio at M = 16 (1.40-1.66x cuBLAS), where the row kernel is at 0.3x.
* ``tile_bitmap`` (`cuda_sparse_mma`, M <= 64): unstructured W as 16 x 16 tiles of a
  bitmap plus values in mma fragment order, decoded into registers for ``mma.sync``.
  Correct on the H100 but not a dispatch candidate: it runs at about cuBLAS's speed at
  every sparsity (decoding a tile costs what streaming it dense does;
  `benchmarks/results/gpu_tile_bitmap.md`).
* ``dense``: our row kernel on fp16 W (M <= 16), the tensor-core GEMM of `cuda_mma`
  (``mma``, M >= `MMA_MIN_M`) and TVM's own GEMV / matmul schedules (``dlight``): the
  dense kernels the sparse ones are dispatched against.

Bytes per fp16 weight entry: dense 2; csr 4 per stored entry; dcsr 2.75 and dcsr6 3 per stored
entry (dcsr stores a zero for every 15 columns of a gap, dcsr6 for every 63: `delta_format`
picks the smaller); 2:4 nm 1.125
per dense entry; bsr 2 per block entry; tile_bitmap 2 per stored entry plus 0.14 per
dense entry. Decode at M = 1 is bound by these bytes (the kernels are written so that
each warp issues 16-byte loads only), so the best a kernel can do against a dense GEMV is
dense bytes / its bytes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm.script import tirx as T

from sparsegraph.codegen import formats as fmts

__all__ = [
    "SCHEDULE_SPACE",
    "CUDAKernel",
    "Packed",
    "build",
    "candidates",
    "cuda_target",
    "delta_format",
    "pack",
    "schedules",
    "sparse_formats",
]

WARP = 32
SMEM_LIMIT = 200 * 1024  # bytes of shared memory a kernel stages X into (H100: 227 KB per block)
SMEM_PER_SM = 228 * 1024
MAX_M = 16
_SYMBOLS = itertools.count()

#: schedules tried per format (first = default); rpw 0 = one persistent wave of blocks
_ROW_SCHEDULES = [
    {"wpb": 8, "rpw": 0, "unroll": 2, "lpr": 32},
    {"wpb": 32, "rpw": 0, "unroll": 2, "lpr": 32},
    {"wpb": 16, "rpw": 0, "unroll": 4, "lpr": 32},
    {"wpb": 8, "rpw": 1, "unroll": 2, "lpr": 32},
]
#: sparse rows can be short (K = 4096 at 90 %: 13 chunks of 8 entries): 16 or 8 lanes per
#: row too (measured on an H100 at M = 1: lpr 32 best on 8192->28672, 16 on 11008->4096)
_SHORT_ROW_SCHEDULES = [
    {"wpb": 8, "rpw": 0, "unroll": 2, "lpr": 32},
    {"wpb": 8, "rpw": 0, "unroll": 2, "lpr": 16},
    {"wpb": 32, "rpw": 0, "unroll": 2, "lpr": 32},
    {"wpb": 8, "rpw": 0, "unroll": 2, "lpr": 8},
    {"wpb": 16, "rpw": 0, "unroll": 4, "lpr": 32},
]
SCHEDULE_SPACE: dict[str, list[dict[str, int]]] = {
    **{f: _ROW_SCHEDULES for f in ("dense", "bsr")},
    **{f: _SHORT_ROW_SCHEDULES for f in ("csr", "dcsr", "dcsr6", "nm")},
    "dlight": [{}],
    "mma": [{}],  # per shape: `cuda_mma.schedules`, see `schedules`
    "cublas": [{}],  # `cublas.gemm` through a packed function, where a libcublas loads
    #: unstructured W on tensor cores, M = 1..64 (per shape: `cuda_sparse_mma.schedules`);
    #: not in `candidates`: measured no faster than cuBLAS (see the module docstring)
    "tile_bitmap": [{}],
}
#: smallest M at which the tensor-core dense kernel (`cuda_mma`) is a candidate
MMA_MIN_M = 4
#: the delta formats' row kernel loads a batch's index words with its values, before the
#: first multiply-add (otherwise each is loaded where its chunk is decoded). On the H100
#: (same call, x cuBLAS at M = 1): dcsr6 90 % 3.67 -> 3.86 (4096->11008), 4.50 -> 4.58
#: (8192->28672); dcsr 70 % 1.86 -> 1.94, 1.75 -> 1.91 (11008->4096), 2.00 -> 2.02; dcsr
#: 50 % 1.25 -> 1.31, 1.29 -> 1.35. M = 4 mostly +1-10 % (one cell -6 %), M = 16 within 3 %
PREFETCH_INDEX = True
#: formats with the CUDA-core row kernel (`_row_func`; bsr also its block kernel, and its and
#: 2:4 nm's tensor-core kernels with ``tc``)
ROW_FORMATS = ("dense", "csr", "dcsr", "dcsr6", "nm", "bsr")


def schedules(
    fmt: str,
    m: int,
    n: int,
    k: int,
    target: Any = None,
    /,
    block: tuple[int, int] | None = None,
    **params: Any,
) -> list[dict[str, int]]:
    """The schedules dispatch may time for `fmt` at (M, N, K) (and `fmt`'s packing
    parameters, e.g. a bsr `block`, an nm ``n``: hence positional-only shapes), the best
    first (for ``mma``: fp16 X, the Hopper wgmma ones only for an sm_90a `target`; for
    ``bsr`` and 2:4 ``nm`` at M > `MAX_M`: the tensor-core kernel's only). 2:4 puts its
    sparse tensor-core kernel first at every M: on the H100 it matches or beats the row
    kernel at M = 1 and keeps ~90 % of that ratio at M = 16, where the row kernel falls below
    cuBLAS."""
    if fmt == "mma":
        from . import cuda_mma

        return cuda_mma.schedules(m, n, k, "float16", wgmma=is_hopper(target or cuda_target()))
    if fmt == "tile_bitmap":
        from . import cuda_sparse_mma

        return cuda_sparse_mma.schedules(m, n, 16)
    if fmt == "nm" and params.get("n") == 2 and n % 16 == 0:  # 2:4 on sparse tensor cores too
        from . import cuda_sparse_mma

        tc = [{"tc": 1, **s} for s in cuda_sparse_mma.nm_schedules(m, n)]
        return tc if m > MAX_M else [*tc, *SCHEDULE_SPACE[fmt]]
    if m > MAX_M and fmt in ("csr", "dcsr", "dcsr6", "nm", "dense"):  # the row kernel stops at MAX_M
        return []
    if fmt == "bsr" and block is not None:
        tc = _bsr_tensor_core_schedules(m, n, block[0]) if block[0] % 16 == block[1] % 16 == 0 else []
        if m > MAX_M:
            return tc
        if (block[0] * block[1]) % 256 == 0:
            blocks = _bsr_block_schedules(m, n // block[0])
            ordered = [*blocks, *tc] if m == 1 else [*tc, *blocks]
            return [*ordered, *_row_schedules(fmt, m)]
    if fmt == "csr" and _splits_x(m, k, target or cuda_target()):
        return [{"wpb": 32, "rpw": 0, "unroll": 2, "lpr": 32, "split": 2}, *_row_schedules(fmt, m)]
    return _row_schedules(fmt, m)


def _splits_x(m: int, k: int, target: Any) -> bool:
    """Whether the csr kernel on a cluster of two blocks, each staging half of X, is
    scheduled (first): where one block must stage X in groups of rows (reading W once per
    group) and half of X fits whole, on sm_90 (clusters). On the H100 (csr at M = 16, same
    call) it took 8192->28672 from 0.78 to 0.99x cuBLAS at 70 % and 1.83 to 1.98x at 90 %,
    11008->4096 70 % from 0.79 to 1.05x; where X fits one block (K = 4096, or M = 8 at
    K = 8192) it was 30-45 % slower than the single block."""
    from .cuda_act_kernels import has_clusters

    return k % 16 == 0 and _m_group(m, k)[1] > 1 and _m_group(m, k // 2)[1] == 1 and has_clusters(target)


def _row_schedules(fmt: str, m: int) -> list[dict[str, int]]:
    """`SCHEDULE_SPACE[fmt]`, for the row kernels at M > 1 with the widest blocks first:
    staging M rows of X fills most of an SM's shared memory, so a block of 32 (or 16) warps
    is all the SM runs. Measured on an H100 (`benchmarks/gpu_decode_kernels.py --suite
    unstructured`, delta CSR, 8192->28672 and 4096->4096): 32 warps fastest in 9 of 12
    cells at M = 4 and 16, 16 warps in the other 3."""
    space = SCHEDULE_SPACE[fmt]
    if m == 1 or fmt not in ROW_FORMATS:
        return space
    wide = [s for w in (32, 16) for s in space if s["wpb"] == w and s.get("lpr", WARP) == WARP][:2]
    return [*wide, *[s for s in space if s not in wide]]


def _bsr_tensor_core_schedules(m: int, n: int, r: int) -> list[dict[str, int]]:
    """The tensor-core BSR kernel's schedules (`cuda_sparse_mma.schedules`), first for M > 1.
    Measured on an H100 (`benchmarks/gpu_decode_kernels.py`, 8192->28672): at M = 16 it keeps
    93 % of the M = 1 ratio where the CUDA-core block kernel keeps 40 %; at M = 1 the two tie."""
    from . import cuda_sparse_mma

    return [{"tc": 1, **s} for s in cuda_sparse_mma.schedules(m, n, r)]


def _bsr_block_schedules(m: int, block_rows: int) -> list[dict[str, int]]:
    """The block kernel's schedules (`_bsr_blocks_func`), best first. Measured on an H100
    (`benchmarks/gpu_decode_kernels.py`): at M = 1, 8 warps per block row (16 when there are
    <= 512 block rows, 11008->4096) and 2 blocks in flight per lane; at M = 4, half the
    warps (4 on the larger grids)."""
    ks = 16 if block_rows <= 512 else 8
    if m > 1 and block_rows > 512:
        ks //= 2
    return [{"ks": ks, "unroll": 2}, {"ks": ks, "unroll": 4}]


def is_hopper(target: Any) -> bool:
    """True for an sm_90a target (wgmma and the other Hopper-only instructions)."""
    return str(target.attrs.get("arch", "")) == "sm_90a"


def cuda_target(arch: str = "sm_90a") -> tvm.target.Target:
    """A CUDA target whose shared-memory limit admits the kernels' staging buffers."""
    return tvm.target.Target(
        {
            "kind": "cuda",
            "arch": arch,
            "max_shared_memory_per_block": 232448,
            "max_threads_per_block": 1024,
            "thread_warp_size": 32,
        }
    )


@dataclass(eq=False)
class CUDAKernel:
    """One kernel for one (M, N, K, W): signature ``(X, *weights, Y)``."""

    format: str
    shape: tuple[int, int, int]  # (M, N, K)
    prim_func: Any
    weights: dict[str, np.ndarray]
    symbol: str
    x_dtype: str
    schedule: dict[str, Any] = field(default_factory=dict)
    extern: str | None = None  # a registered packed function instead of `prim_func` (cuBLAS)
    passes: int = 1  # times the kernel reads W (row kernels: once per group of staged X rows)

    @property
    def nbytes(self) -> int:
        """Bytes of W the kernel reads (every packed array)."""
        return sum(int(a.nbytes) for a in self.weights.values())

    @property
    def label(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.schedule.items())
        return f"{self.format}({extra})" if extra else self.format

    def compile(self, target: Any = None) -> Any:
        """The kernel alone, compiled (callable as ``ex[symbol](x, *weights, y)``)."""
        target = target or cuda_target()
        mod = tvm.IRModule({self.symbol: self.prim_func})
        with target:
            return tvm.compile(mod, target=target)

    def function(self, target: Any = None) -> Any:
        """The kernel as a callable ``f(x, *weights, y)``: compiled, or the extern function."""
        if self.extern:
            from . import cublas

            cublas.register()
            return tvm.get_global_func(self.extern)
        return self.compile(target)[self.symbol]

    def source(self, target: Any = None) -> str:
        """The generated CUDA C source (no GPU needed)."""
        return self.compile(target).mod.imports[0].inspect_source()


# --------------------------------------------------------------------------- helpers


def _m_group(m: int, k: int) -> tuple[int, int]:
    """(MG, groups): rows of X staged per block (a power of two) and how many groups."""
    mp = 1 << (m - 1).bit_length()
    mg = mp
    while mg > 1 and _xs_size(k, mg) * 2 > SMEM_LIMIT:
        mg //= 2
    if k * 2 > SMEM_LIMIT:
        raise fmts.UnfitError(f"K = {k} too large to stage X in shared memory ({SMEM_LIMIT} bytes)")
    return mg, -(-m // mg)


def _xs_size(K: int, MG: int) -> int:
    """Elements of the staged X: ``K * MG``, plus (MG > 1) one vector of padding per 8
    columns, so the lanes of a warp reading columns 8 apart hit distinct banks."""
    return K * MG + (K // 8 * min(MG, 8) if MG > 1 else 0)


def _stage_x_macro(M, K, MG, NT, xdtype):
    """Macro: the cooperative copy of X rows [by*MG, by*MG + MG), columns [k0, k0 + K), into
    shared memory, fp16,
    ``xs[k * MG + m + (k // 8) * XV]`` (MG > 1) or ``xs[k]`` (MG = 1). MG < 8: a thread
    copies 8 consecutive columns of one row per step (one vector load; consecutive threads
    take consecutive columns, so a warp's loads are coalesced), `UNROLL` steps' loads issued
    before their stores; MG >= 8: `stage_transposed`. On the H100 (delta CSR / CSR, 90 %)
    the transposed copy took M = 16 from 1.14-1.44x cuBLAS to 1.38-1.55x and M = 8 from
    1.55-2.63x to 1.81-2.75x on the four benchmark weights."""
    XV, C8 = min(MG, 8), K // 8
    CHUNKS = C8 * MG  # 8-column pieces of the MG staged rows
    UNROLL = 4
    STEPS = -(-CHUNKS // (NT * UNROLL))
    CW = 16 // np.dtype(xdtype).itemsize  # columns per 16-byte load of X
    KC = K // CW
    UNITS = KC * (MG // 8)  # MG >= 8: 8 rows x CW columns per thread and step

    @T.macro
    def stage_transposed(x, xs, by, ty, tx, k0):
        """MG >= 8: a thread loads 8 rows x CW columns (8 vector loads) and stores each
        column's 8 rows as one 16-byte vector (fp16 X: consecutive lanes MG + 1 vectors
        apart, an odd stride, so no bank conflicts), where `stage` stores 2 bytes at a time."""
        xt = T.decl_buffer((8, CW), xdtype, scope="local")
        c8 = T.decl_buffer((8,), "float16", scope="local")
        for it in range(-(-UNITS // NT)):
            e = T.meta_var(it * NT + ty * WARP + tx)  # = row group * KC + column chunk
            if e < UNITS:
                for i in T.unroll(8):
                    if by * MG + e // KC * 8 + i < M:
                        for v in T.vectorized(CW):
                            xt[i, v] = x[by * MG + e // KC * 8 + i, k0 + e % KC * CW + v]
                    else:
                        for v in T.unroll(CW):
                            xt[i, v] = T.Cast(xdtype, 0)
                for v in T.unroll(CW):
                    k = T.meta_var(e % KC * CW + v)
                    for i in T.unroll(8):
                        c8[i] = T.Cast("float16", xt[i, v])
                    for i in T.vectorized(8):
                        xs[k * MG + e // KC * 8 + k // 8 * XV + i] = c8[i]
        T.tvm_storage_sync("shared.dyn")

    @T.macro
    def stage(x, xs, by, ty, tx, k0):
        xt = T.decl_buffer((UNROLL, 8), xdtype, scope="local")
        for it in range(STEPS):
            for u in T.unroll(UNROLL):
                e = T.meta_var((it * UNROLL + u) * NT + ty * WARP + tx)  # = m * C8 + column chunk
                if e < CHUNKS and by * MG + e // C8 < M:
                    for v in T.vectorized(8):
                        xt[u, v] = x[by * MG + e // C8, k0 + e % C8 * 8 + v]
            for u in T.unroll(UNROLL):
                e = T.meta_var((it * UNROLL + u) * NT + ty * WARP + tx)
                if e < CHUNKS and MG == 1:
                    for v in T.vectorized(8):
                        xs[e * 8 + v] = T.Cast("float16", xt[u, v])
                elif e < CHUNKS:
                    for v in T.unroll(8):
                        if by * MG + e // C8 < M:
                            xs[(e % C8 * 8 + v) * MG + e // C8 + e % C8 * XV] = T.Cast("float16", xt[u, v])
                        else:
                            xs[(e % C8 * 8 + v) * MG + e // C8 + e % C8 * XV] = T.float16(0)
        T.tvm_storage_sync("shared.dyn")

    return stage_transposed if MG >= 8 else stage


def _symbol(fmt: str, m: int, n: int, k: int) -> str:
    return f"sg_cuda_{fmt}_m{m}_n{n}_k{k}_{next(_SYMBOLS)}"


# --------------------------------------------------------------------------- row kernel


def _grid(units: int, wpb: int, rpw: int, smem: int, sms: int) -> tuple[int, int]:
    """(blocks, rows per warp). ``rpw = 0``: one wave of as many blocks as fit on the GPU at
    once (shared memory and threads permitting), each warp looping over its rows, so X is
    staged once per resident block rather than once per `wpb` rows."""
    if rpw:
        return -(-units // (wpb * rpw)), rpw
    per_sm = max(1, min(2048 // (wpb * WARP), SMEM_PER_SM // max(smem, 1), 32))
    blocks = min(-(-units // wpb), sms * per_sm)
    return blocks, -(-units // (blocks * wpb))


def _row_func(
    fmt: str, M, N, K, S, xdtype, idx_dtype, wpb, rpw, unr, sms, lpr=32, nm_n=2, block=(1, 8), NB=0, split=1
):
    """The kernel of every format (see the module docstring): `lpr` lanes per output row
    (32: a warp per row; 8 or 16: a warp runs 4 or 2 rows side by side, for short rows).

    A row's stored entries are chunks of 8 (`S` entries in all); chunk q of a row holds
    values ``vals[value_index(q) : +8]`` at columns ``column(q, v)``, v = 0..7.

    ``split`` > 1 (csr, `split_csr` arrays): a thread-block cluster of `split` blocks runs
    the same rows, block ``rank`` on columns ``[rank * K / split, +K / split)`` with the
    row pointers ``ptr[rank * (N + 1) + row]``; each block keeps its warps' partial sums in
    shared memory and, after one cluster barrier, block ``rank`` sums output rows
    ``[rank * MG / split, +MG / split)`` of every row over the cluster (distributed shared
    memory, fixed order). Staging 1 / split of X per block lets all M rows fit at once
    where a single block would stage them in groups and read W once per group.
    """
    KS = K // split  # columns of X a block stages
    PFI = PREFETCH_INDEX and fmt in ("dcsr", "dcsr6")
    MG, NG = _m_group(M, KS)
    NT = wpb * WARP
    if fmt == "bsr" and lpr != WARP:
        raise fmts.UnfitError("the bsr kernel runs a warp per block row (lpr = 32)")
    if split > 1 and (lpr != WARP or MG % split):  # `build` checks the format and K
        raise fmts.UnfitError(f"split {split} needs a warp per row and MG % split == 0")
    RPL = WARP // lpr  # rows a warp runs side by side
    NCL, RPW = _grid(-(-N // RPL), wpb, rpw, _xs_size(KS, MG) * 2, sms // split)  # clusters
    NBLK, TW = NCL * split, NCL * wpb
    PART = RPW * wpb * MG if split > 1 else 1  # fp32 partial sums a block keeps
    if PART * 4 > 48 * 1024 or _xs_size(KS, MG) * 2 + PART * 4 > SMEM_PER_SM - 4096:
        raise fmts.UnfitError(f"X and {PART} partial sums (static, <= 48 KB) do not fit shared memory")
    r, c = block
    CPB = c // 8  # bsr: chunks per block
    CPR = K // 4 * nm_n // 8 if fmt == "nm" else K // 8  # nm / dense: chunks per row
    CONTIG = fmt in ("bsr", "dense")  # a chunk's 8 columns are consecutive
    LOG_LPR = lpr.bit_length() - 1
    XV = min(MG, 8)
    stage = _stage_x_macro(M, KS, MG, NT, xdtype)

    def first_chunk(ptr, row):
        if fmt == "bsr":
            return ptr[row // r] * CPB
        if fmt in ("nm", "dense"):
            return row * CPR
        return ptr[row]

    def chunks(ptr, row):
        if fmt == "bsr":
            return (ptr[row // r + 1] - ptr[row // r]) * CPB
        if fmt in ("nm", "dense"):
            return CPR
        return ptr[row + 1] - ptr[row]

    def value_index(ptr, row, q):
        if fmt == "bsr":  # data [B, r, c]: row (row % r) of block (first + q // CPB)
            return ((ptr[row // r] + q // CPB) * r + row % r) * c + q % CPB * 8
        return (first_chunk(ptr, row) + q) * 8

    def column(idx, deltas, ptr, row, q, v, u, ib, db):
        """Column of entry v of chunk q (the u-th of the lane's batch), an expression of the
        format arrays (vector loads of xs need an index that is not a local variable) or,
        for the delta formats, of their index words the batch loaded (`PREFETCH_INDEX`)."""
        ch = first_chunk(ptr, row) + q
        if PFI:
            idx, deltas, ch = ib, db, u
        if fmt == "csr":
            return T.Cast("int32", idx[ch * 8 + v])
        if fmt == "dcsr":
            steps = [  # v is the (unrolled) loop variable: the selects fold away
                T.Select(
                    t <= v,
                    T.Cast("int32", T.bitwise_and(T.shift_right(deltas[ch], T.uint32(4 * t)), T.uint32(15))),
                    0,
                )
                for t in range(1, 8)
            ]
            return sum(steps, T.Cast("int32", idx[ch]))
        if fmt == "dcsr6":  # one uint64: 7 6-bit steps, the first column from bit 42
            word = idx[ch]
            steps = [
                T.Select(
                    t <= v,
                    T.Cast("int32", T.bitwise_and(T.shift_right(word, T.uint64(6 * t - 6)), T.uint64(63))),
                    0,
                )
                for t in range(1, 8)
            ]
            return sum(steps, T.Cast("int32", T.shift_right(word, T.uint64(fmts.DeltaCSR6.BASE_SHIFT))))
        if fmt == "nm":
            return (q * 8 + v) // nm_n * 4 + T.Cast(
                "int32", T.bitwise_and(T.shift_right(idx[ch], T.uint16(2 * v)), T.uint16(3))
            )
        if fmt == "bsr":
            return T.Cast("int32", idx[ptr[row // r] + q // CPB]) * c + q % CPB * 8 + v
        return q * 8 + v

    @T.macro
    def rows(x, vals, idx, deltas, ptr, y, by, cl, rank):  # block `rank` of cluster (block) `cl`
        for ty in T.thread_binding(wpb, thread="threadIdx.y"):
            for tx in T.thread_binding(WARP, thread="threadIdx.x"):
                xs = T.decl_buffer((_xs_size(KS, MG),), "float16", scope="shared.dyn")
                part = T.decl_buffer((PART,), "float32", scope="shared")
                vb = T.decl_buffer((unr * 8,), "float16", scope="local")
                ib = T.decl_buffer((unr,), idx_dtype, scope="local")  # PFI: the batch's index words
                db = T.decl_buffer((unr,), "uint32", scope="local")  # (dcsr: bases and steps)
                x8 = T.decl_buffer((8,), "float16", scope="local")
                xv = T.decl_buffer((MG,), "float16", scope="local")
                acc = T.decl_buffer((MG,), "float32", scope="local")
                addr = T.decl_buffer((1,), "uint32", scope="local")
                rv = T.decl_buffer((1,), "float32", scope="local")
                stage(x, xs, by, ty, tx, rank * KS)
                for rr in range(RPW):
                    row = T.meta_var((cl * wpb + ty + rr * TW) * RPL + tx // lpr)
                    prow = T.meta_var(rank * (N + 1) + row)  # this block's row pointers
                    lane = T.meta_var(tx % lpr)
                    if row < N:
                        mine = T.meta_var((chunks(ptr, prow) - lane + lpr - 1) // lpr)
                        for i in T.unroll(MG):
                            acc[i] = T.float32(0)
                        for j in range((mine + unr - 1) // unr):
                            for u in T.unroll(unr):
                                if j * unr + u < mine:
                                    for v in T.vectorized(8):
                                        vb[u * 8 + v] = vals[
                                            value_index(ptr, prow, lane + (j * unr + u) * lpr) + v
                                        ]
                                    if PFI:
                                        ch = T.meta_var(first_chunk(ptr, prow) + lane + (j * unr + u) * lpr)
                                        ib[u] = idx[ch]
                                        if fmt == "dcsr":
                                            db[u] = deltas[ch]
                            for u in T.unroll(unr):
                                q = T.meta_var(lane + (j * unr + u) * lpr)
                                if j * unr + u < mine:
                                    if CONTIG and MG == 1:
                                        for v in T.vectorized(8):
                                            x8[v] = xs[column(idx, deltas, ptr, prow, q, 0, u, ib, db) + v]
                                        for v in T.unroll(8):
                                            acc[0] = acc[0] + T.Cast("float32", vb[u * 8 + v]) * T.Cast(
                                                "float32", x8[v]
                                            )
                                    else:
                                        for v in T.unroll(8):
                                            col = T.meta_var(column(idx, deltas, ptr, prow, q, v, u, ib, db))
                                            if MG == 1:
                                                acc[0] = acc[0] + T.Cast("float32", vb[u * 8 + v]) * T.Cast(
                                                    "float32", xs[col]
                                                )
                                            else:
                                                for h in T.unroll(MG // XV):
                                                    for i in T.vectorized(XV):
                                                        xv[h * XV + i] = xs[
                                                            col * MG + col // 8 * XV + h * XV + i
                                                        ]
                                                for i in T.unroll(MG):
                                                    acc[i] = acc[i] + T.Cast(
                                                        "float32", vb[u * 8 + v]
                                                    ) * T.Cast("float32", xv[i])
                        for i in T.unroll(MG):
                            for s in T.unroll(LOG_LPR):
                                acc[i] = acc[i] + T.tvm_warp_shuffle_down(
                                    T.tvm_warp_activemask(),
                                    acc[i],
                                    T.shift_right(lpr // 2, s),
                                    lpr,
                                    WARP,
                                )
                        if lane == 0:
                            for i in T.unroll(MG):
                                if split > 1:
                                    part[(rr * wpb + ty) * MG + i] = acc[i]
                                else:
                                    if by * MG + i < M:
                                        y[by * MG + i, row] = T.Cast(xdtype, acc[i])
                if split > 1:  # the cluster's sum; this block writes outputs rank * MG / split + tx
                    T.cuda.cluster_sync()
                    for rr in range(RPW):
                        row = T.meta_var(cl * wpb + ty + rr * TW)
                        xrow = T.meta_var(rank * (MG // split) + tx)  # of the MG staged rows of X
                        m = T.meta_var(by * MG + xrow)
                        if row < N and tx < MG // split:
                            acc[0] = T.float32(0)
                            for q in T.unroll(split):
                                T.evaluate(
                                    T.ptx.mapa.shared__cluster.u32(
                                        addr[0],
                                        T.cuda.cvta_generic_to_shared(
                                            T.address_of(part[(rr * wpb + ty) * MG + xrow])
                                        ),
                                        T.uint32(q),
                                    )
                                )
                                T.evaluate(T.ptx.ld.shared__cluster.f32(rv[0], addr[0]))
                                acc[0] = acc[0] + rv[0]
                            if m < M:
                                y[m, row] = T.Cast(xdtype, acc[0])
                    T.cuda.cluster_sync()  # no block leaves while the other reads its partial sums

    @T.macro
    def body(x, vals, idx, deltas, ptr, y):
        for by in T.thread_binding(NG, thread="blockIdx.y"):
            for bx in T.thread_binding(NBLK, thread="blockIdx.x"):
                if split > 1:
                    for rank in T.thread_binding(split, thread="clusterCtaIdx.x"):
                        rows(x, vals, idx, deltas, ptr, y, by, bx // split, rank)
                else:
                    rows(x, vals, idx, deltas, ptr, y, by, bx, 0)

    if fmt == "csr":

        @T.prim_func
        def main(
            x: T.Buffer((M, K), xdtype),
            vals: T.Buffer((S,), "float16"),
            idx: T.Buffer((S,), idx_dtype),
            ptr: T.Buffer((split * (N + 1),), "int32"),
            y: T.Buffer((M, N), xdtype),
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            body(x, vals, idx, None, ptr, y)

    elif fmt == "dcsr":

        @T.prim_func
        def main(
            x: T.Buffer((M, K), xdtype),
            vals: T.Buffer((S,), "float16"),
            idx: T.Buffer((S // 8,), idx_dtype),
            deltas: T.Buffer((S // 8,), "uint32"),
            ptr: T.Buffer((N + 1,), "int32"),
            y: T.Buffer((M, N), xdtype),
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            body(x, vals, idx, deltas, ptr, y)

    elif fmt == "dcsr6":

        @T.prim_func
        def main(
            x: T.Buffer((M, K), xdtype),
            vals: T.Buffer((S,), "float16"),
            idx: T.Buffer((S // 8,), "uint64"),
            ptr: T.Buffer((N + 1,), "int32"),
            y: T.Buffer((M, N), xdtype),
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            body(x, vals, idx, None, ptr, y)

    elif fmt == "bsr":

        @T.prim_func
        def main(
            x: T.Buffer((M, K), xdtype),
            vals: T.Buffer((NB * r * c,), "float16"),
            idx: T.Buffer((NB,), "uint16"),
            ptr: T.Buffer((N // r + 1,), "int32"),
            y: T.Buffer((M, N), xdtype),
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            body(x, vals, idx, None, ptr, y)

    elif fmt == "nm":

        @T.prim_func
        def main(
            x: T.Buffer((M, K), xdtype),
            vals: T.Buffer((S,), "float16"),
            idx: T.Buffer((S // 8,), "uint16"),
            y: T.Buffer((M, N), xdtype),
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            body(x, vals, idx, None, None, y)

    else:

        @T.prim_func
        def main(
            x: T.Buffer((M, K), xdtype), vals: T.Buffer((N * K,), "float16"), y: T.Buffer((M, N), xdtype)
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            body(x, vals, None, None, None, y)

    return main


def _dense_mod(M, N, K, xdtype, target):
    """TVM's dense schedule (dlight) for ``Y = X @ W.T`` with fp16 W."""
    from tvm import te
    from tvm.s_tir import dlight as dl

    x = te.placeholder((M, K), xdtype, name="x")
    w = te.placeholder((N, K), "float16", name="w")
    k = te.reduce_axis((0, K), name="k")
    acc = te.compute(
        (M, N), lambda i, j: te.sum(x[i, k].astype("float32") * w[j, k].astype("float32"), axis=k), name="acc"
    )
    y = te.compute((M, N), lambda i, j: acc[i, j].astype(xdtype), name="y")
    mod = tvm.IRModule({"main": te.create_prim_func([x, w, y])})
    with target:
        mod = dl.ApplyDefaultSchedule(
            dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(), dl.gpu.Fallback()
        )(mod)
    return mod["main"]


def block_row_grid(block_rows: int, threads: int, sms: int) -> tuple[int, int]:
    """(thread blocks, block rows per thread block) for kernels that give each thread block
    of `threads` threads one BSR block row at a time: one wave at full occupancy."""
    grid = min(block_rows, sms * max(1, min(2048 // threads, 32)))
    return grid, -(-block_rows // grid)


def _bsr_blocks_func(M, N, K, NB, r, c, xdtype, ks, unr, sms):
    """BSR with whole blocks per warp load: `ks` warps share a block row (each takes every
    ks-th block of it), lane l loads 16 contiguous bytes of each of its blocks -- chunks
    ``l + 32 h`` of the block's ``r * c / 8`` -- so a warp reads a 16x16 block (512 bytes)
    in one instruction, where the row kernel's warp per output row reads 32 bytes of each
    block. X is read from global memory (L1-resident); lanes of a block row are summed with
    shuffles, the `ks` warps through shared memory. Needs ``r * c % 256 == 0``."""
    CC, CPB = c // 8, r * c // 8  # chunks per block row / per block
    RL, NBR, TPB = CPB // WARP, N // r, ks * WARP
    GRID, ITER = block_row_grid(NBR, TPB, sms)
    LOG_CC = CC.bit_length() - 1

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
                for tx in T.thread_binding(WARP, thread="threadIdx.x"):
                    red = T.decl_buffer((ks, RL, WARP // CC, M), "float32", scope="shared")
                    vb = T.decl_buffer((unr, RL, 8), "float16", scope="local")
                    x8 = T.decl_buffer((8,), xdtype, scope="local")
                    acc = T.decl_buffer((RL, M), "float32", scope="local")
                    tot = T.decl_buffer((1,), "float32", scope="local")
                    for it in range(ITER):
                        br = T.meta_var(bx + it * GRID)
                        if br < NBR:
                            first = T.meta_var(ptr[br] + ty)
                            mine = T.meta_var((ptr[br + 1] - ptr[br] - ty + ks - 1) // ks)
                            for h in T.unroll(RL):
                                for i in T.unroll(M):
                                    acc[h, i] = T.float32(0)
                            for j in range((mine + unr - 1) // unr):
                                for u in T.unroll(unr):
                                    if j * unr + u < mine:
                                        for h in T.unroll(RL):
                                            for v in T.vectorized(8):
                                                vb[u, h, v] = vals[
                                                    (first + (j * unr + u) * ks) * (r * c)
                                                    + (tx + h * WARP) * 8
                                                    + v
                                                ]
                                for u in T.unroll(unr):
                                    if j * unr + u < mine:
                                        col0 = T.meta_var(
                                            T.Cast("int32", idx[first + (j * unr + u) * ks]) * c
                                        )
                                        for h in T.unroll(RL):
                                            for i in T.unroll(M):
                                                for v in T.vectorized(8):
                                                    x8[v] = x[i, col0 + (tx + h * WARP) % CC * 8 + v]
                                                for v in T.unroll(8):
                                                    acc[h, i] = acc[h, i] + T.Cast(
                                                        "float32", vb[u, h, v]
                                                    ) * T.Cast("float32", x8[v])
                            for h in T.unroll(RL):
                                for i in T.unroll(M):
                                    for s in T.unroll(LOG_CC):
                                        acc[h, i] = acc[h, i] + T.tvm_warp_shuffle_down(
                                            T.tvm_warp_activemask(),
                                            acc[h, i],
                                            T.shift_right(CC // 2, s),
                                            CC,
                                            WARP,
                                        )
                                    if tx % CC == 0:
                                        red[ty, h, tx // CC, i] = acc[h, i]
                        T.tvm_storage_sync("shared")
                        if br < NBR:
                            for e in T.unroll(-(-(r * M) // TPB)):
                                if e * TPB + ty * WARP + tx < r * M:
                                    q = T.meta_var(e * TPB + ty * WARP + tx)  # = row * M + i
                                    tot[0] = T.float32(0)
                                    for s in T.unroll(ks):
                                        tot[0] = (
                                            tot[0]
                                            + red[s, q // M // (WARP // CC), q // M % (WARP // CC), q % M]
                                        )
                                    y[q % M, br * r + q // M] = T.Cast(xdtype, tot[0])
                        T.tvm_storage_sync("shared")

    return main


@dataclass(eq=False)
class Packed:
    """W packed for one format's kernels: the arrays (kernel signature order) and the sizes
    the kernel is specialised on. Pack once, build kernels for several M / schedules."""

    format: str
    shape: tuple[int, int]  # (N, K)
    weights: dict[str, np.ndarray]
    meta: dict[str, Any]  # S (stored entries), idx_dtype, block, NB, nm_n
    #: arrays derived from `weights` for one kernel family (e.g. the tensor-core fragment
    #: order), made once per key and shared by every kernel built from this packing
    derived: dict[Any, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.weights.values())

    def derive(self, key: Any, make: Any) -> dict[str, np.ndarray]:
        """``make()`` (the arrays a kernel reads instead of `weights`), computed once per `key`."""
        if key not in self.derived:
            self.derived[key] = make()
        return dict(self.derived[key])


def pack(fmt: str, w: Any, **params: Any) -> Packed:
    """Pack dense ``W[N, K]`` (any float dtype; stored as fp16) for `fmt`'s kernels.

    `params`: ``block=(r, c)`` for bsr, ``n`` for nm (n:4). Raises `formats.UnfitError`
    when W does not fit the format or its kernels.
    """
    a16 = np.asarray(w).astype(np.float16)
    n, k = a16.shape
    if fmt not in SCHEDULE_SPACE:
        raise fmts.UnfitError(f"no CUDA kernel for format {fmt!r}")
    if fmt in ("dlight", "mma", "cublas"):
        return Packed(fmt, (n, k), {"w": np.ascontiguousarray(a16)}, {})
    if fmt == "tile_bitmap":
        from .cuda_sparse_mma import pack_tile_bitmap

        return Packed(fmt, (n, k), pack_tile_bitmap(a16), {"S": int(np.count_nonzero(a16))})
    if k % 8:
        raise fmts.UnfitError(f"CUDA row kernels need K % 8 == 0; K = {k}")
    if fmt == "dense":
        return Packed(
            fmt, (n, k), {"w": np.ascontiguousarray(a16).reshape(-1)}, {"S": n * k, "idx_dtype": "int32"}
        )
    if fmt == "csr":
        csr = fmts.CSR.pack(a16, pad=8)
        if csr.indices.dtype.itemsize > 2:
            raise fmts.UnfitError(f"csr kernel needs 16-bit columns; K = {k}")
        order = bank_order(csr, k)
        weights = {
            "values": csr.values[order],
            "indices": csr.indices[order],
            "indptr": (csr.indptr.astype(np.int64) // 8).astype(np.int32),
        }
        return Packed(fmt, (n, k), weights, {"S": csr.values.size, "idx_dtype": str(csr.indices.dtype)})
    if fmt == "dcsr":
        d = fmts.DeltaCSR.pack(a16)
        if d.base.dtype.itemsize > 2:
            raise fmts.UnfitError(f"dcsr kernel needs 16-bit bases; K = {k}")
        weights = {
            "values": d.values.reshape(-1),
            "base": d.base,
            "deltas": d.deltas,
            "indptr": d.indptr.astype(np.int32),
        }
        return Packed(fmt, (n, k), weights, {"S": d.values.size, "idx_dtype": str(d.base.dtype)})
    if fmt == "dcsr6":
        d6 = fmts.DeltaCSR6.pack(a16)
        weights = {"values": d6.values.reshape(-1), "index": d6.index, "indptr": d6.indptr.astype(np.int32)}
        return Packed(fmt, (n, k), weights, {"S": d6.values.size, "idx_dtype": "uint64"})
    if fmt == "nm":
        nn = int(params.get("n", 2))
        if nn not in (1, 2, 4) or k % 32:
            raise fmts.UnfitError(
                f"nm kernel needs n in (1, 2, 4) of m = 4 and K % 32 == 0; got {nn}:4, K = {k}"
            )
        nm = fmts.NM.pack(a16, n=nn, m=4)  # raises if W is not n:4
        weights = {"values": nm.values.reshape(-1), "positions": nm.indices.reshape(-1).view(np.uint16)}
        return Packed(fmt, (n, k), weights, {"S": nm.values.size, "idx_dtype": "uint16", "nm_n": nn})
    r, c = params.get("block", (16, 16))  # bsr
    if c % 8:
        raise fmts.UnfitError(f"bsr kernel needs c % 8 == 0; got block {(r, c)}")
    b = fmts.BSR.pack(a16, block=(r, c))
    if b.indices.dtype.itemsize > 2:
        raise fmts.UnfitError(f"bsr kernel needs 16-bit block columns; K / c = {k // c}")
    weights = {
        "data": np.ascontiguousarray(b.data.transpose(0, 2, 1)).reshape(-1),  # [B, r, c]
        "indices": b.indices.astype(np.uint16),
        "indptr": b.indptr.astype(np.int32),
    }
    return Packed(fmt, (n, k), weights, {"S": 0, "idx_dtype": "uint16", "block": (r, c), "NB": b.nnzb})


def bank_group(cols: np.ndarray, k: int) -> np.ndarray:
    """The shared-memory bank group (16-byte unit mod 8) of column `cols` of X as the row
    kernel at M = `MAX_M` stages it (`_xs_size` layout, MG = ``_m_group(MAX_M, k)[0]``).
    Two lanes of a quarter warp whose 16-byte loads fall in one group (different addresses)
    are served one after the other (a bank conflict)."""
    mg = _m_group(MAX_M, k)[0]
    c = cols.astype(np.int64)
    return (c * mg + c // 8 * min(mg, 8)) * 2 // 16 % 8


def bank_order(csr: fmts.CSR, k: int) -> np.ndarray:
    """A permutation of a CSR's entries (rows padded to chunks of 8) within each row, so that
    the 8 lanes of a quarter warp read X from distinct bank groups (`bank_group`) where the
    row allows. The row kernel's quarter warp takes entry v of 8 consecutive chunks at a time
    (lanes 8a..8a+7; chunk q on lane q % lpr), so each run of 64 entries is filled entry by
    entry (entry v of chunks 0..7) from the row's entries in round-robin order over the bank
    groups; padding (value 0) goes last. In ascending order a quarter-warp load takes ~2.5
    wavefronts, in this order ~1.1-1.2 (90 % and 50 % sparse, random columns). On the H100
    (Nsight Compute, `benchmarks/gpu_profile.py`) 45-58 % of the M = 16 kernels' shared
    wavefronts were conflicts and the shared pipe was 58-85 % busy; this order took csr at
    M = 16 from 1.49 to 1.72x cuBLAS (4096->4096, 90 %), 0.86 to 1.09x (70 %) and 1.52 to
    1.88x (8192->28672, 90 %); M = 1 and 4 within +-3 %."""
    indices, ptr = csr.indices, csr.indptr.astype(np.int64)
    counts = np.diff(ptr)
    rows = np.repeat(np.arange(counts.size), counts)
    pos = np.arange(indices.size) - ptr[rows]  # position within the row
    pad = csr.values == 0  # the padding (CSR stores nonzeros only)
    group = np.where(pad, 8, bank_group(indices, k))
    by_group = np.lexsort((pos, group, rows))
    start = np.r_[0, np.flatnonzero(np.diff(rows[by_group] * 9 + group[by_group])) + 1]
    rank = np.empty(indices.size, np.int64)
    rank[by_group] = np.arange(indices.size) - np.repeat(start, np.diff(np.r_[start, indices.size]))
    seq = np.lexsort((group, np.where(pad, np.iinfo(np.int64).max, rank), rows))  # round robin
    # the row's p-th entry of the sequence -> its slot: runs of 64 (c chunks in a shorter
    # last run) filled entry v by entry v, chunk by chunk
    run = pos // 64 * 64
    c = np.minimum(counts[rows] - run, 64) // 8
    slot = ptr[rows] + run + pos % 64 % c * 8 + pos % 64 // c
    out = np.empty(indices.size, np.int64)
    out[slot] = seq
    return out


def split_csr(packed: Packed, split: int) -> dict[str, np.ndarray]:
    """The csr arrays of the ``split`` kernels (`_row_func`): W's columns cut into `split`
    equal slices, each packed as its own padded, bank-ordered CSR with slice-local columns;
    values and indices concatenated slice after slice, ``indptr[s * (N + 1) + row]`` the
    chunk offset of row `row` in slice `s`."""
    n, k = packed.shape
    ks = k // split
    w = packed.weights
    counts = np.diff(w["indptr"].astype(np.int64)) * 8
    real = w["values"] != 0
    rows = np.repeat(np.arange(n), counts)[real]
    cols, vals = w["indices"][real].astype(np.int64), w["values"][real]
    out, base = {"values": [], "indices": [], "indptr": []}, 0
    for s in range(split):
        sel = cols // ks == s
        part = fmts.CSR.from_entries((n, ks), rows[sel], cols[sel] - s * ks, vals[sel], pad=8)
        order = bank_order(part, ks)
        out["values"].append(part.values[order])
        out["indices"].append(part.indices[order].astype(np.uint16))
        out["indptr"].append(part.indptr.astype(np.int64) // 8 + base)
        base += part.values.size // 8
    return {
        "values": np.concatenate(out["values"]),
        "indices": np.concatenate(out["indices"]),
        "indptr": np.concatenate(out["indptr"]).astype(np.int32),
    }


def build(
    fmt: str, w: Any, m: int, target: Any = None, x_dtype: str = "float32", **params: Any
) -> CUDAKernel:
    """The `fmt` kernel for weight `w` (dense ``W[N, K]`` or a `Packed` of that format) at M = m.

    `params`: packing parameters (see `pack`), ``sms`` (multiprocessors, default 132) and
    schedule keys (``wpb``, ``rpw``, ``unroll``, ``lpr``; defaults from `SCHEDULE_SPACE`).
    Raises `formats.UnfitError` when the format or the kernel cannot hold this weight / M.
    """
    target = target or cuda_target()
    packed = w if isinstance(w, Packed) else pack(fmt, w, **params)
    n, k = packed.shape
    if fmt == "mma":
        from . import cuda_mma

        return cuda_mma.build(packed.weights["w"], m, target, x_dtype, **params)
    if fmt == "cublas":
        from . import cublas

        if x_dtype != "float16":
            raise fmts.UnfitError("the cuBLAS candidate takes fp16 X (the graph casts it)")
        symbol = f"cublas_m{m}_n{n}_k{k}"
        return CUDAKernel(fmt, (m, n, k), None, packed.weights, symbol, x_dtype, {}, cublas.FUNC)
    if fmt == "tile_bitmap" or (fmt in ("bsr", "nm") and params.get("tc")):  # `cuda_sparse_mma`
        from . import cuda_sparse_mma

        keys = ("ks", "unroll", "sms", "rows")
        return cuda_sparse_mma.build(
            packed, m, x_dtype, **{key: int(params[key]) for key in keys if key in params}
        )
    if fmt == "bsr" and "ks" in params:  # whole blocks per warp load
        r, c = packed.meta["block"]
        if (r * c) % 256 or not 1 <= m <= MAX_M:
            raise fmts.UnfitError(f"the bsr block kernel needs r * c % 256 == 0 and M <= {MAX_M}")
        sched = {"block": (r, c), "ks": int(params["ks"]), "unroll": int(params.get("unroll", 4))}
        prim = _bsr_blocks_func(
            m,
            n,
            k,
            packed.meta["NB"],
            r,
            c,
            x_dtype,
            sched["ks"],
            sched["unroll"],
            int(params.get("sms", 132)),
        )
        symbol = _symbol(fmt, m, n, k)
        return CUDAKernel(
            fmt, (m, n, k), prim.with_attr("global_symbol", symbol), packed.weights, symbol, x_dtype, sched
        )
    sched = {
        **SCHEDULE_SPACE[fmt][0],
        **{s: params[s] for s in ("wpb", "rpw", "unroll", "lpr", "split") if s in params},
    }
    if sched.get("lpr", WARP) not in (8, 16, WARP):
        raise fmts.UnfitError(f"lanes per row must be 8, 16 or 32; got {sched['lpr']}")
    weights, split = packed.weights, int(sched.get("split", 1))
    if fmt == "dlight":
        prim = _dense_mod(m, n, k, x_dtype, target)
    else:
        if not 1 <= m <= MAX_M:
            raise fmts.UnfitError(f"sparse CUDA kernels are for decode, M = 1..{MAX_M}; got M = {m}")
        meta = dict(packed.meta)
        if split > 1:
            from .cuda_act_kernels import has_clusters

            if fmt != "csr" or k % (8 * split) or not has_clusters(target):
                raise fmts.UnfitError(f"split {split} needs csr, K % {8 * split} == 0 and sm_90 clusters")
            weights = packed.derive(("split", split), lambda: split_csr(packed, split))
            meta["S"] = weights["values"].size
        knobs = (
            sched["wpb"],
            sched["rpw"],
            sched["unroll"],
            int(params.get("sms", 132)),
            sched.get("lpr", WARP),
        )
        extra = {key: meta[key] for key in ("nm_n", "block", "NB") if key in meta}
        prim = _row_func(fmt, m, n, k, meta["S"], x_dtype, meta["idx_dtype"], *knobs, **extra, split=split)
        sched = {**{key: meta[key] for key in ("nm_n", "block") if key in meta}, **sched}
    symbol = _symbol(fmt, m, n, k)
    prim = prim.with_attr("global_symbol", symbol)
    passes = _m_group(m, k // split)[1] if fmt != "dlight" else 1  # W once per group of staged X rows
    return CUDAKernel(fmt, (m, n, k), prim, weights, symbol, x_dtype, sched, passes=passes)


def candidates(
    w: np.ndarray, m: int, sparse: list[tuple[str, dict[str, Any]]] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """(format, params) of the kernels that can run ``w[N, K]`` at M = m: dense (our row
    kernel at M <= 16, our tensor-core kernel `cuda_mma` at M >= `MMA_MIN_M` where its
    tiles fit, TVM's dlight, cuBLAS where a libcublas loads) and the sparse formats whose
    pattern W fits (`sparse_formats`; pass them as `sparse` to reuse them across M): all at
    M <= 16, up to M = 64 those with a tensor-core kernel (BSR, blocks of multiples of 16;
    2:4)."""
    from . import cublas
    from .cuda_sparse_mma import MAX_M as TC_MAX_M

    n, k = w.shape
    mma = [("mma", {})] if m >= MMA_MIN_M and schedules("mma", m, n, k) else []
    dense = [*mma, ("dlight", {}), *([("cublas", {})] if cublas.available() else [])]
    if not 1 <= m <= TC_MAX_M:
        return dense
    sparse = sparse_formats(w) if sparse is None else sparse
    if m <= MAX_M:
        return [("dense", {}), *dense, *sparse]
    return [*dense, *[(f, p) for f, p in sparse if f in ("bsr", "nm") and schedules(f, m, n, k, None, **p)]]


def sparse_formats(w: np.ndarray) -> list[tuple[str, dict[str, Any]]]:
    """(format, params) of the sparse kernels whose pattern ``w[N, K]`` fits (none when
    more than 70 % of W is nonzero). Of the two delta-coded CSRs, the one with fewer bytes
    (`delta_format`): their kernels differ only in decoding the columns."""
    n, k = w.shape
    nz = w != 0
    if nz.mean() > 0.7:
        return []
    found: list[tuple[str, dict[str, Any]]] = [(delta_format(nz), {}), ("csr", {})]
    if k % 32 == 0:
        for nn in (1, 2):
            if (nz.reshape(n, -1, 4).sum(axis=2) <= nn).all():
                found.append(("nm", {"n": nn}))
                break
    nnz = nz.sum()
    for r, c in ((32, 32), (16, 16), (1, 16), (1, 8)):
        if n % r or k % c:
            continue
        if nz.reshape(n // r, r, k // c, c).any(axis=(1, 3)).sum() * r * c <= 1.02 * nnz:
            found.append(("bsr", {"block": (r, c)}))
            break
    return found


def delta_format(mask: np.ndarray) -> str:
    """``"dcsr"`` (4-bit steps, 2.75 bytes per fp16 entry) or ``"dcsr6"`` (6-bit steps, 3),
    whichever stores the nonzero `mask` in fewer bytes: dcsr up to ~85 % sparsity, dcsr6
    beyond, where dcsr's bridging zeros for gaps over 15 columns outweigh its smaller index."""
    steps = {"dcsr": fmts.DeltaCSR, "dcsr6": fmts.DeltaCSR6}
    entries = fmts.delta_row_entries(mask, tuple(f.MAX_STEP for f in steps.values()))
    sizes = {
        name: f.bytes_of_rows(e, mask.shape[1], 2)
        for (name, f), e in zip(steps.items(), entries, strict=True)
    }
    return min(sizes, key=sizes.get)
