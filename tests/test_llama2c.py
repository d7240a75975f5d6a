"""llama2.c checkpoint -> ONNX converter: checked against an independent run.c-style forward pass."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from sparsegraph.models.llama2c import Llama2cConfig, convert, export_onnx, main, read_checkpoint

from reference_llama2c import reference_logits

EXAMPLE = Path(__file__).parent.parent / "examples" / "stories260K"
CHECKPOINT = EXAMPLE / "stories260K.bin"
COMMITTED_ONNX = EXAMPLE / "stories260K.onnx"


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def checkpoint():
    return read_checkpoint(CHECKPOINT)


@pytest.fixture(scope="module")
def model(checkpoint):
    return export_onnx(*checkpoint)


@pytest.fixture(scope="module")
def session(model):
    return _session(model)


def _write_checkpoint(path: Path, config: Llama2cConfig, seed: int = 0) -> None:
    """A random checkpoint in llama2.c's legacy layout (negative vocab when unshared)."""
    rng = np.random.default_rng(seed)
    c = config
    hs, kv = c.dim // c.n_heads, c.n_kv_heads * (c.dim // c.n_heads)
    L, D, H = c.n_layers, c.dim, c.hidden_dim
    vocab = c.vocab_size if c.shared_classifier else -c.vocab_size
    header = np.array([D, H, L, c.n_heads, c.n_kv_heads, vocab, c.seq_len], dtype="<i4")
    angles = np.arange(c.seq_len)[:, None] / 10000.0 ** (np.arange(0, hs, 2)[None] / hs)
    arrays = [
        rng.normal(size=(c.vocab_size, D)),
        1 + 0.1 * rng.normal(size=(L, D)),
        *(rng.normal(size=s) / np.sqrt(s[-1]) for s in [(L, D, D), (L, kv, D), (L, kv, D), (L, D, D)]),
        1 + 0.1 * rng.normal(size=(L, D)),
        *(rng.normal(size=s) / np.sqrt(s[-1]) for s in [(L, H, D), (L, D, H), (L, H, D)]),
        1 + 0.1 * rng.normal(size=D),
        np.cos(angles),
        np.sin(angles),
    ]
    if not c.shared_classifier:
        arrays.append(rng.normal(size=(c.vocab_size, D)) / np.sqrt(D))
    with open(path, "wb") as fh:
        fh.write(header.tobytes())
        for a in arrays:
            fh.write(np.asarray(a, dtype="<f4").tobytes())


def test_read_checkpoint_header(checkpoint):
    config, weights = checkpoint
    assert config == Llama2cConfig(64, 172, 5, 8, 4, 512, 512, shared_classifier=True)
    assert (config.head_size, config.kv_dim, config.n_rep) == (8, 32, 2)
    assert weights["wq"].shape == (5, 64, 64) and weights["wk"].shape == (5, 32, 64)
    assert weights["w2"].shape == (5, 64, 172) and weights["freq_cis_real"].shape == (512, 4)
    assert weights["wcls"] is weights["token_embedding"]
    # the stored RoPE tables are run.c's cos/sin(pos * 10000^(-2i/head_size))
    angles = np.arange(512)[:, None] / 10000.0 ** (np.arange(0, 8, 2)[None] / 8)
    np.testing.assert_allclose(weights["freq_cis_real"], np.cos(angles), atol=1e-5)
    np.testing.assert_allclose(weights["freq_cis_imag"], np.sin(angles), atol=1e-5)


def test_logits_match_reference(checkpoint, session):
    config, weights = checkpoint
    rng = np.random.default_rng(0)
    tokens = np.concatenate([[1], rng.integers(3, config.vocab_size, 39)])
    ref = reference_logits(config, weights, tokens)
    out = session.run(["logits"], {"tokens": tokens[None].astype(np.int64)})[0]
    assert out.shape == (1, 40, 512) and out.dtype == np.float32
    assert _rel_err(out[0], ref) < 1e-4


