"""Sparse weight formats: pack a dense weight into kernel-ready arrays, and back.

Every format holds a weight given in the canonical orientation ``W[N, K]``: N output
features (rows), K reduction/input features (columns) -- torch's ``Linear.weight`` layout;
an ONNX ``MatMul`` weight is ``W.T``. Zeros of W are the pruned entries: an entry is stored
as a nonzero when ``W != 0``, so ``-0.0`` counts as pruned and every ``unpack()`` returns
pruned entries as ``+0.0`` (explicit zeros a format must store are written as ``+0.0`` too).
Any other value, NaN and inf included, survives ``unpack(pack(w))`` bit for bit.

Values keep W's dtype (float32, float16, bfloat16 through ``ml_dtypes``, any numpy float or
integer type). Index arrays use the smallest type that holds their largest possible value
(`index_dtype`): column indices are sized by the shape (K - 1), pointer arrays by the number
of stored entries.

Protocol shared by all formats (`WeightFormat`):

* ``Fmt.pack(w, **params) -> Fmt``; ``fmt.unpack() -> ndarray`` (exact dense W);
* ``fmt.nbytes() -> int``: bytes of all arrays a kernel reads (the sum over ``arrays()``);
* ``Fmt.packed_nbytes(w, **params) -> int``: what ``pack(w, **params).nbytes()`` would be,
  computed from counts only (what the cost model calls, via `format_bytes`);
* ``fmt.shape``, ``fmt.dtype``, ``fmt.nnz`` (nonzeros of W, never padding);
* ``fmt.arrays() -> dict[str, ndarray]`` and ``fmt.attrs() -> dict`` (the non-array fields);
  ``Fmt.from_arrays(fmt.arrays(), **fmt.attrs())`` rebuilds it, checking consistency.

Instances are frozen dataclasses; their arrays are read-only views.
"""

from __future__ import annotations

import abc
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from sparsegraph.errors import UsageError

__all__ = [
    "BSR",
    "CSR",
    "FORMATS",
    "NM",
    "Bitmap",
    "DeltaCSR",
    "DeltaCSR6",
    "Dense",
    "FormatError",
    "UnfitError",
    "WeightFormat",
    "format_bytes",
    "index_dtype",
]


class FormatError(UsageError, ValueError):
    """A weight, parameter or set of arrays that a format cannot take as given."""


class UnfitError(FormatError):
    """W's shape or sparsity does not fit the format's constraints (N % r, K % m, n:m, ...).

    `format_bytes` skips a format that raises this; any other `FormatError` (a bad
    parameter) propagates.
    """


# --------------------------------------------------------------------------- helpers


def index_dtype(max_value: int) -> np.dtype:
    """Smallest index dtype holding ``0..max_value``: uint8, uint16, int32, else int64."""
    max_value = operator.index(max_value)
    if max_value < 0:
        raise ValueError(f"index_dtype needs max_value >= 0, got {max_value}")
    if max_value <= 0xFF:
        return np.dtype(np.uint8)
    if max_value <= 0xFFFF:
        return np.dtype(np.uint16)
    if max_value <= 2**31 - 1:
        return np.dtype(np.int32)
    return np.dtype(np.int64)


def _is_value_dtype(dtype: np.dtype) -> bool:
    if dtype.kind in "fiu":
        return True
    if dtype.kind == "V":  # ml_dtypes' bfloat16, float8_*, ... are numpy 'V' dtypes
        try:
            import ml_dtypes

            ml_dtypes.finfo(dtype)
            return True
        except (ImportError, ValueError, TypeError):
            return False
    return False


