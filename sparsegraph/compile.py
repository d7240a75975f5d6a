"""The compile pipeline: load, run a recipe, write `portable.onnx` and the report, validate.

`compile_model(model, recipe, out_dir)` is what `sparsegraph compile` runs. Nothing is
written into `out_dir` until every step has succeeded: the artifacts are built in a
staging folder beside it and moved in at the end.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import report as reporting
from .calibration import load_calibration, missing_calibration
from .errors import UsageError, ValidationError
from .feeds import feed_candidates, load_feeds
from .model import Model
from .pass_manager import Pass, PassContext, PassManager
from .passes.analysis.cost_model import CostModel
from .passes.analysis.roles import Roles
from .passes.analysis.sparsifiable import SparsifiableOps
from .recipe import Recipe
from .validate import check_model_file, compare, run, session

PORTABLE = "portable.onnx"


@dataclass
class CompileResult:
    out_dir: Path
    portable: Path
    report: dict[str, Any]


def op_summary(model: Model, ctx: PassContext | None = None) -> dict[str, dict[str, Any]]:
    """Per weighted op: op type, role, layer, shape, params, nonzeros, dense and best bytes."""
    ctx = ctx or PassContext()
    ops = ctx.get(SparsifiableOps, model)
    roles = ctx.get(Roles, model)
    costs = ctx.get(CostModel, model)
    out = {}
    for op in ops:
        role, cost = roles.get(op.name), costs[op.name]
        out[op.name] = {
            "op_type": op.op_type,
            "role": role.role if role else None,
            "layer": role.layer if role else None,
            "shape": list(op.shape),
            "dtype": op.dtype,
            "params": op.shape[0] * op.shape[1],
            "nonzeros": cost.flops_sparse // 2,
            "flops_dense": cost.flops_dense,
            "flops_sparse": cost.flops_sparse,
            "bytes_dense": cost.bytes_dense,
            "bytes_best": cost.bytes_best,
            "best_format": cost.best_format,
            "bytes_by_format": cost.bytes_by_format,
            "bytes_bound": cost.bytes_bound,
        }
    return out


def compile_model(
    model: str | Path,
    recipe: str | Path | dict | list | Recipe,
    out_dir: str | Path,
    *,
    seed: int = 0,
    feeds: str | Path | dict[str, np.ndarray] | None = None,
    validate: bool = True,
    on_pass: Callable[[int, Pass], None] | None = None,
    calib: Any = None,
    tokenizer: Any = None,
    calib_samples: int = 128,
    seqlen: int = 128,
    target: str | None = None,
    batch_sizes: tuple[int, ...] = (1,),
    seq_len: int = 1,
    tune_trials: int = 2,
    tuning_db: str | Path | None = None,
) -> CompileResult:
    """Apply `recipe` to the ONNX file `model`; write `portable.onnx`, `report.json`,
    `report.md` into `out_dir`. Returns the paths and the report dict.

    `calib` is calibration data for passes that need it (`wanda`, `sparsegpt`): a
    `Calibration`, an `.npz` of model inputs (first axis = samples; at most
    `calib_samples` are used), a text file (with `tokenizer`: `calib_samples` seeded
    windows of `seqlen` tokens), or an iterable of feed dicts; see `sparsegraph.calibration`.

    With `target="llvm"` the portable model is also compiled for this CPU
    (`sparsegraph.codegen.llvm_compile`): `module.so`, `params.npz` and `manifest.json`, one
    static-shape function per batch size in `batch_sizes` (other symbolic dims =
    `seq_len`), kernels chosen by measured dispatch (`tune_trials` schedules per format,
    decisions cached in `tuning_db`); `sparse.onnx` holds the sparse weights packed. With a
    CUDA target (``cuda``, a tag such as ``nvidia/nvidia-h100``, see `resolve_target`) the
    same files are compiled for the GPU (`sparsegraph.codegen.cuda_compile`); no GPU is
    needed to compile."""
    model_path, out_dir = Path(model), Path(out_dir)
    tvm_target = resolve_target(target) if target is not None else None
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: output path exists and is not a folder")
    recipe = Recipe.load(recipe)  # a bad recipe fails before any work
    needs = [p.name for p in recipe.steps if getattr(p, "needs_calibration", False)]
    if needs and calib is None:
        raise missing_calibration(needs[0])
    m = Model.load(model_path)
    start = time.perf_counter()
    ctx = PassContext(seed)
    calibration = None
    if calib is not None:
        calibration = load_calibration(
            calib, m, tokenizer=tokenizer, samples=calib_samples, seqlen=seqlen, seed=seed
        )
        ctx.extras["calibration"] = calibration
    before = op_summary(m)
    ctx = PassManager(recipe.steps, seed=seed, progress=on_pass).run(m, ctx)
    after = op_summary(m)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sparsegraph-", dir=out_dir.parent))
    try:
        portable = m.save(staging / PORTABLE)
        diffs, feed_desc = None, "not validated"
        if validate:
            check_model_file(portable)
            if isinstance(feeds, dict):
                feed_arrays, feed_desc = feeds, "given feeds"
            elif feeds is not None:
                feed_arrays, feed_desc = load_feeds(feeds, m), f"feeds from {feeds}"
            else:
                feed_arrays, feed_desc = None, f"random feeds (seed {seed})"
            reference, feed_arrays = _reference_outputs(session(model_path), m, feed_arrays, seed)
            diffs = compare(reference, run(session(portable), feed_arrays))
        codegen = None
        if target is not None:
            codegen = _codegen(
                portable, staging, model_path, tvm_target, batch_sizes, seq_len, tune_trials, tuning_db, seed
            )
        files = {p.name: p.stat().st_size for p in sorted(staging.iterdir())}
        rep = reporting.build(
            model=str(model_path),
            recipe=recipe.to_dict(),
            seed=seed,
            rows=reporting.op_rows(before, after, ctx),
            ctx=ctx,
            diffs=diffs,
            files=files,
            feeds=feed_desc,
            extra={
                "seconds": round(time.perf_counter() - start, 3),
                **({"calibration": calibration.summary()} if calibration is not None else {}),
                **({"codegen": codegen} if codegen is not None else {}),
            },
        )
        reporting.write(rep, staging)
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in sorted(staging.iterdir(), key=lambda p: p.name == PORTABLE):  # the model last
            f.replace(out_dir / f.name)
        stale = out_dir / (PORTABLE + ".data")
        if stale.exists() and (PORTABLE + ".data") not in files:
            stale.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return CompileResult(out_dir, out_dir / PORTABLE, rep)


def resolve_target(text: str) -> Any:
    """The `tvm.target.Target` a ``--target`` string names.

    ``llvm`` is this CPU (`codegen.target.host_target`). ``cuda`` is the visible GPU's
    architecture (``sm_XY`` from ``tvm.cuda().compute_version``; ``sm_90a`` on Hopper, whose
    tensor-core kernels use wgmma), or ``sm_90a`` (H100) when no GPU is visible, since CUDA
    code compiles without one. Anything else goes to
    ``tvm.target.Target``: a tag (``nvidia/nvidia-h100``), a kind, a JSON dict
    (``{"kind": "cuda", "arch": "sm_80"}``), or the older ``kind -key=value`` form, which
    is turned into a dict. CUDA targets get a generic ``llvm`` host, so the host code runs
    on any x86-64 machine with the GPU. Only llvm and cuda kinds compile here; a string
    TVM cannot parse, or another kind, is a UsageError.
    """
    import json

    from tvm.target import Target

    from .codegen.target import host_target

    text = (text or "").strip()
    if text == "llvm":
        return host_target()
    if text == "cuda":
        from .codegen.cuda_dispatch import gpu_visible

        if gpu_visible():
            import tvm

            arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
        else:
            arch = "sm_90"
        if arch == "sm_90":  # Hopper: its arch-specific instructions (wgmma) too
            arch = "sm_90a"
        spec: Any = {"kind": "cuda", "arch": arch}
    elif text.startswith("{"):
        try:
            spec = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"--target {text!r}: not valid JSON ({exc})") from None
    elif " -" in text:  # "cuda -arch=sm_80": TVM 0.27 takes this form only as a dict
        kind, *opts = text.split()
        spec = {"kind": kind}
        for opt in opts:
            key, sep, value = opt.lstrip("-").partition("=")
            if not sep or not opt.startswith("-"):
                raise UsageError(f"--target {text!r}: expected '-key=value' options, got {opt!r}")
            spec[key] = value
    else:
        spec = text
    try:
        target = Target(spec)
    except Exception as exc:
        raise UsageError(f"--target {text!r}: {str(exc).splitlines()[0]}") from None
    kind = str(target.kind.name)
    if kind == "cuda":
        return Target(target, host=Target({"kind": "llvm"}))
    if kind == "llvm":
        return target
    raise UsageError(f"--target {text!r}: kind {kind!r} cannot be compiled (supported: llvm, cuda)")


def _codegen(portable, staging, original, target, batch_sizes, seq_len, tune_trials, tuning_db, seed) -> dict:
    """Write sparse.onnx and the compiled module into `staging`; a summary for the report."""
    from .codegen.sparse_onnx import to_sparse

    packed = Model.load(portable)
    if to_sparse(packed):
        packed.save(staging / "sparse.onnx")
    del packed  # the compile loads its own copy: not two models' weights at once
    common = dict(batch_sizes=list(batch_sizes), seq_len=seq_len, reference=original, seed=seed)
    if str(target.kind.name) == "cuda":
        from .codegen.cuda_compile import compile_cuda

        manifest = compile_cuda(portable, staging, target=target, db_path=tuning_db, **common)
    else:
        from .codegen.llvm_compile import compile_llvm

        manifest = compile_llvm(
            portable, staging, target=target, tune_trials=tune_trials, db_path=tuning_db, **common
        )
    keys = ("target", "cache_regime", "measured", "timing_seconds", "ops", "fused", "compile_seconds")
    keys += ("buckets",)
    return {k: manifest[k] for k in keys if k in manifest}


def _reference_outputs(sess, model: Model, feeds: dict | None, seed: int) -> tuple[dict, dict]:
    """Outputs of the original model and the feeds used: `feeds` if given, else the first
    random candidate the model accepts."""
    if feeds is not None:
        return run(sess, feeds), feeds
    error = None
    for candidate in feed_candidates(model, seed):
        try:
            return run(sess, candidate), candidate
        except ValidationError as exc:
            error = exc
    raise ValidationError(f"{error} (with random inputs; pass --feeds with real inputs)")
