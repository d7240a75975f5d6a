"""Block-sparse prefill attention (`sparsegraph.codegen.attention_kernels`) vs dense attention.

``O = softmax(Q Kᵀ / sqrt(D) + mask) V`` for L in {4096, 8192, 16384} with block 64 and these
block layouts, all run by the same kernel (so "ours dense" is the same-runtime baseline):

* ``dense``: every block (100 %);
* ``random25``: 25 % of the key blocks per query block, random (diagonal always kept);
* ``window25``: causal sliding window + the first block as global/sink tokens, window sized
  to keep ~25 % of all blocks (diagonal blocks partial: causal bias applied elementwise);
* ``causal``: plain causal mask (~50 % of blocks, diagonal blocks partial).

CPU (fp32, ``TVM_NUM_THREADS=2``): B=1, H=2, D=64; baselines onnxruntime dense attention (a
MatMul/Mul/Softmax/MatMul graph, run one head at a time to bound memory: 1 GB of scores per
head at 16k; ``intra_op_num_threads=2``) and, where onnxruntime runs it on CPU, its fused
``com.microsoft.MultiHeadAttention``. Median wall time, methods interleaved per repeat.

Model (CPU, unless ``--no-model``): the trained stories260K llama after the
``attention_window64`` recipe (sliding window 64 + 4 sink tokens as an additive mask), compiled
with ``--target llvm`` at seq 256 and 512: our compiled module (block-sparse attention kernel
per layer) vs onnxruntime on the portable (masked) and the original (causal) model, and vs the
same compile without the attention rewrite (TVM's default lowering of dense attention).

GPU (``--gpu``, fp16 in/out, fp32 math): B=1, H=32, D=128; baselines our dense, torch
``F.scaled_dot_product_attention`` (flash backend; dense, and ``is_causal`` for the causal
row) and torch FlexAttention with the same block mask where it compiles. CUDA events, median.
Before timing, every kernel is checked against a float64 numpy reference on a small problem.

    python benchmarks/attention_kernels.py            # CPU (~5 min on 2 cores)
    python benchmarks/attention_kernels.py --gpu      # on the GPU machine

Writes ``benchmarks/results/attention_kernels{,_gpu}.{md,json,png}`` (``--out DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np

try:
    from sparsegraph.codegen import attention_kernels as ak
except ImportError:  # the GPU machine has numpy/tvm/torch but not the package's other dependencies
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "codegen"))
    import attention_kernels as ak

BS = 64


def layouts(nqb: int, seed: int = 0) -> dict[str, ak.BlockLayout]:
    """The benchmark's block layouts for `nqb` query/key blocks of BS tokens."""
    causal_bias = _causal_tile_bias(nqb)
    out = {"dense": ak.BlockLayout.from_blocks(np.ones((nqb, nqb), bool), BS)}
    out["random25"] = ak.BlockLayout.from_blocks(ak.random_blocks(nqb, nqb, 0.25, seed), BS)
    w = min(range(1, nqb + 1), key=lambda w: abs(ak.window_global_blocks(nqb, w).mean() - 0.25))
    out["window25"] = _with_causal_diagonal(ak.window_global_blocks(nqb, w), causal_bias)
    out["causal"] = _with_causal_diagonal(ak.causal_blocks(nqb), causal_bias)
    return out


def _causal_tile_bias(nqb: int) -> np.ndarray:
    return np.where(np.tril(np.ones((BS, BS), bool)), 0, ak.DROP).astype(np.float32)


def _with_causal_diagonal(keep: np.ndarray, tile: np.ndarray) -> ak.BlockLayout:
    """Full kept blocks, except the diagonal ones, which get the causal bias tile (partial)."""
    lay = ak.BlockLayout.from_blocks(keep, BS)
    qb = np.repeat(np.arange(keep.shape[0]), np.diff(lay.ptr))
    diag = lay.kb == qb
    lay.pi[diag] = 0
    lay.tiles = tile[None].copy()
    return lay


