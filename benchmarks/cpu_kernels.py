"""Cold-cache benchmark of the CPU sparse kernels (`sparsegraph.codegen.cpu_kernels`).

``Y[M, N] = X[M, K] @ W`` in fp32 with ``W`` stored ``K x N`` as ONNX stores it (canonical
``W[N, K]`` = outputs x inputs for the kernels), for W of 4096x4096, 4096x11008 and
11008x4096, M in {1, 8, 64, 512}, and sparsity patterns: unstructured 50/70/90/95 %
(magnitude, one global threshold), 2:4 along K, and blocks 16x1 / 1x16 / 32x32 at 70 and
90 % (pruned by block L2 norm). A block "r x c" is r outputs x c inputs of the canonical
W[N, K]: "16x1" = 16 consecutive outputs (a run of 16 along N in the ONNX K x N matrix,
i.e. one row piece of W_onnx), "1x16" = 16 consecutive inputs of one output (a column
piece of W_onnx).

Every method cycles through enough distinct copies of its weights (>= --min-mb MB of the
format's bytes and >= --min-copies copies; call i uses copy i % copies) that each call
streams its weights from DRAM, as a real decode streams every layer's weights:

* ``ort``: THE baseline. onnxruntime, one session per weight copy, each one MatMul with W as
  an initializer, intra_op_num_threads=2, session.intra_op.allow_spinning=0;
* ``tvm_dense``: our packed dense kernel (`build_dense`, default schedule) and, for M >=
  ALT_MIN_M in the first per-shape run only, ``tvm_dense_alt`` (its second schedule in
  `SCHEDULE_SPACE`: the two a compile's dispatcher times by default; at smaller M a sparse
  kernel wins every cell by far); ``numpy``: ``X @ W`` (BLAS);
* ``tvm``: the fastest of a few of our sparse kernels for the pattern (listed per cell);
* ``scipy_csr`` / ``scipy_bsr`` (block patterns, block = the pattern's block), computing
  ``(A @ X.T).T`` with a prepared X.T (scipy is single-threaded);
* ``torch_csr``: ``torch.sparse_csr`` (MKL), ``A @ X.T``, ``torch.set_num_threads(2)``.

Each cell is the median of the timed calls, its ratio to ORT dense (ORT time / time) and
the GB/s of the bytes the method moves (its weight arrays + X + Y). "after dispatch" is
what a compile would run: the fastest of the timed TVM kernels that `codegen.dispatch`
considers for the pattern, the dense kernels (both schedules) included, as x ORT (the goal:
>= 0.97 at every point). "bytes bound" is dense
bytes / the bytes of the TVM kernel's format: the speedup a purely bandwidth-bound kernel
would get. ORT and the dense kernels are timed twice per shape (before and after the
patterns; the faster run is used); for M <= 8 ORT is also timed right before and right
after each cell's TVM kernels, and the faster of those two is that cell's reference (the
DRAM bandwidth this VM gets drifts by up to 2x over minutes, so ratios must come from
neighbouring measurements). Every measurement records the 1-minute load average and the
share of the 2 CPUs used by other processes while it ran (``foreign``).

"Blocks >= unstructured" (M = 1) is judged on times taken together: after a shape's cells,
the kernels of the unstructured pattern and of every block pattern at the same sparsity
(those within ``KEEP_WITHIN`` of their cell's best) are re-timed interleaved, round by round
(``--compare-rounds``), and each pattern's fastest kernel is compared.

    python benchmarks/cpu_kernels.py                 # everything (~20 min on a quiet 2-core box)
    python benchmarks/cpu_kernels.py --quick         # one shape, fewer points (smoke test)
    python benchmarks/cpu_kernels.py --shapes 4096x11008 --ms 1,8 --patterns u70,u90

Writes ``benchmarks/results/cpu_kernels.{md,json,png}`` (``--out`` to change the stem).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TVM_NUM_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
THREADS = int(os.environ["TVM_NUM_THREADS"])

SHAPES = ["4096x4096", "4096x11008", "11008x4096"]  # K x N (ONNX orientation)
MS = [1, 8, 64, 512]
PATTERNS = [
    "u50", "u70", "u90", "u95", "2:4",
    "b16x1_70", "b16x1_90", "b1x16_70", "b1x16_90", "b32x32_70", "b32x32_90",
]  # fmt: skip
ALT_MIN_M = 64  # the dense kernel's second schedule is timed from this M on
QUICK = {"shapes": ["4096x11008"], "ms": [1, 8], "patterns": ["u70", "u90", "b16x1_70"]}
KEEP_WITHIN = 1.15  # M=1 kernels within this factor of their cell's best are re-timed in the block comparison


# --------------------------------------------------------------------------- patterns


@dataclass(frozen=True)
class Pattern:
    name: str
    kind: str  # "unstructured" | "nm" | "block"
    sparsity: float
    block: tuple[int, int] | None = None  # (r outputs, c inputs) of canonical W[N, K]

    @property
    def label(self) -> str:
        if self.kind == "unstructured":
            return f"unstructured {self.sparsity:.0%}"
        if self.kind == "nm":
            return "2:4 (along K)"
        r, c = self.block
        return f"block {r}x{c} {self.sparsity:.0%}"


def parse_pattern(name: str) -> Pattern:
    if name == "2:4":
        return Pattern(name, "nm", 0.5)
    if name.startswith("u"):
        return Pattern(name, "unstructured", int(name[1:]) / 100)
    if name.startswith("b"):
        blk, s = name[1:].split("_")
        r, c = (int(v) for v in blk.split("x"))
        return Pattern(name, "block", int(s) / 100, (r, c))
    raise ValueError(f"unknown pattern {name!r}")


def prune(w: np.ndarray, p: Pattern) -> np.ndarray:
    """Magnitude-prune canonical W[N, K] to pattern p (exact counts)."""
    n, k = w.shape
    if p.kind == "unstructured":
        a = np.abs(w).ravel()
        drop = round(p.sparsity * a.size)
        out = w.copy()
        if drop:
            idx = np.argpartition(a, drop - 1)[:drop]
            out.ravel()[idx] = 0.0
        return out
    if p.kind == "nm":
        g = w.reshape(n, k // 4, 4).copy()
        order = np.argsort(np.abs(g), axis=-1)
        np.put_along_axis(g, order[..., :2], 0.0, axis=-1)
        return g.reshape(n, k)
    r, c = p.block
    w4 = w.reshape(n // r, r, k // c, c)
    score = np.sqrt(np.square(w4).sum(axis=(1, 3))).ravel()
    drop = round(p.sparsity * score.size)
    keep = np.ones(score.size, bool)
    keep[np.argpartition(score, drop - 1)[:drop]] = False
    keep = keep.reshape(n // r, 1, k // c, 1)
    return (w4 * keep).reshape(n, k)


# --------------------------------------------------------------------------- timing


def _cpu_busy() -> tuple[float, float]:
    """(busy seconds of all CPUs, busy seconds of this process) so far."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz  # all but idle and iowait
    t = os.times()
    return busy, t.user + t.system


