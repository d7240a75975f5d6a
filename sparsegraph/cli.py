"""The `sparsegraph` command line.

Every error a user can cause prints one line (`error: ...`) and exits with status 2;
an unexpected internal error prints one line and exits with 1 (set SPARSEGRAPH_DEBUG=1
for the traceback).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import SparsegraphError

app = typer.Typer(
    help="Make transformer ONNX models faster and smaller through sparsity.\n\n"
    "Typical session:\n\n"
    "  sparsegraph analyze model.onnx            # what can be sparsified, and what it would save\n\n"
    "  sparsegraph passes                        # the passes a recipe can use, with their parameters\n\n"
    "  sparsegraph compile model.onnx --recipe recipe.yaml -o out/\n\n"
    "A recipe is YAML: a 'steps:' list, each step 'pass: NAME' plus the pass's parameters, and\n"
    "optional 'targets:'/'ignore:' selectors (op:MatMul, role:ffn.*, name:<glob>, re:<regex>, layers:0-3).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 200)  # do not squeeze tables into 80 columns in pipes


def friendly_errors(func):
    """Turn toolkit errors into one line on stderr and the error's exit status."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except SparsegraphError as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("interrupted")
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception as exc:
            if os.environ.get("SPARSEGRAPH_DEBUG"):
                raise
            console.print(
                f"[red]internal error:[/red] {type(exc).__name__}: {exc} "
                "(rerun with SPARSEGRAPH_DEBUG=1 for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@friendly_errors
def compile(
    model: Path = typer.Argument(..., help="ONNX model to sparsify (external data is read from its folder)."),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="YAML recipe: the passes to run."),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Folder for portable.onnx, report.json, report.md."
    ),
    seed: int = typer.Option(0, help="Seed for every random choice (results are deterministic for a seed)."),
    feeds: Path | None = typer.Option(
        None,
        help=".npz of inputs (arrays named after the model's inputs) for the numeric check; "
        "random valid inputs when omitted.",
    ),
    validate: bool = typer.Option(
        True, help="Check the result with onnx.checker and compare outputs in onnxruntime."
    ),
    calib: Path | None = typer.Option(
        None,
        help="Calibration data for passes that need it (wanda, sparsegpt): an .npz of model inputs "
        "(first axis = samples) or a text file (needs --tokenizer).",
    ),
    tokenizer: Path | None = typer.Option(
        None, help="llama2.c tokenizer (.bin) to encode a text --calib file."
    ),
    calib_samples: int = typer.Option(
        128, help="Calibration samples: random text windows, or the first N samples of an .npz."
    ),
    seqlen: int = typer.Option(128, help="Tokens per calibration window of a text --calib file."),
    target: str | None = typer.Option(
        None,
        help="Also compile for a target: module.so, params.npz, manifest.json. llvm = this CPU; "
        "cuda = the visible GPU (sm_90 when none is visible; no GPU is needed to compile); a TVM tag "
        "such as nvidia/nvidia-h100; or a TVM target as JSON or 'kind -key=value'.",
    ),
    batch_sizes: str = typer.Option(
        "1", help="With --target: compile one function per batch size (axis-0 symbolic dims), e.g. 1,8,64."
    ),
    seq_len: int = typer.Option(
        1, help="With --target: size of the other symbolic dims (1 = one decode step)."
    ),
    tune_trials: int = typer.Option(2, help="With --target: schedules timed per kernel format."),
    tuning_db: Path | None = typer.Option(
        None, help="With --target: tuning database file (default ~/.cache/sparsegraph/tuning.json)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors."),
):
    """Run a recipe on MODEL and write OUTPUT/portable.onnx (standard ONNX ops, runs in stock
    onnxruntime), OUTPUT/report.json and OUTPUT/report.md.

    Example: sparsegraph compile examples/stories260K/stories260K.onnx
    --recipe examples/recipes/magnitude50.yaml -o out/stories260K

    Calibrated: sparsegraph compile examples/stories260K/stories260K.onnx
    --recipe examples/recipes/wanda50.yaml --calib examples/data/tinystories_valid.txt
    --tokenizer examples/stories260K/tok512.bin -o out/wanda50

    Compiled for this CPU: add --target llvm --batch-sizes 1,8 (then: sparsegraph bench OUTPUT);
    for a GPU: --target cuda or --target nvidia/nvidia-h100
    """
    from .compile import compile_model
    from .errors import UsageError
    from .recipe import Recipe

    if calib_samples < 1 or seqlen < 1:
        raise UsageError(f"--calib-samples and --seqlen must be >= 1 (got {calib_samples}, {seqlen})")
    sizes = _int_list(batch_sizes, "--batch-sizes")
    steps = Recipe.load(recipe)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=True,
    ) as progress:
        task = progress.add_task("loading", total=len(steps.steps))

        def on_pass(i, p):
            progress.update(task, completed=i, description=f"pass {p.name}")

        result = compile_model(
            model,
            steps,
            output,
            seed=seed,
            feeds=feeds,
            validate=validate,
            on_pass=on_pass,
            calib=calib,
            tokenizer=tokenizer,
            calib_samples=calib_samples,
            seqlen=seqlen,
            target=target,
            batch_sizes=tuple(sizes),
            seq_len=seq_len,
            tune_trials=tune_trials,
            tuning_db=tuning_db,
        )
        progress.update(task, completed=len(steps.steps))
    if quiet:
        return
    t = result.report["totals"]
    table = Table(title=f"{model.name}: {len(result.report['ops'])} weighted ops")
    for col in ("", "before", "after"):
        table.add_column(col, justify="right")
    table.add_row("nonzero weights", f"{t['nonzeros_before']:,}", f"{t['nonzeros_after']:,}")
    table.add_row(
        "sparsity", f"{1 - t['nonzeros_before'] / max(t['params'], 1):.1%}", f"{t['sparsity_after']:.1%}"
    )
    table.add_row(
        "weight MB (best format)",
        f"{t['bytes_dense_before'] / 1e6:.3f}",
        f"{t['bytes_best_after'] / 1e6:.3f}",
    )
    out.print(table)
    if "calibration" in result.report:
        c = result.report["calibration"]
        out.print(f"calibration: {c['source']}, {c['collections']} statistics run(s), {c['seconds']:.1f} s")
    for d in result.report["validation"]["outputs"] or []:
        out.print(f"output {d['name']}: max rel diff {d['max_rel']:.3g}, cosine {d['cosine']:.5f}")
    for p in result.report["passes"]:
        for w in p["warnings"]:
            out.print(f"[yellow]warning[/yellow] ({p['pass']}): {w}")
    if "codegen" in result.report:
        for tag, t in result.report["codegen"]["timing_seconds"].items():
            ort_note = (
                f", onnxruntime (original) {t['onnxruntime'] * 1e3:.3f} ms" if "onnxruntime" in t else ""
            )
            out.print(f"compiled {tag}: {t['compiled'] * 1e3:.3f} ms ({t['shipped']}){ort_note}")
    written = [*result.report["files"], "report.json", "report.md"]
    out.print(f"wrote {', '.join(str(output / f) for f in written)}")


def _int_list(text: str, option: str) -> list[int]:
    from .errors import UsageError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{option} takes positive integers, got {text!r}")
    return values


@app.command()
@friendly_errors
def analyze(
    model: Path = typer.Argument(..., help="ONNX model to analyse."),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON instead."),
    plot: Path | None = typer.Option(None, help="Write a per-layer sparsity and size chart (PNG) here."),
):
    """List the ops with a constant weight: role and layer (structural analysis), shape,
    sparsity, FLOPs per token, and weight bytes dense vs the smallest sparse format."""
    from .compile import op_summary
    from .model import Model

    m = Model.load(model)
    summary = op_summary(m)
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        table = Table(title=f"{model.name}: {len(summary)} weighted ops")
        for col in (
            "op",
            "type",
            "role",
            "layer",
            "N×K",
            "sparsity",
            "MFLOP/token",
            "dense kB",
            "best",
            "kB",
            "bound",
        ):
            table.add_column(col, justify="left" if col in ("op", "type", "role", "best") else "right")
        for name, s in summary.items():
            table.add_row(
                name,
                s["op_type"],
                s["role"] or "–",
                "" if s["layer"] is None else str(s["layer"]),
                f"{s['shape'][0]}×{s['shape'][1]}",
                f"{1 - s['nonzeros'] / max(s['params'], 1):.1%}",
                f"{s['flops_dense'] / 1e6:.3f}",
                f"{s['bytes_dense'] / 1e3:.1f}",
                s["best_format"],
                f"{s['bytes_best'] / 1e3:.1f}",
                f"{s['bytes_bound']:.2f}x",
            )
        out.print(table)
    if plot:
        from .plots import plot_layers

        plot_layers(summary, plot, title=model.name)
        console.print(f"wrote {plot}")


@app.command()
@friendly_errors
def passes():
    """List the registered passes, what they do, and their parameters."""
    from .pass_manager import AnalysisPass, registry

    for name, cls in registry().items():
        kind = "analysis" if issubclass(cls, AnalysisPass) else "rewrite"
        doc = " ".join((cls.__doc__ or "").split())
        out.print(f"[bold]{name}[/bold] ({kind}): {doc}", highlight=False)
        for field, info in cls.Config.model_fields.items():
            default = (
                "required"
                if info.is_required()
                else f"default {info.get_default(call_default_factory=True)!r}"
            )
            desc = f" — {info.description}" if info.description else ""
            out.print(f"    {field}: {_type_name(info.annotation)} ({default}){desc}", highlight=False)


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "")


@app.command()
@friendly_errors
def bench(
    folder: Path = typer.Argument(..., help="Output folder of `sparsegraph compile ... --target llvm`."),
    repeat: int = typer.Option(30, help="Timed runs per bucket (alternating compiled / onnxruntime)."),
    original: Path | None = typer.Option(
        None, help="Original model (default: the one named in report.json)."
    ),
):
    """Time the compiled model against onnxruntime on the original model, in the same run;
    writes FOLDER/bench.md, bench.json and bench.png."""
    from .bench import bench as run_bench

    result = run_bench(folder, repeat, original)
    table = Table(title=f"compiled vs onnxruntime ({Path(result['model']).name})")
    for col in ("bucket", "onnxruntime ms", "compiled ms", "speedup"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(
            r["bucket"], f"{r['onnxruntime_ms']:.3f}", f"{r['compiled_ms']:.3f}", f"{r['speedup']:.2f}x"
        )
    out.print(table)
    out.print(f"wrote {folder / 'bench.md'}, {folder / 'bench.json'}, {folder / 'bench.png'}")


@app.command("convert-llama2c")
@friendly_errors
def convert_llama2c(
    checkpoint: Path = typer.Argument(..., help="llama2.c checkpoint (.bin)."),
    output: Path = typer.Argument(..., help="ONNX file to write."),
):
    """Convert a llama2.c checkpoint to an ONNX causal LM (input `tokens`, output `logits`)."""
    from .errors import UsageError
    from .models.llama2c import convert

    if not checkpoint.is_file():
        raise UsageError(f"{checkpoint}: file not found")
    try:
        convert(checkpoint, output)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    out.print(f"wrote {output}")


def main():  # pragma: no cover
    app()
