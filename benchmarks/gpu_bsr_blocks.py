"""BSR at decode on the GPU: the row kernel (a warp per output row) vs the block kernel
(`cuda_kernels._bsr_blocks_func`: a warp loads whole blocks, `ks` warps per block row) vs
the tensor-core kernel (`cuda_sparse_mma`: the same whole-block loads, products by
``mma.sync m16n8k16``), at M = 1, 4, 16 and 64 (the first two up to M = 16).

Same weights and timing as `gpu_kernels.py` (random N(0, 1/K) fp16 values, blocks kept at
random, L2 flushed by a 256 MB write before each call, CUDA events, median), cuBLAS
``F.linear`` on the dense W in the same run; every kernel checked against fp32 torch
(2e-3 relative). Writes ``gpu_bsr_blocks.{md,json}`` after every cell.

    python benchmarks/gpu_bsr_blocks.py [--out DIR] [--reps N] [--ms 1,16] [--shapes 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = [(8192, 28672), (4096, 11008), (11008, 4096)]  # (K, N)
ROW_SCHEDULES = [{"wpb": 8, "rpw": 0, "unroll": 2, "lpr": 32}, {"wpb": 32, "rpw": 0, "unroll": 2, "lpr": 32}]
BLOCK_SCHEDULES = [{"ks": ks, "unroll": u} for ks in (4, 8, 16) for u in (2, 4)]
TC_SCHEDULES = [{"tc": 1, "ks": ks, "unroll": u} for ks in (2, 4, 8) for u in (2, 4)]
KINDS = {"rows": (ROW_SCHEDULES, 16), "blocks": (BLOCK_SCHEDULES, 16), "tc": (TC_SCHEDULES, 64)}  # max M


def markdown(res: dict) -> str:
    lines = [
        "# BSR decode kernels on the GPU: a warp per output row, whole blocks per warp load, tensor cores",
        "",
        f"`python benchmarks/gpu_bsr_blocks.py` on {res['device']}, {res['date']}. fp16, L2 flushed, "
        "median of CUDA-event times; × = cuBLAS `F.linear` (dense W, same run) / kernel. Best schedule "
        "of each kernel (row: `wpb` warps per block; blocks and tensor cores: `ks` warps per block row, "
        "`unroll` blocks in flight per warp); - = the kernel does not take this M.",
        "",
        "| K->N | block | sparsity | M | cuBLAS µs | row kernel × | block kernel × | tensor cores × "
        "| best (µs) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in res["cells"]:
        ratios = [f"{c['cublas_us'] / c[f'{k}_us']:.2f}" if f"{k}_us" in c else "-" for k in KINDS]
        best = min((k for k in KINDS if f"{k}_us" in c), key=lambda k: c[f"{k}_us"])
        lines.append(
            f"| {c['k']}->{c['n']} | {c['b']}x{c['b']} | {c['s']:.0%} | {c['m']} | {c['cublas_us']:.1f} "
            f"| {' | '.join(ratios)} | **{c['cublas_us'] / c[f'{best}_us']:.2f}** {c[f'{best}_schedule']} "
            f"({c[f'{best}_us']:.1f}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch
    import torch.nn.functional as F
    from gpu_kernels import Bench, make_weight

    from sparsegraph.codegen import cuda_kernels as ck

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--ms", type=lambda v: [int(i) for i in v.split(",")], default=[1, 4, 16, 64])
    p.add_argument("--shapes", type=lambda v: [SHAPES[int(i)] for i in v.split(",")], default=SHAPES)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tg, bench, rng = ck.cuda_target(), Bench(args.reps), np.random.default_rng(0)
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    res["cells"] = []
    for k, n in args.shapes:
        for b in (16, 32):
            for s in (0.7, 0.9):
                w = make_weight(k, n, ("b", b, s), rng)
                wt = torch.from_numpy(w).cuda()
                packed = ck.pack("bsr", w, block=(b, b))
                for m in args.ms:
                    x = torch.randn(m, k, dtype=torch.float16, device="cuda")
                    ref = x.float() @ wt.float().t()
                    cell = {
                        "k": k,
                        "n": n,
                        "b": b,
                        "s": s,
                        "m": m,
                        "cublas_us": bench.time(lambda x=x, wt=wt: F.linear(x, wt)) * 1e6,
                    }
                    for kind, (scheds, max_m) in KINDS.items():
                        for sc in scheds if m <= max_m else []:
                            kern = ck.build("bsr", packed, m, tg, x_dtype="float16", **sc)
                            fn = kern.compile(tg)[kern.symbol]
                            wd = [
                                torch.from_numpy(np.ascontiguousarray(a)).cuda()
                                for a in kern.weights.values()
                            ]
                            y = torch.empty(m, n, dtype=torch.float16, device="cuda")
                            fn(x, *wd, y)
                            err = float((y.float() - ref).abs().max() / ref.abs().max())
                            if not err <= 2e-3:
                                raise AssertionError(f"{kern.label} K={k} N={n} M={m}: rel err {err:.1e}")
                            t = bench.time(lambda fn=fn, x=x, wd=wd, y=y: fn(x, *wd, y)) * 1e6
                            if t < cell.get(f"{kind}_us", float("inf")):
                                cell[f"{kind}_us"], cell[f"{kind}_schedule"] = t, kern.label
                    res["cells"].append(cell)
                    print(
                        f"{k}->{n} bsr{b} {s:.0%} M={m}: cuBLAS {cell['cublas_us']:.1f} "
                        + " ".join(f"{kd} {cell[f'{kd}_us']:.1f}" for kd in KINDS if f"{kd}_us" in cell),
                        flush=True,
                    )
                    (args.out / "gpu_bsr_blocks.json").write_text(json.dumps(res, indent=1))
                    (args.out / "gpu_bsr_blocks.md").write_text(markdown(res))


if __name__ == "__main__":
    main()
