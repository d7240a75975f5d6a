"""Calibrated pruning on stories260K: dense vs magnitude vs Wanda vs SparseGPT.

At 50 % unstructured, 2:4 and 70 % unstructured, compiles stories260K with the shipped
recipes (`magnitude50`/`nm24`/`magnitude70`, `wanda*`, `sparsegpt*`), calibrated on the
first half of the TinyStories stories (128 seeded windows of 128 tokens), and scores every
`portable.onnx` in onnxruntime on the held-out second half (the windows of
`benchmarks/perplexity.py`). Also runs the calibrated passes in one-shot mode (statistics
of the dense model, `sequential: false`) as an ablation. Writes
`benchmarks/results/calibrated_perplexity.{md,json,png}`.

    python benchmarks/calibrated_perplexity.py [--windows N] [--seq-len L] [--samples S] [--seqlen T]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console

import sparsegraph as sg
from sparsegraph.calibration import Calibration
from sparsegraph.eval.perplexity import load_stories, perplexity, token_windows
from sparsegraph.eval.tokenizer import Llama2cTokenizer

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "stories260K" / "stories260K.onnx"
TOKENIZER = ROOT / "examples" / "stories260K" / "tok512.bin"
TEXT = ROOT / "examples" / "data" / "tinystories_valid.txt"
RECIPES = ROOT / "examples" / "recipes"
POINTS = {  # point -> (label, uncalibrated baseline recipe, suffix of the calibrated recipes)
    "50%": ("50 % unstructured", "magnitude50", "50"),
    "2:4": ("2:4", "nm24", "24"),
    "70%": ("70 % unstructured", "magnitude70", "70"),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--windows", type=int, default=200, help="held-out windows scored (default 200)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per held-out window")
    parser.add_argument("--samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    tok = Llama2cTokenizer(TOKENIZER)
    stories = load_stories(TEXT)
    calib_docs, held_out = stories[: len(stories) // 2], stories[len(stories) // 2 :]
    windows = token_windows(tok, held_out, seq_len=args.seq_len, max_windows=args.windows)
    model = sg.Model.load(MODEL)
    start = time.perf_counter()
    dense = perplexity(MODEL, windows)
    rows = [_row("dense", "dense", None, dense, None, None)]
    with tempfile.TemporaryDirectory() as tmp:
        for point, (_, baseline, suffix) in POINTS.items():
            for method, recipe, one_shot in (
                ("magnitude", baseline, False),
                ("wanda", f"wanda{suffix}", False),
                ("sparsegpt", f"sparsegpt{suffix}", False),
                ("wanda", f"wanda{suffix}", True),
                ("sparsegpt", f"sparsegpt{suffix}", True),
            ):
                steps = sg.Recipe.load(RECIPES / f"{recipe}.yaml")
                if one_shot:
                    steps = sg.Recipe.load(
                        {"steps": [{**s, "sequential": False} for s in steps.to_dict()["steps"]]}
                    )
                calib, tok_seconds = None, None
                if method != "magnitude":
                    t0 = time.perf_counter()
                    calib = Calibration.from_text(calib_docs, tok, model, args.samples, args.seqlen, seed=0)
                    tok_seconds = time.perf_counter() - t0
                t0 = time.perf_counter()
                result = sg.compile_model(MODEL, steps, Path(tmp) / f"{recipe}{one_shot}", calib=calib)
                seconds = time.perf_counter() - t0
                ppl = perplexity(result.portable, windows)
                label = f"{recipe} (one-shot)" if one_shot else recipe
                row = _row(label, method, point, ppl, result.report, seconds)
                row["one_shot"] = one_shot
                if calib is not None:
                    row["calibration_seconds"] = round(calib.seconds, 3)
                    row["tokenize_seconds"] = round(tok_seconds, 3)
                    row["calibration_runs"] = calib.runs
                rows.append(row)
                Console().print(f"{label}: perplexity {ppl.ppl:.3f}, compile {seconds:.1f} s")
    total = time.perf_counter() - start
    for r in rows:
        r["ppl_ratio"] = r["ppl"] / dense.ppl
    verdicts = _verdicts(rows)
    meta = {
        "model": "stories260K",
        "calibration": f"first half of the stories of examples/data/tinystories_valid.txt: {args.samples} "
        f"windows of {args.seqlen} tokens (seed 0)",
        "evaluation": "second half of the stories (held out)",
        "windows": len(windows),
        "seq_len": args.seq_len,
        "tokens": dense.n_tokens,
        "seconds": round(total, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibrated_perplexity.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "verdicts": verdicts}, indent=2)
    )
    text = _markdown(rows, meta, verdicts, dense.ppl)
    (args.out / "calibrated_perplexity.md").write_text(text)
    _plot(rows, dense.ppl, args.out / "calibrated_perplexity.png")
    Console().print(text)


def _row(recipe, method, point, ppl, report, seconds) -> dict:
    sparsity = None
    if report is not None:
        body = [r for r in report["ops"] if r["role"] not in ("embed", "lm_head")]
        sparsity = 1 - sum(r["nonzeros_after"] for r in body) / sum(r["params"] for r in body)
    return {
        "recipe": recipe,
        "method": method,
        "point": point,
        "sparsity": sparsity or 0.0,
        "ppl": ppl.ppl,
        "tokens": ppl.n_tokens,
        "compile_seconds": None if seconds is None else round(seconds, 3),
    }


def _verdicts(rows) -> dict[str, dict[str, bool]]:
    """Per point: does each calibrated method (shipped, sequential recipe) beat magnitude?"""
    out = {}
    for point in POINTS:
        ppl = {r["method"]: r["ppl"] for r in rows if r["point"] == point and not r.get("one_shot")}
        out[point] = {m: ppl[m] < ppl["magnitude"] for m in ("wanda", "sparsegpt")}
    return out


def _markdown(rows, meta, verdicts, dense_ppl) -> str:
    lines = [
        f"# stories260K: calibrated pruning ({meta['tokens']:,} held-out TinyStories tokens, "
        f"{meta['windows']} windows of ≤ {meta['seq_len']})",
        "",
        f"Calibration: {meta['calibration']}. Evaluation: {meta['evaluation']}. "
        "Perplexity of `portable.onnx` in onnxruntime; dense perplexity "
        f"{dense_ppl:.3f}. Shipped recipes run `sequential: true` (layer L+1 calibrated on the "
        "model with layers ≤ L pruned); one-shot rows calibrate every layer on the dense model.",
        "",
        "| point | method | recipe | sparsity of the pruned layers | perplexity | × dense | calibration s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        calib = f"{r['calibration_seconds']:.2f}" if "calibration_seconds" in r else "–"
        lines.append(
            f"| {r['point'] or '–'} | {r['method']} | {r['recipe']} | {r['sparsity']:.1%} | {r['ppl']:.3f} "
            f"| {r['ppl_ratio']:.2f} | {calib} |"
        )
    lines += ["", "Calibrated method beats magnitude (shipped recipes):", ""]
    for point, v in verdicts.items():
        lines.append(f"- {point}: " + ", ".join(f"{m} {'yes' if ok else 'NO'}" for m, ok in v.items()))
    return "\n".join(lines) + "\n"


def _plot(rows, dense_ppl, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = ["magnitude", "wanda", "sparsegpt"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = np.arange(len(POINTS))
    for i, method in enumerate(methods):
        values = [
            next(
                r["ppl"] for r in rows if r["point"] == p and r["method"] == method and not r.get("one_shot")
            )
            for p in POINTS
        ]
        bars = ax.bar(x + (i - 1) * 0.27, values, 0.27, label=method)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.axhline(dense_ppl, color="gray", linestyle="--", linewidth=1, label=f"dense {dense_ppl:.2f}")
    ax.set_xticks(x, [label for label, _, _ in POINTS.values()])
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title("stories260K on held-out TinyStories, calibrated vs magnitude")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
