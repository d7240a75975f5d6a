"""Compile a portable ONNX model for the host CPU: `OUT/module.so` + `OUT/manifest.json`.

One function per static-shape bucket (`--batch-sizes`, `--seq-len`); every linear op with a
float32 constant weight runs the kernel that measured dispatch chose for its M (sparse or
dense packed), everything else TVM's default lowering. The compiled model is then timed
against the same model compiled with dense kernels only; a bucket where the dense build is
faster ships dense, so a compiled model is never slower than its dense compilation. Both
are also compared with onnxruntime on the original model.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from sparsegraph.errors import UsageError
from sparsegraph.feeds import random_feeds
from sparsegraph.model import Model
from sparsegraph.pass_manager import PassContext
from sparsegraph.passes.analysis.roles import Roles
from sparsegraph.passes.analysis.sparsifiable import SparsifiableOps
from sparsegraph.passes.rewrite.activation_sparsity import calibrated_sparsities

MODULE = "module.so"
PARAMS = "params.npz"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
#: a compiled bucket may be at most this much slower than its dense build before dense ships instead
NOISE = 1.02


def buckets_for(model: Model, batch_sizes: list[int], seq_len: int = 1) -> dict[str, dict[str, list[int]]]:
    """Static input shapes per batch size: axis 0 symbolic dims = batch, other symbolic dims = seq_len."""
    out = {}
    for b in batch_sizes:
        shapes = {}
        for t in model.graph.inputs:
            if isinstance(t, gs.Constant):
                continue
            dims = list(t.shape or [])
            shapes[t.name] = [
                d if isinstance(d, int) and d >= 0 else (b if i == 0 else seq_len) for i, d in enumerate(dims)
            ]
        out[f"b{b}_s{seq_len}"] = shapes
    return out


def compile_llvm(
    portable: str | Path,
    out_dir: str | Path,
    *,
    batch_sizes: list[int] = (1,),
    seq_len: int = 1,
    reference: str | Path | None = None,
    target: Any = None,
    tune_trials: int = 2,
    db_path: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Build `out_dir/module.so` and `manifest.json` for `portable`; returns the manifest.

    `reference` is the original model, timed in onnxruntime for the comparison.
    """
    from . import relax_build
    from .dispatch import Dispatcher, TuningDB, llc_bytes
    from .rewrites import RewriteContext, pattern_rewrites
    from .target import host_target

    start = time.perf_counter()
    portable, out_dir = Path(portable), Path(out_dir)
    model = Model.load(portable)
    relax_build.share_weights(model)  # one copy of the weights, in TVM memory, for everything below
    target = target or host_target()
    ctx = PassContext(seed)
    roles = ctx.get(Roles, model)
    weights = linear_weights(model, portable, ctx, contiguous=False)
    cold = sum(w.nbytes for _, w in weights.values()) > llc_bytes()
    db = TuningDB(db_path)
    buckets = buckets_for(model, list(batch_sizes), seq_len)

    fused: list[dict[str, Any]] = []

    def build(dispatcher: Dispatcher, dense_tags: frozenset[str] = frozenset()):
        def choose(key: str, m: int, tag: str):
            name, w = weights[key]
            return dense_kernels.kernel(name, w, m) if tag in dense_tags else dispatcher.kernel(name, w, m)

        ctx = RewriteContext(target, cold, db, dense_tags, act_sparsity=calibrated_sparsities(model))
        built = relax_build.build_module(
            model, buckets, choose, set(weights), target, rewrites=pattern_rewrites(ctx)
        )
        if not dense_tags:  # the decisions for every bucket (a bucket shipping dense says so in its timing)
            fused[:] = ctx.decisions
        return built

    chosen = Dispatcher(target, db, cold, tune_trials)
    dense_kernels = Dispatcher(target, db, cold, force="dense")
    executable, swaps, params, param_names = build(chosen)
    sparse_used = any(d.format != "dense" for d in chosen.decisions.values()) or any(
        r.get("rewritten") or r.get("chosen") == "fused" for r in fused
    )  # sparse weight kernels or fused kernels (activation sparsity, sparse attention)
    feeds = {tag: bucket_feeds(model, shapes, seed) for tag, shapes in buckets.items()}
    timing = {
        tag: {"compiled": time_vm(executable, f"main_{tag}", f, params, param_names)}
        for tag, f in feeds.items()
    }
    slower: frozenset[str] = frozenset(buckets)  # buckets that ship dense kernels only
    if sparse_used:
        (executable, swaps, params, param_names), slower = ship_faster(
            build, chosen, dense_kernels, feeds, timing, (executable, swaps, params, param_names), time_vm
        )
    label_and_compare(timing, slower, reference, feeds)
    export_module(executable, params, out_dir)
    db.save()
    manifest = {
        **manifest_header(model, target, buckets, param_names),
        "cache_regime": "cold" if cold else "hot",
        "ops": op_decisions(weights, roles, chosen),
        "fused": fused,
        "timing_seconds": timing,
        "kernels_swapped": len(swaps),
        "compile_seconds": round(time.perf_counter() - start, 2),
        "tuning_db": {"path": str(db.path), "hits": db.hits},
        **manifest_files(out_dir, portable),
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def linear_weights(
    model: Model, portable: Path, ctx: PassContext, contiguous: bool = True
) -> dict[str, tuple[str, np.ndarray]]:
    """`{content key of W_onnx[K, N]: (op name, W[N, K])}` for every MatMul/Gemm with a float32
    constant weight (the ops a compile may hand to a kernel); a model without any is an error.
    With `contiguous` False, W is the model's array seen as [N, K] where that is a view (no
    copy; kernel builders pack from it)."""
    from . import relax_build

    weights: dict[str, tuple[str, np.ndarray]] = {}
    for op in ctx.get(SparsifiableOps, model).linear:
        w = op.weight.matrix()
        if op.op_type in ("MatMul", "Gemm") and w.dtype == np.float32:
            weights[relax_build.weight_key(w.T)] = (op.name, np.ascontiguousarray(w) if contiguous else w)
    if not weights:
        raise UsageError(f"{portable}: no MatMul/Gemm with a float32 constant weight to compile")
    return weights


def export_module(executable, params: dict[str, np.ndarray], out_dir: Path) -> None:
    """Write `out_dir/module.so` and `out_dir/params.npz`, each through a temporary file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".sparsegraph-", dir=out_dir))
    try:
        executable.export_library(str(tmp / MODULE))
        np.savez(tmp / PARAMS, **params)
        os.replace(tmp / PARAMS, out_dir / PARAMS)
        os.replace(tmp / MODULE, out_dir / MODULE)
    finally:
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()


def manifest_header(model: Model, target: Any, buckets: dict, param_names: dict) -> dict[str, Any]:
    """The manifest fields `sparsegraph.runtime.Session` reads: target, inputs, outputs, buckets."""
    return {
        "format_version": FORMAT_VERSION,
        "target": str(target),
        "device": "cuda" if str(target.kind.name) == "cuda" else "cpu",
        "inputs": [{"name": t.name, "dtype": str(np.dtype(t.dtype))} for t in model.graph.inputs],
        "outputs": [t.name for t in model.graph.outputs],
        "buckets": [
            {"tag": tag, "function": f"main_{tag}", "shapes": shapes, "params": param_names[f"main_{tag}"]}
            for tag, shapes in buckets.items()
        ],
    }


def manifest_files(out_dir: Path, portable: Path) -> dict[str, Any]:
    """Hashes of the written artifacts and the portable model's name."""
    return {
        "hashes": {name: _sha256(out_dir / name) for name in (MODULE, PARAMS)}
        | {portable.name: _sha256(portable)},
        "portable": portable.name,
    }


def ship_faster(build, chosen, baseline, feeds, timing, built, timer) -> tuple[Any, frozenset[str]]:
    """Build every bucket with `baseline` (dense) kernels, time it into
    ``timing[tag]["dense_compiled"]``, and rebuild with `chosen` where that was not more
    than `NOISE` slower, the other buckets shipping dense (their "compiled" time becomes the
    dense one). Returns the build to ship and the buckets that ship dense."""
    dense_exec, _, dense_params, dense_names = build(baseline, frozenset(feeds))
    for tag, f in feeds.items():
        timing[tag]["dense_compiled"] = timer(dense_exec, f"main_{tag}", f, dense_params, dense_names)
    del dense_exec, dense_params
    slower = frozenset(t for t, v in timing.items() if v["compiled"] > NOISE * v["dense_compiled"])
    if slower:
        built = build(chosen, slower)
        for tag in slower:
            timing[tag]["compiled"] = timing[tag]["dense_compiled"]
    return built, slower


def label_and_compare(timing, slower, reference, feeds) -> None:
    """Mark each bucket's shipped build and, with a `reference` model, time it in
    onnxruntime on the same feeds (the comparison the report shows)."""
    for tag in timing:
        timing[tag]["shipped"] = "dense" if tag in slower else "dispatched"
    if reference is not None:
        ref_model = Model.load(reference)
        for tag, f in feeds.items():
            timing[tag]["onnxruntime"] = time_ort(Path(reference), feeds_for(ref_model, f))


def bucket_feeds(model: Model, shapes: dict[str, list[int]], seed: int = 0) -> dict[str, np.ndarray]:
    """Random valid inputs (see `sparsegraph.feeds`) with a bucket's static shapes."""
    sizes = {}
    for t in model.graph.inputs:
        for d, v in zip(t.shape or [], shapes.get(t.name, []), strict=False):
            if not isinstance(d, int) and d:
                sizes[str(d)] = v
    return random_feeds(model, seed, sizes=sizes)


def feeds_for(model: Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = {t.name for t in model.graph.inputs}
    return {k: v for k, v in feeds.items() if k in names}


def time_vm(executable, function, feeds, params, param_names, repeat: int = 10, dev=None) -> float:
    """Median wall seconds of one call of `function` on `dev` (default the CPU), synchronised."""
    import tvm
    from tvm import relax

    from .cpu_kernels import as_tvm

    dev = dev or tvm.cpu()
    vm = relax.VirtualMachine(executable, dev)
    args = [tvm.runtime.tensor(v, dev) for v in feeds.values()]
    on_cpu = dev.dlpack_device_type() == tvm.cpu().dlpack_device_type()  # params: their memory, no copy
    args += [
        as_tvm(params[n]) if on_cpu else tvm.runtime.tensor(params[n], dev) for n in param_names[function]
    ]
    fn = vm[function]
    fn(*args)
    dev.sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        dev.sync()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def time_ort(path: Path, feeds: dict[str, np.ndarray], repeat: int = 10) -> float:
    from sparsegraph.validate import session

    sess = session(path)
    sess.run(None, feeds)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def op_decisions(weights, roles, dispatcher) -> list[dict[str, Any]]:
    """Per linear op: role, layer, shape, sparsity and the dispatcher's decision at each M."""
    by_name = {name: w for name, w in weights.values()}
    rows = []
    for name, w in by_name.items():
        role = roles.get(name)
        per_m = {str(m): d.to_dict() for (op, m), d in sorted(dispatcher.decisions.items()) if op == name}
        rows.append(
            {
                "op": name,
                "role": role.role if role else None,
                "layer": role.layer if role else None,
                "shape": list(w.shape),
                "sparsity": float(1 - np.count_nonzero(w) / w.size),
                "decisions": per_m,
            }
        )
    return rows


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