@dataclass
class Timing:
    median: float
    calls: int
    copies: int
    load: float  # 1-minute load average after the measurement
    foreign: float  # share of all CPUs used by other processes during the measurement
    times: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "calls": self.calls,
            "copies": self.copies,
            "load": round(self.load, 2),
            "foreign": round(self.foreign, 3),
            "min_s": min(self.times),
        }


def time_cold(
    fn: Callable[[int], Any],
    copies: int,
    min_time: float = 0.25,
    max_time: float = 1.5,
) -> Timing:
    """Median time of ``fn(i)`` over calls cycling through `copies` weight copies.

    Fast calls (the first one < 50 ms): one warm-up call per copy (first touch), then calls
    i = 1, 2, ... on copy i % copies until at least 2 x copies (and 5) calls and `min_time`
    seconds, or `max_time` seconds. Slow calls (compute-bound; the cache state no longer
    matters): 3 timed calls after the first, 1 if the first took over a second."""
    t0 = time.perf_counter()
    fn(0)
    first = time.perf_counter() - t0
    slow = first >= 0.05
    if not slow:
        for i in range(1, copies):
            fn(i)
    # compute-bound calls: 3 timed calls, or 1 for calls over a second (scipy/torch at M=512)
    min_calls = (1 if first >= 1.0 else 3) if slow else max(5, 2 * copies)
    cpu0, self0 = _cpu_busy()
    wall0 = time.perf_counter()
    times: list[float] = []
    i = 1
    while True:
        a = time.perf_counter()
        fn(i % copies)
        times.append(time.perf_counter() - a)
        i += 1
        spent = time.perf_counter() - wall0
        if len(times) >= min_calls and (slow or spent >= min_time):
            break
        if len(times) >= min(3, min_calls) and spent >= max_time:
            break
    wall = time.perf_counter() - wall0
    cpu1, self1 = _cpu_busy()
    ncpu = os.cpu_count() or 1
    foreign = max(0.0, ((cpu1 - cpu0) - (self1 - self0)) / (wall * ncpu)) if wall > 0 else 0.0
    time.sleep(0.02)  # let other thread pools' spinning workers go idle
    return Timing(statistics.median(times), len(times), copies, os.getloadavg()[0], foreign, times)


def n_copies(nbytes: int, min_mb: float, min_copies: int) -> int:
    return max(min_copies, int(np.ceil(min_mb * 2**20 / max(1, nbytes))))


