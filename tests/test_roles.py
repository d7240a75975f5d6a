"""Structural role analysis on real transformer exports, checked against export-time labels.

The labels in tests/fixtures/*.roles.json come from the torch modules at export time;
the analysis never sees them, and still finds the same roles after every node and tensor
name in the graph is replaced by a meaningless one.
"""

import json

import numpy as np
import pytest

import sparsegraph as sg
from sparsegraph.passes.analysis.roles import Roles

from paths import FIXTURES, STORIES

MODELS = sorted(p.stem for p in FIXTURES.glob("*.onnx"))


def _truth(name):
    return json.loads((FIXTURES / f"{name}.roles.json").read_text())


def _found(model):
    roles = sg.PassContext().get(Roles, model)
    return roles


def test_all_fixture_families_are_present():
    assert {"bert_tiny", "gpt2_tiny", "llama_tiny"} <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_roles_match_export_labels(name):
    roles = _found(sg.Model.load(FIXTURES / f"{name}.onnx"))
    for entry in _truth(name):
        got = roles.get(entry["node"])
        expected = (entry["role"], entry["layer"])
        assert ((got.role, got.layer) if got else ("other", None)) == expected, entry["node"]


@pytest.mark.parametrize("name", MODELS)
def test_roles_do_not_depend_on_names(name):
    model = sg.Model.load(FIXTURES / f"{name}.onnx")
    truth = {e["node"]: (e["role"], e["layer"]) for e in _truth(name)}
    rng = np.random.default_rng(0)
    renamed = {}
    for i in rng.permutation(len(model.graph.nodes)):
        node = model.graph.nodes[i]
        renamed[f"x{i}"] = node.name
        node.name = f"x{i}"
    for j, tensor in enumerate(model.graph.tensors().values()):
        tensor.name = f"t{j}"
    roles = _found(model)
    for new, old in renamed.items():
        if old in truth:
            got = roles.get(new)
            assert ((got.role, got.layer) if got else ("other", None)) == truth[old], old


def test_attention_blocks_and_residual_stream_on_llama():
    roles = _found(sg.Model.load(FIXTURES / "llama_tiny.onnx"))
    assert [b.layer for b in roles.attention] == [0, 1]
    assert all(len(b.q) == len(b.k) == len(b.v) == len(b.o) == 1 for b in roles.attention)
    assert len(roles.residual_adds) == 4  # attention and FFN residual per layer
    assert roles.num_layers == 2


def test_stories260k_roles():
    roles = _found(sg.Model.load(STORIES))
    counts = {}
    for r in roles.roles.values():
        counts[r.role] = counts.get(r.role, 0) + 1
    assert counts == {
        "embed": 1,
        "lm_head": 1,
        **{r: 5 for r in ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate", "ffn.up", "ffn.down")},
    }
    layers = sorted(r.layer for r in roles.roles.values() if r.role == "ffn.down")
    assert layers == [0, 1, 2, 3, 4]


def test_model_without_attention_reports_it():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["a"]),
            helper.make_node("MatMul", ["a", "w2"], ["y0"]),
            helper.make_node("Add", ["x", "y0"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [w1, w2],
    )
    model = sg.Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    roles = _found(model)
    assert sorted(r.role for r in roles.roles.values()) == ["ffn.down", "ffn.up"]
    assert any("no attention" in n for n in roles.notes)
