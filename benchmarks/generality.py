"""Generality sweep: every recipe in `examples/recipes/` on every model, including exports
made at run time that no test was written against.

Models: the test fixtures (`tests/fixtures/*.onnx`), stories260K, and tiny random Hugging
Face models exported here into a temporary folder (never committed): OPT (TorchScript
exporter, opset 13), Qwen2 with grouped-query attention (1 KV head for 4 query heads;
dynamo, opset 18), the same with a KV cache (`qwen2_gqa_kv`), Mistral with GQA (TorchScript,
opset 13), DistilBERT (TorchScript, opset 14); Mistral again with its weights in an
external data file; llama_tiny with static [1, 8] inputs; llama_tiny_kv, opt_tiny and
gpt2_tiny_legacy again with every node and tensor renamed and all metadata dropped
(`*_anon`). Each (model, recipe) is compiled with
`sparsegraph.compile_model` to the portable artifact, validated against the original in
onnxruntime on random feeds, and classified:

- `ok`: compiled, outputs finite, cosine to the original >= `--min-cosine`;
- `clear error`: a `UsageError` (a one-line message naming what is unsupported, e.g. a KV
  recipe on a model without a KV cache);
- `crash`: any other exception (a traceback is a bug), `ValidationError` and `PassError`
  included;
- `mismatch`: compiled, but an output is non-finite or its cosine to the original is below
  `--min-cosine` (the recipes are lossy, so this flags suspects to inspect, not proof); with
  `--target llvm`, the compiled module's outputs differ from onnxruntime's on the portable
  model by more than 1e-3 of their largest magnitude;
- `no-op`: compiled, but no pass changed the model (the passes' skip reasons are given).

Calibrated recipes get stories260K's tokenizer and TinyStories text on stories260K and
random token ids (vocabulary from the graph's embedding table) elsewhere. stories260K and
llama_tiny are also compiled with `--target llvm` for magnitude50 and teal50, qwen2_gqa and
llama_tiny_static for magnitude50 and opt_tiny for teal50. Writes `benchmarks/results/generality.{md,json}`.

    python benchmarks/generality.py [--models a,b] [--recipes x,y] [--no-llvm]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import sparsegraph as sg
from sparsegraph.calibration import Calibration, complete_feeds, token_input
from sparsegraph.errors import UsageError
from sparsegraph.eval.tokenizer import Llama2cTokenizer
from sparsegraph.feeds import _index_bound

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
STORIES = ROOT / "examples" / "stories260K" / "stories260K.onnx"
TOKENIZER = ROOT / "examples" / "stories260K" / "tok512.bin"
TEXT = ROOT / "examples" / "data" / "tinystories_valid.txt"
RECIPES = sorted((ROOT / "examples" / "recipes").glob("*.yaml"))
RESULTS = ROOT / "benchmarks" / "results"
LLVM_CASES = [("stories260K", "magnitude50"), ("stories260K", "teal50"), ("llama_tiny", "magnitude50")]
LLVM_CASES += [("llama_tiny", "teal50"), ("qwen2_gqa", "magnitude50"), ("opt_tiny", "teal50")]
LLVM_CASES += [("llama_tiny_static", "magnitude50")]
VOCAB = 100
ANONYMIZED = ("llama_tiny_kv", "opt_tiny", "gpt2_tiny_legacy")


# ------------------------------------------------------------------------------ new exports
def _export(wrapper, args, path: Path, names, outs, *, opset: int, dynamo: bool, dyn) -> None:
    import onnx
    import torch

    if dynamo:
        prog = torch.onnx.export(
            wrapper, args, dynamo=True, opset_version=opset, input_names=names, output_names=outs,
            dynamic_shapes=dyn, optimize=True, verbose=False,
        )  # fmt: skip
        prog.save(str(path), external_data=False)
    else:
        torch.onnx.export(
            wrapper, args, str(path), dynamo=False, opset_version=opset, input_names=names,
            output_names=outs, dynamic_axes=dyn, do_constant_folding=True,
        )  # fmt: skip
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def export_models(folder: Path) -> dict[str, tuple[Path, object]]:
    """Tiny random OPT / Qwen2 (GQA) / DistilBERT / Mistral (GQA) exports in `folder`:
    name -> (ONNX file, the torch model it was exported from)."""
    import torch
    import transformers

    sys.path.insert(0, str(FIXTURES))
    from make_fixtures import CausalLMWrapper, LlamaKVWrapper, randomize_small_params

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    small = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    small |= dict(max_position_embeddings=64)
    decoders = {  # name: (model class, config, attention, exporter is dynamo, opset)
        "opt_tiny": (
            transformers.OPTForCausalLM,
            transformers.OPTConfig(**small, ffn_dim=64, word_embed_proj_dim=32, bos_token_id=0),
            "eager",
            False,
            13,
        ),
        "qwen2_gqa": (
            transformers.Qwen2ForCausalLM,
            transformers.Qwen2Config(**small, intermediate_size=64, num_key_value_heads=1),
            "sdpa",
            True,
            18,
        ),
        "mistral_gqa": (
            transformers.MistralForCausalLM,
            transformers.MistralConfig(**small, intermediate_size=64, num_key_value_heads=2),
            "eager",
            False,
            13,
        ),
    }
    out = {}
    names = ["input_ids", "attention_mask"]
    args = (torch.randint(0, VOCAB, (2, 8)), torch.ones(2, 8, dtype=torch.long))
    for name, (cls, cfg, attn, dynamo, opset) in decoders.items():
        torch.manual_seed(0)
        cfg._attn_implementation = attn
        hf = randomize_small_params(cls(cfg)).eval()
        dyn = {n: {0: "batch", 1: "seq"} for n in names}
        out[name] = (folder / f"{name}.onnx", hf)
        _export(
            CausalLMWrapper(hf).eval(),
            args,
            out[name][0],
            names,
            ["logits"],
            opset=opset,
            dynamo=dynamo,
            dyn=dyn,
        )

    # Qwen2 with a KV cache (1 KV head): the flat past/present signature of the fixtures
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(**small, intermediate_size=64, num_key_value_heads=1)
    cfg._attn_implementation = "eager"
    hf = randomize_small_params(transformers.Qwen2ForCausalLM(cfg)).eval()
    kv_names, kv_outs = ["input_ids", "attention_mask", "position_ids"], ["logits"]
    kv_dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total_seq"}}
    kv_dyn["position_ids"] = {0: "batch", 1: "seq"}
    past = []
    for i in range(cfg.num_hidden_layers):
        for kv in ("key", "value"):
            kv_names.append(f"past_key_values.{i}.{kv}")
            kv_outs.append(f"present.{i}.{kv}")
            past.append(torch.randn(2, 1, 3, 8))
    kv_args = (torch.randint(0, VOCAB, (2, 5)), torch.ones(2, 8, dtype=torch.long))
    kv_args += (torch.arange(3, 8).expand(2, 5), *past)
    dyn_shapes = {**kv_dyn, "past": tuple({0: "batch", 2: "past_seq"} for _ in past)}
    out["qwen2_gqa_kv"] = (folder / "qwen2_gqa_kv.onnx", hf)
    _export(
        LlamaKVWrapper(hf).eval(), kv_args, out["qwen2_gqa_kv"][0], kv_names, kv_outs,
        opset=18, dynamo=True, dyn=dyn_shapes,
    )  # fmt: skip

    class Encoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64
    )
    cfg._attn_implementation = "eager"
    hf = randomize_small_params(transformers.DistilBertModel(cfg)).eval()
    out["distilbert_tiny"] = (folder / "distilbert_tiny.onnx", hf)
    dyn = {n: {0: "batch", 1: "seq"} for n in names}
    _export(
        Encoder(hf).eval(),
        args,
        out["distilbert_tiny"][0],
        names,
        ["hidden"],
        opset=14,
        dynamo=False,
        dyn=dyn,
    )
    return out


def anonymize(src: Path, dst: Path) -> Path:
    """A copy of `src` with every node named `n<i>`, every tensor (inputs, outputs,
    initializers) `t<i>`, and no metadata or doc strings: nothing a pass could key on but
    structure."""
    import onnx

    m = onnx.load(str(src))
    g = m.graph
    names: dict[str, str] = {}

    def rename(name: str) -> str:
        return names.setdefault(name, f"t{len(names)}") if name else name

    for vi in [*g.input, *g.output, *g.value_info, *g.initializer]:
        vi.name = rename(vi.name)
    for i, node in enumerate(g.node):
        node.name = f"n{i}"
        node.doc_string = ""
        del node.metadata_props[:]
        node.input[:] = [rename(x) for x in node.input]
        node.output[:] = [rename(x) for x in node.output]
    del m.metadata_props[:]
    m.doc_string = g.doc_string = ""
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(dst))
    return dst


def static_shapes(src: Path, dst: Path, shape=(1, 8)) -> Path:
    """A copy of `src` whose inputs have the static shape `shape` (exports traced without
    dynamic axes look like this)."""
    import onnx

    m = onnx.load(str(src))
    for i in m.graph.input:
        for d, v in zip(i.type.tensor_type.shape.dim, shape, strict=False):
            d.ClearField("dim_param")
            d.dim_value = v
    onnx.save(m, str(dst))
    return dst


def external_data(src: Path, folder: Path) -> Path:
    """A copy of `src` with every initializer in an external data file (how exports over
    2 GB, and many hub models, are stored)."""
    import onnx

    folder.mkdir(exist_ok=True)
    dst = folder / src.name
    onnx.save(
        onnx.load(str(src)), str(dst), save_as_external_data=True, location="weights.bin", size_threshold=1024
    )
    return dst


#: module paths of the new architectures -> role (the fixtures' patterns cover Llama/Qwen2/Mistral)
ROLE_PATTERNS = [
    (r"layers\.(\d+)\.self_attn\.out_proj$", "attn.o"),
    (r"layers\.(\d+)\.fc1$", "ffn.up"),
    (r"layers\.(\d+)\.fc2$", "ffn.down"),
    (r"layer\.(\d+)\.attention\.q_lin$", "attn.q"),
    (r"layer\.(\d+)\.attention\.k_lin$", "attn.k"),
    (r"layer\.(\d+)\.attention\.v_lin$", "attn.v"),
    (r"layer\.(\d+)\.attention\.out_lin$", "attn.o"),
    (r"layer\.(\d+)\.ffn\.lin1$", "ffn.up"),
    (r"layer\.(\d+)\.ffn\.lin2$", "ffn.down"),
]


def role_check(path: Path, hf) -> dict:
    """`roles` analysis vs the answer key built from the torch model's weight values."""
    import make_fixtures
    import onnx

    from sparsegraph.passes.analysis.roles import Roles

    if ROLE_PATTERNS[0] not in make_fixtures.ROLE_PATTERNS:
        make_fixtures.ROLE_PATTERNS += ROLE_PATTERNS
    truth = make_fixtures.build_roles(onnx.load(str(path)), hf)
    found = sg.PassContext().get(Roles, sg.Model.load(path))
    wrong = []
    for e in truth:
        got = found.get(e["node"])
        got = (got.role, got.layer) if got else None
        if got != (e["role"], e["layer"]):
            wrong.append(f"{e['module']}: {e['role']}@{e['layer']}, found {got}")
    return {"total": len(truth), "right": len(truth) - len(wrong), "wrong": wrong}


