"""Rewrite passes: exact masks of each technique's math, their properties, and the passes on
hand-built graphs (stored weights, onnx.checker, onnxruntime against numpy), plus errors."""

import math

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import sparsegraph as sg
from sparsegraph.passes.rewrite.block import block_mask, global_block_masks
from sparsegraph.passes.rewrite.lowrank import choose_rank, low_rank_factors, lowers_cost
from sparsegraph.passes.rewrite.magnitude import global_magnitude_masks, magnitude_mask
from sparsegraph.passes.rewrite.nm import nm_mask
from sparsegraph.passes.rewrite.targeted import prune_lowest
from sparsegraph.passes.rewrite.topk import topk_mask

import graphs as g


def _mask(rows) -> np.ndarray:
    """Bool mask from rows of 0/1."""
    return np.array(rows, dtype=bool)


def _f32(rows) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


# ============================================================== exact masks, by hand
def test_magnitude_tensor():
    w = _f32([[1, -4, 2], [-3, 0.5, 6]])
    np.testing.assert_array_equal(magnitude_mask(w, 0.5), _mask([[0, 1, 0], [1, 0, 1]]))
    np.testing.assert_array_equal(magnitude_mask(w, 0.0), np.ones_like(w, bool))
    np.testing.assert_array_equal(magnitude_mask(w, 0.99), _mask([[0, 0, 0], [0, 0, 1]]))  # floor(5.94)


def test_magnitude_tensor_ties_broken_by_position():
    w = _f32([[1, -1, 2], [1, 3, -2]])
    # floor(0.34 * 6) = 2 of the three |w| = 1 go: the two earliest in row-major order
    np.testing.assert_array_equal(magnitude_mask(w, 0.34), _mask([[0, 0, 1], [1, 1, 1]]))
    np.testing.assert_array_equal(magnitude_mask(w, 0.5), _mask([[0, 0, 1], [0, 1, 1]]))
    # |2| and |-2| tie too: the earlier one goes
    np.testing.assert_array_equal(magnitude_mask(w, 0.67), _mask([[0, 0, 0], [0, 1, 1]]))


def test_magnitude_row():
    w = _f32([[3, 1, 2, 4], [1, 1, 5, 1], [0, -9, 0, 8]])
    np.testing.assert_array_equal(
        magnitude_mask(w, 0.5, "row"), _mask([[1, 0, 0, 1], [0, 0, 1, 1], [0, 1, 0, 1]])
    )
    # floor(0.3 * 4) = 1 per row
    np.testing.assert_array_equal(
        magnitude_mask(w, 0.3, "row"), _mask([[1, 0, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]])
    )


def test_magnitude_global_one_threshold_across_tensors():
    a, b = _f32([[1, 5]]), _f32([[2], [0.5]])
    ka, kb = global_magnitude_masks([a, b], 0.5)
    np.testing.assert_array_equal(ka, _mask([[0, 1]]))
    np.testing.assert_array_equal(kb, _mask([[1], [0]]))
    # a tie across tensors: the entry of the earlier tensor goes first
    a, b = _f32([[2, 5]]), _f32([[2], [1]])
    ka, kb = global_magnitude_masks([a, b], 0.5)
    np.testing.assert_array_equal(ka, _mask([[0, 1]]))
    np.testing.assert_array_equal(kb, _mask([[1], [0]]))
    # one tensor holding all the small weights loses them all
    a, b = _f32([[0.1, 0.2], [0.3, 0.4]]), _f32([[5, 6], [7, 8]])
    ka, kb = global_magnitude_masks([a, b], 0.5)
    assert not ka.any() and kb.all()
    assert global_magnitude_masks([], 0.5) == [] and global_block_masks([], (2, 2), 0.5) == []


def test_topk_row_and_tensor():
    w = _f32([[3, 1, 2, 4], [1, 1, 5, 1]])
    np.testing.assert_array_equal(topk_mask(w, 1), _mask([[0, 0, 0, 1], [0, 0, 1, 0]]))
    np.testing.assert_array_equal(topk_mask(w, 3), _mask([[1, 0, 1, 1], [0, 1, 1, 1]]))  # tie: first goes
    np.testing.assert_array_equal(topk_mask(w, 4), np.ones_like(w, bool))
    np.testing.assert_array_equal(topk_mask(w, 2, "tensor"), _mask([[0, 0, 0, 1], [0, 0, 1, 0]]))
    np.testing.assert_array_equal(topk_mask(w, 3, "tensor"), _mask([[1, 0, 0, 1], [0, 0, 1, 0]]))
    for k, gran in [(0, "row"), (5, "row"), (9, "tensor")]:
        with pytest.raises(ValueError, match=f"k={k}"):
            topk_mask(w, k, gran)


