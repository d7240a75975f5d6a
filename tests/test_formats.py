"""Tests for sparsegraph.codegen.formats: exact round trips, layouts, sizes, errors."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsegraph.codegen.formats import (
    BSR,
    CSR,
    FORMATS,
    NM,
    Bitmap,
    DeltaCSR,
    DeltaCSR6,
    Dense,
    FormatError,
    UnfitError,
    delta_row_entries,
    format_bytes,
    index_dtype,
)

SETTINGS = settings(max_examples=100, deadline=None)
DTYPES = st.sampled_from([np.float32, np.float16])
SPARSITIES = st.sampled_from([0.0, 0.5, 0.9, 1.0])
SEEDS = st.integers(0, 2**32 - 1)


def random_weight(shape, sparsity, dtype, seed):
    """Nonzero values in +-[0.5, 2) (no underflow to zero in fp16), `sparsity` zeroed."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
    w[rng.random(shape) < sparsity] = 0.0
    return w.astype(dtype)


def nm_weight(rows, groups, n, m, sparsity, dtype, seed):
    """A W[rows, groups*m] with at most n nonzeros in every group of m."""
    rng = np.random.default_rng(seed)
    w = random_weight((rows, groups, m), sparsity, np.float64, seed)
    drop = np.argsort(rng.random((rows, groups, m)), axis=-1)[..., n:]
    np.put_along_axis(w, drop, 0.0, axis=-1)
    return w.reshape(rows, groups * m).astype(dtype)


def bitwise_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def check_format(fmt, w):
    """The invariants every packed format must satisfy for its source W."""
    cls = type(fmt)
    assert fmt.shape == w.shape and fmt.dtype == w.dtype
    assert bitwise_equal(fmt.unpack(), w)
    assert fmt.nnz == np.count_nonzero(w)
    arrays = fmt.arrays()
    assert list(arrays) == list(cls.ARRAYS)
    assert fmt.nbytes() == sum(a.nbytes for a in arrays.values())
    assert cls.packed_nbytes(w, **{k: v for k, v in fmt.attrs().items() if k != "shape"}) == fmt.nbytes()
    again = cls.from_arrays({k: a.copy() for k, a in arrays.items()}, **fmt.attrs())
    assert bitwise_equal(again.unpack(), w)
    for name, a in again.arrays().items():
        assert bitwise_equal(a, arrays[name])
    for a in arrays.values():
        assert not a.flags.writeable and a.flags.c_contiguous


# --------------------------------------------------------------------------- round trips


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 40), DTYPES, SPARSITIES, SEEDS)
def test_dense_round_trip(n, k, dtype, sparsity, seed):
    w = random_weight((n, k), sparsity, dtype, seed)
    f = Dense.pack(w)
    check_format(f, w)
    assert f.nbytes() == n * k * w.itemsize


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 300), DTYPES, SPARSITIES, st.sampled_from([1, 2, 8, 16]), SEEDS)
def test_csr_round_trip(n, k, dtype, sparsity, pad, seed):
    w = random_weight((n, k), sparsity, dtype, seed)
    f = CSR.pack(w, pad=pad)
    check_format(f, w)
    assert f.pad == pad
    assert f.indices.dtype == index_dtype(k - 1)
    row_len = np.diff(f.indptr.astype(np.int64))
    assert np.all(row_len % pad == 0)
    real = np.count_nonzero(w, axis=1)
    assert np.all(row_len - real < pad) and np.all(row_len >= real)
    itemsize = w.itemsize + f.indices.itemsize
    assert f.nbytes() == row_len.sum() * itemsize + (n + 1) * f.indptr.itemsize
    # padding entries sit after each row's real entries: value 0, column 0
    rows = np.repeat(np.arange(n), row_len)
    rank = np.arange(rows.size) - f.indptr.astype(np.int64)[rows]
    is_pad = rank >= real[rows]
    assert np.all(f.values[is_pad] == 0) and np.all(f.indices[is_pad] == 0)
    assert np.all(f.values[~is_pad] != 0)


