"""Calibration data and the streaming activation-statistics collector: exact statistics on
hand-built graphs, streaming = one batch, bounded memory, feed derivation from the graph,
seeded text windows, and one-line errors through the API and the CLI."""

import json
import tracemalloc
import weakref

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

import sparsegraph as sg
from sparsegraph import calibration
from sparsegraph.calibration import (
    HIST_EDGES,
    Calibration,
    collect_statistics,
    complete_feeds,
    load_calibration,
    text_windows,
)
from sparsegraph.cli import app
from sparsegraph.eval.tokenizer import Llama2cTokenizer
from sparsegraph.passes.analysis.sparsifiable import SparsifiableOps

import graphs as g
from paths import EXAMPLES, FIXTURES, STORIES

TOKENIZER = EXAMPLES / "stories260K" / "tok512.bin"
TEXT = EXAMPLES / "data" / "tinystories_valid.txt"


def _model(proto: onnx.ModelProto) -> sg.Model:
    return sg.Model.from_proto(proto)


def _ops(model: sg.Model):
    return [op for op in sg.PassContext().get(SparsifiableOps, model) if op.is_linear]


def _three_d_chain(k=8, h=12, n=6, seed=0) -> onnx.ModelProto:
    """`Y = Relu(X @ W0) @ W1` on `X[batch, seq, K]` (symbolic batch/seq), nodes mm0, mm1."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["X", "W0"], ["h"], name="mm0"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W1"], ["Y"], name="mm1"),
    ]
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", "seq", k])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", "seq", n])
    inits = {
        "W0": rng.standard_normal((k, h)).astype(np.float32),
        "W1": rng.standard_normal((h, n)).astype(np.float32),
    }
    return g.make_model(nodes, [x], [y], inits)


def _assert_stats(stats, x: np.ndarray):
    """`stats` equal numpy's for activation rows `x` (float64), to 1e-6 relative."""
    x = x.astype(np.float64)
    assert stats.rows == len(x)
    np.testing.assert_allclose(stats.norm, np.linalg.norm(x, axis=0), rtol=1e-6)
    xtx = x.T @ x
    np.testing.assert_allclose(stats.xtx, xtx, rtol=1e-6, atol=1e-6 * np.abs(xtx).max())
    np.testing.assert_allclose(stats.hessian(), 2 * xtx / len(x), rtol=1e-6, atol=1e-6 * np.abs(xtx).max())


def test_statistics_equal_numpy_on_a_hand_built_graph():
    proto = _three_d_chain()
    model = _model(proto)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((3, 5, 8)).astype(np.float32) for _ in range(4)]
    stats = collect_statistics(model, _ops(model), [{"X": x} for x in xs], hessian=True, histogram=True)
    x = np.concatenate(xs).reshape(-1, 8)
    r = np.maximum(x @ g.initializer(proto, "W0"), 0)
    _assert_stats(stats["mm0"], x)
    _assert_stats(stats["mm1"], r)
    counts = np.histogram(np.abs(r).ravel(), bins=np.r_[HIST_EDGES[:-1], 1e300])[0]
    np.testing.assert_array_equal(stats["mm1"].hist, counts)
    assert stats["mm1"].hist[0] > 0  # Relu zeros land in the first bin


def test_statistics_of_gemm_and_conv_inputs():
    proto = g.gemm(m=7, k=8, n=6, trans_b=1)
    model = _model(proto)
    x = np.random.default_rng(2).standard_normal((7, 8)).astype(np.float32)
    _assert_stats(collect_statistics(model, _ops(model), [{"X": x}], hessian=True)["gemm"], x)

    proto = g.conv(out_ch=4, in_ch=3, kh=3, kw=2, size=6)
    model = _model(proto)
    x = np.random.default_rng(3).standard_normal((2, 3, 6, 6)).astype(np.float32)
    stats = collect_statistics(model, _ops(model), [{"X": x}], hessian=True)["conv"]
    # independent im2col: one row per (image, output pixel), columns in W's (C, kh, kw) order
    rows = [x[b, :, i : i + 3, j : j + 2].ravel() for b in range(2) for i in range(4) for j in range(5)]
    _assert_stats(stats, np.array(rows))


def test_streaming_batches_equals_one_batch_and_is_deterministic():
    model = _model(_three_d_chain())
    rng = np.random.default_rng(4)
    x = rng.standard_normal((12, 5, 8)).astype(np.float32)
    one = collect_statistics(model, _ops(model), [{"X": x}], hessian=True)
    calib = Calibration.from_arrays({"X": x}, model, batch_size=1)
    assert len(calib) == 12
    many = calib.statistics(model, _ops(model), hessian=True)
    again = calib.statistics(model, _ops(model), hessian=True)
    for name in ("mm0", "mm1"):
        assert many[name].rows == one[name].rows == 60
        np.testing.assert_allclose(many[name].sq_sum, one[name].sq_sum, rtol=1e-9)
        np.testing.assert_allclose(many[name].xtx, one[name].xtx, rtol=1e-9, atol=1e-9)
        np.testing.assert_array_equal(many[name].xtx, again[name].xtx)
    assert calib.runs == 2 and calib.seconds > 0


