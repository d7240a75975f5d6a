"""Accuracy of sparse attention, decode top-k attention and bounded KV caches on stories260K,
and KV-cache memory as the sequence grows.

1. Loads the stories260K llama2.c checkpoint into transformers' `LlamaForCausalLM` (q/k rows
   permuted from llama2.c's interleaved RoPE pairs to HF's halves), checks its logits against
   the bundled `stories260K.onnx` in onnxruntime, and exports it with `torch.onnx` (dynamo) with
   a KV cache (past/present key/value per layer, as `tests/fixtures/make_fixtures.py` does).
2. Prefill on held-out TinyStories windows (second half of `examples/data/tinystories_valid.txt`):
   perplexity and top-1 agreement with dense for each `sparse_attention` pattern, with the
   fraction of causal (query, key) pairs each keeps (measured on layer 0's probabilities).
3. Token-by-token decode (teacher forcing) over streams of 512 tokens (stories joined, each
   starting with BOS): `topk_attention` at several k and `kv_cache` window_sink / heavy_hitter at
   several budgets, vs the dense decode of the same streams.
4. Memory: a batch of 16 streams decoded for 2048 steps with the dense and bounded caches, each in
   its own process: bytes of the cache fed back (sum of present tensors) per step and process RSS.
   Positions beyond 512 are past stories260K's training length: only memory is read there.

    python benchmarks/attention_accuracy.py [--windows N] [--streams N] [--memory-steps N]

Writes benchmarks/results/attention_accuracy.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "examples" / "stories260K" / "stories260K.bin"
REF_ONNX = ROOT / "examples" / "stories260K" / "stories260K.onnx"
TOKENIZER = ROOT / "examples" / "stories260K" / "tok512.bin"
TEXT = ROOT / "examples" / "data" / "tinystories_valid.txt"

PATTERNS = {
    "window 16 + 4 sinks": {"pattern": "window", "window": 16, "globals": 4},
    "window 32 + 4 sinks": {"pattern": "window", "window": 32, "globals": 4},
    "window 64 + 4 sinks": {"pattern": "window", "window": 64, "globals": 4},
    "window 32, no sinks": {"pattern": "window", "window": 32},
    "strided 16": {"pattern": "strided", "stride": 16},
    "block 16 (BigBird 3 window, 1 global, 1 random)": {
        "pattern": "block",
        "block_size": 16,
        "block_window": 3,
        "block_globals": 1,
        "block_random": 1,
        "max_len": 512,
    },
    "dynamic block 16, 50 %": {"pattern": "dynamic_block", "block_size": 16, "keep_ratio": 0.5},
    "dynamic block 16, 25 %": {"pattern": "dynamic_block", "block_size": 16, "keep_ratio": 0.25},
}
DECODE = {
    "top-k 16 (r=4 of 8 channels)": ("topk_attention", {"k": 16, "r": 4}),
    "top-k 32 (r=4)": ("topk_attention", {"k": 32, "r": 4}),
    "top-k 64 (r=4)": ("topk_attention", {"k": 64, "r": 4}),
    "top-k 32 (exact scores)": ("topk_attention", {"k": 32}),
    "top-k 32 (r=4), gather form": (
        "topk_attention",
        {"k": 32, "r": 4, "decode_only": False, "mode": "gather"},
    ),
    "window_sink 32 (4 sinks)": ("kv_cache", {"policy": "window_sink", "budget": 32, "sinks": 4}),
    "window_sink 64 (4 sinks)": ("kv_cache", {"policy": "window_sink", "budget": 64, "sinks": 4}),
    "window_sink 128 (4 sinks)": ("kv_cache", {"policy": "window_sink", "budget": 128, "sinks": 4}),
    "window 64, no sinks": ("kv_cache", {"policy": "window_sink", "budget": 64, "sinks": 0}),
    "heavy_hitter 32": ("kv_cache", {"policy": "heavy_hitter", "budget": 32}),
    "heavy_hitter 64": ("kv_cache", {"policy": "heavy_hitter", "budget": 64}),
    "heavy_hitter 128": ("kv_cache", {"policy": "heavy_hitter", "budget": 128}),
}
MEMORY = {
    "dense": None,
    "window_sink 64": {"policy": "window_sink", "budget": 64, "sinks": 4},
    "heavy_hitter 64": {"policy": "heavy_hitter", "budget": 64},
}


# ------------------------------------------------------------------------ model and export
def hf_llama():
    """stories260K in transformers' LlamaForCausalLM (eager attention)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsegraph.models.llama2c import RMS_EPS, read_checkpoint

    c, w = read_checkpoint(CKPT)
    cfg = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.dim,
        intermediate_size=c.hidden_dim,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        max_position_embeddings=c.seq_len,
        rms_norm_eps=RMS_EPS,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()

    def halves(x, heads):  # llama2.c rotates pairs (2i, 2i+1); HF rotates (i, i + d/2)
        out, inp = x.shape
        return x.reshape(heads, out // heads // 2, 2, inp).transpose(0, 2, 1, 3).reshape(out, inp)

    state = {"model.embed_tokens.weight": w["token_embedding"], "model.norm.weight": w["rms_final"]}
    state["lm_head.weight"] = w["wcls"]
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        state[p + "self_attn.q_proj.weight"] = halves(w["wq"][i], c.n_heads)
        state[p + "self_attn.k_proj.weight"] = halves(w["wk"][i], c.n_kv_heads)
        state[p + "self_attn.v_proj.weight"] = w["wv"][i]
        state[p + "self_attn.o_proj.weight"] = w["wo"][i]
        state[p + "mlp.gate_proj.weight"] = w["w1"][i]
        state[p + "mlp.down_proj.weight"] = w["w2"][i]
        state[p + "mlp.up_proj.weight"] = w["w3"][i]
        state[p + "input_layernorm.weight"] = w["rms_att"][i]
        state[p + "post_attention_layernorm.weight"] = w["rms_ffn"][i]
    missing = model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    assert not missing.missing_keys and not missing.unexpected_keys, missing
    return model


def export_kv(model, path: Path) -> None:
    """torch.onnx (dynamo, opset 18) export with flat past/present key/value tensors."""
    import torch
    from hf_decode_step import export_decode_step

    cfg = model.config
    n, kvh, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    b, s, p = 2, 3, 5
    args = (
        torch.randint(0, cfg.vocab_size, (b, s)),
        torch.ones(b, p + s, dtype=torch.long),
        torch.arange(p, p + s).repeat(b, 1),
        *[torch.randn(b, kvh, p, hd) for _ in range(2 * n)],
    )
    dyn = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total_seq"},
        "position_ids": {0: "batch", 1: "seq"},
        "past": tuple({0: "batch", 2: "past_seq"} for _ in range(2 * n)),
    }
    export_decode_step(model, args, path, dynamic_shapes=dyn)