def _as_weight(w: Any) -> np.ndarray:
    a = np.asarray(w)
    if a.ndim != 2:
        raise FormatError(f"W must be 2-D [N, K]; got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise FormatError(f"W must have N >= 1 and K >= 1; got shape {a.shape}")
    if not _is_value_dtype(a.dtype):
        raise FormatError(f"W has dtype {a.dtype}; need a float (or integer) dtype")
    return a


def _positive_int(value: Any, what: str) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise FormatError(f"{what} must be an integer; got {value!r}") from None
    if v < 1:
        raise FormatError(f"{what} must be >= 1; got {v}")
    return v


def _zero_canonical(a: np.ndarray) -> np.ndarray:
    """Write +0.0 over every zero (-0.0) of a freshly made array `a`; returns `a`."""
    if a.dtype.kind != "u" and a.dtype.kind != "i":
        a[a == 0] = 0
    return a


def _round_up(x: np.ndarray, multiple: int) -> np.ndarray:
    return -(-x // multiple) * multiple


def _offsets(counts: np.ndarray) -> np.ndarray:
    """int64 exclusive prefix sum with a leading 0: ``[0, c0, c0 + c1, ...]``."""
    out = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _check_pointer(ptr: np.ndarray, name: str, length: int, total: int) -> np.ndarray:
    """Validate a pointer array (length, starts at 0, non-decreasing, ends at total)."""
    if ptr.shape != (length,):
        raise FormatError(f"{name} must have shape ({length},); got {ptr.shape}")
    p = ptr.astype(np.int64)
    if p[0] != 0 or p[-1] != total or np.any(np.diff(p) < 0):
        raise FormatError(f"{name} must rise from 0 to {total} without decreasing")
    return p


def _check_index_array(a: np.ndarray, name: str, shape: tuple[int, ...], bound: int) -> None:
    if a.dtype.kind not in "iu":
        raise FormatError(f"{name} must have an integer dtype; got {a.dtype}")
    if a.shape != shape:
        raise FormatError(f"{name} must have shape {shape}; got {a.shape}")
    if a.size and (a.min() < 0 or a.max() >= bound):
        raise FormatError(f"{name} must lie in [0, {bound})")


def _pack_bits(fields: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of `fields` (ints < 2**bits) LSB-first into uint8 bytes per row.

    Field j of a row occupies bits ``j*bits .. j*bits + bits - 1`` of that row's
    little-endian bit stream (stream bit t = bit ``t % 8`` of byte ``t // 8``); each row
    starts on a byte boundary and its last byte is zero-padded.
    """
    lead, count = fields.shape[:-1], fields.shape[-1]
    if 8 % bits == 0:  # 1, 2, 4, 8 bits: whole fields per byte, no bit planes needed
        per_byte = 8 // bits
        nbytes = -(-count // per_byte)
        padded = np.zeros((*lead, nbytes * per_byte), dtype=np.uint8)
        padded[..., :count] = fields
        shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
        return np.bitwise_or.reduce(padded.reshape(*lead, nbytes, per_byte) << shifts, axis=-1)
    work = np.uint16 if bits <= 16 else np.int64
    shifts = np.arange(bits, dtype=work)
    planes = ((fields.astype(work)[..., None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(*lead, count * bits), axis=-1, bitorder="little")


def _unpack_bits(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    """Inverse of `_pack_bits`: the first `count` fields of each row (smallest dtype)."""
    lead = packed.shape[:-1]
    if 8 % bits == 0:
        shifts = (np.arange(8 // bits, dtype=np.uint8) * bits).astype(np.uint8)
        fields = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
        return fields.reshape(*lead, -1)[..., :count]
    work = np.uint16 if bits <= 16 else np.int64
    planes = np.unpackbits(packed, axis=-1, count=count * bits, bitorder="little")
    planes = planes.reshape(*lead, count, bits).astype(work)
    return (planes << np.arange(bits, dtype=work)).sum(axis=-1, dtype=work)


# --------------------------------------------------------------------------- protocol


class WeightFormat(abc.ABC):
    """Common protocol of the weight formats (see the module docstring)."""

    name: ClassVar[str]
    ARRAYS: ClassVar[tuple[str, ...]]  # array fields, in `arrays()` order
    ATTRS: ClassVar[tuple[str, ...]]  # non-array fields, `from_arrays` keywords
    VALUES: ClassVar[str]  # the array holding W's values

    shape: tuple[int, int]

    # -- construction
    @classmethod
    @abc.abstractmethod
    def pack(cls, w: Any, **params: Any) -> WeightFormat:
        """Pack the dense canonical weight `w[N, K]`."""

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], **attrs: Any) -> WeightFormat:
        """Rebuild from `arrays()` and `attrs()` output; raises FormatError if inconsistent."""
        missing = [n for n in cls.ARRAYS if n not in arrays]
        extra = [n for n in arrays if n not in cls.ARRAYS]
        if missing or extra:
            raise FormatError(
                f"{cls.__name__}.from_arrays needs arrays {list(cls.ARRAYS)}; "
                f"missing {missing}, unexpected {extra}"
            )
        unknown = [n for n in attrs if n not in cls.ATTRS]
        if unknown or "shape" not in attrs:
            raise FormatError(
                f"{cls.__name__}.from_arrays takes attrs {list(cls.ATTRS)} (shape required); "
                f"got {sorted(attrs)}"
            )
        return cls(**{n: arrays[n] for n in cls.ARRAYS}, **attrs)

    # -- sizes
    @classmethod
    def packed_nbytes(cls, w: Any, **params: Any) -> int:
        """``pack(w, **params).nbytes()``, computed from counts without building arrays."""
        a = _as_weight(w)
        return cls._packed_nbytes(a != 0, a.dtype.itemsize, **params)

    @classmethod
    @abc.abstractmethod
    def _packed_nbytes(cls, mask: np.ndarray, itemsize: int, **params: Any) -> int:
        """Bytes `pack` would store for a weight with nonzero `mask` and `itemsize`."""

    def nbytes(self) -> int:
        """Exact bytes of all arrays a kernel reads (padding and index arrays included)."""
        return sum(int(a.nbytes) for a in self.arrays().values())

    # -- contents
    @abc.abstractmethod
    def unpack(self) -> np.ndarray:
        """The exact dense W[N, K]."""

    @property
    def dtype(self) -> np.dtype:
        return getattr(self, self.VALUES).dtype

    @property
    def nnz(self) -> int:
        """Nonzero entries of W (stored zeros -- padding, block fill -- are not counted)."""
        return int(np.count_nonzero(getattr(self, self.VALUES) != 0))

    def arrays(self) -> dict[str, np.ndarray]:
        return {n: getattr(self, n) for n in self.ARRAYS}

    def attrs(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self.ATTRS}

    # -- internals
    def _normalise(self) -> None:
        """Called first by each __post_init__: ints for shape, read-only contiguous arrays."""
        shape = tuple(operator.index(s) for s in self.shape)
        if len(shape) != 2 or min(shape) < 1:
            raise FormatError(f"{type(self).__name__} shape must be (N, K) with N, K >= 1; got {shape}")
        object.__setattr__(self, "shape", shape)
        for n in self.ARRAYS:
            a = np.ascontiguousarray(getattr(self, n)).view()
            a.flags.writeable = False
            object.__setattr__(self, n, a)
        if not _is_value_dtype(self.dtype):
            raise FormatError(f"{type(self).__name__}.{self.VALUES} has non-numeric dtype {self.dtype}")

    def __repr__(self) -> str:
        params = "".join(f", {n}={getattr(self, n)!r}" for n in self.ATTRS if n != "shape")
        return (
            f"{type(self).__name__}(shape={self.shape}{params}, dtype={self.dtype}, "
            f"nnz={self.nnz}, nbytes={self.nbytes()})"
        )


# --------------------------------------------------------------------------- Dense


@dataclass(frozen=True, eq=False, repr=False)
class Dense(WeightFormat):
    """The trivial format, so dense weights are handled like the others.

    Layout: ``data[N, K]`` in W's dtype, row-major (C order).
    nbytes = ``N * K * itemsize``.
    """

    shape: tuple[int, int]
    data: np.ndarray

    name: ClassVar[str] = "dense"
    ARRAYS: ClassVar[tuple[str, ...]] = ("data",)
    ATTRS: ClassVar[tuple[str, ...]] = ("shape",)
    VALUES: ClassVar[str] = "data"

    def __post_init__(self) -> None:
        self._normalise()
        if self.data.shape != self.shape:
            raise FormatError(f"Dense data must have shape {self.shape}; got {self.data.shape}")

    @classmethod
    def pack(cls, w: Any) -> Dense:
        a = _as_weight(w)
        return cls(a.shape, _zero_canonical(np.array(a, order="C", copy=True)))

    @classmethod
    def _packed_nbytes(cls, mask: np.ndarray, itemsize: int) -> int:
        return mask.size * itemsize

    def unpack(self) -> np.ndarray:
        return self.data.copy()


# --------------------------------------------------------------------------- CSR


@dataclass(frozen=True, eq=False, repr=False)
class CSR(WeightFormat):
    """Compressed sparse rows, one row per output (the scipy.sparse ``csr_array`` layout,
    https://docs.scipy.org/doc/scipy/reference/generated/scipy.sparse.csr_array.html).

    Layout (``S`` = stored entries = sum over rows of the row's nnz rounded up to ``pad``):

    * ``values[S]``  W's dtype; row i's entries are ``values[indptr[i]:indptr[i+1]]``,
      columns ascending, then padding;
    * ``indices[S]`` column k of each entry; ``index_dtype(K - 1)`` (uint8 for K <= 256,
      uint16 for K <= 65536, else int32);
    * ``indptr[N+1]`` row offsets; ``index_dtype(S)``.

    ``pad`` (default 1) rounds each row's entry count up to a multiple of ``pad`` (8 or 16
    suit GPU/AVX kernels); padding entries are value 0, column 0. With ``pad=1`` the arrays
    equal scipy's for the same W. ``nnz`` counts W's nonzeros only.

    nbytes = ``S * (itemsize + indices.itemsize) + (N + 1) * indptr.itemsize``.
    """

    shape: tuple[int, int]
    values: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    pad: int = 1

    name: ClassVar[str] = "csr"
    ARRAYS: ClassVar[tuple[str, ...]] = ("values", "indices", "indptr")
    ATTRS: ClassVar[tuple[str, ...]] = ("shape", "pad")
    VALUES: ClassVar[str] = "values"

    def __post_init__(self) -> None:
        self._normalise()
        object.__setattr__(self, "pad", _positive_int(self.pad, "CSR pad"))
        n, k = self.shape
        if self.values.ndim != 1:
            raise FormatError(f"CSR values must be 1-D; got shape {self.values.shape}")
        s = self.values.size
        _check_index_array(self.indices, "CSR indices", (s,), k)
        ptr = _check_pointer(self.indptr, "CSR indptr", n + 1, s)
        if np.any(np.diff(ptr) % self.pad):
            raise FormatError(f"CSR rows must hold a multiple of pad={self.pad} entries")

    @classmethod
    def pack(cls, w: Any, *, pad: int = 1) -> CSR:
        a = _as_weight(w)
        rows, cols = np.nonzero(a)  # row-major: rows ascending, columns ascending
        return cls.from_entries(a.shape, rows, cols, a[rows, cols], pad=pad)

    @classmethod
    def from_entries(
        cls, shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, *, pad: int = 1
    ) -> CSR:
        """The CSR of nonzeros ``vals`` at (`rows`, `cols`), rows ascending (columns in the
        order given within a row)."""
        pad = _positive_int(pad, "CSR pad")
        n, k = shape
        idx_t = index_dtype(k - 1)
        if pad == 1:
            ptr = _offsets(np.bincount(rows, minlength=n))
            values, indices = vals, cols.astype(idx_t)
        else:
            real_ptr = _offsets(np.bincount(rows, minlength=n))
            ptr = _offsets(_round_up(np.diff(real_ptr), pad))
            pos = ptr[rows] + (np.arange(rows.size) - real_ptr[rows])
            values = np.zeros(int(ptr[-1]), dtype=vals.dtype)
            values[pos] = vals
            indices = np.zeros(int(ptr[-1]), dtype=idx_t)
            indices[pos] = cols
        return cls((n, k), values, indices, ptr.astype(index_dtype(int(ptr[-1]))), pad)

    @classmethod
    def _packed_nbytes(cls, mask: np.ndarray, itemsize: int, pad: int = 1) -> int:
        pad = _positive_int(pad, "CSR pad")
        n, k = mask.shape
        stored = int(_round_up(np.count_nonzero(mask, axis=1), pad).sum())
        idx = index_dtype(k - 1).itemsize
        return stored * (itemsize + idx) + (n + 1) * index_dtype(stored).itemsize

    def unpack(self) -> np.ndarray:
        n, _ = self.shape
        out = np.zeros(self.shape, dtype=self.dtype)
        rows = np.repeat(np.arange(n), np.diff(self.indptr.astype(np.int64)))
        keep = self.values != 0  # drops padding (and any stored zero)
        out[rows[keep], self.indices[keep]] = self.values[keep]
        return out


# --------------------------------------------------------------------------- BSR


@dataclass(frozen=True, eq=False, repr=False)
class BSR(WeightFormat):
    """Block sparse rows with blocks of ``r`` outputs x ``c`` inputs, ``block = (r, c)``.

    Block structure as scipy.sparse ``bsr_array``
    (https://docs.scipy.org/doc/scipy/reference/generated/scipy.sparse.bsr_array.html);
    needs ``N % r == 0`` and ``K % c == 0``. A block is stored when any entry is nonzero.
    Layout (``B`` = stored blocks):

    * ``data[B, c, r]`` W's dtype; ``data[b, j, i] = W[R*r + i, C*c + j]`` for block b at
      block-row R, block-column C. Unlike scipy (``[B, r, c]``) the r outputs are the
      contiguous axis, so CPU kernels vectorise over outputs: per input k of the block,
      one r-wide vector FMA with a broadcast x[k];
    * ``indices[B]`` block-column C, ``index_dtype(K // c - 1)``; ascending per block-row;
    * ``indptr[N // r + 1]`` block-row offsets, ``index_dtype(B)``.

    nbytes = ``B * r * c * itemsize + B * indices.itemsize + (N // r + 1) * indptr.itemsize``.
    """

    shape: tuple[int, int]
    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    block: tuple[int, int] = (16, 1)

    name: ClassVar[str] = "bsr"
    ARRAYS: ClassVar[tuple[str, ...]] = ("data", "indices", "indptr")
    ATTRS: ClassVar[tuple[str, ...]] = ("shape", "block")
    VALUES: ClassVar[str] = "data"

    def __post_init__(self) -> None:
        self._normalise()
        r, c = _check_block(self.shape, self.block)
        object.__setattr__(self, "block", (r, c))
        n, k = self.shape
        if self.data.ndim != 3 or self.data.shape[1:] != (c, r):
            raise FormatError(f"BSR data must have shape (nnzb, {c}, {r}); got {self.data.shape}")
        nb = self.data.shape[0]
        _check_index_array(self.indices, "BSR indices", (nb,), k // c)
        _check_pointer(self.indptr, "BSR indptr", n // r + 1, nb)

    @property
    def nnzb(self) -> int:
        """Stored blocks."""
        return int(self.data.shape[0])

    @classmethod
    def pack(cls, w: Any, *, block: tuple[int, int] = (16, 1)) -> BSR:
        a = _as_weight(w)
        r, c = _check_block(a.shape, block)
        n, k = a.shape
        w4 = a.reshape(n // r, r, k // c, c)
        br, bc = np.nonzero((w4 != 0).any(axis=(1, 3)))
        data = _zero_canonical(np.ascontiguousarray(w4.transpose(0, 2, 3, 1)[br, bc]))
        ptr = _offsets(np.bincount(br, minlength=n // r))
        return cls(
            a.shape,
            data,
            bc.astype(index_dtype(k // c - 1)),
            ptr.astype(index_dtype(br.size)),
            (r, c),
        )

    @classmethod
    def _packed_nbytes(cls, mask: np.ndarray, itemsize: int, block: tuple[int, int] = (16, 1)) -> int:
        r, c = _check_block(mask.shape, block)
        n, k = mask.shape
        nb = int(np.count_nonzero(mask.reshape(n // r, r, k // c, c).any(axis=(1, 3))))
        return (
            nb * r * c * itemsize
            + nb * index_dtype(k // c - 1).itemsize
            + (n // r + 1) * index_dtype(nb).itemsize
        )

    def unpack(self) -> np.ndarray:
        n, k = self.shape
        r, c = self.block
        out4 = np.zeros((n // r, k // c, c, r), dtype=self.dtype)
        rows = np.repeat(np.arange(n // r), np.diff(self.indptr.astype(np.int64)))
        out4[rows, self.indices] = self.data
        return out4.transpose(0, 3, 1, 2).reshape(n, k)


def _check_block(shape: tuple[int, int], block: Any) -> tuple[int, int]:
    try:
        r, c = block
    except (TypeError, ValueError):
        raise FormatError(f"BSR block must be a pair (r, c); got {block!r}") from None
    r, c = _positive_int(r, "BSR block r"), _positive_int(c, "BSR block c")
    n, k = shape
    if n % r or k % c:
        raise UnfitError(
            f"W shape (N, K) = {(n, k)} does not divide into BSR blocks (r, c) = {(r, c)}: "
            f"need N % r == 0 and K % c == 0"
        )
    return r, c


# --------------------------------------------------------------------------- N:M


@dataclass(frozen=True, eq=False, repr=False)
class NM(WeightFormat):
    """N:M structured sparsity: in each output row, every group of ``m`` consecutive inputs
    (columns ``g*m .. g*m + m - 1``) holds at most ``n`` nonzeros; needs ``K % m == 0``.

    Compressed values plus per-value positions, as the 2:4 sparse tensor core format in
    Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021 (arXiv:2104.08378):
    2-bit metadata per kept value for 2:4, ``b = ceil(log2 m)`` bits in general. With
    ``G = K // m`` and ``L = G * n`` kept values per row:

    * ``values[N, L]`` W's dtype; ``values[i, g*n + j]`` is the j-th kept value of group g
      of row i. Each group keeps exactly n values at distinct, ascending positions: its
      nonzeros, then (if fewer than n) the lowest zero positions, stored as explicit 0;
    * ``indices[N, ceil(L * b / 8)]`` uint8: the position (0..m-1) of each kept value in
      its group, as b-bit fields packed LSB-first into each row's own byte stream: field
      ``f = g*n + j`` occupies stream bits ``f*b .. f*b + b - 1``, stream bit t being bit
      ``t % 8`` of byte ``t // 8``; rows start byte-aligned, trailing bits are 0. For 2:4 a
      byte holds two groups (4 fields, ``pos0 | pos1 << 2 | pos2 << 4 | pos3 << 6``); for
      4:8 fields are 3 bits and may straddle bytes. This is the logical metadata; the
      tile-interleaved reordering a given mma.sp instruction wants is left to the kernel.

    nbytes = ``N * L * itemsize + N * ceil(L * b / 8)``.
    """

    shape: tuple[int, int]
    values: np.ndarray
    indices: np.ndarray
    n: int = 2
    m: int = 4

    name: ClassVar[str] = "nm"
    ARRAYS: ClassVar[tuple[str, ...]] = ("values", "indices")
    ATTRS: ClassVar[tuple[str, ...]] = ("shape", "n", "m")
    VALUES: ClassVar[str] = "values"

    def __post_init__(self) -> None:
        self._normalise()
        n, m = _check_nm(self.shape, self.n, self.m)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "m", m)
        rows, k = self.shape
        kept = k // m * n
        if self.values.shape != (rows, kept):
            raise FormatError(f"NM values must have shape {(rows, kept)}; got {self.values.shape}")
        want = (rows, -(-kept * self.bits // 8))
        if self.indices.dtype != np.uint8 or self.indices.shape != want:
            raise FormatError(
                f"NM indices must be uint8 of shape {want}; got {self.indices.dtype} {self.indices.shape}"
            )
        pos = self.positions()
        if np.any(pos >= m) or np.any(pos[..., 1:] <= pos[..., :-1]):
            raise FormatError(f"NM indices must be distinct ascending positions < {m} within each group")

    @property
    def bits(self) -> int:
        """Bits per position field: ceil(log2 m)."""
        return (self.m - 1).bit_length()

    def positions(self) -> np.ndarray:
        """Decoded ``indices``: ``[N, K // m, n]`` positions within groups (unsigned ints)."""
        rows, k = self.shape
        kept = k // self.m * self.n
        return _unpack_bits(self.indices, kept, self.bits).reshape(rows, k // self.m, self.n)

    @classmethod
    def pack(cls, w: Any, *, n: int = 2, m: int = 4) -> NM:
        a = _as_weight(w)
        n, m = _check_nm(a.shape, n, m)
        rows, k = a.shape
        groups = a.reshape(rows, k // m, m)
        gmask = groups != 0
        counts = np.count_nonzero(gmask, axis=-1)
        _check_nm_counts(counts, n, m)
        # Keep every nonzero, plus the lowest (n - count) zero positions of each group:
        # exactly n positions per group, which boolean indexing yields in ascending order.
        small = np.int16 if m < 2**15 else np.int64
        zeros_seen = np.arange(1, m + 1, dtype=small) - np.cumsum(gmask, axis=-1, dtype=small)
        keep = gmask | (zeros_seen <= (n - counts).astype(small)[..., None])
        values = _zero_canonical(groups[keep].reshape(rows, -1))
        pos = np.broadcast_to(np.arange(m, dtype=index_dtype(m - 1)), groups.shape)[keep]
        indices = _pack_bits(pos.reshape(rows, -1), (m - 1).bit_length())
        return cls(a.shape, values, indices, n, m)

    @classmethod
    def _packed_nbytes(cls, mask: np.ndarray, itemsize: int, n: int = 2, m: int = 4) -> int:
        n, m = _check_nm(mask.shape, n, m)
        rows, k = mask.shape
        _check_nm_counts(np.count_nonzero(mask.reshape(rows, k // m, m), axis=-1), n, m)
        kept = k // m * n
        return rows * kept * itemsize + rows * (-(-kept * (m - 1).bit_length() // 8))

    def unpack(self) -> np.ndarray:
        rows, k = self.shape
        out = np.zeros((rows, k // self.m, self.m), dtype=self.dtype)
        vals = self.values.reshape(rows, k // self.m, self.n)
        np.put_along_axis(out, self.positions(), vals, axis=-1)
        return out.reshape(rows, k)


def _check_nm(shape: tuple[int, int], n: Any, m: Any) -> tuple[int, int]:
    n, m = _positive_int(n, "NM n"), _positive_int(m, "NM m")
    if m < 2 or n > m:
        raise FormatError(f"NM needs 1 <= n <= m and m >= 2; got n:m = {n}:{m}")
    if shape[1] % m:
        raise UnfitError(
            f"W shape (N, K) = {tuple(shape)} does not divide into N:M groups: K % m != 0 for m={m}"
        )
    return n, m


def _check_nm_counts(counts: np.ndarray, n: int, m: int) -> None:
    bad = counts > n
    if bad.any():
        row, g = (int(v) for v in np.argwhere(bad)[0])
        raise UnfitError(
            f"W is not {n}:{m} sparse: row {row}, group {g} (columns {g * m}..{g * m + m - 1}) "
            f"has {int(counts[row, g])} nonzeros > {n} ({int(bad.sum())} such groups in all)"
        )


# --------------------------------------------------------------------------- Bitmap


_MASK_DTYPES = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}


@dataclass(frozen=True, eq=False, repr=False)
class Bitmap(WeightFormat):
    """Output-group bitmap: outputs in groups of ``group`` (16 by default; 8, 32, 64
    allowed; needs ``N % group == 0``), and for each (group g, input k) a bit mask of which
    of the group's outputs are nonzero at k. A kernel loads x[k] once per (g, k) and
    scatters it to the lanes the mask names. With ``G = N // group``:

    * ``masks[G, K]`` uint16 for group 16 (uint8 / uint32 / uint64 for 8 / 32 / 64): bit l
      (LSB = 0) of ``masks[g, k]`` is set iff ``W[g*group + l, k] != 0``;
    * ``values[nnz]`` W's dtype: the nonzeros in (g, k, lane) order, i.e. group by group,
      within a group input by input, within an input by ascending lane;
    * ``gptr[G + 1]`` offset of each group's first value in ``values``; ``index_dtype(nnz)``.

    nbytes = ``nnz * itemsize + G * K * group / 8 + (G + 1) * gptr.itemsize``.
    """

    shape: tuple[int, int]
    masks: np.ndarray
    values: np.ndarray
    gptr: np.ndarray
    group: int = 16

    name: ClassVar[str] = "bitmap"
    ARRAYS: ClassVar[tuple[str, ...]] = ("masks", "values", "gptr")
    ATTRS: ClassVar[tuple[str, ...]] = ("shape", "group")
    VALUES: ClassVar[str] = "values"

    def __post_init__(self) -> None:
        self._normalise()
        group = _check_group(self.shape, self.group)
        object.__setattr__(self, "group", group)
        n, k = self.shape
        g = n // group
        if self.masks.dtype != _MASK_DTYPES[group] or self.masks.shape != (g, k):
            raise FormatError(
                f"Bitmap masks must be {np.dtype(_MASK_DTYPES[group])} of shape {(g, k)}; "
                f"got {self.masks.dtype} {self.masks.shape}"
            )
        if self.values.ndim != 1:
            raise FormatError(f"Bitmap values must be 1-D; got shape {self.values.shape}")
        counts = np.count_nonzero(self._lane_bits(), axis=(1, 2))
        ptr = _check_pointer(self.gptr, "Bitmap gptr", g + 1, self.values.size)
        if np.any(np.diff(ptr) != counts):
            raise FormatError("Bitmap gptr / values do not match the set bits of masks")

    def _lane_bits(self) -> np.ndarray:
        """bool ``[G, K, group]``: lane l of (g, k) is stored."""
        g, k = self.masks.shape
        raw = np.ascontiguousarray(self.masks.astype(f"<u{self.group // 8}")).view(np.uint8)
        bits = np.unpackbits(raw.reshape(g, k, self.group // 8), axis=-1, bitorder="little")
        return bits.view(bool)

    @classmethod
    def pack(cls, w: Any, *, group: int = 16) -> Bitmap:
        a = _as_weight(w)
        group = _check_group(a.shape, group)
        n, k = a.shape
        w3 = a.reshape(n // group, group, k).transpose(0, 2, 1)  # [G, K, lane]
        m3 = w3 != 0
        values = w3[m3]  # C order over [G, K, lane]
        raw = np.ascontiguousarray(np.packbits(m3, axis=-1, bitorder="little"))
        masks = raw.view(f"<u{group // 8}").reshape(n // group, k).astype(_MASK_DTYPES[group])
        ptr = _offsets(np.count_nonzero(m3, axis=(1, 2)))
        return cls(a.shape, masks, values, ptr.astype(index_dtype(values.size)), group)

    @classmethod
    def _packed_nbytes(cls, mask: np.ndarray, itemsize: int, group: int = 16) -> int:
        group = _check_group(mask.shape, group)
        n, k = mask.shape
        nnz = int(np.count_nonzero(mask))
        return nnz * itemsize + n * k // 8 + (n // group + 1) * index_dtype(nnz).itemsize

    def unpack(self) -> np.ndarray:
        n, k = self.shape
        bits = self._lane_bits()
        out3 = np.zeros(bits.shape, dtype=self.dtype)
        out3[bits] = self.values
        return out3.transpose(0, 2, 1).reshape(n, k)


def _check_group(shape: tuple[int, int], group: Any) -> int:
    group = _positive_int(group, "Bitmap group")
    if group not in _MASK_DTYPES:
        raise FormatError(f"Bitmap group must be one of {sorted(_MASK_DTYPES)}; got {group}")
    if shape[0] % group:
        raise UnfitError(
            f"W shape (N, K) = {tuple(shape)} does not divide into Bitmap groups: N % {group} != 0"
        )
    return group


# --------------------------------------------------------------------------- delta CSR


def delta_row_entries(mask: np.ndarray, max_steps: tuple[int, ...], rows_per_step: int = 1024) -> np.ndarray:
    """Entries per row a delta-coded CSR (`_DeltaChunks`) with each of `max_steps` stores
    before chunk padding (nonzeros plus the zeros that bridge column gaps above the step),
    ``[len(max_steps), N]``, without materialising the entries (a 7B layer's dense weights
    have ~10^8): one pass over the nonzeros in steps of `rows_per_step` rows."""
    n = mask.shape[0]
    out = np.zeros((len(max_steps), n), dtype=np.int64)
    for r0 in range(0, n, rows_per_step):
        rows, cols = np.nonzero(mask[r0 : r0 + rows_per_step])
        if rows.size == 0:
            continue
        gap = np.diff(cols, prepend=0).astype(np.int64)
        gap[np.r_[True, rows[1:] != rows[:-1]]] = 0  # a row's first entry: its column is the base
        for i, step in enumerate(max_steps):
            fill = np.maximum(0, -(-gap // step) - 1)
            out[i, r0 : r0 + rows_per_step] = np.bincount(
                rows, weights=fill + 1, minlength=min(rows_per_step, n - r0)
            )
    return out


class _DeltaChunks(WeightFormat):
    """Shared by the delta-coded CSR formats: each row's entries (columns ascending) cut
    into chunks of `CHUNK` = 8, a chunk's columns coded as its first column plus the step
    from each entry to the next (at most `MAX_STEP`; a longer gap between consecutive
    nonzeros of a row is bridged by stored zeros every `MAX_STEP` columns, and a row's
    last chunk is filled with zeros repeating its last column). Subclasses say how a
    chunk's columns are stored (`chunk_index_bytes`, `_encode`, `columns`); ``values[C, 8]``
    and ``indptr[N + 1]`` (chunk offsets per row, ``index_dtype(C)``) are common."""

    CHUNK: ClassVar[int] = 8
    MAX_STEP: ClassVar[int]

    @classmethod
    def _entries(cls, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, columns, is_real) of the stored entries before chunk padding, row-major."""
        rows, cols = np.nonzero(mask)
        first = np.ones(rows.size, dtype=bool)
        first[1:] = rows[1:] != rows[:-1]
        gap = np.diff(cols, prepend=0).astype(np.int64)
        fill = np.where(first, 0, np.maximum(0, -(-gap // cls.MAX_STEP) - 1))
        reps = fill + 1  # each nonzero is preceded by its bridging zeros
        idx = np.repeat(np.arange(rows.size), reps)
        within = np.arange(idx.size) - np.repeat(np.cumsum(reps) - reps, reps)  # 0..fill
        is_real = within == fill[idx]
        prev = np.where(first, cols, cols - gap)[idx]
        out_cols = np.where(is_real, cols[idx], prev + cls.MAX_STEP * (within + 1))
        return rows[idx], out_cols, is_real

    @classmethod
    def pack(cls, w: Any) -> _DeltaChunks:
        a = _as_weight(w)
        n, k = a.shape
        rows, cols, real = cls._entries(a != 0)
        vals = np.where(real, a[rows, cols], 0).astype(a.dtype)
        counts = np.bincount(rows, minlength=n)
        real_ptr = _offsets(counts)
        chunks = -(-counts // cls.CHUNK)
        cptr = _offsets(chunks)
        n_chunks = int(cptr[-1])
        pos = cptr[rows] * cls.CHUNK + (np.arange(rows.size) - real_ptr[rows])
        flat_cols = np.zeros(n_chunks * cls.CHUNK, dtype=np.int64)
        flat_vals = np.zeros(n_chunks * cls.CHUNK, dtype=a.dtype)
        filled = np.zeros(n_chunks * cls.CHUNK, dtype=bool)
        flat_cols[pos], flat_vals[pos], filled[pos] = cols, _zero_canonical(vals), True
        # padding repeats the previous column (step 0)
        idx = np.where(filled, np.arange(filled.size), 0)
        np.maximum.accumulate(idx, out=idx)
        cols2 = flat_cols[idx].reshape(n_chunks, cls.CHUNK)
        steps = np.diff(cols2, axis=1, prepend=cols2[:, :1]).astype(np.uint64)
        index = cls._encode(cols2[:, 0], steps[:, 1:], k)
        return cls(
            a.shape,
            flat_vals.reshape(n_chunks, cls.CHUNK),
            **index,
            indptr=cptr.astype(index_dtype(n_chunks)),
        )

    @classmethod
    @abc.abstractmethod
    def _encode(cls, first: np.ndarray, steps: np.ndarray, k: int) -> dict[str, np.ndarray]:
        """The index arrays for chunks starting at columns `first[C]` with `steps[C, 7]`."""

    @classmethod
    @abc.abstractmethod
    def chunk_index_bytes(cls, k: int) -> int:
        """Index bytes per chunk."""

    @classmethod
    def _packed_nbytes(cls, mask: np.ndarray, itemsize: int) -> int:
        return cls.bytes_of_rows(delta_row_entries(mask, (cls.MAX_STEP,))[0], mask.shape[1], itemsize)

    @classmethod
    def bytes_of_rows(cls, row_entries: np.ndarray, k: int, itemsize: int) -> int:
        """nbytes of a weight whose rows store `row_entries` entries (`delta_row_entries`)."""
        c = int((-(-row_entries // cls.CHUNK)).sum())
        return (
            c * (cls.CHUNK * itemsize + cls.chunk_index_bytes(k))
            + (row_entries.size + 1) * index_dtype(c).itemsize
        )

    def _check_chunks(self, index: np.ndarray, dtype: type) -> None:
        """Shapes and pointers of the chunks, `index` the per-chunk array of `dtype`."""
        n, k = self.shape
        c = self.values.shape[0] if self.values.ndim == 2 else -1
        if self.values.shape != (c, self.CHUNK) or index.shape != (c,) or index.dtype != dtype:
            raise FormatError(
                f"{type(self).__name__} needs values[C, 8] and per-chunk {np.dtype(dtype)} index arrays; "
                f"got values {self.values.shape}, index {index.dtype} {index.shape}"
            )
        _check_pointer(self.indptr, f"{type(self).__name__} indptr", n + 1, c)
        if c and self.columns().max() >= k:
            raise FormatError(f"{type(self).__name__} columns run past K = {k}")

    @abc.abstractmethod
    def columns(self) -> np.ndarray:
        """Column of every stored entry, ``[C, 8]`` (int64)."""

    def unpack(self) -> np.ndarray:
        n, _ = self.shape
        out = np.zeros(self.shape, dtype=self.dtype)
        rows = np.repeat(np.arange(n), np.diff(self.indptr.astype(np.int64)))
        cols = self.columns()
        keep = self.values != 0
        out[np.broadcast_to(rows[:, None], cols.shape)[keep], cols[keep]] = self.values[keep]
        return out


@dataclass(frozen=True, eq=False, repr=False)
class DeltaCSR(_DeltaChunks):
    """CSR with 4-bit column steps in chunks of 8 entries (a delta-coded index, as the
    CSR-DU format of Kourtis, Goumas and Koziris, "Optimizing sparse matrix-vector
    multiplication using index and value compression", CF 2008): 2.75 bytes per fp16
    entry instead of CSR's 4, so a GPU decode kernel at 50-80 % sparsity moves fewer
    bytes than with 16-bit column indices. Gaps above 15 are bridged (`_DeltaChunks`):
    at 90 % sparsity ~26 % more entries, where `DeltaCSR6` is smaller.

    * ``values[C, 8]`` W's dtype;
    * ``base[C]`` ``index_dtype(K - 1)``: the chunk's first column; ``deltas[C]`` uint32,
      8 nibbles, nibble j = bits 4j..4j+3 the step from entry j-1 to entry j (nibble 0 is 0);
    * ``indptr[N + 1]`` chunk offsets per row; ``index_dtype(C)``.

    nbytes = ``C * (8 * itemsize + base.itemsize + 4) + (N + 1) * indptr.itemsize``.
    """

    shape: tuple[int, int]
    values: np.ndarray
    base: np.ndarray
    deltas: np.ndarray
    indptr: np.ndarray

    name: ClassVar[str] = "dcsr"
    ARRAYS: ClassVar[tuple[str, ...]] = ("values", "base", "deltas", "indptr")
    ATTRS: ClassVar[tuple[str, ...]] = ("shape",)
    VALUES: ClassVar[str] = "values"
    MAX_STEP: ClassVar[int] = 15

    def __post_init__(self) -> None:
        self._normalise()
        _check_index_array(self.base, "DeltaCSR base", self.deltas.shape, self.shape[1])
        self._check_chunks(self.deltas, np.uint32)

    @classmethod
    def _encode(cls, first: np.ndarray, steps: np.ndarray, k: int) -> dict[str, np.ndarray]:
        shifts = 4 * np.arange(1, cls.CHUNK, dtype=np.uint64)
        deltas = (steps << shifts).sum(axis=1, dtype=np.uint64).astype(np.uint32)
        return {"base": first.astype(index_dtype(k - 1)), "deltas": deltas}

    @classmethod
    def chunk_index_bytes(cls, k: int) -> int:
        return index_dtype(k - 1).itemsize + 4

    def columns(self) -> np.ndarray:
        shifts = 4 * np.arange(self.CHUNK, dtype=np.uint32)
        steps = (self.deltas[:, None] >> shifts) & 0xF
        return self.base.astype(np.int64)[:, None] + np.cumsum(steps, axis=1, dtype=np.int64)


@dataclass(frozen=True, eq=False, repr=False)
class DeltaCSR6(_DeltaChunks):
    """Delta-coded CSR (as `DeltaCSR`, after Kourtis et al., CF 2008) with 6-bit steps and
    the whole chunk index in one uint64: 3 bytes per fp16 entry, and gaps up to 63 columns
    need no bridging zeros -- at 90 % sparsity 13 % fewer bytes than `DeltaCSR` (whose
    4-bit steps bridge ~26 % extra entries there) and 25 % fewer than 16-bit CSR.

    * ``values[C, 8]`` W's dtype;
    * ``index[C]`` uint64: bits 6(j-1)..6j-1 the step from entry j-1 to entry j
      (j = 1..7), bits 42..63 the chunk's first column (K <= 2**22);
    * ``indptr[N + 1]`` chunk offsets per row; ``index_dtype(C)``.

    nbytes = ``C * (8 * itemsize + 8) + (N + 1) * indptr.itemsize``.
    """

    shape: tuple[int, int]
    values: np.ndarray
    index: np.ndarray
    indptr: np.ndarray

    name: ClassVar[str] = "dcsr6"
    ARRAYS: ClassVar[tuple[str, ...]] = ("values", "index", "indptr")
    ATTRS: ClassVar[tuple[str, ...]] = ("shape",)
    VALUES: ClassVar[str] = "values"
    MAX_STEP: ClassVar[int] = 63
    BASE_SHIFT: ClassVar[int] = 42

    def __post_init__(self) -> None:
        self._normalise()
        self._check_k(self.shape[1])
        self._check_chunks(self.index, np.uint64)

    @classmethod
    def _check_k(cls, k: int) -> None:
        if k > 1 << (64 - cls.BASE_SHIFT):
            raise UnfitError(f"DeltaCSR6 holds K <= {1 << (64 - cls.BASE_SHIFT)} columns; got K = {k}")

    @classmethod
    def _encode(cls, first: np.ndarray, steps: np.ndarray, k: int) -> dict[str, np.ndarray]:
        cls._check_k(k)
        shifts = 6 * np.arange(cls.CHUNK - 1, dtype=np.uint64)
        index = (steps << shifts).sum(axis=1, dtype=np.uint64)
        return {"index": index | (first.astype(np.uint64) << np.uint64(cls.BASE_SHIFT))}

    @classmethod
    def chunk_index_bytes(cls, k: int) -> int:
        cls._check_k(k)
        return 8

    def columns(self) -> np.ndarray:
        shifts = 6 * np.arange(self.CHUNK - 1, dtype=np.uint64)
        steps = ((self.index[:, None] >> shifts) & np.uint64(63)).astype(np.int64)
        first = (self.index >> np.uint64(self.BASE_SHIFT)).astype(np.int64)
        return first[:, None] + np.concatenate(
            [np.zeros((first.size, 1), np.int64), np.cumsum(steps, axis=1)], axis=1
        )


# --------------------------------------------------------------------------- registry


FORMATS: dict[str, type[WeightFormat]] = {
    "dense": Dense,
    "csr": CSR,
    "bsr": BSR,
    "nm": NM,
    "bitmap": Bitmap,
    "dcsr": DeltaCSR,
    "dcsr6": DeltaCSR6,
}


def format_bytes(
    w: Any,
    *,
    pad: int = 1,
    block: tuple[int, int] = (16, 1),
    nm: tuple[int, int] | None = (2, 4),
    group: int = 16,
) -> dict[str, int]:
    """nbytes of W in each format of `FORMATS` that can hold it, keyed by format name.

    Formats whose shape constraints W misses are left out (BSR: N % r, K % c; Bitmap:
    N % group; NM: K % m), and so is NM unless W already is ``nm = (n, m)`` sparse
    (``nm=None`` leaves NM out). Bad parameters raise FormatError. Sizes come from one
    nonzero mask of W; each equals ``FORMATS[name].pack(w, ...).nbytes()``.
    """
    a = _as_weight(w)
    mask = a != 0
    params: dict[str, dict[str, Any]] = {
        "dense": {},
        "csr": {"pad": pad},
        "bsr": {"block": block},
        "bitmap": {"group": group},
        "dcsr": {},
        "dcsr6": {},
    }
    if nm is not None:
        n, m = nm
        params["nm"] = {"n": n, "m": m}
    out: dict[str, int] = {}
    for name, cls in FORMATS.items():
        if name not in params:
            continue
        try:
            out[name] = cls._packed_nbytes(mask, a.dtype.itemsize, **params[name])
        except UnfitError:
            continue
    return out