@pytest.mark.parametrize(
    "n, m, w, expected",
    [
        (2, 4, [[1, -5, 3, 2, 0.1, 0.2, -0.3, 0.4]], [[0, 1, 1, 0, 0, 0, 1, 1]]),
        (
            4,
            8,
            [[8, 1, 7, 2, 6, 3, 5, 4], [-1, -2, -3, -4, -5, -6, -7, -8]],
            [[1, 0, 1, 0, 1, 0, 1, 0], [0] * 4 + [1] * 4],
        ),
        (1, 4, [[1, 2, 3, 4], [4, 3, 2, 1], [0, 0, -1, 0]], [[0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 1, 0]]),
        (2, 4, [[1, 1, 1, 1]], [[0, 0, 1, 1]]),  # ties: the earlier entries go
        (2, 4, [[1, 2, 3, 4, 5, 6]], [[0, 0, 1, 1, 1, 1]]),  # K = 6: the last group of 2 keeps both
        (2, 4, [[1, 2, 3, 4, 9, 1, 5]], [[0, 0, 1, 1, 1, 0, 1]]),  # K = 7: last group of 3 keeps 2
        (1, 4, [[1, 2, 3, 4, 0.5]], [[0, 0, 0, 1, 1]]),  # K = 5: last group of 1 keeps it
        (2, 4, [[3, -1, 2]], [[1, 0, 1]]),  # K < M: one short group
        (3, 3, [[1, 2, 3]], [[1, 1, 1]]),  # N = M keeps everything
    ],
    ids=["2:4", "4:8", "1:4", "2:4-ties", "2:4-K6", "2:4-K7", "1:4-K5", "2:4-K3", "3:3"],
)
def test_nm_exact(n, m, w, expected):
    keep = nm_mask(_f32(w), n, m)
    np.testing.assert_array_equal(keep, _mask(expected))


def test_nm_custom_scores_and_errors():
    w = _f32([[1, 2, 3, 4]])
    np.testing.assert_array_equal(nm_mask(w, 2, 4, scores=_f32([[4, 3, 2, 1]])), _mask([[1, 1, 0, 0]]))
    for n, m in [(5, 4), (0, 4), (-1, 4)]:
        with pytest.raises(ValueError, match="N:M"):
            nm_mask(w, n, m)


