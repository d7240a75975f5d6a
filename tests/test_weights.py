"""WeightRef: the canonical W[N, K] view of a weight for each op kind and chain, and masks written back."""

import numpy as np
import onnx
import pytest

import sparsegraph as sg
from sparsegraph.weights import find_weight

import graphs as g


def _ref(proto: onnx.ModelProto, node: str):
    model = sg.Model.from_proto(proto)
    return model, find_weight(model.graph, model.node(node))


def _dq_canonical(proto, layout):
    """Canonical W[N, K] of a `graphs.matmul_dequant` model, computed with numpy."""
    q, s, z = (g.initializer(proto, k) for k in "WSZ")
    if layout == "kn":
        return g.dequantize(q, s, z, axis=1).T
    if layout == "nk_dq_transpose":
        return g.dequantize(q, s, z, axis=0)
    return g.dequantize(q.T, s, z, axis=1).T


CANONICAL = {  # builder -> (node, numpy canonical W[N, K] from the stored initializers)
    "matmul": (g.matmul_chain, "mm0", lambda p: g.initializer(p, "W0").T),
    "gemm_transB1": (lambda: g.gemm(trans_b=1), "gemm", lambda p: g.initializer(p, "W")),
    "gemm_transB0": (lambda: g.gemm(trans_b=0, alpha=0.5), "gemm", lambda p: g.initializer(p, "W").T),
    "conv": (g.conv, "conv", lambda p: g.initializer(p, "W").reshape(4, -1)),
    "transpose": (g.matmul_transposed, "mm", lambda p: g.initializer(p, "W")),
    "cast_identity": (g.matmul_cast, "mm", lambda p: g.initializer(p, "W").astype(np.float32).T),
    "constant_node": (g.matmul_constant_node, "mm", lambda p: g.constant(p, "W").T),
    "embedding": (g.embedding, "embed", lambda p: g.initializer(p, "W")),
    **{
        f"dq_{'axis' if per_axis else 'tensor'}_{layout}": (
            lambda per_axis=per_axis, layout=layout: g.matmul_dequant(per_axis=per_axis, layout=layout),
            "mm",
            lambda p, layout=layout: _dq_canonical(p, layout),
        )
        for per_axis in (False, True)
        for layout in g.DQ_LAYOUTS
    },
}


@pytest.mark.parametrize("case", sorted(CANONICAL))
def test_matrix_is_canonical(case):
    build, node, expected = CANONICAL[case]
    proto = build()
    _, ref = _ref(proto, node)
    want = expected(proto)
    got = ref.matrix()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert ref.shape == want.shape
    assert ref.quantized == case.startswith("dq_")
    assert ref.kind == ("embedding" if case == "embedding" else ref.node.op)


def test_matrix_shape_is_outputs_by_reduction():
    for build, node, n, k in [
        (lambda: g.matmul_chain(dims=(8, 5)), "mm0", 5, 8),
        (lambda: g.gemm(k=8, n=5, trans_b=1), "gemm", 5, 8),
        (lambda: g.gemm(k=8, n=5, trans_b=0), "gemm", 5, 8),
        (lambda: g.conv(out_ch=5, in_ch=2, kh=3, kw=2), "conv", 5, 12),
        (lambda: g.matmul_transposed(k=8, n=5), "mm", 5, 8),
        (lambda: g.embedding(vocab=9, dim=4), "embed", 9, 4),
    ]:
        assert _ref(build(), node)[1].shape == (n, k)


@pytest.mark.parametrize(
    "build",
    [g.matmul_two_activations, g.matmul_constant_a, g.matmul_3d_weight],
    ids=["two_activations", "constant_a", "3d_weight"],
)
def test_find_weight_none(build):
    model, ref = _ref(build(), "mm")
    assert ref is None
    assert find_weight(model.graph, model.node("mm")) is None


def test_find_weight_none_for_gemm_transA_and_constant_ids():
    proto = g.gemm()
    proto.graph.node[0].attribute.append(onnx.helper.make_attribute("transA", 1))
    model = sg.Model.from_proto(proto)
    assert find_weight(model.graph, model.node("gemm")) is None
    proto = g.embedding()
    ids = onnx.numpy_helper.from_array(np.zeros((2, 5), np.int64), "ids")
    del proto.graph.input[:]
    proto.graph.initializer.append(ids)
    model = sg.Model.from_proto(proto)
    assert find_weight(model.graph, model.node("embed")) is None


