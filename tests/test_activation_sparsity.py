"""Pass `activation_sparsity` (TEAL / CATS / CHESS / top-K): thresholds, inserted ops, numerics.

Calibration sparsity is measured by running the rewritten model in onnxruntime; numerics
are compared with numpy references that apply the same thresholds; CATS is found on graphs
whose node and tensor names were replaced by meaningless ones.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparsegraph as sg
from sparsegraph.calibration import AbsHistogram, Calibration, stream_tensors, token_input
from sparsegraph.errors import RecipeError
from sparsegraph.eval.perplexity import load_stories
from sparsegraph.eval.tokenizer import Llama2cTokenizer
from sparsegraph.passes.analysis.roles import Roles
from sparsegraph.passes.analysis.sparsifiable import SparsifiableOps
from sparsegraph.passes.rewrite.activation_sparsity import (
    METADATA_KEY,
    calibrated_sparsities,
    find_inserted,
    greedy_allocation,
    measure_activation_sparsity,
    threshold_key,
    threshold_mask,
    topk_mask,
)

from paths import EXAMPLES, FIXTURES, STORIES


def _run(model, steps, calib, seed=0):
    ctx = sg.PassContext(seed)
    ctx.extras["calibration"] = calib
    recipe = sg.Recipe.load({"steps": steps})
    ctx = sg.PassManager(recipe.steps, seed=seed).run(model, ctx)
    return ctx, ctx.history[-1][1]


@pytest.fixture(scope="module")
def stories_calib():
    tok = Llama2cTokenizer(EXAMPLES / "stories260K" / "tok512.bin")
    stories = load_stories(EXAMPLES / "data" / "tinystories_valid.txt")
    model = sg.Model.load(STORIES)
    calib = Calibration.from_text(stories[: len(stories) // 2], tok, model, samples=32, seqlen=64, seed=0)
    held = Calibration.from_text(stories[len(stories) // 2 :], tok, model, samples=16, seqlen=64, seed=1)
    return calib, list(held.batches())


def _llama_calib(model, batches=4, seed=0):
    vocab = next(op.shape[0] for op in sg.PassContext().get(SparsifiableOps, model))
    rng = np.random.default_rng(seed)
    return Calibration([{token_input(model): rng.integers(0, vocab, (2, 16))} for _ in range(batches)])


# ----------------------------------------------------------------------- histogram quantiles
def test_abs_histogram_quantiles_tensor_and_per_channel():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 32)) * np.geomspace(1e-3, 1e2, 32)  # five decades of scale
    hist, chan = AbsHistogram(32), AbsHistogram(32, per_channel=True)
    for part in np.array_split(x, 5):  # streamed in blocks
        hist.update(part)
        chan.update(part)
    for q in (0.25, 0.4, 0.5, 0.9):
        assert abs(np.mean(np.abs(x) <= hist.quantile(q)) - q) < 0.002
        t = chan.quantile(q)
        assert t.shape == (32,)
        assert np.all(np.abs(np.mean(np.abs(x) <= t, axis=0) - q) < 0.01)


def test_abs_histogram_keeps_a_point_mass_whole():
    rng = np.random.default_rng(0)
    y = np.tanh(8 * rng.standard_normal((2000, 16))).astype(np.float32)  # ~90 % saturated at |y| = 1
    hist = AbsHistogram(16)
    hist.update(y)
    t = np.float32(hist.quantile(0.5))
    assert t < 1 and np.all(np.abs(y[np.abs(y) == 1]) > t)  # the mass is kept, never half-cut
    zeros = AbsHistogram(4, per_channel=True)
    zeros.update(np.zeros((10, 4)))
    assert np.all(zeros.quantile(0.5) == 0)


# ------------------------------------------------------------------ thresholds reach the target
@pytest.mark.parametrize("method", ["teal", "chess", "cats"])
def test_thresholds_reach_the_target_on_calibration_and_held_out_data(stories_calib, method):
    calib, held = stories_calib
    model = sg.Model.load(STORIES)
    ctx, result = _run(model, [{"pass": "activation_sparsity", "method": method, "sparsity": 0.4}], calib)
    assert result.changes
    for c in result.changes:
        d = c.detail
        assert abs(d["calibration"] - 0.4) < 0.015, d
        assert abs(d["held_out"] - 0.4) < 0.03, d
    # measured again on data never seen (the second half of the stories)
    reached = measure_activation_sparsity(model, held)
    assert set(reached) == {c.detail["tensor"] for c in result.changes}
    assert all(abs(v - 0.4) < 0.04 for v in reached.values()), reached
    section = ctx.extras["report_sections"]["activation_sparsity"]
    assert abs(section.data["weighted"]["calibration"] - 0.4) < 0.01


# ---------------------------------------------------------------------- contract of the graph
def test_inserted_ops_are_the_contract_form_and_only_targets_are_rewired():
    model = sg.Model.load(FIXTURES / "llama_tiny.onnx")
    calib = _llama_calib(model)
    _, result = _run(model, [{"pass": "activation_sparsity", "sparsity": 0.5}], calib)
    roles = sg.PassContext().get(Roles, model)
    linear = {n.name: n for n in model.graph.nodes if n.name in roles.roles and n.op == "MatMul"}
    wheres = [n for n in model.graph.nodes if n.op == "Where"]
    ours = []
    for w in wheres:
        gt = w.inputs[0].inputs[0] if w.inputs[0].inputs else None
        if gt is None or gt.op != "Greater":
            continue  # the model's own Where (attention mask)
        ours.append(w)
        ab = gt.inputs[0].inputs[0]
        assert ab.op == "Abs" and ab.inputs[0] is w.inputs[1]
        t, z = gt.inputs[1], w.inputs[2]
        assert t.values.dtype == np.float32
        assert t.values.shape == () and z.values.shape == () and z.values == 0
        assert z.values.dtype == np.float32
        consumers = {n.op for n in w.outputs[0].outputs}
        assert consumers == {"MatMul"}, consumers
        # nothing but targeted linear ops reads y; other readers of x keep x
        assert all(n.name in linear for n in w.outputs[0].outputs)
        assert all(n.name not in linear for n in w.inputs[1].outputs if n.op == "MatMul")
    # one Where per distinct input: q/k/v share one, gate/up share one, o and down one each
    assert len(ours) == 4 * 2 == len(result.changes)
    fan_out = sorted(len(w.outputs[0].outputs) for w in ours)
    assert fan_out == [1, 1, 1, 1, 2, 2, 3, 3]
    assert len(find_inserted(model)) == 8
    onnx.checker.check_model(model.to_proto())


def test_reached_sparsity_is_recorded_in_the_model_and_survives_save_and_load(tmp_path):
    """The metadata maps each threshold's value key to its held-out sparsity; it survives a
    save/load round trip, and the keys are recomputed from the T constants alone."""
    model = sg.Model.load(FIXTURES / "llama_tiny.onnx")
    _, result = _run(model, [{"pass": "activation_sparsity", "sparsity": 0.4}], _llama_calib(model, 6))
    table = calibrated_sparsities(model)
    held = {c.detail["key"]: c.detail["held_out"] for c in result.changes}
    assert len(table) == 8 and table == pytest.approx(held, abs=1e-6)
    assert all(0.2 < v < 0.6 for v in table.values())  # random tokens: near the 40 % target
    path = model.save(tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    assert calibrated_sparsities(proto) == table  # read from the raw proto, too
    again = sg.Model.load(path)
    assert calibrated_sparsities(again) == table
    dims = {c.detail["tensor"]: c.detail["dim"] for c in result.changes}
    assert {threshold_key(s.threshold, dims[s.x]) for s in find_inserted(again)} == set(table)
    # a scalar T and its [K] broadcast are the same thresholding; another value is not
    assert threshold_key(np.float32(0.5), 8) == threshold_key(np.full(8, 0.5, np.float32), 8)
    assert threshold_key(0.5, 8) != threshold_key(0.5000001, 8) != threshold_key(0.5, 9)
    # a model without the record, or with an unreadable one, has no table
    assert calibrated_sparsities(sg.Model.load(FIXTURES / "llama_tiny.onnx")) == {}
    again.meta.metadata_props[METADATA_KEY] = "not json"
    assert calibrated_sparsities(again) == {}


def _chain(k=16, n=12, m=10, seed=0):
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((k, n)).astype(np.float32)
    w2 = rng.standard_normal((n, m)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="a"),
            helper.make_node("Tanh", ["h"], ["g"], name="act"),
            helper.make_node("MatMul", ["g", "w2"], ["y"], name="b"),
        ],
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, m])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    scale = np.linspace(0.2, 3.0, k).astype(np.float32)  # channels of different magnitude
    feeds = [{"x": (rng.standard_normal((4, 5, k)) * scale).astype(np.float32)} for _ in range(6)]
    return sg.Model.from_proto(proto), w1, w2, feeds


@pytest.mark.parametrize("method", ["teal", "chess", "topk"])
def test_onnxruntime_matches_a_numpy_reference(method):
    model, w1, w2, feeds = _chain()
    steps = [{"pass": "activation_sparsity", "method": method, "sparsity": 0.5, "targets": ["op:MatMul"]}]
    _run(model, steps, Calibration(feeds))
    found = {s.x: s for s in find_inserted(model)}
    assert set(found) == {"x", "g"}
    test = np.random.default_rng(7).standard_normal((3, 5, 16)).astype(np.float32)
    import onnxruntime as ort

    sess = ort.InferenceSession(model.to_proto().SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(["y"], {"x": test})[0]

    def sparse(name, v):
        s = found[name]
        return topk_mask(v, s.keep) if method == "topk" else threshold_mask(v, s.threshold)

    ref = sparse("g", np.tanh(sparse("x", test) @ w1)) @ w2
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    if method == "chess":  # channel-wise: one threshold per input channel, larger on larger channels
        t = found["x"].threshold
        assert t.shape == (16,) and t[-1] > 5 * t[0]
    else:
        assert all(s.threshold is None or s.threshold.shape == () for s in found.values())


def test_topk_keeps_exactly_k_per_row():
    model, _, _, feeds = _chain()
    steps = [{"pass": "activation_sparsity", "method": "topk", "sparsity": 0.25, "targets": ["op:MatMul"]}]
    _run(model, steps, Calibration(feeds))
    sites = find_inserted(model)
    assert {s.keep for s in sites} == {12, 9}  # round(0.75 * 16), round(0.75 * 12)
    assert calibrated_sparsities(model) == {}  # no threshold: nothing recorded for a compiler
    for outs in stream_tensors(model, [s.y for s in sites], feeds):
        for s in sites:
            y = outs[s.y]
            assert np.all(np.count_nonzero(y, axis=-1) == s.keep)


# -------------------------------------------------------------------------------------- CATS
def _rename(model):
    """Meaningless node and tensor names; returns id(tensor) -> original name."""
    old = {id(t): name for name, t in model.graph.tensors().items()}
    rng = np.random.default_rng(0)
    for i in rng.permutation(len(model.graph.nodes)):
        model.graph.nodes[i].name = f"x{i}"
    for j, tensor in enumerate(model.graph.tensors().values()):
        tensor.name = f"t{j}"
    return old


@pytest.mark.parametrize("which", ["llama_tiny", "stories260K"])
def test_cats_finds_the_gate_activation_without_names(which, stories_calib):
    path = STORIES if which == "stories260K" else FIXTURES / "llama_tiny.onnx"
    model = sg.Model.load(path)
    old = _rename(model)
    calib = stories_calib[0] if which == "stories260K" else _llama_calib(model)
    if which == "stories260K":  # the token input was renamed too
        calib = Calibration([{token_input(model): b["tokens"]} for b in calib.batches()][:4])
    _run(model, [{"pass": "activation_sparsity", "method": "cats", "sparsity": 0.5}], calib)
    sites = find_inserted(model)
    layers = 5 if which == "stories260K" else 2
    assert len(sites) == layers
    tensors = model.graph.tensors()
    got = sorted(old[id(tensors[s.x])] for s in sites)
    expected = (
        [f"layers.{i}.feed_forward.silu" for i in range(5)] if which == "stories260K" else ["silu", "silu_1"]
    )
    assert got == expected
    for s in sites:  # y feeds exactly the gating Mul
        assert [n.op for n in tensors[s.y].outputs] == ["Mul"]


def test_cats_on_an_ungated_mlp_thresholds_the_down_input():
    model = sg.Model.load(FIXTURES / "bert_tiny.onnx")
    vocab = max(op.shape[0] for op in sg.PassContext().get(SparsifiableOps, model))
    rng = np.random.default_rng(0)
    calib = Calibration([{"input_ids": rng.integers(0, vocab, (2, 12))} for _ in range(4)])
    _, result = _run(model, [{"pass": "activation_sparsity", "method": "cats", "sparsity": 0.3}], calib)
    roles = sg.PassContext().get(Roles, model)
    assert [c.detail["roles"] for c in result.changes] == [["ffn.down"]] * 2
    for s in find_inserted(model):
        (consumer,) = model.graph.tensors()[s.y].outputs
        assert roles.get(consumer.name).role == "ffn.down"


# ---------------------------------------------------------------------------------- greedy
def test_greedy_allocation_meets_the_budget_and_prefers_cheap_sites():
    calls = []

    def error(levels):  # site 1 is ten times as sensitive
        calls.append(levels.copy())
        return float(np.sum(np.array([1.0, 10.0, 1.0]) * levels**2))

    s = greedy_allocation(error, [1.0, 1.0, 2.0], 0.5, step=0.05)
    assert abs((s * [1, 1, 2]).sum() / 4 - 0.5) < 1e-9
    assert s[1] < s[0] and s[1] < s[2]
    assert np.all(calls[0] == 0)  # starts dense


def test_greedy_pass_meets_the_budget_on_stories260k(stories_calib):
    calib, _ = stories_calib
    model = sg.Model.load(STORIES)
    steps = [{"pass": "activation_sparsity", "sparsity": 0.4, "allocation": "greedy", "greedy_batches": 1}]
    _, result = _run(model, steps, calib)
    recs = [c.detail for c in result.changes]
    weighted = sum(r["target"] * r["params"] for r in recs) / sum(r["params"] for r in recs)
    assert abs(weighted - 0.4) < 1e-4
    assert len({round(r["target"], 3) for r in recs}) > 2  # not uniform
    measured = sum(r["calibration"] * r["params"] for r in recs) / sum(r["params"] for r in recs)
    assert abs(measured - 0.4) < 0.015


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "params",
    [
        {"sparsity": 1.0},
        {"sparsity": -0.1},
        {"sparsity": 0.5, "method": "relu"},
        {"sparsity": 0.5, "step": 0},
    ],
)
def test_bad_parameters_are_recipe_errors(params):
    with pytest.raises(RecipeError, match="activation_sparsity"):
        sg.Recipe.load({"steps": [{"pass": "activation_sparsity", **params}]})


def test_missing_calibration_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="calibration"):
        sg.compile_model(STORIES, EXAMPLES / "recipes" / "teal50.yaml", tmp_path / "out")


def test_shipped_recipe_compiles_with_a_report_section(tmp_path):
    result = sg.compile_model(
        STORIES,
        EXAMPLES / "recipes" / "teal50.yaml",
        tmp_path / "out",
        calib=EXAMPLES / "data" / "tinystories_valid.txt",
        tokenizer=EXAMPLES / "stories260K" / "tok512.bin",
        calib_samples=16,
        seqlen=64,
    )
    section = result.report["activation_sparsity"]
    assert section["method"] == "teal" and len(section["tensors"]) == 20
    assert abs(section["weighted"]["held_out"] - 0.5) < 0.03
    assert (tmp_path / "out" / "activation_sparsity.png").stat().st_size > 0
    assert "Activation sparsity" in (tmp_path / "out" / "report.md").read_text()
    assert len(find_inserted(sg.Model.load(result.portable))) == 20
