"""Attention recognition, sparse attention masks and decode top-k attention on real exports.

Masks are checked against `pattern_mask` / the numpy references by running onnxruntime with
each site's probabilities exposed: exact zeros where a position is dropped, non-zero where
it is kept and the model's own (causal, all-ones padding) mask allows it.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import sparsegraph as sg
from sparsegraph.errors import RecipeError, UnsupportedOpError
from sparsegraph.passes.analysis.attention import Attention
from sparsegraph.passes.rewrite.sparse_attention import SparseAttention, dynamic_block_mask, pattern_mask
from sparsegraph.passes.rewrite.topk_attention import TopKAttention, topk_attention_mask

from paths import FIXTURES, STORIES

FIXTURE_NAMES = ["llama_tiny", "llama_tiny_kv", "gpt2_tiny", "gpt2_tiny_legacy", "bert_tiny"]
SEQ, PAST = 11, 5


def _load(name):
    return sg.Model.load(FIXTURES / f"{name}.onnx")


def _find(model):
    return sg.PassContext().get(Attention, model)


def _feeds(name, seq=SEQ, past=PAST, seed=0):
    rng = np.random.default_rng(seed)
    p = past if name.endswith("_kv") else 0
    feeds = {
        "input_ids": rng.integers(0, 100, (2, seq)),
        "attention_mask": np.ones((2, seq + p), np.int64),
        "token_type_ids": np.zeros((2, seq), np.int64),
        "position_ids": np.broadcast_to(np.arange(p, p + seq), (2, seq)).copy(),
    }
    for i in range(2):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = rng.standard_normal((2, 2, p, 8)).astype(np.float32)
    return feeds


def _run(model, feeds, expose=()):
    proto = model.to_proto()
    for name in expose:
        proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    inputs = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in inputs}), strict=True))


def _rewrite(name, **params):
    model = _load(name)
    sg.PassManager([SparseAttention(**params) if "pattern" in params else TopKAttention(**params)]).run(model)
    return model


# ------------------------------------------------------------------------------ recognition
EXPECTED = {  # sites, causal, heads, kv heads, KV cache
    "llama_tiny": (2, True, 4, 2, False),
    "llama_tiny_kv": (2, True, 4, 2, True),
    "gpt2_tiny": (2, True, 4, 4, False),
    "gpt2_tiny_legacy": (2, True, None, None, False),
    "bert_tiny": (2, False, 4, 4, False),
}


def _signature(finding, model):
    inputs = {t.name: i for i, t in enumerate(model.graph.inputs)}
    outputs = {t.name: i for i, t in enumerate(model.graph.outputs)}
    return [
        (
            s.layer,
            s.causal,
            s.heads,
            s.kv_heads,
            s.head_dim,
            round(s.scale, 6),
            inputs.get(s.past_key),
            inputs.get(s.past_value),
            outputs.get(s.present_key),
            outputs.get(s.present_value),
        )
        for s in finding.sites
    ]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_recognises_attention_in_exports(name):
    model = _load(name)
    finding = _find(model)
    n, causal, heads, kv_heads, cache = EXPECTED[name]
    assert len(finding.sites) == n and not finding.unrecognised
    tensors = model.graph.tensors()
    for s in finding.sites:
        assert (s.kind, s.causal, s.heads, s.kv_heads, s.head_dim) == ("softmax", causal, heads, kv_heads, 8)
        assert s.scale == pytest.approx(8**-0.5, rel=1e-6)
        assert all(t in tensors for t in (s.q, s.k, s.v, s.scores, s.logits, s.probs, s.output))
        assert s.has_kv_cache == cache
    if cache:
        assert [(s.past_key, s.present_value) for s in finding.sites] == [
            ("past_key_values.0.key", "present.0.value"),
            ("past_key_values.1.key", "present.1.value"),
        ]
        assert all(s.repeat_kv for s in finding.sites)  # GQA Expand on the K/V path


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_recognition_does_not_depend_on_names(name):
    model = _load(name)
    expected = _signature(_find(model), model)
    rng = np.random.default_rng(1)
    for i in rng.permutation(len(model.graph.nodes)):
        model.graph.nodes[i].name = f"x{i}"
    for j, tensor in enumerate(model.graph.tensors().values()):
        tensor.name = f"t{j}"
    assert _signature(_find(model), model) == expected


def test_stories260k_sites():
    finding = _find(sg.Model.load(STORIES))
    assert [(s.heads, s.kv_heads, s.causal, s.has_kv_cache) for s in finding.sites] == [
        (8, 4, True, False)
    ] * 5


def _fused_model():
    """com.microsoft Attention, MultiHeadAttention (with a cache) and GroupQueryAttention,
    plus a classifier Softmax that is not attention."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node(
            "Attention",
            ["x", "w", "b", "", "past"],
            ["a", "present"],
            domain="com.microsoft",
            num_heads=2,
            unidirectional=1,
        ),
        helper.make_node(
            "MultiHeadAttention",
            ["a", "a", "a", "", "", "", "pk", "pv"],
            ["m", "mk", "mv"],
            domain="com.microsoft",
            num_heads=2,
        ),
        helper.make_node(
            "GroupQueryAttention",
            ["m", "k2", "v2", "gk", "gv", "seqlens", "total"],
            ["g", "gpk", "gpv"],
            domain="com.microsoft",
            num_heads=2,
            kv_num_heads=1,
        ),
        helper.make_node("Softmax", ["g"], ["y"], axis=-1),
    ]
    vi = helper.make_tensor_value_info
    inputs = [
        vi("x", f, [1, 3, 8]),
        vi("past", f, [2, 1, 2, "p", 4]),
        vi("pk", f, [1, 2, "p", 4]),
        vi("pv", f, [1, 2, "p", 4]),
        vi("k2", f, [1, 3, 4]),
        vi("v2", f, [1, 3, 4]),
        vi("gk", f, [1, 1, "p", 4]),
        vi("gv", f, [1, 1, "p", 4]),
        vi("seqlens", TensorProto.INT32, [1]),
        vi("total", TensorProto.INT32, []),
    ]
    outputs = [vi(n, f, None) for n in ("y", "present", "mk", "mv", "gpk", "gpv")]
    rng = np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
        for n, s in (("w", (8, 24)), ("b", (24,)))
    ]
    graph = helper.make_graph(nodes, "fused", inputs, outputs, inits)
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    return sg.Model.from_proto(proto)


