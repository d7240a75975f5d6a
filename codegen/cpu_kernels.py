"""Shape-specialised fp32 TIR kernels for ``Y[M, N] = X[M, K] @ W.T`` on x86 CPUs.

W comes in the canonical orientation ``W[N, K]`` (outputs x reduction, see `formats`), so
``Y = X @ W_onnx`` with ``W_onnx = W.T``. Every builder packs W offline into the arrays its
kernel reads (the `formats` layouts, converted on the Python side where a kernel wants a
variant), writes a TVMScript PrimFunc specialised on M, N, K and the sparsity pattern's
sizes, compiles it with ``tvm.compile`` for an llvm target (`target.host_target` by
default) and returns a `CPUKernel`:

* ``kernel(x) -> y``: copies x into a preallocated tvm tensor, runs, returns a new array
  (the tensors are shared by all calls: not thread-safe);
* ``kernel.run()``: runs on the preallocated tensors only (for timing);
* ``.prim_func`` (unique ``global_symbol``; signature ``(X, *weights, Y)``), ``.weights``
  (the packed arrays, in signature order, for a Relax ``call_tir``), ``.nbytes`` (weight
  bytes the kernel reads = sum of ``.weights``), ``.format`` (a `formats.FORMATS` key),
  ``.schedule`` (the parameters used, defaults filled in, variant included), ``.asm()``
  (generated assembly, to check for ``zmm``).

Every kernel except the bitmap one also compiles for targets without AVX-512 (the gathers
then become scalar loads); only the bitmap builder refuses them (`formats.UnfitError`).

Kernels (``acc`` = accumulators kept in registers; "m tile" = rows of X handled per pass):

* ``build_dense``: ``Wp[ceil(N/nb), K, nb]`` (panels of nb outputs, zero-padded); parallel
  over (m tile, panel); per k (unrolled by ``k_unroll``): ``acc[i, 0:nb] += x[i, k] * Wp[p, k,
  0:nb]`` for the ``m_tile`` rows, i.e. ``m_tile * nb / 16`` zmm accumulators (default
  8 x 32 = 16; M tiles are balanced, a partial tile re-reads row M-1 and skips its store).
* ``build_csr``: CSR of W (rows = outputs) padded to 16 entries per row, uint16 columns
  (int32 when K > 65536), int32 row pointers. ``gather`` variant (M = 1): parallel over
  rows; per 16 entries one AVX-512 gather of x per row of X, ``acc16 += v16 * x[cols]``,
  horizontal sum at the end. ``xt`` variant (M > 1): X is transposed inside the kernel to
  ``XT[m tiles, K, mt]`` (zero-padded), then per row and entry ``acc[0:mt] += v *
  XT[t, col, 0:mt]`` (vectorised over M, ``n_acc`` interleaved accumulators; strided
  scalar stores of Y).
* ``build_bsr``: `formats.BSR` blocks of r outputs x c inputs. ``r`` variant (r >= 8, or
  both < 8): parallel over block rows; m tiles inside (so the block row stays in cache),
  per block, per input j, ``acc[i, 0:r] += D[e, j, 0:r] * x[i, col + j]``. ``c`` variant
  (r < 8 <= c): data transposed to ``[B, r, c]``; ``acc[i, q, 0:c] += D[e, q, 0:c] *
  x[i, col:col + c]``, horizontal sums at the end.
* ``build_bitmap``: `formats.Bitmap` with group 16 (AVX-512 only). Parallel over groups;
  per k: 16-float load at the running offset, register ``vexpandps`` under the 16-bit mask
  (computed once per k, not per row), ``acc[i] += vec * x[i, k]``, offset += popcount; k
  unrolled by ``k_unroll`` into that many accumulator sets. Dense math: every k costs M
  16-lane FMAs whatever the sparsity.
* ``build_nm``: N:M with 16 output rows packed together (our choice: it vectorises over
  outputs and every lane of a packed step shares its group g, so x can be read as one
  16-float window ``x[s:s+16]``, ``s = min(g*m, K-16)``). Values ``VP[ceil(N/16), L, 16]``
  and positions ``PP[ceil(N/16), L, 16]`` (uint8, one per value: the decoded `NM.positions`,
  unpacked from the b-bit fields), L = K/m*n. Per (g, j < n): ``acc[i] += VP[..] *
  permute(window_i, PP[..] + g*m - s)`` (``vpermps``; needs AVX-512, m <= 16, K >= 16),
  else a gather (``k = g*m + pos``; AVX-512 gather, or scalar loads without AVX-512).

All kernels are parallel (``T.parallel`` over independent output groups, so no write
conflicts) and write every element of Y.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from sparsegraph.codegen import formats as fmts
from sparsegraph.codegen.target import host_target, target_has_features

__all__ = [
    "CPUKernel",
    "build_bitmap",
    "build_bsr",
    "build_csr",
    "build_dense",
    "build_nm",
    "generated_asm",
]

_SYMBOL_COUNTER = itertools.count()

# --------------------------------------------------------------------------- kernel object


@dataclass(eq=False)
class CPUKernel:
    """A compiled kernel for one (M, N, K, W); see the module docstring."""

    format: str  # a `formats.FORMATS` key: dense, csr, bsr, bitmap, nm (variant in .schedule)
    shape: tuple[int, int, int]  # (M, N, K)
    prim_func: Any
    weights: dict[str, np.ndarray]
    schedule: dict[str, Any]
    target: Any
    executable: Any = field(repr=False)
    _fn: Any = field(init=False, repr=False)
    _x: Any = field(init=False, repr=False)
    _y: Any = field(init=False, repr=False)
    _args: tuple = field(init=False, repr=False)

    def __post_init__(self) -> None:
        m, n, k = self.shape
        dev = tvm.cpu()
        self._fn = self.executable[self.symbol]
        self._x = tvm.runtime.empty((m, k), "float32", dev)
        self._y = tvm.runtime.empty((m, n), "float32", dev)
        ws = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in self.weights.values()]
        self._args = (self._x, *ws, self._y)

    @property
    def symbol(self) -> str:
        return str(self.prim_func.attrs["global_symbol"])

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight arrays the kernel reads (padding and indices included)."""
        return int(sum(a.nbytes for a in self.weights.values()))

    @property
    def args(self) -> tuple:
        """The tvm tensors ``(X, *weights, Y)`` the kernel runs on (reused by every call)."""
        return self._args

    def __call__(self, x: np.ndarray) -> np.ndarray:
        m, _, k = self.shape
        a = np.asarray(x)
        if a.shape != (m, k):
            raise ValueError(f"{self.format} kernel was built for X of shape {(m, k)}; got {a.shape}")
        self._x.copyfrom(np.ascontiguousarray(a, dtype=np.float32))
        self._fn(*self._args)
        return self._y.numpy()

    def run(self) -> None:
        """Run once on the preallocated tensors (no copies): what a timing loop should call."""
        self._fn(*self._args)

    def asm(self) -> str:
        """The generated assembly of the compiled module."""
        return generated_asm(self)

    def __repr__(self) -> str:
        m, n, k = self.shape
        return (
            f"CPUKernel({self.format!r}, M={m}, N={n}, K={k}, symbol={self.symbol!r}, "
            f"nbytes={self.nbytes}, schedule={self.schedule})"
        )


