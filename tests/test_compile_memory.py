"""The llvm compile keeps one copy of the weights: the Relax import of a `Model` gives the
same module as the import of its ModelProto, without the weight bytes in any proto, and the
lifted params, kernel arrays and model weights share memory instead of being copies."""

import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import tvm
from onnx import helper

from sparsegraph.codegen import relax_build
from sparsegraph.codegen.cpu_kernels import as_numpy, build_dense
from sparsegraph.codegen.llvm_compile import compile_llvm, linear_weights
from sparsegraph.model import Model
from sparsegraph.pass_manager import PassContext
from sparsegraph.runtime import Session
from sparsegraph.validate import run

from graphs import F32, _weights, make_model


def mixed_model(d: int = 128, h: int = 256, batch: int = 2) -> onnx.ModelProto:
    """Weights the import lifts (MatMul B, Gemm B and C, a Gather table) and ones it must
    keep in the proto: one read through a Transpose, one also read by a ReduceMean."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["e"], name="embed", axis=0),
        helper.make_node("MatMul", ["e", "W_up"], ["u"], name="up"),
        helper.make_node("Relu", ["u"], ["r"], name="relu"),
        helper.make_node("Transpose", ["W_dn_t"], ["W_dn"], name="tr", perm=[1, 0]),
        helper.make_node("MatMul", ["r", "W_dn"], ["o"], name="down"),
        helper.make_node("Gemm", ["o", "G", "c"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "S"], ["s"], name="shared_mm"),
        helper.make_node("ReduceMean", ["S"], ["m"], name="shared_mean", axes=[0]),
        helper.make_node("Add", ["s", "m"], ["Y"], name="add"),
    ]
    ids = helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [batch])
    y = helper.make_tensor_value_info("Y", F32, [batch, d])
    inits = {
        "E": _weights(rng, (512, d)),
        "W_up": _weights(rng, (d, h)),
        "W_dn_t": _weights(rng, (d, h)),
        "G": _weights(rng, (d, d)),
        "c": _weights(rng, (d,)),
        "S": _weights(rng, (d, d)),
    }
    return make_model(nodes, [ids], [y], inits)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mem") / "m.onnx"
    onnx.save(mixed_model(), path)
    return path


def test_skeleton_lifts_only_data_weights_and_imports_the_same_module(model_file):
    model = Model.load(model_file)
    relax_build.share_weights(model)
    skeleton, lifted = relax_build._skeleton(model)
    assert set(lifted) == {"E", "W_up", "G"}  # W_dn_t feeds a Transpose, S a ReduceMean, c < 64 KiB
    stored = {t.name: t.ByteSize() for t in skeleton.graph.initializer}
    assert not set(lifted) & set(stored)  # no lifted weight's bytes in the proto
    shapes = {"ids": [2]}
    by_proto = relax_build.import_bucket(onnx.load(model_file), shapes)
    by_model = relax_build.import_bucket(model, shapes)
    fold = tvm.relax.transform.FoldConstant()
    a, b = (fold(tvm.IRModule({"main": f}))["main"] for f in (by_proto, by_model))
    tvm.ir.assert_structural_equal(a, b, map_free_vars=True)
    assert int(b.attrs["num_input"]) == 1


def test_compile_shares_weights_between_model_params_and_kernels(model_file, tmp_path):
    model = Model.load(model_file)
    relax_build.share_weights(model)
    weights = linear_weights(model, model_file, PassContext(0), contiguous=False)
    arrays = {t.name: t.values for t in model.graph.tensors().values() if hasattr(t, "values")}
    for _, w in weights.values():  # the dispatcher sees the model's arrays, not copies
        assert any(np.shares_memory(w, a) for a in arrays.values())
    target = tvm.target.Target("llvm")
    _, _, params, _ = relax_build.build_module(
        model, {"b": {"ids": [2]}}, lambda *a: None, set(weights), target
    )
    for name in ("E", "W_up"):  # no kernel: the lifted param is the model's memory (G is
        # transposed by the import, a folded copy)
        assert any(np.shares_memory(p, arrays[name]) for p in params.values()), name
    kernel = build_dense(np.ascontiguousarray(arrays["G"]), 2, target)
    assert np.shares_memory(kernel.weights["Wp"], as_numpy(kernel.args[1]))  # one packed copy
    del kernel
    gc.collect()
    manifest = compile_llvm(
        model_file, tmp_path, batch_sizes=[2], db_path=tmp_path / "db.json", tune_trials=1
    )
    assert manifest["kernels_swapped"] >= 3
    ids = np.array([3, 17])
    (got,) = Session(tmp_path).run(["Y"], {"ids": ids})
    ref = run(model_file, {"ids": ids})["Y"]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


PEAK = textwrap.dedent(
    """
    import gc, sys
    from pathlib import Path
    import numpy as np, onnx, tvm
    from onnx import helper
    from sparsegraph.codegen import relax_build
    from sparsegraph.model import Model
    from graphs import F32, make_model

    n, k, d = 4, 4096, 2048  # 4 MatMuls with 32 MB weights: 128 MB
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", f"W{i}"], [f"h{i}"]) for i in range(n)]
    nodes.append(helper.make_node("Sum", [f"h{i}" for i in range(n)], ["y"]))
    inits = {f"W{i}": rng.standard_normal((k, d)).astype(np.float32) for i in range(n)}
    x, y = helper.make_tensor_value_info("x", F32, [1, k]), helper.make_tensor_value_info("y", F32, [1, d])
    onnx.save(make_model(nodes, [x], [y], inits), sys.argv[1], save_as_external_data=True)
    del inits, nodes
    model = Model.load(sys.argv[1]) if sys.argv[2] == "model" else onnx.load(sys.argv[1])
    if sys.argv[2] == "model":
        relax_build.share_weights(model)
    gc.collect()
    status = lambda key: int(next(l for l in Path("/proc/self/status").read_text().splitlines()
                                  if l.startswith(key)).split()[1]) * 1024
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS
    before = status("VmRSS:")
    relax_build.build_module(model, {"b": {"x": [1, k]}}, lambda *a: None, set(), tvm.target.Target("llvm"))
    print((status("VmHWM:") - before) / (n * k * d * 4))
    """
)


def _growth(tmp_path, source: str) -> float:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(tmp_path / "m.onnx"), source],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def test_import_and_build_of_a_model_add_no_copy_of_the_weights(tmp_path):
    """Peak RSS growth while importing, lifting and building a model whose weights no
    kernel takes (every weight ends as a param), in weight bytes: from a `Model` the
    weights are not copied (measured 0.26x: the TVM compile's own memory); from its
    ModelProto (the specialised protos, the Relax constants, the params) they were copied
    over and over (measured 5.0x with `_growth(tmp_path, "proto")`)."""
    growth = _growth(tmp_path, "model")
    assert growth < 0.5, f"the build from a Model grew the peak RSS by {growth:.2f}x the weights"