def test_fused_attention_ops_and_unrecognised_softmax():
    model = _fused_model()
    finding = _find(model)
    got = [(s.kind, s.heads, s.kv_heads, s.causal, s.past_key, s.present_value) for s in finding.sites]
    assert got == [
        ("com.microsoft.Attention", 2, 2, True, "past", "present"),
        ("com.microsoft.MultiHeadAttention", 2, 2, False, "pk", "mv"),
        ("com.microsoft.GroupQueryAttention", 2, 1, True, "gk", "gpv"),
    ]
    assert len(finding.unrecognised) == 1 and "Q·Kᵀ" in finding.unrecognised[0][1]
    with pytest.raises(UnsupportedOpError, match="3 fused attention ops"):
        sg.PassManager([SparseAttention(pattern="window", window=2)]).run(model)


# --------------------------------------------------------------------------- static masks
PATTERNS = [
    {"pattern": "window", "window": 3, "globals": 1},
    {"pattern": "strided", "stride": 3},
    {"pattern": "block", "block_size": 2, "block_random": 1, "max_len": 32, "seed": 3},
    {"pattern": "block", "block_size": 4, "layout": [[1, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1]]},
]


@pytest.mark.parametrize("name", ["llama_tiny_kv", "gpt2_tiny", "bert_tiny"])
@pytest.mark.parametrize("params", PATTERNS, ids=lambda p: p["pattern"] + str(p.get("layout") is not None))
def test_static_masks_are_exact(name, params):
    model = _rewrite(name, **params)
    sites = _find(model).sites
    out = _run(model, _feeds(name), expose=[s.probs for s in sites])
    lk = SEQ + (PAST if name.endswith("_kv") else 0)
    keep = pattern_mask(params, SEQ, lk)
    allowed = np.tril(np.ones((SEQ, lk), bool), lk - SEQ) if sites[0].causal else np.ones((SEQ, lk), bool)
    for s in sites:
        probs = out[s.probs]
        assert np.array_equal(probs > 0, np.broadcast_to(keep & allowed, probs.shape))
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_pattern_mask_definitions():
    w = pattern_mask({"pattern": "window", "window": 2, "globals": 1}, 4, 4)
    assert w.astype(int).tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 1]]
    s = pattern_mask({"pattern": "strided", "stride": 2}, 1, 6)  # query at position 5
    assert s.astype(int).tolist() == [[0, 1, 0, 1, 1, 1]]
    with pytest.raises(ValueError, match="does not cover"):
        pattern_mask({"pattern": "block", "block_size": 2, "layout": [[1, 1], [1, 1]]}, 6, 6)


