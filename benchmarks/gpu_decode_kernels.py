"""Decode kernels for one weight pattern on the GPU, each with its best schedule, vs cuBLAS,
at M = 1, 4, 16 and 64 (the CUDA-core kernels up to M = 16). Two suites:

* ``bsr`` (BSR 16x16 / 32x32 at 70 / 90 %): the row kernel (a warp per output row) vs the
  block kernel (`cuda_kernels._bsr_blocks_func`: a warp loads whole blocks, `ks` warps per
  block row) vs the tensor-core kernel (`cuda_sparse_mma`: the same whole-block loads,
  products by ``mma.sync m16n8k16``); writes ``gpu_bsr_blocks.{md,json}``;
* ``unstructured`` (magnitude-pruned 50 / 70 / 90 %): the 4-bit delta CSR row kernel (the
  CUDA-core kernel dispatch takes for unstructured W) vs tile bitmaps on tensor cores
  (`cuda_sparse_mma`, ``tile_bitmap``); writes ``gpu_tile_bitmap.{md,json}``;
* ``nm`` (magnitude 2:4): the n:m row kernel vs ``mma.sp`` on sparse tensor cores
  (`cuda_sparse_mma`, ``nm`` with ``tc``); writes ``gpu_nm_tc.{md,json}``.

Same weights and timing as `gpu_kernels.py` (random N(0, 1/K) fp16 values, L2 flushed by a
256 MB write before each call, CUDA events, median), cuBLAS ``F.linear`` on the dense W in
the same run; every kernel checked against fp32 torch (2e-3 relative). Writes the tables
after every cell.

    python benchmarks/gpu_decode_kernels.py [--suite bsr|unstructured|nm] [--out DIR] [--reps N]
        [--ms 1,16] [--shapes 0] [--kinds dcsr]
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

SHAPES = [(8192, 28672), (4096, 11008), (11008, 4096), (4096, 4096)]  # (K, N)
ROW_SCHEDULES = [{"wpb": 8, "rpw": 0, "unroll": 2, "lpr": 32}, {"wpb": 32, "rpw": 0, "unroll": 2, "lpr": 32}]
BLOCK_SCHEDULES = [{"ks": ks, "unroll": u} for ks in (4, 8, 16) for u in (2, 4)]
TC_SCHEDULES = [{"ks": ks, "unroll": u} for ks in (2, 4, 8, 16) for u in (2, 4)]
NM_TC_SCHEDULES = [
    {"rows": r, "ks": ks, "unroll": u} for r in (16, 32, 64) for ks in (2, 4, 8, 16) for u in (2, 4)
]
DCSR_SCHEDULES = [
    {"wpb": w, "rpw": 0, "unroll": 2, "lpr": lpr} for w, lpr in ((8, 32), (8, 16), (16, 32), (32, 32))
]
#: suite -> patterns (`gpu_kernels.make_weight`), kinds {name: (format, packing, schedules,
#: extra build parameters, largest M)}, results file stem, table title
SUITES = {
    "bsr": (
        [("b", b, s) for b in (16, 32) for s in (0.7, 0.9)],
        {
            "rows": ("bsr", "block", ROW_SCHEDULES, {}, 16),
            "blocks": ("bsr", "block", BLOCK_SCHEDULES, {}, 16),
            "tc": ("bsr", "block", TC_SCHEDULES, {"tc": 1}, 64),
        },
        "gpu_bsr_blocks",
        "BSR decode kernels on the GPU: a warp per output row, whole blocks per warp load, tensor cores",
    ),
    "unstructured": (
        [("u", s) for s in (0.5, 0.7, 0.9)],
        {
            "dcsr": ("dcsr", None, DCSR_SCHEDULES, {}, 16),
            "tile_bitmap": ("tile_bitmap", None, TC_SCHEDULES, {}, 64),
        },
        "gpu_tile_bitmap",
        "Unstructured decode kernels on the GPU: delta CSR on CUDA cores, tile bitmaps on tensor cores",
    ),
    "nm": (
        [("nm", 2)],
        {
            "rows": ("nm", "nm", DCSR_SCHEDULES, {}, 16),
            "sparse_tc": ("nm", "nm", NM_TC_SCHEDULES, {"tc": 1}, 64),
        },
        "gpu_nm_tc",
        "2:4 decode kernels on the GPU: the n:m row kernel on CUDA cores, mma.sp on sparse tensor cores",
    ),
}


def pattern_name(p: tuple) -> str:
    if p[0] == "nm":
        return f"{p[1]}:4"
    return f"bsr {p[1]}x{p[1]} {p[2]:.0%}" if p[0] == "b" else f"unstructured {p[1]:.0%}"


def markdown(res: dict) -> str:
    kinds = res["kinds"]
    lines = [
        f"# {res['title']}",
        "",
        f"`python benchmarks/gpu_decode_kernels.py --suite {res['suite']}` on {res['device']}, "
        f"{res['date']}. "
        "fp16, L2 flushed, median of CUDA-event times; × = cuBLAS `F.linear` (dense W, same run) / kernel. "
        "Best schedule of each kernel (row kernels: `wpb` warps per block, `lpr` lanes per row; block and "
        "tensor-core kernels: `ks` warps per block row, `unroll` blocks in flight per warp); - = the kernel "
        "does not take this M.",
        "",
        f"| K->N | pattern | M | cuBLAS µs | {' | '.join(f'{k} ×' for k in kinds)} | best (µs) |",
        "|---|---|---|---|" + "---|" * len(kinds) + "---|",
    ]
    for c in res["cells"]:
        ratios = [f"{c['cublas_us'] / c[f'{k}_us']:.2f}" if f"{k}_us" in c else "-" for k in kinds]
        best = min((k for k in kinds if f"{k}_us" in c), key=lambda k: c[f"{k}_us"])
        lines.append(
            f"| {c['k']}->{c['n']} | {c['pattern']} | {c['m']} | {c['cublas_us']:.1f} "
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
    p.add_argument("--suite", choices=sorted(SUITES), default="bsr")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--ms", type=lambda v: [int(i) for i in v.split(",")], default=[1, 4, 16, 64])
    p.add_argument("--shapes", type=lambda v: [SHAPES[int(i)] for i in v.split(",")], default=SHAPES)
    p.add_argument("--kinds", type=lambda v: v.split(","), help="the suite's kernels to time (default: all)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    patterns, kinds, stem, title = SUITES[args.suite]
    kinds = {kd: spec for kd, spec in kinds.items() if not args.kinds or kd in args.kinds}
    tg, bench, rng = ck.cuda_target(), Bench(args.reps), np.random.default_rng(0)
    res = {
        "suite": args.suite,
        "title": title,
        "kinds": list(kinds),
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cells": [],
    }
    for k, n in args.shapes:
        for pattern in patterns:
            w = make_weight(k, n, pattern, rng)
            wt = torch.from_numpy(w).cuda()
            packed = {}
            for m in args.ms:
                x = torch.randn(m, k, dtype=torch.float16, device="cuda")
                ref = x.float() @ wt.float().t()
                cell = {"k": k, "n": n, "pattern": pattern_name(pattern), "m": m}
                cell["cublas_us"] = bench.time(lambda x=x, wt=wt: F.linear(x, wt)) * 1e6
                for kind, (fmt, packing, scheds, extra, max_m) in kinds.items():
                    if m > max_m:
                        continue
                    pack_params = {"block": {"block": (pattern[1],) * 2}, "nm": {"n": pattern[1]}}.get(
                        packing, {}
                    )
                    if fmt not in packed:
                        packed[fmt] = ck.pack(fmt, w, **pack_params)
                    for sc in scheds:
                        try:
                            kern = ck.build(fmt, packed[fmt], m, tg, x_dtype="float16", **extra, **sc)
                        except ck.fmts.UnfitError:  # e.g. a reduction too large for shared memory
                            continue
                        fn = kern.compile(tg)[kern.symbol]
                        wd = [torch.from_numpy(np.ascontiguousarray(a)).cuda() for a in kern.weights.values()]
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
                    f"{k}->{n} {cell['pattern']} M={m}: cuBLAS {cell['cublas_us']:.1f} "
                    + " ".join(f"{kd} {cell[f'{kd}_us']:.1f}" for kd in kinds if f"{kd}_us" in cell),
                    flush=True,
                )
                (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
                (args.out / f"{stem}.md").write_text(markdown(res))


if __name__ == "__main__":
    main()
