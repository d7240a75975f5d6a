"""`benchmarks/gpu_profile.py` reads Nsight Compute's raw CSV (no GPU needed for this part)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_profile", ROOT / "benchmarks" / "gpu_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_raw_csv_rows_become_the_table_metrics(tmp_path):
    gp = _module()
    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    pipe = "sm__inst_executed_pipe_{}.avg.pct_of_peak_sustained_active"
    cols = ["ID", "Kernel Name", "gpu__time_duration.sum", "dram__bytes_read.sum", "lts__t_bytes.sum"]
    cols += [stall.format(s) for s in ("long_scoreboard", "short_scoreboard", "barrier", "wait")]
    cols += [pipe.format(s) for s in ("fma", "lsu", "alu", "adu")]
    units = ["", "", "ns", "byte", "byte", *[""] * 8]
    ours = ["0", "sg_cuda_csr_m16_kernel", "10,000", "20,000,000", "50,000,000", "1.5", "6.0", "0.2", "2.0"]
    ours += ["30", "45", "10", "5"]
    text = "==PROF== Connected to process\n" + "\n".join(
        ",".join(f'"{v}"' for v in row) for row in (cols, units, ours)
    )
    log = tmp_path / "ncu.csv"
    log.write_text(text + "\n")
    (row,) = gp.read_raw(log)
    got = gp.summary(row)
    assert got["kernel"] == "sg_cuda_csr_m16_kernel" and got["us"] == 10.0
    assert got["dram_read_MB"] == 20.0 and abs(got["dram_TBps"] - 2.0) < 1e-9 and got["l2_MB"] == 50.0
    assert got["stalls"] == ["short_scoreboard 6.0", "wait 2.0", "long_scoreboard 1.5"]
    assert got["pipes"] == ["lsu 45%", "fma 30%", "alu 10%"]
    assert got["occupancy_pct"] != got["occupancy_pct"]  # not collected: NaN, not a made-up number
    table = gp.markdown({"device": "d", "date": "t", "rows": [{"case": "c", **got}]})
    assert "| c | sg_cuda_csr_m16_kernel | 10.0 |" in table
