"""CUDA sparse decode kernels (`sparsegraph.codegen.cuda_kernels`).

Without a GPU (CI): every format builds for several M and schedules, and the generated
CUDA source issues 16-byte vector loads of the packed values (no scalarised packing).
With a GPU: every kernel matches numpy on random weights, sparsities, M and x dtypes
(fp16 weights; tolerance: max |y - ref| / max |ref| <= 2e-3 for fp16 outputs, 1e-3 for
fp32 outputs, ref computed in float64 from the same fp16 values).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from sparsegraph.codegen import cuda_kernels as ck
from sparsegraph.codegen.formats import UnfitError

HAS_GPU = tvm.cuda().exist


def pruned(n, k, sparsity, seed, kind="u", block=(16, 16)):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    if kind == "u":
        w[rng.random((n, k)) < sparsity] = 0
    elif kind == "nm":
        drop = np.argsort(rng.random((n, k // 4, 4)), axis=2)[:, :, :2]
        np.put_along_axis(w.reshape(n, k // 4, 4), drop, 0, axis=2)
    else:
        r, c = block
        w *= np.kron(rng.random((n // r, k // c)) >= sparsity, np.ones((r, c), np.float32))
    return w


CASES = [
    ("dense", {}, "u", 0.0),
    ("csr", {}, "u", 0.9),
    ("dcsr", {}, "u", 0.7),
    ("dcsr", {}, "u", 0.97),  # long gaps: bridging zeros
    ("dcsr6", {}, "u", 0.9),
    ("dcsr6", {}, "u", 0.995),  # gaps over 63: bridging zeros
    ("nm", {"n": 2}, "nm", 0.5),
    ("bsr", {"block": (16, 16)}, "b", 0.7),
    ("bsr", {"block": (1, 16)}, "b", 0.8),
    ("bsr", {"block": (32, 32)}, "b", 0.5),
]


@pytest.mark.parametrize(("fmt", "params", "kind", "sparsity"), CASES)
def test_kernels_build_with_vector_loads(fmt, params, kind, sparsity):
    w = pruned(128, 512, sparsity, 0, kind, params.get("block", (16, 16)))
    packed = ck.pack(fmt, w, **params)
    for m, sched in [
        (1, ck.SCHEDULE_SPACE[fmt][0]),
        (5, ck.SCHEDULE_SPACE[fmt][1]),
        (16, ck.SCHEDULE_SPACE[fmt][2]),
    ]:
        kern = ck.build(fmt, packed, m, x_dtype="float16", **sched)
        src = kern.source()
        assert kern.symbol in src and "*(uint4*)" in src  # 16-byte loads of the values
        assert "make_uint" not in src  # no vector assembled from scalar loads
        assert kern.nbytes == packed.nbytes


def test_candidates_and_unfit():
    from sparsegraph.codegen import cublas

    vendor = ["cublas"] if cublas.available() else []  # where a libcublas loads
    dense = pruned(64, 256, 0.0, 1)
    assert [f for f, _ in ck.candidates(dense, 1)] == ["dense", "dlight", *vendor]
    assert [f for f, _ in ck.candidates(dense, 4)] == ["dense", "mma", "dlight", *vendor]
    assert [f for f, _ in ck.candidates(dense, 64)] == ["mma", "dlight", *vendor]
    assert [f for f, _ in ck.candidates(pruned(40, 256, 0.0, 1), 64)] == ["dlight", *vendor]  # no mma tile
    sparse = pruned(64, 256, 0.7, 1)
    assert {"dcsr", "csr"} <= {f for f, _ in ck.candidates(sparse, 4)}
    # of the two delta-coded CSRs, the smaller: 4-bit steps at 70 %, 6-bit at 90 %
    assert {"dcsr6", "csr"} <= {f for f, _ in ck.candidates(pruned(64, 1024, 0.9, 1), 4)}
    assert "dcsr6" not in {f for f, _ in ck.candidates(sparse, 4)}
    assert ("nm", {"n": 2}) in ck.candidates(pruned(64, 256, 0.5, 1, "nm"), 1)
    assert ("bsr", {"block": (16, 16)}) in ck.candidates(pruned(64, 256, 0.7, 1, "b"), 1)
    with pytest.raises(UnfitError):
        ck.build("csr", sparse, 17)
    with pytest.raises(UnfitError):
        ck.pack("nm", sparse, n=2)  # not 2:4
    with pytest.raises(UnfitError):
        ck.pack("bsr", sparse, block=(16, 4))  # c % 8


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize(("fmt", "params", "kind", "sparsity"), CASES)
@pytest.mark.parametrize("x_dtype", ["float16", "float32"])
def test_kernels_match_numpy_on_gpu(fmt, params, kind, sparsity, x_dtype):
    rng = np.random.default_rng(7)
    for n, k in [(96, 256), (320, 1024)]:
        w = pruned(n, k, sparsity, n + k, kind, params.get("block", (16, 16)))
        packed = ck.pack(fmt, w, **params)
        for m, sched in [(1, 0), (3, 1), (8, 2), (16, 3)]:
            kern = ck.build(fmt, packed, m, x_dtype=x_dtype, **ck.SCHEDULE_SPACE[fmt][sched])
            _assert_matches_on_gpu(kern, w, rng)


def _assert_matches_on_gpu(kern, w, rng):
    """Run `kern` (M, N, K) on the GPU with random X; compare with float64 numpy on the
    fp16-rounded X and W (module docstring's tolerances)."""
    m, n, k = kern.shape
    fn = kern.compile()[kern.symbol]
    dev = tvm.cuda()
    x = rng.standard_normal((m, k)).astype(kern.x_dtype)
    y = tvm.runtime.tensor(np.full((m, n), np.nan, kern.x_dtype), dev)
    fn(tvm.runtime.tensor(x, dev), *[tvm.runtime.tensor(a, dev) for a in kern.weights.values()], y)
    ref = x.astype(np.float16).astype(np.float64) @ w.astype(np.float16).astype(np.float64).T
    err = np.abs(y.numpy().astype(np.float64) - ref).max() / np.abs(ref).max()
    assert err <= (2e-3 if kern.x_dtype == "float16" else 1e-3), (kern.label, n, k, m, err)


@pytest.mark.parametrize(("k", "sparsity"), [(4096, 0.9), (1024, 0.5), (8192, 0.7), (1600, 0.97)])
def test_csr_rows_are_ordered_for_conflict_free_quarter_warps(k, sparsity):
    """The csr packing keeps each row's entries (a permutation within the row) and puts
    X columns of distinct bank groups on the 8 lanes of a quarter warp: on average at most
    1.5 wavefronts per 16-byte load, against ~2.5 in ascending column order."""
    w = pruned(48, k, sparsity, k)
    packed = ck.pack("csr", w)
    vals, cols = packed.weights["values"], packed.weights["indices"].astype(np.int64)
    ptr = packed.weights["indptr"].astype(np.int64) * 8
    rows = np.repeat(np.arange(48), np.diff(ptr))
    back = np.zeros(w.shape, np.float32)
    np.add.at(back, (rows, cols), vals.astype(np.float32))
    np.testing.assert_array_equal(back, w.astype(np.float16).astype(np.float32))

    def wavefronts(order_cols):
        """Mean over quarter-warp loads of the most distinct addresses in one bank group."""
        loads = []
        for r in range(48):
            chunks = order_cols[ptr[r] : ptr[r + 1]].reshape(-1, 8)
            for b in range(0, len(chunks), 8):
                for v in range(8):
                    c = chunks[b : b + 8, v]
                    g = ck.bank_group(c, k)
                    loads.append(max(len(set(c[g == x])) for x in set(g)))
        return np.mean(loads)

    ascending = np.concatenate([np.sort(cols[ptr[r] : ptr[r + 1]]) for r in range(48)])
    assert wavefronts(cols) <= 1.5 < 2.0 <= wavefronts(ascending)


def test_split_csr_kernel_packs_column_halves_and_is_scheduled_where_x_needs_groups():
    """Where one block must stage X in row groups (K = 8192 at M = 16), the csr kernel on a
    cluster of two blocks (half of X each, partial sums through distributed shared memory)
    is scheduled first; its arrays hold each column half as its own CSR."""
    assert ck.schedules("csr", 16, 4096, 8192)[0].get("split") == 2
    assert all("split" not in s for s in ck.schedules("csr", 16, 4096, 4096))  # X fits one block
    assert all("split" not in s for s in ck.schedules("csr", 8, 4096, 8192))
    w = pruned(40, 1024, 0.8, 3)
    packed = ck.pack("csr", w)
    kern = ck.build("csr", packed, 16, x_dtype="float16", wpb=8, rpw=0, unroll=2, lpr=32, split=2)
    arrays = kern.weights
    assert arrays is not packed.weights and arrays["indptr"].shape == (2 * 41,)
    back = np.zeros(w.shape, np.float32)
    ptr = arrays["indptr"].astype(np.int64) * 8
    for half in range(2):
        for row in range(40):
            a, b = ptr[half * 41 + row], ptr[half * 41 + row + 1]
            cols = arrays["indices"][a:b].astype(np.int64) + half * 512
            np.add.at(back[row], cols, arrays["values"][a:b].astype(np.float32))
    np.testing.assert_array_equal(back, w.astype(np.float16).astype(np.float32))
    src = kern.source()
    assert "barrier.cluster" in src and "mapa.shared::cluster" in src and kern.passes == 1
    with pytest.raises(UnfitError):
        ck.build("dcsr", ck.pack("dcsr", w), 16, x_dtype="float16", split=2)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("x_dtype", ["float16", "float32"])
def test_split_csr_kernel_matches_numpy_on_gpu(x_dtype):
    rng = np.random.default_rng(11)
    w = pruned(520, 2048, 0.85, 5)
    packed = ck.pack("csr", w)
    for m, wpb, sms in [(16, 32, 132), (16, 8, 4), (3, 16, 6)]:  # sms < 132: several rows per warp
        kern = ck.build("csr", packed, m, x_dtype=x_dtype, wpb=wpb, rpw=0, unroll=2, lpr=32, split=2, sms=sms)
        _assert_matches_on_gpu(kern, w, rng)


def test_bsr_block_kernel_is_scheduled_for_blocks_of_256_entries():
    w = pruned(128, 512, 0.7, 3, "b", (16, 16))
    first = ck.schedules("bsr", 1, 128, 512, block=(16, 16))[0]
    assert "ks" in first  # whole blocks per warp load first
    assert all("ks" not in s for s in ck.schedules("bsr", 1, 128, 512, block=(1, 16)))
    # packing parameters pass through as keywords, an nm format's `n` included
    assert ck.schedules("nm", 1, 128, 512, None, **{"n": 1}) == ck.SCHEDULE_SPACE["nm"]
    # 2:4: sparse tensor cores first at every M, alone past the row kernel's M
    nm = {m: ck.schedules("nm", m, 128, 512, None, **{"n": 2}) for m in (1, 16, 64)}
    assert all("tc" in s for s in nm[1][:2] + nm[16][:2]) and "tc" not in nm[16][2]
    assert all(s["tc"] for s in nm[64])
    # tensor cores first from M = 2 (blocks of multiples of 16), and alone past the decode kernels' M
    assert "tc" not in first and ck.schedules("bsr", 16, 128, 512, block=(16, 16))[0]["tc"] == 1
    assert all(s["tc"] for s in ck.schedules("bsr", 64, 128, 512, block=(32, 32)))
    assert ck.schedules("bsr", 64, 128, 512, block=(1, 16)) == []
    assert ("nm", {"n": 2}) in ck.candidates(pruned(64, 256, 0.5, 1, "nm"), 64)
    formats = {m: [f for f, _ in ck.candidates(w, m)] for m in (16, 64, 65)}
    assert {"bsr", "dense"} <= set(formats[16]) and {"dcsr", "dcsr6"} & set(formats[16])
    assert "bsr" in formats[64] and not {"dcsr", "dcsr6", "dense"} & set(formats[64])
    assert "bsr" not in formats[65]
    kern = ck.build("bsr", ck.pack("bsr", w, block=(16, 16)), 4, x_dtype="float16", **first)
    src = kern.source()
    assert "*(uint4*)" in src and "__shfl_down_sync" in src
    with pytest.raises(UnfitError, match="r \\* c % 256"):
        ck.build("bsr", ck.pack("bsr", pruned(128, 512, 0.7, 3, "b", (1, 16)), block=(1, 16)), 1, ks=4)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("block", [(16, 16), (32, 32)])
@pytest.mark.parametrize("x_dtype", ["float16", "float32"])
@pytest.mark.parametrize(
    ("kernel", "cases"),  # cases: (M, ks, unroll)
    [({}, [(1, 8, 2), (3, 3, 4), (16, 1, 2)]), ({"tc": 1}, [(1, 4, 2), (5, 3, 4), (16, 1, 2), (64, 2, 2)])],
    ids=["cuda_cores", "tensor_cores"],
)
def test_bsr_block_kernels_match_numpy_on_gpu(block, x_dtype, kernel, cases):
    rng = np.random.default_rng(11)
    for n, k in [(96, 256), (320, 1024)]:
        w = pruned(n, k, 0.6, n + k, "b", block)
        packed = ck.pack("bsr", w, block=block)
        for m, ks, unroll in cases:
            kern = ck.build("bsr", packed, m, x_dtype=x_dtype, ks=ks, unroll=unroll, **kernel)
            _assert_matches_on_gpu(kern, w, rng)


def test_fragment_order_gives_each_lane_its_mma_registers():
    """PTX m16n8k16 A fragment: lane l holds rows l // 4 (a0, a1, a4, a5) and l // 4 + 8 (a2,
    a3, a6, a7), columns 2 (l % 4) + {0, 1} (a0-a3) and + 8 (a4-a7)."""
    from sparsegraph.codegen.cuda_sparse_mma import fragment_order

    blocks = np.random.default_rng(0).standard_normal((3, 32, 16)).astype(np.float16)
    frag = fragment_order(blocks).reshape(3, 2, 1, 32, 8)
    for lane in range(32):
        for i in range(8):
            row = lane // 4 + (8 if i in (2, 3, 6, 7) else 0)
            col = lane % 4 * 2 + i % 2 + (8 if i >= 4 else 0)
            for rs in range(2):
                assert np.array_equal(frag[:, rs, 0, lane, i], blocks[:, rs * 16 + row, col])
    with pytest.raises(ValueError, match="multiples of 16"):
        fragment_order(blocks[:, :8])


@pytest.mark.parametrize(("block", "m"), [((16, 16), 1), ((16, 16), 16), ((32, 32), 64)])
def test_bsr_tensor_core_kernel_builds(block, m):
    w = pruned(128, 512, 0.7, 3, "b", block)
    kern = ck.build("bsr", ck.pack("bsr", w, block=block), m, x_dtype="float16", tc=1, ks=2)
    src = kern.source()
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src
    assert "*(uint4*)(ld_ptr" in src  # a sub-block's fragment: one 16-byte load per lane
    assert kern.nbytes == ck.pack("bsr", w, block=block).nbytes  # the same bytes, reordered
    with pytest.raises(UnfitError, match="multiples of 16"):
        ck.build("bsr", ck.pack("bsr", pruned(128, 512, 0.7, 3, "b", (1, 16)), block=(1, 16)), 1, tc=1)


def test_tensor_core_reordering_is_made_once_per_packing():
    """Kernels built from one `Packed` (several M and schedules, as dispatch builds them) share
    the reordered arrays instead of repacking W per build; a new block-row height repacks."""
    bsr = ck.pack("bsr", pruned(128, 512, 0.7, 3, "b", (16, 16)), block=(16, 16))
    a, b = (ck.build("bsr", bsr, m, x_dtype="float16", tc=1, ks=ks) for m, ks in [(1, 2), (16, 4)])
    assert a.weights["data"] is b.weights["data"] and a.weights["data"] is not bsr.weights["data"]
    nm = ck.pack("nm", pruned(128, 512, 0.5, 3, "nm"), n=2)
    k16, k16b, k32 = (
        ck.build("nm", nm, m, x_dtype="float16", tc=1, rows=r) for m, r in [(1, 16), (4, 16), (4, 32)]
    )
    assert k16.weights["values"] is k16b.weights["values"]
    assert k32.weights["values"] is not k16.weights["values"]


TILE_SCHEDULES = [{"ks": 2, "unroll": 4}, {"ks": 4, "unroll": 2}, {"ks": 8, "unroll": 4}]


def _decode_tile_bitmap(weights, n, k):
    """W from `pack_tile_bitmap`'s arrays, decoded lane by lane as the kernel does (the tile's
    offset plus the set bits of the lanes before, then the lane's set bits in order)."""
    from sparsegraph.codegen.cuda_sparse_mma import _fragment_index

    rows, cols = _fragment_index()
    masks, offsets, values = weights["masks"], weights["offsets"], weights["values"]
    w = np.zeros((n, k), np.float16)
    for t in range(offsets.size):
        words = [int(v) for v in masks[t * 8 : t * 8 + 8]]
        tile = np.zeros((16, 16), np.float16)
        for lane in range(32):
            mine, shift = words[lane // 4], lane % 4 * 8
            pos = int(offsets[t]) + sum(bin(v).count("1") for v in words[: lane // 4])
            pos += bin(mine & ((1 << shift) - 1)).count("1")
            for i in range(8):
                if mine >> (shift + i) & 1:
                    tile[rows[lane, i], cols[lane, i]] = values[pos]
                    pos += 1
        tr, tc = divmod(t, k // 16)
        w[tr * 16 : tr * 16 + 16, tc * 16 : tc * 16 + 16] = tile
    return w


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_tile_bitmap_packing_decodes_to_w(sparsity):
    w = pruned(48, 64, sparsity, 5).astype(np.float16)
    w[16:32, 16:32] = 0  # an empty tile
    packed = ck.pack("tile_bitmap", w)
    assert [a.dtype for a in packed.weights.values()] == [np.float16, np.uint32, np.int32]
    assert np.array_equal(_decode_tile_bitmap(packed.weights, *w.shape), w)
    nnz = max(np.count_nonzero(w), 1)
    assert packed.nbytes == 2 * nnz + w.size // 8 + w.size // 64  # values, masks, tile offsets
    with pytest.raises(UnfitError, match="multiples of 16"):
        ck.pack("tile_bitmap", w[:, :40])


def test_tile_bitmap_kernel_builds():
    w = pruned(128, 512, 0.7, 3)
    packed = ck.pack("tile_bitmap", w)
    for m, sched in [(1, 0), (16, 1), (64, 2)]:
        kern = ck.build("tile_bitmap", packed, m, x_dtype="float16", **TILE_SCHEDULES[sched])
        src = kern.source()
        assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src and "__popc" in src
        assert src.count("__shfl_up_sync") >= 5  # the lanes' value counts: a warp scan
        assert kern.nbytes == packed.nbytes
    assert "tile_bitmap" not in {f for f, _ in ck.candidates(w, 16)}  # measured no faster than cuBLAS
    with pytest.raises(UnfitError, match="M <= 64"):
        ck.build("tile_bitmap", packed, 65)


def test_tensor_core_schedules_fit_the_grid_and_shared_memory():
    from sparsegraph.codegen.cuda_sparse_mma import REDUCE_SMEM, _reduce_bytes

    assert [s["ks"] for s in ck.schedules("tile_bitmap", 16, 28672, 8192)] == [2, 4]  # 1792 block rows
    assert [s["ks"] for s in ck.schedules("tile_bitmap", 16, 4096, 11008)] == [8, 4]  # 256: more warps each
    for m in (1, 16, 64):
        for n, r in [(4096, 16), (4096, 32), (28672, 32)]:
            tc = [s for s in ck.schedules("bsr", m, n, 512, block=(r, r)) if "tc" in s]
            assert len(tc) == 2 and all(_reduce_bytes(m, r, s["ks"]) <= REDUCE_SMEM for s in tc)
    w = pruned(128, 512, 0.7, 3, "b", (32, 32))
    with pytest.raises(UnfitError, match="reduction exceeds"):
        ck.build("bsr", ck.pack("bsr", w, block=(32, 32)), 64, tc=1, ks=16)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("x_dtype", ["float16", "float32"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_tile_bitmap_kernel_matches_numpy_on_gpu(x_dtype, sparsity):
    rng = np.random.default_rng(13)
    for n, k in [(96, 256), (320, 1024)]:
        w = pruned(n, k, sparsity, n + k)
        w[:16] = 0  # a tile row without values
        packed = ck.pack("tile_bitmap", w)
        for m, sched in [(1, 0), (5, 1), (16, 0), (64, 2)]:
            kern = ck.build("tile_bitmap", packed, m, x_dtype=x_dtype, **TILE_SCHEDULES[sched])
            _assert_matches_on_gpu(kern, w, rng)


def _decode_nm_tiles(weights, n, k, r):
    """W from `pack_nm_tiles`'s arrays, read as mma.sp does: lane 4 g + s's metadata word holds
    rows g (bits 0-15) and g + 8 (bits 16-31), groups 4 s .. 4 s + 3; a tile's 16 x 16 kept
    values are an m16n8k16 A fragment, kept column j belonging to group j // 2."""
    from sparsegraph.codegen.cuda_sparse_mma import _fragment_index

    rows, cols = _fragment_index()
    vals = weights["values"].reshape(-1, 32, 8)
    meta = weights["meta"].reshape(-1, 8, 2)
    w = np.zeros((n, k), np.float16)
    for t in range(vals.shape[0]):
        kept = np.zeros((16, 16), np.float16)
        kept[rows, cols] = vals[t]
        tile = np.zeros((16, 32), np.float16)
        for row in range(16):
            for group in range(8):
                word = int(meta[t, row % 8, group // 4]) >> (16 * (row // 8))
                nibble = word >> (4 * (group % 4)) & 15
                for j, pos in enumerate((nibble & 3, nibble >> 2)):
                    tile[row, group * 4 + pos] = kept[row, group * 2 + j]
        block, sub = divmod(t, r // 16)  # blocks of r x 32 row-major, their tiles top to bottom
        br, bc = divmod(block, k // 32)
        row0 = br * r + sub * 16
        w[row0 : row0 + 16, bc * 32 : bc * 32 + 32] = tile
    return w


def test_nm_tiles_decode_to_w_and_build_for_sparse_tensor_cores():
    w = pruned(48, 128, 0.5, 9, "nm").astype(np.float16)
    w[:, :4] = 0  # groups with fewer than 2 nonzeros keep distinct positions (explicit zeros)
    w[1, 4:8] = [0, 0, 0, 1]
    packed = ck.pack("nm", w, n=2)
    from sparsegraph.codegen.cuda_sparse_mma import pack_nm_tiles

    for r in (16, 48):
        tiles = pack_nm_tiles(packed.weights["values"], packed.weights["positions"], *w.shape, r)
        assert np.array_equal(_decode_nm_tiles(tiles, *w.shape, r), w)
    with pytest.raises(UnfitError, match="N % 32"):
        pack_nm_tiles(packed.weights["values"], packed.weights["positions"], *w.shape, 32)
    nibbles = (tiles["meta"][:, None] >> np.arange(0, 32, 4, dtype=np.uint32)) & 15
    assert not np.isin(nibbles, [0, 5, 10, 15]).any()  # PTX: two distinct positions per group
    for m, sched, rows in [(1, 0, 16), (16, 1, 48), (64, 2, 16)]:
        kern = ck.build("nm", packed, m, x_dtype="float16", tc=1, rows=rows, **TILE_SCHEDULES[sched])
        src = kern.source()
        assert "mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32" in src
        assert "*(uint4*)(ld_ptr" in src  # a tile's kept values: one 16-byte load per lane
        assert kern.nbytes == packed.nbytes  # 2:4's bytes, reordered
    with pytest.raises(UnfitError, match="2:4"):
        ck.build("nm", ck.pack("nm", pruned(48, 128, 0.5, 9, "u") * (np.arange(128) % 4 == 0), n=1), 4, tc=1)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("x_dtype", ["float16", "float32"])
def test_nm_sparse_tensor_core_kernel_matches_numpy_on_gpu(x_dtype):
    rng = np.random.default_rng(17)
    for n, k in [(96, 256), (320, 1024)]:
        w = pruned(n, k, 0.5, n + k, "nm")
        w[:16, :64] = 0  # groups without values
        packed = ck.pack("nm", w, n=2)
        for m, sched, rows in [(1, 0, 16), (5, 1, 32), (16, 0, 32), (64, 2, 16), (3, 2, 32)]:
            kern = ck.build("nm", packed, m, x_dtype=x_dtype, tc=1, rows=rows, **TILE_SCHEDULES[sched])
            _assert_matches_on_gpu(kern, w, rng)