@SETTINGS
@given(
    st.sampled_from([(1, 1), (16, 1), (4, 4), (2, 3), (8, 2), (1, 5)]),
    st.integers(1, 5),
    st.integers(1, 5),
    DTYPES,
    SPARSITIES,
    SEEDS,
)
def test_bsr_round_trip(block, nb, kb, dtype, sparsity, seed):
    r, c = block
    w = random_weight((nb * r, kb * c), sparsity, dtype, seed)
    f = BSR.pack(w, block=block)
    check_format(f, w)
    assert f.block == block and f.data.shape[1:] == (c, r)
    blocks = (w.reshape(nb, r, kb, c) != 0).any(axis=(1, 3))
    assert f.nnzb == np.count_nonzero(blocks)
    assert f.nbytes() == f.nnzb * (r * c * w.itemsize + f.indices.itemsize) + (nb + 1) * f.indptr.itemsize


@SETTINGS
@given(
    st.sampled_from([(2, 4), (1, 4), (4, 8), (1, 2), (3, 5), (2, 16), (4, 4)]),
    st.integers(1, 12),
    st.integers(1, 9),
    DTYPES,
    SPARSITIES,
    SEEDS,
)
def test_nm_round_trip(nm, rows, groups, dtype, sparsity, seed):
    n, m = nm
    w = nm_weight(rows, groups, n, m, sparsity, dtype, seed)
    f = NM.pack(w, n=n, m=m)
    check_format(f, w)
    bits = int(np.ceil(np.log2(m)))
    assert f.bits == bits
    assert f.values.shape == (rows, groups * n)
    assert f.indices.dtype == np.uint8 and f.indices.shape == (rows, -(-groups * n * bits // 8))
    pos = f.positions()
    assert np.all(pos[..., 1:] > pos[..., :-1]) and np.all(pos < m)
    # every nonzero of W is among the kept positions
    kept = np.zeros((rows, groups, m), bool)
    np.put_along_axis(kept, pos, True, axis=-1)
    assert not np.any((w.reshape(rows, groups, m) != 0) & ~kept)


@SETTINGS
@given(st.sampled_from([8, 16, 32, 64]), st.integers(1, 4), st.integers(1, 40), DTYPES, SPARSITIES, SEEDS)
def test_bitmap_round_trip(group, g, k, dtype, sparsity, seed):
    w = random_weight((g * group, k), sparsity, dtype, seed)
    f = Bitmap.pack(w, group=group)
    check_format(f, w)
    assert f.masks.dtype == np.dtype(f"uint{group}") and f.masks.shape == (g, k)
    nnz = np.count_nonzero(w)
    assert f.values.shape == (nnz,)
    assert f.nbytes() == nnz * w.itemsize + g * k * group // 8 + (g + 1) * f.gptr.itemsize


def check_delta_chunks(f, w):
    """`check_format` plus the delta formats' chunks: ascending columns within K, steps of
    at most MAX_STEP, each row's nonzeros kept in order."""
    check_format(f, w)
    n, k = w.shape
    cols = f.columns()
    assert f.values.shape == (cols.shape[0], 8)
    assert np.all(np.diff(cols, axis=1) >= 0) and np.all(np.diff(cols, axis=1) <= type(f).MAX_STEP)
    assert cols.size == 0 or cols.max() < k
    # chunks hold each row's nonzeros in order, then zeros: no nonzero is lost or moved
    rows = np.repeat(np.arange(n), np.diff(f.indptr.astype(np.int64)))
    keep = f.values != 0
    assert np.array_equal(np.sort(rows[:, None].repeat(8, 1)[keep] * k + cols[keep]), np.flatnonzero(w != 0))


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 300), DTYPES, SPARSITIES, SEEDS)
def test_delta_csr_round_trip(n, k, dtype, sparsity, seed):
    w = random_weight((n, k), sparsity, dtype, seed)
    f = DeltaCSR.pack(w)
    check_delta_chunks(f, w)
    assert f.deltas.dtype == np.uint32 and f.deltas.shape == f.base.shape


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 300), DTYPES, st.sampled_from([0.0, 0.5, 0.9, 0.97, 1.0]), SEEDS)
def test_delta_csr6_round_trip_and_bytes(n, k, dtype, sparsity, seed):
    w = random_weight((n, k), sparsity, dtype, seed)
    f = DeltaCSR6.pack(w)
    check_delta_chunks(f, w)
    assert f.index.dtype == np.uint64
    assert f.nbytes() == f.index.size * (8 * w.itemsize + 8) + (n + 1) * f.indptr.itemsize
    # bridging zeros only for gaps over 63 columns (DeltaCSR: over 15), so never more chunks
    assert f.index.size <= DeltaCSR.pack(w).base.size


