"""Model load/save: round trips, external data, > 2 GB models, bad files."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsegraph import Model, ModelLoadError
from sparsegraph.model import PROTOBUF_LIMIT

from paths import FIXTURES


def _mlp(weights: list[np.ndarray], opset: int = 17) -> onnx.ModelProto:
    nodes, inits, prev = [], [], "x"
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        prev = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weights[0].shape[0]])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["batch", weights[-1].shape[1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.doc_string = "a doc"
    model.model_version = 7
    helper.set_model_props(model, {"author": "tests", "license": "none"})
    return model


def test_round_trip_keeps_opset_metadata_and_names(tmp_path):
    rng = np.random.default_rng(0)
    proto = _mlp(
        [rng.standard_normal((8, 6)).astype(np.float32), rng.standard_normal((6, 4)).astype(np.float32)], 13
    )
    src = tmp_path / "m.onnx"
    onnx.save(proto, src)
    model = Model.load(src)
    out = model.save(tmp_path / "out" / "copy.onnx")
    back = onnx.load(out)
    assert [(o.domain, o.version) for o in back.opset_import] == [("", 13)]
    assert back.doc_string == "a doc" and back.model_version == 7 and back.producer_name == "tests"
    assert {p.key: p.value for p in back.metadata_props} == {"author": "tests", "license": "none"}
    assert [n.name for n in back.graph.node] == ["mm0", "mm1"]
    assert sorted(i.name for i in back.graph.initializer) == ["w0", "w1"]
    assert not any(p.name.startswith(".sparsegraph") for p in (tmp_path / "out").iterdir())


def test_external_data_is_relative_and_inside_the_model_folder(tmp_path):
    rng = np.random.default_rng(1)
    proto = _mlp([rng.standard_normal((64, 64)).astype(np.float32)])
    model = Model.from_proto(proto)
    path = model.save(tmp_path / "dir" / "model.onnx", external_data=True)
    data = tmp_path / "dir" / "model.onnx.data"
    assert data.exists()
    stored = onnx.load(path, load_external_data=False)
    locations = {e.value for t in stored.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    # loads from another working directory, and again after the folder moves
    moved = tmp_path / "moved"
    (tmp_path / "dir").rename(moved)
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        again = Model.load(moved / "model.onnx")
    finally:
        os.chdir(cwd)
    w = next(t for t in again.constants() if t.name == "w0").values
    np.testing.assert_array_equal(w, numpy_helper.to_array(proto.graph.initializer[0]))
    # saving the loaded model inline removes the stale data file
    again.save(moved / "model.onnx", external_data=False)
    assert not (moved / "model.onnx.data").exists()


def test_model_over_2gb_round_trips_through_external_data(tmp_path):
    """Three 784 MB weights: more than one protobuf can hold, so save must go external."""
    k = 14_000
    weights = [np.full((k, k), 1.0 / k, dtype=np.float32) for _ in range(3)] + [
        np.eye(k, 8, dtype=np.float32)
    ]
    model = Model.from_proto(_mlp(weights))
    del weights
    assert model.weight_nbytes() > PROTOBUF_LIMIT
    path = model.save(tmp_path / "big.onnx")
    del model
    assert (tmp_path / "big.onnx").stat().st_size < 1e6
    assert (tmp_path / "big.onnx.data").stat().st_size > 2**31
    loaded = Model.load(path)
    assert loaded.weight_nbytes() > PROTOBUF_LIMIT
    del loaded
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.ones((1, k), np.float32)})[0]
    np.testing.assert_allclose(y, np.ones((1, 8)), rtol=1e-4)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        Model.load(tmp_path / "nope.onnx")


def test_not_onnx(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n" * 10)
    with pytest.raises(ModelLoadError, match="notes.onnx"):
        Model.load(bad)


def test_empty_file(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        Model.load(tmp_path / "empty.onnx")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
def test_truncated_file(tmp_path, fraction):
    data = (FIXTURES / "llama_tiny.onnx").read_bytes()
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelLoadError, match="cut.onnx"):
        Model.load(bad)


def test_missing_external_data(tmp_path):
    model = Model.from_proto(_mlp([np.ones((64, 64), np.float32)]))
    path = model.save(tmp_path / "m.onnx", external_data=True)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match="m.onnx"):
        Model.load(path)


def test_copy_is_independent():
    model = Model.from_proto(_mlp([np.ones((4, 4), np.float32)]))
    clone = model.copy()
    clone.graph.nodes[0].name = "changed"
    assert model.graph.nodes[0].name == "mm0"
