"""Dense perplexity of a causal-LM ONNX model on text (TinyStories-style story files).

``perplexity`` works with any causal LM graph that takes one integer token input and returns
``[batch, seq, vocab]`` logits; see :func:`find_token_input` for how the inputs are recognised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

__all__ = [
    "PerplexityResult",
    "find_logits_output",
    "find_token_input",
    "load_stories",
    "perplexity",
    "token_windows",
]

STORY_SEPARATOR = "<|endoftext|>"
# ops a token-id tensor may pass through (unchanged in value) before its embedding Gather
_PASS_THROUGH = {"Cast", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand"}
_T = onnx.TensorProto
_INT_TYPES = {_T.INT64, _T.INT32, _T.INT16, _T.INT8, _T.UINT8, _T.UINT16, _T.UINT32, _T.UINT64}
_FLOAT_TYPES = {_T.FLOAT, _T.FLOAT16, _T.BFLOAT16, _T.DOUBLE}
_ORT_INT = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(mean_nll)``; ``mean_nll`` in nats per predicted token; ``n_tokens`` predicted."""

    ppl: float
    mean_nll: float
    n_tokens: int


def load_stories(path: str | Path) -> list[str]:
    """Stories of a text file separated by ``<|endoftext|>``, stripped, empty ones dropped."""
    text = Path(path).read_text(encoding="utf-8")
    return [s.strip() for s in text.split(STORY_SEPARATOR) if s.strip()]