def test_block_2x2():
    w = _f32([[1, 1, 0, 0], [1, 1, 0, 0], [3, 0, 0.5, 0], [0, 0, 0, 0.5]])
    # block norms [[2, 0], [3, 0.71]]: the two smallest go
    expected = _mask([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(block_mask(w, (2, 2), 0.5), expected)
    np.testing.assert_array_equal(block_mask(w, (2, 2), 0.0), np.ones_like(w, bool))


def test_block_2x2_edge_blocks():
    w = _f32([[1, 1, 5], [1, 1, 5], [2, 2, 0.1]])
    # blocks 2x2, 2x1, 1x2, 1x1 with norms 2, 7.07, 2.83, 0.1: the 1x1 and the 2x2 go
    np.testing.assert_array_equal(block_mask(w, (2, 2), 0.5), _mask([[0, 0, 1], [0, 0, 1], [1, 1, 0]]))


def test_block_4x4_edge_blocks():
    w = np.ones((6, 5), np.float32)  # block norms [[4, 2], [2.83, 1.41]]
    expected = np.ones((6, 5), bool)
    expected[4:, 4:] = False
    np.testing.assert_array_equal(block_mask(w, (4, 4), 0.25), expected)
    expected[:, 4] = False
    np.testing.assert_array_equal(block_mask(w, (4, 4), 0.5), expected)
    expected[4:, :] = False
    np.testing.assert_array_equal(block_mask(w, (4, 4), 0.75), expected)
    # rectangular blocks: r outputs (rows) x c inputs (columns)
    w = _f32([[1, 1, 9, 9], [1, 1, 9, 9]])
    np.testing.assert_array_equal(block_mask(w, (2, 1), 0.5), _mask([[0, 0, 1, 1], [0, 0, 1, 1]]))
    np.testing.assert_array_equal(block_mask(w, (1, 2), 0.5), _mask([[0, 0, 1, 1], [0, 0, 1, 1]]))


def test_block_global():
    a = np.ones((2, 2), np.float32)  # one block, norm 2
    b = _f32([[3, 3, 0.1, 0.1], [3, 3, 0.1, 0.1]])  # blocks of norm 6 and 0.2
    ka, kb = global_block_masks([a, b], (2, 2), 0.5)  # floor(1.5) = 1 block goes
    assert ka.all()
    np.testing.assert_array_equal(kb, _mask([[1, 1, 0, 0], [1, 1, 0, 0]]))
    ka, kb = global_block_masks([a, b], (2, 2), 0.67)  # floor(2.01) = 2 blocks go
    assert not ka.any()
    np.testing.assert_array_equal(kb, _mask([[1, 1, 0, 0], [1, 1, 0, 0]]))


def test_negative_or_excessive_counts_are_errors():
    w = _f32([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match="cannot drop"):
        magnitude_mask(w, -0.1)
    with pytest.raises(ValueError, match="cannot drop"):
        magnitude_mask(w, -0.1, "row")
    with pytest.raises(ValueError, match="cannot drop"):
        block_mask(w, (1, 1), -0.2)
    with pytest.raises(ValueError, match="cannot drop"):
        prune_lowest(w, 7)
    with pytest.raises(ValueError, match="cannot drop"):
        prune_lowest(w, 4, axis=1)
    assert not prune_lowest(w, 6).any() and not prune_lowest(w, 3, axis=1).any()


# ------------------------------------------------------------------------- lowrank math
def test_choose_rank_rank_ratio():
    s = np.ones(6)
    assert choose_rank(s, (8, 6), rank_ratio=0.5) == 3
    assert choose_rank(s, (6, 8), rank_ratio=1.0) == 6
    assert choose_rank(s, (8, 6), rank_ratio=0.01) == 1  # at least 1
    assert choose_rank(s, (8, 6), rank_ratio=0.7) == 4  # round(4.2)


def test_choose_rank_param_ratio():
    s = np.ones(8)
    assert choose_rank(s, (8, 8), param_ratio=0.5) == 2  # 2 * 16 <= 32 < 3 * 16
    assert choose_rank(s, (10, 6), param_ratio=0.5) == 1  # 1.875
    assert choose_rank(s, (10, 6), param_ratio=0.01) == 1  # at least 1
    # exact boundary that floats miss: 2 * (24 + 30) == 0.15 * 24 * 30 == 108
    assert choose_rank(np.ones(24), (24, 30), param_ratio=0.15) == 2
    for n, k, p in [(24, 30, 0.15), (20, 25, 0.18), (7, 9, 0.37), (16, 12, 0.5)]:
        r = choose_rank(np.ones(min(n, k)), (n, k), param_ratio=p)
        assert r * (n + k) <= round(p * n * k, 9) < (r + 1) * (n + k) or r == 1
        assert lowers_cost((n, k), r)


def test_choose_rank_energy():
    s = np.array([3.0, 2.0, 1.0, 0.0])  # s^2 = 9, 4, 1, 0: cumulative 9/14, 13/14, 1, 1
    assert choose_rank(s, (4, 4), energy=0.5) == 1
    assert choose_rank(s, (4, 4), energy=9 / 14) == 1  # exactly reached
    assert choose_rank(s, (4, 4), energy=0.65) == 2
    assert choose_rank(s, (4, 4), energy=13 / 14) == 2
    assert choose_rank(s, (4, 4), energy=0.95) == 3
    assert choose_rank(s, (4, 4), energy=1.0) == 3  # the zero singular value is not needed
    assert choose_rank(np.zeros(4), (4, 4), energy=0.9) == 1


def test_low_rank_factors_reach_the_eckart_young_optimum():
    w = np.random.default_rng(0).standard_normal((7, 5))
    s = np.linalg.svd(w, compute_uv=False)
    for rank in range(1, 6):
        a, b = low_rank_factors(w, rank)
        assert a.shape == (7, rank) and b.shape == (rank, 5)
        assert np.linalg.matrix_rank(a @ b) == rank
        err = np.linalg.norm(w - a @ b) / np.linalg.norm(w)
        optimum = np.sqrt(np.sum(s[rank:] ** 2)) / np.linalg.norm(w)
        np.testing.assert_allclose(err, optimum, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1))  # sqrt(s) each
    a, b = low_rank_factors(w.astype(np.float32), 2)
    assert a.dtype == b.dtype == np.float32


def test_lowers_cost():
    assert lowers_cost((16, 12), 6)  # 6 * 28 = 168 < 192
    assert not lowers_cost((16, 12), 7)  # 196
    assert not lowers_cost((4, 4), 2)  # 16 == 16: no gain


# ================================================================== properties (hypothesis)
PROPS = settings(max_examples=60, deadline=None, derandomize=True, database=None)

_elements = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, 2.0]),  # ties and zeros
    st.floats(-4, 4, width=32, allow_subnormal=False),
)


@st.composite
def matrices(draw, max_side=10):
    """float32 matrices with ties and zeros."""
    shape = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    return draw(hnp.arrays(np.float32, shape, elements=_elements))


