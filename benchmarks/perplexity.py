"""Accuracy of each shipped recipe on the bundled stories260K model.

Compiles stories260K with each recipe, runs every `portable.onnx` in onnxruntime on
held-out TinyStories text, and writes `benchmarks/results/perplexity.{md,json,png}`.

    python benchmarks/perplexity.py [--windows N] [--seq-len L]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import track

import sparsegraph as sg
from sparsegraph.eval.perplexity import load_stories, perplexity, token_windows
from sparsegraph.eval.tokenizer import Llama2cTokenizer

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "stories260K" / "stories260K.onnx"
TOKENIZER = ROOT / "examples" / "stories260K" / "tok512.bin"
TEXT = ROOT / "examples" / "data" / "tinystories_valid.txt"
RECIPES = ["magnitude30", "magnitude50", "magnitude70", "nm24", "block4x4_50", "lowrank50"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--windows", type=int, default=200, help="held-out windows scored (default 200)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    tok = Llama2cTokenizer(TOKENIZER)
    stories = load_stories(TEXT)
    held_out = stories[len(stories) // 2 :]  # the first half is left for calibration
    windows = token_windows(tok, held_out, seq_len=args.seq_len, max_windows=args.windows)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        dense = perplexity(MODEL, windows)
        rows.append(_row("dense", 0.0, 0.0, dense, None))
        for name in track(RECIPES, description="recipes"):
            result = sg.compile_model(MODEL, ROOT / "examples" / "recipes" / f"{name}.yaml", Path(tmp) / name)
            t = result.report["totals"]
            body = [r for r in result.report["ops"] if r["role"] not in ("embed", "lm_head")]
            kept = sum(r["nonzeros_after"] for r in body) / sum(r["params"] for r in body)
            ppl = perplexity(result.portable, windows)
            rows.append(_row(name, 1 - kept, t["sparsity_after"], ppl, t["bytes_best_after"]))
        seconds = time.perf_counter() - start
    for r in rows:
        r["ppl_ratio"] = r["ppl"] / dense.ppl
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": "stories260K",
        "text": "examples/data/tinystories_valid.txt (second half of the stories)",
        "windows": len(windows),
        "seq_len": args.seq_len,
        "tokens": dense.n_tokens,
        "seconds": round(seconds, 1),
    }
    (args.out / "perplexity.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"# stories260K perplexity by recipe ({meta['tokens']:,} held-out TinyStories tokens, "
        f"{meta['windows']} windows of ≤ {args.seq_len})",
        "",
        "| recipe | sparsity of the pruned layers | of all weights | perplexity | × dense |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['sparsity']:.1%} | {r['model_sparsity']:.1%} | {r['ppl']:.3f} "
            f"| {r['ppl_ratio']:.3f} |"
        )
    (args.out / "perplexity.md").write_text("\n".join(lines) + "\n")
    _plot(rows, args.out / "perplexity.png")
    Console().print("\n".join(lines))


def _row(recipe: str, sparsity: float, model_sparsity: float, ppl, bytes_best: int | None) -> dict:
    return {
        "recipe": recipe,
        "sparsity": sparsity,
        "model_sparsity": model_sparsity,
        "ppl": ppl.ppl,
        "bytes_best": bytes_best,
        "tokens": ppl.n_tokens,
    }


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = [r["recipe"] for r in rows]
    ax.bar(names, [r["ppl"] for r in rows], color=["tab:gray"] + ["tab:blue"] * (len(rows) - 1))
    for i, r in enumerate(rows):
        ax.text(i, r["ppl"], f"{r['ppl']:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("stories260K on held-out TinyStories, portable.onnx in onnxruntime")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