def check(target: Any, nq: int, nk: int, d: int, device=None) -> float:
    """Max |kernel - float64 reference| over the benchmark layouts at L = 512 (GQA when nq > nk)."""
    rng = np.random.default_rng(1)
    L = 512
    q = rng.standard_normal((nq, L, d)).astype(np.float32)
    kt = rng.standard_normal((nk, d, L)).astype(np.float32)
    v = rng.standard_normal((nk, L, d)).astype(np.float32)
    worst = 0.0
    for lay in layouts(L // BS, seed=3).values():
        k = ak.build_attention(lay, nq, nk, d, target=target)
        ref = ak.reference(q, kt, v, lay.dense_bias(), k.scale)
        worst = max(worst, float(np.abs(k(q, kt, v, device) - ref).max()))
    return worst


# ----------------------------------------------------------------------------- CPU


def ort_dense_session(L: int, d: int, scale: float):
    """onnxruntime session of one head's dense attention Q[1,1,L,D], Kt[1,1,D,L], V[1,1,L,D]."""
    from onnx import TensorProto, helper

    from sparsegraph.validate import session

    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("MatMul", ["Q", "Kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["ss"]),
        helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "V"], ["O"]),
    ]
    ins = [
        helper.make_tensor_value_info("Q", f, [1, 1, L, d]),
        helper.make_tensor_value_info("Kt", f, [1, 1, d, L]),
        helper.make_tensor_value_info("V", f, [1, 1, L, d]),
    ]
    graph = helper.make_graph(
        nodes,
        "attn",
        ins,
        [helper.make_tensor_value_info("O", f, [1, 1, L, d])],
        [helper.make_tensor("scale", f, [], [scale])],
    )
    return _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), session)


def ort_mha_session(L: int, h: int, d: int):
    """onnxruntime com.microsoft.MultiHeadAttention (B=1, packed [1, L, H*D]); None if unavailable."""
    from onnx import TensorProto, helper

    from sparsegraph.validate import session

    f = TensorProto.FLOAT
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=h)
    ins = [helper.make_tensor_value_info(n, f, [1, L, h * d]) for n in ("q", "k", "v")]
    graph = helper.make_graph([node], "mha", ins, [helper.make_tensor_value_info("o", f, [1, L, h * d])])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    try:
        return _session(model, session)
    except Exception:
        return None


def _session(model, session):
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        onnx.save(model, str(path))
        return session(path, threads=2)


def run_cpu(args) -> dict[str, Any]:

    from sparsegraph.codegen.target import host_target

    h, d = 2, 64
    target = host_target()
    result: dict[str, Any] = {"device": _cpu_name(), "h": h, "d": d, "block": BS, "rows": []}
    result["check_max_abs_err"] = check(target, 4, 2, d)
    print(f"check vs float64 numpy: max abs err {result['check_max_abs_err']:.2e}", flush=True)
    rng = np.random.default_rng(0)
    for L in args.lengths:
        t0 = time.perf_counter()
        methods, density = cpu_methods(L, h, d, target, rng)
        times = _interleaved(methods, args.repeat if L < 16384 else max(2, args.repeat - 2))
        row = _row(L, times, density, "ours_dense", "ort_dense")
        result["rows"].append(row)
        save(result, args)
        print(_row_line(row, time.perf_counter() - t0), flush=True)
        del methods
    if args.model:
        result["model"] = run_model(args)
        save(result, args)
    return result


