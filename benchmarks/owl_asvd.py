"""OWL, sensitivity allocation and ASVD on stories260K: perplexity on held-out TinyStories.

- OWL + Wanda vs Wanda at 70 % unstructured (both `sequential: true`, as `wanda70.yaml`),
  OWL at its defaults (λ = 0.08, M = 5) and at λ = 0.04 / 0.16;
- sensitivity-allocated vs uniform magnitude at 50 % and 70 % (each op probed alone at the
  target sparsity on 32 calibration windows, λ = 0.2);
- ASVD (α = 0.5) vs plain SVD (`lowrank`) keeping 50 %, 75 % and 90 % of each layer's
  parameters (`param_ratio`), and ASVD with α = 1 at 50 %.

Calibration: the first half of the stories (128 seeded windows of 128 tokens); evaluation:
the second half (the windows of `benchmarks/calibrated_perplexity.py`). Every model is the
`portable.onnx` of `compile_model`, scored in onnxruntime. Writes
`benchmarks/results/owl_asvd.{md,json,png}`.

    python benchmarks/owl_asvd.py [--windows N] [--seq-len L] [--samples S] [--seqlen T]
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

WANDA70 = {"pass": "wanda", "sparsity": 0.7, "sequential": True}
OWL_WANDA70 = {"pass": "wanda", "sparsity": "owl", "sequential": True}
CASES = [  # (group, label, steps, needs calibration)
    ("owl", "wanda 70%", [WANDA70], True),
    ("owl", "owl + wanda 70%", [{"pass": "owl", "sparsity": 0.7}, OWL_WANDA70], True),
    ("owl", "owl (λ=0.04) + wanda 70%", [{"pass": "owl", "sparsity": 0.7, "lam": 0.04}, OWL_WANDA70], True),
    ("owl", "owl (λ=0.16) + wanda 70%", [{"pass": "owl", "sparsity": 0.7, "lam": 0.16}, OWL_WANDA70], True),
    ("sensitivity", "magnitude 50%", [{"pass": "magnitude", "sparsity": 0.5}], False),
    (
        "sensitivity",
        "sensitivity + magnitude 50%",
        [
            {"pass": "sensitivity", "sparsity": 0.5, "allocate": 0.5},
            {"pass": "magnitude", "sparsity": "sensitivity"},
        ],
        True,
    ),
    ("sensitivity", "magnitude 70%", [{"pass": "magnitude", "sparsity": 0.7}], False),
    (
        "sensitivity",
        "sensitivity + magnitude 70%",
        [
            {"pass": "sensitivity", "sparsity": 0.7, "allocate": 0.7},
            {"pass": "magnitude", "sparsity": "sensitivity"},
        ],
        True,
    ),
    *[
        case
        for ratio in (0.5, 0.75, 0.9)
        for case in (
            ("lowrank", f"SVD {ratio:.0%} params", [{"pass": "lowrank", "param_ratio": ratio}], False),
            ("lowrank", f"ASVD α=0.5, {ratio:.0%} params", [{"pass": "asvd", "param_ratio": ratio}], True),
        )
    ],
    ("lowrank", "ASVD α=1, 50% params", [{"pass": "asvd", "param_ratio": 0.5, "alpha": 1.0}], True),
]
PARAM_RATIOS = ("50%", "75%", "90%")


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
    rows = [{"group": "dense", "label": "dense", "ppl": dense.ppl, "sparsity": 0.0, "params_kept": 1.0}]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (group, label, steps, calibrated) in enumerate(CASES):
            calib = None
            if calibrated:
                calib = Calibration.from_text(calib_docs, tok, model, args.samples, args.seqlen, seed=0)
            t0 = time.perf_counter()
            result = sg.compile_model(MODEL, {"steps": steps}, Path(tmp) / str(i), calib=calib)
            seconds = time.perf_counter() - t0
            ppl = perplexity(result.portable, windows)
            rows.append({"group": group, "label": label, "steps": steps, "ppl": ppl.ppl,
                         **_size(result.report), "compile_seconds": round(seconds, 2),
                         **_plan(result.report)})  # fmt: skip
            Console().print(f"{label}: perplexity {ppl.ppl:.3f}, compile {seconds:.1f} s")
    for r in rows:
        r["ppl_ratio"] = r["ppl"] / dense.ppl
    meta = {
        "model": "stories260K",
        "calibration": f"first half of the stories of examples/data/tinystories_valid.txt: {args.samples} "
        f"windows of {args.seqlen} tokens (seed 0)",
        "evaluation": "second half of the stories (held out)",
        "windows": len(windows),
        "seq_len": args.seq_len,
        "tokens": dense.n_tokens,
        "seconds": round(time.perf_counter() - start, 1),
    }
    verdicts = _verdicts(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "owl_asvd.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "verdicts": verdicts}, indent=2, ensure_ascii=False)
    )
    text = _markdown(rows, meta, verdicts, dense.ppl)
    (args.out / "owl_asvd.md").write_text(text)
    _plot(rows, dense.ppl, args.out / "owl_asvd.png")
    Console().print(text)


def _size(report) -> dict:
    """Sparsity (zeros or removed) and parameters kept, over the decoder layers' linear ops."""
    body = [r for r in report["ops"] if r["role"] not in ("embed", "lm_head")]
    params = sum(r["params"] for r in body)
    return {
        "sparsity": 1 - sum(r["nonzeros_after"] for r in body) / params,
        "params_kept": sum(r["params_after"] for r in body) / params,
    }


