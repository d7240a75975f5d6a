"""Compile a portable ONNX model for a CUDA GPU: `OUT/module.so` + `params.npz` + `manifest.json`.

The same path as `llvm_compile` (one static-shape function per bucket, weights lifted into
`params.npz`, the same manifest), with three differences:

* Kernels: each linear op with a float32 constant weight is offered to `cuda_dispatch`,
  which keeps a sparse kernel from `cuda_kernels` (W packed in fp16, fp32 accumulation,
  X and Y in the model's float32) only where it beats the dense matmul, measured on the
  GPU when one is visible, else by the bytes model. Everything else, the dense matmuls
  included, stays in the model's dtype (float32) and gets dlight's default GPU schedules
  (`relax_build.compile_cuda_module`). There is no half-precision option for the dense
  part: a model exported in fp16 compiles in fp16.
* No GPU is needed to compile: the CUDA source is generated inside ``with target:`` and is
  compiled to a cubin where TVM's CUDA runtime is present, else when the module is loaded
  on the GPU (NVRTC by default, nvcc with ``TVM_CUDA_COMPILE_MODE=nvcc``).
* With a GPU visible the compiled buckets are timed on it (synchronised wall clock, median)
  against the same model built dense only; a bucket where the dense build is faster ships
  dense, as on the CPU. Without a GPU nothing is timed and the manifest says so.

Pattern rewrites (`rewrites.FACTORIES`) run as on the CPU; each factory declines targets it
has no kernel for.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import onnx

from sparsegraph.model import Model
from sparsegraph.pass_manager import PassContext
from sparsegraph.passes.analysis.roles import Roles
from sparsegraph.passes.rewrite.activation_sparsity import calibrated_sparsities

from .llvm_compile import (
    MANIFEST,
    bucket_feeds,
    buckets_for,
    export_module,
    label_and_compare,
    linear_weights,
    manifest_files,
    manifest_header,
    op_decisions,
    ship_faster,
    time_vm,
    write_json,
)


def compile_cuda(
    portable: str | Path,
    out_dir: str | Path,
    *,
    target: Any,
    batch_sizes: list[int] = (1,),
    seq_len: int = 1,
    reference: str | Path | None = None,
    db_path: str | Path | None = None,
    seed: int = 0,
    measure_kernels: bool | None = None,
) -> dict[str, Any]:
    """Build `out_dir/module.so`, `params.npz` and `manifest.json` for `portable` on the CUDA
    `target` (a `tvm.target.Target` of kind cuda); returns the manifest.

    `reference` is the original model, timed in onnxruntime (CPU) for the comparison when
    a GPU is visible. `measure_kernels` (default: a GPU is visible) picks measured dispatch
    over the bytes model.
    """
    import tvm

    from . import relax_build
    from .cuda_dispatch import CUDADispatcher, gpu_visible
    from .dispatch import TuningDB
    from .rewrites import RewriteContext, pattern_rewrites

    start = time.perf_counter()
    portable, out_dir = Path(portable), Path(out_dir)
    model = Model.load(portable)
    ctx = PassContext(seed)
    roles = ctx.get(Roles, model)
    weights = linear_weights(model, portable, ctx)
    db = TuningDB(db_path)
    buckets = buckets_for(model, list(batch_sizes), seq_len)
    proto = onnx.load(str(portable))
    measure = gpu_visible()
    called: dict[int, tuple[set[str], set[str]]] = {}  # per build (id of its executable): the
    # kernel symbols it runs and the functions it calls by name (cuBLAS)
    fused: list[dict[str, Any]] = []  # pattern-rewrite decisions of the last build

    def build(dispatcher: CUDADispatcher, dense_tags: frozenset[str] = frozenset()):
        symbols: set[str] = set()
        externs: set[str] = set()

        def choose(key: str, m: int, tag: str):
            name, w = weights[key]
            kernel = None if tag in dense_tags else dispatcher.kernel(name, w, m)
            if kernel is not None:
                (externs if kernel.extern else symbols).add(kernel.extern or kernel.symbol)
            return kernel

        rctx = RewriteContext(target, True, db, dense_tags, act_sparsity=calibrated_sparsities(model))
        built = relax_build.build_module(
            proto, buckets, choose, set(weights), target, rewrites=pattern_rewrites(rctx)
        )
        if not dense_tags:  # the decisions for every bucket, not the dense baseline's
            fused[:] = rctx.decisions
        called[id(built[0])] = (symbols, externs)
        return built

    chosen = CUDADispatcher(target, db, measure=measure if measure_kernels is None else measure_kernels)
    executable, swaps, params, param_names = build(chosen)
    timing: dict[str, dict[str, Any]] = {}
    if measure:
        dev = tvm.cuda(0)
        feeds = {tag: bucket_feeds(model, shapes, seed) for tag, shapes in buckets.items()}
        for tag, f in feeds.items():
            timing[tag] = {"compiled": time_vm(executable, f"main_{tag}", f, params, param_names, dev=dev)}
        slower: frozenset[str] = frozenset(buckets)
        if swaps:
            (executable, swaps, params, param_names), slower = ship_faster(
                build,
                chosen,
                chosen,
                feeds,
                timing,
                (executable, swaps, params, param_names),
                functools.partial(time_vm, dev=dev),
            )
        label_and_compare(timing, slower, reference, feeds)
    export_module(executable, params, out_dir)
    db.save()
    manifest = {
        **manifest_header(model, target, buckets, param_names),
        "cache_regime": "cold",  # kernels are timed with L2 flushed
        "measured": chosen.measure,
        "weight_dtypes": {"sparse_kernels": "float16", "dense": "model dtype (float32)"},
        "ops": op_decisions(weights, roles, chosen),
        "timing_seconds": timing,
        "kernels_swapped": len(swaps),
        "kernel_formats": sorted({fmt for _, _, fmt in swaps}),
        "kernel_symbols": sorted(called[id(executable)][0]),
        "extern_functions": sorted(called[id(executable)][1]),  # `runtime.Session` registers them
        "fused": fused,
        "compile_seconds": round(time.perf_counter() - start, 2),
        "tuning_db": {"path": str(db.path), "hits": db.hits},
        **manifest_files(out_dir, portable),
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest
