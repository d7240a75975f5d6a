"""llama2.c tokenizer and the dense perplexity scorer."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsegraph.eval.perplexity import (
    PerplexityResult,
    find_logits_output,
    find_token_input,
    load_stories,
    perplexity,
    token_windows,
)
from sparsegraph.eval.tokenizer import Llama2cTokenizer
from sparsegraph.models.llama2c import read_checkpoint

from reference_llama2c import reference_logits

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "stories260K"
STORIES = ROOT / "examples" / "data" / "tinystories_valid.txt"
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tok():
    return Llama2cTokenizer(EXAMPLE / "tok512.bin")


@pytest.fixture(scope="module")
def stories():
    return load_stories(STORIES)


def _runc_encode(tok: Llama2cTokenizer, text: str) -> list[int]:
    """run.c's encode, literally: O(n^2) scan for the best pair each round."""
    ids = [tok.pieces.index(b" ")] if text else []
    for ch in text:
        raw = ch.encode()
        ids += [tok.pieces.index(raw)] if raw in tok.pieces else [b + 3 for b in raw]
    while True:
        best, best_i, best_id = -1e10, -1, -1
        for i in range(len(ids) - 1):
            merged = tok.pieces[ids[i]] + tok.pieces[ids[i + 1]]
            if merged in tok.pieces and tok.scores[tok.pieces.index(merged)] > best:
                best, best_i, best_id = tok.scores[tok.pieces.index(merged)], i, tok.pieces.index(merged)
        if best_i < 0:
            return [1, *ids]
        ids[best_i : best_i + 2] = [best_id]


def _nll_reference(config, weights, windows) -> float:
    total, count = 0.0, 0
    for w in windows:
        logits = reference_logits(config, weights, w[:-1])
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        total -= logp[np.arange(len(w) - 1), w[1:]].sum()
        count += len(w) - 1
    return total / count


# --- tokenizer -------------------------------------------------------------------------------------


def test_tokenizer_known_ids(tok):
    assert tok.vocab_size == 512
    ids = tok.encode("Once upon a time")
    assert ids[0] == 1
    assert [tok.pieces[i] for i in ids[1:]] == [b" Once", b" upon", b" a", b" time"]
    assert tok.encode("Once upon a time", bos=False, eos=True) == [*ids[1:], 2]
    assert tok.encode("") == [1] and tok.encode("", bos=False) == []
    assert tok.encode("™") == [1, tok.pieces.index(b" "), tok.pieces.index("™".encode())]
    assert tok.encode("ж")[2:] == [0xD0 + 3, 0xB6 + 3]  # byte fallback (not in the vocabulary)


def test_tokenizer_round_trip_and_runc_equivalence(tok, stories):
    sentences = [s.split("\n")[0] for s in stories[:5]] + [stories[0], 'He said, "Wow!"  \n\n€ 😀 \x00']
    for s in sentences:
        ids = tok.encode(s)
        assert ids == _runc_encode(tok, s)
        assert tok.decode(ids) == s
        assert tok.decode(tok.encode(s, bos=False, eos=True)) == s


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_tokenizer_property(tok, s):
    ids = tok.encode(s)
    assert ids == _runc_encode(tok, s)
    assert tok.decode(ids) == s


def test_tokenizer_load_errors(tmp_path):
    bad = tmp_path / "broken_tok.bin"
    bad.write_bytes((EXAMPLE / "tok512.bin").read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"broken_tok\.bin"):
        Llama2cTokenizer(bad)
    with pytest.raises(ValueError, match=r"nope\.bin"):
        Llama2cTokenizer(tmp_path / "nope.bin")


# --- stories and windows ---------------------------------------------------------------------------


def test_load_stories(stories, tmp_path):
    assert len(stories) > 100
    assert all(s and s == s.strip() and "<|endoftext|>" not in s for s in stories)
    f = tmp_path / "s.txt"
    f.write_text("a\n<|endoftext|>\n\n<|endoftext|>\n b \n<|endoftext|>", encoding="utf-8")
    assert load_stories(f) == ["a", "b"]