def _fingerprint(a: np.ndarray) -> tuple:
    flat = a.reshape(-1)
    step = max(1, flat.size // 65536)
    return (a.shape, a.dtype.str, zlib.crc32(np.ascontiguousarray(flat[::step]).tobytes()))


# --------------------------------------------------------------------------- methods


@dataclass
class Method:
    """A timed implementation: call(i) runs on weight copy i."""

    name: str
    call: Callable[[int], Any]
    copies: int
    weight_bytes: int
    detail: str = ""


class TVMCopies:
    """Distinct tvm tensor copies of kernel weights, shared by kernels with identical arrays."""

    def __init__(self, min_mb: float, min_copies: int):
        self.min_mb, self.min_copies = min_mb, min_copies
        self.cache: dict[tuple, list] = {}

    def method(self, name: str, kernel: Any, detail: str = "") -> Method:
        import tvm

        dev = tvm.cpu()
        copies = n_copies(kernel.nbytes, self.min_mb, self.min_copies)
        key = tuple(_fingerprint(a) for a in kernel.weights.values())
        sets = self.cache.get(key)
        if sets is None or len(sets) < copies:
            sets = [list(kernel.args[1:-1])]
            sets += [
                [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in kernel.weights.values()]
                for _ in range(copies - 1)
            ]
            self.cache[key] = sets
        x, y = kernel.args[0], kernel.args[-1]
        argsets = [(x, *ws, y) for ws in sets[:copies]]
        fn = kernel.executable[kernel.symbol]
        return Method(name, lambda i: fn(*argsets[i]), copies, kernel.nbytes, detail)

    def clear(self) -> None:
        self.cache.clear()


def ort_sessions(w_onnx: np.ndarray, copies: int) -> list:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = w_onnx.shape
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "mm",
        [x],
        [y],
        [numpy_helper.from_array(w_onnx, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    blob = model.SerializeToString()
    del model, graph
    sessions = []
    for _ in range(copies):
        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions.append(ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"]))
    assert onnx  # imported for the side effect of checking the install
    return sessions


# --------------------------------------------------------------------------- TVM candidates


def tvm_candidates(p: Pattern, m: int) -> list[tuple[str, dict | None]]:
    """(builder key, schedule) pairs timed for pattern p at M = m; the fastest is reported.
    Block patterns get the BSR kernel plus what `codegen.dispatch.candidates` would also
    time on a block-pruned weight (bitmap, CSR), so "best" is what a compile ships."""
    out: list[tuple[str, dict | None]] = []
    if p.kind == "block":
        out.append(("bsr", None))
    if p.kind == "nm":
        out.append(("nm", None))
    if m <= 8:
        out.append(("bitmap", None))
    out.append(("csr", None))
    return out


def build_candidate(ck: Any, key: str, packed: dict[str, Any], p: Pattern, m: int, target: Any, schedule):
    if key == "bsr":
        return ck.build_bsr(packed["bsr"], p.block, m, target, schedule)
    if key == "nm":
        return ck.build_nm(packed["nm"], 2, 4, m, target, schedule)
    return getattr(ck, f"build_{key}")(packed[key], m, target, schedule)


def pack_pattern(ws: np.ndarray, p: Pattern, keys: set[str]) -> dict[str, Any]:
    from sparsegraph.codegen import formats as fmts

    packed: dict[str, Any] = {}
    if "bsr" in keys:
        packed["bsr"] = fmts.BSR.pack(ws, block=p.block)
    if "nm" in keys:
        packed["nm"] = fmts.NM.pack(ws, n=2, m=4)
    if "bitmap" in keys:
        packed["bitmap"] = fmts.Bitmap.pack(ws, group=16)
    if "csr" in keys:
        packed["csr"] = fmts.CSR.pack(ws, pad=16)
    return packed


# --------------------------------------------------------------------------- the run


class Runner:
    """Runs the sweep; `records` are the per-(shape, pattern, M) cells, `baselines` the
    dense methods timed per shape."""

    def __init__(self, args: argparse.Namespace):
        import torch

        from sparsegraph.codegen import cpu_kernels
        from sparsegraph.codegen.target import host_target

        torch.set_num_threads(THREADS)
        self.args = args
        self.ck = cpu_kernels
        self.target = host_target()
        self.rng = np.random.default_rng(args.seed)
        self.records: list[dict[str, Any]] = []
        self.baselines: list[dict[str, Any]] = []
        self.block_cmp: list[dict[str, Any]] = []
        self.start = time.perf_counter()

    def log(self, msg: str) -> None:
        if not self.args.silent:
            print(msg, flush=True)

    def timed(self, fn: Callable[[int], Any], copies: int) -> Timing:
        return time_cold(fn, copies, self.args.min_time, self.args.max_time)

    def run(self) -> dict[str, Any]:
        for shape in self.args.shapes:
            self.run_shape(shape)
        return {"meta": self.meta(), "baselines": self.baselines, "cells": self.records,
                "blocks_vs_unstructured": self.block_cmp}  # fmt: skip

    # ----------------------------------------------------------------------- per shape

    def run_shape(self, shape: str) -> None:
        args, ck = self.args, self.ck
        k, n = (int(v) for v in shape.split("x"))
        w = self.rng.standard_normal((n, k), dtype=np.float32)  # canonical W[N, K]
        w_onnx = np.ascontiguousarray(w.T)
        nc = n_copies(w.nbytes, args.min_mb, args.min_copies)
        self.log(f"== W {k}x{n} (K x N), {w.nbytes / 1e6:.0f} MB dense, {nc} copies")
        xs = {m: self.rng.standard_normal((m, k), dtype=np.float32) for m in args.ms}
        copies = TVMCopies(args.min_mb, args.min_copies)
        t0 = time.perf_counter()
        sessions = ort_sessions(w_onnx, nc)
        np_copies = [w_onnx.copy() for _ in range(nc)]
        dense = {m: ck.build_dense(w, m, self.target) for m in args.ms}
        alt = ck.SCHEDULE_SPACE["dense"][1]
        dense_alt = {m: ck.build_dense(w, m, self.target, alt) for m in args.ms if m >= ALT_MIN_M}
        self.log(f"   dense setup {time.perf_counter() - t0:.1f} s")
        ctx = {"shape": shape, "k": k, "n": n, "xs": xs, "sessions": sessions, "nc": nc, "copies": copies,
               "m1": {}}  # fmt: skip
        self.time_dense(ctx, dense, dense_alt, np_copies, w.nbytes, 0)
        for pname in args.patterns:
            self.run_pattern(ctx, w, parse_pattern(pname))
            gc.collect()
        self.time_dense(ctx, dense, dense_alt, np_copies, w.nbytes, 1)
        self.compare_blocks(ctx)
        ctx["m1"].clear()
        copies.clear()

    def time_dense(self, ctx: dict, dense: dict, alt: dict, np_copies: list, nbytes: int, rnd: int) -> None:
        k, n, nc = ctx["k"], ctx["n"], ctx["nc"]
        for m in self.args.ms:
            x = ctx["xs"][m]
            dense[m](x)  # sets the kernel's X
            methods = [
                Method("ort", lambda i, x=x: ctx["sessions"][i].run(None, {"X": x}), nc, nbytes),
                ctx["copies"].method("tvm_dense", dense[m], "dense packed"),
                Method("numpy", lambda i, x=x: x @ np_copies[i], nc, nbytes),
            ]
            if m in alt and rnd == 0:
                alt[m](x)
                methods.insert(2, ctx["copies"].method("tvm_dense_alt", alt[m], "dense packed, 2nd schedule"))
            for meth in methods:
                t = self.timed(meth.call, meth.copies)
                gbs = (meth.weight_bytes + 4 * m * (k + n)) / t.median / 1e9
                sched = {
                    "tvm_dense": dense[m].schedule,
                    "tvm_dense_alt": getattr(alt.get(m), "schedule", None),
                }
                sched = sched.get(meth.name)
                self.baselines.append(
                    {"shape": ctx["shape"], "k": k, "n": n, "m": m, "method": meth.name, "round": rnd,
                     "weight_bytes": meth.weight_bytes, "gbs": gbs, **t.to_dict(),
                     "elapsed_s": self.elapsed(), "schedule": sched}
                )  # fmt: skip
                self.log(f"   M={m:<3} {meth.name:<9} {t.median * 1e3:8.3f} ms {gbs:5.1f} GB/s "
                         f"(load {t.load:.2f}, foreign {t.foreign:.2f})")  # fmt: skip

    def compare_blocks(self, ctx: dict) -> None:
        """M = 1, per sparsity: the unstructured pattern's and every block pattern's kernels
        (those within `KEEP_WITHIN` of their cell's best, i.e. what dispatch could pick) and
        ORT, timed interleaved in `--compare-rounds` rounds (each a burst of one call per
        weight copy, cold), so block and unstructured times come from the same minutes of
        this VM's drifting DRAM bandwidth. A pattern's time: its fastest kernel's median."""
        kept = {
            name: [meth for meth, t in ms if t <= KEEP_WITHIN * min(t for _, t in ms)]
            for name, ms in ctx["m1"].items()
        }
        x, sessions = ctx["xs"].get(1), ctx["sessions"]
        ort = Method("ort", lambda i: sessions[i].run(None, {"X": x}), ctx["nc"], 0)
        for s_ in sorted({parse_pattern(n).sparsity for n in kept}):
            u = f"u{round(s_ * 100)}"
            blocks = [n for n in kept if parse_pattern(n).kind == "block" and parse_pattern(n).sparsity == s_]
            if u not in kept or not blocks or x is None:
                continue
            methods = [("ort", "ort", ort)]
            methods += [(n, meth.name, meth) for n in [u, *blocks] for meth in kept[n]]
            per: dict[tuple[str, str], list[float]] = {(n, k): [] for n, k, _ in methods}
            for r in range(self.args.compare_rounds):
                for n, k, meth in methods if r % 2 == 0 else methods[::-1]:
                    ts = []
                    for i in range(max(4, meth.copies)):
                        t0 = time.perf_counter()
                        meth.call(i % meth.copies)
                        ts.append(time.perf_counter() - t0)
                    per[(n, k)].append(statistics.median(ts))
                time.sleep(0.02)
            med = {key: statistics.median(v) for key, v in per.items()}
            best = {n: min((med[(n, k)], k) for nn, k, _ in methods if nn == n) for n in [u, *blocks]}
            row = {"shape": ctx["shape"], "sparsity": s_, "unstructured": u, "ort_s": med[("ort", "ort")],
                   "rounds": self.args.compare_rounds, "load": round(os.getloadavg()[0], 2),
                   "times": {f"{n} {k}": v for (n, k), v in med.items()},
                   "best": {n: {"median_s": t, "kernel": k} for n, (t, k) in best.items()}}  # fmt: skip
            self.block_cmp.append(row)
            self.log(f"   M=1 blocks vs {u} (interleaved): "
                     + ", ".join(f"{n} {t * 1e3:.3f} ms ({k[4:]})" for n, (t, k) in best.items())
                     + f", ORT {row['ort_s'] * 1e3:.3f} ms")  # fmt: skip

    # ----------------------------------------------------------------------- per pattern

    def run_pattern(self, ctx: dict, w: np.ndarray, p: Pattern) -> None:
        import scipy.sparse as sp
        import torch

        args = self.args
        ws = prune(w, p)
        nnz = int(np.count_nonzero(ws))
        keys = {key for m in args.ms for key, _ in tvm_candidates(p, m)}
        t0 = time.perf_counter()
        packed = pack_pattern(ws, p, keys)
        a_csr = sp.csr_array(ws)
        t_csr = torch.from_numpy(ws).to_sparse_csr()
        self.log(f"-- {p.label}: nnz {nnz / ws.size:.3f}, packed in {time.perf_counter() - t0:.1f} s")
        # (name, copies, bytes per copy, call(copy, x, x.T)) of the other libraries' sparse kernels
        libs = []
        nbytes = a_csr.data.nbytes + a_csr.indices.nbytes + a_csr.indptr.nbytes
        sci = [a_csr.copy() for _ in range(n_copies(nbytes, args.min_mb, args.min_copies))]
        libs.append(("scipy_csr", sci, nbytes, lambda a, xv, txv: a @ xv))
        nbytes = sum(
            t.numel() * t.element_size() for t in (t_csr.values(), t_csr.col_indices(), t_csr.crow_indices())
        )
        tor = [t_csr.clone() for _ in range(n_copies(nbytes, args.min_mb, args.min_copies))]
        libs.append(("torch_csr", tor, nbytes, lambda a, xv, txv: a @ txv))
        if p.kind == "block":
            a_bsr = sp.bsr_array(ws, blocksize=p.block)
            nbytes = a_bsr.data.nbytes + a_bsr.indices.nbytes + a_bsr.indptr.nbytes
            bsr = [a_bsr.copy() for _ in range(n_copies(nbytes, args.min_mb, args.min_copies))]
            libs.append(("scipy_bsr", bsr, nbytes, lambda a, xv, txv: a @ xv))
        est: dict[str, tuple[float, int]] = {}  # library -> (seconds per call, at M)
        for m in args.ms:
            cell = self.run_cell(ctx, ws, nnz, p, m, packed, libs, est)
            self.records.append(cell)

    def run_cell(
        self, ctx: dict, ws, nnz: int, p: Pattern, m: int, packed: dict, libs: list, est: dict
    ) -> dict:
        args, k, n = self.args, ctx["k"], ctx["n"]
        x = ctx["xs"][m]
        xt = np.ascontiguousarray(x.T)
        xv = xt[:, 0].copy() if m == 1 else xt  # scipy / torch compute (A @ X.T).T
        txv = __import__("torch").from_numpy(xv)
        cell = {"shape": ctx["shape"], "k": k, "n": n, "m": m, "pattern": p.name, "label": p.label,
                "sparsity": 1 - nnz / ws.size, "dense_bytes": ws.nbytes, "methods": {},
                "ort_cell": []}  # fmt: skip
        ref = x.astype(np.float64) @ ws.T.astype(np.float64)
        tol = 1e-4 * np.abs(ref).max() + 1e-3
        sessions = ctx["sessions"]
        if m <= args.ort_each_max_m:  # ORT again, right before the TVM kernels
            cell["ort_cell"].append(
                self.timed(lambda i: sessions[i].run(None, {"X": x}), ctx["nc"]).to_dict()
            )
        for key, sched in tvm_candidates(p, m):
            t0 = time.perf_counter()
            kern = build_candidate(self.ck, key, packed, p, m, self.target, sched)
            tb = time.perf_counter() - t0
            err = float(np.abs(kern(x) - ref).max())
            if err > tol:
                raise AssertionError(f"{key} M={m} {p.name}: max abs err {err:.3g} > {tol:.3g}")
            meth = ctx["copies"].method(f"tvm_{key}", kern, f"{key} {kern.schedule}")
            t = self.timed(meth.call, meth.copies)
            if m == 1:  # candidates for the interleaved blocks-vs-unstructured comparison
                ctx["m1"].setdefault(p.name, []).append((meth, t.median))
            cell["methods"][meth.name] = {
                **t.to_dict(), "weight_bytes": meth.weight_bytes, "build_s": round(tb, 2),
                "gbs": (meth.weight_bytes + 4 * m * (k + n)) / t.median / 1e9,
                "schedule": {kk: (list(v) if isinstance(v, tuple) else v) for kk, v in kern.schedule.items()},
            }  # fmt: skip
        if m <= args.ort_each_max_m:  # ... and right after them
            cell["ort_cell"].append(
                self.timed(lambda i: sessions[i].run(None, {"X": x}), ctx["nc"]).to_dict()
            )
        for name, mats, nbytes, call in libs:
            if name in est:
                prev, prev_m = est[name]
                guess = prev * m / prev_m
                if guess > args.skip_s:
                    cell["methods"][name] = {"skipped": f"estimated {guess:.0f} s per call"}
                    continue
            t = self.timed(lambda i, mats=mats, call=call: call(mats[i], xv, txv), len(mats))
            gbs = (nbytes + 4 * m * (k + n)) / t.median / 1e9
            cell["methods"][name] = {**t.to_dict(), "weight_bytes": nbytes, "gbs": gbs}
            est[name] = (t.median, m)
        cell["elapsed_s"] = self.elapsed()
        tvm_times = {kk: v["median_s"] for kk, v in cell["methods"].items() if kk.startswith("tvm_")}
        best = min(tvm_times, key=tvm_times.get)
        times = " ".join(
            f"{kk}={v['median_s'] * 1e3:.2f}" if "median_s" in v else f"{kk}=skip"
            for kk, v in cell["methods"].items()
        )
        self.log(f"   M={m:<3} {p.name:<9} best {best:<11} {tvm_times[best] * 1e3:8.3f} ms | {times} "
                 f"(load {os.getloadavg()[0]:.2f})")  # fmt: skip
        return cell

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.start, 1)

    def meta(self) -> dict[str, Any]:
        import onnxruntime
        import scipy
        import torch
        import tvm

        return {
            "host": platform.node(),
            "cpu": _cpu_name(),
            "mcpu": str(self.target.attrs["mcpu"]),
            "threads": THREADS,
            "python": sys.version.split()[0],
            "versions": {
                "tvm": tvm.__version__,
                "numpy": np.__version__,
                "scipy": scipy.__version__,
                "torch": torch.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
            "min_mb": self.args.min_mb,
            "min_copies": self.args.min_copies,
            "seconds": self.elapsed(),
            "argv": sys.argv[1:],
        }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# --------------------------------------------------------------------------- report


def dense_time(result: dict[str, Any], shape: str, m: int, method: str) -> float | None:
    ts = [b["median_s"] for b in result["baselines"]
          if b["shape"] == shape and b["m"] == m and b["method"] == method]  # fmt: skip
    return min(ts) if ts else None


def summarise(result: dict[str, Any]) -> None:
    """Adds ratios and the best TVM kernel to every cell (in place)."""
    for c in result["cells"]:
        ort = dense_time(result, c["shape"], c["m"], "ort")
        if c.get("ort_cell"):  # timed just before and after this cell's TVM kernels: the faster
            ort = min(v["median_s"] for v in c["ort_cell"])
        c["ort_s"] = ort
        for name in ("tvm_dense", "tvm_dense_alt", "numpy"):
            t = dense_time(result, c["shape"], c["m"], name)
            c[name] = {"median_s": t, "x_ort": ort / t if t and ort else None}
        for v in c["methods"].values():
            if "median_s" in v and ort:
                v["x_ort"] = ort / v["median_s"]
        tvm = {kk: v for kk, v in c["methods"].items() if kk.startswith("tvm_") and "median_s" in v}
        best = min(tvm, key=lambda kk: tvm[kk]["median_s"])
        c["best"] = best
        c["bytes_bound"] = c["dense_bytes"] / tvm[best]["weight_bytes"]
        # what a compile runs: the fastest of the sparse kernels and both dense schedules
        options = {kk: v["median_s"] for kk, v in tvm.items()}
        for name in ("tvm_dense", "tvm_dense_alt"):
            if c[name]["median_s"]:
                options[name] = c[name]["median_s"]
        pick = min(options, key=options.get)
        c["dispatch"] = {
            "method": pick,
            "median_s": options[pick],
            "x_ort": ort / options[pick] if ort else None,
        }


DISPATCH_GOAL = 0.97  # after dispatch, every point at least this x ORT
GOALS = [  # (M, pattern, minimum x ORT)
    (1, "u70", 2.5), (1, "u90", 5.0), (1, "u95", 7.0), (8, "u70", 2.0), (8, "u90", 4.0),
]  # fmt: skip


def goal_rows(result: dict[str, Any]) -> list[str]:
    cells = {(c["shape"], c["m"], c["pattern"]): c for c in result["cells"]}
    shapes = list(dict.fromkeys(c["shape"] for c in result["cells"]))
    lines = ["| goal | " + " | ".join(f"W {s}" for s in shapes) + " |", "|---|" + "---|" * len(shapes)]
    for m, pat, need in GOALS:
        row = []
        for s in shapes:
            c = cells.get((s, m, pat))
            if c is None:
                row.append("–")
                continue
            x = c["methods"][c["best"]]["x_ort"]
            row.append(f"{x:.2f}x {'met' if x >= need else 'MISSED'}")
        lines.append(f"| M={m}, {pat}: ≥ {need}x ORT | " + " | ".join(row) + " |")
    # blocks at least as fast as unstructured at equal sparsity (M = 1): times of the
    # interleaved comparison (`Runner.compare_blocks`), best kernel of each pattern
    cmp = {(r["shape"], round(r["sparsity"] * 100)): r for r in result.get("blocks_vs_unstructured", [])}
    for s_ in (70, 90):
        row = []
        for s in shapes:
            r = cmp.get((s, s_))
            if r is None:
                row.append("–")
                continue
            tu = r["best"][r["unstructured"]]["median_s"]
            blocks = {n: v for n, v in r["best"].items() if n != r["unstructured"]}
            worst = max(blocks, key=lambda n: blocks[n]["median_s"])
            ratio = tu / blocks[worst]["median_s"]
            verdict = "met" if ratio >= 1.0 else "MISSED"
            row.append(f"{worst[1:].split('_')[0]} ({blocks[worst]['kernel'][4:]}) {ratio:.2f}x {verdict}")
        lines.append(
            f"| M=1, slowest block pattern at {s_} % ≥ unstructured (interleaved, t_unstr. / t_block) | "
            + " | ".join(row)
            + " |"
        )
    row = []
    for s in shapes:
        bad = []
        for c in result["cells"]:
            if c["shape"] != s:
                continue
            t = c["methods"][c["best"]]["median_s"]
            for other in ("scipy_csr", "scipy_bsr", "torch_csr"):
                v = c["methods"].get(other, {})
                if "median_s" in v and v["median_s"] <= t:
                    bad.append(f"{c['pattern']} M={c['m']} {other}")
        row.append("met" if not bad else "MISSED: " + ", ".join(bad))
    lines.append("| faster than scipy and torch sparse at every point | " + " | ".join(row) + " |")
    row = []
    for s in shapes:
        worst = min((c for c in result["cells"] if c["shape"] == s), key=lambda c: c["dispatch"]["x_ort"])
        x = worst["dispatch"]["x_ort"]
        row.append(
            f"min {x:.2f}x ({worst['pattern']} M={worst['m']}) {'met' if x >= DISPATCH_GOAL else 'MISSED'}"
        )
    lines.append(f"| after dispatch ≥ {DISPATCH_GOAL}x ORT at every point | " + " | ".join(row) + " |")
    return lines


def _cellfmt(v: dict[str, Any] | None) -> str:
    if not v:
        return "–"
    if "skipped" in v:
        return f"skipped ({v['skipped']})"
    return f"{v['median_s'] * 1e3:.3g} / {v['x_ort']:.2f}x / {v['gbs']:.0f}"


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        "# CPU sparse kernels vs onnxruntime dense, cold cache",
        "",
        f"`python benchmarks/cpu_kernels.py {' '.join(meta['argv'])}` on {meta['cpu']} "
        f"(LLVM mcpu {meta['mcpu']}), {meta['threads']} threads, {meta['seconds']:.0f} s; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ".",
        "",
        "Y[M, N] = X[M, K] @ W, fp32; W is K x N as ONNX stores it (canonical W[N, K] for the kernels). "
        "Block r x c = r outputs x c inputs of canonical W[N, K]: **16x1 = 16 consecutive outputs** "
        "(16 adjacent entries of one row of the ONNX K x N matrix), **1x16 = 16 consecutive inputs** of "
        "one output (16 adjacent entries of one column of the ONNX matrix). "
        f"Cold cache: each method cycles through ≥ {meta['min_copies']} copies and ≥ {meta['min_mb']:.0f} MB "
        "of its weights. Cells: **median ms / speedup vs ORT dense / GB/s** of the bytes the method moves "
        "(weights + X + Y); the ORT reference of a cell with M ≤ 8 is ORT timed right before and after "
        "that cell's TVM kernels (the faster of the two), else the faster of the two per-shape runs. "
        "*bytes bound* = dense bytes ÷ bytes of the TVM kernel's format. "
        "scipy is single-threaded; everything else uses 2 threads. "
        "`load` is the 1-minute load average, `foreign` the share of the 2 CPUs other processes used "
        "during the measurement (0 = quiet).",
        "",
        "## Goals",
        "",
        *goal_rows(result),
        "",
        "## Dense baselines (ms / GB/s; best of two runs)",
        "",
        "| W (K x N) | M | ORT dense | TVM dense (packed) | TVM dense, 2nd schedule | numpy |",
        "|---|---|---|---|---|---|",
    ]
    shapes = list(dict.fromkeys(b["shape"] for b in result["baselines"]))
    ms = sorted({b["m"] for b in result["baselines"]})
    for s in shapes:
        for m in ms:
            row = []
            for meth in ("ort", "tvm_dense", "tvm_dense_alt", "numpy"):
                bs = [
                    b for b in result["baselines"] if b["shape"] == s and b["m"] == m and b["method"] == meth
                ]
                if not bs:
                    row.append("–")
                    continue
                b = min(bs, key=lambda b: b["median_s"])
                row.append(f"{b['median_s'] * 1e3:.3g} / {b['gbs']:.0f} (load {b['load']:.1f}, "
                           f"foreign {b['foreign']:.2f})")  # fmt: skip
            lines.append(f"| {s} | {m} | " + " | ".join(row) + " |")
    for s in shapes:
        lines += [
            "",
            f"## W {s} (K x N)",
            "",
            "| pattern | M | ORT dense ms | TVM best (kernel) | bytes bound | TVM dense | after dispatch "
            "| numpy | scipy CSR | scipy BSR | torch CSR | load / foreign |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in result["cells"]:
            if c["shape"] != s:
                continue
            b = c["methods"][c["best"]]
            td, tn, dp = c["tvm_dense"], c["numpy"], c["dispatch"]
            lines.append(
                f"| {c['label']} | {c['m']} | {c['ort_s'] * 1e3:.3g} | **{_cellfmt(b)}** ({c['best'][4:]}) "
                f"| {c['bytes_bound']:.2f}x "
                f"| {td['x_ort']:.2f}x | {dp['x_ort']:.2f}x ({dp['method'][4:]}) | {tn['x_ort']:.2f}x "
                f"| {_cellfmt(c['methods'].get('scipy_csr'))} | {_cellfmt(c['methods'].get('scipy_bsr'))} "
                f"| {_cellfmt(c['methods'].get('torch_csr'))} | {b['load']:.1f} / {b['foreign']:.2f} |"
            )
    cmp_rows = result.get("blocks_vs_unstructured", [])
    if cmp_rows:
        lines += ["", "## M = 1: block patterns vs unstructured, timed interleaved", "",
                  "Each pattern's kernels that dispatch could pick (within "
                  f"{KEEP_WITHIN:.2f}x of their cell's best) and ORT, timed in alternating rounds "
                  "(a burst of one cold call per weight copy each), median per kernel; a pattern's time "
                  "is its fastest kernel's. ms (kernel), and t_unstructured / t_pattern.", "",
                  "| W | sparsity | ORT dense | unstructured | block patterns | load |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in cmp_rows:
            u = r["best"][r["unstructured"]]
            bl = ", ".join(
                f"{n}: {v['median_s'] * 1e3:.3f} ({v['kernel'][4:]}) {u['median_s'] / v['median_s']:.2f}x"
                for n, v in r["best"].items()
                if n != r["unstructured"]
            )
            ut = f"{u['median_s'] * 1e3:.3f} ({u['kernel'][4:]})"
            lines.append(f"| {r['shape']} | {r['sparsity']:.0%} | {r['ort_s'] * 1e3:.3f} | {ut} | {bl} "
                         f"| {r['load']} |")  # fmt: skip
    lines += ["", "## Every TVM kernel timed", "",
              "| W | pattern | M | kernel | ms / x ORT / GB/s | schedule |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for c in result["cells"]:
        for kk, v in c["methods"].items():
            if kk.startswith("tvm_"):
                lines.append(f"| {c['shape']} | {c['pattern']} | {c['m']} | {kk[4:]} | {_cellfmt(v)} "
                             f"| `{v.get('schedule')}` |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(c["shape"] for c in result["cells"]))
    ms = sorted({c["m"] for c in result["cells"]})
    fig, axes = plt.subplots(len(ms), len(shapes), figsize=(5.2 * len(shapes), 3.2 * len(ms)), squeeze=False)
    series = [("best", "TVM best", "tab:blue"), ("torch_csr", "torch CSR", "tab:orange"),
              ("scipy_csr", "scipy CSR", "tab:green"), ("scipy_bsr", "scipy BSR", "tab:olive")]  # fmt: skip
    for i, m in enumerate(ms):
        for j, s in enumerate(shapes):
            ax = axes[i][j]
            cells = [c for c in result["cells"] if c["shape"] == s and c["m"] == m]
            xs = np.arange(len(cells))
            width = 0.8 / len(series)
            for q, (key, label, color) in enumerate(series):
                vals = []
                for c in cells:
                    v = c["methods"].get(c["best"] if key == "best" else key, {})
                    vals.append(v.get("x_ort", np.nan) if "median_s" in v else np.nan)
                ax.bar(xs + (q - 1.5) * width, vals, width, label=label, color=color)
            bound = [c["bytes_bound"] for c in cells]
            ax.scatter(xs, bound, marker="_", s=200, color="k", label="bytes bound", zorder=3)
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_yscale("log")
            ax.set_xticks(xs, [c["pattern"] for c in cells], rotation=45, ha="right", fontsize=7)
            ax.set_title(f"W {s}, M={m}", fontsize=9)
            if j == 0:
                ax.set_ylabel("speedup vs ORT dense")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Cold-cache speedup over onnxruntime dense (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK}")
    ap.add_argument("--shapes", type=lambda s: s.split(","), help="K x N list, e.g. 4096x11008,11008x4096")
    ap.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], help="e.g. 1,8")
    ap.add_argument("--patterns", type=lambda s: s.split(","), help=f"from {PATTERNS}")
    ap.add_argument("--min-mb", type=float, default=128.0, help="weight bytes cycled per method (MB)")
    ap.add_argument("--min-copies", type=int, default=4)
    ap.add_argument("--min-time", type=float, default=0.25, help="seconds of timed calls per measurement")
    ap.add_argument("--max-time", type=float, default=1.5)
    ap.add_argument("--skip-s", type=float, default=3.0,
                    help="skip a library call estimated (from the previous M) to take longer")  # fmt: skip
    ap.add_argument("--ort-each-max-m", type=int, default=8,
                    help="for M up to this, time ORT again before and after each cell's TVM kernels and "
                         "use the faster of those two for the cell's ratios")  # fmt: skip
    ap.add_argument("--compare-rounds", type=int, default=15,
                    help="interleaved rounds of the M=1 blocks-vs-unstructured comparison")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_kernels")
    ap.add_argument("--silent", action="store_true")
    args = ap.parse_args(argv)
    for key in ("shapes", "ms", "patterns"):
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else globals()[key.upper()])
    for pname in args.patterns:
        parse_pattern(pname)
    result = Runner(args).run()
    summarise(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    md = markdown(result)
    args.out.with_suffix(".md").write_text(md)
    plot(result, args.out.with_suffix(".png"))
    if not args.silent:
        print(md)


if __name__ == "__main__":
    main()
