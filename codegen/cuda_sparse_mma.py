"""Sparse W on tensor cores for small batches: ``Y[M, N] = X[M, K] @ W.T``, fp16 W, M = 1..64,
one ``mma.sync.m16n8k16`` per 16 x 16 sub-block of W and 8 rows of X. Three formats:

* **BSR** with blocks of multiples of 16 (`bsr_layout`). At M = 16 the CUDA-core block kernel
  (`cuda_kernels._bsr_blocks_func`) does 16 FMAs per weight and stops being bound by the
  weight bytes (on the H100, 8192->28672 BSR 16x16 at 90 %: 6.6x cuBLAS at M = 1, 2.7x at
  M = 16); here the tensor cores do those products (6.0x at M = 16). The packed values are
  stored in the mma A-fragment order (`fragment_order`): lane l's 16 bytes of a 16 x 16
  sub-block are its registers a0..a3, so one 16-byte load per lane brings a whole sub-block
  into registers (a 512-byte warp load, no ldmatrix or shared memory).
* **2:4** (`nm_layout`, `pack_nm_tiles`) on sparse tensor cores: one ``mma.sp.m16n8k32``
  per 16 x 32 tile, whose 16 x 16 kept values are a dense A fragment (one 16-byte load per
  lane) and whose 2-bit positions are one metadata word per lane pair; 1.125 bytes per
  weight entry. Blocks of 32 or 64 rows load each B fragment once for 2-4 tiles: at M = 16
  X is otherwise re-read from L2 once per 16 rows (8192->28672 on the H100: 1.5x slower).
* **Tile bitmaps** for unstructured W (`tile_bitmap_layout`, `pack_tile_bitmap`): every
  16 x 16 tile is stored, as a 256-bit mask in fragment order (lane l's byte: which of its 8
  fragment entries are nonzero), its nonzero values in fragment order (lane-major), and the
  tile's offset into them; lane l loads the mask word that holds its byte and finds its
  values at that offset plus the lanes before it (a 5-step warp scan of the bytes'
  popcounts), one predicated 2-byte load per set bit. Bytes per weight entry: 2 x density
  + 1/8 + 1/64 (1.14 at 50 %, 0.74 at 70 %, 0.34 at 90 %; dense 2). Measured on the H100
  (8192->28672): 0.92 / 0.97 / 1.01x cuBLAS at M = 1 and 50 / 70 / 90 %, 0.66-0.73x at
  M = 16 -- the same ~0.19 ns per tile at every sparsity, so decoding a tile costs what
  streaming it dense does, and it is not a dispatch candidate. The tensor-core-aware
  bitmap of SpInfer (Fan et al., "SpInfer: Leveraging Low-Level Sparsity for Efficient
  Large Language Model Inference on GPUs", EuroSys 2025), decoded into registers rather
  than shared memory.

Common to all: A = a W sub-block (16 outputs x 16 input channels; 2:4: x 32, 16 kept); B = 8
rows of X over those channels (b0, b1, ...: channels ``2 (l % 4) + {0, 1}`` plus 0, 8 (16,
24) of row ``l // 4``, one 2-entry load each from global memory, L1/L2-resident; rows past
M read as zeros); C = the 16 x 8 partial of Y^T in fp32 registers. `ks` warps share a block
row (each takes every ks-th block or tile), `unroll` blocks in flight per warp; the warps' C
fragments are summed through shared memory and written in X's dtype.

Fragment layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"
(the sparse m16n8k32 A fragment has the same layout over the kept values; its metadata
layout was confirmed on the H100 against the alternatives).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from tvm.script import tirx as T

from .cuda_kernels import CUDAKernel, block_row_grid
from .cuda_mma import mma_m16n8k16
from .formats import UnfitError

WARP = 32
MAX_M = 64
REDUCE_SMEM = 64 * 1024  # largest cross-warp reduction buffer (bytes), as measured on the H100
_SYMBOLS = itertools.count()


def _reduce_bytes(m: int, r: int, ks: int) -> int:
    """Shared memory of the `ks` warps' C-fragment reduction at M = m, blocks of r rows."""
    return ks * (r // 16) * -(-m // 8) * 4 * WARP * 4


def schedules(m: int, n: int, r: int) -> list[dict[str, int]]:
    """Two schedules to time, best guess first, for N outputs in blocks of r rows at M = m:
    `ks` warps per block row such that ~2048 warps run (2 to 8, within `REDUCE_SMEM`), then
    half as many (4 after 2), ``unroll`` 4. On the H100 (BSR at M = 4-64, ks 2 and 4 timed):
    with 1792 block rows ks = 2 won, with 128-688 ks = 4 always did, so fewer block rows want
    more warps each; both winners stay among the two."""
    ks = 2
    while ks < 8 and n // r * ks < 2048:
        ks *= 2
    while ks > 2 and _reduce_bytes(m, r, ks) > REDUCE_SMEM:
        ks //= 2
    return [{"ks": ks, "unroll": 4}, {"ks": 4 if ks == 2 else ks // 2, "unroll": 4}]


def nm_schedules(m: int, n: int) -> list[dict[str, int]]:
    """Two schedules of the 2:4 kernel to time at M = m for N outputs, best guess first.
    From M = 2: blocks of `rows` x 32 (taller blocks load each B fragment of X once for more
    tiles; 64 rows where N / 64 >= 256 block rows, else 32; at most 1024 / M rows, so the
    accumulators stay in registers) with `ks` warps per block row such that ~2048 warps run,
    then twice the warps (up to 32, within `REDUCE_SMEM`). At M = 1: 16 rows, ~4096 warps,
    then twice. On the H100 (`benchmarks/gpu_decode_kernels.py --suite nm`, M = 16):
    8192->28672 64 rows ks 8 (16 rows: 1.5x slower, X read from L2 once per block row),
    4096->11008 32 rows ks 8, 11008->4096 and 4096->4096 32 rows ks 32 (ks 16: 1.2x slower);
    at M = 1, 4096->4096 16 rows ks 32."""

    def warps(r: int, want: int) -> int:
        ks = 2
        while ks < 32 and n // r * ks < want:
            ks *= 2
        while ks > 2 and _reduce_bytes(m, r, ks) > REDUCE_SMEM:
            ks //= 2
        return ks

    tall = [r for r in (64, 32) if n % r == 0 and r * m <= 1024 and (r == 32 or n // r >= 256)]
    r, unroll, want = (tall[0], 2, 2048) if m > 1 and tall else (16, 4, 4096)
    ks = warps(r, want)
    return [
        {"rows": r, "ks": ks, "unroll": unroll},
        {"rows": r, "ks": warps(r, n // r * ks * 2), "unroll": 4},
    ]


def _fragment_index() -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) [32, 8]: the 16 x 16 tile entry lane l holds as its k-th fp16 of a0..a3."""
    lane = np.arange(WARP)[:, None]
    i = np.arange(8)[None, :]
    rows = lane // 4 + 8 * ((i // 2) % 2)
    cols = 2 * (lane % 4) + i % 2 + 8 * (i // 4)
    return rows, cols


def _fragments(blocks: np.ndarray) -> np.ndarray:
    """``[NB, r, c]`` blocks (r, c multiples of 16) as ``[NB, r/16, c/16, 32, 8]``: each 16 x 16
    sub-block as 32 lanes x 8 entries in A-fragment order."""
    nb, r, c = blocks.shape
    if r % 16 or c % 16:
        raise ValueError(f"tensor-core kernels need blocks of multiples of 16; got {r}x{c}")
    rows, cols = _fragment_index()
    sub = blocks.reshape(nb, r // 16, 16, c // 16, 16).transpose(0, 1, 3, 2, 4)  # [NB, RS, CS, 16, 16]
    return sub[..., rows, cols]


def fragment_order(blocks: np.ndarray) -> np.ndarray:
    """BSR block values ``[NB, r, c]`` (r, c multiples of 16; row = output, column = input
    channel) as the flat array the kernel reads: per block, its 16 x 16 sub-blocks in row-major
    order, each as 32 lanes x 8 fp16 in A-fragment order."""
    return np.ascontiguousarray(_fragments(blocks)).reshape(-1)


def pack_tile_bitmap(w: np.ndarray) -> dict[str, np.ndarray]:
    """``W[N, K]`` (N, K multiples of 16) as tile bitmaps, in kernel signature order:
    ``values`` (fp16, the nonzeros tile by tile, each tile's in fragment order), ``masks``
    (uint32 [tiles * 8]: word j holds the mask bytes of lanes 4j..4j+3, lane l's at bits
    ``8 (l % 4)``, bit i = its i-th fragment entry is nonzero) and ``offsets`` (int32, each
    tile's first value). Tiles are numbered row-major: tile row ``n // 16``, then ``k // 16``."""
    n, k = w.shape
    if n % 16 or k % 16:
        raise UnfitError(f"tile bitmaps need N and K multiples of 16; got {n}x{k}")
    frag = _fragments(np.asarray(w, np.float16)[None]).reshape(-1, WARP, 8)  # [tiles, 32, 8]
    nz = frag != 0
    lane_bytes = (nz.astype(np.uint32) << np.arange(8, dtype=np.uint32)).sum(axis=2, dtype=np.uint32)
    masks = (lane_bytes.reshape(-1, 8, 4) << np.array([0, 8, 16, 24], np.uint32)).sum(axis=2, dtype=np.uint32)
    counts = nz.sum(axis=(1, 2))
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    values = frag[nz]
    return {
        "values": values if values.size else np.zeros(1, np.float16),
        "masks": masks.reshape(-1),
        "offsets": offsets,
    }


@dataclass(frozen=True)
class _Layout:
    """How the generic kernel (`_mma_func`) finds a block row's blocks and their values:
    `r` x `c` blocks; the two index arrays' (shape, dtype); ``span(i1, i2, br)`` -> (first
    block, blocks) of block row br; ``column(i1, blk, br)`` -> block blk's first input
    channel; `load_a(vals, i1, i2, af, ld, words, first, u, blk, lane)` -> block blk's A
    fragments into ``af[u * SUB * 8:]``. Where the values' addresses depend on loaded
    metadata, ``prefetch(i1, i2, words, first, u, blk, lane)`` loads it (`words` uint32 and
    one int32 per block) for all `unroll` blocks first, so that their loads overlap. `sparse`:
    each 16 x 32 block is a 2:4 A of ``mma.sp`` (its 16 x 16 kept values as the A fragment,
    its tiles' metadata words in ``words[u * words:]``)."""

    r: int
    c: int
    values: int
    index1: tuple[tuple[int, ...], str]
    index2: tuple[tuple[int, ...], str]
    span: Callable
    column: Callable
    load_a: Any
    prefetch: Any = None
    words: int = 0
    sparse: bool = False  # 2:4 A on sparse tensor cores: one mma.sp.m16n8k32 per 16 x 32 block


def _whole_fragments(sub: int) -> Any:
    """`_Layout.load_a` of a layout whose blocks store their `sub` A fragments one after
    another in fragment order (BSR, 2:4): one 16-byte load per lane and fragment."""

    @T.macro
    def load_a(vals, idx, ptr, af, ld, words, first, u, blk, lane):
        for s in T.unroll(sub):
            # through `ld`: a vector-typed `af` would shift the mma operands' offsets to vector units
            for v in T.vectorized(8):
                ld[v] = vals[(blk * sub + s) * 256 + lane * 8 + v]
            for v in T.unroll(8):
                af[(u * sub + s) * 8 + v] = ld[v]

    return load_a


def bsr_layout(N: int, K: int, NB: int, r: int, c: int) -> _Layout:
    """BSR (``vals`` from `fragment_order`, ``idx[NB]`` uint16 block columns, ``ptr[N / r + 1]``
    int32 block-row starts)."""
    return _Layout(
        r,
        c,
        NB * r * c,
        ((NB,), "uint16"),
        ((N // r + 1,), "int32"),
        lambda idx, ptr, br: (ptr[br], ptr[br + 1] - ptr[br]),
        lambda idx, blk, br: T.Cast("int32", idx[blk]) * c,
        _whole_fragments((r // 16) * (c // 16)),
    )


def tile_bitmap_layout(N: int, K: int, nnz: int) -> _Layout:
    """Tile bitmaps (`pack_tile_bitmap`): every 16 x 16 tile is a block, so block row br holds
    tiles ``br * K / 16 ..``; no block columns to read."""
    KT = K // 16

    @T.macro
    def prefetch(masks, offsets, words, first, u, blk, lane):
        words[u] = masks[blk * 8 + lane // 4]  # the mask word holding this lane's byte
        first[u] = offsets[blk]

    @T.macro
    def load_a(vals, masks, offsets, af, ld, words, first, u, blk, lane):
        mine = T.decl_buffer((1,), "uint32", scope="local")
        before = T.decl_buffer((1,), "int32", scope="local")  # inclusive scan of the lanes' counts
        pulled = T.decl_buffer((1,), "int32", scope="local")
        pos = T.decl_buffer((1,), "int32", scope="local")
        mine[0] = T.bitwise_and(T.shift_right(words[u], T.Cast("uint32", lane % 4 * 8)), T.uint32(255))
        before[0] = T.Cast("int32", T.popcount(mine[0]))
        for d in T.unroll(5):  # the values of the lanes before this one come first
            pulled[0] = T.tvm_warp_shuffle_up(T.tvm_warp_activemask(), before[0], 1 << d, WARP, WARP)
            if lane >= 1 << d:
                before[0] = before[0] + pulled[0]
        pos[0] = first[u] + before[0] - T.Cast("int32", T.popcount(mine[0]))
        for i in T.unroll(8):
            if T.bitwise_and(T.shift_right(mine[0], T.uint32(i)), T.uint32(1)) != T.uint32(0):
                af[u * 8 + i] = vals[pos[0]]
                pos[0] = pos[0] + 1
            else:
                af[u * 8 + i] = T.float16(0)

    return _Layout(
        16,
        16,
        max(nnz, 1),
        ((N // 16 * KT * 8,), "uint32"),
        ((N // 16 * KT,), "int32"),
        lambda masks, offsets, br: (br * KT, KT),
        lambda masks, blk, br: (blk - br * KT) * 16,
        load_a,
        prefetch,
        1,
    )


def pack_nm_tiles(
    values: np.ndarray, positions: np.ndarray, n: int, k: int, r: int = 16
) -> dict[str, np.ndarray]:
    """2:4 W as packed by `formats.NM` (``values[N, K / 2]``, the row-major byte stream of
    2-bit positions) as the sparse tensor-core kernel reads it, in 16 x 32 tiles: blocks of r
    rows x 32 input channels row-major, each block's r / 16 tiles top to bottom. Arrays:
    ``values`` (fp16; each tile's 16 x 16 kept values in A-fragment order, `fragment_order`)
    and ``meta`` (uint32 [tiles * 16]; word ``2 g + s`` for lanes ``4 g + s`` and ``4 g + s +
    2``: bits 0-15 hold the positions of row g's groups ``4 s .. 4 s + 3`` of the tile, bits
    16-31 those of row g + 8; a group's nibble is ``pos0 | pos1 << 2``, ascending)."""
    if r % 16 or n % r or k % 32:
        raise UnfitError(f"2:4 tensor-core blocks of {r} x 32 need N % {r} == 0 and K % 32 == 0; got {n}x{k}")
    rs = r // 16
    comp = np.asarray(values, np.float16).reshape(n // r, rs, 16, k // 32, 16).transpose(0, 3, 1, 2, 4)
    words = np.ascontiguousarray(positions).view(np.uint8).reshape(n, k // 8).view(np.uint32)
    tiles = words.reshape(n // r, rs, 16, k // 32).transpose(0, 3, 1, 2)  # [blocks.., 16 rows]
    halves = [(tiles >> np.uint32(16 * s)) & np.uint32(0xFFFF) for s in (0, 1)]
    meta = np.stack([h[..., :8] | (h[..., 8:] << np.uint32(16)) for h in halves], axis=-1)  # [.., g, s]
    return {"values": fragment_order(comp.reshape(-1, 16, 16)), "meta": meta.reshape(-1).astype(np.uint32)}


def nm_layout(N: int, K: int, r: int) -> _Layout:
    """2:4 W (`pack_nm_tiles`) on sparse tensor cores in blocks of r x 32: block row br holds
    blocks ``br * K / 32 ..``; per tile, one 16-byte load per lane brings its kept values and
    one 4-byte load its metadata (``mma.sp`` with sparsity selector 0 reads lanes 4 g and 4 g +
    1). Taller blocks share each B fragment (X) among more tiles."""
    KT, RS = K // 32, r // 16

    @T.macro
    def prefetch(meta, unused, words, first, u, blk, lane):
        for s in T.unroll(RS):
            words[u * RS + s] = meta[(blk * RS + s) * 16 + lane // 4 * 2 + lane % 2]

    return _Layout(
        r,
        32,
        N * K // 2,
        ((N // 16 * KT * 16,), "uint32"),
        None,
        lambda meta, unused, br: (br * KT, KT),
        lambda meta, blk, br: (blk - br * KT) * 32,
        _whole_fragments(RS),
        prefetch,
        RS,
        sparse=True,
    )


@T.macro
def mma_sp_m16n8k32(a, a_offset, b, b_offset, c, c_offset, e):
    """``mma.sp.sync.m16n8k32.row.col`` f32 += 2:4 f16 x f16 (sparsity selector 0): A's 4
    uint32 (the 16 x 16 kept values) at ``a[a_offset]``, B's 4 at ``b[b_offset]``, C's 4 fp32 at
    ``c[c_offset]``, metadata word `e`. PTX ISA, "Matrix multiply-accumulate operation using
    mma.sp instruction with sparse matrix A"."""
    T.ptx.mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32(
        c[c_offset], c[c_offset + 1], c[c_offset + 2], c[c_offset + 3],
        a[a_offset], a[a_offset + 1], a[a_offset + 2], a[a_offset + 3],
        b[b_offset], b[b_offset + 1], b[b_offset + 2], b[b_offset + 3],
        c[c_offset], c[c_offset + 1], c[c_offset + 2], c[c_offset + 3], e, 0,
    )  # fmt: skip


def _mma_func(M: int, N: int, K: int, xdtype: str, ks: int, unr: int, sms: int, lay: _Layout):
    """The PrimFunc ``(x[M, K], vals, index1, [index2,] y[M, N])`` of layout `lay` (see the
    module docstring)."""
    r, c = lay.r, lay.c
    if not 1 <= M <= MAX_M or r % 16 or c % 16 or N % r or K % c:
        raise ValueError(
            f"tensor-core sparse kernels: M <= {MAX_M}, blocks of multiples of 16 dividing N and K"
        )
    if _reduce_bytes(M, r, ks) > REDUCE_SMEM:
        raise UnfitError(f"{ks} warps per block row at M = {M}: the reduction exceeds {REDUCE_SMEM} bytes")
    KB = 32 if lay.sparse else 16  # input channels per mma
    BW = KB // 4  # fp16 B-fragment entries per lane and 8 rows of X
    RS, CS = r // 16, c // KB
    SUB, MT = RS * CS, -(-M // 8)  # A fragments (16 x 16 stored values) per block, 8-row tiles of X
    NBR = N // r
    GRID, ITER = block_row_grid(NBR, ks * WARP, sms)
    ACC = RS * MT * 4

    @T.macro
    def body(x, vals, idx, ptr, y):
        for bx in T.thread_binding(GRID, thread="blockIdx.x"):
            for ty in T.thread_binding(ks, thread="threadIdx.y"):
                for lane in T.thread_binding(WARP, thread="threadIdx.x"):
                    red = T.decl_buffer((ks, ACC, WARP), "float32", scope="shared")
                    af = T.decl_buffer((unr * SUB * 8,), "float16", scope="local")
                    ld = T.decl_buffer((8,), "float16", scope="local")  # one 16-byte load
                    xv = T.decl_buffer((2,), xdtype, scope="local")  # one 4- or 8-byte load
                    bf = T.decl_buffer((MT * BW,), "float16", scope="local")
                    afu = T.decl_buffer((unr * SUB * 4,), "uint32", data=af.data, scope="local")
                    bfu = T.decl_buffer((MT * BW // 2,), "uint32", data=bf.data, scope="local")
                    words = T.decl_buffer((unr * max(lay.words, 1),), "uint32", scope="local")
                    first_v = T.decl_buffer((unr,), "int32", scope="local")
                    acc = T.decl_buffer((ACC,), "float32", scope="local")
                    g = T.meta_var(lane // 4)
                    t2 = T.meta_var(lane % 4 * 2)
                    for it in range(ITER):
                        br = T.meta_var(bx + it * GRID)
                        if br < NBR:
                            start, count = T.meta_var(lay.span(idx, ptr, br))
                            first = T.meta_var(start + ty)
                            mine = T.meta_var((count - ty + ks - 1) // ks)
                            for i in T.unroll(ACC):
                                acc[i] = T.float32(0)
                            for j in range((mine + unr - 1) // unr):
                                if lay.prefetch is not None:
                                    for u in T.unroll(unr):
                                        if j * unr + u < mine:
                                            blk = T.meta_var(first + (j * unr + u) * ks)
                                            lay.prefetch(idx, ptr, words, first_v, u, blk, lane)
                                for u in T.unroll(unr):
                                    if j * unr + u < mine:
                                        blk = T.meta_var(first + (j * unr + u) * ks)
                                        lay.load_a(vals, idx, ptr, af, ld, words, first_v, u, blk, lane)
                                for u in T.unroll(unr):
                                    if j * unr + u < mine:
                                        col0 = T.meta_var(lay.column(idx, first + (j * unr + u) * ks, br))
                                        for cs in T.unroll(CS):
                                            for mt in T.unroll(MT):
                                                row = T.meta_var(mt * 8 + g)
                                                for h in T.unroll(KB // 8):  # one 2-entry load each
                                                    if row < M:
                                                        for v in T.vectorized(2):
                                                            xv[v] = x[row, col0 + cs * KB + h * 8 + t2 + v]
                                                    else:
                                                        for v in T.unroll(2):
                                                            xv[v] = T.Cast(xdtype, 0)
                                                    for v in T.unroll(2):
                                                        bf[mt * BW + h * 2 + v] = T.Cast("float16", xv[v])
                                            for rs in T.unroll(RS):
                                                for mt in T.unroll(MT):
                                                    a0 = T.meta_var((u * SUB + rs * CS + cs) * 8)
                                                    c0 = T.meta_var((rs * MT + mt) * 4)
                                                    if lay.sparse:
                                                        mma_sp_m16n8k32(
                                                            afu,
                                                            a0 // 2,
                                                            bfu,
                                                            mt * 4,
                                                            acc,
                                                            c0,
                                                            words[u * lay.words + rs],
                                                        )
                                                    else:
                                                        mma_m16n8k16(af, a0, bf, mt * BW, acc, c0)
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

    (S1, D1) = lay.index1
    if lay.index2 is None:

        @T.prim_func
        def main(
            x: T.Buffer((M, K), xdtype),
            vals: T.Buffer((lay.values,), "float16"),
            idx: T.Buffer(S1, D1),
            y: T.Buffer((M, N), xdtype),
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            body(x, vals, idx, idx, y)

        return main
    (S2, D2) = lay.index2

    @T.prim_func
    def main2(
        x: T.Buffer((M, K), xdtype),
        vals: T.Buffer((lay.values,), "float16"),
        idx: T.Buffer(S1, D1),
        ptr: T.Buffer(S2, D2),
        y: T.Buffer((M, N), xdtype),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        body(x, vals, idx, ptr, y)

    return main2


def build(
    packed: Any,
    m: int,
    x_dtype: str = "float32",
    ks: int = 4,
    unroll: int = 2,
    sms: int = 132,
    rows: int = 16,
):
    """The tensor-core kernel for a `cuda_kernels.Packed` weight at M = m: ``bsr`` (blocks of
    multiples of 16; its values reordered by `fragment_order`), ``nm`` (2:4, in blocks of
    `rows` x 32, reordered by `pack_nm_tiles`) or ``tile_bitmap``, as a
    `cuda_kernels.CUDAKernel`."""
    n, k = packed.shape
    if not 1 <= m <= MAX_M:
        raise UnfitError(f"tensor-core sparse kernels take M <= {MAX_M}; got M={m}")
    weights = dict(packed.weights)
    if packed.format == "tile_bitmap":
        lay, sched = tile_bitmap_layout(n, k, packed.meta["S"]), {}
    elif packed.format == "nm":
        if packed.meta["nm_n"] != 2:
            raise UnfitError(f"sparse tensor cores take 2:4 W; got {packed.meta['nm_n']}:4")
        weights = packed.derive(
            ("nm_tiles", rows), lambda: pack_nm_tiles(weights["values"], weights["positions"], n, k, rows)
        )
        lay, sched = nm_layout(n, k, rows), {"nm_n": 2, "tc": 1, "rows": rows}
    else:
        r, c = packed.meta["block"]
        if r % 16 or c % 16:
            raise UnfitError(f"tensor-core BSR needs blocks of multiples of 16; got {r}x{c}")
        nb = packed.meta["NB"]
        weights = packed.derive(
            "fragment_order", lambda: {**weights, "data": fragment_order(weights["data"].reshape(nb, r, c))}
        )
        lay, sched = bsr_layout(n, k, nb, r, c), {"block": (r, c), "tc": 1}
    prim = _mma_func(m, n, k, x_dtype, ks, unroll, sms, lay)
    symbol = f"sg_cuda_{packed.format}_mma_m{m}_n{n}_k{k}_{next(_SYMBOLS)}"
    sched = {**sched, "ks": ks, "unroll": unroll}
    return CUDAKernel(
        packed.format, (m, n, k), prim.with_attr("global_symbol", symbol), weights, symbol, x_dtype, sched
    )
