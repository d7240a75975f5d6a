"""`sparsegraph bench OUT`: the compiled model vs onnxruntime on the original, same run.

For every compiled bucket, random valid inputs of its shapes are run alternately through
the compiled `Session` and through onnxruntime on the original (dense) model; the median
step times, their ratio, a Markdown table, JSON and a bar chart land in `OUT/bench.*`.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from .errors import UsageError
from .model import Model
from .runtime import Session
from .validate import session


def bench(folder: str | Path, repeat: int = 30, original: str | Path | None = None) -> dict[str, Any]:
    from .codegen.llvm_compile import bucket_feeds

    folder = Path(folder)
    sess = Session(folder)
    report_path = folder / "report.json"
    if original is None:
        if not report_path.is_file():
            raise UsageError(f"{folder}: no report.json naming the original model; pass --original")
        original = json.loads(report_path.read_text())["model"]
    original = Path(original)
    if not original.is_file():
        raise UsageError(f"{original}: original model not found (pass --original)")
    ort_sess = session(original)
    model = Model.load(original)
    rows = []
    for bucket in sess.manifest["buckets"]:
        feeds = bucket_feeds(model, bucket["shapes"], seed=0)
        sess.run(None, feeds), ort_sess.run(None, feeds)
        t_ours, t_ort = [], []
        for _ in range(repeat):  # alternate, so drift in machine load hits both
            t_ours.append(_once(sess.run, feeds))
            t_ort.append(_once(ort_sess.run, feeds))
        a, b = statistics.median(t_ours), statistics.median(t_ort)
        rows.append(
            {
                "bucket": bucket["tag"],
                "shapes": bucket["shapes"],
                "compiled_ms": a * 1e3,
                "onnxruntime_ms": b * 1e3,
                "speedup": b / a,
            }
        )
    result = {"model": str(original), "compiled": str(folder), "repeat": repeat, "rows": rows}
    (folder / "bench.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# {original.name}: compiled vs onnxruntime (dense original), median of {repeat} alternating runs",
        "",
        "| bucket | onnxruntime ms | compiled ms | speedup |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['bucket']} | {r['onnxruntime_ms']:.3f} | {r['compiled_ms']:.3f} | {r['speedup']:.2f}x |"
        for r in rows
    ]
    (folder / "bench.md").write_text("\n".join(lines) + "\n")
    _plot(rows, folder / "bench.png", original.name)
    return result


def _once(run, feeds) -> float:
    t0 = time.perf_counter()
    run(None, feeds)
    return time.perf_counter() - t0


def _plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows) + 2), 3.5))
    ax.bar(
        x - 0.2,
        [r["onnxruntime_ms"] for r in rows],
        0.4,
        color="tab:gray",
        label="onnxruntime (dense original)",
    )
    ax.bar(x + 0.2, [r["compiled_ms"] for r in rows], 0.4, color="tab:red", label="sparsegraph compiled")
    for i, r in enumerate(rows):
        ax.text(i + 0.2, r["compiled_ms"], f"{r['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [r["bucket"] for r in rows])
    ax.set_ylabel("ms per run")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
