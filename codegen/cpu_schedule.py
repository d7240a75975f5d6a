"""CPU schedules for the TIR functions our kernels do not cover, and the CPU compile pipeline.

TVM's CPU Relax pipeline legalizes and fuses every op into TIR but schedules nothing: what
our kernels do not replace (norms, RoPE, softmax, the attention matmuls whose operands are
both activations, elementwise ops) runs as serial scalar loops. `compile_cpu` runs TVM's
CPU pipeline with one extra step after fusion, `schedule_pass`: every PrimFunc that is not
already scheduled (our kernels carry ``tirx.is_scheduled``) gets the first rule that fits:

* `Matmul`: one reduction block ``Y[s..., i, j] += A[.., i, k] * B[.., k, j]`` left after
  inlining, then only elementwise epilogues (the attention scale and mask: applied as the
  accumulator is written back), with a long innermost
  spatial axis: parallel over the leading spatial axes and tiles of up to 4 rows ``i``; per
  tile the reduction outside a ``j`` strip of up to 64 outputs, the tile x strip kept in
  registers (an accumulator written back once, 16 zmm at most), vectorised by 16;
* dlight's `cpu.GEMV`;
* `Fallback`: inline what can be inlined; per remaining block, fuse the spatial loops,
  vectorise a 16-wide inner piece, parallelise the rest when the block is large enough to
  pay for a parallel launch (`PARALLEL_MIN` iterations); reductions keep their reduction
  loops serial inside the parallel spatial loop.

Measured on the Llama-7B-shaped layer (`benchmarks/llama_layer.py`'s model, dense kernels,
single thread, CPU time, Zen 5): at 64 tokens the functions outside our kernels went from
17.4 ms (Q @ K^T 7.9 ms, P @ V 5.5 ms unscheduled) to 4.0 ms, the layer from 1.01x to 1.12x
onnxruntime; at one token they were already 0.18 ms of ~20 ms (now 0.09 ms, and FuseOps cut
the VM's tensor allocations from 62 to 25 per step), so there the dense kernels decide.
Q @ K^T at 512 tokens ([32, 512, 128] @ [32, 128, 512], one thread): unscheduled 1.2 s,
one row per tile 40 ms, 4-row tiles 10.6 ms (onnxruntime 10.2 ms).
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import s_tir, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.s_tir import dlight as dl

__all__ = ["PARALLEL_MIN", "Fallback", "Matmul", "compile_cpu", "schedule_pass"]

#: block iterations below which a loop stays serial (a parallel launch costs ~5-20 us)
PARALLEL_MIN = 1 << 15
VLEN = 16  # float32 lanes of a zmm register (LLVM splits wider vectors on AVX2)


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _vectorize_tail(sch: s_tir.Schedule, loop, lanes: int = VLEN) -> Any:
    """Split `loop` by `lanes` (when it divides) and vectorise the inner part; returns the outer."""
    ext = _extent(sch, loop)
    if ext is None or ext < 4:
        return loop
    if ext % lanes == 0 and ext > lanes:
        outer, inner = sch.split(loop, [None, lanes])
        sch.vectorize(inner)
        return outer
    if ext <= lanes:
        sch.vectorize(loop)
        return None
    return loop


def _parallel(sch: s_tir.Schedule, loops: list, work: int) -> None:
    """Fuse `loops` and parallelise them when `work` (block iterations) is worth a launch."""
    if not loops or work < PARALLEL_MIN:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if (_extent(sch, fused) or 0) >= 2:
        sch.parallel(fused)


def _product(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _inlined(func: Any, target: Any) -> tuple[s_tir.Schedule, list] | None:
    """A schedule of an llvm-target PrimFunc with its blocks normalised and the injective
    ones inlined (dlight's helpers), and the remaining blocks; None when not applicable."""
    if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
        return None
    sch = s_tir.Schedule(func)
    blocks = dl.normalize_prim_func(sch)
    if blocks is None:
        return None
    return sch, dl.try_inline(sch, blocks)


class Matmul(dl.ScheduleRule):
    """Batched matmul of two activations (see the module docstring)."""

    def apply(self, func: tirx.PrimFunc, target: Any, _: bool) -> s_tir.Schedule | None:
        found = _inlined(func, target)
        if found is None:
            return None
        sch, blocks = found
        info, epilogues = blocks[0], blocks[1:]
        if info.is_injective() or not all(e.is_injective() for e in epilogues):
            return None
        kinds = info.dom_kind()
        if kinds.count("R") != 1 or not kinds.endswith("R") or len(kinds) < 3:
            return None
        stmt = sch.get(info.block_rv)
        if len(stmt.reads) != 2 or len(stmt.writes) != 1:
            return None
        loops = sch.get_loops(info.block_rv)
        exts = [_extent(sch, lp) for lp in loops]
        if any(e is None for e in exts):
            return None
        *outer, row, col, red = loops
        ncol = exts[-2]
        if ncol < VLEN or ncol % VLEN:
            return None
        strip = max(d for d in (64, 48, 32, 16) if ncol % d == 0)
        # rows per register tile: up to 16 zmm accumulators (4 independent FMA chains per row
        # would leave the FMA pipes half idle on their 4-cycle latency)
        rt = max(d for d in (4, 2, 1) if exts[-3] % d == 0 and d * strip <= 16 * VLEN)
        ro, ri = sch.split(row, [None, rt])
        co, ci = sch.split(col, [None, strip])
        sch.reorder(*outer, ro, co, red, ri, ci)
        acc = sch.cache_write(info.block_rv, 0, "local")
        for e in epilogues:  # scale, mask, ...: applied where the accumulator is written back
            try:
                sch.reverse_compute_inline(e.block_rv)
            except RuntimeError:  # s_tir.ScheduleError: not an elementwise read of Y
                return None
        sch.reverse_compute_at(acc, co)
        _parallel(sch, [*outer, ro], _product(exts))
        sch.unroll(ri)
        cio, cii = sch.split(ci, [None, VLEN])
        sch.unroll(cio)
        sch.vectorize(cii)
        init = sch.decompose_reduction(info.block_rv, red)
        _vectorize_tail(sch, sch.get_loops(init)[-1])
        _vectorize_tail(sch, sch.get_loops(acc)[-1])
        return sch


class Fallback(dl.ScheduleRule):
    """Inline, then parallel outer + vectorised inner loops per block (module docstring)."""

    def apply(self, func: tirx.PrimFunc, target: Any, _: bool) -> s_tir.Schedule | None:
        found = _inlined(func, target)
        if found is None:
            return None
        sch, blocks = found
        for info in blocks:
            loops = sch.get_loops(info.block_rv)
            exts = [_extent(sch, lp) for lp in loops]
            if not loops or any(e is None for e in exts):
                continue
            kinds = info.dom_kind()
            work = _product(exts)
            if info.is_injective() and len(loops) == len(kinds):
                fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
                outer = _vectorize_tail(sch, fused)
                if outer is not None:
                    _parallel(sch, [outer], work)
                continue
            lead = 0
            while lead < len(kinds) and lead < len(loops) and kinds[lead] == "S":
                lead += 1
            _parallel(sch, loops[:lead], work)
        return sch


class _Guarded(dl.ScheduleRule):
    """A rule that declines (None) where it raises: dlight's CPU rules assert on some shapes
    (``cpu.GEMV`` on a GEMV-like function without reduction loops), and a schedule primitive
    that does not apply raises; the next rule then gets the function."""

    def __init__(self, rule: dl.ScheduleRule):
        self.rule = rule

    def apply(self, func: tirx.PrimFunc, target: Any, tunable: bool) -> Any:
        try:
            return self.rule.apply(func, target, tunable)
        except (RuntimeError, AssertionError, ValueError, IndexError, TypeError):
            return None


def schedule_pass() -> tvm.transform.Pass:
    """Schedules every not-yet-scheduled PrimFunc of a module (rules in the module docstring)."""
    # not dlight's cpu.Reduction: on RMSNorm at M = 1 ([1, 1, 4096]) its schedule recomputes
    # the mean per element (7.9 ms a call instead of ~5 us)
    rules = (Matmul(), dl.cpu.GEMV(), Fallback())
    return dl.ApplyDefaultSchedule(*(_Guarded(r) for r in rules))


def compile_cpu(mod: tvm.IRModule, target: Any) -> Any:
    """`tvm.compile` of a Relax module for an llvm `target`, with `schedule_pass` between
    TVM's CPU legalize/fuse passes and its lowering passes."""
    passes = (
        cpu_pipeline.library_dispatch_passes(target)
        + cpu_pipeline.legalize_passes(target)
        + [schedule_pass()]
        + cpu_pipeline.dataflow_lower_passes(target)
        + cpu_pipeline.finalize_passes(target)
    )
    with target:
        mod = tvm.transform.Sequential(passes)(mod)
        return tvm.compile(mod, target=target, relax_pipeline=None)