@st.composite
def distinct_matrices(draw, max_side=10):
    """float32 matrices whose |w| are distinct and non-zero."""
    rows, cols = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mags = rng.permutation(rows * cols) + 1.0
    signs = rng.choice([-1.0, 1.0], size=rows * cols)
    return (mags * signs / 8).reshape(rows, cols).astype(np.float32)


_NM = st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8), (3, 5), (2, 2)])


def _check_nm(w, keep, n, m, exact):
    a = np.abs(w)
    for start in range(0, w.shape[1], m):
        kg, ag = keep[:, start : start + m], a[:, start : start + m]
        counts = kg.sum(axis=1)
        assert (counts <= n).all()
        if exact:
            assert (counts == min(n, kg.shape[1])).all()
        for row_keep, row_abs in zip(kg, ag, strict=True):
            if row_keep.any() and not row_keep.all():
                assert row_abs[row_keep].min() >= row_abs[~row_keep].max()


@PROPS
@given(w=matrices(), nm=_NM)
def test_nm_mask_properties(w, nm):
    n, m = nm
    keep = nm_mask(w, n, m)
    assert keep.shape == w.shape and keep.dtype == bool
    _check_nm(w, keep, n, m, exact=False)


@PROPS
@given(w=distinct_matrices(), nm=_NM)
def test_nm_mask_keeps_exactly_n_without_ties(w, nm):
    n, m = nm
    _check_nm(w, nm_mask(w, n, m), n, m, exact=True)


@PROPS
@given(
    w=matrices(),
    block=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    sparsity=st.floats(0, 0.99),
)
def test_block_mask_properties(w, block, sparsity):
    keep = block_mask(w, block, sparsity)
    assert keep.shape == w.shape
    r, c = block
    kept, dropped = [], []
    for i in range(0, w.shape[0], r):
        for j in range(0, w.shape[1], c):
            kb = keep[i : i + r, j : j + c]
            assert kb.all() or not kb.any()  # constant on each block (edge blocks included)
            norm = float(np.sqrt(np.sum(w[i : i + r, j : j + c].astype(np.float64) ** 2)))
            (kept if kb[0, 0] else dropped).append(norm)
    assert len(dropped) == math.floor(sparsity * (len(kept) + len(dropped)))
    if kept and dropped:
        assert min(kept) >= max(dropped) * (1 - 1e-5)


@PROPS
@given(w=matrices(), sparsity=st.floats(0, 0.99))
def test_magnitude_mask_properties(w, sparsity):
    a = np.abs(w)
    keep = magnitude_mask(w, sparsity)
    assert (~keep).sum() == math.floor(sparsity * w.size)
    if keep.any() and not keep.all():
        assert a[keep].min() >= a[~keep].max()
    keep = magnitude_mask(w, sparsity, "row")
    assert ((~keep).sum(axis=1) == math.floor(sparsity * w.shape[1])).all()
    for row_keep, row_abs in zip(keep, a, strict=True):
        if row_keep.any() and not row_keep.all():
            assert row_abs[row_keep].min() >= row_abs[~row_keep].max()


# ============================================================ passes on hand-built graphs
def _run(proto: onnx.ModelProto, name: str, seed: int = 0, **params):
    """Run one pass; returns the rewritten (checker-valid) proto and the context."""
    model = sg.Model.from_proto(proto)
    ctx = sg.PassManager([sg.get_pass(name)(**params)], seed=seed).run(model)
    out = model.to_proto()
    onnx.checker.check_model(out, full_check=True)
    return out, ctx


# layouts: how a stored initializer maps to the canonical W[N, K] and back
TO_CANON = {"kn": lambda w: w.T, "nk": lambda w: w, "conv": lambda w: w.reshape(w.shape[0], -1)}
FROM_CANON = {"kn": lambda c, shape: c.T, "nk": lambda c, shape: c, "conv": lambda c, shape: c.reshape(shape)}


def _f64(x):
    return np.asarray(x, np.float64)


def _chain_ref(w, x):
    return _f64(x) @ _f64(w["W0"]) @ _f64(w["W1"])


def _gemm_ref(trans_b, alpha, beta):
    def ref(w, x):
        b = _f64(w["W"]).T if trans_b else _f64(w["W"])
        return alpha * _f64(x) @ b + beta * _f64(w["C"])

    return ref


GRAPHS = {  # name -> (builder, {initializer: layout}, numpy reference(weights, X))
    "matmul": (lambda: g.matmul_chain(dims=(8, 12, 6)), {"W0": "kn", "W1": "kn"}, _chain_ref),
    "gemm_transB1": (lambda: g.gemm(k=8, n=6, trans_b=1), {"W": "nk"}, _gemm_ref(1, 1.0, 1.0)),
    "gemm_transB0": (
        lambda: g.gemm(k=8, n=6, trans_b=0, alpha=0.5, beta=2.0, bias_shape="full"),
        {"W": "kn"},
        _gemm_ref(0, 0.5, 2.0),
    ),
    "conv": (g.conv, {"W": "conv"}, lambda w, x: g.conv_reference(x, w["W"], w["B"])),
}

