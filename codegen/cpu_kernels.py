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
  over (panel, m tile), panel-major so a thread reuses a panel from L2 across its m tiles
  (2x faster than m-tile-major at M=512, K=11008); per k (unrolled by ``k_unroll``):
  ``acc[i, 0:nb] += x[i, k] * Wp[p, k, 0:nb]`` for the ``m_tile`` rows, i.e. ``m_tile *
  nb / 16`` zmm accumulators (default 8 x 32 = 16; M tiles are balanced, a partial tile
  re-reads row M-1 and skips its store); at M = 1 a task streams 2 panels side by side.
  At M >= 64 by default K-blocked (``k_block`` 512, 6 x 64 tiles): per panel, per K
  block, every m tile, so the block stays in cache and Y's panel columns in L2 (M = 512,
  K = 11008: 0.88 -> 1.00x ORT single-threaded).
* ``build_csr``: CSR of W (rows = outputs) padded to 16 entries per row, uint16 columns
  (int32 when K > 65536), int32 row pointers. ``gather`` variant (M = 1): parallel over
  rows; per 16 entries one AVX-512 gather of x per row of X, ``acc16 += v16 * x[cols]``,
  horizontal sum at the end. ``xt`` variant (M > 1): X is transposed inside the kernel to
  ``XT[m tiles, K, mt]`` (zero-padded), then per row and entry ``acc[0:mt] += v *
  XT[t, col, 0:mt]`` (vectorised over M, ``n_acc`` interleaved accumulators, software
  prefetch of the value/index streams). When XT outgrows L2 (large M x K) the CSR is split
  into column chunks (`chunk_csr`: [chunk][row] order, each segment padded to 16) and a
  task of ``row_block`` rows runs chunk by chunk, accumulating in a scratch ``[rows, M]``.
* ``build_bsr``: `formats.BSR` blocks of r outputs x c inputs. ``r`` variant (r >= 8, or
  both < 8): parallel over groups of block rows; m tiles inside (so the block row stays in
  cache), per block, per input j, ``acc[i, 0:r] += D[e, j, 0:r] * x[i, col + j]``. ``c``
  variant (r < 8 <= c): data transposed to ``[B, r, c]``; ``acc[i, q, 0:c] += D[e, q,
  0:c] * x[i, col:col + c]``, horizontal sums at the end; at M >= 4 the blocks are
  reordered by column chunk (`chunk_bsr`) so an m tile's slice of X stays in L1, and Y is
  accumulated chunk by chunk. Software prefetch of the block stream for small blocks.
* ``build_bitmap``: `formats.Bitmap` with group 16 (AVX-512 only). Parallel over groups;
  per k: 16-float load at the running (int64) offset, register ``vexpandps`` under the
  16-bit mask (computed once per k, not per row), ``acc[i] += vec * x[i, k]``, offset +=
  popcount; k unrolled by ``k_unroll`` into that many accumulator sets. Dense math: every
  k costs M 16-lane FMAs whatever the sparsity.
* ``build_nm``: N:M with 16 output rows packed together (our choice: it vectorises over
  outputs and every lane of a packed step shares its group g, so x can be read as one
  16-float window ``x[s:s+16]``, ``s = min(g*m, K-16)``). Values ``VP[ceil(N/16), L, 16]``
  and positions ``PP[ceil(N/16), L, 16]`` (uint8, one per value: the decoded `NM.positions`,
  unpacked from the b-bit fields), L = K/m*n. Per (g, j < n): ``acc[i] += VP[..] *
  permute(window_i, PP[..] + g*m - s)`` (``vpermps``; needs AVX-512, m <= 16, K >= 16),
  else a gather (``k = g*m + pos``; AVX-512 gather, or scalar loads without AVX-512).

All kernels are parallel (``T.parallel`` over independent output groups, so no write
conflicts; TVM's pool sized to every physical core, see `use_all_cores`) and write every
element of Y. Builders take a dense W[N, K] or an instance of
their `formats` class (used as is when its parameters match, so a large weight is packed
once for several M). `SCHEDULE_SPACE` lists a few schedules per format for a tuner.

Which kernel wins (cold cache, 2-core Zen 5, `benchmarks/cpu_kernels.py`, 2026-11-25 run):
M = 1: bitmap up to 70 % and for 2:4, CSR gather at >= 90 %; M = 8: bitmap at <= 70 %, CSR
xt at >= 90 %; M >= 64: CSR xt (unstructured), N:M (2:4); BSR for block patterns at every
M. At M = 1 the kernels stream 40-78 GB/s (ORT dense: 30-55 GB/s), i.e. they sit at the
bytes bound; at M = 8 the bitmap is FMA-bound (8 zmm FMAs per mask word: dense math) and
CSR xt load-bound (~1.5 cycles/nnz); at M >= 64 CSR xt is bound by L2 bandwidth on the
random XT rows (one 256-byte row per nonzero per 64-lane tile).
Tried and dropped: a tiled-CSC "axpy" kernel (acc tile in L1, per input k a list of
uint8 local outputs): 1.6 cycles/nnz at 70 % and 2.2 at 90 % for M = 8, never faster
than the bitmap (1.0) or CSR xt (1.5); two CSR rows interleaved per gather loop (3 %
slower); prefetchnta instead of prefetcht0 (no change); software prefetch in the dense
kernel (15-25 % slower); K chunks for the BSR "r" variant (no gain). Kept: int64 bitmap
offsets (the int32 sign extension doubled the offset chain: 5-10 % at M = 1); software
prefetch of the value/index streams (bitmap M = 8 at 70 %: 3.8 -> 1.9 ms; CSR xt M = 8:
4.7 -> 3.2 ms; BSR 16x1 M = 8: 4.4 -> 1.8 ms; CSR gather: 0-4 %).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from sparsegraph.codegen import formats as fmts
from sparsegraph.codegen.target import host_target, target_has_features

__all__ = [
    "SCHEDULE_SPACE",
    "CPUKernel",
    "build_bitmap",
    "build_bsr",
    "build_csr",
    "build_dense",
    "build_nm",
    "generated_asm",
    "physical_cores",
    "use_all_cores",
]

_SYMBOL_COUNTER = itertools.count()

# --------------------------------------------------------------------------- threads


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings counted once; sysfs topology,
    else the number of usable CPUs)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for c in cpus:
        try:
            cores.add(
                Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip()
            )
        except OSError:
            cores.add(str(c))
    return max(1, len(cores))


