"""End-to-end through the command line: compile, analyze, passes, and bad input."""

import json
import shutil
import subprocess
import sys

import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from sparsegraph.cli import app

from paths import EXAMPLES, FIXTURES, STORIES

runner = CliRunner()
RECIPES = EXAMPLES / "recipes"


def sg(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_entry_point_compiles_the_bundled_example(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparsegraph",
            "compile",
            STORIES,
            "--recipe",
            RECIPES / "magnitude50.yaml",
            "-o",
            out,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == {"portable.onnx", "report.json", "report.md"}
    onnx.checker.check_model(str(out / "portable.onnx"))
    ort.InferenceSession(str(out / "portable.onnx"), providers=["CPUExecutionProvider"])
    report = json.loads((out / "report.json").read_text())
    linear = [r for r in report["ops"] if r["role"] not in ("embed", "lm_head")]
    assert linear and all(abs(r["sparsity_after"] - 0.5) < 0.02 for r in linear)
    assert all(r["sparsity_after"] == 0 for r in report["ops"] if r["role"] in ("embed", "lm_head"))
    assert report["validation"]["outputs"][0]["cosine"] > 0.5
    assert "| op |" in (out / "report.md").read_text()


@pytest.mark.parametrize("model", ["bert_tiny", "gpt2_tiny", "llama_tiny", "llama_tiny_kv"])
def test_compile_any_model_whatever_its_io_names(tmp_path, model):
    if not (FIXTURES / f"{model}.onnx").exists():
        pytest.skip("fixture not generated")
    result = sg(
        "compile", FIXTURES / f"{model}.onnx", "--recipe", RECIPES / "nm24.yaml", "-o", tmp_path / "o"
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    sess = ort.InferenceSession(str(tmp_path / "o" / "portable.onnx"), providers=["CPUExecutionProvider"])
    assert {d["name"] for d in report["validation"]["outputs"]} == {o.name for o in sess.get_outputs()}


def test_analyze_table_json_and_plot(tmp_path):
    result = sg("analyze", STORIES)
    assert result.exit_code == 0 and "ffn.down" in result.output and "lm_head" in result.output
    result = sg("analyze", STORIES, "--json", "--plot", tmp_path / "layers.png")
    assert result.exit_code == 0
    data = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert sum(1 for v in data.values() if v["role"] == "attn.q") == 5
    assert (tmp_path / "layers.png").stat().st_size > 1000


def test_passes_lists_every_pass_with_params():
    result = sg("passes")
    assert result.exit_code == 0
    for name in ("magnitude", "topk", "nm", "block", "lowrank", "roles", "cost_model"):
        assert f"{name} (" in result.output
    assert "granularity" in result.output and "rank_ratio" in result.output


def test_help_teaches():
    result = sg("--help")
    assert result.exit_code == 0 and "recipe" in result.output and "role:ffn.*" in result.output
    assert "Example" in sg("compile", "--help").output


def _bad_recipe(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "file not found"),
        ("not_onnx", "not an ONNX model"),
        ("truncated", "truncated.onnx"),
        ("unknown_key", "unknown key 'sparsty'"),
        ("sparsity", "sparsity"),
        ("n_gt_m", "N must not exceed M"),
        ("selector_nothing", "matched no op"),
        ("unsupported_op", "cannot rewrite op"),
        ("missing_recipe", "recipe file not found"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case, message):
    model = FIXTURES / "llama_tiny.onnx"
    recipe = RECIPES / "magnitude50.yaml"
    if case == "missing":
        model = tmp_path / "nope.onnx"
    elif case == "not_onnx":
        model = tmp_path / "readme.onnx"
        model.write_text("hello")
    elif case == "truncated":
        model = tmp_path / "truncated.onnx"
        model.write_bytes((FIXTURES / "llama_tiny.onnx").read_bytes()[:50_000])
    elif case == "unknown_key":
        recipe = _bad_recipe(tmp_path, "steps:\n  - pass: magnitude\n    sparsty: 0.5\n")
    elif case == "sparsity":
        recipe = _bad_recipe(tmp_path, "steps:\n  - pass: magnitude\n    sparsity: 1.0\n")
    elif case == "n_gt_m":
        recipe = _bad_recipe(tmp_path, "steps:\n  - pass: nm\n    n: 8\n    m: 4\n")
    elif case == "selector_nothing":
        recipe = _bad_recipe(tmp_path, "steps:\n  - pass: nm\n    targets: ['layers:9']\n")
    elif case == "unsupported_op":
        recipe = _bad_recipe(
            tmp_path, "steps:\n  - pass: lowrank\n    rank_ratio: 0.5\n    targets: ['role:embed']\n"
        )
    elif case == "missing_recipe":
        recipe = tmp_path / "none.yaml"
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "sparsegraph", "compile", model, "--recipe", recipe, "-o", out],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sparsegraph")]


def test_failed_compile_leaves_existing_output_untouched(tmp_path):
    out = tmp_path / "out"
    assert sg("compile", STORIES, "--recipe", RECIPES / "magnitude50.yaml", "-o", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = _bad_recipe(tmp_path, "steps:\n  - pass: nm\n    targets: ['layers:99']\n")
    assert sg("compile", STORIES, "--recipe", bad, "-o", out).exit_code == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_compile_with_feeds_file(tmp_path):
    import numpy as np

    np.savez(tmp_path / "feeds.npz", tokens=np.array([[1, 20, 30, 40, 50]], dtype=np.int64))
    result = sg(
        "compile",
        STORIES,
        "--recipe",
        RECIPES / "nm24.yaml",
        "-o",
        tmp_path / "o",
        "--feeds",
        tmp_path / "feeds.npz",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert "feeds.npz" in report["validation"]["feeds"]
    np.savez(tmp_path / "wrong.npz", ids=np.zeros((1, 4), np.int64))
    result = sg(
        "compile",
        STORIES,
        "--recipe",
        RECIPES / "nm24.yaml",
        "-o",
        tmp_path / "o2",
        "--feeds",
        tmp_path / "wrong.npz",
    )
    assert result.exit_code == 2 and "no array for model input" in result.output


def test_convert_llama2c(tmp_path):
    ckpt = EXAMPLES / "stories260K" / "stories260K.bin"
    result = sg("convert-llama2c", ckpt, tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    shutil.copy(ckpt, tmp_path / "cut.bin")
    with open(tmp_path / "cut.bin", "r+b") as f:
        f.truncate(1000)
    result = sg("convert-llama2c", tmp_path / "cut.bin", tmp_path / "cut.onnx")
    assert result.exit_code == 2 and "cut.bin" in result.output
