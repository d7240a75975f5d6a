"""`Session`: run a compiled model folder (`module.so`, `params.npz`, `manifest.json`) like onnxruntime.

    sess = sparsegraph.runtime.Session("out/")
    logits, = sess.run(["logits"], {"tokens": ids})

`run(output_names, feeds)` mirrors `onnxruntime.InferenceSession.run`: `output_names` None
means all outputs, feeds are numpy arrays (or anything `np.asarray` takes) keyed by input
name. A call whose input shapes match a compiled bucket runs the compiled function; any
other shape runs the folder's `portable.onnx` in onnxruntime (counted in `fallbacks`), so
every shape works and none is slower than dense onnxruntime.
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
    def __init__(self, folder: str | Path, device: str = "cpu"):
        folder = Path(folder)
        manifest_path = folder / MANIFEST
        if not all((folder / f).is_file() for f in (MANIFEST, MODULE, PARAMS)):
            raise UsageError(
                f"{folder}: not a compiled model folder (needs {MODULE}, {PARAMS} and {MANIFEST})"
            )
        self.manifest = json.loads(manifest_path.read_text())
        if device != "cpu":
            raise UsageError(f"device {device!r} is not supported by this module (compiled for cpu)")
        import tvm
        from tvm import relax

        self._tvm = tvm
        self._vm = relax.VirtualMachine(tvm.runtime.load_module(str(folder / MODULE)), tvm.cpu())
        with np.load(folder / PARAMS) as stored:  # weights, loaded once, shared by all buckets
            self._params = {name: tvm.runtime.tensor(stored[name], tvm.cpu()) for name in stored.files}
        self._buckets = {
            tuple(tuple(b["shapes"][i["name"]]) for i in self.manifest["inputs"]): b
            for b in self.manifest["buckets"]
        }
        self._portable = folder / self.manifest.get("portable", "portable.onnx")
        self._ort = None
        self.fallbacks = 0

    def get_inputs(self) -> list[str]:
        return [i["name"] for i in self.manifest["inputs"]]

    def get_outputs(self) -> list[str]:
        return list(self.manifest["outputs"])

    def run(self, output_names: list[str] | None, feeds: dict[str, Any]) -> list[np.ndarray]:
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
        arrays = [np.ascontiguousarray(np.asarray(feeds[n]), dtype=dtypes[n]) for n in names]
        bucket = self._buckets.get(tuple(a.shape for a in arrays))
        if bucket is None:
            return self._fallback(wanted, dict(zip(names, arrays, strict=True)))
        dev = self._tvm.cpu()
        args = [self._tvm.runtime.tensor(a, dev) for a in arrays] + [
            self._params[p] for p in bucket["params"]
        ]
        result = self._vm[bucket["function"]](*args)
        outputs = [result] if hasattr(result, "numpy") else list(result)
        by_name = dict(zip(self.get_outputs(), (o.numpy() for o in outputs), strict=True))
        return [by_name[n] for n in wanted]

    def _fallback(self, wanted: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._ort is None:
            from .validate import session

            self._ort = session(self._portable)
        self.fallbacks += 1
        return self._ort.run(wanted, feeds)