PASSES = {  # name -> (pass, params, canonical weights -> keep-masks)
    "magnitude": ("magnitude", {"sparsity": 0.5}, lambda ws: [magnitude_mask(w, 0.5) for w in ws]),
    "magnitude_row": (
        "magnitude",
        {"sparsity": 0.4, "granularity": "row"},
        lambda ws: [magnitude_mask(w, 0.4, "row") for w in ws],
    ),
    "magnitude_global": (
        "magnitude",
        {"sparsity": 0.6, "granularity": "global"},
        lambda ws: global_magnitude_masks(ws, 0.6),
    ),
    "topk": ("topk", {"k": 3}, lambda ws: [topk_mask(w, 3) for w in ws]),
    "nm_2_4": ("nm", {"n": 2, "m": 4}, lambda ws: [nm_mask(w, 2, 4) for w in ws]),
    "nm_1_4": ("nm", {"n": 1, "m": 4}, lambda ws: [nm_mask(w, 1, 4) for w in ws]),
    "block": (
        "block",
        {"sparsity": 0.5, "block": [2, 2]},
        lambda ws: [block_mask(w, (2, 2), 0.5) for w in ws],
    ),
    "block_global": (
        "block",
        {"sparsity": 0.5, "block": [2, 4], "granularity": "global"},
        lambda ws: global_block_masks(ws, (2, 4), 0.5),
    ),
}


def _assert_close(got, want):
    want = _f64(want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("graph", sorted(GRAPHS))
@pytest.mark.parametrize("technique", sorted(PASSES))
def test_mask_pass_on_graph(technique, graph):
    build, layouts, reference = GRAPHS[graph]
    name, params, masks_of = PASSES[technique]
    proto = build()
    stored = {k: g.initializer(proto, k) for k in layouts}
    masks = masks_of([TO_CANON[layouts[k]](v) for k, v in stored.items()])
    expected = {
        k: v * FROM_CANON[layouts[k]](keep, v.shape)
        for (k, v), keep in zip(stored.items(), masks, strict=True)
    }
    out, ctx = _run(proto, name, targets=["op:*"], **params)
    for k, want in expected.items():
        got = g.initializer(out, k)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    weights = {t.name: g.initializer(out, t.name) for t in out.graph.initializer}
    feeds = g.random_input(out)
    _assert_close(g.run_ort(out, feeds)[0], reference(weights, feeds["X"]))
    ((_, result, _),) = ctx.history
    assert result.modified and [c.action for c in result.changes] == [name] * len(layouts)
    for change, keep in zip(result.changes, masks, strict=True):
        assert change.detail["shape"] == list(keep.shape)
        assert change.detail["sparsity_after"] == pytest.approx(1 - keep.mean())


def test_mask_pass_leaves_untargeted_ops_and_biases_alone():
    proto = g.matmul_chain(dims=(8, 12, 6))
    out, ctx = _run(proto, "magnitude", sparsity=0.5, targets=["name:mm1"])
    np.testing.assert_array_equal(g.initializer(out, "W0"), g.initializer(proto, "W0"))
    assert (g.initializer(out, "W1") == 0).mean() == 0.5
    proto = g.gemm()
    out, _ = _run(proto, "magnitude", sparsity=0.5, targets=["op:Gemm"])
    np.testing.assert_array_equal(g.initializer(out, "C"), g.initializer(proto, "C"))
    out, ctx = _run(proto, "magnitude", sparsity=0.5, targets=["op:Gemm"], ignore=["name:gemm"])
    np.testing.assert_array_equal(g.initializer(out, "W"), g.initializer(proto, "W"))
    assert not ctx.history[0][1].modified


@pytest.mark.parametrize("technique", ["magnitude", "nm_2_4", "block"])
def test_mask_pass_through_transpose(technique):
    name, params, masks_of = PASSES[technique]
    proto = g.matmul_transposed(k=8, n=6)
    w = g.initializer(proto, "W")  # [N, K]: already canonical
    (keep,) = masks_of([w])
    out, _ = _run(proto, name, targets=["op:MatMul"], **params)
    np.testing.assert_array_equal(g.initializer(out, "W"), w * keep)
    assert [n.op_type for n in out.graph.node] == ["Transpose", "MatMul"]
    feeds = g.random_input(out)
    _assert_close(g.run_ort(out, feeds)[0], _f64(feeds["X"]) @ _f64(w * keep).T)


@pytest.mark.parametrize("technique", ["magnitude", "nm_2_4", "block"])
def test_mask_pass_through_fp16_cast(technique):
    name, params, masks_of = PASSES[technique]
    proto = g.matmul_cast(k=8, n=6)
    w16 = g.initializer(proto, "W")  # fp16 [K, N]
    (keep,) = masks_of([w16.astype(np.float32).T])
    out, _ = _run(proto, name, targets=["op:MatMul"], **params)
    got = g.initializer(out, "W")
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, w16 * keep.T)
    feeds = g.random_input(out)
    _assert_close(g.run_ort(out, feeds)[0], _f64(feeds["X"]) @ _f64(got))


