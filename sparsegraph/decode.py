"""Step-by-step decoding of a KV-cache ONNX model in onnxruntime, bounded cache or not.

`KVDecoder(model)` finds the model's state pairs (past input → present output): from the
`sparsegraph.kv_cache` metadata a `kv_cache` rewrite leaves (which also lists its score
states), else the `Concat`s of a graph input that are graph outputs. The other inputs are
found by data flow: the token ids (`find_token_input`), the position ids (an integer input
that reaches a `Sin`/`Cos`, i.e. RoPE) and the attention mask (any other integer input).
Each `step` feeds the tokens, absolute positions `seen .. seen + S - 1`, a mask of ones
over the current cache plus the new tokens (whatever length the cache has after
eviction), and the states, then stores the presents as the next pasts. Rows are unpadded.

    dec = KVDecoder("model.onnx", batch=1)
    for t in ids:                      # teacher forcing, one token a step
        logits = dec.step(np.array([[t]]))
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .errors import UsageError
from .eval.perplexity import find_token_input

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def _reaches(model: onnx.ModelProto, name: str, ops: set[str], limit: int = 64) -> bool:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    queue, seen = deque([name]), set()
    while queue and len(seen) < limit:
        for node in consumers.get(queue.popleft(), []):
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in ops:
                return True
            queue.extend(node.output)
    return False


def state_pairs(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(past input, present output) pairs of a KV-cache model, in graph order: from the
    `kv_cache` metadata, else every `Concat` of a graph input whose output is a graph output."""
    meta = {p.key: p.value for p in model.metadata_props}
    if "sparsegraph.kv_cache" in meta:
        return [tuple(p) for p in json.loads(meta["sparsegraph.kv_cache"])["states"]]
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    pairs = []
    for node in model.graph.node:
        past = [i for i in node.input if i in inputs]
        if node.op_type == "Concat" and len(past) == 1 and node.output[0] in outputs:
            pairs.append((past[0], node.output[0]))
    if not pairs:
        raise UsageError("model has no KV cache (no past input concatenated into a present output)")
    return pairs


class KVDecoder:
    """Feeds a KV-cache model one step at a time; `state_nbytes` is the cache it holds."""

    def __init__(
        self,
        model: str | Path | onnx.ModelProto,
        batch: int = 1,
        threads: int = 1,
        positions: str | None = None,
        mask: str | None = None,
    ):
        """`positions` / `mask` name those inputs when data flow cannot tell them apart
        (position ids are found only when they feed RoPE's Sin/Cos)."""
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        self.pairs = state_pairs(proto)
        self.batch = batch
        self.token = find_token_input(proto)
        past = {p for p, _ in self.pairs}
        inputs = {i.name: i for i in self.session.get_inputs()}
        others = [n for n in inputs if n not in past and n != self.token]
        self.positions = positions or next((n for n in others if _reaches(proto, n, {"Sin", "Cos"})), None)
        self.mask = mask or next((n for n in others if n != self.positions), None)
        self.logits = self.session.get_outputs()[0].name
        self._specs = {p: inputs[p] for p in past}
        self.reset()

    def reset(self) -> None:
        """Empty cache (past length 0)."""
        self.seen = 0
        self.state: dict[str, np.ndarray] = {}
        for name, spec in self._specs.items():
            dims = [d if isinstance(d, int) else 0 for d in spec.shape]
            dims[0] = self.batch
            self.state[name] = np.zeros(dims, _ORT_TYPES.get(spec.type, np.float32))

    @property
    def cache_len(self) -> int:
        """Positions held by the first state (a key cache)."""
        return int(self.state[self.pairs[0][0]].shape[-2])

    @property
    def state_nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.state.values())

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Run `tokens` `[batch, S]`; returns logits `[batch, S, vocab]` and advances the cache."""
        tokens = np.asarray(tokens, dtype=np.int64)
        n = tokens.shape[1]
        feeds = {self.token: tokens, **self.state}
        if self.positions:
            feeds[self.positions] = np.broadcast_to(np.arange(self.seen, self.seen + n), tokens.shape).copy()
        if self.mask:
            feeds[self.mask] = np.ones((self.batch, self.cache_len + n), np.int64)
        wanted = [self.logits] + [present for _, present in self.pairs]
        out = self.session.run(wanted, feeds)
        for (past, _), value in zip(self.pairs, out[1:], strict=True):
            self.state[past] = value
        self.seen += n
        return out[0]


__all__ = ["KVDecoder", "state_pairs"]
