"""Bounded KV cache (`kv_cache`) and the step-by-step decoder on the Llama KV-cache fixture."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import sparsegraph as sg
from sparsegraph.decode import KVDecoder
from sparsegraph.errors import RecipeError, UnsupportedOpError
from sparsegraph.passes.analysis.attention import Attention
from sparsegraph.passes.rewrite.kv_cache import (
    METADATA_KEY,
    KVCache,
    heavy_hitter_indices,
    window_sink_indices,
)

from paths import FIXTURES

BUDGET = 8
IDS = np.random.default_rng(0).integers(0, 100, (1, 3 * BUDGET))


def _kv_model(**params):
    model = sg.Model.load(FIXTURES / "llama_tiny_kv.onnx")
    if params:
        sg.PassManager([KVCache(**params)]).run(model)
    return model


def _decode(model, ids=IDS):
    dec = KVDecoder(model.to_proto(), batch=ids.shape[0])
    logits, lengths, nbytes = [], [], []
    for t in range(ids.shape[1]):
        logits.append(dec.step(ids[:, t : t + 1]))
        lengths.append(dec.cache_len)
        nbytes.append(dec.state_nbytes)
    return np.concatenate(logits, 1), lengths, nbytes


def test_decoder_matches_the_model_without_cache():
    """Dense decode loop (positions, mask, cache fed back) == one full-sequence run."""
    logits, lengths, _ = _decode(_kv_model())
    sess = ort.InferenceSession(str(FIXTURES / "llama_tiny.onnx"), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"input_ids": IDS, "attention_mask": np.ones_like(IDS)})[0]
    np.testing.assert_allclose(logits, ref, atol=1e-5)
    assert lengths == list(range(1, IDS.shape[1] + 1))


@pytest.mark.parametrize(
    "params", [{"policy": "window_sink", "sinks": 2}, {"policy": "heavy_hitter", "recent": 3}]
)
def test_cache_stays_within_budget(params):
    model = _kv_model(budget=BUDGET, **params)
    onnx.checker.check_model(model.to_proto(), full_check=True)
    _, lengths, nbytes = _decode(model)
    assert max(lengths) == BUDGET and lengths[:BUDGET] == list(range(1, BUDGET + 1))
    assert len(set(nbytes[BUDGET - 1 :])) == 1  # memory flat once the budget is reached
    meta = json.loads(model.meta.metadata_props[METADATA_KEY])
    assert len(meta["states"]) == (6 if params["policy"] == "heavy_hitter" else 4)


@pytest.mark.parametrize("policy", ["window_sink", "heavy_hitter"])
def test_budget_covering_the_sequence_equals_dense(policy):
    dense, _, _ = _decode(_kv_model())
    bounded, _, _ = _decode(_kv_model(policy=policy, budget=IDS.shape[1]))
    np.testing.assert_array_equal(bounded, dense)
    small, _, _ = _decode(_kv_model(policy=policy, budget=BUDGET))
    assert not np.allclose(small, dense, atol=1e-3)  # eviction does change later steps


def _step(model, past_len, seq, expose, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {
        "input_ids": rng.integers(0, 100, (2, seq)),
        "attention_mask": np.ones((2, past_len + seq), np.int64),
        "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq), (2, seq)).copy(),
    }
    for i in range(2):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = rng.standard_normal((2, 2, past_len, 8)).astype(np.float32)
        feeds[f"past_attn_score.{i}"] = rng.random((2, 2, past_len)).astype(np.float32) * 3
    proto = model.to_proto()
    for name in expose:
        proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    inputs = {i.name for i in sess.get_inputs()}
    return feeds, dict(
        zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in inputs}), strict=True)
    )


def test_window_sink_keeps_sinks_and_window():
    model = _kv_model(policy="window_sink", budget=6, sinks=2)
    _, out = _step(model, past_len=7, seq=2, expose=["present.0.key.unbounded"])
    full = out["present.0.key.unbounded"]
    np.testing.assert_array_equal(out["present.0.key"], full[:, :, window_sink_indices(9, 6, 2)])
    assert window_sink_indices(9, 6, 2).tolist() == [0, 1, 5, 6, 7, 8]


def test_heavy_hitter_keeps_the_highest_accumulated_attention():
    model = _kv_model(policy="heavy_hitter", budget=6, recent=2)
    site = sg.PassContext().get(Attention, model).sites[0]
    feeds, out = _step(
        model, past_len=9, seq=2, expose=["present.0.key.unbounded", "present.0.value.unbounded", site.probs]
    )
    probs = out[site.probs]  # [2, 4 heads, 2, 11]; heads 2g, 2g+1 share KV head g
    acc = probs.reshape(2, 2, -1, 11).sum(2) + np.pad(feeds["past_attn_score.0"], ((0, 0), (0, 0), (0, 2)))
    idx = heavy_hitter_indices(acc, 6, 2)
    np.testing.assert_allclose(out["present_attn_score.0"], np.take_along_axis(acc, idx, -1), rtol=1e-6)
    for kv in ("key", "value"):
        full = out[f"present.0.{kv}.unbounded"]
        np.testing.assert_array_equal(out[f"present.0.{kv}"], np.take_along_axis(full, idx[..., None], 2))
    assert (np.diff(idx, axis=-1) > 0).all() and idx[..., -2:].tolist() == [[[9, 10]] * 2] * 2


def test_errors():
    with pytest.raises(UnsupportedOpError, match="no attention site with a KV cache"):
        sg.PassManager([KVCache(policy="window_sink", budget=4)]).run(
            sg.Model.load(FIXTURES / "llama_tiny.onnx")
        )
    with pytest.raises(RecipeError, match="sinks"):
        KVCache(policy="window_sink", budget=4, sinks=5)


def test_decoder_finds_the_cache_without_attention_sites():
    """After topk_attention's gather form the sites are no longer Softmax sites; the decoder
    still pairs each past input with its present output (Concat of a graph input)."""
    from sparsegraph.passes.rewrite.topk_attention import TopKAttention

    logits = {}
    for mode in ("mask", "gather"):
        model = _kv_model()
        sg.PassManager([TopKAttention(k=3, r=4, decode_only=False, mode=mode)]).run(model)
        logits[mode], lengths, _ = _decode(model)
    np.testing.assert_allclose(logits["gather"], logits["mask"], atol=1e-5)
    assert lengths[-1] == IDS.shape[1]
