"""Small hand-built ONNX graphs for tests, with seeded random weights, and an onnxruntime runner.

Every builder returns a checker-valid opset-17 `onnx.ModelProto` with one float input `X`
(or int64 `ids` for the embedding) and one output `Y`. Weight initializers are named
`W`, `W0`, `W1`, ... so tests can read them back with `initializer(model, name)`.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
F32 = TensorProto.FLOAT


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _weights(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def make_model(
    nodes, inputs, outputs, initializers: dict[str, np.ndarray], name: str = "g"
) -> onnx.ModelProto:
    """A checked opset-17 model from nodes, value infos and `{name: array}` initializers."""
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()]
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _x(shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("X", F32, list(shape))


def _y(shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("Y", F32, list(shape))


# ----------------------------------------------------------------------------- linear ops
def matmul_chain(dims=(8, 12, 6), batch: int = 3, seed: int = 0) -> onnx.ModelProto:
    """`Y = X @ W0 @ W1 @ ...` with `Wi[dims[i], dims[i+1]]` ([K, N]) and nodes `mm0`, `mm1`, ..."""
    rng = _rng(seed)
    nodes, inits = [], {}
    current = "X"
    for i in range(len(dims) - 1):
        inits[f"W{i}"] = _weights(rng, (dims[i], dims[i + 1]))
        out = "Y" if i == len(dims) - 2 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [current, f"W{i}"], [out], name=f"mm{i}"))
        current = out
    return make_model(nodes, [_x((batch, dims[0]))], [_y((batch, dims[-1]))], inits)


def gemm(
    m: int = 3,
    k: int = 8,
    n: int = 6,
    trans_b: int = 1,
    bias: bool = True,
    alpha: float = 1.0,
    beta: float = 1.0,
    bias_shape: str = "row",
    seed: int = 0,
) -> onnx.ModelProto:
    """`Y = alpha * X @ op(W) + beta * C`, node `gemm`: `W[N, K]` if `trans_b` else `W[K, N]`;
    `C` is `[N]` (`bias_shape="row"`) or `[M, N]` (`"full"`)."""
    rng = _rng(seed)
    inits = {"W": _weights(rng, (n, k) if trans_b else (k, n))}
    inputs = ["X", "W"]
    if bias:
        inits["C"] = _weights(rng, (n,) if bias_shape == "row" else (m, n))
        inputs.append("C")
    attrs = {"transB": trans_b}
    if alpha != 1.0:
        attrs["alpha"] = alpha
    if beta != 1.0:
        attrs["beta"] = beta
    node = helper.make_node("Gemm", inputs, ["Y"], name="gemm", **attrs)
    return make_model([node], [_x((m, k))], [_y((m, n))], inits)


def conv(
    out_ch: int = 4, in_ch: int = 3, kh: int = 3, kw: int = 2, size: int = 6, bias: bool = True, seed: int = 0
) -> onnx.ModelProto:
    """`Y = Conv(X, W[O, I, kh, kw], B)`, stride 1, no padding, node `conv`; X is `[2, I, size, size]`."""
    rng = _rng(seed)
    inits = {"W": _weights(rng, (out_ch, in_ch, kh, kw))}
    inputs = ["X", "W"]
    if bias:
        inits["B"] = _weights(rng, (out_ch,))
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["Y"], name="conv", kernel_shape=[kh, kw])
    y = (2, out_ch, size - kh + 1, size - kw + 1)
    return make_model([node], [_x((2, in_ch, size, size))], [_y(y)], inits)


def conv_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """numpy Conv (stride 1, no padding, one group), in float64."""
    kh, kw = w.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), (kh, kw), axis=(2, 3))
    y = np.einsum("bihwkl,oikl->bohw", windows, w.astype(np.float64))
    return y if b is None else y + b.astype(np.float64)[None, :, None, None]


# ------------------------------------------------------------------- weights behind chains
def matmul_transposed(k: int = 8, n: int = 6, batch: int = 3, seed: int = 0) -> onnx.ModelProto:
    """`Y = X @ Transpose(W)` with `W[N, K]` stored (torch layout), node `mm`."""
    rng = _rng(seed)
    nodes = [
        helper.make_node("Transpose", ["W"], ["Wt"], name="tr", perm=[1, 0]),
        helper.make_node("MatMul", ["X", "Wt"], ["Y"], name="mm"),
    ]
    return make_model(nodes, [_x((batch, k))], [_y((batch, n))], {"W": _weights(rng, (n, k))})


def matmul_cast(k: int = 8, n: int = 6, batch: int = 3, seed: int = 0) -> onnx.ModelProto:
    """`Y = X @ Cast<float>(W)` with an fp16 `W[K, N]`, then an `Identity`, node `mm`."""
    rng = _rng(seed)
    nodes = [
        helper.make_node("Cast", ["W"], ["Wf"], name="cast", to=F32),
        helper.make_node("Identity", ["Wf"], ["Wi"], name="ident"),
        helper.make_node("MatMul", ["X", "Wi"], ["Y"], name="mm"),
    ]
    w = _weights(rng, (k, n)).astype(np.float16)
    return make_model(nodes, [_x((batch, k))], [_y((batch, n))], {"W": w})


#: layouts of `matmul_dequant`: stored int8 tensor and what sits between it and the MatMul
DQ_LAYOUTS = ("kn", "nk_dq_transpose", "nk_transpose_dq")


def matmul_dequant(
    k: int = 8, n: int = 6, per_axis: bool = False, layout: str = "kn", batch: int = 3, seed: int = 0
) -> onnx.ModelProto:
    """`Y = X @ DequantizeLinear(W, S, Z)` with an int8 weight and non-zero zero points, node `mm`.

    layout `"kn"`: `W[K, N]` -> DQ (axis 1) -> MatMul; `"nk_dq_transpose"`: `W[N, K]` -> DQ
    (axis 0) -> Transpose -> MatMul; `"nk_transpose_dq"`: `W[N, K]` -> Transpose -> DQ (axis 1)
    -> MatMul. Per-axis scales and zero points run along N; per-tensor ones are scalars.
    """
    rng = _rng(seed)
    stored = (k, n) if layout == "kn" else (n, k)
    q = rng.integers(-100, 101, size=stored).astype(np.int8)
    if per_axis:
        scale = rng.uniform(0.01, 0.05, size=n).astype(np.float32)
        zero = rng.integers(-5, 6, size=n).astype(np.int8)
    else:
        scale = np.array(0.02, np.float32)
        zero = np.array(3, np.int8)
    axis = {"kn": 1, "nk_dq_transpose": 0, "nk_transpose_dq": 1}[layout]
    dq = dict(axis=axis) if per_axis else {}
    if layout == "kn":
        nodes = [helper.make_node("DequantizeLinear", ["W", "S", "Z"], ["Wd"], name="dq", **dq)]
        last = "Wd"
    elif layout == "nk_dq_transpose":
        nodes = [
            helper.make_node("DequantizeLinear", ["W", "S", "Z"], ["Wd"], name="dq", **dq),
            helper.make_node("Transpose", ["Wd"], ["Wt"], name="tr", perm=[1, 0]),
        ]
        last = "Wt"
    else:
        nodes = [
            helper.make_node("Transpose", ["W"], ["Wt"], name="tr", perm=[1, 0]),
            helper.make_node("DequantizeLinear", ["Wt", "S", "Z"], ["Wd"], name="dq", **dq),
        ]
        last = "Wd"
    nodes.append(helper.make_node("MatMul", ["X", last], ["Y"], name="mm"))
    return make_model(nodes, [_x((batch, k))], [_y((batch, n))], {"W": q, "S": scale, "Z": zero})


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int = 1) -> np.ndarray:
    """numpy DequantizeLinear (per-tensor for scalar scale, else per-axis along `axis`)."""
    if np.ndim(scale):
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q.astype(np.float32) - zero.astype(np.float32)) * scale).astype(np.float32)


def tied_matmuls(d: int = 6, batch: int = 3, seed: int = 0) -> onnx.ModelProto:
    """`Y = (X @ W) + (Relu(X) @ W)`: one `W[d, d]` read by MatMuls `mm_a` and `mm_b`."""
    rng = _rng(seed)
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["a"], name="mm_a"),
        helper.make_node("Relu", ["X"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W"], ["b"], name="mm_b"),
        helper.make_node("Add", ["a", "b"], ["Y"], name="add"),
    ]
    return make_model(nodes, [_x((batch, d))], [_y((batch, d))], {"W": _weights(rng, (d, d))})


def tied_through_transpose(k: int = 6, n: int = 4, batch: int = 3, seed: int = 0) -> onnx.ModelProto:
    """`W[N, K]` -> one Transpose whose output both `mm_a` and `mm_b` read; `Y = X@Wt + Relu(X)@Wt`."""
    rng = _rng(seed)
    nodes = [
        helper.make_node("Transpose", ["W"], ["Wt"], name="tr", perm=[1, 0]),
        helper.make_node("MatMul", ["X", "Wt"], ["a"], name="mm_a"),
        helper.make_node("Relu", ["X"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "Wt"], ["b"], name="mm_b"),
        helper.make_node("Add", ["a", "b"], ["Y"], name="add"),
    ]
    return make_model(nodes, [_x((batch, k))], [_y((batch, n))], {"W": _weights(rng, (n, k))})


def matmul_constant_node(k: int = 8, n: int = 6, batch: int = 3, seed: int = 0) -> onnx.ModelProto:
    """`Y = X @ W` with `W[K, N]` held in a `Constant` node (output `W`), node `mm`."""
    rng = _rng(seed)
    w = _weights(rng, (k, n))
    nodes = [
        helper.make_node("Constant", [], ["W"], name="const", value=numpy_helper.from_array(w, "W")),
        helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm"),
    ]
    return make_model(nodes, [_x((batch, k))], [_y((batch, n))], {})


def embedding(vocab: int = 10, dim: int = 4, seq: int = 5, seed: int = 0) -> onnx.ModelProto:
    """`Y = Gather(W[vocab, dim], ids)` with int64 input `ids[2, seq]`, node `embed`."""
    rng = _rng(seed)
    node = helper.make_node("Gather", ["W", "ids"], ["Y"], name="embed", axis=0)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [2, seq])
    return make_model([node], [ids], [_y((2, seq, dim))], {"W": _weights(rng, (vocab, dim))})


# ------------------------------------------------------------------ ops without a weight
def matmul_two_activations(k: int = 4, n: int = 5, batch: int = 3) -> onnx.ModelProto:
    """`Y = X @ Z` with both inputs activations, node `mm`."""
    z = helper.make_tensor_value_info("Z", F32, [k, n])
    node = helper.make_node("MatMul", ["X", "Z"], ["Y"], name="mm")
    return make_model([node], [_x((batch, k)), z], [_y((batch, n))], {})


def matmul_constant_a(k: int = 4, n: int = 5, batch: int = 3, seed: int = 0) -> onnx.ModelProto:
    """`Y = Transpose(A) @ X`: the constant is the left operand (through a chain), node `mm`."""
    rng = _rng(seed)
    nodes = [
        helper.make_node("Transpose", ["A"], ["At"], name="tr", perm=[1, 0]),
        helper.make_node("MatMul", ["At", "X"], ["Y"], name="mm"),
    ]
    return make_model(nodes, [_x((k, n))], [_y((batch, n))], {"A": _weights(rng, (k, batch))})


def matmul_3d_weight(k: int = 4, n: int = 5, heads: int = 2, seed: int = 0) -> onnx.ModelProto:
    """`Y = X @ W` with a 3-D `W[heads, K, N]` (batched), node `mm`."""
    rng = _rng(seed)
    node = helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")
    return make_model([node], [_x((heads, 3, k))], [_y((heads, 3, n))], {"W": _weights(rng, (heads, k, n))})


# ------------------------------------------------------------------------------ helpers
def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The initializer `name` of `model` as numpy."""
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def constant(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The value of initializer `name` or of the `Constant` node whose output is `name`."""
    for node in model.graph.node:
        if node.op_type == "Constant" and list(node.output) == [name]:
            return numpy_helper.to_array(node.attribute[0].t)
    return initializer(model, name)


def num_weights(model: onnx.ModelProto) -> int:
    """Total number of elements of all initializers."""
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def random_input(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    """Seeded feeds for every graph input (float: normal; int64: ids below 10)."""
    rng = _rng(seed)
    feeds = {}
    for vi in model.graph.input:
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.elem_type == TensorProto.INT64:
            feeds[vi.name] = rng.integers(0, 10, size=shape).astype(np.int64)
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of `model` on CPU onnxruntime (one thread, no graph optimisation)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
