"""Calibration data and streaming statistics of the activations that feed weighted ops.

Calibration data (`Calibration`) is a re-iterable source of feed dicts, one per batch:

- `Calibration.from_npz(path, model)`: arrays named after the model's inputs, first axis =
  samples, cut into batches of `batch_size` samples (at most `samples` samples, the first).
- `Calibration(source)`: a sequence of feed dicts, or a zero-argument callable returning a
  fresh iterable of them (streamed, nothing kept); a one-shot iterator is kept in a list.
- `Calibration.from_text(text, tokenizer, model)`: every document (split on
  `<|endoftext|>`) is encoded (`tokenizer.encode(doc)` or `tokenizer(doc)`), the ids are
  concatenated, and `samples` windows of `seqlen` ids start at offsets drawn uniformly
  with `numpy.random.default_rng(seed)`: the same text, tokenizer and seed give the same
  windows. They feed the token input (below).

Inputs missing from a feed dict are derived from the graph, never from names (see
`complete_feeds`): the *token input* is the integer input indexing the largest constant
table (`feeds._index_bound`) and must be given. A missing integer input gets positions
`0..seq-1` (no past) if a `Sin`/`Cos` node lies downstream of it (rotary embeddings) or
it indexes a constant table with at least `seq` rows (learned positions); zeros if it
indexes a smaller table (segment / token-type ids: the first row); ones otherwise
(attention masks). A missing bool input is all True. A missing float input is derivable
only when one of its symbolic dims is carried by no given input (a past KV cache): that
dim is 0 (empty cache). Symbolic dims shared with given inputs take their sizes; other
symbolic dims are the batch (axis 0) or `seq` (the token input's last dim). Anything else
is a `UsageError` naming the input.

`Calibration.statistics(model, ops)` runs onnxruntime on a copy of the model whose graph
outputs are the data inputs X of the targeted ops (MatMul/Gemm `X[..., K]` flattened to
`[rows, K]`; Conv inputs unfolded to `[rows, C*kh*kw]`, as `W[N, K]` sees them), truncated
to what they need, and streams the batches, keeping per op (ops sharing an X share one
entry) only running statistics: the per-input-channel sum of squares (`‖X_j‖₂`), the
Hessian sum `XᵀX` in float64 (only with `hessian=True`), and a histogram of `|x|` on
fixed power-of-two bins (`histogram=True`). An X that is a graph input is read from the
feed. Statistics are deterministic for given data (text windows: for a seed).

`stream_tensors(model, names, feeds)` yields any named tensors of a model batch by batch
(one batch alive at a time), and `AbsHistogram` keeps fine log histograms of `|x|` (whole
tensor or per channel) with quantiles to about 1 %; the `activation_sparsity` pass builds
its thresholds from them.

Memory bound (beyond the model, its onnxruntime session and the calibration inputs
themselves): the statistics, `Σ_taps 8·(K + K² [hessian] + len(HIST_EDGES))` bytes, plus
one batch's activations of all taps as onnxruntime returns them, plus, while one tap is
folded in, its float64 copy `8·rows·K` (Conv: of the unfolded rows, after a copy in the
activation's dtype) and one `8·K²` product. Nothing from an earlier
batch is kept. `tests/test_calibration.py` checks this over 64 batches of a 512-wide
layer: the numpy-side peak with tracemalloc, and (onnxruntime's buffers being invisible
to tracemalloc) that no output of a batch is still referenced when the next one runs.

Whole-process bound: the model itself costs up to 4x its weight bytes while collecting
(the loaded arrays, the probe model saved with the tapped outputs, and onnxruntime's
copy), onnxruntime up to 3x one batch's tapped activations. Measured on a 953M-parameter
llama (3.55 GiB of weights, 32 x 128 tokens): 13.9 GiB peak RSS against a bound of
4 x 3.55 + 3 x 0.73 + 0.07 = 16.5 GiB (`benchmarks/calibration_memory.py`).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from .errors import RecipeError, UsageError
from .feeds import _index_bound
from .model import PROTOBUF_LIMIT, Model

DEFAULT_BATCH = 8
#: Edges of the |x| histogram: 0, 2^-24 .. 2^24 (one bin per octave), +inf.
HIST_EDGES = np.concatenate([[0.0], 2.0 ** np.arange(-24, 25), [np.inf]])
STORY_SEPARATOR = "<|endoftext|>"
_ROTARY = {"Sin", "Cos"}

Feed = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- statistics
@dataclass
class ActivationStats:
    """Running statistics of one activation `X[rows, K]` (all float64)."""

    k: int
    rows: int = 0
    sq_sum: np.ndarray = field(default=None)  # type: ignore[assignment]  # [K]: Σ_rows x_j²
    xtx: np.ndarray | None = None  # [K, K]: XᵀX
    hist: np.ndarray | None = None  # counts of |x| per HIST_EDGES bin

    def __post_init__(self):
        if self.sq_sum is None:
            self.sq_sum = np.zeros(self.k)

    def update(self, x: np.ndarray) -> None:
        """Fold a block of rows `x[rows, K]` into the statistics."""
        x = np.asarray(x, dtype=np.float64)
        self.rows += x.shape[0]
        self.sq_sum += np.einsum("ij,ij->j", x, x)
        if not np.all(np.isfinite(self.sq_sum)):
            raise UsageError("calibration activations contain NaN or inf (or overflow float64)")
        if self.xtx is not None:
            self.xtx += x.T @ x
        if self.hist is not None:  # |x| in [2^k, 2^(k+1)) falls in bin k + 25 (HIST_EDGES)
            mantissa, exponent = np.frexp(x.ravel())
            idx = np.where(mantissa == 0, 0, np.clip(exponent + 24, 0, len(HIST_EDGES) - 2))
            self.hist += np.bincount(idx, minlength=len(HIST_EDGES) - 1)

    @property
    def norm(self) -> np.ndarray:
        """`‖X_j‖₂` per input channel j."""
        return np.sqrt(self.sq_sum)

    def hessian(self) -> np.ndarray:
        """`H = 2 XᵀX / rows` (the layer-wise squared-error Hessian, averaged over rows)."""
        if self.xtx is None:
            raise ValueError("statistics were collected without hessian=True")
        return 2.0 * self.xtx / max(self.rows, 1)


#: Sub-bins per octave of `AbsHistogram` (bin edges 2^(i/32) apart: quantiles to ~1 %).
FINE_PER_OCTAVE = 32
FINE_EDGES = np.concatenate(
    [[0.0], 2.0 ** (np.arange(-24 * FINE_PER_OCTAVE, 24 * FINE_PER_OCTAVE + 1) / FINE_PER_OCTAVE), [np.inf]]
)


@dataclass
class AbsHistogram:
    """Counts of `|x|` of rows `x[rows, K]` on the log-spaced `FINE_EDGES`, over the whole
    tensor (`counts[bins]`) or per channel of the last axis (`per_channel`: `counts[K, bins]`),
    with the smallest and largest `|x|` seen in each bin (`low`, `high`; `24·K·len(FINE_EDGES)`
    bytes per channel-wise histogram). `quantile(q)` inverts the CDF, interpolating between a
    bin's smallest and largest value; a point mass (saturated activations) is never cut in two."""

    k: int
    per_channel: bool = False
    counts: np.ndarray = field(default=None)  # type: ignore[assignment]
    low: np.ndarray = field(default=None)  # type: ignore[assignment]
    high: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        if self.counts is None:
            bins = len(FINE_EDGES) - 1
            shape = (self.k, bins) if self.per_channel else (bins,)
            self.counts = np.zeros(shape, dtype=np.int64)
            self.low, self.high = np.full(shape, np.inf), np.zeros(shape)

    def update(self, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x, dtype=np.float64).reshape(-1, self.k))
        bins = len(FINE_EDGES) - 1
        with np.errstate(divide="ignore"):  # |x| = 0 -> -inf -> bin 0
            idx = np.floor(np.log2(a) * FINE_PER_OCTAVE) + (24 * FINE_PER_OCTAVE + 1)
        idx = np.clip(np.nan_to_num(idx, nan=0.0, neginf=0.0), 0, bins - 1).astype(np.int64)
        if self.per_channel:
            idx += np.arange(self.k) * bins
        flat = idx.ravel()
        self.counts += np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)
        np.minimum.at(self.low.reshape(-1), flat, a.ravel())
        np.maximum.at(self.high.reshape(-1), flat, a.ravel())

    def quantile(self, q: float) -> np.ndarray:
        """`t` with a fraction `q` of the `|x|` at or below it (per channel: shape [K]).

        Within the bin holding the quantile, `t` is interpolated (geometrically) between the
        bin's smallest and largest value. A bin holding one value up to float rounding (a
        point mass, e.g. a saturated tanh) gives the float32 just below it: the mass is kept
        whole (sparsity then undershoots), since runtimes disagree by an ulp about values
        at a threshold placed on it."""
        counts = np.atleast_2d(self.counts).astype(np.float64)
        cum = np.cumsum(counts, axis=1)
        target = q * cum[:, -1]
        b = np.minimum((cum < target[:, None]).sum(axis=1), counts.shape[1] - 1)
        rows = np.arange(len(b))
        below = np.where(b > 0, cum[rows, np.maximum(b - 1, 0)], 0.0)
        n = counts[rows, b]
        frac = np.clip((target - below) / np.maximum(n, 1.0), 0.0, 1.0)
        lo, hi = np.atleast_2d(self.low)[rows, b], np.atleast_2d(self.high)[rows, b]
        lo = np.where(n > 0, lo, 0.0)
        hi = np.where(n > 0, hi, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(lo > 0, lo * (hi / np.where(lo > 0, lo, 1.0)) ** frac, hi * frac)
        under = np.nextafter(lo.astype(np.float32), np.float32(0)).astype(np.float64)
        t = np.where(hi <= lo * (1 + 2.0**-20), under, t)
        t = np.where(np.isfinite(t), t, lo)
        return t if self.per_channel else t[0]


def tap_unsupported(node: gs.Node) -> str | None:
    """Why the data input of `node` cannot be tapped for statistics, or None."""
    if node.op == "Conv":
        if node.attrs.get("group", 1) != 1:
            return "grouped Conv is not supported by calibrated passes"
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return "Conv with auto_pad is not supported by calibrated passes"
    elif node.op not in ("MatMul", "Gemm"):
        return f"{node.op} has no activation input to calibrate"
    return None


def _unfold(x: np.ndarray, node: gs.Node, kernel: Sequence[int]) -> np.ndarray:
    """Conv input `x[B, C, *spatial]` as im2col rows `[B*out, C*prod(kernel)]` (W's K order)."""
    s = len(kernel)
    strides = node.attrs.get("strides") or [1] * s
    dil = node.attrs.get("dilations") or [1] * s
    pads = node.attrs.get("pads") or [0] * (2 * s)
    x = np.pad(x, [(0, 0), (0, 0), *[(pads[i], pads[i + s]) for i in range(s)]])
    span = [d * (k - 1) + 1 for d, k in zip(dil, kernel, strict=True)]
    v = np.lib.stride_tricks.sliding_window_view(x, span, axis=tuple(range(2, 2 + s)))
    v = v[
        (
            slice(None),
            slice(None),
            *[slice(None, None, st) for st in strides],
            *[slice(None, None, d) for d in dil],
        )
    ]
    perm = [0, *range(2, 2 + s), 1, *range(2 + s, 2 + 2 * s)]
    return v.transpose(perm).reshape(-1, x.shape[1] * math.prod(kernel))


@dataclass
class _Tap:
    output: str  # the probe's output, or the graph input when X is one (read from the feed)
    k: int
    node: gs.Node
    kernel: tuple[int, ...] = ()
    from_feed: bool = False

    def rows(self, x: np.ndarray) -> np.ndarray:
        if self.node.op == "Conv":
            return _unfold(x, self.node, self.kernel)
        return x.reshape(-1, self.k)


def collect_statistics(
    model: Model,
    ops: Sequence[Any],
    feeds: Iterable[Feed],
    *,
    hessian: bool = False,
    histogram: bool = False,
    total: int | None = None,
) -> dict[str, ActivationStats]:
    """Statistics of the data input of each op in `ops` (WeightedOps of `model`), by op name.

    Streams `feeds` (complete feed dicts) through onnxruntime one batch at a time; see the
    module docstring for what is kept. On a terminal, a rich progress bar is shown for more
    than 4 batches (or an unknown number).
    """
    probe = model.copy()
    nodes = {n.name: n for n in probe.graph.nodes}
    taps: dict[str, _Tap] = {}
    key_of: dict[str, str] = {}
    outputs: list[gs.Variable] = []
    for op in ops:
        node = nodes[op.name]
        reason = tap_unsupported(node)
        if reason:
            raise UsageError(f"op {op.name!r}: {reason}")
        x = node.inputs[0]
        key = node.name if node.op == "Conv" else x.name
        key_of[op.name] = key
        if key in taps:
            continue
        kernel = tuple(op.weight.effective().shape[2:]) if node.op == "Conv" else ()
        if any(x is t for t in probe.graph.inputs):
            taps[key] = _Tap(x.name, op.shape[1], node, kernel, from_feed=True)
            continue
        out = gs.Variable(f"{key}__calibration_{len(taps)}", dtype=np.dtype(op.dtype))
        probe.graph.nodes.append(
            gs.Node("Identity", f"calibration_tap_{len(taps)}", inputs=[x], outputs=[out])
        )
        outputs.append(out)
        taps[key] = _Tap(out.name, op.shape[1], node, kernel)
    probe.graph.outputs = outputs  # only what the taps need is computed
    probe.graph.cleanup().toposort()
    names = [out.name for out in outputs]
    with _session(probe) if names else contextlib.nullcontext() as sess:
        stats = {key: _new_stats(tap.k, hessian, histogram) for key, tap in taps.items()}
        for feed in _progress(feeds, total):
            _fold(stats, taps, feed, _run(sess, names, feed))  # the batch's outputs die on return
    return {name: stats[key] for name, key in key_of.items()}


def stream_tensors(
    model: Model, names: Sequence[str], feeds: Iterable[Feed], total: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Per batch of `feeds` (complete feed dicts), the tensors `names` of `model` by name, as
    onnxruntime computes them on a probe copy whose outputs are only those tensors (a graph
    input is read from the feed). One batch's arrays are alive at a time (the caller's)."""
    probe = model.copy()
    tensors = probe.graph.tensors()
    inputs = {t.name for t in probe.graph.inputs}
    outputs, out_of = [], {}
    for i, name in enumerate(dict.fromkeys(names)):
        if name not in tensors:
            raise UsageError(f"model {model.name} has no tensor {name!r}")
        if name in inputs:
            continue
        out = gs.Variable(f"{name}__stream_{i}", dtype=tensors[name].dtype or np.float32)
        probe.graph.nodes.append(
            gs.Node("Identity", f"stream_tap_{i}", inputs=[tensors[name]], outputs=[out])
        )
        outputs.append(out)
        out_of[name] = out.name
    probe.graph.outputs = outputs
    probe.graph.cleanup().toposort()
    run_names = [out.name for out in outputs]
    with _session(probe) if run_names else contextlib.nullcontext() as sess:
        for feed in _progress(feeds, total):
            outs = _run(sess, run_names, feed)
            yield {name: feed[name] if name in inputs else outs[out_of[name]] for name in names}


def _run(sess, names: list[str], feed: Feed) -> dict[str, np.ndarray]:
    if not names:
        return {}
    try:
        return dict(zip(names, sess.run(names, feed), strict=True))
    except Exception as exc:
        raise UsageError(f"calibration feeds do not fit the model: {_first_line(exc)}") from None


def _fold(stats: dict[str, ActivationStats], taps: dict[str, _Tap], feed: Feed, outs: dict) -> None:
    for key, tap in taps.items():
        x = feed[tap.output] if tap.from_feed else outs[tap.output]
        if x.ndim == 0 or x.shape[-1 if tap.node.op != "Conv" else 1] * math.prod(tap.kernel) != tap.k:
            raise UsageError(
                f"calibration input of op {tap.node.name!r} has shape {x.shape}, expected K={tap.k}"
            )
        stats[key].update(tap.rows(x))


def _new_stats(k: int, hessian: bool, histogram: bool) -> ActivationStats:
    return ActivationStats(
        k,
        xtx=np.zeros((k, k)) if hessian else None,
        hist=np.zeros(len(HIST_EDGES) - 1, dtype=np.int64) if histogram else None,
    )


class _session:
    """An onnxruntime session on `model` (through a temporary file when over 2 GB)."""

    def __init__(self, model: Model):
        self.model, self.tmp = model, None

    def __enter__(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # failures are raised as one-line errors
        # idle onnxruntime threads must not spin while numpy (BLAS) folds the batch in
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.model.weight_nbytes() > PROTOBUF_LIMIT:
            self.tmp = tempfile.TemporaryDirectory(prefix="sparsegraph-calib-")
            source: Any = str(self.model.save(Path(self.tmp.name) / "probe.onnx", external_data=True))
        else:
            source = self.model.to_proto().SerializeToString()
        try:
            return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise UsageError(f"onnxruntime cannot run the calibration probe: {_first_line(exc)}") from None

    def __exit__(self, *exc):
        if self.tmp is not None:
            self.tmp.cleanup()


def _progress(feeds: Iterable[Feed], total: int | None) -> Iterator[Feed]:
    if total is not None and total <= 4:
        yield from feeds
        return
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("calibration", total=total)
        for feed in feeds:
            yield feed
            bar.advance(task)


# ------------------------------------------------------------------------ feed derivation
def token_input(model: Model, ints: dict[str, _IntInput] | None = None) -> str:
    """Name of the integer input indexing the largest constant table (else the only integer input)."""
    ints = _int_inputs(model) if ints is None else ints
    indexing = [name for name, i in ints.items() if i.bound is not None]
    if indexing:
        return max(indexing, key=lambda name: ints[name].bound)
    if len(ints) == 1:
        return next(iter(ints))
    raise UsageError(f"cannot tell which input takes token ids among {[t.name for t in _inputs(model)]}")


@dataclass(frozen=True)
class _IntInput:
    bound: int | None  # rows of the smallest constant table it indexes
    rotary: bool  # a Sin/Cos node lies downstream


def _int_inputs(model: Model) -> dict[str, _IntInput]:
    """What the graph says about each integer input (one walk per input)."""
    return {
        t.name: _IntInput(_index_bound(t), _reaches(t, _ROTARY)) for t in _inputs(model) if _kind(t) in "iu"
    }


def complete_feeds(model: Model, given: Feed, ints: dict[str, _IntInput] | None = None) -> Feed:
    """`given` (arrays for some inputs) plus derived arrays for the others (module docstring).

    `ints` is `_int_inputs(model)`, computed when needed unless given (cache it across batches)."""
    inputs = _inputs(model)
    names = [t.name for t in inputs]
    unknown = [k for k in given if k not in names]
    if unknown:
        raise UsageError(
            f"calibration array {unknown[0]!r} names no model input (inputs: {', '.join(names)})"
        )
    feeds: Feed = {}
    sizes: dict[str, int] = {}
    for t in inputs:
        if t.name not in given:
            continue
        arr = np.asarray(given[t.name])
        dtype = np.dtype(t.dtype) if t.dtype is not None else arr.dtype
        if arr.dtype != dtype and arr.dtype.kind == dtype.kind:
            arr = arr.astype(dtype)
        feeds[t.name] = arr
        for axis, dim in enumerate(t.shape or []):
            if not isinstance(dim, int) and dim and axis < arr.ndim:
                sizes[str(dim)] = arr.shape[axis]
    if len(feeds) == len(inputs):
        return feeds
    if not feeds:
        raise UsageError("calibration feeds give no model input")
    batch = next(iter(feeds.values())).shape[0] if next(iter(feeds.values())).ndim else 1
    ints = _int_inputs(model) if ints is None else ints
    tok = token_input(model, ints) if ints else None
    seq = feeds[tok].shape[-1] if tok is not None and tok in feeds else 1
    for t in inputs:
        if t.name in feeds:
            continue
        kind = _kind(t)
        dims = list(t.shape or [])
        missing_dims = [d for d in dims[1:] if not isinstance(d, int) and str(d) not in sizes]
        shape = [
            d if isinstance(d, int) and d >= 0 else sizes.get(str(d), batch if axis == 0 else seq)
            for axis, d in enumerate(dims)
        ]
        dtype = np.dtype(t.dtype)
        if kind in "iu":
            bound = ints[t.name].bound
            if t.name == tok:
                raise UsageError(f"calibration data has no array for the token input {t.name!r}")
            if ints[t.name].rotary or (bound is not None and bound >= seq):
                pos = np.arange(shape[-1] if shape else 1, dtype=dtype)
                feeds[t.name] = np.broadcast_to(pos, shape).copy() if shape else pos[0]
            else:
                feeds[t.name] = (np.zeros if bound is not None else np.ones)(shape, dtype=dtype)
        elif kind == "b":
            feeds[t.name] = np.ones(shape, dtype=bool)
        elif missing_dims:  # a past cache: its own dims are empty
            cache = [
                0 if axis > 0 and not isinstance(d, int) and str(d) not in sizes else s
                for axis, (d, s) in enumerate(zip(dims, shape, strict=True))
            ]
            feeds[t.name] = np.zeros(cache, dtype=dtype)
        else:
            raise UsageError(f"calibration data has no array for input {t.name!r}, and it cannot be derived")
    return feeds


def _inputs(model: Model) -> list[gs.Variable]:
    return [t for t in model.graph.inputs if not isinstance(t, gs.Constant)]


def _kind(t: gs.Tensor) -> str:
    return np.dtype(t.dtype).kind if t.dtype is not None else "f"


def _reaches(tensor: gs.Tensor, ops: set[str]) -> bool:
    """Whether a node of type in `ops` lies downstream of `tensor`."""
    queue, seen = deque([tensor]), set()
    while queue:
        for node in queue.popleft().outputs:
            if id(node) in seen:
                continue
            if node.op in ops:
                return True
            seen.add(id(node))
            queue.extend(node.outputs)
    return False


# --------------------------------------------------------------------------- calibration
class Calibration:
    """Calibration batches for one model, re-iterable (see the module docstring)."""

    def __init__(
        self,
        source: Sequence[Feed] | Callable[[], Iterable[Feed]] | Iterable[Feed],
        description: str = "given feeds",
    ):
        if not callable(source) and not isinstance(source, Sequence):
            source = list(source)  # a one-shot iterator: keep it to iterate again
        self.source = source
        self.description = description
        self.seconds = 0.0  # wall time spent collecting statistics
        self.runs = 0  # statistics collections (one per layer in sequential mode)
        self.samples: int | None = None

    def batches(self) -> Iterator[Feed]:
        """The raw feed dicts (possibly missing derivable inputs)."""
        return iter(self.source() if callable(self.source) else self.source)

    def __len__(self) -> int:
        if callable(self.source):
            raise TypeError("a streamed calibration source has no known length")
        return len(self.source)

    def feeds(self, model: Model) -> Iterator[Feed]:
        """Complete feed dicts for `model`, one per batch."""
        ints = _int_inputs(model)
        for batch in self.batches():
            yield complete_feeds(model, batch, ints)

    def statistics(
        self, model: Model, ops: Sequence[Any], *, hessian: bool = False, histogram: bool = False
    ) -> dict[str, ActivationStats]:
        """Activation statistics of `ops` on the current `model` (see `collect_statistics`)."""
        start = time.perf_counter()
        total = None if callable(self.source) else len(self.source)
        stats = collect_statistics(
            model, ops, self.feeds(model), hessian=hessian, histogram=histogram, total=total
        )
        self.seconds += time.perf_counter() - start
        self.runs += 1
        return stats

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.description,
            "samples": self.samples,
            "batches": None if callable(self.source) else len(self.source),
            "collections": self.runs,
            "seconds": round(self.seconds, 3),
        }

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_arrays(
        cls,
        arrays: Feed,
        model: Model,
        samples: int | None = None,
        batch_size: int = DEFAULT_BATCH,
        description: str = "given arrays",
    ) -> Calibration:
        """Batches of `batch_size` samples (first axis) of `arrays`, named after model inputs."""
        complete_feeds(model, {k: np.asarray(v)[:1] for k, v in arrays.items()})  # names, derivability
        counts = {np.asarray(v).shape[0] if np.ndim(v) else 0 for v in arrays.values()}
        if len(counts) != 1 or 0 in counts:
            raise UsageError(f"{description}: arrays need one common, non-empty first axis (samples)")
        n = counts.pop() if samples is None else min(samples, counts.pop())
        static = {
            t.shape[0] for t in _inputs(model) if t.name in arrays and t.shape and isinstance(t.shape[0], int)
        }
        size = static.pop() if static else batch_size
        if size < 1:
            raise UsageError(f"batch size must be >= 1, got {size}")
        arrays = {k: np.asarray(v)[:n] for k, v in arrays.items()}
        stop = n - n % size if static else n  # a fixed batch dim takes only whole batches
        batches = [{k: v[i : i + size] for k, v in arrays.items()} for i in range(0, stop, size)]
        if not batches:
            raise UsageError(f"{description}: fewer samples ({n}) than the model's fixed batch ({size})")
        calib = cls(batches, description)
        calib.samples = sum(next(iter(b.values())).shape[0] for b in batches)
        return calib

    @classmethod
    def from_npz(
        cls,
        path: str | os.PathLike,
        model: Model,
        samples: int | None = None,
        batch_size: int = DEFAULT_BATCH,
    ) -> Calibration:
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"{path}: calibration file not found")
        try:
            with np.load(path) as data:
                arrays = {k: data[k] for k in data.files}
        except Exception as exc:
            raise UsageError(f"{path}: not a readable .npz file ({_first_line(exc)})") from None
        if not arrays:
            raise UsageError(f"{path}: no arrays")
        try:
            return cls.from_arrays(arrays, model, samples, batch_size, description=str(path))
        except UsageError as exc:
            raise UsageError(f"{path}: {exc}") from None

    @classmethod
    def from_text(
        cls,
        text: str | os.PathLike | Sequence[str],
        tokenizer: Any,
        model: Model,
        samples: int = 128,
        seqlen: int = 128,
        seed: int = 0,
        batch_size: int = DEFAULT_BATCH,
    ) -> Calibration:
        """`samples` seeded windows of `seqlen` token ids of `text` (a path, a string, or documents)."""
        what = str(text) if isinstance(text, os.PathLike) else "calibration text"
        windows = text_windows(text, tokenizer, samples, seqlen, seed)
        calib = cls.from_arrays({token_input(model): windows}, model, None, batch_size, what)
        calib.description = f"{what}: {samples} windows of {seqlen} tokens (seed {seed})"
        return calib


def text_windows(
    text: str | os.PathLike | Sequence[str], tokenizer: Any, samples: int, seqlen: int, seed: int = 0
) -> np.ndarray:
    """`[samples, seqlen]` int64 token windows at seeded uniform offsets of the encoded text."""
    if samples < 1 or seqlen < 1:
        raise UsageError(f"need samples >= 1 and seqlen >= 1 (got {samples}, {seqlen})")
    if isinstance(text, os.PathLike):
        try:
            text = Path(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{text}: cannot read calibration text ({exc})") from None
    docs = [d.strip() for d in text.split(STORY_SEPARATOR)] if isinstance(text, str) else list(text)
    encode = tokenizer.encode if hasattr(tokenizer, "encode") else tokenizer
    ids = np.concatenate(
        [np.asarray(encode(d), dtype=np.int64) for d in docs if d] or [np.zeros(0, np.int64)]
    )
    if len(ids) < seqlen:
        raise UsageError(f"calibration text has {len(ids)} tokens, fewer than seqlen={seqlen}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - seqlen + 1, size=samples)
    return np.stack([ids[s : s + seqlen] for s in starts])


def load_calibration(
    calib: Any,
    model: Model,
    *,
    tokenizer: Any = None,
    samples: int = 128,
    seqlen: int = 128,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH,
) -> Calibration:
    """A `Calibration` from what the user gave: a `Calibration`, an `.npz` path, a text file
    path (needs `tokenizer`: a llama2.c tokenizer path or object, or a callable str -> ids),
    or an iterable of feed dicts. Bad input is a one-line `UsageError`."""
    if isinstance(calib, Calibration):
        return calib
    if isinstance(calib, (str, os.PathLike)):
        path = Path(calib)
        if not path.is_file():
            raise UsageError(f"{path}: calibration file not found")
        if path.suffix == ".npz":
            return Calibration.from_npz(path, model, samples, batch_size)
        if tokenizer is None:
            raise UsageError(f"{path}: a text calibration file needs --tokenizer (a llama2.c tokenizer .bin)")
        return Calibration.from_text(path, _tokenizer(tokenizer), model, samples, seqlen, seed, batch_size)
    if isinstance(calib, Iterable) or callable(calib):
        return Calibration(calib)
    raise UsageError(f"cannot use {type(calib).__name__} as calibration data")


def _tokenizer(tokenizer: Any) -> Any:
    if isinstance(tokenizer, (str, os.PathLike)):
        from .eval.tokenizer import Llama2cTokenizer

        if not Path(tokenizer).is_file():
            raise UsageError(f"{tokenizer}: tokenizer file not found")
        try:
            return Llama2cTokenizer(tokenizer)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return tokenizer


def calibration_of(ctx: Any, pass_name: str) -> Calibration:
    """The `Calibration` in `ctx.extras["calibration"]`; a `RecipeError` if there is none."""
    calib = ctx.extras.get("calibration")
    if calib is None:
        raise missing_calibration(pass_name)
    if not isinstance(calib, Calibration):
        raise UsageError(f"pass {pass_name!r}: ctx.extras['calibration'] is not a Calibration")
    return calib


def missing_calibration(pass_name: str) -> RecipeError:
    return RecipeError(
        f"pass {pass_name!r} needs calibration data: pass --calib DATA (.npz of model inputs, or text "
        "with --tokenizer), or calib= to compile_model"
    )


def _first_line(exc: BaseException) -> str:
    """The error's text on one line (onnxruntime puts the useful part on the second)."""
    return " ".join(str(exc).split())[:300] or type(exc).__name__
