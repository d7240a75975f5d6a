"""Charts people would rather look at than tables (matplotlib, written to PNG)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any


def plot_layers(summary: dict[str, dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Per-layer weight sparsity, and weight size dense vs the best sparse format.

    `summary` is `sparsegraph.op_summary(model)`; ops without a layer (embeddings, heads)
    are grouped under "other".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[Any, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for s in summary.values():
        g = groups[s["layer"] if s["layer"] is not None else "other"]
        g["params"] += s["params"]
        g["nonzeros"] += s["nonzeros"]
        g["dense"] += s["bytes_dense"] / 1e6
        g["best"] += s["bytes_best"] / 1e6
    keys = sorted((k for k in groups if k != "other"), key=int) + (["other"] if "other" in groups else [])
    labels = [str(k) for k in keys]
    sparsity = [100 * (1 - groups[k]["nonzeros"] / max(groups[k]["params"], 1)) for k in keys]
    import numpy as np

    x = np.arange(len(keys))
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(6, 0.6 * len(keys) + 3), 6), sharex=True)
    ax.bar(x, sparsity, color="tab:blue")
    ax.set_ylabel("weight sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "per-layer sparsity and size")
    ax2.bar(x - 0.2, [groups[k]["dense"] for k in keys], 0.4, color="tab:gray", label="dense")
    ax2.bar(x + 0.2, [groups[k]["best"] for k in keys], 0.4, color="tab:red", label="best sparse format")
    ax2.set_ylabel("weight size (MB)")
    ax2.set_xlabel("layer")
    ax2.set_xticks(x, labels)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
