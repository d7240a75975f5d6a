"""A Llama decoder built from transformers' `LlamaConfig` at 7B dims, compiled with 50 %
activation sparsity (TEAL): decode-step speed vs the dense compiled model and onnxruntime.

Model: `LlamaForCausalLM(LlamaConfig(hidden 4096, intermediate 11008, 32 heads, 32 KV
heads, --layers layers, vocab --vocab))` with transformers' random initialisation (the vocab
is reduced from 32000 to save memory: the embedding and LM head are not thresholded, and
their size does not change the layers' work). Exported with `torch.onnx` (dynamo, opset 18)
as one decode step with a KV cache: input_ids [1, 1], attention_mask [1, P+1], position_ids
[1, 1] and the past keys/values [1, 32, P, 128] per layer, all static (P = --past), so
every linear op runs at M = 1.

One layer by default; four fit on a quiet 24 GB machine (``--layers 4``, 3.1 GB of fp32
weights). Every step's peak RSS is reported, also as a multiple of the weight bytes: the
llvm compile keeps one copy of the weights (`relax_build.share_weights`: the model, the
Relax constants, the fused kernels' row-layout weights and the lifted params share it)
plus the packed kernels of the shipped build and of the dense-kernel build the
never-slower check times (measured at 4 layers: compile 2.2-2.8x the weight bytes, 2.5-3.7x
at 2 layers, was 11-13x; the calibration step, 4.2x, and the timing step with four runtimes
loaded, 4.2x, are now the largest). `--layers` takes more where memory allows; each step first waits
for the memory it needs (`MEMORY_FACTOR`) and stops rather than start the OOM killer.

Steps, each in its own process so that the next one starts with the memory of the
previous one returned (the peak RSS of each is reported):

1. ``export``: the model, the past caches of random prompts of P tokens (torch), the export,
   and the decode-step feeds: random next tokens over those caches.
2. ``sparsify``: the `activation_sparsity` pass (TEAL, uniform 50 %) calibrated on 24 of
   those decode-step feeds (random tokens: with random weights there is no text
   distribution to match), 6 of them held out to measure the sparsity reached, which the
   pass records in the model for the compile; writes the thresholded portable model.
3. ``compile_act`` / ``compile_dense``: `codegen.llvm_compile.compile_llvm` (batch 1) of the
   thresholded portable model and of the dense export, each with a fresh tuning database.
   ``compile_forced``: the thresholded model again with every fused-vs-dense decision of
   ``compile_act`` turned to fused and the never-slower check bypassed: what the fused
   kernels do inside the model, whatever the guards decided (a diagnostic, not a product).
4. ``time``: compiled act-sparse (as shipped, and forced) vs compiled dense vs onnxruntime
   on the dense export, one round each in turn (interleaved), `--rounds` rounds of
   `--repeat` calls, median per runtime; before that both compiled act-sparse models'
   logits and present caches are checked against onnxruntime on the thresholded portable
   model (max |error| <= 1e-3 x max |ref|).

    python benchmarks/act_llama_decoder.py                   # 1 layer (~3 min)
    python benchmarks/act_llama_decoder.py --layers 4        # 4 layers (~7 min, 13 GB peak)
    python benchmarks/act_llama_decoder.py --layers 1 --hidden 256 --intermediate 688 \\
        --heads 4 --out /tmp/x                               # a smoke test in a minute

Writes ``benchmarks/results/act_llama_decoder.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TVM_NUM_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
NAME = "act_llama_decoder"
CALIB_STEPS = 24  # decode-step feeds for calibration (the last quarter held out)
TOLERANCE = 1e-3  # max |compiled - onnxruntime| / max |onnxruntime| on the thresholded model


def _rss_gb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def log(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what} (rss {_rss_gb():.1f} GB)", flush=True)


# ------------------------------------------------------------------------------ stages
def stage_export(a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """HF Llama with random weights -> static decode-step ONNX (external data) + feeds."""

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(a.seed)
    torch.set_num_threads(2)
    cfg = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.heads,
        max_position_embeddings=max(512, a.past + 1),
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    with torch.no_grad():
        model = LlamaForCausalLM(cfg).eval()
    log("HF model built")
    p = a.past

    from hf_decode_step import export_decode_step

    gen = torch.Generator().manual_seed(a.seed)
    steps = []  # decode-step feeds over the caches of a few random prompts
    with torch.no_grad():
        for _ in range(a.prompts):
            prompt = torch.randint(0, a.vocab, (1, p), generator=gen)
            out = model(input_ids=prompt, use_cache=True)
            past = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
            for _ in range(-(-(CALIB_STEPS + 1) // a.prompts)):
                steps.append(
                    {
                        "input_ids": torch.randint(0, a.vocab, (1, 1), generator=gen),
                        "attention_mask": torch.ones(1, p + 1, dtype=torch.long),
                        "position_ids": torch.tensor([[p]]),
                        "past": past,
                    }
                )
    log(f"{len(steps)} decode-step feeds over {a.prompts} random prompts of {p} tokens")
    first = steps[0]
    args = (first["input_ids"], first["attention_mask"], first["position_ids"], *first["past"])
    t0 = time.perf_counter()
    names, outs = export_decode_step(model, args, tmp / "dense.onnx", external_data=True)
    export_s = time.perf_counter() - t0
    del model
    gc.collect()
    log(f"exported in {export_s:.0f} s")

    def feed(s) -> dict[str, np.ndarray]:
        f = {k: s[k].numpy() for k in names[:3]}
        f.update({nm: t.numpy() for nm, t in zip(names[3:], s["past"], strict=True)})
        return f

    calib = [feed(s) for s in steps[:CALIB_STEPS]]
    np.savez(tmp / "calib.npz", **{f"{i}/{k}": v for i, f in enumerate(calib) for k, v in f.items()})
    np.savez(tmp / "eval.npz", **feed(steps[CALIB_STEPS]))
    return {"export_seconds": export_s, "inputs": names, "outputs": outs}


def _load_feeds(path: Path) -> list[dict[str, np.ndarray]]:
    z = np.load(path)
    out: dict[int, dict[str, np.ndarray]] = {}
    for key in z.files:
        i, name = key.split("/", 1)
        out.setdefault(int(i), {})[name] = z[key]
    return [out[i] for i in sorted(out)]


def stage_sparsify(a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The `activation_sparsity` pass (TEAL at --sparsity) calibrated on the decode-step
    feeds, through the pass manager (`compile_model` would add its per-op cost-model summary,
    ~100 s per 7B-dims layer here); saves act/portable.onnx with the pass's metadata."""
    import sparsegraph as sg
    from sparsegraph.calibration import Calibration

    model = sg.Model.load(tmp / "dense.onnx")
    ctx = sg.PassContext(a.seed)
    ctx.extras["calibration"] = Calibration(_load_feeds(tmp / "calib.npz"), "random-token decode steps")
    recipe = sg.Recipe.load(
        {"steps": [{"pass": "activation_sparsity", "method": "teal", "sparsity": a.sparsity}]}
    )
    t0 = time.perf_counter()
    ctx = sg.PassManager(recipe.steps, seed=a.seed).run(model, ctx)
    secs = time.perf_counter() - t0
    model.save(tmp / "act" / "portable.onnx", external_data=True)
    log(f"activation_sparsity pass in {secs:.0f} s")
    section = ctx.extras["report_sections"]["activation_sparsity"].data
    return {
        "pass_seconds": secs,
        "sites": [
            {k: t[k] for k in ("tensor", "roles", "threshold", "target", "calibration", "held_out", "key")}
            for t in section["tensors"]
        ],
        "weighted": section["weighted"],
    }