def generated_asm(kernel: CPUKernel | Any) -> str:
    """Assembly text of a `CPUKernel` (or of a ``tvm.compile`` Executable)."""
    ex = kernel.executable if isinstance(kernel, CPUKernel) else kernel
    mod = ex.mod if hasattr(ex, "mod") else ex
    return str(mod.inspect_source("asm"))


# --------------------------------------------------------------------------- shared helpers


def _V(base, lanes):
    """``lanes`` consecutive elements from ``base`` (a Ramp; a scalar index for 1 lane)."""
    return base if lanes == 1 else T.Ramp(base, 1, lanes)


def _B(value, lanes):
    return value if lanes == 1 else T.Broadcast(value, lanes)


def _zero(lanes):
    return _B(T.float32(0), lanes)


def _hsum(v, lanes):
    """Horizontal sum of a float32 vector expression (shuffle tree for powers of two)."""
    if lanes == 1:
        return v
    if lanes & (lanes - 1) == 0:
        while lanes > 1:
            h = lanes // 2
            x = tirx.Var("hs", f"float32x{lanes}")
            lo = tirx.Shuffle([x], [tirx.IntImm("int32", j) for j in range(h)])
            hi = tirx.Shuffle([x], [tirx.IntImm("int32", j + h) for j in range(h)])
            v = tirx.Let(x, v, lo + hi)
            lanes = h
        return v
    x = tirx.Var("hs", f"float32x{lanes}")
    total = tirx.Shuffle([x], [tirx.IntImm("int32", 0)])
    for j in range(1, lanes):
        total = total + tirx.Shuffle([x], [tirx.IntImm("int32", j)])
    return tirx.Let(x, v, total)


def _gather16(base_ref, idx):
    """AVX-512 ``vgatherdps``: 16 floats at ``&base_ref + 4 * idx`` (idx: int32x16)."""
    return T.call_llvm_pure_intrin(
        "float32x16",
        "llvm.x86.avx512.mask.gather.dps.512",
        T.Broadcast(T.float32(0), 16),
        T.address_of(base_ref),
        idx,
        T.Broadcast(T.bool(True), 16),
        T.int32(4),
    )


def _permute16(vec, idx):
    """AVX-512 ``vpermps``: ``vec[idx[l]]`` for each lane l (both 16 lanes)."""
    return T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.permvar.sf.512", vec, idx)