def check_against_reference(model, kv_path: Path, ids: np.ndarray) -> dict:
    """max |HF − bundled ONNX| and max |exported KV model − HF| on `ids` [1, T]."""
    import torch

    from sparsegraph.decode import KVDecoder
    from sparsegraph.validate import session

    with torch.no_grad():
        hf = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    ref = session(REF_ONNX, threads=1).run(None, {"tokens": ids})[0]
    dec = KVDecoder(str(kv_path))
    half = ids.shape[1] // 2
    kv = np.concatenate(
        [dec.step(ids[:, :half])] + [dec.step(ids[:, t : t + 1]) for t in range(half, ids.shape[1])], 1
    )
    return {
        "hf_vs_bundled_onnx": float(np.abs(hf - ref).max()),
        "kv_export_vs_hf": float(np.abs(kv - hf).max()),
    }


# ------------------------------------------------------------------------------ evaluation
def rewrite(kv_path: Path, pass_name: str, params: dict):
    import sparsegraph as sg

    model = sg.Model.load(kv_path)
    sg.PassManager([sg.get_pass(pass_name)(**params)]).run(model)
    return model.to_proto()


def nll_top1(logits: np.ndarray, targets: np.ndarray, dense_logits: np.ndarray | None):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    agree = None if dense_logits is None else (logits.argmax(-1) == dense_logits.argmax(-1))
    return nll, agree


