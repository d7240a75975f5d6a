"""Lower a portable ONNX model to a TVM Relax module whose linear ops run our kernels.

For each static input shape ("bucket") the model is specialised (symbolic dims fixed,
shape arithmetic folded), imported with `tvm.relax.frontend.onnx.from_onnx`, and every
`relax.matmul` whose right operand is a constant weight of the model is replaced by
`call_tir` to the kernel chosen for that op at that M (a `cpu_kernels.CPUKernel`, sparse or
dense packed), with the activation reshaped to `[M, K]` and the result back to `[..., N]`.
All buckets live in one IRModule as functions `main_<tag>`, compiled once for the target.

Weights are matched to ops by content (a hash of `W_onnx[K, N]`), so the import's naming
does not matter.

Memory: given a `Model` (rather than a ModelProto), the weights exist once. `share_weights`
moves the model's large constants into 64-byte-aligned TVM memory (the model keeps numpy
views of it); the import specialises a skeleton of the model in which the large weights
read only by MatMul/Gemm/Gather are graph inputs (no weight bytes in any ONNX proto), and
binds those inputs to the shared tensors afterwards; kernels' packed arrays and the lifted
params are views of TVM tensors, not copies (`as_tvm`, `np.from_dlpack`).
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from sparsegraph.codegen.cpu_kernels import as_numpy, as_tvm
from sparsegraph.codegen.cpu_schedule import compile_cpu
from sparsegraph.codegen.hugepages import hugepage_array
from sparsegraph.errors import UsageError
from sparsegraph.model import Model

MATMUL = tvm.ir.Op.get("relax.matmul")
#: constants of at least this many bytes are shared with TVM (`share_weights`) and, where
#: only MatMul/Gemm/Gather read them as data, kept out of the protos the import goes through
SHARE_BYTES = 1 << 16
#: ops (and the input positions) that only read a tensor's values: a weight consumed only
#: there can be an input of the skeleton the import specialises, and a constant again after
_DATA_INPUTS = {"MatMul": (0, 1), "Gemm": (0, 1, 2), "Gather": (0,)}


def weight_key(w_onnx: np.ndarray) -> str:
    """Content key of a matmul right operand `W_onnx[K, N]` (float32, C order)."""
    a = np.ascontiguousarray(w_onnx, dtype=np.float32)
    h = hashlib.sha1(repr(a.shape).encode())
    h.update(memoryview(a).cast("B"))  # the bytes in place: no copy of a large weight
    return h.hexdigest()


def share_weights(model: Model, min_bytes: int = SHARE_BYTES) -> None:
    """Move every constant of `model`'s graph of at least `min_bytes` into aligned memory
    that TVM tensors can share (on huge pages where the OS grants them, as the runtime
    loads them: the compile's timings see the same memory, `hugepages`): the import binds
    those tensors, and weights handed to kernels are views, so one copy of the weights
    serves the whole compile. Every constant is loaded, so the ModelProto the load read
    (which unloaded constants reference) can be freed."""
    for t in model.graph.tensors().values():
        if isinstance(t, gs.Constant):
            v = t.values
            if v.nbytes >= min_bytes and v.dtype.kind in "fiu":
                t.values = hugepage_array(v)
    gc.collect()


def _skeleton(model: Model, min_bytes: int = SHARE_BYTES) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """`model` as a ModelProto whose large float weights read only as data by MatMul, Gemm
    (any input) or Gather (the table) are graph inputs instead of initializers (appended
    after the model's inputs), and those weights by name. Nothing downstream of such a
    weight could be folded before the import (its consumer also reads a graph input)."""
    graph = model.graph.copy()  # copies nodes and tensors, not the weights' arrays
    lifted: dict[str, np.ndarray] = {}
    outputs = {t.name for t in graph.outputs}
    for name, t in graph.tensors().items():
        if not isinstance(t, gs.Constant) or name in outputs or not t.outputs:
            continue
        v = t.values
        if v.nbytes < min_bytes or v.dtype.kind != "f":
            continue
        uses = [(n.op, i) for n in t.outputs for i, x in enumerate(n.inputs) if x is t]
        if all(i in _DATA_INPUTS.get(op, ()) for op, i in uses):
            t.to_variable(dtype=v.dtype, shape=list(v.shape))
            t.type = "tensor_type"  # what gs.Variable() sets and to_variable does not
            graph.inputs.append(t)
            lifted[name] = v
    return Model(graph, model.meta).to_proto(), lifted


def specialise(proto: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """The model with every graph input given the static shape in `shapes` and shape
    arithmetic folded to constants (what Relax's importer needs to see static shapes)."""
    graph = gs.import_onnx(proto)
    for t in graph.inputs:
        if t.name not in shapes:
            raise UsageError(f"no static shape given for model input {t.name!r}")
        t.shape = list(shapes[t.name])
    graph.cleanup()
    count = None
    while count != len(graph.nodes):  # to a fixed point: a folded Reshape target makes the
        count = len(graph.nodes)  # next layer's shapes inferable (TorchScript exports)
        graph = gs.import_onnx(onnx.shape_inference.infer_shapes(gs.export_onnx(graph)))
        _fold_static_shapes(graph)
        graph.fold_constants(fold_shapes=True, error_ok=True).cleanup().toposort()
    return gs.export_onnx(graph)


def _fold_static_shapes(graph: gs.Graph) -> None:
    """Every `Shape` with `start` / `end` (opset 15+) of a static-shape tensor becomes a
    constant: onnx-graphsurgeon 0.6's `fold_shapes` ignores them (it folds the whole shape,
    so `Shape(x, start=1, end=2)` of dynamo exports came out two long)."""
    for node in graph.nodes:
        sliced = node.op == "Shape" and ("start" in node.attrs or "end" in node.attrs)
        shape = node.inputs[0].shape if sliced else None
        if shape is None or not all(isinstance(d, int) for d in shape):
            continue
        dims = shape[slice(node.attrs.get("start", 0), node.attrs.get("end"))]  # ONNX clamps as slicing does
        out = node.outputs[0]
        node.outputs.clear()
        out.to_constant(np.array(dims, dtype=np.int64))


def import_bucket(
    proto: onnx.ModelProto | Model,
    shapes: dict[str, list[int]],
    lifted: tuple[onnx.ModelProto, dict[str, tvm.runtime.Tensor]] | None = None,
) -> relax.Function:
    """The Relax function for one static-shape bucket of the model (a ModelProto with its
    weights, or a `Model`: imported through its `_skeleton`, the weights then bound as
    constants). `lifted`: a skeleton and its weights as tvm tensors, made once for several
    buckets (`_import_source`)."""
    if isinstance(proto, Model) and lifted is None:
        lifted = _import_source(proto)
    if lifted is None:
        return from_onnx(specialise(proto, shapes), keep_params_in_input=False)["main"]
    skeleton, tensors = lifted
    spec = specialise(skeleton, {**shapes, **{k: list(v.shape) for k, v in tensors.items()}})
    func = from_onnx(spec, keep_params_in_input=False)["main"]
    inits = {t.name for t in spec.graph.initializer}
    names = [i.name for i in spec.graph.input if i.name not in inits]
    if len(names) != len(func.params):
        raise RuntimeError(f"import: {len(func.params)} parameters for {len(names)} graph inputs")
    bound = {v: relax.const(tensors[n]) for v, n in zip(func.params, names, strict=True) if n in tensors}
    return func.bind_params(bound).with_attr("num_input", len(names) - len(bound))


def _import_source(model: Model) -> tuple[onnx.ModelProto, dict[str, tvm.runtime.Tensor]]:
    """The model's `_skeleton` and its lifted weights as CPU tvm tensors (sharing the
    model's memory after `share_weights`)."""
    skeleton, arrays = _skeleton(model)
    return skeleton, {k: as_tvm(v) for k, v in arrays.items()}


@relax.expr_functor.mutator
class _SwapLinear(relax.PyExprMutator):
    """Replace `matmul(x, const W)` by `call_tir(kernel, x2d, *packed)` where `choose` gives a
    kernel (`call_dps_packed` for a kernel that is a registered function, `kernel.extern`)."""

    def __init__(self, mod: tvm.IRModule, choose: Callable[[str, int, str], Any], keys: set[str]):
        super().__init__(mod)
        self.mod_ = mod
        self.choose = choose
        self.keys = keys
        self.replaced: list[tuple[str, int, str]] = []
        self._gvars: dict[str, Any] = {}
        self._tag = ""

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if call.op != MATMUL or len(call.args) != 2:
            return call
        w = call.args[1]
        if not isinstance(w, tvm.ir.expr.GenericConst):
            return call
        if len(w.ty.shape) != 2 or w.ty.dtype != "float32":
            return call
        value = as_numpy(w.value)
        key = weight_key(value)
        if key not in self.keys:
            return call
        x = call.args[0]
        x_shape = [int(d) for d in x.ty.shape]
        k, n = value.shape
        m = int(np.prod(x_shape[:-1]))
        kernel = self.choose(key, m, self._tag)
        if kernel is None:
            return call
        extern = getattr(kernel, "extern", None)  # a registered packed function (cuBLAS)
        symbol = kernel.symbol
        if extern is None and symbol not in self._gvars:
            self._gvars[symbol] = self.builder_.add_func(kernel.prim_func, symbol)
        x2d = self.builder_.emit(relax.op.reshape(x, [m, k])) if len(x_shape) != 2 else x
        xd = getattr(kernel, "x_dtype", "float32")  # a kernel taking fp16 X: cast X, and Y back
        if xd != "float32":
            x2d = self.builder_.emit(relax.op.astype(x2d, xd))
        consts = [relax.const(as_tvm(a)) for a in kernel.weights.values()]  # no copy of aligned arrays
        out_ty = relax.TensorType([m, n], xd)
        y = self.builder_.emit(
            relax.call_dps_packed(extern, [x2d, *consts], out_ty=out_ty)
            if extern
            else relax.call_tir(self._gvars[symbol], [x2d, *consts], out_ty=out_ty)
        )
        if xd != "float32":
            y = self.builder_.emit(relax.op.astype(y, "float32"))
        self.replaced.append((key, m, kernel.format))
        return relax.op.reshape(y, [*x_shape[:-1], n]) if len(x_shape) != 2 else y

    def run(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self._tag = gv.name_hint.removeprefix("main_")
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()


@relax.expr_functor.mutator
class _LiftConstants(relax.PyExprMutator):
    """Turn every constant of at least `min_bytes` into a function parameter, so weights live
    in a params file beside the module instead of inside it (a 7B layer would not export)."""

    def __init__(self, mod: tvm.IRModule, min_bytes: int = 1024):
        super().__init__(mod)
        self.mod_ = mod
        self.min_bytes = min_bytes
        self.params: dict[str, np.ndarray] = {}  # content-deduplicated, shared by all functions
        self.param_names: dict[str, list[str]] = {}  # function name -> names of its extra params
        self._vars: dict[str, Any] = {}

    def visit_generic_const_(self, const):
        value = as_numpy(const.value)  # a view of the constant's memory: params are not copies
        if value.nbytes < self.min_bytes:
            return const
        h = hashlib.sha1(value.dtype.str.encode() + repr(value.shape).encode())
        h.update(memoryview(np.ascontiguousarray(value)).cast("B"))
        name = "p" + h.hexdigest()[:20]
        self.params.setdefault(name, value)
        if name not in self._vars:
            self._vars[name] = relax.Var(name, const.ty)
        return self._vars[name]

    def run(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if not isinstance(func, relax.Function):
                continue
            self._vars = {}
            body = self.visit_expr(func.body)
            names = list(self._vars)
            self.param_names[gv.name_hint] = names
            new = relax.Function(
                list(func.params) + [self._vars[n] for n in names],
                body,
                func.ret_ty,
                func.is_pure,
                func.attrs,
            ).with_attr("num_input", len(func.params))
            self.builder_.update_func(gv, new)
        return self.builder_.get()


def build_module(
    proto: onnx.ModelProto | Model,
    buckets: dict[str, dict[str, list[int]]],
    choose: Callable[[str, int, str], Any],
    keys: set[str],
    target: Any,
    rewrites: Sequence[Callable[[tvm.IRModule], tvm.IRModule]] = (),
) -> tuple[Any, list[tuple[str, int, str]], dict[str, np.ndarray], dict[str, list[str]]]:
    """Compile one function `main_<tag>` per bucket.

    `rewrites` run in order on the imported, constant-folded module before the linear-op
    swap (e.g. fused kernels that claim a pattern around a matmul first). `choose(key, M,
    tag)` returns the `CPUKernel` for the weight with content `key` at M rows in bucket
    `tag` (or None to leave the matmul to TVM's lowering). On CPU every op our kernels do
    not run is scheduled by `cpu_schedule.compile_cpu`. Returns the executable, the swaps
    made, the lifted weights (name -> array) and, per function, the names of the weights it
    takes after the model inputs. `proto` may be a `Model` (see the module docstring on
    memory): the lifted params then share memory with the model's weights and kernels.
    """
    mod = tvm.IRModule()
    source = _import_source(proto) if isinstance(proto, Model) else None
    for tag, shapes in buckets.items():
        func = import_bucket(proto, shapes, source).with_attr("global_symbol", f"main_{tag}")
        mod[f"main_{tag}"] = func
    del source
    mod = relax.transform.FoldConstant()(mod)
    for rewrite in rewrites:
        mod = rewrite(mod)
    swapper = _SwapLinear(mod, choose, keys)
    mod = swapper.run()
    lifter = _LiftConstants(mod)
    mod = lifter.run()
    replaced, params, param_names = swapper.replaced, lifter.params, lifter.param_names
    _release(swapper, lifter)
    if str(target.kind.name) == "cuda":
        return compile_cuda_module(mod, target), replaced, params, param_names
    executable = compile_cpu(mod, target)  # TVM's CPU pipeline + schedules for the other ops
    del mod
    gc.collect()
    return executable, replaced, params, param_names


def compile_cuda_module(mod: tvm.IRModule, target: Any) -> Any:
    """Compile `mod` for a CUDA `target`: TVM's CUDA pipeline (Relax legalize, dlight's
    default GPU schedules ``Matmul, GEMV, Reduction, GeneralReduction, Fallback`` for every
    TIR function not already scheduled -- our kernels carry `tirx.is_scheduled` --, CUDA
    lowering) without operator fusion: in TVM 0.27 dlight's Matmul rule miscompiles fused
    matmul + epilogue functions (stories260K logits off by 0.44 relative with fusion,
    7.5e-7 without, on an H200; dropping the Matmul rule fixed it too, fusion off keeps its
    speed for plain matmuls). Needs no GPU: inside `with target:` the device code is
    generated; it becomes a cubin where a CUDA runtime is present (NVRTC, or nvcc with
    `TVM_CUDA_COMPILE_MODE=nvcc`), else when the module is loaded on a GPU."""
    from tvm.relax.backend.cuda import pipeline as cuda_pipeline
    from tvm.s_tir import dlight as dl

    legalize = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        dl.ApplyDefaultSchedule(
            dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()
        ),
    ]
    passes = (
        cuda_pipeline.library_dispatch_passes(target)
        + legalize
        + cuda_pipeline.dataflow_lower_passes(target)
        + cuda_pipeline.finalize_passes(target)
    )
    with target:
        mod = tvm.transform.Sequential(passes)(mod)
        executable = tvm.compile(mod, target=target, relax_pipeline=None)
    del mod
    gc.collect()
    return executable


def _release(*mutators) -> None:
    """Drop what the mutators reference: TVM keeps them alive from C++ (a cycle Python's GC
    cannot see), which otherwise leaked every module and weight copy of a build."""
    for m in mutators:
        for name in list(vars(m)):
            setattr(m, name, None)
    gc.collect()