@pytest.mark.parametrize("name", ["llama_tiny_kv", "gpt2_tiny_legacy", "bert_tiny"])
def test_window_covering_the_sequence_equals_dense(name):
    feeds = _feeds(name)
    dense = _run(_load(name), feeds)
    sparse = _run(_rewrite(name, pattern="window", window=SEQ + PAST), feeds)
    for key, value in dense.items():
        np.testing.assert_array_equal(sparse[key], value)


@pytest.mark.parametrize("name", ["llama_tiny", "llama_tiny_kv", "bert_tiny"])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_dynamic_block_matches_reference(name, ratio):
    model = _rewrite(name, pattern="dynamic_block", block_size=2, keep_ratio=ratio)
    sites = _find(model).sites
    out = _run(model, _feeds(name, seed=2), expose=[t for s in sites for t in (s.q, s.k, s.probs)])
    for s in sites:
        keep = dynamic_block_mask(out[s.q], out[s.k], 2, ratio, None, s.causal)
        lq, lk = keep.shape[-2:]
        allowed = np.tril(np.ones((lq, lk), bool), lk - lq) if s.causal else True
        assert np.array_equal(out[s.probs] > 0, keep & allowed)
        assert (keep & allowed).mean() < np.mean(
            np.broadcast_to(allowed, keep.shape)
        )  # something was dropped


def test_dynamic_block_needs_one_budget():
    with pytest.raises(RecipeError, match="exactly one of keep_ratio"):
        SparseAttention(pattern="dynamic_block", block_size=4)


# --------------------------------------------------------------------------- decode top-k
def test_topk_covering_the_cache_equals_dense():
    feeds = _feeds("llama_tiny_kv", seq=1, past=9)
    dense = _run(_load("llama_tiny_kv"), feeds)
    for params in ({"k": 10, "r": 3}, {"k": 64}):
        sparse = _run(_rewrite("llama_tiny_kv", **params), feeds)
        for key, value in dense.items():
            np.testing.assert_array_equal(sparse[key], value)


def test_topk_decode_step_matches_sparq_reference():
    feeds = _feeds("llama_tiny_kv", seq=1, past=12, seed=3)
    model = _rewrite("llama_tiny_kv", k=4, r=3)
    sites = _find(model).sites
    out = _run(model, feeds, expose=[t for s in sites for t in (s.q, s.k, s.probs)])
    for s in sites:
        keep = topk_attention_mask(out[s.q], out[s.k], k=4, r=3)
        assert np.array_equal(out[s.probs] > 0, keep)
        assert (keep.sum(-1) == 4).all()
    prefill = _feeds("llama_tiny_kv", seq=6, past=0)  # decode_only: prefill stays dense
    dense = _run(_load("llama_tiny_kv"), prefill)
    np.testing.assert_array_equal(_run(model, prefill)["logits"], dense["logits"])