def test_token_windows(tok, stories):
    windows = token_windows(tok, stories[:10], seq_len=32)
    assert all(w.dtype == np.int64 and 2 <= len(w) <= 33 for w in windows)
    # windows of a story overlap by one token: every token after BOS is predicted exactly once
    predicted = sum(len(w) - 1 for w in windows)
    assert predicted == sum(len(tok.encode(s)) - 1 for s in stories[:10])
    first = tok.encode(stories[0])
    assert windows[0][0] == 1 and list(windows[0]) == first[:33] and list(windows[1][:1]) == first[32:33]
    assert len(token_windows(tok, stories, seq_len=32, max_windows=7)) == 7


# --- perplexity ------------------------------------------------------------------------------------


def test_dense_perplexity_matches_reference(tok, stories):
    config, weights = read_checkpoint(EXAMPLE / "stories260K.bin")
    windows = token_windows(tok, stories, seq_len=128, max_windows=20)
    assert len(windows) == 20
    result = perplexity(EXAMPLE / "stories260K.onnx", windows)
    assert isinstance(result, PerplexityResult)
    assert result.n_tokens == sum(len(w) - 1 for w in windows)
    ref_nll = _nll_reference(config, weights, windows)
    assert abs(result.mean_nll - ref_nll) / ref_nll < 1e-4
    assert abs(result.ppl - np.exp(ref_nll)) / np.exp(ref_nll) < 1e-4
    assert 1.5 < result.ppl < 10  # stories260K reaches a loss of ~1.3 nats on TinyStories


def test_perplexity_session_and_names(tok, stories):
    path = EXAMPLE / "stories260K.onnx"
    windows = token_windows(tok, stories[:3], seq_len=64)
    by_path = perplexity(path, windows)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert perplexity(session, windows) == by_path
    from_bytes = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    assert perplexity(from_bytes, windows, input_name="tokens", output_name="logits") == by_path
    many = [np.array([1, 5, 9])] * 21  # > 20 windows: the rich progress path
    assert perplexity(session, many).n_tokens == 42


def test_perplexity_generic_models():
    """Any causal LM graph: HF exports with attention_mask, position_ids and an empty KV cache."""
    for name in ["gpt2_tiny", "gpt2_tiny_legacy", "llama_tiny", "llama_tiny_kv"]:
        model = onnx.load(FIXTURES / f"{name}.onnx")
        assert find_token_input(model) == "input_ids"
        assert find_logits_output(model) == "logits"
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, 100, n) for n in (9, 17, 4)]
    results = {n: perplexity(FIXTURES / f"{n}.onnx", windows) for n in ["gpt2_tiny", "llama_tiny"]}
    # same weights, different exports / signatures
    for name, twin in [("gpt2_tiny_legacy", "gpt2_tiny"), ("llama_tiny_kv", "llama_tiny")]:
        other = perplexity(FIXTURES / f"{name}.onnx", windows)
        assert abs(other.mean_nll - results[twin].mean_nll) < 1e-5
    # direct computation for gpt2_tiny
    sess = ort.InferenceSession(str(FIXTURES / "gpt2_tiny.onnx"), providers=["CPUExecutionProvider"])
    total = 0.0
    for w in windows:
        x = w[None, :-1].astype(np.int64)
        logits = sess.run(["logits"], {"input_ids": x, "attention_mask": np.ones_like(x)})[0][0]
        logits = logits.astype(np.float64)
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total += (lse - logits[np.arange(len(w) - 1), w[1:]]).sum()
    assert abs(results["gpt2_tiny"].mean_nll - total / 27) < 1e-9
    assert results["gpt2_tiny"].n_tokens == 27


def test_perplexity_errors(tmp_path):
    with pytest.raises(ValueError, match="nothing to score"):
        perplexity(EXAMPLE / "stories260K.onnx", [np.array([1])])
    with pytest.raises(ValueError, match="no input"):
        perplexity(EXAMPLE / "stories260K.onnx", [np.array([1, 2])], input_name="input_ids")