def run_model(args) -> list[dict[str, Any]]:
    """Compiled stories260K + window recipe vs onnxruntime and vs the compile without the rewrite."""
    import sparsegraph as sg
    from sparsegraph.codegen import rewrites
    from sparsegraph.codegen.attention_rewrite import sparse_attention
    from sparsegraph.runtime import Session
    from sparsegraph.validate import session

    root = Path(__file__).resolve().parents[1]
    model = root / "examples/stories260K/stories260K.onnx"
    recipe = root / "examples/recipes/attention_window64.yaml"
    rows = []
    for L in (256, 512):
        with tempfile.TemporaryDirectory() as tmp:
            ours, plain = Path(tmp) / "ours", Path(tmp) / "plain"
            sg.compile_model(model, recipe, ours, target="llvm", seq_len=L, validate=False)
            saved = list(rewrites.FACTORIES)
            rewrites.FACTORIES[:] = [f for f in saved if f is not sparse_attention]
            try:
                sg.compile_model(model, recipe, plain, target="llvm", seq_len=L, validate=False)
            finally:
                rewrites.FACTORIES[:] = saved
            fused = json.loads((ours / "manifest.json").read_text())["fused"]
            sites = [r for r in fused if r.get("technique") == "sparse_attention" and r.get("rewritten")]
            feeds = {"tokens": np.random.default_rng(0).integers(0, 512, (1, L)).astype(np.int64)}
            runners = {
                "compiled": Session(ours),
                "compiled_without_rewrite": Session(plain),
                "ort_portable": session(ours / "portable.onnx", threads=2),
                "ort_original": session(model, threads=2),
            }
            outs = {k: r.run(None, feeds)[0] for k, r in runners.items()}
            times = _interleaved({k: (lambda r=r, f=feeds: r.run(None, f)) for k, r in runners.items()}, 10)
            rows.append(
                {
                    "L": L,
                    "seconds": times,
                    "sites": len(sites),
                    "blocks_kept": sites[0]["blocks_kept"] if sites else None,
                    "blocks_total": sites[0]["blocks_total"] if sites else None,
                    "max_abs_diff_vs_ort_portable": float(
                        np.abs(outs["compiled"] - outs["ort_portable"]).max()
                    ),
                }
            )
            print(f"model L={L}: " + " ".join(f"{k}={v * 1e3:.1f}ms" for k, v in times.items()), flush=True)
    return rows


def cpu_methods(L: int, h: int, d: int, target: Any, rng: np.random.Generator):
    """{name: zero-argument call} for one length on the CPU, and the layouts' densities."""
    import tvm

    dev = tvm.cpu()
    q = rng.standard_normal((h, L, d)).astype(np.float32)
    kt = rng.standard_normal((h, d, L)).astype(np.float32)
    v = rng.standard_normal((h, L, d)).astype(np.float32)
    out = tvm.runtime.empty((h, L, d), "float32", dev)
    args = [tvm.runtime.tensor(a, dev) for a in (q, kt, v)]
    methods, density = {}, {}
    for name, lay in layouts(L // BS).items():
        k = ak.build_attention(lay, h, h, d, target=target)
        consts = [tvm.runtime.tensor(a, dev) for a in k.consts]
        methods[f"ours_{name}"] = lambda fn=k.executable[k.symbol], c=consts: fn(*args, *c, out)
        density[name] = lay.density
    ort = ort_dense_session(L, d, 1 / np.sqrt(d))
    heads = [{"Q": q[i][None, None], "Kt": kt[i][None, None], "V": v[i][None, None]} for i in range(h)]
    methods["ort_dense"] = lambda: [ort.run(None, f) for f in heads]
    mha = ort_mha_session(L, h, d)
    if mha is not None:
        packed = {
            "q": np.ascontiguousarray(q.transpose(1, 0, 2).reshape(1, L, h * d)),
            "k": np.ascontiguousarray(kt.transpose(2, 0, 1).reshape(1, L, h * d)),
            "v": np.ascontiguousarray(v.transpose(1, 0, 2).reshape(1, L, h * d)),
        }
        methods["ort_mha"] = lambda: mha.run(None, packed)
    return methods, density


def _interleaved(methods: dict[str, Any], repeat: int) -> dict[str, float]:
    for fn in methods.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    names = list(methods)
    for r in range(repeat):  # the order rotates each repeat: no method always follows the same one
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - t)
    return {k: float(statistics.median(v)) for k, v in times.items()}


# ----------------------------------------------------------------------------- GPU


