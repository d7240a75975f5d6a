"""Training-free activation sparsity (`activation_sparsity` pass): accuracy and sparsity reached.

For stories260K (perplexity on held-out TinyStories) and all-MiniLM-L6-v2 (cosine of the
sentence embeddings vs the dense model), at 25 / 40 / 50 % activation sparsity, for the
methods `teal` (tensor thresholds on every linear op's input), `cats` (the FFN activation
output only), `chess` (channel-wise thresholds on FFN inputs) and `topk` (K largest |x| per
row), each with `uniform` and `greedy` (TEAL) allocation of the budget. Every variant is the
portable ONNX model run in stock onnxruntime.

- stories260K: calibration on the first half of the stories of
  `examples/data/tinystories_valid.txt` (64 seeded windows of 128 tokens), perplexity on
  the second half (the windows of `benchmarks/perplexity.py`), sparsity reached measured on
  32 windows of 128 tokens of the second half.
- all-MiniLM-L6-v2: exported as in `benchmarks/minilm.py` (functions imported from it);
  calibration on the 128 sentences of `examples/data/wikitext_calib.txt` (one unpadded
  sentence per batch, so no pad position enters the thresholds); fidelity on the 256
  sentences of `examples/data/wikitext_sentences.txt`, sparsity reached on 64 of them
  (unpadded).

Columns: *sparsity (sites)* = sparsity of the thresholded tensors, weighted by the weights
each feeds (the budget the pass meets), on held-out data; *weights skipped* = the same as a
fraction of all q/k/v/o/up/gate/down weights (what a fused kernel could skip: CATS only
touches the FFN). Writes `benchmarks/results/activation_sparsity.{md,json,png}`.

With `--compiled`, stories260K with `teal50.yaml` is also compiled for this CPU
(`--target llvm`, decode) and the compiled module compared with onnxruntime on the
portable model.

    python benchmarks/activation_sparsity.py [--windows N] [--skip-minilm] [--compiled]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console

import sparsegraph as sg
from sparsegraph.calibration import Calibration
from sparsegraph.eval.perplexity import load_stories, perplexity, token_windows
from sparsegraph.eval.tokenizer import Llama2cTokenizer
from sparsegraph.passes.analysis.roles import Roles
from sparsegraph.passes.analysis.sparsifiable import SparsifiableOps
from sparsegraph.passes.rewrite.activation_sparsity import measure_activation_sparsity

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
STORIES = ROOT / "examples" / "stories260K" / "stories260K.onnx"
TOKENIZER = ROOT / "examples" / "stories260K" / "tok512.bin"
TEXT = ROOT / "examples" / "data" / "tinystories_valid.txt"
SPARSITIES = (0.25, 0.4, 0.5)
METHODS = ("teal", "cats", "chess", "topk")
ALLOCATIONS = ("uniform", "greedy")
GREEDY = {"greedy_batches": 2, "step": 0.1}  # stories260K: 2 batches of 4 windows of 128 tokens
GREEDY_MINILM = {"greedy_batches": 4, "step": 0.1}  # 4 unpadded sentences


def body_params(model: sg.Model) -> int:
    """Weights of the transformer body's linear ops (not embeddings or output heads)."""
    ctx = sg.PassContext()
    roles = ctx.get(Roles, model)
    return sum(
        op.shape[0] * op.shape[1]
        for op in ctx.get(SparsifiableOps, model).linear
        if (r := roles.get(op.name)) is None or r.role not in ("lm_head", "head", "embed")
    )


def sparsify(model_path: Path, method: str, alloc: str, s: float, calib: Calibration, out: Path, **greedy):
    """Run the pass on a fresh copy of the model; save the portable model; the pass's records.
    Greedy CATS allocates over the whole model (one CATS site per block: a block budget is uniform)."""
    model = sg.Model.load(model_path)
    ctx = sg.PassContext(0)
    ctx.extras["calibration"] = calib
    step = {"pass": "activation_sparsity", "method": method, "sparsity": s, "allocation": alloc}
    if alloc == "greedy":
        step.update(greedy, scope="model" if method == "cats" else "block")
    steps = [step]
    t0 = time.perf_counter()
    ctx = sg.PassManager(sg.Recipe.load({"steps": steps}).steps).run(model, ctx)
    seconds = time.perf_counter() - t0
    result = ctx.history[-1][1]
    model.save(out)
    return model, [c.detail for c in result.changes], seconds, result.warnings


def summarize(records, reached: dict[str, float], total_params: int) -> dict:
    params = sum(r["params"] for r in records)
    held = sum(reached[r["tensor"]] * r["params"] for r in records)
    calib = sum(r["calibration"] * r["params"] for r in records)
    return {
        "sites": len(records),
        "site_params": params,
        "sparsity_calibration": calib / params,
        "sparsity_held_out": held / params,
        "weights_skipped": held / total_params,
        "site_min_held_out": min(reached[r["tensor"]] for r in records),
        "site_max_held_out": max(reached[r["tensor"]] for r in records),
    }