# --------------------------------------------------------------------------- apply_mask
def _random_keep(shape, seed=0):
    return np.random.default_rng(seed).random(shape) < 0.5


def _stored_after(model, name):
    return g.initializer(model.to_proto(), name)


@pytest.mark.parametrize("case", sorted(CANONICAL))
def test_apply_mask_all_true_changes_nothing(case):
    build, node, _ = CANONICAL[case]
    proto = build()
    _, ref = _ref(proto, node)
    before = ref.stored().copy()
    ref.apply_mask(np.ones(ref.shape, bool))
    np.testing.assert_array_equal(ref.stored(), before)
    assert ref.stored().dtype == before.dtype


@pytest.mark.parametrize("case", sorted(CANONICAL))
def test_apply_mask_round_trips_through_export(case):
    build, node, expected = CANONICAL[case]
    proto = build()
    model, ref = _ref(proto, node)
    w = expected(proto)
    keep = _random_keep(w.shape)
    ref.apply_mask(keep)
    np.testing.assert_array_equal(ref.matrix(), np.where(keep, w, 0))
    out = model.to_proto()
    onnx.checker.check_model(out, full_check=True)
    _, ref2 = _ref(out, node)
    np.testing.assert_array_equal(ref2.matrix(), np.where(keep, w, 0))
    np.testing.assert_array_equal(ref2.matrix() != 0, keep & (w != 0))


@pytest.mark.parametrize("per_axis", [False, True], ids=["per_tensor", "per_axis"])
@pytest.mark.parametrize("layout", g.DQ_LAYOUTS)
def test_apply_mask_quantized_entries_become_zero_point(layout, per_axis):
    proto = g.matmul_dequant(k=8, n=6, per_axis=per_axis, layout=layout)
    q, z = g.initializer(proto, "W"), g.initializer(proto, "Z")
    model, ref = _ref(proto, "mm")
    keep = _random_keep(ref.shape, seed=3)
    ref.apply_mask(keep)
    stored_keep = keep.T if layout == "kn" else keep  # stored W is [K, N] or [N, K]
    zero = z if not per_axis else (z[None, :] if layout == "kn" else z[:, None])  # zero points run along N
    np.testing.assert_array_equal(_stored_after(model, "W"), np.where(stored_keep, q, zero))
    assert _stored_after(model, "W").dtype == np.int8


def test_apply_mask_writes_constant_node_as_initializer():
    proto = g.matmul_constant_node()
    model, ref = _ref(proto, "mm")
    w = ref.matrix()
    keep = _random_keep(w.shape)
    ref.apply_mask(keep)
    model.graph.cleanup()
    out = model.to_proto()
    assert [n.op_type for n in out.graph.node] == ["MatMul"]
    np.testing.assert_array_equal(g.initializer(out, "W"), np.where(keep, w, 0).T)


@pytest.mark.parametrize("build", [g.tied_matmuls, g.tied_through_transpose], ids=["tied", "tied_transpose"])
def test_apply_mask_on_shared_weight_copies_it(build):
    proto = build()
    model, ref_a = _ref(proto, "mm_a")
    ref_b = find_weight(model.graph, model.node("mm_b"))
    w = ref_a.matrix()
    keep = _random_keep(w.shape)
    ref_a.apply_mask(keep)
    np.testing.assert_array_equal(ref_a.matrix(), np.where(keep, w, 0))
    np.testing.assert_array_equal(ref_b.matrix(), w)
    np.testing.assert_array_equal(find_weight(model.graph, model.node("mm_b")).matrix(), w)
    out = model.to_proto()  # no cleanup or toposort needed: the copied chain sits before the op
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_array_equal(g.initializer(out, "W"), g.initializer(proto, "W"))  # original untouched
    # the copy is this op's alone: masking it again does not copy a second time
    n_init = len(out.graph.initializer)
    ref_a.apply_mask(np.ones_like(keep))
    assert len(model.to_proto().graph.initializer) == n_init


def test_apply_mask_rejects_wrong_shape():
    _, ref = _ref(g.matmul_chain(dims=(8, 6)), "mm0")
    with pytest.raises(ValueError, match="shape"):
        ref.apply_mask(np.ones((8, 6), bool))  # stored [K, N] layout, not canonical [N, K]