_THREADS_SET = False


def use_all_cores() -> int:
    """Size TVM's CPU thread pool to every physical core (unless ``TVM_NUM_THREADS`` or
    ``OMP_NUM_THREADS`` is set: then that wins); returns the pool's thread count.

    TVM 0.27 sizes its pool to ``hardware_concurrency / 2`` on x86 (it assumes 2-way SMT), so
    on a host without SMT (a 2-vCPU VM) every parallel kernel ran on one core while
    onnxruntime used two (Llama-7B-shaped decode step, dense: 20.9 ms vs ORT's 17.5). The
    pool reads the setting once, when it is created (first parallel call in the process), so
    this runs when this module is imported; a process that only loads a compiled module calls
    it before running it."""
    _default_threads()
    return int(tvm.get_global_func("runtime.NumThreads")())


def _default_threads() -> None:
    global _THREADS_SET
    if not _THREADS_SET:
        _THREADS_SET = True
        if not (os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")):
            os.environ["TVM_NUM_THREADS"] = str(physical_cores())


_default_threads()  # before any kernel of this process creates TVM's pool

# --------------------------------------------------------------------------- kernel object


def as_tvm(a: np.ndarray) -> Any:
    """`a` as a CPU tvm tensor: the same memory where `a` is C-contiguous, writable and
    64-byte aligned (e.g. a numpy view of a tvm tensor), else a copy."""
    if a.flags.c_contiguous and a.flags.writeable and a.ctypes.data % 64 == 0 and a.size:
        try:
            return tvm.runtime.from_dlpack(a)
        except Exception:  # a dtype DLPack cannot carry: copy
            pass
    return tvm.runtime.tensor(np.ascontiguousarray(a))


def as_numpy(t: Any) -> np.ndarray:
    """A CPU tvm tensor as numpy: a view of its memory where DLPack allows, else a copy."""
    try:
        return np.from_dlpack(t)
    except Exception:
        return t.numpy()


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
        ws = [as_tvm(a) for a in self.weights.values()]
        for name, t in zip(list(self.weights), ws, strict=True):  # one copy: views of the tensors
            self.weights[name] = as_numpy(t)
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


def _packed(w: Any, cls: type, **params: Any) -> Any:
    """`w` packed as `cls(**params)`: reused as is when `w` already is such an instance
    (no unpack/repack of a large weight), else packed from the dense W[N, K]."""
    if isinstance(w, cls) and all(getattr(w, k) == v for k, v in params.items()):
        return w
    return cls.pack(_weight(w), **params)


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
    # is_scheduled: compile pipelines that schedule TIR (`cpu_schedule`, dlight) leave it as is
    prim = prim.with_attr("global_symbol", sym).with_attr("tirx.is_scheduled", True)
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


def _prefetch(ref, locality=3):
    """``prefetcht0`` (locality 3; 0 = ``prefetchnta``) of the cache line holding `ref`."""
    return T.evaluate(
        T.call_llvm_intrin(
            "void", "llvm.prefetch.p0", T.address_of(ref), T.int32(0), T.int32(locality), T.int32(1)
        )
    )


def _dense_func(M, N, K, mt, nmt, nb, ku, pf=0, pp=1):
    """Unblocked dense kernel: a task = one m tile x `pp` panels (``NP % pp == 0``), its
    panels streamed side by side (pp > 1: more independent streams and accumulator chains
    per thread, for M = 1)."""
    NP = -(-N // nb)
    NV = nb // 16
    KO, KT = K // ku, K % ku
    NTAIL = N - (NP - 1) * nb if N % nb else 0

    @T.macro
    def accumulate(acc, X, Wp, mo, p0, kk):  # acc += X[rows of m tile mo, kk] * the panels' row kk
        for g in T.unroll(pp):
            for i in T.unroll(mt):
                for v in T.unroll(NV):
                    acc[g, i, T.Ramp(v * 16, 1, 16)] = (
                        acc[g, i, T.Ramp(v * 16, 1, 16)]
                        + T.Broadcast(X[T.min(mo * mt + i, M - 1), kk], 16)
                        * Wp[p0 + g, kk, T.Ramp(v * 16, 1, 16)]
                    )

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        Wp: T.Buffer((NP, K, nb), "float32"),
        Y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for tp in T.parallel(nmt * (NP // pp)):
            acc = T.decl_buffer((pp, mt, nb), "float32")
            # consecutive tasks (one thread's static chunk) share a panel: it stays in L2 across m tiles
            mo = T.meta_var(tp % nmt)
            p0 = T.meta_var(tp // nmt * pp)
            for g in T.unroll(pp):
                for i in T.unroll(mt):
                    for v in T.unroll(NV):
                        acc[g, i, T.Ramp(v * 16, 1, 16)] = T.Broadcast(T.float32(0), 16)
            for ko in range(KO):
                if pf > 0:  # the panel rows pf inputs ahead, one prefetch per 64-byte line
                    for g in T.unroll(pp):
                        for q in T.unroll(ku * nb // 16):
                            _prefetch(Wp[p0 + g, T.min(ko * ku + pf + q * 16 // nb, K - 1), q * 16 % nb])
                for ki in T.unroll(ku):
                    accumulate(acc, X, Wp, mo, p0, ko * ku + ki)
            if KT > 0:
                for ki in T.unroll(KT):
                    accumulate(acc, X, Wp, mo, p0, KO * ku + ki)
            for g in T.unroll(pp):
                for i in T.unroll(mt):
                    if mo * mt + i < M:
                        if NTAIL > 0:
                            if p0 + g < NP - 1:
                                for v in T.unroll(NV):
                                    Y[mo * mt + i, T.Ramp((p0 + g) * nb + v * 16, 1, 16)] = acc[
                                        g, i, T.Ramp(v * 16, 1, 16)
                                    ]
                            else:
                                for q in range(NTAIL):
                                    Y[mo * mt + i, (p0 + g) * nb + q] = acc[g, i, q]
                        else:
                            for v in T.unroll(NV):
                                Y[mo * mt + i, T.Ramp((p0 + g) * nb + v * 16, 1, 16)] = acc[
                                    g, i, T.Ramp(v * 16, 1, 16)
                                ]

    return main


def _dense_kb_func(M, N, K, mt, nmt, nb, ku, kc):
    """K-blocked dense kernel: parallel over panels; per panel, per block of `kc` inputs,
    every m tile, so the panel's ``kc x nb`` block stays in L1/L2 across the m tiles and
    the panel's Y columns (``M x nb``, the running sums: zeroed by the first block, loaded
    and stored by later ones) stay in L2."""
    NP = -(-N // nb)
    NV = nb // 16
    NKB = -(-K // kc)
    NTAIL = N - (NP - 1) * nb if N % nb else 0

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        Wp: T.Buffer((NP, K, nb), "float32"),
        Y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for p in T.parallel(NP):
            acc = T.decl_buffer((mt, nb), "float32")
            for kb in range(NKB):
                for mo in range(nmt):
                    for i in T.unroll(mt):
                        if kb == 0:
                            for v in T.unroll(NV):
                                acc[i, T.Ramp(v * 16, 1, 16)] = T.Broadcast(T.float32(0), 16)
                        elif NTAIL > 0 and p == NP - 1:
                            for q in range(nb):
                                acc[i, q] = T.if_then_else(
                                    q < NTAIL,
                                    Y[T.min(mo * mt + i, M - 1), T.min(p * nb + q, N - 1)],
                                    T.float32(0),
                                )
                        else:
                            for v in T.unroll(NV):
                                acc[i, T.Ramp(v * 16, 1, 16)] = Y[
                                    T.min(mo * mt + i, M - 1), T.Ramp(p * nb + v * 16, 1, 16)
                                ]
                    for ko in range(T.min(kc, K - kb * kc) // ku):
                        for ki in T.unroll(ku):
                            for i in T.unroll(mt):
                                for v in T.unroll(NV):
                                    acc[i, T.Ramp(v * 16, 1, 16)] = (
                                        acc[i, T.Ramp(v * 16, 1, 16)]
                                        + T.Broadcast(
                                            X[T.min(mo * mt + i, M - 1), kb * kc + ko * ku + ki], 16
                                        )
                                        * Wp[p, kb * kc + ko * ku + ki, T.Ramp(v * 16, 1, 16)]
                                    )
                    for kt in range(T.min(kc, K - kb * kc) % ku):
                        for i in T.unroll(mt):
                            for v in T.unroll(NV):
                                acc[i, T.Ramp(v * 16, 1, 16)] = (
                                    acc[i, T.Ramp(v * 16, 1, 16)]
                                    + T.Broadcast(
                                        X[
                                            T.min(mo * mt + i, M - 1),
                                            kb * kc + T.min(kc, K - kb * kc) // ku * ku + kt,
                                        ],
                                        16,
                                    )
                                    * Wp[
                                        p,
                                        kb * kc + T.min(kc, K - kb * kc) // ku * ku + kt,
                                        T.Ramp(v * 16, 1, 16),
                                    ]
                                )
                    for i in T.unroll(mt):
                        if mo * mt + i < M:
                            if NTAIL > 0 and p == NP - 1:
                                for q in range(NTAIL):
                                    Y[mo * mt + i, p * nb + q] = acc[i, q]
                            else:
                                for v in T.unroll(NV):
                                    Y[mo * mt + i, T.Ramp(p * nb + v * 16, 1, 16)] = acc[
                                        i, T.Ramp(v * 16, 1, 16)
                                    ]

    return main


def pack_dense_panels(w: np.ndarray, nb: int) -> np.ndarray:
    """``Wp[ceil(N/nb), K, nb]`` with ``Wp[p, k, j] = W[p*nb + j, k]`` (zero beyond N)."""
    n, k = w.shape
    npan = -(-n // nb)
    pad = np.zeros((npan * nb, k), dtype=np.float32)
    pad[:n] = w
    return np.ascontiguousarray(pad.reshape(npan, nb, k).transpose(0, 2, 1))


def build_dense(w: Any, M: int, target: Any = None, schedule: Mapping[str, Any] | None = None) -> CPUKernel:
    """Dense packed-panel kernel. Schedule: ``m_tile`` (max rows of X per register tile;
    tiles are balanced), ``n_panel`` (outputs per panel, a multiple of 16), ``k_unroll``
    (default 4), ``k_block`` (inputs per K block, 0 = none: see `_dense_kb_func`; ignored
    when M fits one m tile: no m tile would reuse a block, e.g. at M = 1, where a K-blocked
    schedule had been picked by a noisy measurement),
    ``prefetch`` (software prefetch of the panel this many inputs ahead, unblocked kernel
    only; 0 = off, the default: on W 4096x11008 at M = 1 it made the cold kernel 15-25 %
    slower, the hardware prefetcher already follows the panel streams), ``panels`` (panels
    per parallel task, streamed side by side, unblocked kernel only, used where it divides
    the panel count; default 2 while that is at most 4 accumulators, i.e. M = 1 with 32-wide
    panels: Llama-7B layer's 8 weights at M = 1, 2 threads, cold, interleaved, 5 runs on a
    busy VM: 0.95-1.0x the time of 1 panel per task, median 0.975; 1.01x single-threaded).

    Defaults: M < 64: 8 x 32 tiles (16 zmm accumulators; 8 x 64 spills), no K blocks (a
    task streams its panel over all of K). M >= 64 (compute-bound): 6 x 64 tiles (24
    accumulators, 4 loads + 6 broadcasts per 24 FMAs) and K blocks of 512: without them a
    panel (K x nb, 2.8 MB at K = 11008) is re-read from L3 by every m tile; with them the
    task's Y panel (M x nb) stays in L2 and the 128 KB block is reused by all m tiles.
    Single-threaded CPU time at M = 512 on W 11008x4096 (Zen 5, ORT = 1.00): 8 x 32
    unblocked 0.88, 6 x 64 unblocked 0.90, 6 x 64 / 512 1.00, 4 x 96 / 512 1.01; K blocks
    of 128-256 lose (0.90-0.97: Y reloads), a K-block-outer loop order lost too (0.80: Y,
    8 MB, streamed from L3 once per block)."""
    a = _weight(w)
    M = _check_m(M)
    target = _resolve_target(target)
    n, k = a.shape
    big = M >= 64
    sch = _merge_schedule(
        {"m_tile": 6 if big else 8, "n_panel": 64 if big else 32, "k_unroll": 4, "prefetch": 0,
         "k_block": 512 if big else 0, "panels": None},
        schedule,
        "dense",
    )  # fmt: skip
    nb, ku = int(sch["n_panel"]), max(1, int(sch["k_unroll"]))
    kc = int(sch["k_block"] or 0)
    if nb < 16 or nb % 16:
        raise ValueError(f"dense n_panel must be a positive multiple of 16; got {nb}")
    if kc < 0:
        raise ValueError(f"dense k_block must be >= 0; got {kc}")
    nmt, mt = _m_tiles(M, sch["m_tile"])
    pf = int(sch["prefetch"] or 0)
    if kc >= k or nmt == 1:  # K blocks pay only when several m tiles reuse a block
        kc = 0
    npan = -(-n // nb)
    pp = sch["panels"]
    if pp is None:  # 2 panels per task while that stays at <= 4 accumulators (M = 1 at nb <= 32)
        pp = 2 if mt * (nb // 16) <= 2 else 1
    pp = max(1, int(pp))
    if kc or npan % pp:
        pp = 1
    sch.update(n_panel=nb, k_unroll=ku, m_tile_used=mt, m_tiles=nmt, prefetch=pf, k_block=kc, panels=pp)
    if kc:
        prim = _dense_kb_func(M, n, k, mt, nmt, nb, ku, kc)
    else:
        prim = _dense_func(M, n, k, mt, nmt, nb, ku, pf, pp)
    return _finish("dense", "dense", prim, (M, n, k), {"Wp": pack_dense_panels(a, nb)}, sch, target)


# --------------------------------------------------------------------------- CSR


def _csr_gather_func(M, N, K, S, idt, avx512, pf=0):
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
                if pf > 0:
                    _prefetch(V[T.min(j * 16 + pf, S - 1)])
                    _prefetch(C[T.min(j * 16 + pf, S - 1)])
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


def _csr_xt_func(M, N, K, S, idt, mt, nmt, nacc, nch, rb, pf):
    """CSR with X transposed in-kernel to ``XT[nmt, K, mt]``; rows vectorised over M.

    ``nch`` > 1: the CSR arrays are split into column chunks (``P[c * (N + 1) + r]``), each
    chunk's rows padded to 16; a task (``rb`` rows) runs chunk by chunk so the XT chunk and
    the rows' chunk data stay in L2, accumulating in a ``[rb, nmt * mt]`` scratch."""
    NRB = -(-N // rb)
    MP = nmt * mt
    RB = rb
    NCH = nch
    KB = -(-K // 16)
    # accumulate in a [rows, M] scratch and write Y i-major at the end when chunked, or when M
    # is large: per-row strided stores of M outputs (stride N floats; N = 4096 puts them all
    # in one L1 set) took 10.7 ms at M=512, N=4096 against 1.2 ms for N=4000
    SCR = NCH > 1 or MP > 16

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        V: T.Buffer((S,), "float32"),
        C: T.Buffer((S,), idt),
        P: T.Buffer((NCH * (N + 1),), "int32"),
        Y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        XT = T.decl_buffer((nmt, K, mt), "float32")
        # transpose in 16-input strips: each row of X is read 64 contiguous bytes at a time
        # (a column-at-a-time loop touched M cache lines per input: ~11 ms at M=512, K=4096)
        for kb in T.parallel(KB):
            for t in range(nmt):
                for i in range(mt):
                    for kk in T.unroll(16):
                        if kb * 16 + kk < K:
                            XT[t, kb * 16 + kk, i] = T.if_then_else(
                                t * mt + i < M, X[T.min(t * mt + i, M - 1), kb * 16 + kk], T.float32(0)
                            )
        # chunk accumulator, allocated once per call: a per-task decl_buffer of this size is a
        # workspace allocation per task (measured ~15 us each at M=512)
        YA = T.decl_buffer((NRB * RB * MP if SCR else 1,), "float32")
        for b in T.parallel(NRB):
            acc = T.decl_buffer((nacc, mt), "float32")
            for c in range(NCH):
                for t in range(nmt):
                    for rr in range(RB):
                        if b * RB + rr < N:
                            for a in T.unroll(nacc):
                                acc[a, _V(0, mt)] = _zero(mt)
                            for j in range(
                                P[c * (N + 1) + b * RB + rr] // 16, P[c * (N + 1) + b * RB + rr + 1] // 16
                            ):
                                if pf > 0:
                                    _prefetch(V[T.min(j * 16 + pf, S - 1)])
                                    _prefetch(C[T.min(j * 16 + pf, S - 1)])
                                for u in T.unroll(16):
                                    acc[u % nacc, _V(0, mt)] = (
                                        acc[u % nacc, _V(0, mt)]
                                        + _B(V[j * 16 + u], mt)
                                        * XT[t, T.Cast("int32", C[j * 16 + u]), _V(0, mt)]
                                    )
                            for a in T.unroll(nacc - 1):
                                acc[0, _V(0, mt)] = acc[0, _V(0, mt)] + acc[a + 1, _V(0, mt)]
                            if not SCR:
                                for i in range(mt):
                                    if t * mt + i < M:
                                        Y[t * mt + i, b * RB + rr] = acc[0, i]
                            else:
                                if c == 0:
                                    YA[_V((b * RB + rr) * MP + t * mt, mt)] = acc[0, _V(0, mt)]
                                else:
                                    YA[_V((b * RB + rr) * MP + t * mt, mt)] = (
                                        YA[_V((b * RB + rr) * MP + t * mt, mt)] + acc[0, _V(0, mt)]
                                    )
            if SCR:
                for i in range(M):
                    for rr in range(RB):
                        if b * RB + rr < N:
                            Y[i, b * RB + rr] = YA[(b * RB + rr) * MP + i]

    return main


def chunk_csr(csr: fmts.CSR, kc: int, pad: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a CSR by column chunks of width `kc`: (values, columns, pointers) in
    [chunk][row] order, each (chunk, row) segment padded to `pad` entries (value 0,
    column 0), pointers ``P[c * (N + 1) + r]`` (int64; segment c, r ends at ``P[.. + r + 1]``)."""
    n, k = csr.shape
    nch = -(-k // kc)
    ptr = np.asarray(csr.indptr, dtype=np.int64)
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(ptr))
    keep = np.asarray(csr.values) != 0  # drops the row padding (stored zeros are padding only)
    rows, cols, vals = (
        rows[keep],
        np.asarray(csr.indices)[keep].astype(np.int64),
        np.asarray(csr.values)[keep],
    )
    ch = cols // kc
    # stable radix sort on the small chunk ids: rows stay ascending, columns too within a row
    order = np.argsort(ch.astype(np.uint16 if nch < 65536 else np.int64), kind="stable")
    seg = (ch * n + rows)[order]
    cols, vals = cols[order], vals[order]
    counts = np.bincount(seg, minlength=nch * n)
    start = np.concatenate([[0], np.cumsum(counts)])
    seg_ptr = np.concatenate([[0], np.cumsum(-(-counts // pad) * pad)])
    pos = seg_ptr[seg] + (np.arange(seg.size) - start[seg])
    values = np.zeros(int(seg_ptr[-1]), np.float32)
    values[pos] = vals
    columns = np.zeros(int(seg_ptr[-1]), np.int64)
    columns[pos] = cols
    p = np.concatenate([seg_ptr[c * n : c * n + n + 1] for c in range(nch)])
    return values, columns, p


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def build_csr(w: Any, M: int, target: Any = None, schedule: Mapping[str, Any] | None = None) -> CPUKernel:
    """CSR (rows padded to 16) kernel. Schedule: ``variant`` (``"gather"`` or ``"xt"``;
    default gather for M <= ``gather_max_m`` = 1), ``m_tile`` (xt: max M lanes per pass,
    default 64), ``n_acc`` (xt: interleaved accumulators, default 8 chains up to 8 zmm
    registers: 8 for <= 16 lanes, 4 for 32, 2 for 64), ``k_chunk`` (xt:
    column chunk width, 0 = whole rows; default: whole rows while ``K * lanes * 4`` bytes
    of XT fit 512 KiB of L2, else 2048), ``row_block`` (xt: rows per parallel task,
    default 16 for M <= 16, else 64), ``prefetch`` (entries ahead to prefetch in the value/index streams; 0 =
    off; default 512 for xt, 1024 for gather)."""
    csr = _packed(w, fmts.CSR, pad=16)
    M = _check_m(M)
    target = _resolve_target(target)
    n, k = csr.shape
    sch = _merge_schedule(
        {"variant": None, "gather_max_m": 1, "m_tile": 64, "n_acc": None, "k_chunk": None, "row_block": None,
         "prefetch": None},
        schedule,
        "csr",
    )  # fmt: skip
    variant = sch["variant"] or ("gather" if M <= int(sch["gather_max_m"]) else "xt")
    if variant not in ("gather", "xt"):
        raise ValueError(f"csr variant must be 'gather' or 'xt'; got {variant!r}")
    idt = "uint16" if k <= 65536 else "int32"
    avx512 = _avx512(target)
    sch["variant"] = variant
    if variant == "gather":
        pf = int(1024 if sch["prefetch"] is None else sch["prefetch"])
        values = _nonempty(np.asarray(csr.values, dtype=np.float32))
        cols = _nonempty(np.asarray(csr.indices).astype(idt))
        ptr = np.asarray(csr.indptr).astype(np.int32)
        sch.update(avx512_gather=avx512, prefetch=pf)
        prim = _csr_gather_func(M, n, k, values.shape[0], idt, avx512, pf)
    else:
        nmt, mt = _m_tiles(M, max(1, int(sch["m_tile"])))
        # lanes per pass: a power of two up to 16, else a multiple of 16 (XT is zero-padded)
        mt = _pow2_at_least(mt) if mt <= 16 else -(-mt // 16) * 16
        # accumulators: 8 interleaved chains, at most 8 zmm registers of them
        nacc = int(sch["n_acc"] or max(1, min(8, 128 // max(16, mt))))
        nacc = max(1, min(16, nacc))
        while 16 % nacc:
            nacc -= 1
        kc = sch["k_chunk"]
        if kc is None:  # XT rows come from L2 at random: chunk K once XT outgrows half of it
            kc = 0 if k * mt * 4 <= 512 * 1024 else 2048
        kc = int(kc)
        if kc <= 0 or kc >= k:
            kc = 0
        pf = int(512 if sch["prefetch"] is None else sch["prefetch"])
        # more rows per task at large M: the final i-major write of Y covers longer row pieces
        rb = max(1, int(sch["row_block"] or (16 if M <= 16 else 64)))
        if kc:
            values, cols, ptr = chunk_csr(csr, kc)
            values, cols = _nonempty(values), _nonempty(cols.astype(idt))
            ptr = ptr.astype(np.int32)
        else:
            values = _nonempty(np.asarray(csr.values, dtype=np.float32))
            cols = _nonempty(np.asarray(csr.indices).astype(idt))
            ptr = np.asarray(csr.indptr).astype(np.int32)
        nch = ptr.shape[0] // (n + 1)
        sch.update(m_tile_used=mt, m_tiles=nmt, n_acc=nacc, k_chunk=kc, row_block=rb, prefetch=pf)
        prim = _csr_xt_func(M, n, k, values.shape[0], idt, mt, nmt, nacc, nch, rb, pf)
    weights = {"values": values, "indices": cols, "indptr": ptr}
    return _finish("csr", f"csr_{variant}", prim, (M, n, k), weights, sch, target)


# --------------------------------------------------------------------------- BSR


def _bsr_r_func(M, N, K, NB, r, c, idt, mt, nmt, nch, rb, pf=0):
    """Vectorised over the r outputs of a block. Parallel over groups of `rb` block rows;
    per column chunk (`nch` > 1: blocks in [chunk][block row] order, Y accumulated chunk by
    chunk), per m tile, per block row: ``acc[i, 0:r] += D[e, j, 0:r] * x[i, col + j]``."""
    NBR = N // r
    NRB = -(-NBR // rb)
    RB = rb
    NCH = nch

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        D: T.Buffer((NB, c, r), "float32"),
        IND: T.Buffer((NB,), idt),
        P: T.Buffer((NCH * (NBR + 1),), "int32"),
        Y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        DF = T.decl_buffer((NB * c * r,), "float32", data=D.data)
        for b in T.parallel(NRB):
            acc = T.decl_buffer((mt, r), "float32")
            for ch in range(NCH):
                for t in range(nmt):
                    for rr in range(RB):
                        if b * RB + rr < NBR:
                            for i in T.unroll(mt):
                                acc[i, _V(0, r)] = _zero(r)
                            for e in range(
                                P[ch * (NBR + 1) + b * RB + rr], P[ch * (NBR + 1) + b * RB + rr + 1]
                            ):
                                if pf > 0:
                                    _prefetch(IND[T.min(e + pf // (c * r), NB - 1)])
                                for j in _loop(c):
                                    if pf > 0:
                                        for q in T.unroll(-(-r // 16)):
                                            _prefetch(
                                                DF[T.min((e * c + j) * r + q * 16 + pf, NB * c * r - 1)]
                                            )
                                    for i in T.unroll(mt):
                                        acc[i, _V(0, r)] = acc[i, _V(0, r)] + D[e, j, _V(0, r)] * _B(
                                            X[T.min(t * mt + i, M - 1), T.Cast("int32", IND[e]) * c + j], r
                                        )
                            for i in T.unroll(mt):
                                if t * mt + i < M:
                                    if NCH == 1:
                                        Y[t * mt + i, _V((b * RB + rr) * r, r)] = acc[i, _V(0, r)]
                                    elif ch == 0:
                                        Y[t * mt + i, _V((b * RB + rr) * r, r)] = acc[i, _V(0, r)]
                                    else:
                                        Y[t * mt + i, _V((b * RB + rr) * r, r)] = (
                                            Y[t * mt + i, _V((b * RB + rr) * r, r)] + acc[i, _V(0, r)]
                                        )

    return main


def _bsr_c_func(M, N, K, NB, r, c, idt, mt, nmt, nch, rb, pf=0):
    """Vectorised over the c inputs of a block (data ``[B, r, c]``): ``acc[i, q, 0:c] +=
    D[e, q, 0:c] * x[i, col:col + c]``, horizontal sums per row at the end; same loop
    nest as `_bsr_r_func`."""
    NBR = N // r
    NRB = -(-NBR // rb)
    RB = rb
    NCH = nch

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        D: T.Buffer((NB, r, c), "float32"),
        IND: T.Buffer((NB,), idt),
        P: T.Buffer((NCH * (NBR + 1),), "int32"),
        Y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        DF = T.decl_buffer((NB * r * c,), "float32", data=D.data)
        for b in T.parallel(NRB):
            acc = T.decl_buffer((mt, r, c), "float32")
            xb = T.decl_buffer((c,), "float32")
            for ch in range(NCH):
                for t in range(nmt):
                    for rr in range(RB):
                        if b * RB + rr < NBR:
                            for i in T.unroll(mt):
                                for q in T.unroll(r):
                                    acc[i, q, T.Ramp(0, 1, c)] = T.Broadcast(T.float32(0), c)
                            for e in range(
                                P[ch * (NBR + 1) + b * RB + rr], P[ch * (NBR + 1) + b * RB + rr + 1]
                            ):
                                if pf > 0:
                                    _prefetch(IND[T.min(e + pf // (c * r), NB - 1)])
                                    for q in T.unroll(-(-(r * c) // 16)):
                                        _prefetch(DF[T.min(e * r * c + q * 16 + pf, NB * r * c - 1)])
                                for i in T.unroll(mt):
                                    xb[T.Ramp(0, 1, c)] = X[
                                        T.min(t * mt + i, M - 1), T.Ramp(T.Cast("int32", IND[e]) * c, 1, c)
                                    ]
                                    for q in T.unroll(r):
                                        acc[i, q, T.Ramp(0, 1, c)] = (
                                            acc[i, q, T.Ramp(0, 1, c)]
                                            + D[e, q, T.Ramp(0, 1, c)] * xb[T.Ramp(0, 1, c)]
                                        )
                            for i in T.unroll(mt):
                                if t * mt + i < M:
                                    for q in T.unroll(r):
                                        if NCH == 1:
                                            Y[t * mt + i, (b * RB + rr) * r + q] = _hsum(
                                                acc[i, q, T.Ramp(0, 1, c)], c
                                            )
                                        elif ch == 0:
                                            Y[t * mt + i, (b * RB + rr) * r + q] = _hsum(
                                                acc[i, q, T.Ramp(0, 1, c)], c
                                            )
                                        else:
                                            Y[t * mt + i, (b * RB + rr) * r + q] = Y[
                                                t * mt + i, (b * RB + rr) * r + q
                                            ] + _hsum(acc[i, q, T.Ramp(0, 1, c)], c)

    return main


def chunk_bsr(bsr: fmts.BSR, chunk_blocks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks of a BSR reordered by column chunk (`chunk_blocks` block columns each), then
    block row: (block order, indices, pointers ``P[ch * (N // r + 1) + br]``)."""
    n, _ = bsr.shape
    r, _ = bsr.block
    nbr = n // r
    nbc = bsr.shape[1] // bsr.block[1]
    nch = -(-nbc // chunk_blocks)
    ptr = np.asarray(bsr.indptr, dtype=np.int64)
    rows = np.repeat(np.arange(nbr, dtype=np.int64), np.diff(ptr))
    ind = np.asarray(bsr.indices).astype(np.int64)
    ch = ind // chunk_blocks
    order = np.argsort(ch.astype(np.uint16 if nch < 65536 else np.int64), kind="stable")
    seg = ch * nbr + rows
    counts = np.bincount(seg, minlength=nch * nbr)
    seg_ptr = np.concatenate([[0], np.cumsum(counts)])
    p = np.concatenate([seg_ptr[ch * nbr : ch * nbr + nbr + 1] for ch in range(nch)])
    return order, ind[order], p


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
    default about 16 zmm of accumulators; 8 for chunked "c"), ``k_chunk`` (inputs per
    column chunk, rounded to whole blocks; 0 = none; default 1024 for variant "c" at
    M >= 4 so an m tile's X chunk stays in L1, else 0), ``row_block`` (block rows per
    parallel task; default 256 // r outputs' worth, 128 // r when chunked), ``prefetch``
    (software prefetch distance in floats of block data, 0 = off; default 2048 for
    M <= 16 and blocks of < 256 entries, else 0)."""
    bsr = _packed(w, fmts.BSR, block=tuple(int(b) for b in block))
    M = _check_m(M)
    target = _resolve_target(target)
    n, k = bsr.shape
    r, c = bsr.block
    sch = _merge_schedule(
        {"variant": None, "m_tile": None, "k_chunk": None, "row_block": None, "prefetch": None},
        schedule,
        "bsr",
    )
    variant = sch["variant"] or ("c" if r < 8 <= c else "r")
    if variant not in ("r", "c"):
        raise ValueError(f"bsr variant must be 'r' or 'c'; got {variant!r}")
    if variant == "c" and c == 1:
        raise ValueError("bsr variant 'c' needs c >= 2")
    data = np.asarray(bsr.data, dtype=np.float32)  # [B, c, r]
    if variant == "c":
        data = np.ascontiguousarray(data.transpose(0, 2, 1))  # [B, r, c]
    regs_per_row = -(-r // 16) if variant == "r" else r * -(-c // 16)
    # "c" reads a zmm of X per block and m: chunk K so an m tile of X stays in L1 (at M = 8
    # on W 4096x11008, 1x16 at 70 %: 4.9 -> 2.1 ms single-threaded, cold)
    chunked = variant == "c" and M >= 4
    m_tile = sch["m_tile"] or (8 if chunked else max(1, 16 // regs_per_row))
    nmt, mt = _m_tiles(M, m_tile)
    kc = sch["k_chunk"]
    kc = int((1024 if chunked else 0) if kc is None else kc)
    cb = max(1, kc // c) if kc > 0 else 0  # block columns per chunk
    if cb and cb >= k // c:
        cb = 0
    rb = max(1, int(sch["row_block"] or max(1, (128 if chunked else 256) // r)))
    # software prefetch distance (floats of data; 0 = off): for streaming-bound M and small
    # blocks (16x1 at M = 8: 4.4 -> 1.8 ms); 32x32 blocks are long contiguous runs the
    # hardware prefetcher already follows, and the prefetches cost (1.26 -> 1.47 ms at M = 1)
    pf = int((2048 if M <= 16 and r * c < 256 else 0) if sch["prefetch"] is None else sch["prefetch"])
    sch.update(variant=variant, block=(r, c), m_tile=m_tile, m_tile_used=mt, m_tiles=nmt, k_chunk=cb * c,
               row_block=rb, prefetch=pf)  # fmt: skip
    idt = str(bsr.indices.dtype)
    ind = np.asarray(bsr.indices)
    ptr = np.asarray(bsr.indptr).astype(np.int32)
    if cb:
        order, ind, ptr = chunk_bsr(bsr, cb)
        data = np.ascontiguousarray(data[order])
        ind, ptr = ind.astype(idt), ptr.astype(np.int32)
    nch = ptr.shape[0] // (n // r + 1)
    data = _nonempty(data, 1)
    ind = _nonempty(ind, 1)
    func = _bsr_r_func if variant == "r" else _bsr_c_func
    prim = func(M, n, k, data.shape[0], r, c, idt, mt, nmt, nch, rb, pf)
    weights = {"data": data, "indices": ind, "indptr": ptr}
    return _finish("bsr", f"bsr_{r}x{c}_{variant}", prim, (M, n, k), weights, sch, target)


# --------------------------------------------------------------------------- Bitmap


def _bitmap_func(M, N, K, NV, ku, mt, nmt, fence, pf=0):
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
            off = T.decl_buffer((1,), "int64")  # int64: no sign extension on the offset chain
            for t in range(nmt):
                for a in T.unroll(ku):
                    for i in T.unroll(mt):
                        acc[a, i, T.Ramp(0, 1, 16)] = T.Broadcast(T.float32(0), 16)
                off[0] = T.Cast("int64", GP[g])
                for ko in range(KO):
                    if pf > 0:
                        _prefetch(VAL[T.min(off[0] + T.int64(pf), T.int64(NV - 1))])
                        _prefetch(MK[g, T.min(ko * ku + pf // 4, K - 1)])
                    for a in T.unroll(ku):
                        vb[a, T.Ramp(0, 1, 16)] = _expand16(
                            VAL[T.Ramp(off[0], T.int64(1), 16)],
                            _mask16(T.Cast("int32", MK[g, ko * ku + a])),
                            fence,
                        )
                        off[0] = off[0] + T.Cast("int64", T.popcount(T.Cast("int32", MK[g, ko * ku + a])))
                        for i in T.unroll(mt):
                            acc[a, i, T.Ramp(0, 1, 16)] = acc[a, i, T.Ramp(0, 1, 16)] + vb[
                                a, T.Ramp(0, 1, 16)
                            ] * T.Broadcast(X[T.min(t * mt + i, M - 1), ko * ku + a], 16)
                if KT > 0:
                    for a in T.unroll(KT):
                        vb[0, T.Ramp(0, 1, 16)] = _expand16(
                            VAL[T.Ramp(off[0], T.int64(1), 16)],
                            _mask16(T.Cast("int32", MK[g, KO * ku + a])),
                            fence,
                        )
                        off[0] = off[0] + T.Cast("int64", T.popcount(T.Cast("int32", MK[g, KO * ku + a])))
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
    ``m_tile`` (rows of X per pass over the masks, default 16 // k_unroll), ``expand``
    (``"reg"`` / ``"mem"``), ``prefetch`` (software prefetch distance in values, masks
    prefetched a quarter as many inputs ahead; 0 = off; default 2048: cold, it took M = 8
    at 70 % from 3.8 to 1.9 ms and M = 1 from 1.6 to 1.3 ms on W 4096x11008)."""
    M = _check_m(M)
    target = _resolve_target(target)
    if not _avx512(target):
        raise fmts.UnfitError("the bitmap kernel needs AVX-512 (vexpandps); this target has none")
    bm = _packed(w, fmts.Bitmap, group=16)
    n, k = bm.shape
    sch = _merge_schedule(
        {"k_unroll": None, "m_tile": None, "expand": "reg", "prefetch": 2048}, schedule, "bitmap"
    )
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
    prim = _bitmap_func(
        M, n, k, values.shape[0], ku, mt, nmt, sch["expand"] == "reg", int(sch["prefetch"] or 0)
    )
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
    nm = _packed(w, fmts.NM, n=int(n), m=int(m))
    M = _check_m(M)
    target = _resolve_target(target)
    rows, k = nm.shape
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


# --------------------------------------------------------------------------- tuning space

#: Per format, a few schedules worth timing (for a tuner such as `dispatch.Dispatcher`),
#: best first: the first entry is always ``{}`` (the builder's M-dependent defaults, which
#: are what the cold-cache benchmark measured best), so trying only the first
#: ``tune_trials`` entries still includes the defaults. Every entry is valid at every M;
#: keys that do not apply to the variant a builder picks for that M are ignored.
SCHEDULE_SPACE: dict[str, list[dict[str, Any]]] = {
    "dense": [
        {},
        # 24 accumulators; best at M = 8..64 (K blocks only where M spans several m tiles)
        {"m_tile": 4, "n_panel": 96, "k_block": 512},
        {"m_tile": 6, "n_panel": 64, "k_block": 0},
        {"m_tile": 6, "n_panel": 64, "k_block": 768},
        {"m_tile": 16, "n_panel": 16, "k_block": 0},
    ],
    "csr": [
        {},
        {"m_tile": 32, "n_acc": 4},  # xt: half-width M tiles (M >= 64)
        {"k_chunk": 1024},  # xt: smaller column chunks
        {"prefetch": 0},
        {"n_acc": 4, "prefetch": 2048},
    ],
    "bitmap": [
        {},
        {"k_unroll": 2},
        {"prefetch": 1024},
        {"prefetch": 0},
    ],
    "bsr": [
        {},
        {"m_tile": 8},
        {"prefetch": 0},
        {"k_chunk": 1024},
        {"row_block": 4},
    ],
    "nm": [
        {},
        {"m_tile": 4},
        {"m_tile": 16},
    ],
}