def prefill_eval(proto, windows, dense=None, probe: str | None = None):
    """Per-window logits of a prefill (empty cache) run; and layer 0's probability density."""
    import onnx
    from onnx import TensorProto, helper

    from sparsegraph.decode import KVDecoder

    if probe:
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        proto.graph.output.append(helper.make_tensor_value_info(probe, TensorProto.FLOAT, None))
    dec = KVDecoder(proto)
    nlls, agrees, logits_all, kept = [], [], [], []
    for i, w in enumerate(windows):
        dec.reset()
        x = w[None, :-1]
        feeds = {dec.token: x, **dec.state}
        feeds[dec.positions] = np.arange(x.shape[1])[None]
        feeds[dec.mask] = np.ones_like(x)
        names = [dec.logits] + ([probe] if probe else [])
        out = dec.session.run(names, feeds)
        logits = out[0]
        nll, agree = nll_top1(logits, w[None, 1:], None if dense is None else dense[i])
        nlls.append(nll.ravel())
        if agree is not None:
            agrees.append(agree.ravel())
        logits_all.append(logits)
        if probe:
            p = out[1]
            causal = np.tril(np.ones(p.shape[-2:], bool))
            kept.append(((p > 0) & causal).sum() / (causal.sum() * np.prod(p.shape[:-2])))
    nll = np.concatenate(nlls)
    return {
        "ppl": float(np.exp(nll.mean())),
        "top1_agreement": float(np.concatenate(agrees).mean()) if agrees else 1.0,
        "kept_fraction": float(np.mean(kept)) if kept else None,
        "tokens": int(nll.size),
    }, logits_all


def decode_eval(proto, streams: np.ndarray, dense=None):
    """Teacher-forced decode, one token a step; per-step cache length of stream 0's run."""
    from sparsegraph.decode import KVDecoder

    dec = KVDecoder(proto, batch=streams.shape[0])
    logits = np.concatenate([dec.step(streams[:, t : t + 1]) for t in range(streams.shape[1] - 1)], 1)
    nll, agree = nll_top1(logits, streams[:, 1:], dense)
    return {
        "ppl": float(np.exp(nll.mean())),
        "top1_agreement": float(agree.mean()) if agree is not None else 1.0,
        "final_cache_len": dec.cache_len,
        "tokens": int(nll.size),
    }, logits