# ------------------------------------------------------------------------------- the sweep
def needs_calibration(recipe: Path) -> bool:
    return any(getattr(p, "needs_calibration", False) for p in sg.Recipe.load(recipe).steps)


def random_calibration(path: Path, seed: int = 0) -> Calibration:
    """Random token ids (4 batches of 2 x 16, or the input's static shape) for the model's
    token input."""
    model = sg.Model.load(path)
    name = token_input(model)
    tensor = next(t for t in model.graph.inputs if t.name == name)
    vocab = _index_bound(tensor) or VOCAB
    shape = [d if isinstance(d, int) else n for d, n in zip(tensor.shape, (2, 16), strict=True)]
    rng = np.random.default_rng(seed)
    return Calibration([{name: rng.integers(0, vocab, shape)} for _ in range(4)])


def compile_case(model: Path, recipe: Path, out: Path, target: str | None, min_cosine: float) -> dict:
    kwargs = {}
    if needs_calibration(recipe):
        if model == STORIES:
            kwargs = dict(calib=TEXT, tokenizer=Llama2cTokenizer(TOKENIZER), calib_samples=16, seqlen=32)
        else:
            kwargs = dict(calib=random_calibration(model))
    start = time.perf_counter()
    row = {"status": "ok", "message": "", "cosine": None}
    try:
        res = sg.compile_model(model, recipe, out, target=target, tune_trials=1, **kwargs)
        outputs = res.report["validation"]["outputs"] or []
        cos = min((o["cosine"] for o in outputs), default=1.0)
        worst = max((o["max_abs"] for o in outputs), default=0.0)
        row["cosine"] = cos
        row["changes"] = sum(p["changes"] for p in res.report["passes"])
        row["pass_changes"] = {p["pass"]: p["changes"] for p in res.report["passes"]}
        if not (math.isfinite(cos) and math.isfinite(worst)) or cos < min_cosine:
            row |= status_msg("mismatch", f"min cosine {cos:.3f}, max abs diff {worst:.3g}")
        elif not any(p["modified"] for p in res.report["passes"]):
            row |= status_msg("no-op", skip_reasons(model, recipe, kwargs))
        elif target is not None:
            err = compiled_error(out)
            row["compiled_rel_err"] = err
            if not err < 1e-3:
                row |= status_msg("mismatch", f"compiled vs portable onnxruntime: max rel err {err:.3g}")
    except UsageError as exc:
        row |= status_msg("clear error", f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(tb.filename).name}:{tb.lineno}"
        row |= status_msg("crash", f"{type(exc).__name__}: {str(exc)[:300]} @ {where}")
        row["traceback"] = traceback.format_exc()[-3000:]
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def skip_reasons(model: Path, recipe: Path, kwargs: dict) -> str:
    """Why no pass changed `model`: the distinct reasons of the passes' skipped changes (the
    report keeps only their count)."""
    if kwargs:
        return "no pass changed anything"
    ctx = sg.PassManager(sg.Recipe.load(recipe).steps, seed=0).run(sg.Model.load(model))
    reasons = {c.detail.get("reason", "") for _, res, _ in ctx.history for c in res.changes}
    return "; ".join(sorted(r for r in reasons if r)) or "no pass changed anything"


