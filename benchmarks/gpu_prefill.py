"""Prefill on the GPU: does the dense matmul of the CUDA compile path reach 50 % of cuBLAS?

For M >= 256 (prefill) every linear op of a compiled model runs TVM's dense matmul with
dlight's default GPU schedule (`relax_build.compile_cuda_module`), in the model's dtype.
This times that matmul, `Y[M, N] = X[M, K] @ W`, against cuBLAS through torch
(`F.linear`, the baseline a user would pick; fp32 without TF32, torch's default), for fp16,
fp32 and "mixed" (fp16 X and W, fp32 accumulation and Y: what an fp32 model could run on
tensor cores, timed against cuBLAS fp32), with W in the model's layout `W_onnx[K, N]`
("NN", what the compiled model runs) and pre-transposed `W[N, K]` ("NT"). Times: CUDA
events, median of 30 calls after 5 warm-ups; inputs N(0, 1); every TVM result is checked
against torch in float64.

    python benchmarks/gpu_prefill.py       # needs a CUDA GPU, TVM and torch

Writes benchmarks/results/gpu_prefill.{md,json,png} (or into $OUT when that is set).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

SHAPES = [(4096, 4096), (4096, 11008)]  # (K, N): a 7B attention projection and FFN up
MS = [256, 2048]
DTYPES = ["float16", "float32", "mixed"]  # mixed: X, W in fp16, fp32 accumulate and Y (for fp32 models)
LAYOUTS = ["NN", "NT"]
REPEAT, WARMUP = 30, 5


def dlight_matmul(m: int, n: int, k: int, dtype: str, layout: str, target):
    """The dense matmul as the CUDA compile path schedules it (dlight), compiled."""
    import tvm
    from tvm import te
    from tvm.s_tir import dlight as dl

    in_dt, out_dt = ("float16", "float32") if dtype == "mixed" else (dtype, dtype)
    x = te.placeholder((m, k), in_dt, name="X")
    w = te.placeholder((k, n) if layout == "NN" else (n, k), in_dt, name="W")
    r = te.reduce_axis((0, k), name="k")

    def wv(j, r):
        return w[r, j] if layout == "NN" else w[j, r]

    y = te.compute(
        (m, n), lambda i, j: te.sum(x[i, r].astype(out_dt) * wv(j, r).astype(out_dt), axis=r), name="Y"
    )
    mod = tvm.IRModule({"mm": te.create_prim_func([x, w, y]).with_attr("global_symbol", "mm")})
    with target:
        mod = dl.ApplyDefaultSchedule(
            dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()
        )(mod)
        return tvm.compile(mod, target=target)["mm"]


def time_ms(fn) -> float:
    import torch

    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPEAT):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(statistics.median(times))


def main() -> int:
    import torch
    import torch.nn.functional as F

    from sparsegraph.compile import resolve_target

    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # torch's default, stated
    target = resolve_target("cuda")
    rows = []
    for k, n in SHAPES:
        for m in MS:
            for dtype in DTYPES:
                tdt = torch.float16 if dtype == "mixed" else getattr(torch, dtype)
                x = torch.randn(m, k, device="cuda", dtype=tdt)
                w = torch.randn(n, k, device="cuda", dtype=tdt) / k**0.5
                ref = (x.double() @ w.double().T).float()
                if dtype == "mixed":  # against what an fp32 model would run: cuBLAS fp32
                    x32, w32 = x.float(), w.float()
                    cublas = time_ms(lambda x32=x32, w32=w32: F.linear(x32, w32))
                else:
                    cublas = time_ms(lambda x=x, w=w: F.linear(x, w))
                for layout in LAYOUTS:
                    try:
                        fn = dlight_matmul(m, n, k, dtype, layout, target)
                    except Exception as exc:  # a schedule dlight cannot build: say so, go on
                        print(f"K={k} N={n} M={m} {dtype} {layout}: build failed: {exc}", flush=True)
                        continue
                    wl = w.T.contiguous() if layout == "NN" else w
                    y_dt = torch.float32 if dtype == "mixed" else tdt
                    y = torch.full((m, n), float("nan"), device="cuda", dtype=y_dt)
                    fn(x, wl, y)
                    torch.cuda.synchronize()
                    err = float((y.float() - ref).norm() / ref.norm())
                    ms = time_ms(lambda fn=fn, x=x, wl=wl, y=y: fn(x, wl, y))
                    tflops = 2 * m * n * k / ms / 1e9
                    rows.append(
                        {
                            "K": k,
                            "N": n,
                            "M": m,
                            "dtype": dtype,
                            "layout": layout,
                            "tvm_ms": ms,
                            "cublas_ms": cublas,
                            "tvm_tflops": tflops,
                            "cublas_tflops": 2 * m * n * k / cublas / 1e9,
                            "fraction_of_cublas": cublas / ms,
                            "rel_err": err,
                        }
                    )
                    r = rows[-1]
                    print(
                        f"K={k} N={n} M={m} {dtype} {layout}: dlight {ms:.3f} ms ({tflops:.1f} TF/s), "
                        f"cuBLAS {cublas:.3f} ms ({r['cublas_tflops']:.1f} TF/s) -> "
                        f"{r['fraction_of_cublas']:.0%}, rel err {err:.1e}",
                        flush=True,
                    )
    device = torch.cuda.get_device_name()
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "target": str(target), "tf32": False, "repeat": REPEAT, "rows": rows}
    (out / "gpu_prefill.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Prefill dense matmul: TVM dlight vs cuBLAS (torch F.linear), {device}",
        "",
        "Y[M, N] = X[M, K] @ W; NN = W as the model stores it ([K, N], what the compiled model runs),",
        "NT = W pre-transposed ([N, K]). cuBLAS fp32 without TF32 (torch's default). mixed = fp16 X "
        "and W, fp32 accumulation and Y (dlight tensor cores), timed against cuBLAS fp32. Median of "
        f"{REPEAT} CUDA-event timings.",
        "",
        "| K | N | M | dtype | layout | dlight ms | dlight TFLOP/s | cuBLAS ms | cuBLAS TFLOP/s "
        "| of cuBLAS | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['K']} | {r['N']} | {r['M']} | {r['dtype']} | {r['layout']} | {r['tvm_ms']:.3f} | "
            f"{r['tvm_tflops']:.1f} | {r['cublas_ms']:.3f} | {r['cublas_tflops']:.1f} | "
            f"{r['fraction_of_cublas']:.0%} | {r['rel_err']:.1e} |"
        )
    (out / "gpu_prefill.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "gpu_prefill.png", device)
    return 0


def _plot(rows, path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    labels = [
        f"{r['K']}→{r['N']}\nM={r['M']}\n{r['dtype'].replace('float', 'fp')} {r['layout']}" for r in rows
    ]
    ax.bar(range(len(rows)), [r["fraction_of_cublas"] for r in rows], color="tab:blue")
    ax.axhline(0.5, color="tab:red", linestyle="--", label="50 % of cuBLAS")
    ax.set_xticks(range(len(rows)), labels, fontsize=6)
    ax.set_ylabel("dlight throughput / cuBLAS")
    ax.set_title(f"Prefill dense matmul, TVM dlight vs cuBLAS ({device})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
