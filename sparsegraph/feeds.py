"""Input feeds for running any ONNX model: random but valid, or loaded from `.npz`.

Random feeds follow the graph, not input names: symbolic dims become `batch` on axis 0
and `seq` elsewhere (one value per dim name); an integer input that indexes a constant
table (through Cast/Reshape-like ops into `Gather`) draws ids below that table's size;
any other integer input (attention masks, position ids) is all ones; floats are N(0, 1).

Dims a graph ties together without saying so (a KV-cache export's mask spans past + new
tokens) make some guesses invalid, so `feed_candidates` yields alternatives to try in
turn: all dims equal; then dims found only on float inputs of rank >= 3 (caches) at the
sequence length and integer-only dims that the token input lacks at twice that; then
those cache dims at 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import UsageError
from .model import Model, constant_value

PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand", "Slice"}


def feed_candidates(model: Model, seed: int = 0, batch: int = 1, seq: int = 16):
    """Random feed dicts to try in order until the model runs (see the module docstring)."""
    yield random_feeds(model, seed, batch, seq)
    inputs = [t for t in model.graph.inputs if not isinstance(t, gs.Constant)]

    def dims(pred):
        return {
            str(d) for t in inputs if pred(t) for d in (t.shape or [])[1:] if not isinstance(d, int) and d
        }

    is_int = lambda t: t.dtype is not None and np.dtype(t.dtype).kind in "iu"  # noqa: E731
    cache = dims(lambda t: not is_int(t) and len(t.shape or []) >= 3) - dims(is_int)
    if not cache:
        return
    tokens = dims(lambda t: is_int(t) and _index_bound(t) is not None)
    total = dims(is_int) - tokens
    yield random_feeds(
        model, seed, batch, seq, {**dict.fromkeys(cache, seq), **dict.fromkeys(total, 2 * seq)}
    )
    yield random_feeds(model, seed, batch, seq, dict.fromkeys(cache, 0))


def random_feeds(
    model: Model, seed: int = 0, batch: int = 1, seq: int = 16, sizes: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """One feed per graph input; `sizes` fixes the size of named symbolic dims."""
    rng = np.random.default_rng(seed)
    sizes = dict(sizes or {})
    feeds = {}
    for tensor in model.graph.inputs:
        if isinstance(tensor, gs.Constant):
            continue
        shape = []
        for axis, dim in enumerate(tensor.shape or []):
            if isinstance(dim, int) and dim >= 0:
                shape.append(dim)
            else:
                key = str(dim) if dim else f"{tensor.name}:{axis}"
                shape.append(sizes.setdefault(key, batch if axis == 0 else seq))
        dtype = np.dtype(tensor.dtype) if tensor.dtype is not None else np.dtype(np.float32)
        if dtype.kind in "iu":
            bound = _index_bound(tensor)
            feeds[tensor.name] = (rng.integers(0, bound, size=shape) if bound else np.ones(shape)).astype(
                dtype
            )
        elif dtype.kind == "b":
            feeds[tensor.name] = np.ones(shape, dtype=bool)
        else:
            feeds[tensor.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _index_bound(tensor: gs.Tensor) -> int | None:
    """Smallest row count of the constant tables this tensor indexes, if any."""
    bounds, frontier, seen = [], [tensor], set()
    while frontier:
        t = frontier.pop()
        for node in t.outputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op == "Gather" and len(node.inputs) > 1 and node.inputs[1] is t:
                table = constant_value(node.inputs[0])
                if table is not None and table.ndim >= 1:
                    bounds.append(table.shape[node.attrs.get("axis", 0)])
            elif node.op in PASS_THROUGH and node.inputs[0] is t:
                frontier.extend(node.outputs)
    return min(bounds) if bounds else None


def load_feeds(path: str | Path, model: Model) -> dict[str, np.ndarray]:
    """Feeds from an `.npz` whose arrays are named after the model's inputs."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: feeds file not found")
    try:
        data = dict(np.load(path))
    except Exception as exc:
        raise UsageError(f"{path}: not a readable .npz file ({exc})") from None
    names = [t.name for t in model.graph.inputs]
    missing = [n for n in names if n not in data]
    if missing:
        raise UsageError(f"{path}: no array for model input(s) {', '.join(missing)} (has: {', '.join(data)})")
    return {n: data[n] for n in names}


def onnx_dtype_name(elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type).lower()
