"""`sparse.onnx`: sparse linear ops stored compressed, as `sparsegraph.SparseMatMul` nodes.

`to_sparse(model)` replaces each sufficiently sparse `MatMul`/`Gemm` whose weight is a
plain initializer by one `SparseMatMul` node of the `sparsegraph` domain (version 1)
whose inputs are the activation, the packed arrays of its weight format
(`sparsegraph.codegen.formats`), and for a Gemm its bias. `to_portable(model)` turns every
such node back into the original op with the original weight layout and names; the
round trip keeps every weight value (pruned entries come back as +0.0).

SparseMatMul semantics, with `W[N, K]` the canonical weight that the arrays pack:
`Y = X @ W.T` (`orig_op="MatMul"`), or `Y = alpha * X @ W.T + beta * C` (`orig_op="Gemm"`).
Stock onnxruntime has no kernel for it: `sparse.onnx` is a compact artifact that the
compiled runtime reads, and that converts back to `portable.onnx` anywhere.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import defs

from sparsegraph.model import Model
from sparsegraph.pass_manager import Change, PassContext
from sparsegraph.passes.analysis.cost_model import op_cost
from sparsegraph.passes.analysis.sparsifiable import SparsifiableOps

from .formats import FORMATS

DOMAIN = "sparsegraph"
OP = "SparseMatMul"
VERSION = 1
_FORMAT_OF_COST = {"csr": ("csr", {}), "bitmap": ("bitmap", {"group": 16})}


def register_schema() -> None:
    """Register the SparseMatMul schema with onnx (idempotent), so onnx.checker knows it."""
    if defs.has(OP, DOMAIN):
        return
    Attr, AT = defs.OpSchema.Attribute, defs.OpSchema.AttrType
    schema = defs.OpSchema(
        OP,
        DOMAIN,
        VERSION,
        "Y = X @ W.T, or alpha * X @ W.T + beta * C for a Gemm; W[N, K] in a packed sparse format.",
        inputs=[
            defs.OpSchema.FormalParameter("X", "T", "activations [..., K]"),
            defs.OpSchema.FormalParameter(
                "arrays",
                "V",
                "the format's arrays in `array_names` order, then the Gemm bias C if `has_bias`",
                param_option=defs.OpSchema.FormalParameterOption.Variadic,
                is_homogeneous=False,
            ),
        ],
        outputs=[defs.OpSchema.FormalParameter("Y", "T", "[..., N]")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"], "activations"),
            (
                "V",
                [
                    f"tensor({t})"
                    for t in (
                        "float",
                        "float16",
                        "bfloat16",
                        "double",
                        "uint8",
                        "uint16",
                        "uint32",
                        "int8",
                        "int16",
                        "int32",
                        "int64",
                    )
                ],
                "packed arrays",
            ),
        ],
        attributes=[
            Attr("format", AT.STRING, "csr | bsr | nm | bitmap"),
            Attr("shape", AT.INTS, "[N, K] of the canonical weight"),
            Attr("array_names", AT.STRINGS, "names of the packed arrays, in input order"),
            Attr(
                "format_params",
                AT.INTS,
                "format parameters: csr [pad], bsr [r, c], nm [n, m], bitmap [group]",
            ),
            Attr("orig_op", AT.STRING, "MatMul or Gemm"),
            Attr("weight_name", AT.STRING, "initializer name of the weight in the portable model"),
            Attr("weight_layout", AT.STRING, "KN (MatMul, Gemm transB=0) or NK (Gemm transB=1)"),
            Attr("alpha", AT.FLOAT, "Gemm alpha", required=False),
            Attr("beta", AT.FLOAT, "Gemm beta", required=False),
            Attr("has_bias", AT.INT, "1 if the last input is the Gemm bias C", required=False),
        ],
    )
    defs.register_schema(schema)


def choose_format(w: np.ndarray) -> tuple[str, dict] | None:
    """The smallest format SparseMatMul holds (dense, CSR, bitmap, N:M, BSR) for `w[N, K]`
    per the cost model, or None if dense is smallest."""
    sizes = op_cost("w", w).bytes_by_format
    held = [k for k in sizes if k == "dense" or k in _FORMAT_OF_COST or k.startswith(("nm", "bsr"))]
    name = min(held, key=sizes.get)
    if name == "dense":
        return None
    if name.startswith("nm"):
        n, m = (int(v) for v in name[2:].split(":"))
        return "nm", {"n": n, "m": m}
    if name.startswith("bsr"):
        r, c = (int(v) for v in name[3:].split("x"))
        return "bsr", {"block": (r, c)}
    return _FORMAT_OF_COST[name]


def _params_list(fmt: str, params: dict) -> list[int]:
    if fmt == "csr":
        return [int(params.get("pad", 1))]
    if fmt == "bsr":
        return [int(v) for v in params["block"]]
    if fmt == "nm":
        return [int(params["n"]), int(params["m"])]
    return [int(params.get("group", 16))]


def _params_dict(fmt: str, values: list[int]) -> dict:
    return {
        "csr": lambda v: {"pad": v[0]},
        "bsr": lambda v: {"block": (v[0], v[1])},
        "nm": lambda v: {"n": v[0], "m": v[1]},
        "bitmap": lambda v: {"group": v[0]},
    }[fmt](values)


def to_sparse(
    model: Model, min_sparsity: float = 0.3, formats: dict[str, tuple[str, dict]] | None = None
) -> list[Change]:
    """Replace sparse MatMul/Gemm ops (plain, unshared initializer weights) by SparseMatMul.

    `formats` maps op names to `(format, params)`; other ops get `choose_format`. Ops whose
    weight is less sparse than `min_sparsity` or packs no smaller than dense stay as they are.
    """
    register_schema()
    ctx = PassContext()
    changes = []
    for op in ctx.get(SparsifiableOps, model).linear:
        ref = op.weight
        node = ref.node
        if node.op not in ("MatMul", "Gemm") or ref.chain or not isinstance(ref.source, gs.Constant):
            continue
        if len(ref.source.outputs) != 1 or (node.op == "Gemm" and node.attrs.get("transA", 0)):
            continue
        w = ref.matrix()
        sparsity = 1 - np.count_nonzero(w) / w.size
        choice = (formats or {}).get(op.name) or (choose_format(w) if sparsity >= min_sparsity else None)
        if choice is None:
            continue
        fmt_name, params = choice
        fmt = FORMATS[fmt_name].pack(w, **params)
        arrays = fmt.arrays()
        inputs = [node.inputs[0]] + [
            gs.Constant(f"{ref.source.name}.{key}", np.asarray(a)) for key, a in arrays.items()
        ]
        attrs = {
            "format": fmt_name,
            "shape": [int(d) for d in w.shape],
            "array_names": list(arrays),
            "format_params": _params_list(fmt_name, params),
            "orig_op": node.op,
            "weight_name": ref.source.name,
            "weight_layout": "NK" if node.op == "Gemm" and node.attrs.get("transB", 0) else "KN",
        }
        if node.op == "Gemm":
            bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            attrs.update(
                alpha=float(node.attrs.get("alpha", 1.0)),
                beta=float(node.attrs.get("beta", 1.0)),
                has_bias=int(bias is not None),
            )
            if bias is not None:
                inputs.append(bias)
        node.op, node.domain, node.attrs = OP, DOMAIN, attrs
        _set_inputs(node, inputs)
        changes.append(
            Change(
                op.name,
                "sparse",
                {
                    "format": fmt_name,
                    "bytes_dense": int(w.nbytes),
                    "bytes_sparse": int(fmt.nbytes()),
                    "sparsity": float(sparsity),
                },
            )
        )
    if changes:
        model.meta.opset_imports = [(d, v) for d, v in model.meta.opset_imports if d != DOMAIN] + [
            (DOMAIN, VERSION)
        ]
        model.graph.cleanup().toposort()
    return changes


def to_portable(model: Model) -> int:
    """Turn every SparseMatMul back into its original MatMul/Gemm; returns how many."""
    count = 0
    for node in model.graph.nodes:
        if node.op != OP or node.domain != DOMAIN:
            continue
        a = node.attrs
        names = list(a["array_names"])
        arrays = {k: t.values for k, t in zip(names, node.inputs[1 : 1 + len(names)], strict=True)}
        fmt = FORMATS[a["format"]].from_arrays(
            arrays, shape=tuple(a["shape"]), **_params_dict(a["format"], list(a["format_params"]))
        )
        w = fmt.unpack()
        stored = np.ascontiguousarray(w if a["weight_layout"] == "NK" else w.T)
        weight = gs.Constant(a["weight_name"], stored)
        bias = node.inputs[1 + len(names)] if a.get("has_bias", 0) else None
        x = node.inputs[0]
        if a["orig_op"] == "MatMul":
            node.op, node.attrs = "MatMul", {}
            _set_inputs(node, [x, weight])
        else:
            node.op = "Gemm"
            node.attrs = {
                "alpha": a.get("alpha", 1.0),
                "beta": a.get("beta", 1.0),
                "transB": int(a["weight_layout"] == "NK"),
            }
            _set_inputs(node, [x, weight] + ([bias] if bias is not None else []))
        node.domain = None
        count += 1
    if count:
        model.meta.opset_imports = [(d, v) for d, v in model.meta.opset_imports if d != DOMAIN]
        model.graph.cleanup().toposort()
    return count


def _set_inputs(node: gs.Node, inputs: list[gs.Tensor]) -> None:
    node.inputs.clear()
    node.inputs.extend(inputs)
