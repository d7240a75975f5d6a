"""Validation of a rewritten model: onnx.checker, shape inference, and an onnxruntime run
against the original on the same feeds."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .errors import ValidationError


@dataclass
class OutputDiff:
    name: str
    max_abs: float
    mean_abs: float
    max_rel: float  # max |a - b| / max |reference|
    cosine: float

    def to_dict(self) -> dict:
        return asdict(self)


def check_model_file(path: Path) -> None:
    """Raise ValidationError unless the file passes onnx.checker and shape inference."""
    try:
        onnx.checker.check_model(str(path), full_check=False)
        onnx.shape_inference.infer_shapes_path(str(path), str(path) + ".inferred")
    except Exception as exc:
        raise ValidationError(f"{path}: fails ONNX validation: {str(exc).splitlines()[0]}") from None
    finally:
        Path(str(path) + ".inferred").unlink(missing_ok=True)


def session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU onnxruntime session whose idle workers do not spin: spinning threads would
    steal cores from whatever runs next in the process (our compiled module in `bench`)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ValidationError(f"{path}: onnxruntime cannot load it: {str(exc).splitlines()[0]}") from None


def run(path_or_session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = session(path_or_session) if isinstance(path_or_session, (str, Path)) else path_or_session
    names = [o.name for o in sess.get_outputs()]
    try:
        return dict(zip(names, sess.run(names, feeds), strict=True))
    except Exception as exc:
        raise ValidationError(f"onnxruntime failed to run the model: {str(exc).splitlines()[0]}") from None


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> list[OutputDiff]:
    diffs = []
    for name, ref in reference.items():
        if name not in candidate:
            raise ValidationError(f"output {name!r} is missing from the rewritten model")
        a = np.asarray(ref, dtype=np.float64).ravel()
        b = np.asarray(candidate[name], dtype=np.float64).ravel()
        if a.shape != b.shape:
            raise ValidationError(f"output {name!r} changed shape: {ref.shape} -> {candidate[name].shape}")
        d = np.abs(a - b)
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        denom = float(np.linalg.norm(a) * np.linalg.norm(b))
        diffs.append(
            OutputDiff(
                name,
                float(d.max()) if d.size else 0.0,
                float(d.mean()) if d.size else 0.0,
                float(d.max() / scale) if scale > 0 and d.size else 0.0,
                float(a @ b / denom) if denom > 0 else 1.0,
            )
        )
    return diffs