def _expand16(vec, mask, fence=True):
    """AVX-512 ``vexpandps`` (register form): consecutive lanes of vec to the set mask lanes.

    `vec` goes through ``llvm.arithmetic.fence`` (a no-op copy) so that LLVM cannot fold
    the load into the memory form ``vexpandps zmm{k}{z}, [mem]``, which is microcoded
    and slow on Zen 4/5 (tvm-notes section 8, pitfall 4)."""
    fenced = T.call_llvm_pure_intrin("float32x16", "llvm.arithmetic.fence", vec) if fence else vec
    return T.call_llvm_pure_intrin(
        "float32x16", "llvm.x86.avx512.mask.expand", fenced, T.Broadcast(T.float32(0), 16), mask
    )


def _mask16(bits):
    """int32 with the low 16 bits a lane mask -> boolx16 (compiles to kmovd)."""
    return T.bitwise_and(
        T.Broadcast(bits, 16), T.shift_left(T.Broadcast(T.int32(1), 16), T.Ramp(0, 1, 16))
    ) != T.Broadcast(T.int32(0), 16)


def _loop(extent, unroll_max=16):
    """Unrolled loop for short static extents, a serial loop otherwise."""
    return T.unroll(extent) if extent <= unroll_max else T.serial(extent)


def _resolve_target(target):
    if target is None:
        return host_target()
    if isinstance(target, (str, dict)):
        return tvm.target.Target(target)
    return target


def _avx512(target) -> bool:
    return target_has_features(target)