def _plan(report) -> dict:
    if "owl" in report:
        return {"layer_sparsity": [round(g["sparsity"], 4) for g in report["owl"]["layers"]],
                "outlier_ratio": [round(g["outlier_ratio"], 5) for g in report["owl"]["layers"]]}  # fmt: skip
    if "sensitivity" in report:
        s = [r["sparsity"] for r in report["sensitivity"]["rows"]]
        return {"allocated_range": [round(min(s), 4), round(max(s), 4)]}
    return {}


def _verdicts(rows) -> dict[str, bool]:
    ppl = {r["label"]: r["ppl"] for r in rows}
    return {
        "owl + wanda beats wanda at 70%": ppl["owl + wanda 70%"] < ppl["wanda 70%"],
        "sensitivity allocation beats uniform magnitude at 50%": ppl["sensitivity + magnitude 50%"]
        < ppl["magnitude 50%"],
        "sensitivity allocation beats uniform magnitude at 70%": ppl["sensitivity + magnitude 70%"]
        < ppl["magnitude 70%"],
        **{
            f"ASVD (α=0.5) beats SVD at {r} params": ppl[f"ASVD α=0.5, {r} params"] < ppl[f"SVD {r} params"]
            for r in PARAM_RATIOS
        },
    }


def _markdown(rows, meta, verdicts, dense_ppl) -> str:
    lines = [
        f"# stories260K: OWL, sensitivity allocation, ASVD ({meta['tokens']:,} held-out TinyStories "
        f"tokens, {meta['windows']} windows of ≤ {meta['seq_len']})",
        "",
        f"Calibration: {meta['calibration']}. Evaluation: {meta['evaluation']}. Perplexity of "
        f"`portable.onnx` in onnxruntime; dense perplexity {dense_ppl:.3f}. Sparsity and parameters "
        "kept are over the decoder layers' linear ops (not the embedding / lm_head). Total "
        f"{meta['seconds']:.0f} s.",
        "",
        "| group | recipe | sparsity | params kept | perplexity | × dense | plan | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        plan = "–"
        if "layer_sparsity" in r:
            plan = "layers " + " / ".join(f"{s:.1%}" for s in r["layer_sparsity"])
        elif "allocated_range" in r:
            plan = f"ops {r['allocated_range'][0]:.1%} … {r['allocated_range'][1]:.1%}"
        secs = f"{r['compile_seconds']:.1f}" if "compile_seconds" in r else "–"
        lines.append(
            f"| {r['group']} | {r['label']} | {r['sparsity']:.1%} | {r['params_kept']:.1%} | {r['ppl']:.3f} "
            f"| {r['ppl_ratio']:.2f} | {plan} | {secs} |"
        )
    lines += ["", *[f"- {k}: {'yes' if v else 'NO'}" for k, v in verdicts.items()]]
    return "\n".join(lines) + "\n"


def _plot(rows, dense_ppl, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ["owl", "sensitivity", "lowrank"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), width_ratios=[4, 4, 7])
    for ax, group in zip(axes, groups, strict=True):
        sel = [r for r in rows if r["group"] == group]
        colors = [
            "tab:orange" if r["label"].startswith(("owl", "sensitivity", "ASVD")) else "tab:gray" for r in sel
        ]
        bars = ax.bar(range(len(sel)), [r["ppl"] for r in sel], color=colors)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(sel)), [r["label"] for r in sel], rotation=25, ha="right", fontsize=7)
        ax.axhline(dense_ppl, color="black", linestyle="--", linewidth=1, label=f"dense {dense_ppl:.2f}")
        ax.set_yscale("log")
        ax.set_title(group, fontsize=10)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("perplexity (log scale, lower is better)")
    fig.suptitle("stories260K on held-out TinyStories")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
