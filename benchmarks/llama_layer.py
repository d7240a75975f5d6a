"""End to end on the CPU: a Llama-7B-shaped decoder layer, pruned and compiled, one decode step.

Builds a one-layer llama (dim 4096, FFN 11008, 32 heads; random weights ~ N(0, 1/fan_in))
with the llama2.c exporter, prunes every projection to `--sparsity` (magnitude, per output
row), compiles it for this CPU with measured dispatch, and times one token (M = 1) through
onnxruntime on the dense original (the baseline), our dense compilation and our sparse
compilation, in the same run, interleaved (one step of each in turn). Cold and warm
(tuning database filled) compile times too. Both runtimes use every physical core
(`cpu_kernels.use_all_cores`; onnxruntime gets the same intra-op thread count).

    python benchmarks/llama_layer.py [--sparsity 0.7] [--dim 4096 --hidden 11008 --heads 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import sparsegraph as sg
from sparsegraph.codegen.cpu_kernels import use_all_cores
from sparsegraph.codegen.llvm_compile import compile_llvm
from sparsegraph.models.llama2c import Llama2cConfig, export_onnx
from sparsegraph.runtime import Session
from sparsegraph.validate import session

ROOT = Path(__file__).resolve().parent.parent


def llama_layer(
    dim: int, hidden: int, heads: int, vocab: int, seq_len: int, seed: int = 0
) -> onnx.ModelProto:
    """A one-layer llama ONNX model with random weights (torch (out, in) layout per llama2.c)."""
    cfg = Llama2cConfig(dim, hidden, 1, heads, heads, vocab, seq_len, shared_classifier=False)
    rng = np.random.default_rng(seed)

    def linear(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])).astype(np.float32)

    hd = dim // heads
    freqs = 1.0 / 10000 ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    angles = np.outer(np.arange(seq_len), freqs)
    weights = {
        "token_embedding": linear(vocab, dim),
        "rms_att": np.ones((1, dim), np.float32),
        "wq": linear(1, dim, dim),
        "wk": linear(1, dim, dim),
        "wv": linear(1, dim, dim),
        "wo": linear(1, dim, dim),
        "rms_ffn": np.ones((1, dim), np.float32),
        "w1": linear(1, hidden, dim),
        "w2": linear(1, dim, hidden),
        "w3": linear(1, hidden, dim),
        "rms_final": np.ones(dim, np.float32),
        "freq_cis_real": np.cos(angles).astype(np.float32),
        "freq_cis_imag": np.sin(angles).astype(np.float32),
        "wcls": linear(vocab, dim),
    }
    return export_onnx(cfg, weights)


def _time_interleaved(fns: dict, repeat: int) -> dict[str, float]:
    """Median seconds per call of each function, called in turn (one call each per round), so
    all see the same machine state (the DRAM bandwidth this VM gets drifts over minutes)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def per_call_ms(folder: Path, feeds: dict[str, np.ndarray], repeat: int = 5) -> dict[str, float]:
    """Where a compiled model's step goes: mean ms per step of every function the Relax VM
    calls (our kernels ``sg_*``, TVM-generated TIR, ``vm.builtin.*``), timed by the VM's
    instrument hook (wall time around each call; adds a few us per call)."""
    import tvm
    from tvm import relax

    manifest = json.loads((folder / "manifest.json").read_text())
    bucket = manifest["buckets"][0]
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(folder / "module.so")), tvm.cpu())
    with np.load(folder / "params.npz") as stored:
        args = [tvm.runtime.tensor(np.asarray(feeds[i["name"]])) for i in manifest["inputs"]]
        args += [tvm.runtime.tensor(stored[p]) for p in bucket["params"]]
    total: dict[str, float] = {}
    start: dict[str, float] = {}

    def instrument(func, symbol, before, ret, *a):
        if before:
            start[symbol] = time.perf_counter()
        else:
            total[symbol] = total.get(symbol, 0.0) + time.perf_counter() - start[symbol]
        return 0

    fn = vm[bucket["function"]]
    fn(*args)
    vm.set_instrument(instrument)
    for _ in range(repeat):
        fn(*args)
    return {k: v / repeat * 1e3 for k, v in sorted(total.items(), key=lambda kv: -kv[1])}


