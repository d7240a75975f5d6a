"""sparse.onnx: SparseMatMul nodes with packed weights, and the lossless way back."""

import numpy as np
import onnx
import pytest

import sparsegraph as sg
from sparsegraph.codegen import sparse_onnx
from sparsegraph.validate import run

from paths import FIXTURES, STORIES


def _pruned(path, recipe, tmp_path):
    return sg.compile_model(path, recipe, tmp_path / "c", validate=False).portable


@pytest.mark.parametrize(
    "path, recipe",
    [
        (STORIES, {"steps": [{"pass": "magnitude", "sparsity": 0.7}]}),
        (STORIES, {"steps": [{"pass": "nm", "n": 2, "m": 4}]}),
        (FIXTURES / "gpt2_tiny.onnx", {"steps": [{"pass": "block", "sparsity": 0.8, "block": [16, 1]}]}),
        (
            FIXTURES / "bert_tiny.onnx",
            {"steps": [{"pass": "magnitude", "sparsity": 0.9, "targets": ["op:Gemm", "role:ffn.*"]}]},
        ),
    ],
)
def test_round_trip_is_lossless(tmp_path, path, recipe):
    portable = _pruned(path, recipe, tmp_path)
    model = sg.Model.load(portable)
    changes = sparse_onnx.to_sparse(model)
    assert changes and all(c.detail["bytes_sparse"] < c.detail["bytes_dense"] for c in changes)
    sparse_path = model.save(tmp_path / "sparse.onnx")
    onnx.checker.check_model(str(sparse_path))  # the registered schema validates the custom op
    assert sparse_path.stat().st_size < portable.stat().st_size
    back = sg.Model.load(sparse_path)
    assert sparse_onnx.to_portable(back) == len(changes)
    restored = back.save(tmp_path / "restored.onnx")
    original = {t.name: t.values for t in sg.Model.load(portable).constants()}
    for t in sg.Model.load(restored).constants():
        np.testing.assert_array_equal(t.values, original[t.name])
    from sparsegraph.feeds import random_feeds

    feeds = random_feeds(sg.Model.load(portable), seed=1)
    a, b = run(portable, feeds), run(restored, feeds)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_formats_can_be_chosen_per_op(tmp_path):
    portable = _pruned(STORIES, {"steps": [{"pass": "nm", "n": 2, "m": 4}]}, tmp_path)
    model = sg.Model.load(portable)
    first = next(c for c in sparse_onnx.to_sparse(sg.Model.load(portable)))
    changes = sparse_onnx.to_sparse(model, formats={first.op: ("csr", {"pad": 8})})
    chosen = {c.op: c.detail["format"] for c in changes}
    assert chosen[first.op] == "csr" and set(chosen.values()) >= {"nm"}


def test_dense_weights_stay_dense():
    model = sg.Model.load(STORIES)
    assert sparse_onnx.to_sparse(model) == []
    assert not any(n.op == "SparseMatMul" for n in model.graph.nodes)
