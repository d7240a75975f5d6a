"""Structured pruning: smaller dense models, their accuracy and their onnxruntime speed.

For each model (stories260K and the llama_tiny fixture by default; pass `--models` with
any ONNX paths), removes 25 % and 50 % of the FFN neurons and 25 % of the attention heads
(`prune_neurons`, `prune_heads`), and measures against the dense model in the same run:

- parameters (all float initializers) and the file size;
- perplexity on held-out TinyStories text (the second half of
  `examples/data/tinystories_valid.txt`) when the model is a causal LM over the bundled
  llama2.c tokenizer's vocabulary (else "—");
- onnxruntime CPU latency of one forward pass on `--seq-len` tokens (batch 1): every
  variant is run `--runs` times, interleaved round-robin with the others so that machine
  noise hits all alike; the median is reported, and the speedup as dense / variant.

Writes `benchmarks/results/structured.{md,json}`.

    python benchmarks/structured.py [--models A.onnx B.onnx] [--windows N] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console

import sparsegraph as sg
from sparsegraph.eval.perplexity import load_stories, perplexity, token_windows
from sparsegraph.eval.tokenizer import Llama2cTokenizer
from sparsegraph.feeds import feed_candidates

ROOT = Path(__file__).resolve().parent.parent
MODELS = [
    ROOT / "examples" / "stories260K" / "stories260K.onnx",
    ROOT / "tests" / "fixtures" / "llama_tiny.onnx",
]
TOKENIZER = ROOT / "examples" / "stories260K" / "tok512.bin"
TEXT = ROOT / "examples" / "data" / "tinystories_valid.txt"
VARIANTS = {
    "dense": [],
    "ffn -25%": [{"pass": "prune_neurons", "fraction": 0.25}],
    "ffn -50%": [{"pass": "prune_neurons", "fraction": 0.5}],
    "heads -25%": [{"pass": "prune_heads", "fraction": 0.25}],
}
#: variants run only on TinyStories LMs, with calibration windows from the first half of the text
CALIBRATED = {
    "ffn -25% (activation)": [{"pass": "prune_neurons", "fraction": 0.25, "importance": "activation"}],
    "ffn -50% (activation)": [{"pass": "prune_neurons", "fraction": 0.5, "importance": "activation"}],
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, nargs="+", default=MODELS, help="ONNX models to prune")
    parser.add_argument("--windows", type=int, default=200, help="held-out windows scored (default 200)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window and per timed run")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per variant (default 200)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    console = Console()
    tok = Llama2cTokenizer(TOKENIZER)
    stories = load_stories(TEXT)
    held_out = stories[len(stories) // 2 :]
    args.held_in = stories[: len(stories) // 2]  # calibration text
    args.tokenizer = tok
    windows = token_windows(tok, held_out, seq_len=args.seq_len, max_windows=args.windows)
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.models:
            rows += bench_model(Path(path), Path(tmp), windows, tok.vocab_size, args, console)
    meta = {
        "text": "examples/data/tinystories_valid.txt (second half of the stories)",
        "windows": len(windows),
        "seq_len": args.seq_len,
        "timed_runs": args.runs,
        "threads": args.threads,
        "onnxruntime": ort.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# Structured pruning: smaller dense models in onnxruntime",
        "",
        f"Perplexity on {rows[0]['tokens'] or 0:,} held-out TinyStories tokens "
        f"({meta['windows']} windows of ≤ {args.seq_len}); latency of one batch-1 forward pass on "
        f"{args.seq_len} tokens, CPU onnxruntime {meta['onnxruntime']}, {args.threads} thread(s), "
        f"median of {args.runs} runs interleaved in shuffled order ({meta['cpus']} CPUs, {meta['cpu']}). "
        "Speedup = dense median / variant median, same run.",
        "",
        "| model | variant | params | × dense | file | perplexity | × dense | latency ms (IQR) | speedup "
        "| note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | | | | | | | | error: {r['error']} |")
            continue
        ppl = f"{r['ppl']:.3f} | {r['ppl_ratio']:.3f}" if r["ppl"] is not None else "— | —"
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['params']:,} | {r['params_ratio']:.3f} | "
            f"{r['file_bytes'] / 1e6:.3f} MB | {ppl} | {r['latency_ms']:.2f} "
            f"({r['latency_p25_ms']:.2f}–{r['latency_p75_ms']:.2f}) | {r['speedup']:.2f}× "
            f"| {r['note']} |"
        )
    (args.out / "structured.md").write_text("\n".join(lines) + "\n")
    console.print("\n".join(lines))


def bench_model(path: Path, tmp: Path, windows, vocab: int, args, console) -> list[dict]:
    """All variants of one model: build, save, score, then time them interleaved."""
    name = path.stem
    files, rows = {}, []
    scored = is_tinystories_lm(path, vocab)
    variants = {**VARIANTS, **(CALIBRATED if scored else {})}
    for i, (variant, steps) in enumerate(variants.items()):
        model = sg.Model.load(path)
        ctx = sg.PassContext(seed=0)
        if any(s.get("importance") == "activation" for s in steps):
            from sparsegraph.calibration import Calibration

            ctx.extras["calibration"] = Calibration.from_text(
                args.held_in, args.tokenizer, model, samples=64, seqlen=args.seq_len
            )
        try:
            if steps:
                sg.PassManager(sg.Recipe.load(steps).steps, seed=0).run(model, ctx)
        except sg.SparsegraphError as exc:
            rows.append({"model": name, "variant": variant, "error": str(exc).splitlines()[0]})
            continue
        skipped = {
            c.detail.get("reason") for _, res, _ in ctx.history for c in res.changes if c.action == "skipped"
        }
        modified = any(res.modified for _, res, _ in ctx.history)
        out = model.save(tmp / name / f"variant{i}.onnx")
        files[variant] = out
        rows.append({
            "model": name, "variant": variant, "params": params(model), "file_bytes": out.stat().st_size,
            "note": "" if modified or not steps else f"no-op: {', '.join(sorted(skipped))}",
        })  # fmt: skip
        console.print(f"{name}: built {variant}")
    for r in rows:
        if "error" in r:
            continue
        result = perplexity(files[r["variant"]], windows) if scored else None
        r["ppl"] = result.ppl if result else None
        r["tokens"] = result.n_tokens if result else None
    latencies = time_interleaved(files, args.seq_len, args.runs, args.threads)
    dense = next(r for r in rows if r["variant"] == "dense")
    for r in rows:
        if "error" in r:
            continue
        r["latency_ms"], r["latency_p25_ms"], r["latency_p75_ms"] = latencies[r["variant"]]
        r["speedup"] = latencies["dense"][0] / r["latency_ms"]
        r["params_ratio"] = r["params"] / dense["params"]
        r["ppl_ratio"] = r["ppl"] / dense["ppl"] if r["ppl"] is not None else None
    return rows


def params(model: sg.Model) -> int:
    """Float weights stored in the model (all initializers and Constant values)."""
    return sum(int(t.values.size) for t in model.constants() if np.dtype(t.dtype).kind == "f")


def is_tinystories_lm(path: Path, vocab: int) -> bool:
    """A causal LM whose logits cover the tokenizer's vocabulary."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return any(len(o.shape) == 3 and o.shape[-1] == vocab for o in sess.get_outputs())


def time_interleaved(files: dict[str, Path], seq_len: int, runs: int, threads: int) -> dict[str, float]:
    """Median latency (ms) per variant; runs go round-robin over the variants."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sessions, feeds = {}, {}
    for variant, path in files.items():
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        model = sg.Model.load(path)
        for candidate in feed_candidates(model, seed=0, batch=1, seq=seq_len):
            try:
                sess.run(None, candidate)
                break
            except Exception:
                continue
        sessions[variant], feeds[variant] = sess, candidate
        for _ in range(3):  # warm-up
            sess.run(None, candidate)
    times: dict[str, list[float]] = {v: [] for v in files}
    order = list(sessions)
    rng = np.random.default_rng(0)
    for _ in range(runs):
        rng.shuffle(order)  # no variant always runs right after another
        for variant in order:
            t0 = time.perf_counter()
            sessions[variant].run(None, feeds[variant])
            times[variant].append(time.perf_counter() - t0)
    return {v: [1e3 * float(np.percentile(t, q)) for q in (50, 25, 75)] for v, t in times.items()}


if __name__ == "__main__":
    main()
