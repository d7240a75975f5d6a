"""The cuBLAS dispatch candidate (`sparsegraph.codegen.cublas`).

Without a GPU (CI): the library search and its errors, the kernel record, and a compiled
module that calls cuBLAS by name (``call_dps_packed``) builds for CUDA; a Session refuses a
folder whose module calls a function it cannot provide. With a GPU and a libcublas: the
GEMM matches numpy (fp16 X and W; tolerance max |y - ref| / max |ref| <= 2e-3, ref in
float64 from the same fp16 values), and stories260K run with every linear op on cuBLAS
matches onnxruntime within the fp16-weight tolerance of `test_cuda_compile`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import sparsegraph as sg
from sparsegraph.codegen import cublas
from sparsegraph.codegen import cuda_kernels as ck
from sparsegraph.codegen.cuda_dispatch import gpu_visible
from sparsegraph.compile import resolve_target
from sparsegraph.runtime import Session

from paths import STORIES

GPU_AND_CUBLAS = gpu_visible() and cublas.available()
needs_cublas = pytest.mark.skipif(not GPU_AND_CUBLAS, reason="needs a CUDA GPU and a libcublas")
TOL = 2e-3


@pytest.fixture
def fresh_library():
    cublas._library.cache_clear()
    yield
    cublas._library.cache_clear()


def test_library_search_honours_the_override(monkeypatch, tmp_path, fresh_library):
    bogus = tmp_path / "libcublas.so.99"
    bogus.write_bytes(b"not a library")
    monkeypatch.setenv("SPARSEGRAPH_CUBLAS", str(bogus))
    assert cublas.library_path() == str(bogus)
    assert not cublas.available()  # it does not load: no candidate, no crash
    with pytest.raises(RuntimeError, match="SPARSEGRAPH_CUBLAS"):
        cublas.gemm(None, None, None)


def test_kernel_record_and_fp32_x_is_unfit():
    w = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    kern = ck.build("cublas", w, 3, x_dtype="float16")
    assert kern.extern == cublas.FUNC and kern.prim_func is None
    assert kern.nbytes == 64 * 128 * 2 and kern.weights["w"].dtype == np.float16
    with pytest.raises(ck.fmts.UnfitError, match="fp16 X"):
        ck.build("cublas", w, 3, x_dtype="float32")


def _module_on_cublas(tmp_path):
    """stories260K with every linear op on the cuBLAS candidate, built for CUDA (no GPU needed)."""
    import onnx

    from sparsegraph.codegen import relax_build
    from sparsegraph.codegen.llvm_compile import linear_weights
    from sparsegraph.model import Model
    from sparsegraph.pass_manager import PassContext

    target = resolve_target("cuda")
    weights = linear_weights(Model.load(STORIES), STORIES, PassContext(0))

    def choose(key, m, tag):
        return ck.build("cublas", weights[key][1], m, target, "float16")

    buckets = {"b2_s8": {"tokens": [2, 8]}}
    built = relax_build.build_module(onnx.load(str(STORIES)), buckets, choose, set(weights), target)
    return target, weights, built


def test_a_module_calls_cublas_by_name(tmp_path):
    _, weights, (ex, swaps, _, _) = _module_on_cublas(tmp_path)
    assert len(swaps) == len(weights) and {fmt for _, _, fmt in swaps} == {"cublas"}
    assert cublas.FUNC in ex.as_text()  # the VM calls it by name


def test_session_names_the_function_it_cannot_provide(tmp_path, monkeypatch):
    """Checked before the module loads, so no GPU is needed to see it."""
    (tmp_path / "module.so").write_bytes(b"")
    np.savez(tmp_path / "params.npz")
    monkeypatch.setattr(cublas, "available", lambda: False)
    cases = [("other.func", "calls 'other.func', which sparsegraph does not"), (cublas.FUNC, "no libcublas")]
    for name, message in cases:
        manifest = {"device": "cuda", "inputs": [], "outputs": [], "buckets": [], "extern_functions": [name]}
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(sg.UsageError, match=message):
            Session(tmp_path)


@needs_cublas
@pytest.mark.parametrize("m", [1, 5, 64])
@pytest.mark.parametrize("y_dtype", ["float16", "float32"])
def test_gemm_matches_numpy_on_gpu(m, y_dtype):
    import tvm

    rng = np.random.default_rng(m)
    x = rng.standard_normal((m, 192)).astype(np.float16)
    w = rng.standard_normal((320, 192)).astype(np.float16)
    dev = tvm.cuda(0)
    y = tvm.runtime.empty((m, 320), y_dtype, dev)
    cublas.gemm(tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev), y)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    assert np.abs(y.numpy() - ref).max() <= TOL * np.abs(ref).max()


@needs_cublas
def test_stories_on_cublas_matches_onnxruntime(tmp_path):
    from test_cuda_compile import TOL_FP16_WEIGHTS, _gpu_logits_error

    cublas.register()
    _, _, (ex, _, params, names) = _module_on_cublas(tmp_path)
    assert _gpu_logits_error(ex, params, names, STORIES, "b2_s8", (2, 8), seed=1) < TOL_FP16_WEIGHTS


def test_extern_kernels_are_timed_inside_a_vm_function():
    """`GPUTimer` times an extern kernel as a compiled model calls it (``call_dps_packed`` in
    a Relax VM function); checked on the CPU with a numpy GEMM registered in its place."""
    import tvm
    import tvm_ffi

    from sparsegraph.codegen.cuda_dispatch import GPUTimer

    calls = []

    def numpy_gemm(x, w, y):
        calls.append(tuple(x.shape))
        y.copyfrom((x.numpy().astype(np.float32) @ w.numpy().astype(np.float32).T).astype(np.float16))

    tvm_ffi.register_global_func("sparsegraph.test_gemm", numpy_gemm, override=True)
    tvm_ffi.register_global_func("sparsegraph.flush_l2", lambda *a: None, override=True)
    timer = GPUTimer.__new__(GPUTimer)  # the GPU timer's method on a CPU device
    timer.target, timer.dev, timer.repeat = tvm.target.Target("llvm"), tvm.cpu(), 3
    timer._rng = np.random.default_rng(0)
    w = np.random.default_rng(1).standard_normal((24, 16)).astype(np.float32)
    kern = ck.build("cublas", w, 2, x_dtype="float16")
    kern.extern = "sparsegraph.test_gemm"
    seconds = timer.kernel(kern, 2, 16)
    assert seconds > 0 and calls and set(calls) == {(2, 16)}