def run_gpu(args) -> dict[str, Any]:
    import torch

    h, d = 32, 128
    target = {"kind": "cuda", "arch": "sm_90"}
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "h": h, "d": d, "block": BS, "rows": []}
    import tvm

    result["check_max_abs_err"] = max(
        check(tvm.target.Target(target), 8, 2, dd, tvm.cuda()) for dd in (64, d)
    )
    print(f"check vs float64 numpy (fp16 I/O): max abs err {result['check_max_abs_err']:.2e}", flush=True)
    flex = _flex()
    for L in args.lengths:
        t0 = time.perf_counter()
        methods, density = gpu_methods(L, h, d, target, flex, args)
        times = {}
        for name, fn in methods.items():
            try:
                times[name] = _cuda_time(fn, args.repeat)
            except Exception as exc:  # reported, the other methods still run
                print(f"{name} L={L}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        row = _row(L, times, density, "ours_dense", "torch_sdpa_dense")
        result["rows"].append(row)
        save(result, args)
        print(_row_line(row, time.perf_counter() - t0), flush=True)
    return result


def gpu_methods(L: int, h: int, d: int, target: Any, flex, args):
    """{name: zero-argument call} for one length on the GPU, and the layouts' densities."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn((1, h, L, d), device=dev, dtype=torch.float16, generator=g)
    k = torch.randn((1, h, L, d), device=dev, dtype=torch.float16, generator=g)
    v = torch.randn((1, h, L, d), device=dev, dtype=torch.float16, generator=g)
    kt = k.transpose(-1, -2).contiguous()
    out = torch.empty_like(q)
    methods, density = {}, {}
    lays = layouts(L // BS)
    for name, lay in lays.items():
        kern = ak.build_attention(lay, h, h, d, target=target)
        consts = [torch.from_numpy(a).to(dev) for a in kern.consts]
        fn = kern.executable[kern.symbol]
        methods[f"ours_{name}"] = lambda fn=fn, c=consts: fn(q[0], kt[0], v[0], *c, out[0])
        density[name] = lay.density

    def sdpa(causal):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    methods["torch_sdpa_dense"] = lambda: sdpa(False)
    methods["torch_sdpa_causal"] = lambda: sdpa(True)
    if flex is not None and time.perf_counter() - args.start < args.budget * 0.6:
        for name in ("random25", "window25"):
            try:
                methods[f"torch_flex_{name}"] = flex(lays[name], q, k, v)
            except Exception as exc:  # compile problems are reported, not fatal
                print(f"flex {name} L={L}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    return methods, density


def _flex():
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception:
        return None
    compiled = torch.compile(flex_attention)

    def make(lay: ak.BlockLayout, q, k, v):
        keep = torch.zeros((lay.nqb, lay.nkb), dtype=torch.bool)
        rows = np.repeat(np.arange(lay.nqb), np.diff(lay.ptr))
        keep[torch.from_numpy(rows), torch.from_numpy(lay.kb.astype(np.int64))] = True
        keep = keep.to(q.device)
        causal = bool((lay.pi >= 0).any())

        def mask_mod(b, hh, qi, ki):
            ok = keep[qi // BS, ki // BS]
            return ok & (ki <= qi) if causal else ok

        bm = create_block_mask(mask_mod, None, None, q.shape[2], k.shape[2], device=q.device, BLOCK_SIZE=BS)
        opts = {"BLOCK_M": BS, "BLOCK_N": BS}  # flex's kernel tiles must divide the mask's blocks
        compiled(q, k, v, block_mask=bm, kernel_options=opts)
        return lambda: compiled(q, k, v, block_mask=bm, kernel_options=opts)

    return make


def _cuda_time(fn, repeat: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return float(statistics.median(times))


# ----------------------------------------------------------------------------- report


def _row(L, times, density, ours_dense, baseline) -> dict[str, Any]:
    row = {"L": L, "seconds": times, "density": density}
    row["speedup_vs_ours_dense"] = {k: times.get(ours_dense, np.nan) / t for k, t in times.items()}
    row["speedup_vs_" + baseline] = {k: times.get(baseline, np.nan) / t for k, t in times.items()}
    row["baseline"] = baseline
    return row


def _row_line(row, elapsed) -> str:
    parts = [
        f"{k}={v * 1e3:.1f}ms({row['speedup_vs_ours_dense'][k]:.2f}x)" for k, v in row["seconds"].items()
    ]
    return f"L={row['L']} [{elapsed:.0f}s] " + " ".join(parts)


def markdown(result: dict[str, Any], gpu: bool) -> str:
    rows = result["rows"]
    methods = list(dict.fromkeys(m for r in rows for m in r["seconds"]))
    base = rows[0]["baseline"] if rows else ""
    lines = [
        f"# Block-sparse prefill attention ({'GPU' if gpu else 'CPU'})",
        "",
        f"`python benchmarks/attention_kernels.py{' --gpu' if gpu else ''}` on {result['device']}; "
        f"B=1, H={result['h']}, D={result['d']}, block {result['block']}, "
        f"{'fp16 I/O, fp32 math, CUDA events' if gpu else 'fp32, 2 threads, wall time'}, median; "
        f"{result['date']}, 1-min load average {result.get('load_average_1min', '?')} at the end. "
        f"Kernel check vs float64 numpy: max abs err {result['check_max_abs_err']:.1e}.",
        "",
        "Each cell: ms / speedup vs our dense kernel (same runtime) / speedup vs " + f"`{base}`.",
        "",
        "| L | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for r in rows:
        cells = [
            f"{r['seconds'][m] * 1e3:.1f} / {r['speedup_vs_ours_dense'][m]:.2f}x / "
            f"{r['speedup_vs_' + base][m]:.2f}x"
            if m in r["seconds"]
            else "-"
            for m in methods
        ]
        lines.append(f"| {r['L']} | " + " | ".join(cells) + " |")
    lines += ["", "Kept blocks (fraction of all blocks):", ""]
    for r in rows:
        lines.append(f"- L={r['L']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["density"].items()))
    goal = [r["speedup_vs_ours_dense"].get("ours_random25", 0) for r in rows]
    lines += [
        "",
        "Goal >= 2.5x at 25 % of blocks vs dense of the same runtime: random25 gives "
        + ", ".join(f"{g:.2f}x" for g in goal)
        + f" -> {'met' if goal and min(goal) >= 2.5 else 'NOT met'}.",
    ]
    if result.get("model"):
        lines += [
            "",
            "## Compiled model: stories260K + `attention_window64` recipe (CPU)",
            "",
            "| seq | blocks kept / layer | compiled | compiled without the rewrite | ORT portable | "
            "ORT original (causal) | compiled vs ORT original | max abs diff vs ORT portable |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m in result["model"]:
            t = m["seconds"]
            lines.append(
                f"| {m['L']} | {m['blocks_kept']} / {m['blocks_total']} ({m['sites']} layers) | "
                f"{t['compiled'] * 1e3:.1f} ms | {t['compiled_without_rewrite'] * 1e3:.1f} ms | "
                f"{t['ort_portable'] * 1e3:.1f} ms | {t['ort_original'] * 1e3:.1f} ms | "
                f"{t['ort_original'] / t['compiled']:.2f}x | {m['max_abs_diff_vs_ort_portable']:.1e} |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    methods = [m for m in dict.fromkeys(m for r in rows for m in r["seconds"]) if m != "ours_dense"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ys = [r["speedup_vs_ours_dense"].get(m, 0) for r in rows]
        ax.bar(np.arange(len(rows)) + i * width, ys, width, label=m)
    ax.axhline(1, color="k", lw=0.8)
    ax.axhline(2.5, color="r", ls="--", lw=0.8, label="goal 2.5x")
    ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, [f"L={r['L']}" for r in rows])
    ax.set_ylabel("speedup vs our dense kernel")
    ax.set_yscale("log")
    ax.set_title(f"block-sparse attention, {result['device']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument(
        "--no-model", dest="model", action="store_false", help="CPU: skip the compiled-model rows"
    )
    ap.add_argument("--lengths", default="4096,8192,16384")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument(
        "--budget", type=float, default=240.0, help="seconds; GPU: skips FlexAttention past 60 %%"
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.repeat = args.repeat or (10 if args.gpu else 4)
    args.start = time.perf_counter()
    result = run_gpu(args) if args.gpu else run_cpu(args)
    print(save(result, args).read_text())


def save(result: dict[str, Any], args) -> Path:
    """Write the .json/.md/.png of the rows so far (after every length: a cut-off run keeps them)."""
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result["load_average_1min"] = round(os.getloadavg()[0], 2)
    result["python"] = sys.version.split()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("attention_kernels_gpu" if args.gpu else "attention_kernels")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(markdown(result, args.gpu))
    plot(result, stem.with_suffix(".png"))
    return stem.with_suffix(".md")


if __name__ == "__main__":
    main()
