"""Fused activation-sparse (sparse-input) fp32 kernels for x86 CPUs.

``Y[M, N] = where(|X| > T, X, 0) @ W`` with ``X[M, K]``, ``T`` a threshold per input channel
(``[K]``; a scalar threshold is broadcast) and a constant ``W`` given in the ONNX orientation
``W_onnx[K, N]`` (rows = input channels). For decode (M = 1..8) only the input channels with
an active entry matter: a channel ``k`` is *active* when ``|X[m, k]| > T[k]`` for some row
``m`` (the union over the M rows), and the kernel reads only the active channels' rows of W.
This is TEAL's decode kernel (Liu et al., "Training-Free Activation Sparsity in Large
Language Models", 2024: magnitude thresholds per tensor, a GEMV that skips the weight
columns of zero activations) with the union over a small batch.

One PrimFunc, two phases:

1. *compaction* (serial, ~1 ns per channel): for each k, write ``XS[c, 0:M] = where(|X[:, k]|
   > T[k], X[:, k], 0)`` and ``IDX[c] = k`` and advance ``c`` if any row is active
   (branch-free); ``c`` ends as the number of active channels.
2. *accumulation* (``T.parallel`` over tiles of outputs), one of three W layouts
   (``schedule["layout"]``), each contiguous per input channel:

   * ``rows`` (default): W as ONNX stores it; a task of ``tile`` outputs adds
     ``XS[j, i] * W[IDX[j], tile]`` (``k_unroll`` channels per step) into an accumulator
     ``[M, tile]`` (at M = 1 and the default 256 outputs: 16 zmm registers), with a software
     prefetch of the rows ``prefetch`` steps ahead (the hardware prefetcher cannot follow the gaps);
   * ``strips``: W packed as column strips ``Ws[N/tile, K, tile]``, same loop: a task then
     streams one strip in increasing address order, skipping inactive channels' rows;
   * ``panel``: the dense kernel's ``Wp[N/nb, K, nb]`` (`cpu_kernels.pack_dense_panels`)
     with register accumulators (``m_tile`` rows x nb outputs); when M needs several m
     tiles the active channels are walked in chunks of ``j_chunk`` so a chunk's rows stay
     in L1 for every m tile.

   With every channel active each does the dense kernel's work plus an index load per
   channel. Which layout is fastest depends on M and the machine: the Relax rewrite
   (`act_sparse_rewrite`) times the candidates and keeps the fastest.

Weight-sparse variant (``build_act_bitmap``): each panel row is itself stored as 16-output
bitmaps (``nb / 16`` uint16 masks per (panel, channel), the nonzeros packed in (panel,
channel, group, lane) order, an int32 offset per (panel, channel) so channels can be
skipped); per active channel and group, a register ``vexpandps`` rebuilds the 16 lanes
(`cpu_kernels` bitmap kernel's expand). Bytes read scale with (active channels) x (weight
density).

Both builders return a `cpu_kernels.CPUKernel` whose first weight array is the threshold
vector ``T[K]`` (so ``kernel.weights`` is what a Relax ``call_tir`` passes after X).

Measured (`benchmarks/act_kernels.py`, cold cache, 2 threads, 2026-11-26 07:44 UTC on a shared
2-core Zen 5 guest, load 0.9-1.7): M = 1 vs onnxruntime dense, W 4096x11008 / 11008x4096:
2.06x / 1.88x at 50 % activation sparsity, 3.81x / 3.37x at 70 %, 11.4x / 9.3x at 90 %;
vs our dense kernel 1.80x / 1.75x at 50 %. The rows layout's 256-output tile (16 register
accumulators, k_unroll 4) made the difference: the earlier 512-output tile (accumulator in L1, a rolled
loop) was 2.38x / 2.73x at 70 %. With every channel active the fused kernel is 0.95x our dense
kernel at M = 1 (index indirection), which is why the rewrite guards with a denser input.
M = 4 with independent rows: the union is 0.93 of the channels at 50 %, and the fused kernels
reach 0.70-0.91x dense up to 70 %, so dispatch keeps dense there. The weight-sparse variant beat the
weight-only bitmap kernel only at 70 % activation sparsity (1.6x); at 50 % 1.0-1.06x.
Weights on 2 MB pages (`hugepages.py`) gave 0-4 % on top (strips: 2-17 %).
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from tvm.script import tirx as T

from sparsegraph.codegen import cpu_kernels as ck

__all__ = [
    "act_sparse_rewrite",
    "build_act_bitmap",
    "build_act_dense",
    "decision_key",
    "reference",
    "thresholds",
]


def thresholds(t: Any, k: int) -> np.ndarray:
    """A scalar or ``[K]`` (or broadcastable to ``[K]``) threshold as float32 ``[K]``."""
    a = np.asarray(t, dtype=np.float32)
    if a.size == 1:
        return np.full(k, float(a.reshape(-1)[0]), dtype=np.float32)
    a = a.reshape(-1)
    if a.size != k:
        raise ValueError(f"threshold must be a scalar or have K={k} entries; got shape {np.shape(t)}")
    return np.ascontiguousarray(a)


def reference(x: np.ndarray, t: Any, w_onnx: np.ndarray) -> np.ndarray:
    """numpy reference: ``where(|x| > t, x, 0) @ w_onnx`` (float64 accumulate)."""
    tk = thresholds(t, x.shape[-1])
    xs = np.where(np.abs(x) > tk, x, 0).astype(np.float64)
    return (xs @ w_onnx.astype(np.float64)).astype(np.float32)


@T.macro(hygienic=False)
def _compact(M, K, X, TH, IDX, XS, CNT):
    """Phase 1 (shared by both kernels): IDX/XS of the active channels, count in CNT[0]."""
    CNT[0] = 0
    for k in range(K):
        for i in T.unroll(M):
            XS[CNT[0], i] = T.if_then_else(T.fabs(X[i, k]) > TH[k], X[i, k], T.float32(0))
        IDX[CNT[0]] = k
        CNT[0] = CNT[0] + _any_active(M, X, TH, k)


def _any_active(M, X, TH, k):
    e = T.Cast("int32", T.fabs(X[0, k]) > TH[k])
    for i in range(1, M):
        e = T.max(e, T.Cast("int32", T.fabs(X[i, k]) > TH[k]))
    return e


def _act_dense_func(M, N, K, nb, mt, nmt, jc, pf):
    NP = -(-N // nb)
    NV = nb // 16
    NTAIL = N - (NP - 1) * nb if N % nb else 0
    LINES = nb // 16  # 64-byte lines per panel row
    CH = nmt > 1

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        TH: T.Buffer((K,), "float32"),
        Wp: T.Buffer((NP, K, nb), "float32"),
        Y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        IDX = T.decl_buffer((K + 1,), "int32")
        XS = T.decl_buffer((K + 1, M), "float32")
        CNT = T.decl_buffer((1,), "int32")
        _compact(M, K, X, TH, IDX, XS, CNT)
        for p in T.parallel(NP):
            acc = T.decl_buffer((mt, nb), "float32")
            part = T.decl_buffer((nmt * mt, nb), "float32")
            if CH:
                for i in range(nmt * mt):
                    for v in T.unroll(NV):
                        part[i, T.Ramp(v * 16, 1, 16)] = T.Broadcast(T.float32(0), 16)
                for c in range((CNT[0] + jc - 1) // jc):
                    for t in range(nmt):
                        for i in T.unroll(mt):
                            for v in T.unroll(NV):
                                acc[i, T.Ramp(v * 16, 1, 16)] = part[t * mt + i, T.Ramp(v * 16, 1, 16)]
                        for j in range(c * jc, T.min(CNT[0], c * jc + jc)):
                            if pf > 0:
                                if t == 0:
                                    for q in T.unroll(LINES):
                                        ck._prefetch(Wp[p, IDX[T.min(j + pf, CNT[0] - 1)], q * 16])
                            for i in T.unroll(mt):
                                for v in T.unroll(NV):
                                    acc[i, T.Ramp(v * 16, 1, 16)] = (
                                        acc[i, T.Ramp(v * 16, 1, 16)]
                                        + T.Broadcast(XS[j, T.min(t * mt + i, M - 1)], 16)
                                        * Wp[p, IDX[j], T.Ramp(v * 16, 1, 16)]
                                    )
                        for i in T.unroll(mt):
                            for v in T.unroll(NV):
                                part[t * mt + i, T.Ramp(v * 16, 1, 16)] = acc[i, T.Ramp(v * 16, 1, 16)]
                for i in range(M):
                    if NTAIL > 0:
                        if p < NP - 1:
                            for v in T.unroll(NV):
                                Y[i, T.Ramp(p * nb + v * 16, 1, 16)] = part[i, T.Ramp(v * 16, 1, 16)]
                        else:
                            for q in range(NTAIL):
                                Y[i, p * nb + q] = part[i, q]
                    else:
                        for v in T.unroll(NV):
                            Y[i, T.Ramp(p * nb + v * 16, 1, 16)] = part[i, T.Ramp(v * 16, 1, 16)]
            else:
                for i in T.unroll(mt):
                    for v in T.unroll(NV):
                        acc[i, T.Ramp(v * 16, 1, 16)] = T.Broadcast(T.float32(0), 16)
                for j in range(CNT[0]):
                    if pf > 0:
                        for q in T.unroll(LINES):
                            ck._prefetch(Wp[p, IDX[T.min(j + pf, CNT[0] - 1)], q * 16])
                    for i in T.unroll(mt):
                        for v in T.unroll(NV):
                            acc[i, T.Ramp(v * 16, 1, 16)] = (
                                acc[i, T.Ramp(v * 16, 1, 16)]
                                + T.Broadcast(XS[j, i], 16) * Wp[p, IDX[j], T.Ramp(v * 16, 1, 16)]
                            )
                for i in T.unroll(mt):
                    if NTAIL > 0:
                        if p < NP - 1:
                            for v in T.unroll(NV):
                                Y[i, T.Ramp(p * nb + v * 16, 1, 16)] = acc[i, T.Ramp(v * 16, 1, 16)]
                        else:
                            for q in range(NTAIL):
                                Y[i, p * nb + q] = acc[i, q]
                    else:
                        for v in T.unroll(NV):
                            Y[i, T.Ramp(p * nb + v * 16, 1, 16)] = acc[i, T.Ramp(v * 16, 1, 16)]

    return main


def _act_rows_func(M, N, K, tn, ku, pf):
    """Row variant: W as ONNX stores it (``W[K, N]``, one contiguous row per channel); tasks
    of ``tn`` outputs read a ``4 * tn``-byte run of each active row into an accumulator (in
    registers when ``M * tn / 16`` fits them, e.g. M = 1 and tn = 256 on AVX-512)."""
    NT = -(-N // tn)
    NV = tn // 16
    LAST = N - (NT - 1) * tn  # outputs of the last tile
    LV, LR = LAST // 16, LAST % 16

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        TH: T.Buffer((K,), "float32"),
        W: T.Buffer((K, N), "float32"),
        Y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        IDX = T.decl_buffer((K + ku,), "int32")
        XS = T.decl_buffer((K + ku, M), "float32")
        CNT = T.decl_buffer((1,), "int32")
        _compact(M, K, X, TH, IDX, XS, CNT)
        for u in range(ku):  # pad the list to a multiple of ku with zero-weighted channel 0
            IDX[CNT[0] + u] = 0
            for i in T.unroll(M):
                XS[CNT[0] + u, i] = T.float32(0)
        for p in T.parallel(NT):
            acc = T.decl_buffer((M, tn), "float32")
            nv = T.meta_var(T.min(NV, (N - p * tn) // 16))
            for i in T.unroll(M):
                for v in range(NV):
                    acc[i, T.Ramp(v * 16, 1, 16)] = T.Broadcast(T.float32(0), 16)
                for r in range(16):
                    acc[i, NV * 16 - 16 + r] = T.float32(0)
            for jo in range((CNT[0] + ku - 1) // ku):
                if pf > 0:  # the rows of the channels `pf` steps ahead, one prefetch per 64-byte line
                    for u in T.unroll(ku):
                        for q in range(tn // 16):
                            ck._prefetch(
                                W[
                                    IDX[T.min(jo * ku + pf * ku + u, CNT[0] - 1)],
                                    T.min(p * tn + q * 16, N - 1),
                                ]
                            )
                for v in range(nv):
                    for i in T.unroll(M):
                        acc[i, T.Ramp(v * 16, 1, 16)] = acc[i, T.Ramp(v * 16, 1, 16)] + _ksum(
                            ku, XS, W, IDX, jo, i, p * tn + v * 16
                        )
                if LR > 0:
                    if p == NT - 1:
                        for r in range(LR):
                            for i in T.unroll(M):
                                for u in T.unroll(ku):
                                    acc[i, LV * 16 + r] = (
                                        acc[i, LV * 16 + r]
                                        + XS[jo * ku + u, i] * W[IDX[jo * ku + u], p * tn + LV * 16 + r]
                                    )
            for i in T.unroll(M):
                for v in range(nv):
                    Y[i, T.Ramp(p * tn + v * 16, 1, 16)] = acc[i, T.Ramp(v * 16, 1, 16)]
                if LR > 0:
                    if p == NT - 1:
                        for r in range(LR):
                            Y[i, p * tn + LV * 16 + r] = acc[i, LV * 16 + r]

    return main


def _act_strips_func(M, N, K, tn, ku, pf):
    """Strip variant: W packed as ``Ws[NT, K, tn]`` (column strips of tn outputs, zero-padded):
    a task streams its own strip in increasing address order, skipping inactive channels'
    ``4 * tn``-byte rows (no two tasks share a DRAM page or a prefetch stream)."""
    NT = -(-N // tn)
    NV = tn // 16
    LAST = N - (NT - 1) * tn
    LV, LR = LAST // 16, LAST % 16

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        TH: T.Buffer((K,), "float32"),
        Ws: T.Buffer((NT, K, tn), "float32"),
        Y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        IDX = T.decl_buffer((K + ku,), "int32")
        XS = T.decl_buffer((K + ku, M), "float32")
        CNT = T.decl_buffer((1,), "int32")
        _compact(M, K, X, TH, IDX, XS, CNT)
        for u in range(ku):
            IDX[CNT[0] + u] = 0
            for i in T.unroll(M):
                XS[CNT[0] + u, i] = T.float32(0)
        for p in T.parallel(NT):
            acc = T.decl_buffer((M, tn), "float32")
            for i in T.unroll(M):
                for v in range(NV):
                    acc[i, T.Ramp(v * 16, 1, 16)] = T.Broadcast(T.float32(0), 16)
            for jo in range((CNT[0] + ku - 1) // ku):
                if pf > 0:
                    for u in T.unroll(ku):
                        for q in range(tn // 16):
                            ck._prefetch(Ws[p, IDX[T.min(jo * ku + pf * ku + u, CNT[0] - 1)], q * 16])
                for v in range(NV):
                    for i in T.unroll(M):
                        acc[i, T.Ramp(v * 16, 1, 16)] = acc[i, T.Ramp(v * 16, 1, 16)] + _ksum_strip(
                            ku, XS, Ws, IDX, jo, i, p, v * 16
                        )
            for i in T.unroll(M):
                if p < NT - 1:
                    for v in range(NV):
                        Y[i, T.Ramp(p * tn + v * 16, 1, 16)] = acc[i, T.Ramp(v * 16, 1, 16)]
                else:
                    for v in range(LV):
                        Y[i, T.Ramp(p * tn + v * 16, 1, 16)] = acc[i, T.Ramp(v * 16, 1, 16)]
                    for r in range(LR):
                        Y[i, p * tn + LV * 16 + r] = acc[i, LV * 16 + r]

    return main


def _ksum_strip(ku, XS, Ws, IDX, jo, i, p, n0):
    e = T.Broadcast(XS[jo * ku, i], 16) * Ws[p, IDX[jo * ku], T.Ramp(n0, 1, 16)]
    for u in range(1, ku):
        e = e + T.Broadcast(XS[jo * ku + u, i], 16) * Ws[p, IDX[jo * ku + u], T.Ramp(n0, 1, 16)]
    return e


def pack_strips(w_onnx: np.ndarray, tn: int) -> np.ndarray:
    """``Ws[ceil(N/tn), K, tn]`` with ``Ws[p, k, j] = W_onnx[k, p*tn + j]`` (zero beyond N)."""
    k, n = w_onnx.shape
    nt = _ceil(n, tn)
    out = np.zeros((nt, k, tn), np.float32)
    for p in range(nt):
        width = min(tn, n - p * tn)
        out[p, :, :width] = w_onnx[:, p * tn : p * tn + width]
    return out


def _ksum(ku, XS, W, IDX, jo, i, n0):
    e = T.Broadcast(XS[jo * ku, i], 16) * W[IDX[jo * ku], T.Ramp(n0, 1, 16)]
    for u in range(1, ku):
        e = e + T.Broadcast(XS[jo * ku + u, i], 16) * W[IDX[jo * ku + u], T.Ramp(n0, 1, 16)]
    return e


def _act_bitmap_func(M, N, K, nb, NV_, mt, pf):
    NP = N // nb
    G = nb // 16

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        TH: T.Buffer((K,), "float32"),
        MK: T.Buffer((NP, K, G), "uint16"),
        OFF: T.Buffer((NP, K + 1), "int32"),
        VAL: T.Buffer((NV_,), "float32"),
        Y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        IDX = T.decl_buffer((K + 1,), "int32")
        XS = T.decl_buffer((K + 1, M), "float32")
        CNT = T.decl_buffer((1,), "int32")
        _compact(M, K, X, TH, IDX, XS, CNT)
        for p in T.parallel(NP):
            acc = T.decl_buffer((mt, nb), "float32")
            vb = T.decl_buffer((16,), "float32")
            off = T.decl_buffer((1,), "int64")
            for i in T.unroll(mt):
                for g in T.unroll(G):
                    acc[i, T.Ramp(g * 16, 1, 16)] = T.Broadcast(T.float32(0), 16)
            for j in range(CNT[0]):
                if pf > 0:  # the values (one prefetch per line, up to the row's end) and masks ahead
                    kn = T.meta_var(IDX[T.min(j + pf, CNT[0] - 1)])
                    for q in T.unroll(G):
                        ck._prefetch(VAL[T.Cast("int64", T.min(OFF[p, kn] + q * 16, OFF[p, kn + 1]))])
                    ck._prefetch(MK[p, kn, 0])
                off[0] = T.Cast("int64", OFF[p, IDX[j]])
                for g in T.unroll(G):
                    vb[T.Ramp(0, 1, 16)] = ck._expand16(
                        VAL[T.Ramp(off[0], T.int64(1), 16)], ck._mask16(T.Cast("int32", MK[p, IDX[j], g]))
                    )
                    off[0] = off[0] + T.Cast("int64", T.popcount(T.Cast("int32", MK[p, IDX[j], g])))
                    for i in T.unroll(mt):
                        acc[i, T.Ramp(g * 16, 1, 16)] = acc[i, T.Ramp(g * 16, 1, 16)] + vb[
                            T.Ramp(0, 1, 16)
                        ] * T.Broadcast(XS[j, i], 16)
            for i in T.unroll(mt):
                for g in T.unroll(G):
                    Y[i, T.Ramp(p * nb + g * 16, 1, 16)] = acc[i, T.Ramp(g * 16, 1, 16)]

    return main


#: default (tile, k_unroll) of the rows and strips layouts. rows: 256 outputs = 16 zmm
#: accumulators at M = 1, which LLVM keeps in registers (512 leaves them in L1, a rolled
#: loop: 1.3-1.5x slower at 50-70 % sparsity on Zen 5, cold, interleaved); strips: 256 did
#: not beat 512 there
ROW_DEFAULTS = {"rows": (256, 4), "strips": (512, 2)}

#: compiled shape-specialised PrimFuncs of `build_act_dense`, by (target, M, N, K, schedule)
_COMPILED: dict[tuple, tuple[Any, Any]] = {}


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _w_onnx(w_onnx: Any) -> np.ndarray:
    a = np.asarray(w_onnx)
    if a.ndim != 2 or min(a.shape) < 1:
        raise ValueError(f"W must be 2-D [K, N] (ONNX orientation); got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


def build_act_dense(
    w_onnx: Any,
    t: Any,
    M: int,
    target: Any = None,
    schedule: Mapping[str, Any] | None = None,
) -> ck.CPUKernel:
    """Fused threshold + matmul skipping inactive input channels (see the module docstring).

    `w_onnx` is ``W[K, N]`` as ONNX stores it, `t` the threshold (scalar or ``[K]``).
    Schedule: ``layout`` (``"rows"``, the default: W as is, tasks of ``tile`` outputs with an
    accumulator (tiles balanced over the target's cores), ``k_unroll`` active channels
    per step, defaults in `ROW_DEFAULTS`; ``"strips"``: the same over `pack_strips`;
    ``"panel"``: ``Wp[N/nb, K, nb]``
    with register accumulators, ``n_panel``, ``m_tile`` (default ``min(M, 4)``),
    ``j_chunk``), ``prefetch`` (software prefetch distance, in steps of ``k_unroll`` active
    channels for "rows" (default 1), in channels for "panel" (default 4); 0 = off)."""
    a = _w_onnx(w_onnx)
    M = ck._check_m(M)
    if M > 64:
        raise ValueError(f"the activation-sparse kernel is for small M (decode); got M={M}")
    target = ck._resolve_target(target)
    k, n = a.shape
    sch = ck._merge_schedule(
        {"layout": "rows", "tile": None, "k_unroll": None, "n_panel": 64, "m_tile": None, "j_chunk": 64,
         "prefetch": None},
        schedule,
        "act",
    )  # fmt: skip
    th = thresholds(t, k)
    if sch["layout"] in ("rows", "strips"):
        tile, k_unroll = ROW_DEFAULTS[sch["layout"]]
        tn = int(sch["tile"] or tile)
        if tn < 16 or tn % 16:
            raise ValueError(f"act tile must be a positive multiple of 16; got {tn}")
        cores = max(1, int(target.attrs.get("num-cores", 1) or 1))
        tasks = _ceil(_ceil(n, tn), cores) * cores  # balanced: a multiple of the thread count
        tn = max(16, _ceil(_ceil(n, tasks), 16) * 16)
        ku = max(1, int(sch["k_unroll"] or k_unroll))
        pf = int(1 if sch["prefetch"] is None else sch["prefetch"])
        sch = {"layout": sch["layout"], "tile": tn, "k_unroll": ku, "prefetch": pf}
        if sch["layout"] == "rows":
            prim = _act_rows_func(M, n, k, tn, ku, pf)
            weights = {"threshold": th, "W": a}
        else:
            prim = _act_strips_func(M, n, k, tn, ku, pf)
            weights = {"threshold": th, "Ws": pack_strips(a, tn)}
    elif sch["layout"] == "panel":
        nb = int(sch["n_panel"])
        if nb < 16 or nb % 16:
            raise ValueError(f"act n_panel must be a positive multiple of 16; got {nb}")
        nmt, mt = ck._m_tiles(M, int(sch["m_tile"] or min(M, 4)))
        jc = max(1, int(sch["j_chunk"]))
        pf = int(4 if sch["prefetch"] is None else sch["prefetch"])
        sch = {"layout": "panel", "n_panel": nb, "m_tile": mt, "m_tiles": nmt, "j_chunk": jc, "prefetch": pf}
        prim = _act_dense_func(M, n, k, nb, mt, nmt, jc, pf)
        weights = {"threshold": th, "Wp": ck.pack_dense_panels(np.ascontiguousarray(a.T), nb)}
    else:
        raise ValueError(f"act layout must be 'rows', 'strips' or 'panel'; got {sch['layout']!r}")
    # the PrimFunc depends on the shapes and schedule only (W and T are arguments): compile
    # it once per shape, and share it between weights (one function in a Relax module)
    key = (str(target), M, n, k, tuple(sorted(sch.items())))
    if key not in _COMPILED:
        kern = ck._finish("act_dense", f"act_{sch['layout']}", prim, (M, n, k), weights, sch, target)
        _COMPILED[key] = (kern.prim_func, kern.executable)
        return kern
    prim, ex = _COMPILED[key]
    return ck.CPUKernel("act_dense", (M, n, k), prim, weights, dict(sch), target, ex)


def pack_act_bitmap(w_onnx: np.ndarray, nb: int) -> dict[str, np.ndarray]:
    """Per (panel p, channel k) bitmaps of ``W_onnx[k, p*nb:(p+1)*nb]``: masks ``[NP, K,
    nb/16]`` uint16 (bit l of group g = output ``p*nb + 16*g + l`` nonzero), values in
    (p, k, g, lane) order plus 16 zeros of padding, offsets ``[NP, K + 1]`` int32."""
    k, n = w_onnx.shape
    npan, g = n // nb, nb // 16
    blocks = w_onnx.reshape(k, npan, g, 16).transpose(1, 0, 2, 3)  # [NP, K, G, 16]
    nz = blocks != 0
    masks = (nz.astype(np.uint32) << np.arange(16, dtype=np.uint32)).sum(axis=-1).astype(np.uint16)
    values = np.concatenate([blocks[nz].astype(np.float32), np.zeros(16, np.float32)])
    counts = nz.sum(axis=(2, 3)).reshape(-1)
    if counts.sum() >= 2**31 - 16:
        raise ValueError("too many nonzeros for int32 offsets")
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    offsets = np.empty((npan, k + 1), np.int32)
    offsets[:, :k] = off[:-1].reshape(npan, k)
    offsets[:, k] = off[1:].reshape(npan, k)[:, -1]
    return {"masks": np.ascontiguousarray(masks), "offsets": offsets, "values": values}


def build_act_bitmap(
    w_onnx: Any,
    t: Any,
    M: int,
    target: Any = None,
    schedule: Mapping[str, Any] | None = None,
) -> ck.CPUKernel:
    """Activation-sparse kernel over a weight-sparse W (per-channel 16-output bitmaps; see
    the module docstring). Needs AVX-512 and ``N % n_panel == 0``. Schedule: ``n_panel``
    (default: the widest of 256/128/64/32/16 dividing N with at most 16 zmm accumulators),
    ``prefetch`` (distance in active channels, default 4). M <= 8."""
    a = _w_onnx(w_onnx)
    M = ck._check_m(M)
    target = ck._resolve_target(target)
    if not ck._avx512(target):
        from sparsegraph.codegen.formats import UnfitError

        raise UnfitError("the activation-sparse bitmap kernel needs AVX-512 (vexpandps)")
    if M > 8:
        raise ValueError(f"the activation-sparse bitmap kernel handles M <= 8; got M={M}")
    k, n = a.shape
    # widest panel whose M x n_panel/16 accumulators fit 16 zmm: long runs per active channel
    default_nb = next((nb for nb in (256, 128, 64, 32, 16) if M * nb // 16 <= 16 and n % nb == 0), 16)
    sch = ck._merge_schedule({"n_panel": default_nb, "prefetch": 4}, schedule, "act_bitmap")
    nb = int(sch["n_panel"])
    if nb < 16 or nb % 16 or n % nb:
        raise ValueError(f"act_bitmap needs n_panel a multiple of 16 dividing N={n}; got {nb}")
    if M * nb // 16 > 24:
        raise ValueError(f"M={M} x n_panel={nb} needs more than 24 zmm accumulators; lower n_panel")
    pf = int(sch["prefetch"] or 0)
    sch.update(n_panel=nb, prefetch=pf)
    arrays = pack_act_bitmap(a, nb)
    weights = {"threshold": thresholds(t, k), **arrays}
    prim = _act_bitmap_func(M, n, k, nb, arrays["values"].shape[0], M, pf)
    return ck._finish("act_bitmap", "act_bitmap", prim, (M, n, k), weights, sch, target)


# --------------------------------------------------------------------------- Relax rewrite

#: activation sparsity a fused kernel is timed at when the model records none for its
#: threshold (`ctx.act_sparsity`, from the `activation_sparsity` pass's model metadata)
ASSUMED_SPARSITY = 0.5
#: calibrated sparsities are timed on this grid (weights of one shape then share a measurement)
SPARSITY_STEP = 0.01
#: the fused kernel must stay within this factor of dense with every channel active
GUARD = 0.97
#: ... at this fraction of the sparsity it was timed at (inputs sparser than the calibration
#: data expects, e.g. half of the calibrated 50 %: the kernel must not then fall behind dense)
GUARD_FRACTION = 0.5
MAX_M = 8


def act_sparse_rewrite(ctx: Any):
    """`codegen.rewrites` factory: replace ``matmul(where(greater(abs(x), T), x, 0), W)``
    (W a float32 constant ``[K, N]``, T a constant scalar or ``[K]``, M = rows of x <= 8) by
    ``call_tir`` to the fastest fused kernel (`build_act_dense` with the rows/strips layouts
    at M = 1, strips/panel above; `build_act_bitmap` too when W is >= 30 % zeros) when it,
    timed like the dispatcher times (`dispatch.Timer`, cold when ``ctx.cold``), beats the
    best dense-input kernel (`cpu_kernels.build_dense`, and the weight-sparse
    bitmap kernel for a sparse W) at the activation sparsity the model records for T
    (``ctx.act_sparsity``; `ASSUMED_SPARSITY` when it records none) independent per row,
    and at `GUARD_FRACTION` of that sparsity stays within `GUARD` of it. Decisions are
    cached in ``ctx.db``; one record per (weight, M) goes to ``ctx.decisions``. CUDA
    targets: the same pattern, decided by `cuda_act_kernels.decide_cuda` (W in fp16)."""
    kind = str(ctx.target.kind.name)
    if kind not in ("llvm", "cuda"):
        return None
    if kind == "cuda":
        from .cuda_act_kernels import decide_cuda as decide
    else:
        decide = _decide

    def rewrite(mod):
        swap = _ActSwap(mod, ctx, decide)
        out = swap.run()
        for name in list(vars(swap)):  # TVM keeps mutators alive from C++: drop references
            setattr(swap, name, None)
        return out

    return rewrite


def _const(e: Any) -> np.ndarray | None:
    import tvm

    return ck.as_numpy(e.value) if isinstance(e, tvm.ir.expr.GenericConst) else None  # a view, no copy


def _op(e: Any) -> str:
    op = getattr(e, "op", None)
    return str(getattr(op, "name", ""))


#: fused candidates the rewrite times (schedules of `build_act_dense`): at M = 1 and M > 1
CANDIDATES_M1 = (
    {"layout": "rows", "prefetch": 1},
    {"layout": "rows", "prefetch": 3},
    {"layout": "strips", "prefetch": 1},
    {"layout": "strips", "prefetch": 3},
)
CANDIDATES_BATCH = ({"layout": "strips"}, {"layout": "panel"})


def _label(schedule: Mapping[str, Any]) -> str:
    """``act_<layout>[_pf<n>]``: a candidate's name in records and the tuning database."""
    pf = schedule.get("prefetch")
    return f"act_{schedule['layout']}" + (f"_pf{pf}" if pf is not None else "")


def _schedule(label: str) -> dict[str, Any]:
    """Inverse of `_label` (``act_bitmap`` and unknown labels: the defaults)."""
    parts = label.removeprefix("act_").split("_pf")
    if parts[0] not in ("rows", "strips", "panel"):
        return {}
    return {"layout": parts[0], **({"prefetch": int(parts[1])} if len(parts) > 1 else {})}


def decision_key(
    target: Any, w_onnx: np.ndarray, th: np.ndarray, m: int, cold: bool, sparsity: float | None = None
) -> str:
    """TuningDB key of the fused-vs-dense decision for one weight, threshold vector and M
    (and the calibrated activation sparsity it was timed at, when there is one)."""
    import hashlib

    from sparsegraph.codegen.dispatch import _target_key

    k, n = w_onnx.shape
    h = hashlib.sha1(memoryview(np.ascontiguousarray(w_onnx)).cast("B"))  # no copy of the weight
    h.update(memoryview(np.ascontiguousarray(th)).cast("B"))
    digest = h.hexdigest()[:16]
    key = f"{_target_key(target)}|act_sparse3|M{m}|K{k}|N{n}|{digest}|{cold}"  # 3: rows tile 256
    return key if sparsity is None else f"{key}|s{sparsity:.4f}"


def calibrated_sparsity(ctx: Any, th: np.ndarray) -> float | None:
    """The sparsity the model records for thresholds `th[K]` (``ctx.act_sparsity``, keyed by
    `activation_sparsity.threshold_key`), or None when it records none."""
    table = getattr(ctx, "act_sparsity", None)
    if not table:
        return None
    from sparsegraph.passes.rewrite.activation_sparsity import threshold_key

    return table.get(threshold_key(th, th.shape[0]))


def timed_sparsity(ctx: Any, th: np.ndarray) -> tuple[float | None, float]:
    """(calibrated sparsity or None, the sparsity a fused kernel is timed at): the calibrated
    one on a grid of `SPARSITY_STEP` (weights of one shape then share a measurement), else
    `ASSUMED_SPARSITY`."""
    cal = calibrated_sparsity(ctx, th)
    return cal, ASSUMED_SPARSITY if cal is None else round(round(cal / SPARSITY_STEP) * SPARSITY_STEP, 4)


def probe_inputs(th: np.ndarray, m: int, s: float) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic X[m, K] (float32, seeded) for timing a fused kernel with thresholds `th`:
    a share `s` of the entries below their threshold, and the guard's input with a share
    ``s * GUARD_FRACTION`` (the same draws). With every threshold negative nothing can be
    skipped, and both are fully active."""
    k = th.shape[0]
    rng = np.random.default_rng(0)
    sign = np.where(rng.random((m, k)) < 0.5, -1.0, 1.0)
    x_all = (sign * (np.abs(th) + 1.0)).astype(np.float32)  # every channel active
    if np.all(th < 0):
        return x_all, x_all
    drop = rng.random((m, k))
    x_s = np.where(drop < s, 0.0, x_all).astype(np.float32)
    return x_s, np.where(drop < s * GUARD_FRACTION, 0.0, x_all).astype(np.float32)


@dataclass(frozen=True)
class _Chosen:
    """What the rewrite needs of a chosen kernel (no compiled module, no device copies)."""

    symbol: str
    prim_func: Any
    weights: dict[str, np.ndarray]


def _decide(ctx: Any, w: np.ndarray, th: np.ndarray, m: int, kind: str, cache: dict) -> tuple[Any, dict]:
    """(chosen kernel or None, decision record) for W_onnx[K, N], thresholds th[K], M = m.
    One candidate kernel is alive at a time (each holds copies of a weight that may be
    hundreds of MB)."""
    from sparsegraph.codegen.dispatch import Timer
    from sparsegraph.codegen.formats import UnfitError

    k, n = w.shape
    wsp = float(1 - np.count_nonzero(w) / w.size)
    cal, s_used = timed_sparsity(ctx, th)
    key = decision_key(ctx.target, w, th, m, ctx.cold, None if cal is None else s_used)
    if key in cache:
        return cache[key]
    builders = {
        _label(sch): functools.partial(build_act_dense, schedule=sch)
        for sch in (CANDIDATES_M1 if m == 1 else CANDIDATES_BATCH)
    }
    if wsp >= 0.3 and ck._avx512(ctx.target) and n % 64 == 0 and m <= 4:
        builders["act_bitmap"] = build_act_bitmap

    def chosen(name: str) -> _Chosen:
        kern = builders.get(name, functools.partial(build_act_dense, schedule=_schedule(name)))(
            w, th, m, ctx.target
        )
        out = _Chosen(kern.symbol, kern.prim_func, kern.weights)
        del kern
        gc.collect()
        return out

    stored = ctx.db.get(key)
    if stored is not None:
        rec = dict(stored, from_db=True, calibrated_sparsity=cal)
        cache[key] = (chosen(rec["kernel"]) if rec["chosen"] == "fused" else None, rec)
        return cache[key]
    timer = Timer(repeat=11)  # the decision is cached: spend a little more for a stable median
    x_s, x_g = probe_inputs(th, m, s_used)
    # with a dense W, every time here depends on the shapes only (the inputs are synthetic):
    # weights of one shape share one measurement
    shape_key = ("timing", k, n, m, s_used) if "act_bitmap" not in builders else None
    if shape_key in cache:
        dense_s, fused = cache[shape_key]
        return _record(ctx, key, cache, chosen, kind, k, n, m, wsp, dense_s, fused, (cal, s_used))
    bases = {"dense": ck.build_dense}
    if "act_bitmap" in builders:
        bases["bitmap"] = ck.build_bitmap
    dense_s = {}
    for name, build in bases.items():
        try:
            kern = build(np.ascontiguousarray(w.T), m, ctx.target)
        except UnfitError:
            continue
        kern(x_s)
        dense_s[name] = timer(kern, ctx.cold)
        del kern
        gc.collect()
    fused = {}
    for name, build in builders.items():
        kern = build(w, th, m, ctx.target)
        kern(x_s)
        t_s = timer(kern, ctx.cold)
        kern(x_g)
        fused[name] = (t_s, timer(kern, ctx.cold))
        del kern
        gc.collect()
    if shape_key is not None:
        cache[shape_key] = (dense_s, fused)
    return _record(ctx, key, cache, chosen, kind, k, n, m, wsp, dense_s, fused, (cal, s_used))


def _record(ctx, key, cache, chosen, kind, k, n, m, wsp, dense_s, fused, sparsity) -> tuple[Any, dict]:
    """The decision from the measured times; stored in ``ctx.db`` and `cache`. `sparsity`:
    (calibrated sparsity or None, sparsity the fused kernel was timed at)."""
    cal, s_used = sparsity
    best_base = min(dense_s, key=dense_s.get)
    best = min(fused, key=lambda f: fused[f][0])
    t_s, t_0 = fused[best]
    ok = t_s < dense_s[best_base] and t_0 * GUARD <= dense_s[best_base]
    rec = {
        "technique": "activation_sparsity",
        "weight_shape": [k, n],
        "M": m,
        "threshold": kind,
        "weight_sparsity": round(wsp, 4),
        "assumed_activation_sparsity": ASSUMED_SPARSITY,
        "calibrated_sparsity": cal,
        "timed_activation_sparsity": s_used,
        "sparsity_source": "calibrated" if cal is not None else "assumed (the model records none)",
        "kernel": best,
        "fused_us": t_s * 1e6,
        "fused_guard_us": t_0 * 1e6,
        "guard_sparsity": round(s_used * GUARD_FRACTION, 4),
        "dense_kernel": best_base,
        "dense_us": dense_s[best_base] * 1e6,
        "chosen": "fused" if ok else "dense",
        "from_db": False,
    }
    ctx.db.put(key, rec)
    cache[key] = (chosen(best) if ok else None, rec)
    return cache[key]


def _make_swap():
    import tvm
    from tvm import relax

    matmul = tvm.ir.Op.get("relax.matmul")

    @relax.expr_functor.mutator
    class ActSwap(relax.PyExprMutator):
        def __init__(self, mod, ctx, decide):
            super().__init__(mod)
            self.mod_, self.ctx, self.decide = mod, ctx, decide
            self._tag = ""
            self._gvars: dict[str, Any] = {}
            self._consts: dict[int, list] = {}  # id of a cached `_Chosen` -> its constants
            self._cache: dict = {}

        def _match(self, y):
            """(x, T, kind) when y = where(greater(abs(x), T), x, 0), else None."""
            if not isinstance(y, relax.Var):
                return None
            wh = self.lookup_binding(y)
            if _op(wh) != "relax.where" or len(wh.args) != 3:
                return None
            cond, x, z = wh.args
            zv = _const(z)
            if zv is None or zv.size != 1 or float(zv.reshape(-1)[0]) != 0.0:
                return None
            gt = self.lookup_binding(cond) if isinstance(cond, relax.Var) else None
            if _op(gt) != "relax.greater":
                return None
            ab, tc = gt.args
            tv = _const(tc)
            ab = self.lookup_binding(ab) if isinstance(ab, relax.Var) else None
            if tv is None or _op(ab) != "relax.abs" or not ab.args[0].same_as(x):
                return None
            return x, tv, ("scalar" if tv.size == 1 else "per-channel")

        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if call.op != matmul or len(call.args) != 2 or self._tag in self.ctx.dense_tags:
                return call
            w = _const(call.args[1])
            if w is None or w.ndim != 2 or w.dtype != np.float32:
                return call
            found = self._match(call.args[0])
            if found is None:
                return call
            x, tv, kind = found
            shape = [int(d) for d in x.ty.shape]
            k, n = w.shape
            m = int(np.prod(shape[:-1]))
            if shape[-1] != k or m > MAX_M or x.ty.dtype != "float32":
                return call
            try:
                th = thresholds(tv, k)
            except ValueError:
                return call
            kern, rec = self.decide(self.ctx, np.ascontiguousarray(w), th, m, kind, self._cache)
            self.ctx.decisions.append(dict(rec, bucket=self._tag))
            if kern is None:
                return call
            if kern.symbol not in self._gvars:  # weights of one shape share the PrimFunc
                self._gvars[kern.symbol] = self.builder_.add_func(kern.prim_func, kern.symbol)
            if id(kern) not in self._consts:
                # constants made once per weight; the numpy copies go (a 7B layer's weights are GBs)
                self._consts[id(kern)] = [relax.const(ck.as_tvm(a)) for a in kern.weights.values()]
                kern.weights.clear()
            x2d = self.builder_.emit(relax.op.reshape(x, [m, k])) if len(shape) != 2 else x
            consts = self._consts[id(kern)]
            out = self.builder_.emit(
                relax.call_tir(
                    self._gvars[kern.symbol], [x2d, *consts], out_ty=relax.TensorType([m, n], "float32")
                )
            )
            return relax.op.reshape(out, [*shape[:-1], n]) if len(shape) != 2 else out

        def run(self):
            for gv, func in self.mod_.functions_items():
                if isinstance(func, relax.Function):
                    self._tag = gv.name_hint.removeprefix("main_")
                    self.builder_.update_func(gv, self.visit_expr(func))
            return self.builder_.get()

    return ActSwap


def _ActSwap(mod, ctx, decide):
    return _make_swap()(mod, ctx, decide)