def _dq_canonical(q, s, z, layout):
    if layout == "kn":
        return g.dequantize(q, s, z, axis=1).T
    if layout == "nk_dq_transpose":
        return g.dequantize(q, s, z, axis=0)
    return g.dequantize(q.T, s, z, axis=1).T


@pytest.mark.parametrize("technique", ["magnitude", "nm_2_4", "block"])
@pytest.mark.parametrize("per_axis", [False, True], ids=["per_tensor", "per_axis"])
@pytest.mark.parametrize("layout", g.DQ_LAYOUTS)
def test_mask_pass_through_dequantize(layout, per_axis, technique):
    name, params, masks_of = PASSES[technique]
    proto = g.matmul_dequant(k=8, n=6, per_axis=per_axis, layout=layout)
    q, s, z = (g.initializer(proto, k) for k in "WSZ")
    (keep,) = masks_of([_dq_canonical(q, s, z, layout)])
    out, _ = _run(proto, name, targets=["op:MatMul"], **params)
    stored_keep = keep.T if layout == "kn" else keep
    zero = z if not per_axis else (z[None, :] if layout == "kn" else z[:, None])  # along N
    got = g.initializer(out, "W")
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, np.where(stored_keep, q, zero))  # pruned -> zero point
    assert (_dq_canonical(got, s, z, layout)[~keep] == 0).all()
    np.testing.assert_array_equal(g.initializer(out, "S"), s)
    np.testing.assert_array_equal(g.initializer(out, "Z"), z)
    feeds = g.random_input(out)
    _assert_close(g.run_ort(out, feeds)[0], _f64(feeds["X"]) @ _f64(_dq_canonical(got, s, z, layout)).T)


@pytest.mark.parametrize("build", [g.tied_matmuls, g.tied_through_transpose], ids=["tied", "tied_transpose"])
def test_pruning_one_user_of_a_shared_weight_leaves_the_other_alone(build):
    proto = build()
    w = g.initializer(proto, "W")
    transposed = build is g.tied_through_transpose
    canon = w if transposed else w.T
    keep = magnitude_mask(canon, 0.5)
    out, _ = _run(proto, "magnitude", sparsity=0.5, targets=["name:mm_b"])
    np.testing.assert_array_equal(g.initializer(out, "W"), w)  # mm_a still reads the original
    nodes = {n.name: n for n in out.graph.node}
    a_weight = nodes["mm_a"].input[1]
    b_weight = nodes["mm_b"].input[1]
    assert a_weight != b_weight
    private = [t.name for t in out.graph.initializer if t.name != "W"]
    assert len(private) == 1
    wb = g.initializer(out, private[0])
    np.testing.assert_array_equal(wb, w * (keep if transposed else keep.T))
    feeds = g.random_input(out)
    x = _f64(feeds["X"])
    wk, wbk = (_f64(w).T, _f64(wb).T) if transposed else (_f64(w), _f64(wb))
    _assert_close(g.run_ort(out, feeds)[0], x @ wk + np.maximum(x, 0) @ wbk)


def test_pruning_every_user_of_a_shared_weight():
    proto = g.tied_matmuls()
    w = g.initializer(proto, "W")
    keep = magnitude_mask(w.T, 0.5).T
    out, _ = _run(proto, "magnitude", sparsity=0.5, targets=["op:MatMul"])
    nodes = {n.name: n for n in out.graph.node}
    for op in ("mm_a", "mm_b"):
        np.testing.assert_array_equal(g.initializer(out, nodes[op].input[1]), w * keep)
    feeds = g.random_input(out)
    x, wk = _f64(feeds["X"]), _f64(w * keep)
    _assert_close(g.run_ort(out, feeds)[0], x @ wk + np.maximum(x, 0) @ wk)