# ------------------------------------------------------------------------------ stories260K
def run_stories(args, tmp: Path) -> tuple[dict, list[dict]]:
    tok = Llama2cTokenizer(TOKENIZER)
    stories = load_stories(TEXT)
    calib_docs, held_docs = stories[: len(stories) // 2], stories[len(stories) // 2 :]
    windows = token_windows(tok, held_docs, seq_len=args.seq_len, max_windows=args.windows)
    model = sg.Model.load(STORIES)
    calib = Calibration.from_text(calib_docs, tok, model, samples=64, seqlen=128, seed=0, batch_size=4)
    held = list(Calibration.from_text(held_docs, tok, model, samples=32, seqlen=128, seed=1).batches())
    total = body_params(model)
    dense = perplexity(STORIES, windows)
    Console().print(f"stories260K dense perplexity {dense.ppl:.3f} ({dense.n_tokens} tokens)")
    rows = []
    for s in SPARSITIES:
        for method in METHODS:
            for alloc in ALLOCATIONS:
                path = tmp / f"stories_{method}_{alloc}_{s}.onnx"
                m, records, seconds, warnings = sparsify(STORIES, method, alloc, s, calib, path, **GREEDY)
                reached = measure_activation_sparsity(m, held)
                ppl = perplexity(path, windows)
                row = {
                    "model": "stories260K",
                    "method": method,
                    "allocation": alloc,
                    "target": s,
                    "ppl": ppl.ppl,
                    "ppl_ratio": ppl.ppl / dense.ppl,
                    "pass_seconds": round(seconds, 2),
                    **summarize(records, reached, total),
                    "tensors": [{**r, "held_out_text": reached[r["tensor"]]} for r in records],
                    "warnings": warnings,
                }
                rows.append(row)
                Console().print(
                    f"stories {method:5s} {alloc:7s} {s:.0%}: ppl {ppl.ppl:.3f} (x{row['ppl_ratio']:.3f}), "
                    f"held-out sparsity {row['sparsity_held_out']:.3f}, {seconds:.1f} s"
                )
    meta = {
        "dense_ppl": dense.ppl,
        "tokens": dense.n_tokens,
        "windows": len(windows),
        "seq_len": args.seq_len,
        "body_params": total,
        "calibration": "first half of the stories: 64 windows of 128 tokens (seed 0) in batches of 4; the "
        "pass holds out the last 25 % of these batches; greedy: output error on the first 2 batches, "
        "step 0.1",
        "held_out": "second half of the stories: perplexity windows as benchmarks/perplexity.py; sparsity on "
        "32 windows of 128 tokens (seed 1)",
    }
    return meta, rows


# -------------------------------------------------------------------------- all-MiniLM-L6-v2
def run_minilm(args, tmp: Path) -> tuple[dict, list[dict]]:
    import minilm

    mdir = minilm.model_dir()
    tok = minilm.load_tokenizer(mdir)
    onnx_path = minilm.OUT / "minilm.onnx"
    if not onnx_path.exists():
        minilm.export_onnx(mdir, onnx_path, tok)
    sents = minilm.read_lines(minilm.EVAL_TEXT)
    calib_sents = minilm.read_lines(minilm.CALIB_TEXT)
    calib = Calibration([minilm.tokenize(tok, [x], minilm.CALIB_LEN) for x in calib_sents])
    held = [minilm.tokenize(tok, [x], minilm.EVAL_MAX_LEN) for x in sents[:64]]
    batches = [minilm.tokenize(tok, sents[i : i + 32], minilm.EVAL_MAX_LEN) for i in range(0, len(sents), 32)]
    dense = minilm.embed(onnx_path, batches, threads=1)
    total = body_params(sg.Model.load(onnx_path))
    rows = []
    for s in SPARSITIES:
        for method in METHODS:
            for alloc in ALLOCATIONS:
                path = tmp / f"minilm_{method}_{alloc}_{s}.onnx"
                m, records, seconds, warnings = sparsify(
                    onnx_path, method, alloc, s, calib, path, **GREEDY_MINILM
                )
                reached = measure_activation_sparsity(m, held)
                fid = minilm.fidelity(minilm.embed(path, batches, threads=1), dense)
                row = {
                    "model": "all-MiniLM-L6-v2",
                    "method": method,
                    "allocation": alloc,
                    "target": s,
                    **fid,
                    "pass_seconds": round(seconds, 2),
                    **summarize(records, reached, total),
                    "tensors": [{**r, "held_out_text": reached[r["tensor"]]} for r in records],
                    "warnings": warnings,
                }
                rows.append(row)
                path.unlink()
                Console().print(
                    f"minilm {method:5s} {alloc:7s} {s:.0%}: cos {fid['cos_mean']:.4f} "
                    f"(min {fid['cos_min']:.4f}), held-out sparsity {row['sparsity_held_out']:.3f}, "
                    f"{seconds:.1f} s"
                )
    meta = {
        "body_params": total,
        "calibration": f"{len(calib_sents)} sentences of examples/data/wikitext_calib.txt, one unpadded "
        f"sentence per batch (≤ {minilm.CALIB_LEN} tokens); greedy: output error on the first 4 sentences, "
        "step 0.1",
        "eval": f"{len(sents)} sentences of examples/data/wikitext_sentences.txt (batches of 32, padded); "
        "sparsity on the first 64, unpadded",
    }
    return meta, rows


# ------------------------------------------------------------------- portable vs compiled
def run_compiled(tmp: Path) -> dict:
    """stories260K with `teal50.yaml` compiled for this CPU (`--target llvm`, decode: batch 1
    and 4, one token): the compiled module vs onnxruntime on the portable model, and the
    fused-kernel decisions (kernel helper's `act_sparse_rewrite`: fused vs dense time per op)."""
    from sparsegraph.runtime import Session

    out = tmp / "compiled"
    t0 = time.perf_counter()
    result = sg.compile_model(
        STORIES,
        ROOT / "examples" / "recipes" / "teal50.yaml",
        out,
        calib=TEXT,
        tokenizer=TOKENIZER,
        calib_samples=64,
        target="llvm",
        batch_sizes=(1, 4),
        seq_len=1,
        tune_trials=1,
        tuning_db=tmp / "tuning.json",
    )
    seconds = time.perf_counter() - t0
    import onnxruntime as ort

    manifest = json.loads((out / "manifest.json").read_text())
    fused = [f for f in manifest.get("fused", []) if f.get("technique") == "activation_sparsity"]
    sess, ref = Session(out), ort.InferenceSession(str(result.portable), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst, scale, agree = 0.0, 0.0, []
    for batch in (1, 4, 1, 4):
        ids = rng.integers(1, 512, (batch, 1)).astype(np.int64)
        (got,) = sess.run(["logits"], {"tokens": ids})
        (want,) = ref.run(["logits"], {"tokens": ids})
        worst, scale = max(worst, float(np.abs(got - want).max())), max(scale, float(np.abs(want).max()))
        agree.append(float(np.mean(got.argmax(-1) == want.argmax(-1))))
    return {
        "compile_seconds": round(seconds, 1),
        "max_abs_diff": worst,
        "max_abs_logit": scale,
        "argmax_agreement": min(agree),
        "fallbacks": sess.fallbacks,
        "fused_decisions": len(fused),
        "fused_chosen": sum(f.get("chosen") == "fused" for f in fused),
        "decisions": [
            {
                k: f.get(k)
                for k in ("weight_shape", "M", "threshold", "kernel", "fused_us", "dense_us", "chosen")
            }
            for f in fused
        ],
    }


# ---------------------------------------------------------------------------------- output
def markdown(meta: dict, stories: list[dict], mini: list[dict]) -> str:
    sm = meta["stories260K"]
    lines = [
        "# Activation sparsity: TEAL vs CATS vs CHESS vs top-K, uniform vs greedy",
        "",
        "Portable ONNX models (thresholds as `Where(|x| > T, x, 0)`, top-K as TopK/ScatterElements) in "
        "stock onnxruntime. *sparsity (sites)*: zeros in the thresholded tensors, weighted by the "
        "weights each feeds, on held-out data (calibration value in brackets); *weights skipped*: the "
        "same as a fraction of all q/k/v/o/up/gate/down weights, i.e. what a fused kernel could skip "
        "(CATS only thresholds the FFN activation, so it skips less at the same target).",
        "",
        f"## stories260K (dense perplexity {sm['dense_ppl']:.3f}, {sm['tokens']:,} held-out tokens)",
        "",
        f"Calibration: {sm['calibration']}. Held out: {sm['held_out']}.",
        "",
        "| target | method | allocation | perplexity | × dense | sparsity (sites), held-out [calib] "
        "| site range | weights skipped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in stories:
        lines.append(
            f"| {r['target']:.0%} | {r['method']} | {r['allocation']} | {r['ppl']:.3f} "
            f"| {r['ppl_ratio']:.3f} | {r['sparsity_held_out']:.1%} [{r['sparsity_calibration']:.1%}] "
            f"| {r['site_min_held_out']:.0%}–{r['site_max_held_out']:.0%} | {r['weights_skipped']:.1%} |"
        )
    if mini:
        mm = meta["all-MiniLM-L6-v2"]
        lines += [
            "",
            "## all-MiniLM-L6-v2 (cosine of sentence embeddings vs the dense model)",
            "",
            f"Calibration: {mm['calibration']}. Evaluation: {mm['eval']}. NN = nearest-neighbour agreement.",
            "",
            "| target | method | allocation | cos mean | cos min | NN | sparsity (sites), held-out [calib] "
            "| site range | weights skipped |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mini:
            lines.append(
                f"| {r['target']:.0%} | {r['method']} | {r['allocation']} | {r['cos_mean']:.4f} | "
                f"{r['cos_min']:.4f} | {r['nn_agreement']:.3f} "
                f"| {r['sparsity_held_out']:.1%} [{r['sparsity_calibration']:.1%}] "
                f"| {r['site_min_held_out']:.0%}–{r['site_max_held_out']:.0%} | {r['weights_skipped']:.1%} |"
            )
    comp = meta.get("compiled")
    if comp:
        lines += [
            "",
            "## Portable vs compiled (stories260K, `teal50.yaml`, `--target llvm`, decode batch 1 and 4)",
            "",
            f"Compiled module vs onnxruntime on `portable.onnx`: max |Δ logits| {comp['max_abs_diff']:.2e} "
            f"(logits up to {comp['max_abs_logit']:.1f}), argmax agreement {comp['argmax_agreement']:.0%}, "
            f"{comp['fallbacks']} fallbacks; the fused threshold+matmul kernel was measured against dense "
            f"for {comp['fused_decisions']} (op, batch) pairs and chosen for {comp['fused_chosen']} "
            "(stories260K's 64-wide layers are too small for speed to mean anything here; see the kernel "
            "benchmarks for speed).",
        ]
    lines += [
        "",
        "Best per target (lowest perplexity / highest cosine). CATS thresholds only the FFN activation, "
        "so at the same target it skips about half the weights the others skip: compare it by the "
        "*weights skipped* column (the plot's x axis).",
        "",
    ]
    for s in SPARSITIES:
        b = min((r for r in stories if r["target"] == s), key=lambda r: r["ppl"])
        text = f"- {s:.0%}: stories260K {b['method']}/{b['allocation']} ({b['ppl']:.3f})"
        if mini:
            c = max((r for r in mini if r["target"] == s), key=lambda r: r["cos_mean"])
            text += f"; MiniLM {c['method']}/{c['allocation']} ({c['cos_mean']:.4f})"
        lines.append(text)
    lines += ["", f"Total benchmark time {meta['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def plot(stories: list[dict], mini: list[dict], dense_ppl: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("stories260K", stories, "ppl", "perplexity (lower is better)")]
    if mini:
        panels.append(("all-MiniLM-L6-v2", mini, "cos_mean", "mean embedding cosine vs dense"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4))
    axes = np.atleast_1d(axes)
    for ax, (title, rows, key, label) in zip(axes, panels, strict=True):
        for i, method in enumerate(METHODS):
            for alloc, style in (("uniform", "-"), ("greedy", "--")):
                pts = [r for r in rows if r["method"] == method and r["allocation"] == alloc]
                ax.plot(
                    [r["weights_skipped"] for r in pts],
                    [r[key] for r in pts],
                    style,
                    marker="o",
                    color=f"C{i}",
                    label=f"{method} {alloc}",
                )
        if key == "ppl":
            ax.axhline(dense_ppl, color="gray", linewidth=1, linestyle=":", label=f"dense {dense_ppl:.2f}")
        ax.set_xlabel("fraction of the linear ops' weights skipped (held-out activation sparsity)")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--windows", type=int, default=200, help="held-out perplexity windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument(
        "--compiled", action="store_true", help="also compile teal50 for this CPU and compare (TVM, ~2-5 min)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    start = time.perf_counter()
    meta: dict = {}
    stories: list[dict] = []
    mini: list[dict] = []

    def write() -> str:  # after every phase, so a long run leaves what it measured
        meta["seconds"] = round(time.perf_counter() - start, 1)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "activation_sparsity.json").write_text(
            json.dumps({"meta": meta, "stories260K": stories, "minilm": mini}, indent=1) + "\n"
        )
        text = markdown(meta, stories, mini)
        (args.out / "activation_sparsity.md").write_text(text)
        plot(stories, mini, meta["stories260K"]["dense_ppl"], args.out / "activation_sparsity.png")
        return text

    with tempfile.TemporaryDirectory() as tmp:
        meta["stories260K"], stories = run_stories(args, Path(tmp))
        write()
        if args.compiled:
            meta["compiled"] = run_compiled(Path(tmp))
            write()
        if not args.skip_minilm:
            meta["all-MiniLM-L6-v2"], mini = run_minilm(args, Path(tmp))
    Console().print(write())


if __name__ == "__main__":
    main()
