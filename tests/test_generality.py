"""Regressions found by `benchmarks/generality.py` (every recipe on exports no test was written
against): each test rebuilds the smallest graph that showed the bug."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparsegraph as sg
from sparsegraph.calibration import Calibration
from sparsegraph.codegen import sparse_onnx
from sparsegraph.codegen.formats import FORMATS
from sparsegraph.codegen.relax_build import import_bucket, specialise
from sparsegraph.passes.analysis.cost_model import op_cost

from graphs import matmul_chain

F32, I64 = TensorProto.FLOAT, TensorProto.INT64


def _sliced_shape_model() -> onnx.ModelProto:
    """Y[b, s] = X + arange(s), with s read as dynamo exports do: Shape(X, start=1, end=2) ->
    Squeeze -> Range (opset 18)."""
    nodes = [
        helper.make_node("Shape", ["X"], ["s1"], start=1, end=2),
        helper.make_node("Squeeze", ["s1"], ["s"]),
        helper.make_node("Range", ["zero", "s", "one"], ["r"]),
        helper.make_node("Cast", ["r"], ["rf"], to=F32),
        helper.make_node("Add", ["X", "rf"], ["Y"]),
    ]
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("zero", 0), ("one", 1))]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", F32, ["batch", "seq"])],
        [helper.make_tensor_value_info("Y", F32, ["batch", "seq"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_specialise_honours_shape_start_end():
    """onnx-graphsurgeon folded `Shape(X, start=1, end=2)` to the whole shape [2, 5], so
    Range got a 2-element limit and the Relax import of every dynamo HF export failed."""
    spec = specialise(_sliced_shape_model(), {"X": [2, 5]})
    ranges = [n for n in spec.graph.node if n.op_type == "Range"]
    consts = {t.name: numpy_helper.to_array(t) for t in spec.graph.initializer}
    if ranges:  # folded further or not, the limit is the scalar 5
        assert consts[ranges[0].input[1]].shape == () and consts[ranges[0].input[1]] == 5
    else:
        assert any(a.shape == (5,) and np.array_equal(a, np.arange(5)) for a in consts.values())
    func = import_bucket(_sliced_shape_model(), {"X": [2, 5]})
    assert [int(d) for d in func.ret_ty.shape] == [2, 5]


def test_choose_format_picks_only_formats_sparse_onnx_holds(tmp_path):
    """The cost model also prices DeltaCSR (a GPU format), which won on stories260K's
    172-wide weights; `to_sparse` then failed with KeyError 'dcsr' on every llvm compile."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((36, 256)).astype(np.float32)
    w[rng.random(w.shape) < 0.6] = 0
    assert op_cost("w", w).best_format == "dcsr"  # the case that crashed
    fmt, params = sparse_onnx.choose_format(w)
    assert fmt in {"csr", "bitmap", "nm", "bsr"}
    np.testing.assert_array_equal(FORMATS[fmt].pack(w, **params).unpack(), w)
    x = helper.make_tensor_value_info("X", F32, [3, 256])
    y = helper.make_tensor_value_info("Y", F32, [3, 36])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "g", [x], [y], [numpy_helper.from_array(w.T, "W")]
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    model = sg.Model.load(path)
    assert len(sparse_onnx.to_sparse(model)) == 1
    back = sg.Model.load(model.save(tmp_path / "sparse.onnx"))
    assert sparse_onnx.to_portable(back) == 1
    restored = back.save(tmp_path / "restored.onnx")
    xs = rng.standard_normal((3, 256)).astype(np.float32)
    sess = ort.InferenceSession(str(restored), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"X": xs})[0], xs @ w.T, rtol=1e-5, atol=1e-5)


def test_specialise_folds_shapes_that_only_earlier_folds_make_static():
    """TorchScript exports (OPT) reshape with targets computed from Shape, so a later Shape's
    input is static only once the earlier target is folded; one round of inference + folding
    left symbolic dims and the activation-sparse rewrite crashed on int(Mul)."""
    nodes = [
        helper.make_node("Shape", ["X"], ["s"]),
        helper.make_node("Reshape", ["X", "s"], ["t"]),
        helper.make_node("Shape", ["t"], ["u"]),
        helper.make_node("Reshape", ["t", "u"], ["v"]),
        helper.make_node("Shape", ["v"], ["w"]),
        helper.make_node("Reshape", ["v", "w"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", F32, ["batch", "seq", 4])],
        [helper.make_tensor_value_info("Y", F32, None)],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    spec = specialise(proto, {"X": [2, 3, 4]})
    assert not any(n.op_type == "Shape" for n in spec.graph.node)
    func = import_bucket(proto, {"X": [2, 3, 4]})
    assert [int(d) for d in func.ret_ty.shape] == [2, 3, 4]


def test_sensitivity_reports_calibration_that_does_not_fit_a_static_shape_model(tmp_path):
    """Exports with static input shapes ([1, 8]) are common; calibration of another shape was
    a clear UsageError in every calibrated pass but `sensitivity` (mse/cosine loss), which let
    onnxruntime's InvalidArgument escape."""
    path = tmp_path / "static.onnx"
    onnx.save(matmul_chain(batch=1), path)  # X is [1, 8]
    calib = Calibration([{"X": np.ones((2, 8), np.float32)}])
    steps = [{"pass": "sensitivity", "sparsity": 0.5, "metric": "mse"}]
    with pytest.raises(sg.UsageError, match="calibration feeds do not fit the model"):
        sg.compile_model(path, {"steps": steps}, tmp_path / "out", calib=calib)
    fits = Calibration([{"X": np.ones((1, 8), np.float32)}])
    assert sg.compile_model(path, {"steps": steps}, tmp_path / "out", calib=fits).report["sensitivity"]


def test_kv_recipe_on_a_model_without_kv_cache_names_the_file(tmp_path):
    """The sweep's most common clear error (a KV recipe on a model without a cache) said which
    pass and why but not which model."""
    path = tmp_path / "no_cache.onnx"
    onnx.save(matmul_chain(), path)
    steps = [{"pass": "kv_cache", "policy": "window_sink", "budget": 8, "sinks": 1}]
    with pytest.raises(sg.UnsupportedOpError, match=r"'kv_cache' on no_cache\.onnx: no attention site"):
        sg.compile_model(path, {"steps": steps}, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