@pytest.mark.parametrize("seq", [1, 64])
def test_batch_and_lengths(session, seq):
    rng = np.random.default_rng(seq)
    tokens = rng.integers(0, 512, (2, seq)).astype(np.int64)
    out = session.run(["logits"], {"tokens": tokens})[0]
    assert out.shape == (2, seq, 512) and np.isfinite(out).all()
    for row in range(2):  # rows are independent
        single = session.run(["logits"], {"tokens": tokens[row : row + 1]})[0]
        np.testing.assert_allclose(out[row], single[0], rtol=1e-5, atol=1e-5)
    if seq > 1:  # causal: a prefix's logits don't depend on later tokens
        prefix = session.run(["logits"], {"tokens": tokens[:, : seq // 2]})[0]
        np.testing.assert_allclose(out[:, : seq // 2], prefix, rtol=1e-5, atol=1e-5)


def test_full_context_length(checkpoint, session):
    config, _ = checkpoint
    out = session.run(["logits"], {"tokens": np.ones((1, config.seq_len), np.int64)})[0]
    assert out.shape == (1, config.seq_len, config.vocab_size) and np.isfinite(out).all()


def test_graph_contract(model):
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    (inp,), (outp,) = model.graph.input, model.graph.output
    assert inp.name == "tokens" and inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "seq"]
    assert outp.name == "logits" and outp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in outp.type.tensor_type.shape.dim] == ["batch", "seq", 512]
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    assert all(n.domain == "" for n in model.graph.node)
    ops = {n.op_type for n in model.graph.node}
    assert {"Expand", "Tile", "Constant"}.isdisjoint(ops)  # no materialised K/V repeat
    weight_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(weight_matmuls) == 5 * 7 + 1
    assert all(len(inits[n.input[1]]) == 2 for n in weight_matmuls)
    assert sorted(inits[n.input[1]] for n in weight_matmuls).count((64, 512)) == 1  # classifier
    (gather,) = [n for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "tokens"]
    assert inits[gather.input[0]] == (512, 64)
    assert not any(len(s) == 2 and s[0] == s[1] == 512 for s in inits.values())  # no constant mask
    assert sum(n.op_type == "Where" for n in model.graph.node) == 5
    assert sum(n.op_type == "ReduceMean" for n in model.graph.node) == 11


def test_committed_onnx_matches_fresh_export(model):
    committed = onnx.load(COMMITTED_ONNX)
    assert [i.name for i in committed.graph.initializer] == [i.name for i in model.graph.initializer]
    for a, b in zip(committed.graph.initializer, model.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b), err_msg=a.name)
    assert [n.op_type for n in committed.graph.node] == [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("shared,n_kv_heads", [(False, 2), (True, 4)])
def test_random_checkpoint_matches_reference(tmp_path, shared, n_kv_heads):
    config = Llama2cConfig(16, 24, 2, 4, n_kv_heads, 40, 12, shared_classifier=shared)
    path = tmp_path / "tiny.bin"
    _write_checkpoint(path, config)
    read_config, weights = read_checkpoint(path)
    assert read_config == config
    assert (weights["wcls"] is weights["token_embedding"]) == shared
    tokens = np.random.default_rng(1).integers(0, 40, 12)
    ref = reference_logits(config, weights, tokens)
    out = _session(export_onnx(config, weights)).run(None, {"tokens": tokens[None]})[0][0]
    assert _rel_err(out, ref) < 1e-4


def test_truncated_checkpoint_names_file(tmp_path):
    bad = tmp_path / "broken_model.bin"
    bad.write_bytes(CHECKPOINT.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"broken_model\.bin.*truncated"):
        read_checkpoint(bad)
    bad.write_bytes(CHECKPOINT.read_bytes() + b"\0\0\0\0")
    with pytest.raises(ValueError, match=r"broken_model\.bin.*trailing"):
        read_checkpoint(bad)
    bad.write_bytes(b"\1\0\0\0" * 5)
    with pytest.raises(ValueError, match=r"broken_model\.bin.*too short"):
        read_checkpoint(bad)
    bad.write_bytes((EXAMPLE / "tok512.bin").read_bytes())
    with pytest.raises(ValueError, match=r"broken_model\.bin.*not a llama2.c checkpoint"):
        read_checkpoint(bad)
    with pytest.raises(ValueError, match=r"missing\.bin"):
        read_checkpoint(tmp_path / "missing.bin")


def test_convert_and_cli(tmp_path, model):
    out = tmp_path / "sub" / "m.onnx"
    convert(CHECKPOINT, out)
    assert out.read_bytes() == model.SerializeToString()
    main([str(CHECKPOINT), str(tmp_path / "cli.onnx")])
    assert (tmp_path / "cli.onnx").read_bytes() == model.SerializeToString()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.onnx", "sub"]  # no temp files left
    with pytest.raises(ValueError):
        convert(EXAMPLE / "tok512.bin", tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()