def memory_worker(model_path: str, batch: int, steps: int, seed_tokens: str) -> None:
    """Run in a fresh process: decode `steps` tokens for `batch` rows, print JSON of the cache
    bytes and RSS over the steps."""
    import psutil

    from sparsegraph.decode import KVDecoder

    tokens = np.load(seed_tokens)
    dec = KVDecoder(model_path, batch=batch)
    proc = psutil.Process()
    points = []
    rss0 = proc.memory_info().rss
    for t in range(steps):
        dec.step(tokens[:, t % tokens.shape[1]][:, None])
        if (t + 1) % 64 == 0 or t == 0:
            points.append(
                {"step": t + 1, "cache_bytes": dec.state_nbytes, "rss_mb": proc.memory_info().rss / 2**20}
            )
    print(json.dumps({"rss_start_mb": rss0 / 2**20, "points": points}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-worker":
        memory_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--windows", type=int, default=64, help="prefill windows of <= 256 tokens")
    parser.add_argument("--streams", type=int, default=8, help="decode streams of 512 tokens")
    parser.add_argument("--memory-steps", type=int, default=2048)
    parser.add_argument("--memory-batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from rich.progress import track

    import sparsegraph as sg
    from sparsegraph.eval.perplexity import load_stories, token_windows
    from sparsegraph.eval.tokenizer import Llama2cTokenizer

    torch.set_num_threads(1)
    console = Console()
    start = time.perf_counter()
    tok = Llama2cTokenizer(TOKENIZER)
    stories = load_stories(TEXT)
    held_out = stories[len(stories) // 2 :]
    windows = token_windows(tok, held_out, seq_len=256, max_windows=args.windows)
    stream = np.concatenate([np.asarray(tok.encode(s, bos=True, eos=False), np.int64) for s in held_out])
    n_streams = min(args.streams, len(stream) // 512)
    streams = stream[: n_streams * 512].reshape(n_streams, 512)

    with tempfile.TemporaryDirectory() as tmp:
        kv_path = Path(tmp) / "stories260K_kv.onnx"
        model = hf_llama()
        console.print("exporting stories260K (transformers LlamaForCausalLM) with a KV cache ...")
        export_kv(model, kv_path)
        check = check_against_reference(model, kv_path, windows[0][None, :128])
        console.print(f"reference check: {check}")
        if check["hf_vs_bundled_onnx"] > 1e-4 or check["kv_export_vs_hf"] > 1e-4:
            raise SystemExit(f"the HF model or its export does not match the reference: {check}")
        base = sg.Model.load(kv_path)
        site0 = sg.PassContext().get(sg.get_pass("attention"), base).sites[0]
        dense_proto = base.to_proto()

        # ---- prefill patterns: story windows (<= 256) and packed 512-token streams
        dense_prefill, dense_logits = prefill_eval(dense_proto, windows, probe=site0.probs)
        dense_long, dense_long_logits = prefill_eval(dense_proto, list(streams), probe=site0.probs)
        prefill, prefill_512 = [{"name": "dense", **dense_prefill}], [{"name": "dense", **dense_long}]
        for name, params in track(PATTERNS.items(), description="prefill patterns", console=console):
            proto = rewrite(kv_path, "sparse_attention", params)
            probe = sg.PassContext().get(sg.get_pass("attention"), sg.Model.from_proto(proto)).sites[0].probs
            res, _ = prefill_eval(proto, windows, dense_logits, probe=probe)
            prefill.append({"name": name, "params": params, **res})
            res, _ = prefill_eval(proto, list(streams), dense_long_logits, probe=probe)
            prefill_512.append({"name": name, "params": params, **res})

        # ---- decode: top-k attention and bounded caches
        dense_dec, dense_dec_logits = decode_eval(dense_proto, streams)
        decode = [{"name": "dense", **dense_dec}]
        for name, (pass_name, params) in track(DECODE.items(), description="decode loops", console=console):
            res, _ = decode_eval(rewrite(kv_path, pass_name, params), streams, dense_dec_logits)
            decode.append({"name": name, "pass": pass_name, "params": params, **res})

        # ---- memory, one process per cache policy
        seed = Path(tmp) / "tokens.npy"
        np.save(seed, np.resize(stream, (args.memory_batch, 512)))
        memory = {}
        for name, params in track(MEMORY.items(), description="memory runs", console=console):
            path = Path(tmp) / f"mem_{len(memory)}.onnx"
            if params is None:
                path = kv_path
            else:
                import onnx

                onnx.save(rewrite(kv_path, "kv_cache", params), str(path))
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, __file__, "--memory-worker", str(path), str(args.memory_batch)]
            out = subprocess.run(
                [*cmd, str(args.memory_steps), str(seed)], capture_output=True, text=True, check=True, env=env
            )
            memory[name] = json.loads(out.stdout.strip().splitlines()[-1])

    meta = {
        "model": "stories260K in transformers LlamaForCausalLM, torch.onnx dynamo export, KV cache, opset 18",
        "reference_check": check,
        "text": "examples/data/tinystories_valid.txt, second half of the stories",
        "prefill_windows": len(windows),
        "prefill_tokens": dense_prefill["tokens"],
        "decode_streams": int(n_streams),
        "decode_steps": 511,
        "memory_batch": args.memory_batch,
        "memory_steps": args.memory_steps,
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "meta": meta,
        "prefill": prefill,
        "prefill_512": prefill_512,
        "decode": decode,
        "memory": memory,
    }
    (args.out / "attention_accuracy.json").write_text(json.dumps(result, indent=2))
    md = _markdown(result)
    (args.out / "attention_accuracy.md").write_text(md)
    _plot(result, args.out / "attention_accuracy.png")
    console.print(md)


def _prefill_rows(rows: list[dict]) -> list[str]:
    d = rows[0]["ppl"]
    return [
        f"| {row['name']} | {row['kept_fraction']:.1%} | {row['ppl']:.3f} | {row['ppl'] / d:.3f} "
        f"| {row['top1_agreement']:.1%} |"
        for row in rows
    ]


def _markdown(r: dict) -> str:
    m = r["meta"]
    ref = m["reference_check"]
    lines = [
        "# Sparse attention, decode top-k and bounded KV cache on stories260K",
        "",
        f"Model: {m['model']}. Reference check: max |HF − bundled ONNX| = {ref['hf_vs_bundled_onnx']:.1e}, "
        f"max |KV export decode − HF| = {ref['kv_export_vs_hf']:.1e}. Held-out text: {m['text']}. "
        f"All models run in onnxruntime (CPU). {m['seconds']} s in total.",
        "",
        f"## Prefill ({m['prefill_windows']} windows of ≤ 256 tokens, {m['prefill_tokens']:,} predictions)",
        "",
        "Top-1 agreement: share of positions where the argmax token equals the dense model's. "
        "Kept: share of causal (query, key) pairs with non-zero probability "
        "(layer 0, all heads, all windows).",
        "",
        "| pattern | kept | perplexity | × dense | top-1 agreement |",
        "|---|---|---|---|---|",
    ]
    lines += _prefill_rows(r["prefill"])
    lines += [
        "",
        f"## Prefill of packed 512-token streams ({m['decode_streams']} streams of stories joined, "
        "each story from BOS; the same streams as the decode runs)",
        "",
        "| pattern | kept | perplexity | × dense | top-1 agreement |",
        "|---|---|---|---|---|",
    ]
    lines += _prefill_rows(r["prefill_512"])
    lines += [
        "",
        f"## Decode, one token a step ({m['decode_streams']} streams × {m['decode_steps']} steps, "
        "teacher forcing)",
        "",
        "| method | cache held at the end | perplexity | × dense | top-1 agreement |",
        "|---|---|---|---|---|",
    ]
    d = r["decode"][0]["ppl"]
    for row in r["decode"]:
        lines.append(
            f"| {row['name']} | {row['final_cache_len']} | {row['ppl']:.3f} | {row['ppl'] / d:.3f} "
            f"| {row['top1_agreement']:.1%} |"
        )
    lines += [
        "",
        f"## KV-cache memory ({m['memory_batch']} rows decoded for {m['memory_steps']} steps, "
        "one process each)",
        "",
        "| cache | cache bytes at 256 | at 512 | at 1024 | at the end | RSS growth from step 1 to the end |",
        "|---|---|---|---|---|---|",
    ]
    for name, mem in r["memory"].items():
        pts = {p["step"]: p for p in mem["points"]}
        last = mem["points"][-1]

        def mb(step, pts=pts):
            return f"{pts[step]['cache_bytes'] / 2**20:.2f} MB" if step in pts else "–"

        growth = last["rss_mb"] - mem["points"][0]["rss_mb"]
        lines.append(
            f"| {name} | {mb(256)} | {mb(512)} | {mb(1024)} | {last['cache_bytes'] / 2**20:.2f} MB "
            f"| {growth:+.1f} MB |"
        )
    return "\n".join(lines) + "\n"


def _plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    for key, color, label in (
        ("prefill", "tab:blue", "story windows ≤ 256"),
        ("prefill_512", "tab:purple", "packed 512"),
    ):
        rows = r[key]
        ratio = [x["ppl"] / rows[0]["ppl"] for x in rows]
        ax.scatter([x["kept_fraction"] for x in rows], ratio, color=color, label=label)
        for x, y in zip(rows, ratio, strict=True):
            ax.annotate(
                x["name"], (x["kept_fraction"], y), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
    ax.legend(fontsize=7)
    ax.set_xlabel("kept causal (query, key) pairs")
    ax.set_ylabel("perplexity / dense")
    ax.set_title("prefill: sparse attention patterns")
    ax = axes[1]
    rows = r["decode"]
    ax.barh(
        [x["name"] for x in rows],
        [x["ppl"] for x in rows],
        color=["tab:gray"] + ["tab:orange"] * (len(rows) - 1),
    )
    ax.axvline(rows[0]["ppl"], color="k", lw=0.8)
    ax.set_xlim(0.97 * min(x["ppl"] for x in rows), 1.02 * max(x["ppl"] for x in rows))
    ax.invert_yaxis()
    ax.set_xlabel("perplexity (decode, 511 steps)")
    ax.set_title("decode: top-k attention and bounded KV cache")
    ax.tick_params(axis="y", labelsize=7)
    ax = axes[2]
    ax2 = ax.twinx()
    for (name, mem), color in zip(r["memory"].items(), ["tab:gray", "tab:green", "tab:red"], strict=False):
        steps = [p["step"] for p in mem["points"]]
        ax.plot(steps, [p["cache_bytes"] / 2**20 for p in mem["points"]], color=color, label=f"{name}: cache")
        ax2.plot(steps, [p["rss_mb"] for p in mem["points"]], color=color, ls="--", label=f"{name}: RSS")
    ax.set_xlabel("decode step")
    ax.set_ylabel("KV cache held (MB, solid)")
    ax2.set_ylabel("process RSS (MB, dashed)")
    ax.set_title(f"memory, batch {r['meta']['memory_batch']}")
    ax.legend(fontsize=7, loc="upper left")
    ax2.legend(fontsize=7, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