def test_magnitude_on_an_embedding_table():
    proto = g.embedding(vocab=10, dim=4)
    w = g.initializer(proto, "W")
    keep = magnitude_mask(w, 0.5, "row")
    out, _ = _run(proto, "magnitude", sparsity=0.5, granularity="row", targets=["op:Gather"])
    np.testing.assert_array_equal(g.initializer(out, "W"), w * keep)
    feeds = g.random_input(out)
    np.testing.assert_array_equal(g.run_ort(out, feeds)[0], (w * keep)[feeds["ids"]])


def test_default_targets_leave_embeddings_alone():
    proto = g.embedding()
    out, ctx = _run(proto, "magnitude", sparsity=0.5)  # no targets: linear ops only
    np.testing.assert_array_equal(g.initializer(out, "W"), g.initializer(proto, "W"))
    assert not ctx.history[0][1].modified


# ---------------------------------------------------------------------------------- lowrank
def _lowrank_reference(proto, weight, rank):
    """numpy output of the op `X @ (A @ B).T` (Gemm: with alpha, beta and C) for the rank-r factors."""
    node = proto.graph.node[-1]
    w = g.initializer(proto, weight)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    canon = w if node.op_type == "Gemm" and attrs.get("transB", 0) else w.T
    a, b = low_rank_factors(canon, rank)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    has_c = node.op_type == "Gemm" and len(node.input) > 2
    c = _f64(g.initializer(proto, "C")) if has_c else 0.0

    def ref(x):
        return alpha * _f64(x) @ (_f64(a) @ _f64(b)).T + beta * c

    return ref, canon


LOWRANK_GRAPHS = {  # name -> (builder, weight initializer); every W is 12 outputs x 16 inputs
    "matmul": (lambda: g.matmul_chain(dims=(16, 12)), "W0"),
    "gemm_transB1_bias": (lambda: g.gemm(k=16, n=12, trans_b=1), "W"),
    "gemm_transB0_alpha_beta": (
        lambda: g.gemm(k=16, n=12, trans_b=0, alpha=0.5, beta=2.0, bias_shape="full"),
        "W",
    ),
    "gemm_alpha_no_bias": (lambda: g.gemm(k=16, n=12, trans_b=0, alpha=-1.5, bias=False), "W"),
    "gemm_beta_zero": (lambda: g.gemm(k=16, n=12, trans_b=1, beta=0.0), "W"),
}