def stage_compile(a: argparse.Namespace, tmp: Path, which: str) -> dict[str, Any]:
    from sparsegraph.codegen import llvm_compile

    dispatched: dict[str, float] = {}
    ship_faster = llvm_compile.ship_faster

    def keep_dispatched(*args, **kw):  # the dispatched build's own time, before a dense ship replaces it
        dispatched.update({tag: v["compiled"] for tag, v in args[4].items()})
        return ship_faster(*args, **kw)

    def ship_dispatched(build, chosen, baseline, feeds, timing, built, timer):
        return built, frozenset()  # "forced": ship the build with the fused kernels, whatever its time

    llvm_compile.ship_faster = ship_dispatched if which == "forced" else keep_dispatched
    if which == "forced":  # the thresholded model's decisions, every fused-vs-dense one turned to fused
        db = json.loads((tmp / "tuning_act.json").read_text())
        for rec in db.values():
            if isinstance(rec, dict) and rec.get("technique") == "activation_sparsity":
                rec["chosen"] = "fused"
        (tmp / "tuning_forced.json").write_text(json.dumps(db))
    src = tmp / "dense.onnx" if which == "dense" else tmp / "act" / "portable.onnx"
    t0 = time.perf_counter()
    man = llvm_compile.compile_llvm(
        src, tmp / f"compiled_{which}", batch_sizes=[1], db_path=tmp / f"tuning_{which}.json"
    )
    secs = time.perf_counter() - t0
    log(f"compiled {which} in {secs:.0f} s")
    fused = [f for f in man.get("fused", []) if f.get("technique") == "activation_sparsity"]
    keep = ("weight_shape", "calibrated_sparsity", "timed_activation_sparsity", "sparsity_source", "kernel")
    keep += ("fused_us", "fused_guard_us", "dense_us", "dense_kernel", "chosen")
    return {
        "compile_seconds": secs,
        "timing_seconds": man["timing_seconds"],
        "dispatched_build_seconds": dispatched,
        "fused": [{k: f.get(k) for k in keep} for f in fused],
    }


