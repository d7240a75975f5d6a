"""cuBLAS as a dense dispatch candidate on CUDA: ``Y[M, N] = X[M, K] @ W[N, K].T`` in fp16.

The TVM wheel has no cuBLAS contrib, so this binds ``cublasGemmEx`` itself (ctypes on the
``libcublas`` a CUDA install or the ``nvidia-cublas`` wheel provides; no CUDA headers, no
build step) and registers it as the global packed function `FUNC`. A compiled module calls
it with ``call_dps_packed`` (see `relax_build`), so it runs inside the module's VM on the
stream TVM uses (`tvm_ffi.get_raw_stream`), fp16 X and W, fp32 accumulation, fp16 Y. The
module then needs `register()` to have run in the process (`runtime.Session` does it when
the manifest lists `FUNC`).

Why: at prefill our tensor-core GEMM (`cuda_mma`) reaches 0.59-0.72x cuBLAS on the H100,
and at M = 16-64 the dense kernels 0.87-0.96x; with cuBLAS among the candidates measured
dispatch can keep the vendor GEMM wherever our kernels lose, so no shape runs slower than
dense. The call goes through Python (a few µs of CPU per call), which dispatch's
measurements include only as far as they show on the GPU; the compile's whole-model timing
(`llvm_compile.ship_faster`) sees it.

Search order for the library: ``$SPARSEGRAPH_CUBLAS``, ``nvidia/cublas/lib`` and
``nvidia/cu*/lib`` under ``sys.path`` (the pip wheels torch and cupy install), the loader's
``cublas``, ``$CUDA_HOME/lib64`` and ``/usr/local/cuda/lib64``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import sys
from typing import Any

FUNC = "sparsegraph.cublas_gemm"

_OP_N, _OP_T = 0, 1
_COMPUTE_32F = 68  # cublasComputeType_t CUBLAS_COMPUTE_32F
_GEMM_DEFAULT = -1  # cublasGemmAlgo_t CUBLAS_GEMM_DEFAULT (tensor cores where the types allow)
_CUDA_TYPES = {"float16": 2, "float32": 0, "bfloat16": 14}  # cudaDataType_t


def library_path() -> str | None:
    """The libcublas to load (see the module docstring for the order), or None."""
    if os.environ.get("SPARSEGRAPH_CUBLAS"):
        return os.environ["SPARSEGRAPH_CUBLAS"]
    for base in sys.path:
        for pattern in ("nvidia/cublas/lib/libcublas.so*", "nvidia/cu*/lib/libcublas.so*"):
            hits = sorted(glob.glob(os.path.join(base or ".", pattern)))
            if hits:
                return hits[-1]
    found = ctypes.util.find_library("cublas")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        hits = sorted(glob.glob(os.path.join(root, "lib64", "libcublas.so*"))) if root else []
        if hits:
            return hits[-1]
    return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    path = library_path()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    lib.cublasSetStream_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.cublasGemmEx.argtypes = [
        ctypes.c_void_p,  # handle
        ctypes.c_int, ctypes.c_int,  # transa, transb
        ctypes.c_int, ctypes.c_int, ctypes.c_int,  # m, n, k
        ctypes.c_void_p,  # alpha
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int,  # A, Atype, lda
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int,  # B, Btype, ldb
        ctypes.c_void_p,  # beta
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int,  # C, Ctype, ldc
        ctypes.c_int, ctypes.c_int,  # computeType, algo
    ]  # fmt: skip
    return lib


def available() -> bool:
    """True when a libcublas loads here (a GPU is not needed to say so)."""
    return _library() is not None


_handles: dict[int, ctypes.c_void_p] = {}
_ONE, _ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)


def _handle(device_id: int) -> ctypes.c_void_p:
    """One cuBLAS handle per GPU, created on the first call (the caller's current device)."""
    if device_id not in _handles:
        h = ctypes.c_void_p()
        _check(_library().cublasCreate_v2(ctypes.byref(h)), "cublasCreate")
        _handles[device_id] = h
    return _handles[device_id]


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


def gemm(x: Any, w: Any, y: Any) -> None:
    """``y[M, N] = x[M, K] @ w[N, K].T`` on the GPU (TVM / DLPack tensors, row-major, x and w
    of one dtype; fp32 accumulation). cuBLAS is column-major, so this computes
    ``y.T = w @ x.T``: ``op(A) = w`` (A = w read transposed), ``B = x.T``."""
    lib = _library()
    if lib is None:
        raise RuntimeError("no libcublas found (set SPARSEGRAPH_CUBLAS to its path)")
    import tvm_ffi

    (m, k), (n, k2) = tuple(x.shape), tuple(w.shape)
    if k2 != k or tuple(y.shape) != (m, n) or str(x.dtype) != str(w.dtype):
        raise ValueError(f"cuBLAS gemm: x {x.shape} {x.dtype}, w {w.shape} {w.dtype}, y {y.shape}")
    dev = x.device
    h = _handle(dev.index)
    _check(lib.cublasSetStream_v2(h, tvm_ffi.get_raw_stream(dev) or None), "cublasSetStream")
    xt, yt = _CUDA_TYPES[str(x.dtype)], _CUDA_TYPES[str(y.dtype)]
    status = lib.cublasGemmEx(
        h, _OP_T, _OP_N, n, m, k,
        ctypes.byref(_ONE), w.data_ptr(), xt, k, x.data_ptr(), xt, k,
        ctypes.byref(_ZERO), y.data_ptr(), yt, n, _COMPUTE_32F, _GEMM_DEFAULT,
    )  # fmt: skip
    _check(status, "cublasGemmEx")


def register() -> None:
    """Register `gemm` as the global packed function `FUNC` (idempotent)."""
    import tvm_ffi

    if tvm_ffi.get_global_func(FUNC, allow_missing=True) is None:
        tvm_ffi.register_global_func(FUNC, gemm)