@pytest.mark.parametrize("graph", sorted(LOWRANK_GRAPHS))
def test_lowrank_on_graph(graph):
    build, weight = LOWRANK_GRAPHS[graph]
    proto = build()
    ref, canon = _lowrank_reference(proto, weight, 3)
    out, ctx = _run(proto, "lowrank", rank_ratio=0.25, targets=["op:*"])  # round(0.25 * 12) = 3
    assert set(n.op_type for n in out.graph.node) <= {"MatMul", "Mul", "Add"}
    assert [n.op_type for n in out.graph.node].count("MatMul") == 2
    assert g.num_weights(out) < g.num_weights(proto)
    feeds = g.random_input(out)
    want = ref(feeds["X"])
    np.testing.assert_allclose(g.run_ort(out, feeds)[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    ((_, result, _),) = ctx.history
    (change,) = result.changes
    assert result.modified and change.action == "lowrank"
    assert change.detail["rank"] == 3 and change.detail["shape"] == [12, 16]
    assert change.detail["params_before"] == 192 and change.detail["params_after"] == 3 * (12 + 16)
    s = np.linalg.svd(canon.astype(np.float64), compute_uv=False)
    optimum = np.sqrt(np.sum(s[3:] ** 2) / np.sum(s**2))
    assert change.detail["relative_error"] == pytest.approx(optimum, rel=1e-5)


@pytest.mark.parametrize(
    "params, rank", [({"param_ratio": 0.5}, 3), ({"energy": 1.0}, 12), ({"rank_ratio": 0.5}, 6)]
)
def test_lowrank_rules_through_the_pass(params, rank):
    # 16 x 12: param_ratio 0.5 -> floor(96 / 28) = 3; energy 1.0 -> full rank 12 (skipped); 6 * 28 < 192
    _, ctx = _run(g.gemm(k=16, n=12), "lowrank", targets=["op:Gemm"], **params)
    (change,) = ctx.history[0][1].changes
    assert change.detail["rank"] == rank
    assert change.action == ("lowrank" if lowers_cost((12, 16), rank) else "skipped")


def test_lowrank_rank_too_high_leaves_op_untouched():
    proto = g.gemm(k=16, n=12)
    out, ctx = _run(proto, "lowrank", rank_ratio=1.0, targets=["op:Gemm"])
    ((_, result, _),) = ctx.history
    assert not result.modified
    assert [(c.op, c.action, c.detail["rank"]) for c in result.changes] == [("gemm", "skipped", 12)]
    assert [n.op_type for n in out.graph.node] == ["Gemm"]
    for name in ("W", "C"):
        np.testing.assert_array_equal(g.initializer(out, name), g.initializer(proto, name))
    assert g.num_weights(out) == g.num_weights(proto)


def test_lowrank_through_transpose_and_on_one_of_two_ops():
    proto = g.matmul_chain(dims=(16, 12, 10))
    out, _ = _run(proto, "lowrank", rank_ratio=0.25, targets=["name:mm0"])
    np.testing.assert_array_equal(g.initializer(out, "W1"), g.initializer(proto, "W1"))
    a, b = low_rank_factors(g.initializer(proto, "W0").T, 3)
    feeds = g.random_input(out)
    want = _f64(feeds["X"]) @ (_f64(a) @ _f64(b)).T @ _f64(g.initializer(proto, "W1"))
    np.testing.assert_allclose(g.run_ort(out, feeds)[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    proto = g.matmul_transposed(k=16, n=12)
    out, _ = _run(proto, "lowrank", rank_ratio=0.25, targets=["op:MatMul"])
    a, b = low_rank_factors(g.initializer(proto, "W"), 3)  # stored [N, K] is canonical
    feeds = g.random_input(out, seed=2)
    want = _f64(feeds["X"]) @ (_f64(a) @ _f64(b)).T
    np.testing.assert_allclose(g.run_ort(out, feeds)[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize(
    "name, params",
    [
        ("magnitude", {"sparsity": 0.5, "granularity": "global"}),
        ("nm", {"n": 2, "m": 4}),
        ("block", {"sparsity": 0.5, "block": [2, 2]}),
        ("topk", {"k": 2}),
        ("lowrank", {"energy": 0.8}),
    ],
)
def test_same_seed_same_result(name, params):
    proto = g.matmul_chain(dims=(16, 12, 8))
    first, _ = _run(proto, name, seed=7, targets=["op:MatMul"], **params)
    second, _ = _run(proto, name, seed=7, targets=["op:MatMul"], **params)
    assert first.SerializeToString() == second.SerializeToString()


# ==================================================================================== errors
@pytest.mark.parametrize("name", ["magnitude", "block"])
@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_sparsity_out_of_range(name, sparsity):
    with pytest.raises(sg.RecipeError, match=rf"pass '{name}': sparsity"):
        sg.get_pass(name)(sparsity=sparsity)


def test_nm_config_errors():
    with pytest.raises(sg.RecipeError, match="N must not exceed M"):
        sg.get_pass("nm")(n=5, m=4)
    with pytest.raises(sg.RecipeError, match="pass 'nm': n"):
        sg.get_pass("nm")(n=0, m=4)


@pytest.mark.parametrize("name", ["magnitude", "nm", "block", "topk", "lowrank"])
def test_unknown_key(name):
    with pytest.raises(sg.RecipeError, match=rf"pass '{name}': unknown key 'sparsty'"):
        sg.get_pass(name)(sparsty=0.5)


def test_lowrank_needs_exactly_one_rule():
    with pytest.raises(sg.RecipeError, match="exactly one of"):
        sg.get_pass("lowrank")(rank_ratio=0.5, energy=0.9)
    with pytest.raises(sg.RecipeError, match="exactly one of.*none"):
        sg.get_pass("lowrank")()
    with pytest.raises(sg.RecipeError, match="param_ratio"):
        sg.get_pass("lowrank")(param_ratio=1.0)


def test_topk_errors():
    with pytest.raises(sg.RecipeError, match="pass 'topk': k"):
        sg.get_pass("topk")(k=0)
    with pytest.raises(sg.RecipeError, match="pass 'topk': k=9 is outside 1..8"):
        _run(g.gemm(k=8), "topk", k=9, targets=["op:Gemm"])


@pytest.mark.parametrize("key", ["targets", "ignore"])
def test_selector_matching_nothing(key):
    params = {"targets": ["op:Gemm"], key: ["name:nope"]}
    with pytest.raises(sg.RecipeError, match="'name:nope' matched no op"):
        _run(g.gemm(), "magnitude", sparsity=0.5, **params)


def test_bad_selector_is_a_recipe_error():
    with pytest.raises(sg.RecipeError, match="targets"):
        sg.get_pass("magnitude")(sparsity=0.5, targets=["bogus:x"])


@pytest.mark.parametrize(
    "name, params",
    [("nm", {}), ("block", {"sparsity": 0.5}), ("lowrank", {"rank_ratio": 0.5})],
)
def test_targeting_an_embedding_with_an_unsupported_pass(name, params):
    with pytest.raises(sg.UnsupportedOpError, match="'embed'.*Gather") as info:
        _run(g.embedding(), name, targets=["op:Gather"], **params)
    assert isinstance(info.value, sg.UsageError)
