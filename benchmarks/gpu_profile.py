"""Hardware-counter profile (Nsight Compute) of the GPU decode kernels whose goals are missed,
next to cuBLAS on the same weight: where the time goes (DRAM and L2 bytes, occupancy, shared
memory wavefronts and bank conflicts, the busiest pipes, the main warp stall reasons).

Runs on the GPU machine (``source .devbundle/setup.sh`` first; ``ncu`` on the PATH). The
script re-runs itself under ``ncu --clock-control none`` (clocks left alone; ncu flushes the
caches before each replay, as the benchmarks do) with ``--child``, which builds each case's
kernel, checks it against fp32 torch (2e-3 relative) and launches it once, and cuBLAS
``F.linear`` once. Writes ``benchmarks/results/gpu_profile.{md,json}`` (or ``--out DIR``; the
raw ncu CSV is kept with ``--keep-csv``).

    python benchmarks/gpu_profile.py [--out DIR] [--cases 0,3]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

WIDE = {"wpb": 32, "rpw": 0, "unroll": 2, "lpr": 32}
NARROW = {"wpb": 8, "rpw": 0, "unroll": 2, "lpr": 32}
#: (K, N, pattern (`gpu_kernels.make_weight`; "act" = activation-sparse at that share), M,
#: format, build parameters): the dispatched kernels of the missed goals, and a met one each
CASES = [
    (4096, 4096, ("u", 0.9), 16, "dcsr", WIDE),
    (4096, 4096, ("u", 0.9), 16, "csr", WIDE),
    (4096, 4096, ("u", 0.5), 16, "dcsr", WIDE),
    (4096, 4096, ("u", 0.9), 1, "dcsr", NARROW),
    (8192, 28672, ("u", 0.9), 16, "dcsr", WIDE),
    (8192, 28672, ("u", 0.9), 16, "csr", {**WIDE, "split": 2}),
    (8192, 28672, ("u", 0.7), 16, "csr", {**WIDE, "split": 2}),
    (8192, 28672, ("u", 0.9), 1, "dcsr", NARROW),
    (8192, 28672, ("u", 0.9), 1, "dcsr6", NARROW),
    (8192, 28672, ("u", 0.5), 1, "dcsr", NARROW),
    (8192, 28672, ("b", 16, 0.9), 1, "bsr", {"ks": 8, "unroll": 2}),
    (4096, 4096, None, 16, "dense", WIDE),
    (11008, 4096, ("act", 0.7), 1, "act", {}),
    (11008, 4096, ("act", 0.5), 1, "act", {}),
]
SECTIONS = ["SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "MemoryWorkloadAnalysis"]
SECTIONS += ["ComputeWorkloadAnalysis"]
EXTRA = [
    "dram__bytes_read.sum",
    "lts__t_bytes.sum",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "smsp__inst_executed.sum",
]


def case_name(c) -> str:
    k, n, pat, m, fmt, params = c
    pname = "dense" if pat is None else {"u": "{}%", "b": "bsr16 {}%", "act": "act {}%"}[pat[0]]
    split = f" split {params['split']}" if "split" in params else ""
    return f"{fmt}{split} {k}->{n} {pname.format(round(pat[-1] * 100)) if pat else pname} M={m}"


def child(cases: list[int]) -> None:
    """Launch each case's kernel and cuBLAS once (under ncu)."""
    import torch
    import torch.nn.functional as F
    import tvm
    from gpu_kernels import make_weight

    from sparsegraph.codegen import cuda_act_kernels as cak
    from sparsegraph.codegen import cuda_kernels as ck

    tg, rng = ck.cuda_target(), np.random.default_rng(0)
    for i in cases:
        k, n, pat, m, fmt, params = CASES[i]
        x = torch.randn(m, k, dtype=torch.float16, device="cuda")
        if fmt == "act":
            w = torch.from_numpy(make_weight(n, k, None, rng)).cuda()  # [K, N], ONNX orientation
            kern = cak.act_cuda_func(m, n, k)
            with tg:
                fn = tvm.compile(tvm.IRModule({kern.symbol: kern.prim_func}), target=tg)[kern.symbol]
            th = torch.full((k,), float(np.quantile(np.abs(x.float().cpu().numpy()), pat[1])), device="cuda")
            args, ref = (x, th, w), torch.where(x.float().abs() > th, x.float(), 0) @ w.float()
            wt = w.t().contiguous()
        else:
            w = make_weight(k, n, pat, rng)
            wt = torch.from_numpy(w).cuda()
            pack = {"block": (pat[1],) * 2} if fmt == "bsr" else {}
            kern = ck.build(fmt, ck.pack(fmt, w, **pack), m, tg, x_dtype="float16", **params)
            fn = kern.compile(tg)[kern.symbol]
            wd = [torch.from_numpy(np.ascontiguousarray(a)).cuda() for a in kern.weights.values()]
            args, ref = (x, *wd), x.float() @ wt.float().t()
        y = torch.empty(m, n, dtype=torch.float16, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.profiler.start()  # ncu profiles only the launches in this window
        fn(*args, y)
        F.linear(x, wt)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        err = float((y.float() - ref).abs().max() / ref.abs().max())
        if not err <= 2e-3:
            raise AssertionError(f"{case_name(CASES[i])}: rel err {err:.1e}")
        print(f"case {i}: {case_name(CASES[i])} ok (rel err {err:.1e})", flush=True)


def profile(cases: list[int], log: Path) -> list[dict[str, str]]:
    """Run `child` under ncu; one dict of raw metrics per profiled kernel, in launch order."""
    base = ["ncu", "--clock-control", "none", "--profile-from-start", "off", "--csv", "--page", "raw"]
    base += ["--log-file", str(log)]
    base += [a for s in SECTIONS for a in ("--section", s)]
    cmd = [sys.executable, __file__, "--child", "--cases", ",".join(map(str, cases))]
    done = subprocess.run([*base, "--metrics", ",".join(EXTRA), *cmd])
    if done.returncode:  # an unknown metric name: the sections alone
        done = subprocess.run([*base, *cmd])
    done.check_returncode()
    return read_raw(log)


def read_raw(log: Path) -> list[dict[str, str]]:
    """The kernels of an ``ncu --csv --page raw`` log: one dict of metric -> value each."""
    text = log.read_text()
    rows = list(csv.reader(io.StringIO(text[text.index('"ID"') :])))
    return [dict(zip(rows[0], r, strict=False)) for r in rows[2:]]  # rows[1]: units


def num(row: dict[str, str], key: str) -> float:
    try:
        return float(row.get(key, "nan").replace(",", ""))
    except ValueError:
        return float("nan")


def summary(row: dict[str, str]) -> dict:
    """The metrics the table shows, from one kernel's raw row."""
    t_us = num(row, "gpu__time_duration.sum") / 1e3
    stalls = {
        m.group(1): num(row, key)
        for key in row
        if (m := re.fullmatch(r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio", key))
    }
    pipes = {
        m.group(1): num(row, key)
        for key in row
        if (m := re.fullmatch(r"sm__inst_executed_pipe_(\w+)\.avg\.pct_of_peak_sustained_active", key))
    }
    top = lambda d, n: sorted(((v, k) for k, v in d.items() if v == v), reverse=True)[:n]  # noqa: E731
    return {
        "kernel": row.get("Kernel Name", "")[:60],
        "us": t_us,
        "dram_read_MB": num(row, "dram__bytes_read.sum") / 1e6,
        "dram_TBps": num(row, "dram__bytes_read.sum") / (t_us * 1e6),
        "dram_pct": num(row, "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
        "l2_MB": num(row, "lts__t_bytes.sum") / 1e6,
        "sm_pct": num(row, "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
        "occupancy_pct": num(row, "sm__warps_active.avg.pct_of_peak_sustained_active"),
        "regs": num(row, "launch__registers_per_thread"),
        "smem_wavefronts_M": num(row, "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum") / 1e6,
        "lsu_data_pct": num(row, "l1tex__data_pipe_lsu_wavefronts.sum.pct_of_peak_sustained_elapsed"),
        "bank_conflicts_M": num(row, "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum") / 1e6,
        "inst_M": num(row, "smsp__inst_executed.sum") / 1e6,
        "pipes": [f"{k} {v:.0f}%" for v, k in top(pipes, 3)],
        "stalls": [f"{k} {v:.1f}" for v, k in top(stalls, 3)],
    }


def markdown(res: dict) -> str:
    head = "| case | kernel | us | DRAM MB | DRAM TB/s | L2 MB | SM % | occ. % | regs | LSU data % "
    head += "| smem wavefr. M | bank confl. M | inst M | busiest pipes (% of peak) "
    head += "| top stalls (warps per issue) |"
    lines = [
        "# Nsight Compute profile of the GPU decode kernels",
        "",
        f"{res['device']}, {res['date']}; `ncu --clock-control none` (caches flushed before each replay), "
        "one launch each; every case's kernel is followed by cuBLAS `F.linear` on the same dense W.",
        "",
        "Columns: kernel time; DRAM bytes read and their rate; L2 traffic (all requests); SM throughput "
        "and achieved occupancy (% of peak); registers per thread; LSU data pipe busy (shared-memory and L1 "
        "wavefronts, % of peak over the kernel); shared-memory wavefronts and the bank conflicts among them "
        "(millions); warp instructions executed (millions); the three busiest pipes (% of issue peak); the "
        "three largest warp stall reasons (warps stalled per issued instruction).",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['case']} | {r['kernel'][:40]} | {r['us']:.1f} | {r['dram_read_MB']:.1f} "
            f"| {r['dram_TBps']:.2f} "
            f"| {r['l2_MB']:.1f} | {r['sm_pct']:.0f} | {r['occupancy_pct']:.0f} | {r['regs']:.0f} "
            f"| {r['lsu_data_pct']:.0f} "
            f"| {r['smem_wavefronts_M']:.2f} | {r['bank_conflicts_M']:.2f} | {r['inst_M']:.1f} "
            f"| {', '.join(r['pipes'])} | {', '.join(r['stalls'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--cases", type=lambda v: [int(i) for i in v.split(",")], default=list(range(len(CASES))))
    p.add_argument("--keep-csv", action="store_true", help="also write ncu's raw CSV to --out")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.cases)
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log = args.out / "gpu_profile.csv" if args.keep_csv else Path(tmp) / "ncu.csv"
        rows = profile(args.cases, log)
    ours = [i for i, r in enumerate(rows) if r.get("Kernel Name", "").startswith("sg_")]
    if len(ours) != len(args.cases):
        raise RuntimeError(f"expected {len(args.cases)} of our kernels among the profiled, got {len(ours)}")
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    case_of = {i: case_name(CASES[c]) for i, c in zip(ours, args.cases, strict=True)}
    res["rows"] = [{"case": case_of.get(i, "cuBLAS (same W, M)"), **summary(r)} for i, r in enumerate(rows)]
    (args.out / "gpu_profile.json").write_text(json.dumps(res, indent=1))
    (args.out / "gpu_profile.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