def test_memory_stays_bounded_by_one_batch(monkeypatch):
    """64 batches of a 512-wide layer (128 MiB of activations): while streaming, the numpy-side
    peak (tracemalloc) stays near statistics + one batch, and no onnxruntime output of an
    earlier batch is alive when the next batch runs (its buffers are invisible to tracemalloc)."""
    k, rows, batches = 512, 512, 64
    model = _model(g.matmul_chain(dims=(k, k, k), batch=rows))

    def stream():  # feeds are made on the fly: the caller holds nothing either
        rng = np.random.default_rng(5)
        for _ in range(batches):
            yield {"X": rng.standard_normal((rows, k), dtype=np.float32)}

    class Spy:
        def __init__(self, sess):
            self.sess, self.previous, self.calls = sess, [], 0

        def run(self, names, feed):
            assert all(ref() is None for ref in self.previous), "an earlier batch is still held"
            if not self.calls:
                tracemalloc.reset_peak()  # measure the streaming, not the session's creation
            outs = self.sess.run(names, feed)
            self.previous, self.calls = [weakref.ref(o) for o in outs], self.calls + 1
            return outs

    enter = calibration._session.__enter__
    spies = []
    monkeypatch.setattr(
        calibration._session, "__enter__", lambda self: spies.append(Spy(enter(self))) or spies[-1]
    )
    one_batch = 2 * rows * k * 4  # both taps, float32
    stats_bytes = 2 * (k + k * k) * 8
    tracemalloc.start()
    try:
        stats = Calibration(stream).statistics(model, _ops(model), hessian=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert spies[0].calls == batches and stats["mm0"].rows == rows * batches
    everything = batches * one_batch
    # statistics + the float64 copy of one tap and its K x K product + two feed dicts (the one
    # being run and the next one being made) + the probe model the session keeps + 2 MiB of
    # slack (modules imported on the way); onnxruntime's outputs are outside tracemalloc's
    # view and covered by the Spy
    bound = stats_bytes + rows * k * 8 + k * k * 8 + 2 * rows * k * 4 + k * k * 4 + 2**21
    mib = 2**20
    print(
        f"peak {peak / mib:.1f} MiB, bound {bound / mib:.1f} MiB, all activations {everything / mib:.0f} MiB"
    )
    assert stats_bytes < peak < bound < everything / 8, (peak, bound, everything)


def test_missing_inputs_are_derived_from_the_graph():
    kv = sg.Model.load(FIXTURES / "llama_tiny_kv.onnx")
    ids = np.arange(2 * 6).reshape(2, 6) % 100
    feeds = complete_feeds(kv, {"input_ids": ids.astype(np.int32)})  # cast to the input's int64
    assert feeds["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(feeds["attention_mask"], np.ones((2, 6)))  # mask: ones
    np.testing.assert_array_equal(feeds["position_ids"], np.tile(np.arange(6), (2, 1)))  # reaches Cos/Sin
    assert feeds["past_key_values.0.key"].shape == (2, 2, 0, 8)  # cache: empty
    stats = Calibration([{"input_ids": ids}]).statistics(kv, _ops(kv))
    assert all(s.rows == 12 for s in stats.values())

    bert = sg.Model.load(FIXTURES / "bert_tiny.onnx")
    feeds = complete_feeds(bert, {"input_ids": ids})
    np.testing.assert_array_equal(feeds["token_type_ids"], np.zeros((2, 6)))  # 2-row table: zeros
    np.testing.assert_array_equal(feeds["attention_mask"], np.ones((2, 6)))
    with pytest.raises(sg.UsageError, match="token input 'input_ids'"):
        complete_feeds(bert, {"token_type_ids": ids % 2})
    with pytest.raises(sg.UsageError, match="'ids' names no model input"):
        complete_feeds(bert, {"ids": ids})


def test_text_windows_are_seeded_slices_of_the_encoded_text():
    tok = Llama2cTokenizer(TOKENIZER)
    docs = ["Once upon a time there was a cat.", "The dog ran to the park and played all day."]
    a = text_windows(docs, tok, samples=5, seqlen=8, seed=3)
    assert a.shape == (5, 8) and a.dtype == np.int64
    np.testing.assert_array_equal(a, text_windows(docs, tok, samples=5, seqlen=8, seed=3))
    assert not np.array_equal(a, text_windows(docs, tok, samples=5, seqlen=8, seed=4))
    stream = np.concatenate([tok.encode(d) for d in docs])
    for w in a:
        assert any(np.array_equal(w, stream[s : s + 8]) for s in range(len(stream) - 7))
    chars = text_windows("abcdefgh", lambda s: [ord(c) for c in s], samples=2, seqlen=3)  # any callable
    assert chars.shape == (2, 3) and chars.min() >= ord("a")
    with pytest.raises(sg.UsageError, match="fewer than seqlen"):
        text_windows(docs, tok, samples=1, seqlen=10_000)


def test_load_calibration_from_files(tmp_path):
    model = sg.Model.load(STORIES)
    calib = load_calibration(TEXT, model, tokenizer=TOKENIZER, samples=10, seqlen=16, seed=1)
    assert calib.samples == 10 and len(calib) == 2  # batches of 8
    assert next(calib.batches())["tokens"].shape == (8, 16)
    np.savez(tmp_path / "c.npz", tokens=np.ones((20, 9), np.int64))
    calib = load_calibration(tmp_path / "c.npz", model, samples=12)
    assert calib.samples == 12 and [b["tokens"].shape[0] for b in calib.batches()] == [8, 4]
    calib = load_calibration([{"tokens": np.ones((1, 4), np.int64)}], model)
    assert len(calib) == 1 and load_calibration(calib, model) is calib


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "calibration file not found"),
        ("text_without_tokenizer", "needs --tokenizer"),
        ("wrong_npz_names", "names no model input"),
        ("not_npz", "not a readable .npz"),
        ("bad_tokenizer", "not a llama2.c tokenizer"),
        ("no_calib", "pass 'wanda' needs calibration data: pass --calib"),
    ],
)
def test_bad_calibration_input_is_one_line_exit_2(tmp_path, case, message):
    calib, extra = tmp_path / "calib.npz", []
    if case == "text_without_tokenizer":
        calib = TEXT
    elif case == "wrong_npz_names":
        np.savez(calib, ids=np.ones((4, 8), np.int64))
    elif case == "not_npz":
        calib.write_text("hello")
    elif case == "bad_tokenizer":
        (tmp_path / "tok.bin").write_bytes(b"\x00")
        calib, extra = TEXT, ["--tokenizer", tmp_path / "tok.bin"]
    recipe = EXAMPLES / "recipes" / "wanda50.yaml"
    args = ["compile", STORIES, "--recipe", recipe, "--calib", calib, *extra, "-o", tmp_path / "o"]
    if case == "no_calib":
        args = ["compile", STORIES, "--recipe", recipe, "-o", tmp_path / "o"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "o").exists()


