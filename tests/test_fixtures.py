"""Sanity checks for the committed transformer ONNX fixtures in tests/fixtures/.

These tests need only onnx, onnxruntime and numpy (no torch).  They check that the fixtures
load, validate and run, and that the ground-truth role files (the answer key for role
analysis) are consistent with the graphs.  The answer key itself is never derived from names
here; names are used only to look up the entries the key points at.

Regenerate the fixtures with ``python tests/fixtures/make_fixtures.py``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures"
FIXTURES = ["bert_tiny", "gpt2_tiny", "gpt2_tiny_legacy", "llama_tiny", "llama_tiny_kv"]
VOCAB = 100
MAX_BYTES = 400 * 1024

ROLES = {
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.o",
    "attn.qkv",
    "ffn.up",
    "ffn.gate",
    "ffn.down",
    "lm_head",
    "other",
    "embed",
}
LAYERED = {"attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv", "ffn.up", "ffn.gate", "ffn.down"}

_llama_counts = {
    "embed": 1,
    "attn.q": 2,
    "attn.k": 2,
    "attn.v": 2,
    "attn.o": 2,
    "ffn.gate": 2,
    "ffn.up": 2,
    "ffn.down": 2,
    "lm_head": 1,
}
_gpt2_counts = {"embed": 2, "attn.qkv": 2, "attn.o": 2, "ffn.up": 2, "ffn.down": 2, "lm_head": 1}
EXPECTED_ROLE_COUNTS = {
    "bert_tiny": {
        "embed": 3,
        "attn.q": 2,
        "attn.k": 2,
        "attn.v": 2,
        "attn.o": 2,
        "ffn.up": 2,
        "ffn.down": 2,
        "other": 1,
    },
    "gpt2_tiny": _gpt2_counts,
    "gpt2_tiny_legacy": _gpt2_counts,
    "llama_tiny": _llama_counts,
    "llama_tiny_kv": _llama_counts,
}

PASS_THROUGH = {"Transpose", "Cast", "Identity"}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _path(name: str) -> Path:
    return FIXTURE_DIR / f"{name}.onnx"


_model_cache: dict[str, onnx.ModelProto] = {}


def load(name: str) -> onnx.ModelProto:
    if name not in _model_cache:
        _model_cache[name] = onnx.load(str(_path(name)), load_external_data=False)
    return _model_cache[name]


def load_roles(name: str) -> list[dict]:
    return json.loads((FIXTURE_DIR / f"{name}.roles.json").read_text())


def session(name: str):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(_path(name)), so, providers=["CPUExecutionProvider"])


def trace_to_initializer(graph: onnx.GraphProto, value: str) -> str | None:
    """Name of the 2-D initializer `value` comes from via Transpose/Cast/Identity, else None."""
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    while value not in inits:
        node = producers.get(value)
        if node is None or node.op_type not in PASS_THROUGH:
            return None
        value = node.input[0]
    return value if len(inits[value].dims) == 2 else None


def weight_input(node: onnx.NodeProto) -> str:
    return node.input[0] if node.op_type == "Gather" else node.input[1]


DIMS = {"batch": 2, "seq": 7, "past_seq": 3}
DIMS["total_seq"] = DIMS["past_seq"] + DIMS["seq"]


def make_feeds(sess, rng, dims=DIMS) -> dict[str, np.ndarray]:
    """Random valid inputs built from the session's input metadata."""
    has_past = any(d == "past_seq" for i in sess.get_inputs() for d in i.shape)
    past = dims["past_seq"] if has_past else 0
    b, s = dims["batch"], dims["seq"]
    feeds = {}
    for inp in sess.get_inputs():
        shape = [d if isinstance(d, int) else dims[d] for d in inp.shape]
        if inp.name == "input_ids":
            feeds[inp.name] = rng.integers(0, VOCAB, size=shape, dtype=np.int64)
        elif inp.name == "attention_mask":
            m = np.ones(shape, dtype=np.int64)
            if b > 1:  # pad the last row: left (generation style) with a cache, else right
                if has_past:
                    m[-1, :1] = 0
                else:
                    m[-1, -2:] = 0
            feeds[inp.name] = m
        elif inp.name == "token_type_ids":
            t = np.zeros(shape, dtype=np.int64)
            t[:, shape[1] // 2 :] = 1
            feeds[inp.name] = t
        elif inp.name == "position_ids":
            feeds[inp.name] = np.broadcast_to(np.arange(past, past + s, dtype=np.int64), (b, s)).copy()
        elif inp.type == "tensor(float)":
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
        else:
            raise AssertionError(f"don't know how to feed {inp.name} {inp.type}")
    return feeds


# ---------------------------------------------------------------------------------------------
# fixture files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_is_small_and_self_contained(name):
    path = _path(name)
    assert path.exists(), f"missing {path}; run tests/fixtures/make_fixtures.py"
    assert path.stat().st_size < MAX_BYTES
    assert not list(FIXTURE_DIR.glob(f"{name}.onnx.*")), "unexpected external-data side file"
    m = load(name)
    assert m.graph.initializer, "weights should be initializers"
    for init in m.graph.initializer:
        assert init.data_location != onnx.TensorProto.EXTERNAL, init.name
    # Weights live in initializers, not in Constant nodes.
    for node in m.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    assert np.prod(a.t.dims, dtype=np.int64) <= 64, node.name


@pytest.mark.parametrize("name", FIXTURES)
def test_checker(name):
    onnx.checker.check_model(load(name), full_check=True)


@pytest.mark.parametrize("name", FIXTURES)
def test_runs_in_onnxruntime(name):
    sess = session(name)
    rng = np.random.default_rng(0)
    for dims in (DIMS, {"batch": 1, "seq": 1, "past_seq": 1, "total_seq": 2}):
        feeds = make_feeds(sess, rng, dims)
        outs = sess.run(None, feeds)
        for meta, out in zip(sess.get_outputs(), outs, strict=True):
            assert np.isfinite(out).all(), meta.name
            assert out.ndim == len(meta.shape), meta.name
            for got, d in zip(out.shape, meta.shape, strict=True):
                if isinstance(d, int):
                    assert got == d, (meta.name, out.shape, meta.shape)
                elif isinstance(d, str) and all(t.strip() in dims for t in d.split("+")):
                    # named dims, incl. sums such as "past_seq + seq"
                    assert got == sum(dims[t.strip()] for t in d.split("+")), (meta.name, d, got)
                # else: exporter-generated symbol (e.g. TorchScript's "MatMullogits_dim_0")


def test_gpt2_exporters_agree():
    """gpt2_tiny (dynamo) and gpt2_tiny_legacy (TorchScript) hold the same weights."""
    rng = np.random.default_rng(1)
    a, b = session("gpt2_tiny"), session("gpt2_tiny_legacy")
    feeds = make_feeds(a, rng)
    np.testing.assert_allclose(a.run(None, feeds)[0], b.run(None, feeds)[0], atol=1e-5, rtol=0)


def test_llama_kv_matches_no_cache_model():
    """Prefill (empty past) + two single-token decode steps through llama_tiny_kv reproduce
    the full-sequence logits of llama_tiny (same weights, sdpa vs eager attention)."""
    rng = np.random.default_rng(2)
    full, kv = session("llama_tiny"), session("llama_tiny_kv")
    b, total, prefill = 2, 7, 5
    ids = rng.integers(0, VOCAB, size=(b, total), dtype=np.int64)
    ref = full.run(None, {"input_ids": ids, "attention_mask": np.ones((b, total), np.int64)})[0]

    past_names = [i.name for i in kv.get_inputs() if i.name.startswith("past_key_values.")]
    first_past = next(i for i in kv.get_inputs() if i.name in past_names)
    kv_heads, head_dim = first_past.shape[1], first_past.shape[3]
    past = {n: np.zeros((b, kv_heads, 0, head_dim), np.float32) for n in past_names}
    pos, got = 0, []
    for step in [prefill] + [1] * (total - prefill):
        chunk = ids[:, pos : pos + step]
        feeds = {
            "input_ids": chunk,
            "attention_mask": np.ones((b, pos + step), np.int64),
            "position_ids": np.broadcast_to(np.arange(pos, pos + step), (b, step)).astype(np.int64),
            **past,
        }
        outs = kv.run(None, feeds)
        got.append(outs[0])
        present = dict(zip([o.name for o in kv.get_outputs()], outs, strict=True))
        past = {n: present[n.replace("past_key_values.", "present.")] for n in past_names}
        pos += step
    np.testing.assert_allclose(np.concatenate(got, axis=1), ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# ground truth
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
def test_roles_reference_existing_nodes_and_initializers(name):
    g = load(name).graph
    nodes = {n.name: n for n in g.node}
    inits = {i.name for i in g.initializer}
    entries = load_roles(name)
    assert entries
    assert len({e["node"] for e in entries}) == len(entries), "duplicate node entries"
    for e in entries:
        assert {"node", "weight", "role", "layer"} <= set(e), e
        assert e["role"] in ROLES, e
        assert e["layer"] is None or isinstance(e["layer"], int), e
        assert (e["layer"] is not None) == (e["role"] in LAYERED), e
        assert e["node"] in nodes, e
        assert e["weight"] in inits, e
        node = nodes[e["node"]]
        if e["role"] == "embed":
            assert node.op_type == "Gather", e
        else:
            assert node.op_type in ("MatMul", "Gemm"), e
        assert trace_to_initializer(g, weight_input(node)) == e["weight"], e


@pytest.mark.parametrize("name", FIXTURES)
def test_roles_are_complete(name):
    """Every weight MatMul/Gemm and every embedding Gather in the graph is labelled."""
    g = load(name).graph
    inits = {i.name: i for i in g.initializer}
    labelled = {e["node"] for e in load_roles(name)}
    for node in g.node:
        if node.op_type in ("MatMul", "Gemm") and trace_to_initializer(g, node.input[1]):
            assert node.name in labelled, node.name
        if (
            node.op_type == "Gather"
            and node.input[0] in inits
            and len(inits[node.input[0]].dims) == 2
            and inits[node.input[0]].data_type == onnx.TensorProto.FLOAT
        ):
            assert node.name in labelled, node.name


@pytest.mark.parametrize("name", FIXTURES)
def test_role_counts_and_layers(name):
    entries = load_roles(name)
    assert dict(Counter(e["role"] for e in entries)) == EXPECTED_ROLE_COUNTS[name]
    for role in LAYERED & {e["role"] for e in entries}:
        assert sorted(e["layer"] for e in entries if e["role"] == role) == [0, 1], role


@pytest.mark.parametrize("name", FIXTURES)
def test_roles_structurally_consistent(name):
    """Cheap structural cross-checks of the answer key (no names involved):
    q/k/v of one layer read the same activation, so do gate/up; weight shapes chain."""
    g = load(name).graph
    nodes = {n.name: n for n in g.node}
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    by = {}
    for e in load_roles(name):
        by.setdefault((e["role"], e["layer"]), []).append(e)
    layers = {e["layer"] for e in load_roles(name) if e["layer"] is not None}
    for layer in layers:

        def one(role, layer=layer):
            es = by.get((role, layer), [])
            return nodes[es[0]["node"]] if es else None

        q, k, v = one("attn.q"), one("attn.k"), one("attn.v")
        if q is not None:
            assert q.input[0] == k.input[0] == v.input[0]
        gate, up = one("ffn.gate"), one("ffn.up")
        if gate is not None:
            assert gate.input[0] == up.input[0]
            wg, wu = trace_to_initializer(g, gate.input[1]), trace_to_initializer(g, up.input[1])
            assert inits[wg].shape == inits[wu].shape
    # the lm_head maps hidden -> vocab
    for e in load_roles(name):
        if e["role"] == "lm_head":
            assert VOCAB in inits[e["weight"]].shape
        if e["role"] == "embed" and e["weight"] in inits:
            assert inits[e["weight"]].ndim == 2
