"""Dispatch on CUDA: for each weight and M, keep the sparse kernel that beats the dense matmul.

The dense alternative is the model's own matmul left in the Relax module, which the CUDA
build schedules with dlight (`relax_build.compile_cuda_module`) in the model's dtype. The
candidates are `cuda_kernels.candidates(w, m)` (sparse formats and our dense kernels, W
packed in fp16), each with its first `SCHEDULES_TRIED` schedules when measured.

* A CUDA GPU is visible (``tvm.cuda().exist``): every candidate and the dense matmul are
  compiled for the target and timed on the GPU with CUDA events (TVM's time evaluator),
  the 50 MB L2 flushed before each call by a device-to-device copy of twice its size; the
  fastest wins. Measured decisions go to the `TuningDB` (keyed by target, shape, pattern).
* No GPU (compiling for a GPU elsewhere, CI): a bytes model. A sparse candidate is chosen
  when the bytes it costs (`model_bytes`) are at most `BYTES_RATIO` x the bytes of W in
  fp16 dense (the smallest such one wins); decode is bound by the bytes it reads (see
  `cuda_kernels`), the CUDA-core kernels at M > 1 by their multiply-adds. The decision says
  ``measured: false``; its seconds are bytes / `MODEL_BANDWIDTH`, a prediction. Unmeasured
  decisions are not stored, so a later compile on a GPU measures.
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .dispatch import TuningDB, sparsity_bucket
from .formats import FORMATS, UnfitError

#: a sparse kernel must read at most this fraction of the fp16-dense bytes to win unmeasured
BYTES_RATIO = 0.8
#: bytes per second the bytes model assumes (a 256 MB read on the H100 streams at 2.74 TB/s)
MODEL_BANDWIDTH = 2.74e12
#: the bytes model's price of one multiply-add (stored entry x row of X) on CUDA cores, in
#: bytes read at `MODEL_BANDWIDTH`: the H100's delta CSR kernel at M = 16 on 4096x4096 took
#: 2.7 us more per million stored entries (1.7e-13 s per product)
PRODUCT_BYTES = 0.46
DENSE = "dense"  # the model's matmul, scheduled by dlight
#: schedules timed per candidate format (the first of `cuda_kernels.schedules`); the
#: tensor-core kernel's best tile depends on M and N more than its ordering knows (on the
#: H100 the narrow 64x32 wgmma tile wins at M = 64 on N = 4096, the fourth in its order)
SCHEDULES_TRIED = 2
MMA_SCHEDULES_TRIED = 4


@dataclass
class GPUDecision:
    """The kernel chosen for one weight at one M and why (times in seconds)."""

    format: str
    label: str
    seconds: float
    dense_seconds: float
    timings: dict[str, float]
    measured: bool
    nbytes: int
    dense_nbytes: int
    cold: bool = True
    from_db: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gpu_visible() -> bool:
    """True when TVM sees a CUDA device (needs a driver and TVM's CUDA runtime)."""
    import tvm

    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # no CUDA runtime library in this TVM build
        return False


def _kernels():
    """The CUDA kernel module, or None while it does not exist (dense only then)."""
    try:
        from . import cuda_kernels
    except ImportError:
        return None
    return cuda_kernels if hasattr(cuda_kernels, "candidates") and hasattr(cuda_kernels, "build") else None


def _x_dtype(fmt: str) -> str:
    """X's dtype in a kernel of `fmt`: the model's float32, except the tensor-core GEMM and
    cuBLAS, which take fp16 X (wgmma and ``cublasGemmEx`` need X and W of one dtype; the
    compiled graph casts X to fp16 and Y back, see `relax_build`)."""
    return "float16" if fmt in ("mma", "cublas") else "float32"


def _label(fmt: str, params: dict[str, Any]) -> str:
    extra = ",".join(f"{k}={v}" for k, v in params.items())
    return f"{fmt}({extra})" if extra else fmt


class CUDADispatcher:
    """Chooses a kernel per (weight, M); `kernel()` returns a `cuda_kernels.CUDAKernel`, or
    None to leave the matmul to dlight's dense schedule."""

    def __init__(self, target: Any, db: TuningDB, force: str | None = None, measure: bool | None = None):
        self.target = target
        self.db = db
        self.force = force  # "dense": no sparse kernels at all (the baseline build)
        self.measure = gpu_visible() if measure is None else measure
        self.kernels: dict[tuple[str, int], Any] = {}
        self.decisions: dict[tuple[str, int], GPUDecision] = {}
        self._timer: GPUTimer | None = None

    def kernel(self, name: str, w: np.ndarray, m: int) -> Any:
        key = (name, m)
        if key not in self.kernels:
            if self.force == DENSE or _kernels() is None:
                self.kernels[key] = None
            else:
                self.kernels[key], self.decisions[key] = self._choose(w, m)
        return self.kernels[key]

    def _db_key(self, w: np.ndarray, m: int) -> str:
        n, k = w.shape
        pattern = hashlib.sha1(np.packbits(w != 0).tobytes()).hexdigest()[:16]
        arch = self.target.attrs.get("arch", "")
        return f"cuda:{arch}|decision|M{m}|N{n}|K{k}|{w.dtype}|s{sparsity_bucket(w)}|{pattern}"

    def _choose(self, w: np.ndarray, m: int) -> tuple[Any, GPUDecision]:
        from . import cublas

        ck = _kernels()
        fp16_dense = w.shape[0] * w.shape[1] * 2
        dense_nbytes = w.shape[0] * w.shape[1] * w.dtype.itemsize
        if self.measure:
            stored = self.db.get(self._db_key(w, m))
            if stored is not None and (stored["decision"]["format"] != "cublas" or cublas.available()):
                d = GPUDecision(**{**stored["decision"], "from_db": True})
                if not stored["kernel"]:
                    return None, d
                return ck.build(d.format, w, m, self.target, _x_dtype(d.format), **stored["params"]), d
        cands = [(f, p) for f, p in ck.candidates(w, m) if self.measure or f != DENSE]
        if not self.measure:  # unmeasured, dense means the model's own matmul
            return self._by_bytes(ck, w, m, cands, fp16_dense, dense_nbytes)
        built = []
        n, k = w.shape
        for fmt, params in cands:
            try:
                packed = ck.pack(fmt, w, **params)
                tried = MMA_SCHEDULES_TRIED if fmt == "mma" else SCHEDULES_TRIED
                for sched in ck.schedules(fmt, m, n, k, self.target, **params)[:tried]:
                    kernel = ck.build(fmt, packed, m, self.target, _x_dtype(fmt), **params, **sched)
                    built.append((fmt, {**params, **sched}, kernel))
            except UnfitError:
                continue
        timer = self._timer or GPUTimer(self.target)
        self._timer = timer
        timings = {DENSE: timer.dense(w, m)}
        choice: tuple[float, str, dict, Any, int] = (timings[DENSE], DENSE, {}, None, dense_nbytes)
        for fmt, params, kernel in built:
            label = _label(fmt, params) if fmt != DENSE else "dense(fp16 W)"
            timings[label] = timer.kernel(kernel, m, w.shape[1])
            if timings[label] < choice[0]:
                choice = (timings[label], fmt, params, kernel, kernel.nbytes)
        seconds, fmt, params, kernel, nbytes = choice
        label = DENSE if kernel is None else next(k for k, v in timings.items() if v == seconds)
        decision = GPUDecision(fmt, label, seconds, timings[DENSE], timings, True, nbytes, dense_nbytes)
        self.db.put(
            self._db_key(w, m),
            {"params": params, "kernel": kernel is not None, "decision": decision.to_dict()},
        )
        return kernel, decision

    def _by_bytes(self, ck, w, m, cands, fp16_dense: int, dense_nbytes: int) -> tuple[Any, GPUDecision]:
        """The bytes model: candidates ranked by their packed size (from the format's byte
        count, without building), the first whose built kernel reads <= BYTES_RATIO x the
        fp16-dense bytes wins; only that one is built, with its format's first schedule (the
        measured best guess: for BSR the block kernel at M = 1, tensor cores from M = 2)."""
        w16 = w.astype(np.float16)
        sizes = {_label(f, p): _estimate(f, p, w16) for f, p in cands}
        timings = {label: b / MODEL_BANDWIDTH for label, b in sizes.items() if b is not None}
        timings[DENSE] = dense_nbytes / MODEL_BANDWIDTH
        order = sorted(cands, key=lambda c: sizes[_label(*c)] if sizes[_label(*c)] is not None else 0)
        for fmt, params in order:
            est = sizes[_label(fmt, params)]
            if est is not None and est > BYTES_RATIO * fp16_dense:
                break
            first = ck.schedules(fmt, m, *w.shape, self.target, **params)[:1]
            try:
                kernel = ck.build(fmt, w, m, self.target, **params, **(first[0] if first else {}))
            except UnfitError:
                continue
            label = _label(fmt, params)
            cost = model_bytes(kernel)
            timings[label] = cost / MODEL_BANDWIDTH
            if cost <= BYTES_RATIO * fp16_dense:
                return kernel, GPUDecision(
                    fmt, label, timings[label], timings[DENSE], timings, False, kernel.nbytes, dense_nbytes
                )
        return None, GPUDecision(
            DENSE, DENSE, timings[DENSE], timings[DENSE], timings, False, dense_nbytes, dense_nbytes
        )


def model_bytes(kernel: Any) -> float:
    """The bytes model's cost of `kernel` in bytes: what it reads (W once per pass), or, on
    CUDA cores (not ``tc``), its multiply-adds at `PRODUCT_BYTES` each where those cost more.
    On the H100 at M = 16 the unstructured row kernels beat cuBLAS at 90 % sparsity but lose
    at 50-70 %, where their bytes alone would predict a win."""
    read = float(kernel.nbytes * kernel.passes)
    if kernel.schedule.get("tc") or kernel.format not in _kernels().ROW_FORMATS:
        return read
    stored = sum(a.size for a in kernel.weights.values() if a.dtype == np.float16)
    return max(read, PRODUCT_BYTES * stored * kernel.shape[0])


def _estimate(fmt: str, params: dict[str, Any], w16: np.ndarray) -> int | None:
    """Bytes format `fmt` stores for `w16` (formats' count model), None where unknown."""
    args = {"csr": {"pad": 8}, "dcsr": {}, "dcsr6": {}, "nm": {"n": params.get("n", 2), "m": 4}, "bsr": {}}
    if fmt not in args or fmt not in FORMATS:
        return None
    extra = {"block": tuple(params["block"])} if fmt == "bsr" else {}
    try:
        return int(FORMATS[fmt].packed_nbytes(w16, **args[fmt], **extra))
    except (UnfitError, TypeError, ValueError):
        return None


class GPUTimer:
    """Median CUDA-event time of one kernel call with L2 flushed before each call."""

    def __init__(self, target: Any, repeat: int = 20, device_id: int = 0):
        import tvm
        import tvm_ffi

        self.target = target
        self.repeat = repeat
        self.dev = tvm.cuda(device_id)
        l2 = int(target.attrs.get("l2_cache_size_bytes", 50 * 2**20) or 50 * 2**20)
        src = tvm.runtime.empty((2 * l2 // 4,), "float32", self.dev)
        dst = tvm.runtime.empty((2 * l2 // 4,), "float32", self.dev)

        def flush(*_args) -> None:  # must return nothing: the time evaluator takes no object back
            src.copyto(dst)

        tvm_ffi.register_global_func("sparsegraph.flush_l2", flush, override=True)
        self._buffers = (src, dst)
        self._rng = np.random.default_rng(0)

    def _time(self, prim_func, symbol: str, args: list) -> float:
        import tvm

        with self.target:
            ex = tvm.compile(
                tvm.IRModule({symbol: prim_func.with_attr("global_symbol", symbol)}), self.target
            )
        return self._median(ex.mod, symbol, args)

    def _median(self, module: Any, name: str, args: list) -> float:
        """Median seconds of `module`'s function `name` on `args`, L2 flushed before each call."""
        evaluator = module.time_evaluator(
            name, self.dev, number=1, repeat=self.repeat, f_preproc="sparsegraph.flush_l2"
        )
        return float(statistics.median(evaluator(*args).results))

    def kernel(self, kernel: Any, m: int, k: int) -> float:
        import tvm

        n = kernel.shape[1]  # a `cuda_kernels.CUDAKernel`: (X, *weights, Y), Y in X's dtype
        x = self._rng.standard_normal((m, k)).astype(kernel.x_dtype)
        args = [tvm.runtime.tensor(x, self.dev)]
        args += [tvm.runtime.tensor(np.ascontiguousarray(a), self.dev) for a in kernel.weights.values()]
        if kernel.extern:
            return self._time_extern(kernel, args, (m, n))
        args.append(tvm.runtime.empty((m, n), kernel.x_dtype, self.dev))
        return self._time(kernel.prim_func, kernel.symbol, args)

    def _time_extern(self, kernel: Any, args: list, y_shape: tuple[int, int]) -> float:
        """A kernel that is a registered packed function, called as a compiled model calls it
        (``call_dps_packed`` in a Relax VM function), timed like the others."""
        import tvm
        from tvm import relax

        kernel.function()  # registers it
        bb = relax.BlockBuilder()
        params = [relax.Var(f"a{i}", relax.TensorType(a.shape, str(a.dtype))) for i, a in enumerate(args)]
        with bb.function("main", params):
            out_ty = relax.TensorType(y_shape, kernel.x_dtype)
            bb.emit_func_output(bb.emit(relax.call_dps_packed(kernel.extern, params, out_ty=out_ty)))
        with self.target:
            vm = relax.VirtualMachine(tvm.compile(bb.get(), self.target), self.dev)
        return self._median(vm, "main", args)

    def dense(self, w: np.ndarray, m: int) -> float:
        """The dense matmul as the model runs it: `X[m, K] @ W_onnx[K, N]` in W's dtype, dlight-scheduled."""
        import tvm
        from tvm import te
        from tvm.s_tir import dlight as dl

        n, k = w.shape
        dtype = str(w.dtype)
        x_t = te.placeholder((m, k), dtype, name="X")
        w_t = te.placeholder((k, n), dtype, name="W")
        r = te.reduce_axis((0, k), name="k")
        y_t = te.compute((m, n), lambda i, j: te.sum(x_t[i, r] * w_t[r, j], axis=r), name="Y")
        mod = tvm.IRModule({"dense_mm": te.create_prim_func([x_t, w_t, y_t])})
        with self.target:
            mod = dl.ApplyDefaultSchedule(  # the rules the model's CUDA pipeline applies
                dl.gpu.Matmul(),
                dl.gpu.GEMV(),
                dl.gpu.Reduction(),
                dl.gpu.GeneralReduction(),
                dl.gpu.Fallback(),
            )(mod)
        x = self._rng.standard_normal((m, k)).astype(dtype)
        args = [
            tvm.runtime.tensor(x, self.dev),
            tvm.runtime.tensor(np.ascontiguousarray(w.T), self.dev),
            tvm.runtime.empty((m, n), dtype, self.dev),
        ]
        return self._time(mod["dense_mm"], "dense_mm", args)