def _weight(w: Any) -> np.ndarray:
    """Dense float32 W[N, K] from an array or a `formats` instance."""
    if isinstance(w, fmts.WeightFormat):
        w = w.unpack()
    a = np.asarray(w)
    if a.ndim != 2 or min(a.shape) < 1:
        raise fmts.FormatError(f"W must be 2-D [N, K] with N, K >= 1; got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _check_m(m: Any) -> int:
    m = int(m)
    if m < 1:
        raise ValueError(f"M must be >= 1; got {m}")
    return m


def _merge_schedule(defaults: dict[str, Any], schedule: Mapping[str, Any] | None, fmt: str) -> dict:
    out = dict(defaults)
    if schedule:
        unknown = sorted(set(schedule) - set(defaults))
        if unknown:
            raise ValueError(f"unknown {fmt} schedule keys {unknown}; known: {sorted(defaults)}")
        out.update({k: v for k, v in schedule.items() if v is not None})
    return out


def _m_tiles(m: int, m_tile: int) -> tuple[int, int]:
    """(tiles, balanced rows per tile) for M rows and a maximum tile of m_tile rows."""
    m_tile = max(1, min(int(m_tile), m))
    tiles = -(-m // m_tile)
    return tiles, -(-m // tiles)


def _symbol(fmt: str, m: int, n: int, k: int) -> str:
    return f"sg_{fmt}_m{m}_n{n}_k{k}_{next(_SYMBOL_COUNTER)}"


def _finish(fmt, label, prim, shape, weights, schedule, target) -> CPUKernel:
    m, n, k = shape
    sym = _symbol(re.sub(r"\W", "_", label), m, n, k)
    prim = prim.with_attr("global_symbol", sym)
    ex = tvm.compile(tvm.IRModule({sym: prim}), target=target)
    return CPUKernel(fmt, shape, prim, weights, schedule, target, ex)


def _nonempty(a: np.ndarray, rows: int = 16) -> np.ndarray:
    """`a` with at least `rows` entries along axis 0 (zero fill): TIR buffers need size > 0."""
    if a.shape[0] >= rows:
        return a
    out = np.zeros((rows, *a.shape[1:]), dtype=a.dtype)
    out[: a.shape[0]] = a
    return out


# --------------------------------------------------------------------------- dense


def _dense_func(M, N, K, mt, nmt, nb, ku):
    NP = -(-N // nb)
    NV = nb // 16
    KO, KT = K // ku, K % ku
    NTAIL = N - (NP - 1) * nb if N % nb else 0

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        Wp: T.Buffer((NP, K, nb), "float32"),
        Y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for tp in T.parallel(nmt * NP):
            acc = T.decl_buffer((mt, nb), "float32")
            mo = T.meta_var(tp // NP)
            p = T.meta_var(tp % NP)
            for i in T.unroll(mt):
                for v in T.unroll(NV):
                    acc[i, T.Ramp(v * 16, 1, 16)] = T.Broadcast(T.float32(0), 16)
            for ko in range(KO):
                for ki in T.unroll(ku):
                    for i in T.unroll(mt):
                        for v in T.unroll(NV):
                            acc[i, T.Ramp(v * 16, 1, 16)] = (
                                acc[i, T.Ramp(v * 16, 1, 16)]
                                + T.Broadcast(X[T.min(mo * mt + i, M - 1), ko * ku + ki], 16)
                                * Wp[p, ko * ku + ki, T.Ramp(v * 16, 1, 16)]
                            )
            if KT > 0:
                for ki in T.unroll(KT):
                    for i in T.unroll(mt):
                        for v in T.unroll(NV):
                            acc[i, T.Ramp(v * 16, 1, 16)] = (
                                acc[i, T.Ramp(v * 16, 1, 16)]
                                + T.Broadcast(X[T.min(mo * mt + i, M - 1), KO * ku + ki], 16)
                                * Wp[p, KO * ku + ki, T.Ramp(v * 16, 1, 16)]
                            )
            for i in T.unroll(mt):
                if mo * mt + i < M:
                    if NTAIL > 0:
                        if p < NP - 1:
                            for v in T.unroll(NV):
                                Y[mo * mt + i, T.Ramp(p * nb + v * 16, 1, 16)] = acc[i, T.Ramp(v * 16, 1, 16)]
                        else:
                            for q in range(NTAIL):
                                Y[mo * mt + i, p * nb + q] = acc[i, q]
                    else:
                        for v in T.unroll(NV):
                            Y[mo * mt + i, T.Ramp(p * nb + v * 16, 1, 16)] = acc[i, T.Ramp(v * 16, 1, 16)]

    return main


def pack_dense_panels(w: np.ndarray, nb: int) -> np.ndarray:
    """``Wp[ceil(N/nb), K, nb]`` with ``Wp[p, k, j] = W[p*nb + j, k]`` (zero beyond N)."""
    n, k = w.shape
    npan = -(-n // nb)
    pad = np.zeros((npan * nb, k), dtype=np.float32)
    pad[:n] = w
    return np.ascontiguousarray(pad.reshape(npan, nb, k).transpose(0, 2, 1))


def build_dense(w: Any, M: int, target: Any = None, schedule: Mapping[str, Any] | None = None) -> CPUKernel:
    """Dense packed-panel kernel. Schedule: ``m_tile`` (max rows of X per register tile,
    default 8; tiles are balanced), ``n_panel`` (outputs per panel, a multiple of 16,
    default 32: 8 x 32 = 16 zmm accumulators; 8 x 64 spills on AVX-512), ``k_unroll``
    (default 4)."""
    a = _weight(w)
    M = _check_m(M)
    target = _resolve_target(target)
    n, k = a.shape
    sch = _merge_schedule({"m_tile": 8, "n_panel": 32, "k_unroll": 4}, schedule, "dense")
    nb, ku = int(sch["n_panel"]), max(1, int(sch["k_unroll"]))
    if nb < 16 or nb % 16:
        raise ValueError(f"dense n_panel must be a positive multiple of 16; got {nb}")
    nmt, mt = _m_tiles(M, sch["m_tile"])
    sch.update(n_panel=nb, k_unroll=ku, m_tile_used=mt, m_tiles=nmt)
    prim = _dense_func(M, n, k, mt, nmt, nb, ku)
    return _finish("dense", "dense", prim, (M, n, k), {"Wp": pack_dense_panels(a, nb)}, sch, target)


# --------------------------------------------------------------------------- CSR


def _csr_gather_func(M, N, K, S, idt, avx512):
    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        V: T.Buffer((S,), "float32"),
        C: T.Buffer((S,), idt),
        P: T.Buffer((N + 1,), "int32"),
        Y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for r in T.parallel(N):
            acc = T.decl_buffer((M, 16), "float32")
            ib = T.decl_buffer((16,), "int32")
            vb = T.decl_buffer((16,), "float32")
            for i in T.unroll(M):
                acc[i, T.Ramp(0, 1, 16)] = T.Broadcast(T.float32(0), 16)
            for j in range(P[r] // 16, P[r + 1] // 16):
                ib[T.Ramp(0, 1, 16)] = T.Cast("int32x16", C[T.Ramp(j * 16, 1, 16)])
                vb[T.Ramp(0, 1, 16)] = V[T.Ramp(j * 16, 1, 16)]
                for i in T.unroll(M):
                    if avx512:
                        acc[i, T.Ramp(0, 1, 16)] = acc[i, T.Ramp(0, 1, 16)] + vb[
                            T.Ramp(0, 1, 16)
                        ] * _gather16(X[i, 0], ib[T.Ramp(0, 1, 16)])
                    else:
                        acc[i, T.Ramp(0, 1, 16)] = (
                            acc[i, T.Ramp(0, 1, 16)] + vb[T.Ramp(0, 1, 16)] * X[i, ib[T.Ramp(0, 1, 16)]]
                        )
            for i in T.unroll(M):
                Y[i, r] = _hsum(acc[i, T.Ramp(0, 1, 16)], 16)

    return main


def _csr_xt_func(M, N, K, S, idt, mt, nmt, nacc):
    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        V: T.Buffer((S,), "float32"),
        C: T.Buffer((S,), idt),
        P: T.Buffer((N + 1,), "int32"),
        Y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        XT = T.decl_buffer((nmt, K, mt), "float32")
        for kk in T.parallel(K):
            for t in range(nmt):
                for i in range(mt):
                    XT[t, kk, i] = T.if_then_else(
                        t * mt + i < M, X[T.min(t * mt + i, M - 1), kk], T.float32(0)
                    )
        for r in T.parallel(N):
            acc = T.decl_buffer((nacc, mt), "float32")
            for t in range(nmt):
                for a in T.unroll(nacc):
                    acc[a, _V(0, mt)] = _zero(mt)
                for j in range(P[r] // 16, P[r + 1] // 16):
                    for u in T.unroll(16):
                        acc[u % nacc, _V(0, mt)] = (
                            acc[u % nacc, _V(0, mt)]
                            + _B(V[j * 16 + u], mt) * XT[t, T.Cast("int32", C[j * 16 + u]), _V(0, mt)]
                        )
                for a in T.unroll(nacc - 1):
                    acc[0, _V(0, mt)] = acc[0, _V(0, mt)] + acc[a + 1, _V(0, mt)]
                for i in range(mt):
                    if t * mt + i < M:
                        Y[t * mt + i, r] = acc[0, i]

    return main


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def build_csr(w: Any, M: int, target: Any = None, schedule: Mapping[str, Any] | None = None) -> CPUKernel:
    """CSR (rows padded to 16) kernel. Schedule: ``variant`` (``"gather"`` or ``"xt"``;
    default gather for M <= ``gather_max_m`` = 1), ``m_tile`` (xt: max M lanes per pass,
    default 64), ``n_acc`` (xt: interleaved accumulators, default 4)."""
    a = _weight(w)
    M = _check_m(M)
    target = _resolve_target(target)
    n, k = a.shape
    sch = _merge_schedule({"variant": None, "gather_max_m": 1, "m_tile": 64, "n_acc": 4}, schedule, "csr")
    variant = sch["variant"] or ("gather" if M <= int(sch["gather_max_m"]) else "xt")
    if variant not in ("gather", "xt"):
        raise ValueError(f"csr variant must be 'gather' or 'xt'; got {variant!r}")
    csr = fmts.CSR.pack(a, pad=16)
    idt = "uint16" if k <= 65536 else "int32"
    values = _nonempty(np.asarray(csr.values, dtype=np.float32))
    cols = _nonempty(np.asarray(csr.indices).astype(idt))
    ptr = np.asarray(csr.indptr).astype(np.int32)
    s = values.shape[0]
    avx512 = _avx512(target)
    sch["variant"] = variant
    if variant == "gather":
        sch["avx512_gather"] = avx512
        prim = _csr_gather_func(M, n, k, s, idt, avx512)
    else:
        nmt, mt = _m_tiles(M, max(1, int(sch["m_tile"])))
        # lanes per pass: a power of two up to 16, else a multiple of 16 (XT is zero-padded)
        mt = _pow2_at_least(mt) if mt <= 16 else -(-mt // 16) * 16
        nacc = max(1, min(16, int(sch["n_acc"])))
        while 16 % nacc:
            nacc -= 1
        sch.update(m_tile_used=mt, m_tiles=nmt, n_acc=nacc)
        prim = _csr_xt_func(M, n, k, s, idt, mt, nmt, nacc)
    weights = {"values": values, "indices": cols, "indptr": ptr}
    return _finish("csr", f"csr_{variant}", prim, (M, n, k), weights, sch, target)


# --------------------------------------------------------------------------- BSR


def _bsr_r_func(M, N, K, NB, r, c, idt, mt, nmt):
    NBR = N // r

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        D: T.Buffer((NB, c, r), "float32"),
        IND: T.Buffer((NB,), idt),
        P: T.Buffer((NBR + 1,), "int32"),
        Y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for br in T.parallel(NBR):
            acc = T.decl_buffer((mt, r), "float32")
            for t in range(nmt):
                for i in T.unroll(mt):
                    acc[i, _V(0, r)] = _zero(r)
                for e in range(P[br], P[br + 1]):
                    for j in _loop(c):
                        for i in T.unroll(mt):
                            acc[i, _V(0, r)] = acc[i, _V(0, r)] + D[e, j, _V(0, r)] * _B(
                                X[T.min(t * mt + i, M - 1), T.Cast("int32", IND[e]) * c + j], r
                            )
                for i in T.unroll(mt):
                    if t * mt + i < M:
                        Y[t * mt + i, _V(br * r, r)] = acc[i, _V(0, r)]

    return main


def _bsr_c_func(M, N, K, NB, r, c, idt, mt, nmt):
    NBR = N // r

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        D: T.Buffer((NB, r, c), "float32"),
        IND: T.Buffer((NB,), idt),
        P: T.Buffer((NBR + 1,), "int32"),
        Y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for br in T.parallel(NBR):
            acc = T.decl_buffer((mt, r, c), "float32")
            xb = T.decl_buffer((c,), "float32")
            for t in range(nmt):
                for i in T.unroll(mt):
                    for q in T.unroll(r):
                        acc[i, q, T.Ramp(0, 1, c)] = T.Broadcast(T.float32(0), c)
                for e in range(P[br], P[br + 1]):
                    for i in T.unroll(mt):
                        xb[T.Ramp(0, 1, c)] = X[
                            T.min(t * mt + i, M - 1), T.Ramp(T.Cast("int32", IND[e]) * c, 1, c)
                        ]
                        for q in T.unroll(r):
                            acc[i, q, T.Ramp(0, 1, c)] = (
                                acc[i, q, T.Ramp(0, 1, c)] + D[e, q, T.Ramp(0, 1, c)] * xb[T.Ramp(0, 1, c)]
                            )
                for i in T.unroll(mt):
                    if t * mt + i < M:
                        for q in T.unroll(r):
                            Y[t * mt + i, br * r + q] = _hsum(acc[i, q, T.Ramp(0, 1, c)], c)

    return main


def build_bsr(
    w: Any,
    block: tuple[int, int],
    M: int,
    target: Any = None,
    schedule: Mapping[str, Any] | None = None,
) -> CPUKernel:
    """BSR kernel for blocks of r outputs x c inputs (`formats.BSR`; needs N % r == K % c == 0).

    Vectorised over r when r >= 8 (or when both r, c < 8), over c when r < 8 <= c.
    Schedule: ``variant`` (``"r"`` / ``"c"``), ``m_tile`` (rows of X per register tile;
    default about 16 zmm of accumulators)."""
    a = _weight(w)
    M = _check_m(M)
    target = _resolve_target(target)
    n, k = a.shape
    bsr = fmts.BSR.pack(a, block=tuple(block))
    r, c = bsr.block
    sch = _merge_schedule({"variant": None, "m_tile": None}, schedule, "bsr")
    variant = sch["variant"] or ("c" if r < 8 <= c else "r")
    if variant not in ("r", "c"):
        raise ValueError(f"bsr variant must be 'r' or 'c'; got {variant!r}")
    if variant == "c" and c == 1:
        raise ValueError("bsr variant 'c' needs c >= 2")
    data = np.asarray(bsr.data, dtype=np.float32)  # [B, c, r]
    if variant == "c":
        data = np.ascontiguousarray(data.transpose(0, 2, 1))  # [B, r, c]
    regs_per_row = -(-r // 16) if variant == "r" else r * -(-c // 16)
    m_tile = sch["m_tile"] or max(1, 16 // regs_per_row)
    nmt, mt = _m_tiles(M, m_tile)
    sch.update(variant=variant, block=(r, c), m_tile=m_tile, m_tile_used=mt, m_tiles=nmt)
    idt = str(bsr.indices.dtype)
    data = _nonempty(data, 1)
    ind = _nonempty(np.asarray(bsr.indices), 1)
    ptr = np.asarray(bsr.indptr).astype(np.int32)
    func = _bsr_r_func if variant == "r" else _bsr_c_func
    prim = func(M, n, k, data.shape[0], r, c, idt, mt, nmt)
    weights = {"data": data, "indices": ind, "indptr": ptr}
    return _finish("bsr", f"bsr_{r}x{c}_{variant}", prim, (M, n, k), weights, sch, target)


# --------------------------------------------------------------------------- Bitmap


def _bitmap_func(M, N, K, NV, ku, mt, nmt, fence):
    G = N // 16
    KO, KT = K // ku, K % ku

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        MK: T.Buffer((G, K), "uint16"),
        VAL: T.Buffer((NV,), "float32"),
        GP: T.Buffer((G + 1,), "int32"),
        Y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for g in T.parallel(G):
            acc = T.decl_buffer((ku, mt, 16), "float32")
            vb = T.decl_buffer((ku, 16), "float32")
            off = T.decl_buffer((1,), "int32")
            for t in range(nmt):
                for a in T.unroll(ku):
                    for i in T.unroll(mt):
                        acc[a, i, T.Ramp(0, 1, 16)] = T.Broadcast(T.float32(0), 16)
                off[0] = GP[g]
                for ko in range(KO):
                    for a in T.unroll(ku):
                        vb[a, T.Ramp(0, 1, 16)] = _expand16(
                            VAL[T.Ramp(off[0], 1, 16)], _mask16(T.Cast("int32", MK[g, ko * ku + a])), fence
                        )
                        off[0] = off[0] + T.popcount(T.Cast("int32", MK[g, ko * ku + a]))
                        for i in T.unroll(mt):
                            acc[a, i, T.Ramp(0, 1, 16)] = acc[a, i, T.Ramp(0, 1, 16)] + vb[
                                a, T.Ramp(0, 1, 16)
                            ] * T.Broadcast(X[T.min(t * mt + i, M - 1), ko * ku + a], 16)
                if KT > 0:
                    for a in T.unroll(KT):
                        vb[0, T.Ramp(0, 1, 16)] = _expand16(
                            VAL[T.Ramp(off[0], 1, 16)], _mask16(T.Cast("int32", MK[g, KO * ku + a])), fence
                        )
                        off[0] = off[0] + T.popcount(T.Cast("int32", MK[g, KO * ku + a]))
                        for i in T.unroll(mt):
                            acc[0, i, T.Ramp(0, 1, 16)] = acc[0, i, T.Ramp(0, 1, 16)] + vb[
                                0, T.Ramp(0, 1, 16)
                            ] * T.Broadcast(X[T.min(t * mt + i, M - 1), KO * ku + a], 16)
                for a in T.unroll(ku - 1):
                    for i in T.unroll(mt):
                        acc[0, i, T.Ramp(0, 1, 16)] = (
                            acc[0, i, T.Ramp(0, 1, 16)] + acc[a + 1, i, T.Ramp(0, 1, 16)]
                        )
                for i in T.unroll(mt):
                    if t * mt + i < M:
                        Y[t * mt + i, T.Ramp(g * 16, 1, 16)] = acc[0, i, T.Ramp(0, 1, 16)]

    return main


def build_bitmap(w: Any, M: int, target: Any = None, schedule: Mapping[str, Any] | None = None) -> CPUKernel:
    """16-output bitmap kernel (`formats.Bitmap`, group 16; needs N % 16 == 0 and AVX-512).

    Values are padded with 16 zeros so the register expand may load 16 floats at any
    offset. Schedule: ``k_unroll`` (accumulator sets, default 4 for M <= 2 else 1),
    ``m_tile`` (rows of X per pass over the masks, default 16 // k_unroll)."""
    a = _weight(w)
    M = _check_m(M)
    target = _resolve_target(target)
    if not _avx512(target):
        raise fmts.UnfitError("the bitmap kernel needs AVX-512 (vexpandps); this target has none")
    n, k = a.shape
    bm = fmts.Bitmap.pack(a, group=16)
    sch = _merge_schedule({"k_unroll": None, "m_tile": None, "expand": "reg"}, schedule, "bitmap")
    if sch["expand"] not in ("reg", "mem"):
        raise ValueError(f"bitmap expand must be 'reg' or 'mem'; got {sch['expand']!r}")
    ku = max(1, int(sch["k_unroll"] or (4 if M <= 2 else 1)))
    m_tile = int(sch["m_tile"] or max(1, 16 // ku))
    nmt, mt = _m_tiles(M, m_tile)
    sch.update(k_unroll=ku, m_tile=m_tile, m_tile_used=mt, m_tiles=nmt)
    values = np.concatenate([np.asarray(bm.values, dtype=np.float32), np.zeros(16, np.float32)])
    weights = {
        "masks": np.asarray(bm.masks, dtype=np.uint16),
        "values": values,
        "gptr": np.asarray(bm.gptr).astype(np.int32),
    }
    prim = _bitmap_func(M, n, k, values.shape[0], ku, mt, nmt, sch["expand"] == "reg")
    return _finish("bitmap", "bitmap", prim, (M, n, k), weights, sch, target)


# --------------------------------------------------------------------------- N:M


def _nm_func(M, N, K, n, m, L, mt, nmt, mode):
    G = K // m
    NG = -(-N // 16)
    NTAIL = N - (NG - 1) * 16 if N % 16 else 0

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        VP: T.Buffer((NG, L, 16), "float32"),
        PP: T.Buffer((NG, L, 16), "uint8"),
        Y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for rg in T.parallel(NG):
            acc = T.decl_buffer((mt, 16), "float32")
            xw = T.decl_buffer((mt, 16), "float32")
            ib = T.decl_buffer((16,), "int32")
            for t in range(nmt):
                for i in T.unroll(mt):
                    acc[i, T.Ramp(0, 1, 16)] = T.Broadcast(T.float32(0), 16)
                for g in range(G):
                    if mode == "permute":
                        for i in T.unroll(mt):
                            xw[i, T.Ramp(0, 1, 16)] = X[
                                T.min(t * mt + i, M - 1), T.Ramp(T.min(g * m, K - 16), 1, 16)
                            ]
                    for j in T.unroll(n):
                        if mode == "permute":
                            ib[T.Ramp(0, 1, 16)] = T.Cast(
                                "int32x16", PP[rg, g * n + j, T.Ramp(0, 1, 16)]
                            ) + T.Broadcast(g * m - T.min(g * m, K - 16), 16)
                        else:
                            ib[T.Ramp(0, 1, 16)] = T.Cast(
                                "int32x16", PP[rg, g * n + j, T.Ramp(0, 1, 16)]
                            ) + T.Broadcast(g * m, 16)
                        for i in T.unroll(mt):
                            if mode == "permute":
                                acc[i, T.Ramp(0, 1, 16)] = acc[i, T.Ramp(0, 1, 16)] + VP[
                                    rg, g * n + j, T.Ramp(0, 1, 16)
                                ] * _permute16(xw[i, T.Ramp(0, 1, 16)], ib[T.Ramp(0, 1, 16)])
                            elif mode == "gather":
                                acc[i, T.Ramp(0, 1, 16)] = acc[i, T.Ramp(0, 1, 16)] + VP[
                                    rg, g * n + j, T.Ramp(0, 1, 16)
                                ] * _gather16(X[T.min(t * mt + i, M - 1), 0], ib[T.Ramp(0, 1, 16)])
                            else:
                                acc[i, T.Ramp(0, 1, 16)] = (
                                    acc[i, T.Ramp(0, 1, 16)]
                                    + VP[rg, g * n + j, T.Ramp(0, 1, 16)]
                                    * X[T.min(t * mt + i, M - 1), ib[T.Ramp(0, 1, 16)]]
                                )
                for i in T.unroll(mt):
                    if t * mt + i < M:
                        if NTAIL > 0:
                            if rg < NG - 1:
                                Y[t * mt + i, T.Ramp(rg * 16, 1, 16)] = acc[i, T.Ramp(0, 1, 16)]
                            else:
                                for q in range(NTAIL):
                                    Y[t * mt + i, rg * 16 + q] = acc[i, q]
                        else:
                            Y[t * mt + i, T.Ramp(rg * 16, 1, 16)] = acc[i, T.Ramp(0, 1, 16)]

    return main


def pack_nm_rows16(nm: fmts.NM) -> tuple[np.ndarray, np.ndarray]:
    """`formats.NM` -> (``VP[ceil(N/16), L, 16]`` float32, ``PP[ceil(N/16), L, 16]`` uint8):
    lane q of row group p is output row ``16*p + q`` (rows past N are zero values, position 0)."""
    rows, _ = nm.shape
    kept = nm.values.shape[1]
    ng = -(-rows // 16)
    vals = np.zeros((ng * 16, kept), dtype=np.float32)
    vals[:rows] = nm.values
    pos = np.zeros((ng * 16, kept), dtype=np.uint8)
    pos[:rows] = nm.positions().reshape(rows, kept)
    vp = np.ascontiguousarray(vals.reshape(ng, 16, kept).transpose(0, 2, 1))
    pp = np.ascontiguousarray(pos.reshape(ng, 16, kept).transpose(0, 2, 1))
    return vp, pp


def build_nm(
    w: Any,
    n: int,
    m: int,
    M: int,
    target: Any = None,
    schedule: Mapping[str, Any] | None = None,
) -> CPUKernel:
    """N:M kernel (`formats.NM`; W must be n:m sparse, K % m == 0), 16 output rows packed
    together. Schedule: ``mode`` (``"permute"`` / ``"gather"`` / ``"scalar"``; default
    permute when AVX-512, m <= 16 and K >= 16), ``m_tile`` (default 8)."""
    a = _weight(w)
    M = _check_m(M)
    target = _resolve_target(target)
    rows, k = a.shape
    nm = fmts.NM.pack(a, n=n, m=m)
    if m > 256:
        raise fmts.UnfitError(f"the N:M kernel stores positions as uint8; needs m <= 256, got {m}")
    avx512 = _avx512(target)
    sch = _merge_schedule({"mode": None, "m_tile": 8}, schedule, "nm")
    mode = sch["mode"] or (
        "permute" if avx512 and m <= 16 and k >= 16 else ("gather" if avx512 else "scalar")
    )
    if mode not in ("permute", "gather", "scalar"):
        raise ValueError(f"nm mode must be 'permute', 'gather' or 'scalar'; got {mode!r}")
    if mode in ("permute", "gather") and not avx512:
        raise fmts.UnfitError(f"nm mode {mode!r} needs AVX-512")
    if mode == "permute" and (m > 16 or k < 16):
        raise fmts.UnfitError(f"nm mode 'permute' needs m <= 16 and K >= 16; got m={m}, K={k}")
    nmt, mt = _m_tiles(M, sch["m_tile"])
    sch.update(mode=mode, n=nm.n, m=nm.m, m_tile_used=mt, m_tiles=nmt)
    vp, pp = pack_nm_rows16(nm)
    prim = _nm_func(M, rows, k, nm.n, nm.m, vp.shape[1], mt, nmt, mode)
    return _finish(
        "nm", f"nm_{nm.n}_{nm.m}_{mode}", prim, (M, rows, k), {"values": vp, "positions": pp}, sch, target
    )