def test_delta_csr6_is_smaller_than_delta_csr_and_csr_at_90_percent():
    w = random_weight((64, 4096), 0.9, np.float16, 3)
    sizes = format_bytes(w)
    assert sizes["dcsr6"] < 0.9 * sizes["dcsr"] and sizes["dcsr6"] < 0.8 * sizes["csr"]
    at60 = format_bytes(random_weight((64, 4096), 0.6, np.float16, 3))
    assert at60["dcsr"] < 0.95 * at60["dcsr6"]


def test_delta_csr6_rejects_columns_its_base_cannot_hold():
    with pytest.raises(UnfitError, match="K <= 4194304"):
        DeltaCSR6.pack(np.zeros((1, (1 << 22) + 1), np.float16))
    f = DeltaCSR6.pack(random_weight((4, 100), 0.5, np.float32, 0))
    bad = dict(f.arrays(), index=f.index.astype(np.uint32))
    with pytest.raises(FormatError, match="uint64"):
        DeltaCSR6.from_arrays(bad, shape=f.shape)


def test_bfloat16_round_trip_all_formats():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    w = nm_weight(16, 4, 2, 4, 0.3, ml_dtypes.bfloat16, 7)
    for cls, params in [(Dense, {}), (CSR, {"pad": 4}), (BSR, {"block": (4, 2)}), (NM, {}), (Bitmap, {})]:
        check_format(cls.pack(w, **params), w)


def test_negative_zero_is_pruned_and_comes_back_positive():
    w = nm_weight(16, 4, 2, 4, 0.0, np.float32, 3)
    w[w == 0] = -0.0
    w[0, :] = -0.0
    canon = w + 0.0  # -0.0 + 0.0 == +0.0
    assert np.signbit(w[0, 0]) and not np.signbit(canon[0, 0])
    for cls, params in [(Dense, {}), (CSR, {"pad": 4}), (BSR, {"block": (4, 2)}), (NM, {}), (Bitmap, {})]:
        f = cls.pack(w, **params)
        assert bitwise_equal(f.unpack(), canon), cls.__name__
        assert f.nnz == np.count_nonzero(w)


def test_nan_and_inf_survive():
    w = np.zeros((16, 8), np.float32)
    w[0, 0], w[3, 5], w[15, 7] = np.nan, np.inf, -np.inf
    for cls in FORMATS.values():
        f = cls.pack(w)
        assert bitwise_equal(f.unpack(), w), cls.__name__


def test_transposed_input_is_packed_in_logical_order():
    wt = np.ascontiguousarray(nm_weight(16, 6, 2, 4, 0.3, np.float32, 11).T)  # an ONNX-style W.T ...
    w = wt.T  # ... a non-contiguous view in canonical [N, K]
    assert not w.flags.c_contiguous
    for name, cls in FORMATS.items():
        f = cls.pack(w)
        assert bitwise_equal(f.unpack(), np.ascontiguousarray(w)), name


# --------------------------------------------------------------------------- layouts


def test_csr_matches_scipy():
    for seed, sparsity in [(0, 0.0), (1, 0.5), (2, 0.9), (3, 1.0)]:
        w = random_weight((33, 70), sparsity, np.float32, seed)
        f = CSR.pack(w)
        ref = sp.csr_matrix(w)
        np.testing.assert_array_equal(f.indices, ref.indices)
        np.testing.assert_array_equal(f.indptr, ref.indptr)
        np.testing.assert_array_equal(f.values, ref.data)


def test_bsr_matches_scipy_up_to_block_transpose():
    w = random_weight((12, 12), 0.85, np.float32, 5)
    f = BSR.pack(w, block=(4, 3))
    ref = sp.bsr_matrix(w, blocksize=(4, 3))
    ref.sort_indices()
    np.testing.assert_array_equal(f.indices, ref.indices)
    np.testing.assert_array_equal(f.indptr, ref.indptr)
    np.testing.assert_array_equal(f.data, ref.data.transpose(0, 2, 1))  # ours [B, c, r], r contiguous