def _breakdown(ms: dict[str, float]) -> dict[str, float]:
    kernels = sum(v for k, v in ms.items() if k.startswith("sg_"))
    builtins = sum(v for k, v in ms.items() if k.startswith("vm."))
    return {
        "our kernels": kernels,
        "other TIR": sum(ms.values()) - kernels - builtins,
        "VM builtins": builtins,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    threads = use_all_cores()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dense_path = tmp / "layer.onnx"
        sg.Model.from_proto(llama_layer(args.dim, args.hidden, args.heads, args.vocab, 64)).save(dense_path)
        recipe = {"steps": [{"pass": "magnitude", "sparsity": args.sparsity, "granularity": "row"}]}
        portable = sg.compile_model(dense_path, recipe, tmp / "pruned", validate=False).portable
        db = tmp / "tuning.json"
        t0 = time.perf_counter()
        manifest = compile_llvm(
            portable, tmp / "pruned", batch_sizes=[1], seq_len=1, reference=dense_path, db_path=db
        )
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        compile_llvm(portable, tmp / "again", batch_sizes=[1], seq_len=1, db_path=db)
        warm = time.perf_counter() - t0
        compile_llvm(dense_path, tmp / "dense", batch_sizes=[1], seq_len=1, db_path=db)
        tokens = np.array([[7]], dtype=np.int64)
        compiled, compiled_dense = Session(tmp / "pruned"), Session(tmp / "dense")
        ort_dense = session(dense_path, threads=threads)
        t = _time_interleaved(
            {
                "ort": lambda: ort_dense.run(None, {"tokens": tokens}),
                "dense": lambda: compiled_dense.run(None, {"tokens": tokens}),
                "compiled": lambda: compiled.run(None, {"tokens": tokens}),
            },
            args.repeat,
        )
        t_ort, t_dense, t_compiled = t["ort"], t["dense"], t["compiled"]
        profile = {
            "compiled_dense": per_call_ms(tmp / "dense", {"tokens": tokens}),
            "compiled_sparse": per_call_ms(tmp / "pruned", {"tokens": tokens}),
        }
        (y,) = compiled.run(None, {"tokens": tokens})
        ref = session(portable).run(None, {"tokens": tokens})[0]
        rel = float(np.abs(y - ref).max() / np.abs(ref).max())
    timing = manifest["timing_seconds"]["b1_s1"]
    result = {
        "shape": {"dim": args.dim, "hidden": args.hidden, "heads": args.heads, "vocab": args.vocab},
        "sparsity": args.sparsity,
        "threads": threads,
        "decode_step_ms": {
            "onnxruntime_dense": t_ort * 1e3,
            "compiled_sparse": t_compiled * 1e3,
            "compiled_dense": t_dense * 1e3,
        },
        "compile_time_check_ms": {k: v * 1e3 for k, v in timing.items() if isinstance(v, float)},
        "speedup_vs_onnxruntime": t_ort / t_compiled,
        "compile_seconds": {"cold": cold, "warm": warm},
        "max_rel_error_vs_portable": rel,
        "per_call_ms": profile,
        "decisions": {
            op["op"]: op["decisions"]["1"]["label"] for op in manifest["ops"] if "1" in op["decisions"]
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llama_layer.json").write_text(json.dumps(result, indent=2))
    d = result["decode_step_ms"]
    lines = [
        f"# Llama-7B-shaped decoder layer, {args.sparsity:.0%} unstructured, decode step (M = 1), this CPU",
        "",
        "| runtime (same run, interleaved, median of repeated steps) | ms / step | × onnxruntime dense |",
        "|---|---|---|",
        f"| onnxruntime, dense original | {d['onnxruntime_dense']:.2f} | 1.00 |",
        f"| compiled, pruned (dispatch) | {d['compiled_sparse']:.2f} | {t_ort / t_compiled:.2f} |",
        f"| compiled, dense original | {d['compiled_dense']:.2f} | {t_ort / t_dense:.2f} |",
        "",
        f"{threads} threads for both runtimes. "
        f"Compile: cold {cold:.1f} s, warm {warm:.1f} s (tuning database reused). "
        f"Max relative error vs the portable model in onnxruntime: {rel:.1e}.",
        "",
        "Kernels chosen: " + ", ".join(f"`{k}`: {v}" for k, v in result["decisions"].items()),
        "",
        "Where a step goes (ms per step, VM instrument hook, after the timed runs): "
        + "; ".join(
            f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in _breakdown(ms).items())
            for name, ms in profile.items()
        )
        + ". Slowest TVM-generated functions (dense build): "
        + ", ".join(
            f"`{k}` {v:.3f}"
            for k, v in list(
                (k, v) for k, v in profile["compiled_dense"].items() if not k.startswith(("sg_", "vm."))
            )[:4]
        )
        + ".",
    ]
    (args.out / "llama_layer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