def compiled_error(out: Path) -> float:
    """Max |compiled - onnxruntime(portable)| / max |onnxruntime| over the outputs, on one
    random batch of the compiled bucket (batch 1, sequence 1 where the dims are symbolic)."""
    from sparsegraph.runtime import Session
    from sparsegraph.validate import run, session

    model = sg.Model.load(out / "portable.onnx")
    name = token_input(model)
    tensor = next(t for t in model.graph.inputs if t.name == name)
    shape = [d if isinstance(d, int) else 1 for d in tensor.shape]
    ids = np.random.default_rng(1).integers(0, _index_bound(tensor) or VOCAB, shape)
    feeds = complete_feeds(model, {name: ids})
    ref = run(session(out / "portable.onnx"), feeds)
    sess = Session(out)
    got = sess.run(list(ref), feeds)
    if sess.fallbacks:
        return math.inf
    return max(
        float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-12))
        for g, r in zip(got, ref.values(), strict=True)
    )


def status_msg(status: str, message: str) -> dict:
    return {"status": status, "message": message.splitlines()[0] if message else ""}


def write_results(rows: list[dict], seconds: float, roles: dict[str, dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"seconds": seconds, "roles": roles, "rows": rows}
    (RESULTS / "generality.json").write_text(json.dumps(data, indent=1) + "\n")
    statuses = ["ok", "clear error", "crash", "mismatch", "no-op"]
    counts = {s: sum(r["status"] == s for r in rows) for s in statuses}
    models = list(dict.fromkeys(r["model"] for r in rows))
    recipes = list(dict.fromkeys(r["recipe"] for r in rows if r["target"] == "portable"))
    short = {
        "ok": "ok",
        "clear error": "err",
        "crash": "**CRASH**",
        "mismatch": "**MISMATCH**",
        "no-op": "no-op",
    }
    cell = {(r["model"], r["recipe"]): r for r in rows if r["target"] == "portable"}
    lines = [
        "# Generality sweep",
        "",
        f"Every recipe of `examples/recipes/` on {len(models)} models (`python benchmarks/generality.py`,"
        f" {seconds:.0f} s). " + ", ".join(f"{counts[s]} {s}" for s in statuses) + ".",
        "",
        "Cells: `ok` (compiled, finite outputs, cosine to the original above the threshold), `err` (a"
        " clear UsageError: unsupported combination), **CRASH** (any other exception: a bug),"
        " **MISMATCH** (non-finite or low-cosine outputs), `no-op` (no pass changed the model). Messages"
        " below.",
        "",
        "| recipe | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for recipe in recipes:
        cells = [short[cell[m, recipe]["status"]] if (m, recipe) in cell else "" for m in models]
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    lines += ["", "## Compiled with `--target llvm`", "", "| model | recipe | status | seconds |"]
    lines += ["|---|---|---|---|"]
    lines += [
        f"| {r['model']} | {r['recipe']} | {r['status']} | {r['seconds']} |"
        for r in rows
        if r["target"] == "llvm"
    ]
    lines += ["", "## Roles of the new exports vs the torch modules", ""]
    lines += ["Answer key from weight values (`tests/fixtures/make_fixtures.py: build_roles`).", ""]
    lines += ["| model | right | wrong |", "|---|---|---|"]
    lines += [
        f"| {m} | {r['right']}/{r['total']} | {', '.join(r['wrong']) or '-'} |" for m, r in roles.items()
    ]
    lines += ["", "## Errors and mismatches", "", "| model | recipe | target | status | message |"]
    lines += ["|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            msg = r["message"].replace("|", "\\|")[:240]
            lines.append(f"| {r['model']} | {r['recipe']} | {r['target']} | {r['status']} | {msg} |")
    (RESULTS / "generality.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated model names (default: all)")
    ap.add_argument("--recipes", help="comma-separated recipe names (default: all)")
    ap.add_argument("--no-llvm", action="store_true", help="skip the --target llvm cases")
    ap.add_argument("--min-cosine", type=float, default=0.3)
    ap.add_argument("--no-write", action="store_true", help="print only, do not write results")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    console = Console()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="generality-") as tmp:
        tmp = Path(tmp)
        models = {p.stem: p for p in sorted(FIXTURES.glob("*.onnx"))} | {"stories260K": STORIES}
        pick, roles = (set(args.models.split(",")) if args.models else None), {}
        if pick is None or pick - set(models):
            with console.status("exporting OPT, Qwen2, Mistral, DistilBERT"):
                exported = export_models(tmp)
            roles = {k: role_check(path, hf) for k, (path, hf) in exported.items()}
            models |= {k: v[0] for k, v in exported.items()}
            for name in ANONYMIZED:  # names carry nothing: structure only
                models[f"{name}_anon"] = anonymize(models[name], tmp / f"{name}_anon.onnx")
            models["mistral_gqa_extdata"] = external_data(models["mistral_gqa"], tmp / "extdata")
            models["llama_tiny_static"] = static_shapes(models["llama_tiny"], tmp / "llama_tiny_static.onnx")
        models = {k: v for k, v in models.items() if pick is None or k in pick}
        recipes = [r for r in RECIPES if not args.recipes or r.stem in args.recipes.split(",")]
        cases = [(m, r.stem, None) for m in models for r in recipes]
        if not args.no_llvm:
            cases += [(m, r, "llvm") for m, r in LLVM_CASES if m in models and r in {x.stem for x in recipes}]
        rows = []
        columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}")]
        with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("sweep", total=len(cases))
            for i, (name, recipe_name, target) in enumerate(cases):
                recipe = next(r for r in recipes if r.stem == recipe_name)
                progress.update(task, description=f"{name} / {recipe.stem}{' llvm' if target else ''}")
                row = compile_case(models[name], recipe, tmp / f"out{i}", target, args.min_cosine)
                row = {"model": name, "recipe": recipe.stem, "target": target or "portable"} | row
                rows.append(row)
                if row["status"] != "ok":
                    where = f"{name} / {recipe.stem} / {row['target']}"
                    progress.console.print(f"[yellow]{where}: {row['status']}: {row['message'][:200]}")
                progress.advance(task)
    seconds = time.perf_counter() - start
    counts = {
        s: sum(r["status"] == s for r in rows) for s in ("ok", "clear error", "crash", "mismatch", "no-op")
    }
    console.print(f"{len(rows)} cases in {seconds:.0f} s: {counts}")
    if not args.no_write:
        write_results(rows, seconds, roles)
    return 0


if __name__ == "__main__":
    sys.exit(main())