def test_bsr_data_layout_is_output_contiguous():
    w = np.arange(1, 17, dtype=np.float32).reshape(4, 4)  # fully dense, block (2, 2)
    f = BSR.pack(w, block=(2, 2))
    # block (R=0, C=1): W[0:2, 2:4] = [[3, 4], [7, 8]]; data[b, j, i] = W[i, 2 + j]
    np.testing.assert_array_equal(f.data[1], [[3, 7], [4, 8]])
    assert f.data.strides[-1] == w.itemsize


def test_nm_2_4_metadata_bits():
    w = np.zeros((1, 8), np.float32)
    w[0, [1, 3, 4, 6]] = [1, 2, 3, 4]  # group 0 keeps positions 1, 3; group 1 keeps 0, 2
    f = NM.pack(w, n=2, m=4)
    np.testing.assert_array_equal(f.values, [[1, 2, 3, 4]])
    assert f.indices.tolist() == [[1 | 3 << 2 | 0 << 4 | 2 << 6]]
    # a group with one nonzero fills the lowest zero position with an explicit zero
    w = np.zeros((1, 4), np.float32)
    w[0, 2] = 5.0
    f = NM.pack(w)
    np.testing.assert_array_equal(f.values, [[0, 5]])
    assert f.indices.tolist() == [[0 | 2 << 2]]
    assert f.nnz == 1


def test_nm_4_8_metadata_straddles_bytes():
    w = np.zeros((1, 8), np.float32)
    w[0, [1, 2, 5, 7]] = 1.0
    f = NM.pack(w, n=4, m=8)
    stream = 1 | 2 << 3 | 5 << 6 | 7 << 9  # 12 bits, LSB-first
    assert f.indices.tolist() == [[stream & 0xFF, stream >> 8]]


def test_bitmap_mask_bits_and_value_order():
    w = np.zeros((16, 3), np.float32)
    w[0, 0], w[5, 0], w[15, 0], w[2, 2] = 1, 2, 3, 4
    f = Bitmap.pack(w)
    assert f.masks.tolist() == [[1 | 1 << 5 | 1 << 15, 0, 1 << 2]]
    np.testing.assert_array_equal(f.values, [1, 2, 3, 4])  # (g, k, lane) order
    np.testing.assert_array_equal(f.gptr, [0, 4])
    w = np.zeros((16, 2), np.float32)
    w[9, 1], w[1, 0] = 7, 8  # group 8: second group holds lane 1 at k=1
    f = Bitmap.pack(w, group=8)
    assert f.masks.dtype == np.uint8 and f.masks.tolist() == [[2, 0], [0, 2]]
    np.testing.assert_array_equal(f.values, [8, 7])
    np.testing.assert_array_equal(f.gptr, [0, 1, 2])


# --------------------------------------------------------------------------- index dtypes


def test_index_dtype_boundaries():
    assert index_dtype(0) == np.uint8 and index_dtype(255) == np.uint8
    assert index_dtype(256) == np.uint16 and index_dtype(65535) == np.uint16
    assert index_dtype(65536) == np.int32 and index_dtype(2**31 - 1) == np.int32
    assert index_dtype(2**31) == np.int64
    with pytest.raises(ValueError):
        index_dtype(-1)


@pytest.mark.parametrize(
    ("k", "col_dtype"), [(256, np.uint8), (257, np.uint16), (65536, np.uint16), (70000, np.int32)]
)
def test_column_index_dtype_follows_k(k, col_dtype):
    w = np.zeros((2, k), np.float32)  # tiny nnz: the dtype follows K, not the largest column used
    w[0, 0], w[1, 3] = 1.0, 2.0
    f = CSR.pack(w)
    assert f.indices.dtype == col_dtype
    assert f.indptr.dtype == np.uint8  # nnz = 2 fits uint8
    assert BSR.pack(w, block=(1, 1)).indices.dtype == col_dtype
    assert bitwise_equal(f.unpack(), w)
    assert format_bytes(w)["csr"] == f.nbytes()