def token_windows(tokenizer, texts: Sequence[str], seq_len: int = 256, max_windows: int | None = None):
    """Evaluation windows: each story is encoded with BOS and cut into windows of <= seq_len + 1 ids.

    Consecutive windows of one story overlap by one token, so every token after BOS is predicted
    exactly once (a window of n ids scores n - 1 predictions); one-token leftovers are dropped. At
    most ``max_windows`` windows (in order) are returned, as int64 arrays.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    windows: list[np.ndarray] = []
    for text in texts:
        ids = np.asarray(tokenizer.encode(text, bos=True, eos=False), dtype=np.int64)
        for start in range(0, max(len(ids) - 1, 0), seq_len):
            windows.append(ids[start : start + seq_len + 1])
            if max_windows is not None and len(windows) >= max_windows:
                return windows
    return windows


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _embedding_tables(model: onnx.ModelProto) -> dict[str, int]:
    """Graph input name -> largest first dim of a float (>= 2-D) initializer it Gathers from."""
    graph = model.graph
    tables = {
        i.name: i.dims[0] for i in graph.initializer if len(i.dims) >= 2 and i.data_type in _FLOAT_TYPES
    }
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: dict[str, int] = {}
    for inp in _graph_inputs(model):
        frontier, seen = [inp.name], {inp.name}
        for _ in range(6):  # a few pass-through hops (Cast, Reshape, ...) at most
            nxt = []
            for tensor in frontier:
                for node in consumers.get(tensor, []):
                    if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor:
                        if node.input[0] in tables:
                            found[inp.name] = max(found.get(inp.name, 0), tables[node.input[0]])
                    elif node.op_type in _PASS_THROUGH and node.input[0] == tensor:
                        nxt.extend(o for o in node.output if o not in seen)
            seen.update(nxt)
            frontier = nxt
    return found


def find_token_input(model: onnx.ModelProto) -> str:
    """Name of the token-id input of a causal LM graph.

    Heuristic: among the integer graph inputs, the one that feeds (directly or through a few
    Cast/Reshape/Squeeze/Unsqueeze/Flatten/Identity/Expand nodes) the index input of a ``Gather`` whose
    data is a float initializer of >= 2 dims; if several do (e.g. a learned position table read by
    ``position_ids``), the one whose table has the largest first dim (the vocabulary). Falls back to
    the only integer input of rank 2, or one named ``input_ids``/``tokens``. ``ValueError`` otherwise.
    """
    int_inputs = [i for i in _graph_inputs(model) if i.type.tensor_type.elem_type in _INT_TYPES]
    tables = {k: v for k, v in _embedding_tables(model).items() if any(i.name == k for i in int_inputs)}
    if tables:
        return max(tables, key=lambda k: tables[k])
    rank2 = [i.name for i in int_inputs if len(i.type.tensor_type.shape.dim) == 2]
    if len(rank2) == 1:
        return rank2[0]
    for name in ("input_ids", "tokens"):
        if any(i.name == name for i in int_inputs):
            return name
    raise ValueError(
        f"cannot find the token input among {[i.name for i in _graph_inputs(model)]}; pass input_name"
    )


def find_logits_output(model: onnx.ModelProto) -> str:
    """Name of the logits output: ``logits`` if present, else the only / first rank-3 output."""
    outputs = list(model.graph.output)
    if any(o.name == "logits" for o in outputs):
        return "logits"
    rank3 = [o.name for o in outputs if len(o.type.tensor_type.shape.dim) == 3]
    if not rank3:
        raise ValueError(f"no rank-3 output among {[o.name for o in outputs]}; pass output_name")
    return rank3[0]


def _feeds(session: ort.InferenceSession, token_input: str, position_inputs: set[str], tokens: np.ndarray):
    """Inputs for one [B, T] token batch: tokens; arange for position inputs; ones for other ints;
    empty (size 0 on symbolic non-batch dims) tensors for float inputs such as a past KV cache."""
    batch, seq = tokens.shape
    feeds = {}
    for inp in session.get_inputs():
        if inp.name == token_input:
            feeds[inp.name] = tokens.astype(_ORT_INT.get(inp.type, np.int64))
        elif inp.type in _ORT_INT:
            dtype = _ORT_INT[inp.type]
            shape = (batch, seq)[max(2 - len(inp.shape), 0) :]  # [B, T], [T] or a scalar
            if inp.name in position_inputs or "position" in inp.name.lower():
                positions = np.arange(seq, dtype=dtype)
                feeds[inp.name] = np.broadcast_to(positions, shape).copy() if shape else positions[0]
            else:
                feeds[inp.name] = np.ones(shape, dtype=dtype)
        elif inp.type in _ORT_FLOAT:
            shape = [
                d if isinstance(d, int) else (batch if axis == 0 else 0) for axis, d in enumerate(inp.shape)
            ]
            feeds[inp.name] = np.zeros(shape, dtype=_ORT_FLOAT[inp.type])
        else:
            raise ValueError(f"don't know how to feed input {inp.name!r} of type {inp.type}")
    return feeds


def _log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-position negative log-likelihood, stable log-softmax in float64. logits [T, V]."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=-1))
    return lse - x[np.arange(len(targets)), targets]


def perplexity(
    model,
    windows: Sequence[np.ndarray],
    input_name: str | None = None,
    output_name: str | None = None,
) -> PerplexityResult:
    """Dense perplexity of ``model`` (an ONNX path or ``onnxruntime.InferenceSession``) over ``windows``.

    Each window (1-D ids) is run alone as a [1, n] batch; logits at position t score token t + 1,
    with a float64 log-softmax. The token input / logits output are found with
    :func:`find_token_input` / :func:`find_logits_output` unless named (from the session's metadata
    only when the session's model bytes/path cannot be read back). Other inputs are filled
    generically: integer inputs that index a smaller float table (learned positions) or are named
    ``*position*`` get ``arange(seq)``; other integer inputs (attention masks) get ones; float inputs
    (a past KV cache) get empty tensors (0 on every symbolic dim but the first, which is the batch).
    Progress is shown with ``rich`` for more than 20 windows.
    """
    if isinstance(model, ort.InferenceSession):
        session = model
    else:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    input_name, output_name, position_inputs = _resolve_io(session, input_name, output_name)

    total, count = 0.0, 0
    usable = [np.asarray(w, dtype=np.int64) for w in windows if len(w) >= 2]

    def score(window: np.ndarray) -> None:
        nonlocal total, count
        feeds = _feeds(session, input_name, position_inputs, window[None, :-1])
        logits = session.run([output_name], feeds)[0]
        if logits.ndim != 3 or logits.shape[:2] != (1, len(window) - 1):
            raise ValueError(f"output {output_name!r} has shape {logits.shape}, expected [1, seq, vocab]")
        nll = _log_softmax_nll(logits[0], window[1:])
        total += float(nll.sum())
        count += len(nll)

    if len(usable) > 20:
        from rich.progress import Progress

        with Progress(transient=True) as progress:
            task = progress.add_task("perplexity", total=len(usable))
            for window in usable:
                score(window)
                progress.advance(task)
    else:
        for window in usable:
            score(window)
    if count == 0:
        raise ValueError("no window has 2 or more tokens: nothing to score")
    mean = total / count
    return PerplexityResult(ppl=math.exp(mean), mean_nll=mean, n_tokens=count)


def _session_proto(session: ort.InferenceSession) -> onnx.ModelProto | None:
    """Graph structure behind ``session`` (weights' external data not loaded), or None if unknown."""
    path = getattr(session, "_model_path", None)
    if path:
        return onnx.load(path, load_external_data=False)
    data = getattr(session, "_model_bytes", None)
    if data:
        return onnx.load_model_from_string(data)
    return None


def _resolve_io(
    session: ort.InferenceSession, input_name: str | None, output_name: str | None
) -> tuple[str, str, set[str]]:
    """(token input, logits output, inputs to feed with positions) for ``session``.

    Uses the graph heuristics when the session's model can be read back; otherwise only the session's
    metadata: the only int input of rank 2 (else ``input_ids``/``tokens``) and the ``logits`` / first
    rank-3 output.
    """
    inputs, outputs = session.get_inputs(), session.get_outputs()
    position_inputs: set[str] = set()
    proto = _session_proto(session) if input_name is None or output_name is None else None
    if proto is not None:
        input_name = input_name or find_token_input(proto)
        output_name = output_name or find_logits_output(proto)
        position_inputs = {k for k in _embedding_tables(proto) if k != input_name}
    if input_name is None:
        rank2 = [i.name for i in inputs if i.type in _ORT_INT and len(i.shape) == 2]
        names = [n for n in ("input_ids", "tokens") if any(i.name == n for i in inputs)]
        if len(rank2) != 1 and not names:
            raise ValueError(f"cannot find the token input among {[i.name for i in inputs]}; pass input_name")
        input_name = rank2[0] if len(rank2) == 1 else names[0]
    if output_name is None:
        rank3 = [o.name for o in outputs if len(o.shape) == 3]
        if not rank3:
            raise ValueError(f"no rank-3 output among {[o.name for o in outputs]}; pass output_name")
        output_name = "logits" if "logits" in rank3 else rank3[0]
    if input_name not in {i.name for i in inputs}:
        raise ValueError(f"model has no input {input_name!r}")
    if output_name not in {o.name for o in outputs}:
        raise ValueError(f"model has no output {output_name!r}")
    return input_name, output_name, position_inputs