@pytest.mark.parametrize("recipe", ["attention_window64", "attention_dynamic_block50", "kv_window_sink128"])
def test_shipped_recipes_run(recipe):
    from paths import EXAMPLES

    model = _load("llama_tiny_kv")
    ctx = sg.PassManager(sg.Recipe.load(EXAMPLES / "recipes" / f"{recipe}.yaml").steps).run(model)
    assert [len(result.changes) for _, result, _ in ctx.history] == [2]
    feeds = _feeds("llama_tiny_kv")
    dense = _run(_load("llama_tiny_kv"), feeds)["logits"]
    np.testing.assert_allclose(_run(model, feeds)["logits"], dense, atol=1e-5)  # budgets exceed 16 positions


@pytest.mark.parametrize(
    ("name", "seq", "past"), [("llama_tiny_kv", 1, 12), ("llama_tiny_kv", 11, 5), ("stories", 20, 0)]
)
def test_topk_gather_form_equals_mask_form(name, seq, past):
    """Attention over the k gathered K/V rows == the full attention with the top-k mask
    (GQA by Expand in the HF export, by broadcasting over a rep axis in the llama2.c one)."""
    load = (lambda: sg.Model.load(STORIES)) if name == "stories" else (lambda: _load(name))
    if name == "stories":
        feeds = {"tokens": np.random.default_rng(0).integers(0, 512, (2, seq))}
    else:
        feeds = _feeds(name, seq=seq, past=past, seed=4)
    outs = {}
    for mode in ("mask", "gather"):
        model = load()
        sg.PassManager([TopKAttention(k=4, r=3, decode_only=False, mode=mode)]).run(model)
        outs[mode] = _run(model, feeds)
    dense = _run(load(), feeds)
    for key in dense:
        np.testing.assert_allclose(outs["gather"][key], outs["mask"][key], atol=1e-4, rtol=1e-5)
    assert not np.allclose(outs["gather"]["logits"], dense["logits"], atol=1e-3)
    model = load()
    sg.PassManager([TopKAttention(k=64, decode_only=False, mode="gather")]).run(model)
    gathered = _run(model, feeds)
    for key in dense:
        np.testing.assert_allclose(gathered[key], dense[key], atol=1e-4, rtol=1e-5)
    with pytest.raises(RecipeError, match="decode_only: false"):
        TopKAttention(k=4, mode="gather")


def test_opset13_export_of_the_trained_model():
    """stories260K rebuilt at opset 13 (the oldest supported): every rewrite's ops load and run."""
    from sparsegraph.models.llama2c import export_onnx, read_checkpoint

    from paths import EXAMPLES

    proto = export_onnx(*read_checkpoint(EXAMPLES / "stories260K" / "stories260K.bin"), opset=13)
    feeds = {"tokens": np.random.default_rng(0).integers(0, 512, (1, 40))}
    dense = _run(sg.Model.from_proto(proto), feeds)["logits"]
    steps = [
        SparseAttention(pattern="window", window=8, globals=2),
        SparseAttention(pattern="dynamic_block", block_size=8, top_k_blocks=2),
        TopKAttention(k=6, r=4, decode_only=False, mode="gather"),
    ]
    for step in steps:
        model = sg.Model.from_proto(proto)
        sg.PassManager([step]).run(model)
        onnx.checker.check_model(model.to_proto(), full_check=True)
        out = _run(model, feeds)["logits"]
        assert np.isfinite(out).all() and not np.allclose(out, dense, atol=1e-3)
    model = sg.Model.from_proto(proto)
    sg.PassManager([SparseAttention(pattern="strided", stride=64)]).run(model)
    np.testing.assert_array_equal(_run(model, feeds)["logits"], dense)  # stride >= length: dense