def test_pointer_dtype_follows_nnz():
    w = np.ones((2, 300), np.float32)  # 600 nonzeros: indptr needs uint16
    assert CSR.pack(w).indptr.dtype == np.uint16
    assert Bitmap.pack(np.ones((16, 20), np.float32)).gptr.dtype == np.uint16  # 320 values


# --------------------------------------------------------------------------- sizes


@SETTINGS
@given(st.sampled_from([16, 32, 48]), st.sampled_from([4, 8, 12, 30]), DTYPES, SPARSITIES, SEEDS)
def test_format_bytes_equals_packed_nbytes(n, k, dtype, sparsity, seed):
    w = nm_weight(n, k // 2, 1, 2, sparsity, dtype, seed)  # 1:2, hence also 2:4 when 4 | K
    sizes = format_bytes(w, pad=4, block=(8, 2), nm=(2, 4))
    expected = {
        "dense": Dense.pack(w).nbytes(),
        "csr": CSR.pack(w, pad=4).nbytes(),
        "bsr": BSR.pack(w, block=(8, 2)).nbytes(),
        "bitmap": Bitmap.pack(w).nbytes(),
        "dcsr": DeltaCSR.pack(w).nbytes(),
        "dcsr6": DeltaCSR6.pack(w).nbytes(),
    }
    if k % 4 == 0:
        expected["nm"] = NM.pack(w).nbytes()
    assert sizes == expected


def test_format_bytes_skips_formats_that_cannot_hold_w():
    w = random_weight((20, 6), 0.5, np.float32, 0)  # N % 16 != 0, K % 4 != 0
    assert set(format_bytes(w)) == {"dense", "csr", "dcsr", "dcsr6"}
    assert set(format_bytes(w, block=(4, 3), nm=(2, 3))) >= {"dense", "csr", "bsr"}
    dense_w = np.ones((16, 8), np.float32)  # divisible, but not 2:4 sparse
    assert set(format_bytes(dense_w)) == {"dense", "csr", "bsr", "bitmap", "dcsr", "dcsr6"}
    assert "nm" in format_bytes(dense_w, nm=(4, 4))
    assert "nm" not in format_bytes(nm_weight(16, 2, 2, 4, 0.0, np.float32, 1), nm=None)


def test_format_bytes_rejects_bad_parameters():
    w = np.ones((16, 8), np.float32)
    for kwargs in [{"pad": 0}, {"block": (0, 1)}, {"nm": (5, 4)}, {"group": 12}]:
        with pytest.raises(FormatError):
            format_bytes(w, **kwargs)


def test_registry():
    assert FORMATS == {
        "dense": Dense, "csr": CSR, "bsr": BSR, "nm": NM, "bitmap": Bitmap,
        "dcsr": DeltaCSR, "dcsr6": DeltaCSR6,
    }  # fmt: skip
    for name, cls in FORMATS.items():
        assert cls.name == name


# --------------------------------------------------------------------------- errors


def test_bsr_bad_shape_names_shapes():
    w = np.ones((10, 6), np.float32)
    with pytest.raises(ValueError, match=r"\(10, 6\).*\(4, 1\)"):
        BSR.pack(w, block=(4, 1))
    with pytest.raises(ValueError, match=r"\(10, 6\).*\(2, 4\)"):
        BSR.pack(w, block=(2, 4))


def test_nm_errors():
    with pytest.raises(ValueError, match=r"K % m"):
        NM.pack(np.ones((2, 6), np.float32), n=2, m=4)
    w = np.zeros((3, 8), np.float32)
    w[2, 4:7] = 1.0  # row 2, group 1 has 3 nonzeros
    with pytest.raises(ValueError, match=r"row 2, group 1 \(columns 4\.\.7\) has 3 nonzeros > 2"):
        NM.pack(w, n=2, m=4)
    NM.pack(w, n=3, m=4)  # fine as 3:4
    for n, m in [(0, 4), (5, 4), (1, 1)]:
        with pytest.raises(FormatError):
            NM.pack(np.zeros((2, 8), np.float32), n=n, m=m)


def test_other_errors():
    with pytest.raises(ValueError, match=r"N % 16"):
        Bitmap.pack(np.ones((20, 4), np.float32))
    with pytest.raises(FormatError):
        Bitmap.pack(np.ones((24, 4), np.float32), group=12)
    with pytest.raises(FormatError):
        CSR.pack(np.ones((2, 2), np.float32), pad=0)
    for bad in [np.ones(4, np.float32), np.ones((2, 2, 2), np.float32), np.ones((0, 3), np.float32)]:
        for cls in FORMATS.values():
            with pytest.raises(ValueError, match="W must"):
                cls.pack(bad)
    with pytest.raises(FormatError, match="dtype"):
        CSR.pack(np.ones((2, 2), bool))
    # the errors are the toolkit's usage errors, so the CLI reports them cleanly
    assert issubclass(UnfitError, FormatError) and FormatError.exit_code == 2


def test_from_arrays_validates():
    w = random_weight((16, 12), 0.5, np.float32, 9)
    f = CSR.pack(w, pad=2)
    arrays = f.arrays()
    with pytest.raises(FormatError, match="missing"):
        CSR.from_arrays({"values": arrays["values"]}, shape=(16, 12), pad=2)
    with pytest.raises(FormatError, match="attrs"):
        CSR.from_arrays(arrays, pad=2)
    with pytest.raises(FormatError, match="indptr"):
        CSR.from_arrays({**arrays, "indptr": arrays["indptr"][:-1]}, shape=(16, 12), pad=2)
    with pytest.raises(FormatError, match="indices"):
        CSR.from_arrays(arrays, shape=(16, 3), pad=2)  # column indices out of range
    with pytest.raises(FormatError, match="pad"):
        CSR.from_arrays(arrays, shape=(16, 12), pad=4)
    nm = NM.pack(nm_weight(4, 3, 2, 4, 0.0, np.float32, 0))
    swapped = nm.indices.copy()
    swapped[0, 0] = 2 | 1 << 2  # positions (2, 1): not ascending
    with pytest.raises(FormatError, match="ascending"):
        NM.from_arrays({**nm.arrays(), "indices": swapped}, **nm.attrs())
    bm = Bitmap.pack(w)
    with pytest.raises(FormatError, match="gptr"):
        Bitmap.from_arrays({**bm.arrays(), "values": bm.values[:-1]}, **bm.attrs())
    bsr = BSR.pack(w, block=(4, 4))
    with pytest.raises(FormatError, match="data"):
        BSR.from_arrays(bsr.arrays(), shape=(16, 12), block=(4, 2))


def test_serialisation_through_npz():
    w = nm_weight(16, 4, 2, 4, 0.5, np.float32, 2)
    for name, cls in FORMATS.items():
        f = cls.pack(w)
        buf = io.BytesIO()
        np.savez(buf, **f.arrays())
        buf.seek(0)
        with np.load(buf) as z:
            g = cls.from_arrays(dict(z), **f.attrs())
        assert bitwise_equal(g.unpack(), w), name
        assert g.nbytes() == f.nbytes()


def test_instances_are_frozen_and_read_only():
    f = CSR.pack(np.eye(4, dtype=np.float32))
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.pad = 2
    with pytest.raises(ValueError):
        f.values[0] = 3.0
    assert "CSR(shape=(4, 4)" in repr(f) and "nnz=4" in repr(f)


def test_delta_csr_row_entries_match_the_packed_entries_in_any_row_steps():
    """The size model counts the bridging zeros per row without materialising the entries,
    in steps of rows (some all zero); it agrees with the entries `pack` stores."""
    rng = np.random.default_rng(5)
    mask = rng.random((11, 200)) < 0.03
    mask[3:7] = False  # a whole step of empty rows
    mask[9, [0, 16, 17, 199]] = True  # gaps of exactly MAX_STEP + 1 and far beyond
    rows, _, _ = DeltaCSR._entries(mask)
    want = np.bincount(rows, minlength=11)
    for step in (1, 3, 4, 1024):
        got = delta_row_entries(mask, (DeltaCSR.MAX_STEP, 63), rows_per_step=step)
        np.testing.assert_array_equal(got[0], want)
        np.testing.assert_array_equal(got[1], np.bincount(DeltaCSR6._entries(mask)[0], minlength=11))
