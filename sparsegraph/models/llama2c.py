"""Convert llama2.c checkpoints to ONNX.

Reads the legacy (version 0) checkpoint format of Andrej Karpathy's llama2.c
(https://github.com/karpathy/llama2.c, MIT licence) and writes an ONNX graph whose forward pass
matches ``run.c`` (RMSNorm, RoPE on interleaved pairs, grouped-query attention, SwiGLU FFN), for the
whole sequence at once with a causal mask.

Usage: ``python -m sparsegraph.models.llama2c CHECKPOINT.bin OUT.onnx``.

Node and tensor names are readable (``layers.0.attention.wq`` ...) for humans only: the rest of the
toolkit finds roles from the graph structure and must never depend on them.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["Llama2cConfig", "convert", "export_onnx", "read_checkpoint"]

_HEADER_FIELDS = 7
_HEADER_BYTES = 4 * _HEADER_FIELDS
RMS_EPS = 1e-5


@dataclass(frozen=True)
class Llama2cConfig:
    """Hyper-parameters from the 7-int32 checkpoint header."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool = True

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads


def _weight_shapes(c: Llama2cConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Arrays in file order, in llama2.c's torch (out, in) layout, stacked over layers."""
    L, D, H, KV = c.n_layers, c.dim, c.hidden_dim, c.kv_dim
    shapes = [
        ("token_embedding", (c.vocab_size, D)),
        ("rms_att", (L, D)),
        ("wq", (L, D, D)),
        ("wk", (L, KV, D)),
        ("wv", (L, KV, D)),
        ("wo", (L, D, D)),
        ("rms_ffn", (L, D)),
        ("w1", (L, H, D)),
        ("w2", (L, D, H)),
        ("w3", (L, H, D)),
        ("rms_final", (D,)),
        ("freq_cis_real", (c.seq_len, c.head_size // 2)),
        ("freq_cis_imag", (c.seq_len, c.head_size // 2)),
    ]
    if not c.shared_classifier:
        shapes.append(("wcls", (c.vocab_size, D)))
    return shapes


def read_checkpoint(path: str | Path) -> tuple[Llama2cConfig, dict[str, np.ndarray]]:
    """Read a llama2.c legacy checkpoint.

    Returns the config and float32 arrays keyed ``token_embedding, rms_att, wq, wk, wv, wo, rms_ffn,
    w1, w2, w3, rms_final, freq_cis_real, freq_cis_imag, wcls`` in the file's (out, in) layout, per-layer
    arrays stacked on axis 0. ``wcls`` is the embedding array itself when the classifier is shared
    (positive ``vocab_size`` in the header). Raises ``ValueError`` naming the file when the header is
    implausible, the size does not match the header exactly, or a weight is not finite.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read checkpoint ({exc})") from exc
    if len(data) < _HEADER_BYTES:
        raise ValueError(f"{path}: {len(data)} bytes is too short for the 28-byte llama2.c header")
    header = np.frombuffer(data, dtype="<i4", count=_HEADER_FIELDS).tolist()
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = header
    problems = []
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, seq_len) <= 0 or vocab_size == 0:
        problems.append("non-positive size")
    elif dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        problems.append("dim must split into heads of even size and n_heads must divide by n_kv_heads")
    if problems:
        raise ValueError(f"{path}: not a llama2.c checkpoint: header {header} ({problems[0]})")
    config = Llama2cConfig(
        dim=dim,
        hidden_dim=hidden_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=abs(vocab_size),
        seq_len=seq_len,
        shared_classifier=vocab_size > 0,
    )
    shapes = _weight_shapes(config)
    expected = _HEADER_BYTES + 4 * sum(math.prod(s) for _, s in shapes)
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: file {kind}: {len(data)} bytes, but header {header} implies {expected} bytes"
        )
    weights: dict[str, np.ndarray] = {}
    offset = _HEADER_BYTES
    for name, shape in shapes:
        count = math.prod(shape)
        arr = np.frombuffer(data, dtype="<f4", count=count, offset=offset).astype(np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{path}: weight {name} holds non-finite values (garbled file?)")
        weights[name] = arr.reshape(shape)
        offset += 4 * count
    if config.shared_classifier:
        weights["wcls"] = weights["token_embedding"]
    return config, weights


class _Builder:
    """Small helper that appends named nodes and initializers."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, **attrs) -> str | list[str]:
        outs = [name] if n_out == 1 else [f"{name}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def export_onnx(config: Llama2cConfig, weights: dict[str, np.ndarray], opset: int = 17) -> onnx.ModelProto:
    """Build the full-sequence causal forward pass of run.c as an ONNX model.

    Input ``tokens`` int64 [batch, seq] (seq <= ``config.seq_len``), output ``logits`` float32
    [batch, seq, vocab]. Standard ai.onnx ops at ``opset`` (17 by default; ReduceMean uses the
    ``axes`` attribute, so only opsets 13..17 are accepted). Every projection is ``MatMul(x, W)`` with W
    a 2-D [in, out] float32 initializer (checkpoint weight transposed). The classifier is tied to the
    token embedding in shared-classifier checkpoints such as stories260K, but is stored as its own
    [dim, vocab] initializer (``output.weight``, a transposed copy of the Gather table), as exporters
    of tied models commonly do.
    """
    if not 13 <= opset <= 17:
        raise ValueError(f"opset {opset} not supported: ReduceMean axes are an attribute only up to 17")
    c = config
    hd, half, kvh, rep = c.head_size, c.head_size // 2, c.n_kv_heads, c.n_rep
    f32 = np.float32
    b = _Builder()

    # constants shared by all layers
    eps = b.init("const.rms_eps", np.array(RMS_EPS, f32))
    scale = b.init("const.attn_scale", np.array(1.0 / math.sqrt(hd), f32))
    neg_inf = b.init("const.neg_inf", np.array(-np.inf, f32))
    zero_1d = b.init("const.zero_1d", _i64(0))
    one_1d = b.init("const.one_1d", _i64(1))
    two_1d = b.init("const.two_1d", _i64(2))
    zero_s = b.init("const.zero", np.array(0, np.int64))
    one_s = b.init("const.one_i64", np.array(1, np.int64))
    axes_01 = b.init("const.axes_0", _i64(0))
    axes_1 = b.init("const.axes_1", _i64(1))
    axes_13 = b.init("const.axes_1_3", _i64(1, 3))
    q_split_shape = b.init("const.q_pairs_shape", _i64(0, 0, c.n_heads, half, 2))
    k_split_shape = b.init("const.k_pairs_shape", _i64(0, 0, kvh, half, 2))
    q_group_shape = b.init("const.q_group_shape", _i64(0, 0, kvh, rep, hd))
    kv_group_shape = b.init("const.kv_group_shape", _i64(0, 0, kvh, 1, hd))
    merge_shape = b.init("const.merge_heads_shape", _i64(0, 0, c.dim))

    # sequence length, RoPE tables sliced to it, causal mask
    shape = b.op("Shape", ["tokens"], "seq.shape")
    seq_1d = b.op("Slice", [shape, one_1d, two_1d, zero_1d], "seq.len_1d")
    seq_s = b.op("Gather", [shape, one_s], "seq.len", axis=0)
    cos_tab = b.init("rope.freq_cis_real", weights["freq_cis_real"].astype(f32))
    sin_tab = b.init("rope.freq_cis_imag", weights["freq_cis_imag"].astype(f32))
    cos_t = b.op("Slice", [cos_tab, zero_1d, seq_1d, axes_01], "rope.cos_seq")
    sin_t = b.op("Slice", [sin_tab, zero_1d, seq_1d, axes_01], "rope.sin_seq")
    cos = b.op("Unsqueeze", [cos_t, axes_13], "rope.cos")  # [T, 1, hd/2, 1]
    sin = b.op("Unsqueeze", [sin_t, axes_13], "rope.sin")
    pos = b.op("Range", [zero_s, seq_s, one_s], "mask.positions")
    rows = b.op("Unsqueeze", [pos, axes_1], "mask.query_pos")  # [T, 1]
    cols = b.op("Unsqueeze", [pos, axes_01], "mask.key_pos")  # [1, T]
    causal = b.op("GreaterOrEqual", [rows, cols], "mask.causal")  # [T, T], True where key <= query

    def rmsnorm(x: str, w: np.ndarray, name: str) -> str:
        sq = b.op("Mul", [x, x], f"{name}.square")
        ms = b.op("ReduceMean", [sq], f"{name}.mean_square", axes=[-1], keepdims=1)
        var = b.op("Add", [ms, eps], f"{name}.add_eps")
        rms = b.op("Sqrt", [var], f"{name}.rms")
        inv = b.op("Reciprocal", [rms], f"{name}.inv_rms")
        normed = b.op("Mul", [x, inv], f"{name}.normalized")
        return b.op("Mul", [normed, b.init(f"{name}.weight", w.astype(f32))], f"{name}.out")

    def linear(x: str, w: np.ndarray, name: str) -> str:
        return b.op("MatMul", [x, b.init(f"{name}.weight", w.T.astype(f32))], name)

    def rope(x: str, pairs_shape: str, name: str) -> str:
        """run.c RoPE: rotate pairs (2i, 2i+1) of each head by angle pos * freq_i."""
        p = b.op("Reshape", [x, pairs_shape], f"{name}.pairs")  # [B, T, heads, hd/2, 2]
        x0, x1 = b.op("Split", [p], f"{name}.split", n_out=2, axis=-1)  # type: ignore[misc]
        x0c = b.op("Mul", [x0, cos], f"{name}.x0_cos")
        x1s = b.op("Mul", [x1, sin], f"{name}.x1_sin")
        x0s = b.op("Mul", [x0, sin], f"{name}.x0_sin")
        x1c = b.op("Mul", [x1, cos], f"{name}.x1_cos")
        r0 = b.op("Sub", [x0c, x1s], f"{name}.rot0")
        r1 = b.op("Add", [x0s, x1c], f"{name}.rot1")
        return b.op("Concat", [r0, r1], f"{name}.rotated", axis=-1)

    x = b.op(
        "Gather",
        [b.init("tok_embeddings.weight", weights["token_embedding"].astype(f32)), "tokens"],
        "tok_embeddings",
        axis=0,
    )
    for layer in range(c.n_layers):
        p = f"layers.{layer}"
        a = f"{p}.attention"
        h = rmsnorm(x, weights["rms_att"][layer], f"{p}.attention_norm")
        q = linear(h, weights["wq"][layer], f"{a}.wq")
        k = linear(h, weights["wk"][layer], f"{a}.wk")
        v = linear(h, weights["wv"][layer], f"{a}.wv")
        q = rope(q, q_split_shape, f"{a}.q_rope")
        k = rope(k, k_split_shape, f"{a}.k_rope")
        # GQA by broadcasting: query head kv*rep + r attends with kv head kv (= head // rep, as run.c)
        q = b.op("Reshape", [q, q_group_shape], f"{a}.q_grouped")  # [B, T, KVH, rep, hd]
        q = b.op("Transpose", [q], f"{a}.q_heads", perm=[0, 2, 3, 1, 4])  # [B, KVH, rep, T, hd]
        k = b.op("Reshape", [k, kv_group_shape], f"{a}.k_grouped")  # [B, T, KVH, 1, hd]
        k = b.op("Transpose", [k], f"{a}.k_heads_t", perm=[0, 2, 3, 4, 1])  # [B, KVH, 1, hd, T]
        v = b.op("Reshape", [v, kv_group_shape], f"{a}.v_grouped")
        v = b.op("Transpose", [v], f"{a}.v_heads", perm=[0, 2, 3, 1, 4])  # [B, KVH, 1, T, hd]
        s = b.op("MatMul", [q, k], f"{a}.scores")  # [B, KVH, rep, T, T]
        s = b.op("Mul", [s, scale], f"{a}.scores_scaled")
        s = b.op("Where", [causal, s, neg_inf], f"{a}.scores_masked")
        s = b.op("Softmax", [s], f"{a}.probs", axis=-1)
        o = b.op("MatMul", [s, v], f"{a}.context")  # [B, KVH, rep, T, hd]
        o = b.op("Transpose", [o], f"{a}.context_t", perm=[0, 3, 1, 2, 4])  # [B, T, KVH, rep, hd]
        o = b.op("Reshape", [o, merge_shape], f"{a}.context_merged")  # [B, T, dim]
        o = linear(o, weights["wo"][layer], f"{a}.wo")
        x = b.op("Add", [x, o], f"{p}.attention_residual")

        f = f"{p}.feed_forward"
        h = rmsnorm(x, weights["rms_ffn"][layer], f"{p}.ffn_norm")
        g = linear(h, weights["w1"][layer], f"{f}.w1")
        u = linear(h, weights["w3"][layer], f"{f}.w3")
        g = b.op("Mul", [g, b.op("Sigmoid", [g], f"{f}.sigmoid")], f"{f}.silu")
        g = b.op("Mul", [g, u], f"{f}.gated")
        o = linear(g, weights["w2"][layer], f"{f}.w2")
        x = b.op("Add", [x, o], f"{p}.ffn_residual")

    x = rmsnorm(x, weights["rms_final"], "norm")
    b.nodes.append(
        helper.make_node(
            "MatMul", [x, b.init("output.weight", weights["wcls"].T.astype(f32))], ["logits"], name="output"
        )
    )
    graph = helper.make_graph(
        b.nodes,
        "llama2c",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", c.vocab_size])],
        b.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="sparsegraph.models.llama2c",
        ir_version=8,
    )
    model.doc_string = (
        f"llama2.c checkpoint: dim={c.dim} hidden_dim={c.hidden_dim} n_layers={c.n_layers} "
        f"n_heads={c.n_heads} n_kv_heads={c.n_kv_heads} vocab_size={c.vocab_size} seq_len={c.seq_len} "
        f"shared_classifier={c.shared_classifier}"
    )
    return model


def convert(checkpoint_path: str | Path, onnx_path: str | Path, opset: int = 17) -> onnx.ModelProto:
    """Read ``checkpoint_path``, export it and write ``onnx_path`` atomically (temp file + os.replace)."""
    config, weights = read_checkpoint(checkpoint_path)
    model = export_onnx(config, weights, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    out = Path(onnx_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(model.SerializeToString())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sparsegraph.models.llama2c", description="Convert a llama2.c checkpoint to ONNX."
    )
    parser.add_argument("checkpoint", help="llama2.c legacy .bin checkpoint")
    parser.add_argument("output", help="ONNX file to write")
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args(argv)
    try:
        model = convert(args.checkpoint, args.output, opset=args.opset)
    except ValueError as exc:
        parser.exit(1, f"error: {exc}\n")
    print(f"wrote {args.output} ({len(model.graph.node)} nodes, {len(model.graph.initializer)} initializers)")


if __name__ == "__main__":
    main()