def test_cli_compiles_with_text_or_npz_calibration(tmp_path):
    out = tmp_path / "wanda"
    args = ["compile", STORIES, "--recipe", EXAMPLES / "recipes" / "wanda50.yaml", "-o", out]
    args += ["--calib", TEXT, "--tokenizer", TOKENIZER, "--calib-samples", 16, "--seqlen", 32]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "calibration: " in result.output and "16 windows of 32 tokens" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["samples"] == 16 and report["calibration"]["collections"] == 5  # sequential
    body = [r for r in report["ops"] if r["role"] not in ("embed", "lm_head")]
    assert all(r["sparsity_after"] == 0.5 for r in body)

    np.savez(tmp_path / "calib.npz", tokens=np.random.default_rng(0).integers(0, 512, (12, 24)))
    args = [
        "compile",
        STORIES,
        "--recipe",
        EXAMPLES / "recipes" / "sparsegpt24.yaml",
        "-o",
        tmp_path / "sgpt",
    ]
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--calib", tmp_path / "calib.npz"]])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "sgpt" / "report.json").read_text())
    assert report["calibration"]["samples"] == 12 and report["calibration"]["batches"] == 2
    assert report["validation"]["outputs"][0]["cosine"] > 0.5


@pytest.mark.parametrize("fixture", ["bert_tiny", "gpt2_tiny", "llama_tiny_kv"])
def test_calibrated_recipes_on_transformer_exports_from_token_ids_only(tmp_path, fixture):
    np.savez(tmp_path / "ids.npz", input_ids=np.random.default_rng(0).integers(0, 100, (6, 10)))
    result = sg.compile_model(
        FIXTURES / f"{fixture}.onnx",
        EXAMPLES / "recipes" / "sparsegpt24.yaml",
        tmp_path / "out",
        calib=tmp_path / "ids.npz",
    )
    pruned = [r for r in result.report["ops"] if r["applied"]]
    assert pruned and all(r["sparsity_after"] >= 0.5 for r in pruned)
    assert result.report["calibration"]["samples"] == 6
