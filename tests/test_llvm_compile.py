"""The compiled CPU path: stories260K through Relax + our kernels vs onnxruntime, the
tuning database, dispatch decisions and the runtime Session."""

import json

import numpy as np
import pytest

import sparsegraph as sg
from sparsegraph.codegen.dispatch import Candidate, Dispatcher, TuningDB, candidates
from sparsegraph.codegen.llvm_compile import compile_llvm
from sparsegraph.codegen.target import host_target
from sparsegraph.runtime import Session
from sparsegraph.validate import run

from paths import STORIES


@pytest.fixture(scope="module")
def db_path(tmp_path_factory):
    return tmp_path_factory.mktemp("tuning") / "db.json"


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.9])
def test_compiled_stories260k_matches_onnxruntime(tmp_path, db_path, sparsity):
    recipe = {"steps": [{"pass": "magnitude", "sparsity": sparsity, "granularity": "row"}]}
    portable = sg.compile_model(STORIES, recipe, tmp_path, validate=False).portable
    manifest = compile_llvm(
        portable, tmp_path, batch_sizes=[2], seq_len=8, reference=STORIES, db_path=db_path, tune_trials=1
    )
    assert manifest["kernels_swapped"] == 36  # 5 layers x 7 projections + lm_head
    sess = Session(tmp_path)
    tokens = np.random.default_rng(1).integers(0, 512, (2, 8)).astype(np.int64)
    (got,) = sess.run(["logits"], {"tokens": tokens})
    ref = run(portable, {"tokens": tokens})["logits"]
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    assert sess.fallbacks == 0
    timing = manifest["timing_seconds"]["b2_s8"]
    assert {"compiled", "onnxruntime", "shipped"} <= set(timing)
    assert all(op["decisions"] for op in manifest["ops"])  # every linear op has a measured decision
    if "dense_compiled" in timing:  # sparse kernels were chosen somewhere: the whole model was checked
        assert timing["compiled"] <= 1.02 * timing["dense_compiled"]


def test_session_falls_back_for_other_shapes_and_checks_inputs(tmp_path, db_path):
    portable = sg.compile_model(STORIES, {"steps": [{"pass": "nm"}]}, tmp_path, validate=False).portable
    compile_llvm(portable, tmp_path, batch_sizes=[1], seq_len=4, db_path=db_path, tune_trials=1)
    sess = Session(tmp_path)
    tokens = np.array([[1, 5, 9, 200, 17]], dtype=np.int64)
    (got,) = sess.run(None, {"tokens": tokens})
    np.testing.assert_allclose(got, run(portable, {"tokens": tokens})["logits"], rtol=1e-5, atol=1e-5)
    assert sess.fallbacks == 1
    with pytest.raises(sg.UsageError, match="missing input"):
        sess.run(None, {"ids": tokens})
    with pytest.raises(sg.UsageError, match="unknown output"):
        sess.run(["probs"], {"tokens": tokens})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["hashes"]["module.so"] and manifest["target"]


def test_not_a_compiled_folder(tmp_path):
    with pytest.raises(sg.UsageError, match="not a compiled model folder"):
        Session(tmp_path)


def test_candidates_follow_the_weight_structure():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    assert [c.format for c in candidates(w, avx512=True)] == ["dense"]
    nm = w.copy().reshape(64, -1, 4)
    nm[:, :, 2:] = 0
    assert "nm" in [c.format for c in candidates(nm.reshape(64, 128), avx512=True)]
    blocks = np.kron(rng.random((4, 8)) < 0.3, np.ones((16, 16))).astype(np.float32) * w
    found = {c.format: c.params for c in candidates(blocks, avx512=True)}
    assert found["bsr"] == {"block": (16, 16)} and "bitmap" in found
    assert "bitmap" not in [c.format for c in candidates(blocks, avx512=False)]


def test_tuning_db_persists_decisions(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    w[np.abs(w) < 1.2] = 0  # ~77 % sparse
    db = TuningDB(tmp_path / "db.json")
    first = Dispatcher(host_target(), db, cold=False, tune_trials=1)
    k1 = first.kernel("op", w, 4)
    decision = first.decisions[("op", 4)]
    assert decision.timings and decision.seconds == min(decision.timings.values())
    assert decision.dense_seconds == decision.timings["dense"] or decision.dense_seconds > 0
    db.save()
    again = Dispatcher(host_target(), TuningDB(tmp_path / "db.json"), cold=False, tune_trials=1)
    k2 = again.kernel("op", w, 4)
    assert again.decisions[("op", 4)].from_db and k2.format == k1.format
    x = rng.standard_normal((4, 256)).astype(np.float32)
    np.testing.assert_allclose(k2(x), x @ w.T, rtol=1e-4, atol=1e-4)


def test_dense_candidate_label():
    assert Candidate("bsr", {"block": (16, 1)}).label == "bsr(block=(16, 1))"


def test_cli_compile_target_llvm_and_bench(tmp_path, db_path):
    from typer.testing import CliRunner

    from sparsegraph.cli import app

    from paths import EXAMPLES

    runner = CliRunner()
    out = tmp_path / "out"
    args = [
        "compile",
        str(STORIES),
        "--recipe",
        str(EXAMPLES / "recipes" / "nm24.yaml"),
        "-o",
        str(out),
        "--target",
        "llvm",
        "--batch-sizes",
        "1,2",
        "--seq-len",
        "4",
        "--tune-trials",
        "1",
        "--tuning-db",
        str(db_path),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert {"module.so", "params.npz", "manifest.json", "sparse.onnx", "portable.onnx"} <= {
        p.name for p in out.iterdir()
    }
    report = json.loads((out / "report.json").read_text())
    assert set(report["codegen"]["timing_seconds"]) == {"b1_s4", "b2_s4"}
    assert "## Compiled module" in (out / "report.md").read_text()
    result = runner.invoke(app, ["bench", str(out), "--repeat", "3"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["bucket"] for r in rows] == ["b1_s4", "b2_s4"] and all(r["speedup"] > 0 for r in rows)
    assert (out / "bench.png").stat().st_size > 1000
    bad = runner.invoke(app, [*args[:6], "--target", "bogus"])
    assert bad.exit_code == 2 and "--target 'bogus'" in bad.output
    bad = runner.invoke(app, [*args[:6], "--target", "llvm", "--batch-sizes", "one"])
    assert bad.exit_code == 2 and "--batch-sizes" in bad.output
