"""`Session`: run a compiled model folder (`module.so`, `params.npz`, `manifest.json`) like onnxruntime.

    sess = sparsegraph.runtime.Session("out/")
    logits, = sess.run(["logits"], {"tokens": ids})

`run(output_names, feeds)` mirrors `onnxruntime.InferenceSession.run`: `output_names` None
means all outputs, feeds are numpy arrays (or anything `np.asarray` takes) keyed by input
name. A call whose input shapes match a compiled bucket runs the compiled function; any
other shape runs the folder's `portable.onnx` in onnxruntime (counted in `fallbacks`), so
every shape works and none is slower than dense onnxruntime.

A folder compiled for CUDA runs on the GPU: `Session(folder, device=None)` takes the
manifest's device (``cuda`` = GPU 0; ``"cuda:1"`` or ``1`` pick another, ``"cpu"`` only
for CPU modules). Feeds may then also be DLPack tensors (a torch CUDA tensor is used in
place when its device, dtype and layout fit); outputs are numpy arrays, or with
``run(..., as_numpy=False)`` TVM tensors on the device (``torch.from_dlpack`` takes them).
Loading a CUDA module where no GPU is visible is a UsageError.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError

MODULE = "module.so"
MANIFEST = "manifest.json"
PARAMS = "params.npz"


class Session:
    def __init__(self, folder: str | Path, device: str | int | None = None):
        folder = Path(folder)
        manifest_path = folder / MANIFEST
        if not all((folder / f).is_file() for f in (MANIFEST, MODULE, PARAMS)):
            raise UsageError(
                f"{folder}: not a compiled model folder (needs {MODULE}, {PARAMS} and {MANIFEST})"
            )
        self.manifest = json.loads(manifest_path.read_text())
        self._register_externs(folder)
        import tvm
        from tvm import relax

        self._tvm = tvm
        self.device = self._device(folder, device)
        if self.device.dlpack_device_type() == 1:  # CPU: TVM's pool on every core (see use_all_cores)
            from sparsegraph.codegen.cpu_kernels import use_all_cores

            use_all_cores()
        try:
            module = tvm.runtime.load_module(str(folder / MODULE))
        except Exception as exc:  # e.g. a CUDA module where TVM has no CUDA runtime
            raise UsageError(
                f"{folder / MODULE}: cannot be loaded here ({str(exc).splitlines()[0]})"
            ) from None
        self._vm = relax.VirtualMachine(module, self.device)
        from sparsegraph.codegen.hugepages import hugepage_tensor

        with np.load(folder / PARAMS) as stored:  # weights, loaded once, shared by all buckets;
            # on the CPU on huge pages where the OS grants them (1-4 % on the decoder, `hugepages`)
            self._params = {name: hugepage_tensor(stored[name], self.device) for name in stored.files}
        self._buckets = {
            tuple(tuple(b["shapes"][i["name"]]) for i in self.manifest["inputs"]): b
            for b in self.manifest["buckets"]
        }
        self._portable = folder / self.manifest.get("portable", "portable.onnx")
        self._ort = None
        self.fallbacks = 0

    def _device(self, folder: Path, device: str | int | None):
        """The TVM device to run on: the manifest's kind, `device` picking the GPU index."""
        tvm = self._tvm
        kind = self.manifest.get("device", "cpu")
        text = str(device) if device is not None else kind
        if isinstance(device, int) or text.isdigit():
            text = f"cuda:{text}"
        want, _, index = text.partition(":")
        if want != kind:
            raise UsageError(f"{folder}: compiled for {kind}, cannot run on device {device!r}")
        if kind == "cpu":
            return tvm.cpu()
        try:
            dev = tvm.cuda(int(index or 0))
            present = bool(dev.exist)
        except ValueError:
            raise UsageError(f"device {device!r}: expected 'cuda', 'cuda:N' or N") from None
        except Exception:
            present = False
        if not present:
            raise UsageError(
                f"{folder}: compiled for CUDA, but no CUDA GPU {index or 0} is visible to TVM here "
                "(needs an NVIDIA driver and TVM's CUDA runtime)"
            )
        return dev

    def _register_externs(self, folder: Path) -> None:
        """Register the packed functions the module calls by name (cuBLAS, `codegen.cublas`)."""
        from sparsegraph.codegen import cublas

        for name in self.manifest.get("extern_functions", []):
            if name != cublas.FUNC:
                raise UsageError(f"{folder}: the module calls {name!r}, which sparsegraph does not provide")
            if not cublas.available():
                raise UsageError(
                    f"{folder}: the module calls cuBLAS ({name}), but no libcublas loads here "
                    "(install the CUDA toolkit or the nvidia-cublas wheel, or set SPARSEGRAPH_CUBLAS)"
                )
            cublas.register()

    def get_inputs(self) -> list[str]:
        return [i["name"] for i in self.manifest["inputs"]]

    def get_outputs(self) -> list[str]:
        return list(self.manifest["outputs"])

    def run(
        self, output_names: list[str] | None, feeds: dict[str, Any], *, as_numpy: bool = True
    ) -> list[Any]:
        """Outputs `output_names` (None: all) for `feeds` (numpy arrays or DLPack tensors).
        With `as_numpy=False` compiled buckets return TVM tensors on the session's device."""
        names = self.get_inputs()
        missing = [n for n in names if n not in feeds]
        if missing:
            raise UsageError(f"missing input(s) {', '.join(missing)} (model inputs: {', '.join(names)})")
        wanted = list(output_names) if output_names else self.get_outputs()
        unknown = [n for n in wanted if n not in self.get_outputs()]
        if unknown:
            raise UsageError(
                f"unknown output(s) {', '.join(unknown)} (model outputs: {', '.join(self.get_outputs())})"
            )
        dtypes = {i["name"]: i["dtype"] for i in self.manifest["inputs"]}
        values = {n: feeds[n] if hasattr(feeds[n], "__dlpack__") else np.asarray(feeds[n]) for n in names}
        bucket = self._buckets.get(tuple(tuple(int(d) for d in values[n].shape) for n in names))
        if bucket is None:
            arrays = [self._numpy(values[n], dtypes[n]) for n in names]
            return self._fallback(wanted, dict(zip(names, arrays, strict=True)))
        args = [self._tensor(values[n], dtypes[n]) for n in names] + [
            self._params[p] for p in bucket["params"]
        ]
        result = self._vm[bucket["function"]](*args)
        outputs = [result] if hasattr(result, "numpy") else list(result)
        if as_numpy:
            outputs = [o.numpy() for o in outputs]
        by_name = dict(zip(self.get_outputs(), outputs, strict=True))
        return [by_name[n] for n in wanted]

    def _tensor(self, value: Any, dtype: str):
        """`value` as a TVM tensor on the session's device (DLPack tensors without a copy when
        device, dtype and layout already fit)."""
        tvm = self._tvm
        if not isinstance(value, np.ndarray) and hasattr(value, "__dlpack__"):
            try:
                t = tvm.runtime.from_dlpack(value)
            except Exception:
                t = None
            if t is not None and str(t.dtype) == dtype and t.device == self.device:
                return t
            if t is not None:
                return tvm.runtime.tensor(self._numpy(t.numpy(), dtype), self.device)
        return tvm.runtime.tensor(self._numpy(value, dtype), self.device)

    @staticmethod
    def _numpy(value: Any, dtype: str) -> np.ndarray:
        if not isinstance(value, np.ndarray) and hasattr(value, "__dlpack__") and hasattr(value, "cpu"):
            value = value.cpu()  # a torch tensor on a GPU
        if not isinstance(value, np.ndarray) and hasattr(value, "numpy"):
            value = value.numpy()
        return np.ascontiguousarray(np.asarray(value), dtype=dtype)

    def _fallback(self, wanted: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._ort is None:
            from .validate import session

            self._ort = session(self._portable)
        self.fallbacks += 1
        return self._ort.run(wanted, feeds)