def stage_time(a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Check both compiled act-sparse models against onnxruntime on the thresholded model,
    then time the four runtimes interleaved."""
    from sparsegraph.runtime import Session
    from sparsegraph.validate import session

    feeds = dict(np.load(tmp / "eval.npz"))
    ref_sess = session(tmp / "act" / "portable.onnx")
    names = [o.name for o in ref_sess.get_outputs()]
    ref = dict(zip(names, ref_sess.run(names, feeds), strict=True))
    del ref_sess
    gc.collect()
    runtimes = {
        "compiled_act": Session(tmp / "compiled_act"),
        "compiled_act_fused_forced": Session(tmp / "compiled_forced"),
    }
    errors = {}
    for name, sess in runtimes.items():
        got = dict(zip(names, sess.run(names, feeds), strict=True))
        errors[name] = max(
            float(np.abs(got[k] - ref[k]).max() / max(float(np.abs(ref[k]).max()), 1e-30)) for k in names
        )
        log(f"{name} vs onnxruntime on the thresholded model: max rel error {errors[name]:.1e}")
    runtimes["compiled_dense"] = Session(tmp / "compiled_dense")
    runtimes["onnxruntime_dense"] = session(tmp / "dense.onnx")
    log("four runtimes loaded")
    times: dict[str, list[float]] = {k: [] for k in runtimes}
    for sess in runtimes.values():  # warm-up
        sess.run(None, feeds)
    for _ in range(a.rounds):
        for name, sess in runtimes.items():
            for _ in range(a.repeat):
                t0 = time.perf_counter()
                sess.run(None, feeds)
                times[name].append(time.perf_counter() - t0)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    log("timed: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
    return {
        "decode_step_ms": ms,
        "decode_step_ms_quartiles": {
            k: [float(np.percentile(v, 25) * 1e3), float(np.percentile(v, 75) * 1e3)]
            for k, v in times.items()
        },
        "fallbacks": sum(runtimes[k].fallbacks for k in ("compiled_act", "compiled_act_fused_forced")),
        "max_rel_error": errors,
        "within_tolerance": max(errors.values()) <= TOLERANCE,
    }


STAGES = ("export", "sparsify", "compile_act", "compile_forced", "compile_dense", "time")
#: peak RSS of a step / bytes of the model's weights, measured here at 2 layers (1.54 GB:
#: export 2.1 GB, pass 7.8, compile thresholded 5.8 with fused kernels, forced 3.9, dense 4.3,
#: time 7.2), an upper bound for more layers (the ~0.4 GB of the interpreter and TVM weigh
#: less: 4 layers, 3.05 GB: 3.6, 12.8, 8.5, 6.7, 7.2, 12.9); the runner waits for that much
#: available memory before a step, and stops rather than push a shared machine into the OOM killer
MEMORY_FACTOR = {"export": 1.5, "sparsify": 5.1, "time": 4.7}
MEMORY_FACTOR |= {"compile_act": 3.8, "compile_forced": 2.6, "compile_dense": 2.9}


def _available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def wait_for_memory(stage: str, weight_gb: float, patience_s: float = 120.0) -> None:
    """Wait until the step's estimated peak fits the available memory (+1 GB), else exit."""
    need = MEMORY_FACTOR[stage] * weight_gb + 1.0
    deadline = time.perf_counter() + patience_s
    while _available_gb() < need:
        if time.perf_counter() > deadline:
            raise SystemExit(
                f"step {stage}: needs about {need:.1f} GB, {_available_gb():.1f} GB available after "
                f"{patience_s:.0f} s; use fewer --layers or run on a quieter machine"
            )
        time.sleep(5)


def run_stage(a: argparse.Namespace, stage: str, tmp: Path) -> dict[str, Any]:
    if stage == "export":
        res = stage_export(a, tmp)
    elif stage == "sparsify":
        res = stage_sparsify(a, tmp)
    elif stage.startswith("compile_"):
        res = stage_compile(a, tmp, stage.removeprefix("compile_"))
    else:
        res = stage_time(a, tmp)
    res["peak_rss_gb"] = _peak_gb()
    return res


# ------------------------------------------------------------------------------ output
def markdown(r: dict[str, Any]) -> str:
    m, c = r["meta"], r["config"]
    t = r["time"]["decode_step_ms"]
    act, dense = r["compile_act"], r["compile_dense"]
    fused = act["fused"]
    shipped = act["timing_seconds"]["b1_s1"].get("shipped", "dispatched")
    n_chosen = sum(f["chosen"] == "fused" for f in fused)
    n_fused = n_chosen if shipped != "dense" else 0
    forced = t.get("compiled_act_fused_forced")
    sp = r["sparsify"]["weighted"]
    errs = r["time"]["max_rel_error"]
    ls = "s" if c["layers"] > 1 else ""
    compile_peak = max(r[s]["peak_rss_gb"] for s in STAGES if s.startswith("compile"))
    lines = [
        f"# Llama decoder ({c['layers']} layer{ls} at 7B dims, transformers `LlamaConfig`), "
        f"{c['sparsity']:.0%} activation sparsity, compiled decode step",
        "",
        f"`{m['command']}` on {m['cpu']}, {m['threads']} threads, {m['seconds']:.0f} s, {m['date']} "
        f"(load average at the start {m['load']:.1f}: a shared machine, so the ratios are what counts).",
        "",
        f"Memory: {r['weight_gb']:.2f} GB of fp32 weights; peak RSS per step (each its own process) "
        + ", ".join(
            f"{s} {r[s]['peak_rss_gb']:.1f} GB ({r[s]['peak_rss_gb'] / r['weight_gb']:.1f}x)" for s in STAGES
        )
        + ". The llvm compile keeps one copy of the weights (model, Relax constants, fused kernels and "
        "params share it) plus the packed kernels of the shipped build and of the dense-kernel build the "
        f"never-slower check times: {compile_peak / r['weight_gb']:.1f}x "
        "the weight bytes at most (11-13x before, when 2 layers were all that fit this 24 GB machine).",
        "",
        f"Model: `LlamaForCausalLM`, hidden {c['hidden']}, intermediate {c['intermediate']}, "
        f"{c['heads']} heads (MHA), {c['layers']} layer{ls}, vocab {c['vocab']} (reduced from 32000 to save "
        "memory; the embedding and LM head are not thresholded), transformers' random initialisation, "
        "fp32. Exported with "
        f"`torch.onnx` (dynamo, opset 18) as one static decode step with a KV cache of {c['past']} tokens "
        "(every linear op at M = 1). TEAL thresholds (uniform, one per input tensor, 4 per layer) "
        f"calibrated on {CALIB_STEPS - CALIB_STEPS // 4} decode steps with random tokens over the caches of "
        f"{c['prompts']} random prompts (random weights have no text distribution to match); sparsity "
        f"reached, weighted by the weights each tensor feeds: {sp['calibration']:.1%} on calibration, "
        f"{sp['held_out']:.1%} on {CALIB_STEPS // 4} held-out steps. The compile timed each fused kernel "
        "at the sparsity its threshold reached on the held-out steps (recorded in the model by the pass).",
        "",
        "| runtime (same process, interleaved rounds) | ms / decode step (median) | IQR "
        "| vs onnxruntime dense |",
        "|---|---|---|---|",
    ]
    for k, v in t.items():
        q = r["time"]["decode_step_ms_quartiles"][k]
        lines.append(f"| {k} | {v:.2f} | {q[0]:.2f}-{q[1]:.2f} | {t['onnxruntime_dense'] / v:.2f}x |")
    lines += [
        "",
        f"Compiled with {c['sparsity']:.0%} activation sparsity: "
        f"**{t['compiled_dense'] / t['compiled_act']:.2f}x** the dense compiled model, "
        f"**{t['onnxruntime_dense'] / t['compiled_act']:.2f}x** onnxruntime on the dense model. "
        f"{n_fused} of {len(fused)} thresholded linear ops run a fused kernel"
        + (
            f" (the dispatch chose {n_chosen}, but the compile's never-slower check timed that build "
            "slower than the same model with dense kernels and shipped the latter)"
            if shipped == "dense" and n_chosen
            else ""
        )
        + "; a weight stays dense when its fused kernel is slower than dense at the calibrated sparsity, "
        "or more than 1/0.97 slower than dense at half that sparsity (the guard against inputs denser "
        "than the calibration data)."
        + (
            f" With every thresholded weight forced onto its fused kernel (`compiled_act_fused_forced`: "
            "the same decisions turned to fused, the never-slower check bypassed; "
            f"{sum(f['chosen'] == 'fused' for f in r['compile_forced']['fused'])} of "
            f"{len(r['compile_forced']['fused'])} fused): "
            f"**{t['compiled_dense'] / forced:.2f}x** the dense compiled model, "
            f"**{t['onnxruntime_dense'] / forced:.2f}x** onnxruntime."
            if forced
            else ""
        )
        + " Max relative error vs onnxruntime on the thresholded model over the logits and present caches: "
        + ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
        + f" (tolerance {TOLERANCE:.0e}: {'met' if r['time']['within_tolerance'] else 'MISSED'}); "
        f"onnxruntime fallbacks {r['time']['fallbacks']}.",
        "",
        "Compile-time measurements (the compile's own, per bucket): "
        + "; ".join(
            f"{name}: shipped build ({v['timing_seconds']['b1_s1'].get('shipped', 'dispatched')}) "
            f"{v['timing_seconds']['b1_s1']['compiled'] * 1e3:.2f} ms"
            + (
                f", dense-kernel build {v['timing_seconds']['b1_s1']['dense_compiled'] * 1e3:.2f} ms"
                if "dense_compiled" in v["timing_seconds"]["b1_s1"]
                else ""
            )
            + (
                f", dispatched build (fused kernels) {v['dispatched_build_seconds']['b1_s1'] * 1e3:.2f} ms"
                if v.get("dispatched_build_seconds", {}).get("b1_s1")
                else ""
            )
            + f", compile {v['compile_seconds']:.0f} s"
            for name, v in (("act-sparse", act), ("dense", dense))
        )
        + ".",
        "",
        "| weight K x N | calibrated sparsity | timed at | kernel | fused µs | guard µs (half the sparsity) "
        "| dense µs "
        "| chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in fused:
        cal = f["calibrated_sparsity"]
        lines.append(
            f"| {f['weight_shape'][0]}x{f['weight_shape'][1]} | {'–' if cal is None else f'{cal:.1%}'} "
            f"| {f['timed_activation_sparsity']:.0%} | {f['kernel']} | {f['fused_us']:.0f} "
            f"| {f['fused_guard_us']:.0f} | {f['dense_us']:.0f} ({f['dense_kernel']}) | {f['chosen']} |"
        )
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = r["time"]["decode_step_ms"]
    q = r["time"]["decode_step_ms_quartiles"]
    names = list(t)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.bar(names, [t[k] for k in names], color=["tab:green", "tab:blue", "tab:gray"][: len(names)])
    ax.errorbar(
        names,
        [t[k] for k in names],
        yerr=[[t[k] - q[k][0] for k in names], [q[k][1] - t[k] for k in names]],
        fmt="none",
        color="k",
        capsize=4,
    )
    for i, k in enumerate(names):
        ax.text(i, t[k], f"{t[k]:.1f} ms\n{t['onnxruntime_dense'] / t[k]:.2f}x ORT", ha="center", va="bottom")
    ax.set_ylabel("ms per decode step")
    ax.set_ylim(0, max(t.values()) * 1.3)
    c = r["config"]
    ax.set_title(f"Llama {c['layers']} layers at 7B dims, {c['sparsity']:.0%} activation sparsity (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=1, help="4 need ~13 GB (see MEMORY_FACTOR)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--past", type=int, default=127, help="KV-cache length of the decode step")
    p.add_argument("--prompts", type=int, default=4, help="random prompts whose caches the steps use")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: one step
    p.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    if a.stage:  # a child: run one step, write its result
        res = run_stage(a, a.stage, a.tmp)
        (a.tmp / f"{a.stage}.json").write_text(json.dumps(res, indent=1, default=str))
        return
    start, load = time.perf_counter(), os.getloadavg()[0]
    r: dict[str, Any] = {
        "config": {k: getattr(a, k) for k in ("layers", "hidden", "intermediate", "heads", "vocab", "past")}
        | {"prompts": a.prompts, "sparsity": a.sparsity, "rounds": a.rounds, "repeat": a.repeat}
    }
    with tempfile.TemporaryDirectory(prefix="act_llama_") as tmp:
        tmp = Path(tmp)
        weight_gb = 4 * (
            a.layers * (4 * a.hidden**2 + 3 * a.hidden * a.intermediate) + 2 * a.vocab * a.hidden
        )
        weight_gb /= 2**30
        r["weight_gb"] = weight_gb
        for stage in STAGES:
            wait_for_memory(stage, weight_gb)
            log(f"step {stage}")
            subprocess.run(
                [sys.executable, __file__, *argv, "--stage", stage, "--tmp", str(tmp)], check=True, cwd=ROOT
            )
            r[stage] = json.loads((tmp / f"{stage}.json").read_text())
            log(f"step {stage} done, peak RSS {r[stage]['peak_rss_gb']:.1f} GB")
    from sparsegraph.codegen.target import host_target

    r["meta"] = {
        "command": "python benchmarks/act_llama_decoder.py" + (" " + " ".join(argv)).rstrip(),
        "cpu": f"{platform.machine()} (LLVM mcpu {host_target().attrs.get('mcpu', '?')})",
        "threads": int(os.environ["TVM_NUM_THREADS"]),
        "seconds": time.perf_counter() - start,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load": load,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{NAME}.json").write_text(json.dumps(r, indent=1, default=str))
    (a.out / f"{NAME}.md").write_text(markdown(r))
    plot(r, a.out / f"{NAME}.png")
    print(markdown(r))


if __name__ == "__main__":
    main()
