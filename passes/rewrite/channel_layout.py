"""Channel layouts between structured projections, found by symbolic shape propagation.

Structured pruning removes whole output channels of some projections (FFN neurons,
attention heads) and the matching input channels of the projection that reads them. The
graph in between must then run with fewer channels: every constant that encodes a channel
count (a Reshape target such as `[0, 0, H, hd]`, an Expand shape, Split sizes, a bias, a
KV-cache input's declared shape) must change, and nothing else may.

`ChannelLayout` finds those constants. Each axis of each activation on the path from the
*sources* (outputs of the pruned projections) to the *sinks* (the projection reading them)
is an ordered list of factors, major first:

- `Sym`: a count the pruning changes (KV groups `K`, query heads per group `R`, FFN
  neurons `F`), compared by identity;
- `int`: a size no pruning changes (the head dim, RoPE halves);
- `Opaque`: a size no pruning changes and whose value is unknown (batch, sequence);
- `Var`: a literal of the graph (a shape-constant element, a constant operand's dim, a
  graph input's declared dim) whose meaning is not known yet; unification binds it.

A source's channel axis is given as factors (`[K, R, hd]`: head-major rows, as
`view(B, T, H, hd)` reads them). Propagation follows ONNX semantics: a row-major Reshape
consumes factors in order (a literal `4` facing `[K=2, R=2, 8]` is `K·R`; a literal that
would cut through a `Sym` is a contradiction), broadcasting and MatMul contraction unify
aligned axes, and an Expand literal on a broadcast axis is bound by whatever it meets
later. Anything the rules cannot follow (an unsupported op on the path, a head-bearing
axis that is sliced, concatenated, reduced or normalised, a head count flowing into
data, a literal facing an unknown size) raises `LayoutError`; callers report it as
`UnsupportedOpError` rather than guess.

`ChannelLayout.apply` rewrites a finished analysis once the `Sym`s have new sizes: each
bound literal becomes the product of its factors' new sizes (a shape subgraph shared with
other users is cloned, so only this path changes), constant operands bound to a
channel axis are sliced with the caller's kept indices, declared graph input and output
shapes are updated, and stale intermediate shapes are dropped.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sparsegraph.model import Model, constant_value, producer


class LayoutError(Exception):
    """The channel layout cannot be proven; the message says where and why."""


# ------------------------------------------------------------------------------ factors
@dataclass(eq=False)
class Sym:
    """A channel count that pruning changes (`new` is set before `apply`)."""

    name: str
    value: int
    new: int | None = None

    def __repr__(self) -> str:
        return f"{self.name}={self.value}"


@dataclass(eq=False)
class Opaque:
    """A size no pruning changes and whose value is not known statically."""

    label: str

    def __repr__(self) -> str:
        return self.label


@dataclass(eq=False)
class Var:
    """A literal of the graph; `res` is the factor list it was found to stand for."""

    value: int
    site: Any = None
    res: list | None = None

    def __repr__(self) -> str:
        return f"lit{self.value}" if self.res is None else f"lit{self.value}->{fmt(self.res)}"


Factor = Any  # int | Sym | Opaque | Var
Dim = list


def flat(dim: Iterable[Factor]) -> list[Factor]:
    """Factors with bound literals expanded and sizes of 1 dropped."""
    out: list[Factor] = []
    for f in dim:
        if isinstance(f, Var):
            if f.res is None and f.value == 1:
                f.res = []
            if f.res is not None:
                out.extend(flat(f.res))
            else:
                out.append(f)
        elif isinstance(f, int):
            if f != 1:
                out.append(f)
        elif isinstance(f, Sym):
            if f.value != 1:
                out.append(f)
        else:
            out.append(f)
    return out


def value(f: Factor) -> int | None:
    if isinstance(f, int):
        return f
    if isinstance(f, (Sym, Var)):
        return f.value
    return None


def dim_value(dim: Dim) -> int | None:
    values = [value(f) for f in flat(dim)]
    return None if any(v is None for v in values) else math.prod(values)


def syms(dim: Dim) -> list[Sym]:
    return [f for f in flat(dim) if isinstance(f, Sym)]


def fmt(dim: Iterable[Factor]) -> str:
    parts = [repr(f) for f in flat(dim)]
    return "[" + "·".join(parts) + "]" if parts else "[1]"


def new_value(var: Var) -> int:
    """The value a literal must take after pruning (unchanged unless bound to a `Sym`)."""
    if var.res is None:
        return var.value
    factors = flat(var.res)
    if not any(isinstance(f, Sym) for f in factors):
        return var.value
    return _new_product(factors, f"literal {var.value}")


def dim_new_value(dim: Dim) -> int | None:
    """The size of an axis after pruning, None if unknown."""
    factors = flat(dim)
    if any(isinstance(f, Opaque) for f in factors):
        return None
    return _new_product(factors, fmt(dim))


def _new_product(factors: list[Factor], what: str) -> int:
    total = 1
    for f in factors:
        if isinstance(f, Sym):
            if f.new is None:
                raise LayoutError(f"no new size for {f.name}")
            total *= f.new
        elif isinstance(f, Var):
            total *= new_value(f)
        elif isinstance(f, int):
            total *= f
        else:
            raise LayoutError(f"{what} depends on an unknown size")
    return total


# ---------------------------------------------------------------------- unification
def _bind(var: Var, queue: deque, where: str, from_back: bool = False) -> None:
    """Bind `var` to the leading factors of `queue` whose product is its value."""
    if queue and isinstance(queue[0], Opaque):
        var.res = [queue.popleft()]
        return
    need, prod, got = var.value, 1, []
    if need < 1:
        raise LayoutError(f"{where}: literal {need} where a size is expected")
    while prod < need:
        if not queue:
            raise LayoutError(f"{where}: literal {need} is larger than the axis it faces")
        f = queue[0]
        v = value(f)
        if v is None:
            raise LayoutError(f"{where}: literal {need} faces a size that is not known statically")
        if need % (prod * v) == 0:
            got.append(queue.popleft())
            prod *= v
        elif isinstance(f, int) and f % (need // prod) == 0:
            part = need // prod
            queue[0] = f // part
            got.append(part)
            prod = need
        else:
            raise LayoutError(f"{where}: literal {need} cuts through {fmt([f])}")
    var.res = got[::-1] if from_back else got


def unify(a: Dim, b: Dim, where: str, prefix: bool = False, from_back: bool = False) -> list[Factor]:
    """Make `a` and `b` the same size, binding literals on either side.

    With `prefix`, `a` must match a leading (trailing with `from_back`) part of `b`, and the
    rest of `b` is returned. Sizes that are not known (`Opaque`) match each other and
    plain integers leniently: they never carry a channel count.
    """
    fa, fb = flat(a), flat(b)
    if from_back:
        fa, fb = fa[::-1], fb[::-1]
    qa, qb = deque(fa), deque(fb)
    while qa and qb:
        x, y = qa[0], qb[0]
        if x is y:
            qa.popleft()
            qb.popleft()
        elif isinstance(x, Var):
            qa.popleft()
            _bind(x, qb, where, from_back)
        elif isinstance(y, Var):
            qb.popleft()
            _bind(y, qa, where, from_back)
        elif isinstance(x, Opaque) and isinstance(y, Opaque):
            qa.popleft()
            qb.popleft()
        elif isinstance(x, Opaque) or isinstance(y, Opaque):
            # In a Reshape (prefix) an unknown size matches unknown sizes only, as a block:
            # the other side's factor belongs to the next entry. Elsewhere an unknown size
            # may equal a fixed one, but never a channel count (a leftover Sym fails below).
            if prefix or isinstance(x, Sym) or isinstance(y, Sym):
                qa.popleft() if isinstance(x, Opaque) else qb.popleft()
            else:
                qa.popleft()
                qb.popleft()
        elif isinstance(x, int) and isinstance(y, int):
            qa.popleft()
            qb.popleft()
            if x % y == 0 and x != y:
                qa.appendleft(x // y)
            elif y % x == 0 and x != y:
                qb.appendleft(y // x)
            elif x != y:
                raise LayoutError(f"{where}: sizes {fmt(a)} and {fmt(b)} differ")
        else:
            raise LayoutError(f"{where}: {fmt(a)} does not match {fmt(b)}")
    if any(not isinstance(f, Opaque) for f in qa):
        raise LayoutError(f"{where}: {fmt(a)} does not match {fmt(b)}")
    rest = list(qb)[::-1] if from_back else list(qb)
    if prefix:
        return rest
    left = [f for f in qb if not isinstance(f, Opaque)]
    if any(isinstance(f, (Sym, Var)) for f in left) or (
        left and any(not isinstance(f, Opaque) for f in flat(a))
    ):
        raise LayoutError(f"{where}: {fmt(a)} does not match {fmt(b)}")
    return []


def broadcast(dims: list[list[Dim] | None], where: str) -> list[Dim]:
    """Numpy broadcasting of several shapes (None: unknown rank, ignored)."""
    known = [d for d in dims if d is not None]
    if not known:
        raise LayoutError(f"{where}: no input shape is known")
    rank = max(len(d) for d in known)
    out: list[Dim] = []
    for axis in range(rank):
        present = [d[axis - rank + len(d)] for d in known if axis - rank + len(d) >= 0]
        big = [d for d in present if flat(d)]
        if not big:
            out.append([])
            continue
        for other in big[1:]:
            unify(big[0], other, where)
        out.append(min(big, key=_vagueness))  # the most precisely known of the equal sizes
    return out


def _vagueness(dim: Dim) -> int:
    factors = flat(dim)
    return 2 * any(isinstance(f, Opaque) for f in factors) + any(isinstance(f, Var) for f in factors)


# ------------------------------------------------------------------------ op tables
UNARY = {
    "Identity", "Cast", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Tanh", "Sigmoid",
    "Erf", "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "FastGelu", "QuickGelu",
    "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Mish", "Swish", "IsNaN", "IsInf",
    "Not", "Sign", "Floor", "Ceil", "Round", "Sin", "Cos", "Clip", "Dropout", "CastLike",
    "ThresholdedRelu",
}  # fmt: skip
BROADCAST = {
    "Add", "Sub", "Mul", "Div", "Pow", "Where", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "And", "Or", "Xor", "Max", "Min", "Mod", "Sum", "Mean", "PRelu",
    "BiasGelu",
}  # fmt: skip
AXIS_OPS = {"Softmax", "LogSoftmax", "Hardmax"}
NORMS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1",
          "ReduceSumSquare", "ReduceLogSumExp"}  # fmt: skip
#: ops that may compute a shape tensor from `Shape` outputs and constants
SHAPE_ARITH = {
    "Shape", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity",
    "Cast", "Mul", "Div", "Add", "Sub", "Max", "Min", "Equal", "Where", "Not", "ReduceProd",
    "ConstantOfShape", "Neg",
}  # fmt: skip
INT64_MAX = np.iinfo(np.int64).max


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


# --------------------------------------------------------------------------- records
@dataclass
class _Leaf:
    node: gs.Node
    index: int
    values: np.ndarray
    vars: list[Var]


@dataclass
class _ShapeUse:
    """A path node's shape input, with the literals it was computed from."""

    node: gs.Node
    index: int
    tensor: gs.Tensor
    leaves: dict[tuple[int, int], _Leaf] = field(default_factory=dict)


@dataclass
class _ConstOperand:
    tensor: gs.Tensor
    dims: list[Dim]
    edges: list[tuple[gs.Node, int]] = field(default_factory=list)


# ----------------------------------------------------------------------------- engine
class ChannelLayout:
    """Symbolic propagation from `sources` to `sinks` (see the module docstring).

    `sources`: (output, input, channel factors) of each pruned projection (the output's
    leading dims are the input's); `sinks`: nodes that end the path (their data input 0
    is where channels arrive); `stop`: ids of nodes the path must not reach (other
    projections); `shapes`: inferred dims by tensor name (`infer_dims`). After `run()`,
    `sink_dims[id(node)]` holds the dims arriving at each sink.
    """

    def __init__(
        self,
        graph: gs.Graph,
        shapes: dict[str, list | None],
        sources: list[tuple[gs.Tensor, gs.Tensor, Dim]],
        sinks: Iterable[gs.Node],
        stop: set[int],
        where: str,
        allow_outputs: bool = True,
        max_nodes: int = 4000,
        suspects: set[str] | None = None,
    ):
        self.graph, self.shapes, self.where = graph, shapes, where
        self.sources, self.sinks = sources, {id(n): n for n in sinks}
        self.stop, self.allow_outputs, self.max_nodes = stop, allow_outputs, max_nodes
        self.suspects = suspects if suspects is not None else set()  # off-path tensors of vague shape
        self.dims: dict[int, list[Dim]] = {}
        self.path: dict[int, gs.Tensor] = {}
        self.sink_dims: dict[int, list[Dim]] = {}
        self.uses: list[_ShapeUse] = []
        self.consts: dict[int, _ConstOperand] = {}
        self.inputs: dict[int, tuple[gs.Tensor, list[Dim]]] = {}
        self._offpath: dict[int, list[Dim] | None] = {}
        self._graph_inputs = {id(t) for t in graph.inputs}
        self._graph_outputs = {id(t) for t in graph.outputs}
        self._fresh = itertools.count()

    # ------------------------------------------------------------------------- run
    def run(self) -> ChannelLayout:
        data_nodes, shape_nodes = self._closure()
        for node in self.graph.nodes:
            if id(node) in data_nodes:
                self._visit(node)
        for sid, node in self.sinks.items():
            t = node.inputs[0]
            if id(t) not in self.dims:
                raise LayoutError(f"{self.where}: the channels never reach {node.name!r}")
            self.sink_dims[sid] = self.dims[id(t)]
        self._check_escapes(shape_nodes, data_nodes)
        return self

    def _closure(self) -> tuple[set[int], list[gs.Node]]:
        data: set[int] = set()
        shape_nodes: list[gs.Node] = []
        queue = deque()
        for t, x, channels in self.sources:
            lead = self.offpath(x)
            if lead is None or not lead:
                raise LayoutError(f"{self.where}: the rank of {x.name!r} is unknown")
            self.dims[id(t)] = [*lead[:-1], list(channels)]
            self.path[id(t)] = t
            queue.append(t)
        while queue:
            t = queue.popleft()
            if id(t) in self._graph_outputs and not self.allow_outputs:
                raise LayoutError(f"{self.where}: the channels reach the graph output {t.name!r}")
            for node in t.outputs:
                if id(node) in self.sinks:
                    if node.inputs[0] is not t:
                        raise LayoutError(f"{self.where}: the channels enter {node.name!r} as its weight")
                    continue
                if node.op == "Shape":
                    shape_nodes.append(node)
                    continue
                if id(node) in self.stop:
                    raise LayoutError(f"{self.where}: the channels reach {node.op} {node.name!r}")
                if id(node) in data:
                    continue
                data.add(id(node))
                if len(data) > self.max_nodes:
                    raise LayoutError(f"{self.where}: the path has more than {self.max_nodes} nodes")
                for out in node.outputs:
                    self.path[id(out)] = out
                    queue.append(out)
        return data, shape_nodes

    def _check_escapes(self, shape_nodes: list[gs.Node], data: set[int]) -> None:
        """A `Shape` of a path tensor may feed shape arithmetic and shape inputs of path
        nodes; anywhere else, what it computes must carry no channel count."""
        shapeish = self._shapeish()
        seen: set[int] = set()
        queue = deque(n.outputs[0] for n in shape_nodes)
        while queue:
            t = queue.popleft()
            for node in t.outputs:
                if (id(node), id(t)) in seen:
                    continue
                seen.add((id(node), id(t)))
                if id(node) in data or id(node) in self.sinks:
                    continue  # read as a shape input when the node was visited
                if all(id(o) in shapeish for o in node.outputs):
                    queue.extend(node.outputs)
                    continue
                index = next(i for i, x in enumerate(node.inputs) if x is t)
                use = _ShapeUse(node, index, t)
                if any(syms(e) for e in self._eval(t, node, index, use, {})):
                    raise LayoutError(
                        f"{self.where}: a channel count flows into {node.op} {node.name!r} as data"
                    )

    def _shapeish(self) -> set[int]:
        """Ids of tensors computed from `Shape` outputs and constants by shape arithmetic."""
        out: set[int] = set()
        for node in self.graph.nodes:
            if node.op == "Shape" or (
                node.op in SHAPE_ARITH
                and all(id(t) in out or constant_value(t) is not None for t in node.inputs if t.name)
                and any(id(t) in out for t in node.inputs)
            ):
                out.update(id(t) for t in node.outputs)
        return out

    # ---------------------------------------------------------------- tensor dims
    def _dims(self, node: gs.Node, i: int) -> list[Dim] | None:
        """Dims of input `i` of a path node (path tensor, constant operand, or other)."""
        t = node.inputs[i]
        if id(t) in self.dims:
            return self.dims[id(t)]
        dims = self.offpath(t)
        if id(t) in self.consts:
            self.consts[id(t)].edges.append((node, i))
        return dims

    def offpath(self, t: gs.Tensor) -> list[Dim] | None:
        """Dims of a tensor that is not on the path (None: rank unknown)."""
        if id(t) in self.dims:
            return self.dims[id(t)]
        if id(t) in self._offpath:
            return self._offpath[id(t)]
        v = constant_value(t)
        dims: list[Dim] | None
        if v is not None:
            dims = [[Var(int(s), ("const", t.name, axis))] for axis, s in enumerate(np.shape(v))]
            self.consts[id(t)] = _ConstOperand(t, dims)
        elif id(t) in self._graph_inputs:
            dims = []
            for axis, d in enumerate(t.shape or []):
                dims.append([Var(d, ("input", t.name, axis))] if isinstance(d, int) else [self._opaque(d)])
            self.inputs[id(t)] = (t, dims)
        else:
            shape = self.shapes.get(t.name)
            if shape is None or not all(isinstance(d, int) for d in shape):
                self.suspects.add(t.name)
            if shape is None:
                dims = None
            else:
                dims = [[d] if isinstance(d, int) else [self._opaque(d)] for d in shape]
        self._offpath[id(t)] = dims
        return dims

    def _opaque(self, label: Any) -> Opaque:
        return Opaque(str(label) if label else f"?{next(self._fresh)}")

    # ------------------------------------------------------------- shape values
    def _shape_input(self, node: gs.Node, i: int) -> list[Dim]:
        use = _ShapeUse(node, i, node.inputs[i])
        self.uses.append(use)
        return self._eval(node.inputs[i], node, i, use, {})

    def _eval(self, t: gs.Tensor, node: gs.Node, idx: int, use: _ShapeUse, memo: dict) -> list[Dim]:
        """The elements of a 1-D/0-D integer tensor as factor lists (literals become Vars)."""
        v = constant_value(t)
        if v is not None:
            key = (id(node), idx)
            if key not in use.leaves:
                arr = np.asarray(v)
                if arr.dtype.kind not in "iu":
                    raise LayoutError(f"{self.where}: shape input {t.name!r} is not an integer tensor")
                use.leaves[key] = _Leaf(node, idx, arr, [Var(int(x), key) for x in arr.reshape(-1)])
            return [[var] for var in use.leaves[key].vars]
        if id(t) in memo:
            return memo[id(t)]
        p = producer(t)
        if p is None:
            raise LayoutError(f"{self.where}: shape input {t.name!r} is a graph input")

        def ins(j: int) -> list[Dim]:
            return self._eval(p.inputs[j], p, j, use, memo)

        op = p.op
        if op == "Shape":
            dims = self.offpath(p.inputs[0])
            if dims is None:
                raise LayoutError(f"{self.where}: the rank of {p.inputs[0].name!r} is unknown")
            start, end = p.attrs.get("start", 0), p.attrs.get("end", None)
            r = [list(d) for d in dims[slice(start, end)]]
        elif op in ("Identity", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten"):
            r = ins(0)
        elif op == "Concat":
            r = [e for j in range(len(p.inputs)) for e in ins(j)]
        elif op == "Gather":
            idx_v = self._raw(p, 1)
            data = ins(0)
            r = [data[int(k)] for k in np.ravel(idx_v)]
        elif op == "Slice":
            data = ins(0)
            starts, ends = self._raw(p, 1, "starts"), self._raw(p, 2, "ends")
            steps = self._raw(p, 4, "steps", optional=True)
            step = int(np.ravel(steps)[0]) if steps is not None else 1
            s, e = int(np.ravel(starts)[0]), int(np.ravel(ends)[0])
            e = None if e >= INT64_MAX // 2 else e
            s = None if s <= -INT64_MAX // 2 else s
            r = data[slice(s, e, step)]
        elif op in ("Mul", "Div", "Add", "Sub", "Max", "Min"):
            a, b = ins(0), ins(1)
            if len(a) == 1 and len(b) > 1:
                a = a * len(b)
            if len(b) == 1 and len(a) > 1:
                b = b * len(a)
            r = [self._arith(op, x, y, p) for x, y in zip(a, b, strict=True)]
        elif op == "Where":  # TorchScript's expand: Where(Equal(s, -1), 1, s) keeps -1 meaning "as is"
            pick, traced = self._equal_mask(p, use, memo)
            n = len(pick)
            side = {t: self._sizes_or_plain(p, 1 if t else 2, traced, n, use, memo) for t in set(pick)}
            r = [side[t][i % len(side[t])] for i, t in enumerate(pick)]  # a 1-element side broadcasts
        else:
            raise LayoutError(f"{self.where}: cannot follow a shape computation through {op} {p.name!r}")
        memo[id(t)] = r
        return r

    def _equal_mask(self, where: gs.Node, use: _ShapeUse, memo: dict) -> tuple[list[bool], gs.Tensor]:
        """Element by element, whether a shape `Where`'s condition ``Equal(s, c)`` holds (and
        `s`): `s` a traced shape (sizes, or literals such as an expand's -1), `c` computed from
        constants (e.g. ``ConstantOfShape(Shape(s)) * -1``). A size whose value is unknown (a
        batch or sequence length) is never negative, so it equals no negative constant."""
        eq = producer(where.inputs[0])
        if eq is None or eq.op != "Equal":
            raise LayoutError(f"{self.where}: Where {where.name!r} on a condition other than Equal")
        dims = self._eval(eq.inputs[0], eq, 0, use, memo)
        other = np.broadcast_to(self._plain(eq.inputs[1], eq.inputs[0], len(dims)), (len(dims),))
        mask = []
        for dim, c in zip(dims, other, strict=True):
            known = dim_value(dim)
            if known is None and c >= 0:
                raise LayoutError(f"{self.where}: cannot tell whether a size equals {c} in {where.name!r}")
            mask.append(known == c)
        return mask, eq.inputs[0]

    def _sizes_or_plain(
        self, node: gs.Node, i: int, vector: gs.Tensor, length: int, use: _ShapeUse, memo: dict
    ) -> list[Dim]:
        """Input i of `node` traced as sizes, or else computed from constants (fixed sizes)."""
        try:
            return self._eval(node.inputs[i], node, i, use, memo)
        except LayoutError:
            return [[int(v)] for v in self._plain(node.inputs[i], vector, length)]

    def _plain(self, t: gs.Tensor, vector: gs.Tensor, length: int) -> np.ndarray:
        """An integer vector computed from constants only: Constant, Shape of a static-shape
        tensor or of the traced shape `vector` (`length` elements), ConstantOfShape, Cast, Neg
        and arithmetic on them."""
        v = constant_value(t)
        if v is not None:
            return np.ravel(np.asarray(v)).astype(np.int64)
        p = producer(t)
        op = p.op if p is not None else None
        if op == "Shape" and (p.inputs[0] is vector or _static(p.inputs[0].shape)):
            shape = [length] if p.inputs[0] is vector else p.inputs[0].shape
            return np.array(shape[slice(p.attrs.get("start", 0), p.attrs.get("end"))], np.int64)
        if op == "ConstantOfShape":
            fill = p.attrs.get("value")
            fill = 0 if fill is None else int(np.ravel(fill.values)[0])
            return np.full(int(np.prod(self._plain(p.inputs[0], vector, length))), fill, np.int64)
        if op in ("Cast", "Identity"):
            return self._plain(p.inputs[0], vector, length)
        if op == "Neg":
            return -self._plain(p.inputs[0], vector, length)
        if op in ("Mul", "Add", "Sub"):
            a, b = (self._plain(p.inputs[j], vector, length) for j in (0, 1))
            return {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract}[op](a, b)
        raise LayoutError(
            f"{self.where}: cannot evaluate {t.name!r} ({op or 'a graph input'}) from constants"
        )

    def _arith(self, op: str, a: Dim, b: Dim, node: gs.Node) -> Dim:
        if op == "Mul":
            return list(a) + list(b)
        if op == "Div":
            divisor = dim_value(b)
            if divisor is None or syms(b):
                raise LayoutError(f"{self.where}: {node.name!r} divides by an unknown size")
            q = deque(flat(a)[::-1])
            tmp = Var(divisor)
            _bind(tmp, q, f"{self.where}: {node.name!r}", from_back=True)
            lits = [f for f in b if isinstance(f, Var) and f.res is None]
            if len(lits) == 1:
                lits[0].res = tmp.res
            return list(q)[::-1]
        if syms(a) or syms(b):
            raise LayoutError(f"{self.where}: a channel count enters {op} {node.name!r}")
        x, y = dim_value(a), dim_value(b)
        if x is None or y is None:
            return [self._opaque(None)]
        return [{"Add": x + y, "Sub": x - y, "Max": max(x, y), "Min": min(x, y)}[op]]

    def _raw(self, node: gs.Node, i: int, attr: str | None = None, optional: bool = False):
        """A constant integer input (or attribute) read as plain values, None if absent."""
        if i < len(node.inputs) and node.inputs[i].name:
            v = constant_value(node.inputs[i])
            if v is None:
                if optional:
                    return None
                raise LayoutError(f"{self.where}: input {i} of {node.op} {node.name!r} is not constant")
            return np.asarray(v)
        if attr is not None and attr in node.attrs:
            return np.asarray(node.attrs[attr])
        if optional:
            return None
        raise LayoutError(f"{self.where}: {node.op} {node.name!r} has no input {i}")

    def _axes(self, node: gs.Node, i: int) -> list[int] | None:
        v = self._raw(node, i, "axes", optional=True)
        return None if v is None else [int(a) for a in np.ravel(v)]

    # --------------------------------------------------------------------- visit
    def _visit(self, n: gs.Node) -> None:
        op, where = n.op, f"{self.where}: {n.op} {n.name!r}"
        x = self._dims(n, 0) if n.inputs else None
        if op not in BROADCAST and x is None:
            raise LayoutError(f"{where}: the rank of its input is unknown")
        if op == "Reshape":
            outs = [self._reshape(n, x, where)]
        elif op == "Expand":
            outs = [self._expand(x, self._shape_input(n, 1), where)]
        elif op == "Transpose":
            perm = n.attrs.get("perm") or list(range(len(x)))[::-1]
            outs = [[x[p] for p in perm]]
        elif op in ("Unsqueeze", "Squeeze"):
            outs = [self._squeeze(n, x, where)]
        elif op == "Flatten":
            axis = n.attrs.get("axis", 1)
            axis = axis + len(x) if axis < 0 else axis
            outs = [[[f for d in x[:axis] for f in d], [f for d in x[axis:] for f in d]]]
        elif op == "MatMul":
            outs = [self._matmul(x, self._dims(n, 1), where)]
        elif op in BROADCAST:
            dims = [self._dims(n, i) for i, t in enumerate(n.inputs) if t.name]
            outs = [broadcast(dims, where)]
        elif op in UNARY:
            outs = [x] * len(n.outputs)
        elif op in AXIS_OPS:
            axis = n.attrs.get("axis", -1 if self._opset() >= 13 else 1)
            for d in x[axis:] if self._opset() < 13 else [x[axis]]:
                if syms(d):
                    raise LayoutError(f"{where}: normalises over a channel axis {fmt(d)}")
            outs = [x]
        elif op in NORMS:
            axis = n.attrs.get("axis", -1) % len(x)
            self._no_channels(x[axis:], where, "normalises over")
            params = [self._dims(n, i) for i, t in enumerate(n.inputs[1:], 1) if t.name]
            broadcast([x[axis:], *[p for p in params if p is not None]], where)
            outs = [x] + [[d if a < axis else [] for a, d in enumerate(x)]] * (len(n.outputs) - 1)
        elif op in REDUCE:
            outs = [self._reduce(n, x, where)]
        elif op == "Concat":
            outs = [self._concat(n, where)]
        elif op == "Split":
            outs = self._split(n, x, where)
        elif op == "Slice":
            outs = [self._slice(n, x, where)]
        elif op == "Gather":
            outs = [self._gather(n, x, where)]
        else:
            raise LayoutError(f"{where}: op {op} is not supported on a channel path")
        for t, dims in zip(n.outputs, outs, strict=False):
            self.dims[id(t)] = dims

    def _opset(self) -> int:
        return self.graph.opset or 13

    def _no_channels(self, dims: list[Dim], where: str, what: str) -> None:
        for d in dims:
            if syms(d):
                raise LayoutError(f"{where}: {what} a channel axis {fmt(d)}")

    def _reshape(self, n: gs.Node, x: list[Dim], where: str) -> list[Dim]:
        entries = self._shape_input(n, 1)
        allowzero = n.attrs.get("allowzero", 0)
        out: list[Dim | None] = [None] * len(entries)
        marker = [
            e[0].value if len(e) == 1 and isinstance(e[0], Var) and e[0].value in (0, -1) else None
            for e in entries
        ]
        for i, m in enumerate(marker):
            if m == 0:
                if allowzero:
                    raise LayoutError(f"{where}: a zero-sized target dim")
                if i >= len(x):
                    raise LayoutError(f"{where}: copies input dim {i} of a rank-{len(x)} tensor")
                entries[i] = x[i]
        infer = [i for i, m in enumerate(marker) if m == -1]
        rest = [f for d in x for f in flat(d)]
        stop = infer[0] if infer else len(entries)
        for i in range(stop):
            rest = unify(entries[i], rest, where, prefix=True)
            out[i] = entries[i]
        if infer:
            for i in range(len(entries) - 1, stop, -1):
                rest = unify(entries[i], rest, where, prefix=True, from_back=True)
                out[i] = entries[i]
            out[stop] = rest
        elif any(not isinstance(f, Opaque) for f in rest):
            raise LayoutError(f"{where}: target shape leaves {fmt(rest)} unaccounted for")
        return out  # type: ignore[return-value]

    def _expand(self, x: list[Dim], entries: list[Dim], where: str) -> list[Dim]:
        rank = max(len(x), len(entries))
        out = []
        for axis in range(rank):
            d = x[axis - rank + len(x)] if axis - rank + len(x) >= 0 else []
            e = entries[axis - rank + len(entries)] if axis - rank + len(entries) >= 0 else None
            if e is None:
                out.append(d)
            elif len(e) == 1 and isinstance(e[0], Var) and e[0].res is None and e[0].value == 1:
                e[0].res = []
                out.append(d)
            elif not flat(d):
                out.append(e)  # a broadcast axis: bound by what it meets later
            else:
                unify(d, e, where)
                out.append(d)
        return out

    def _squeeze(self, n: gs.Node, x: list[Dim], where: str) -> list[Dim]:
        axes = self._axes(n, 1)
        if n.op == "Unsqueeze":
            rank = len(x) + len(axes or [])
            pos = sorted(a % rank for a in axes or [])
            out = list(x)
            for a in pos:
                out.insert(a, [])
            return out
        if axes is None:
            return [d for d in x if flat(d) or dim_value(d) is None]
        drop = {a % len(x) for a in axes}
        for a in drop:
            if flat(x[a]) and dim_value(x[a]) != 1:
                raise LayoutError(f"{where}: squeezes axis {a} of size {fmt(x[a])}")
        return [d for a, d in enumerate(x) if a not in drop]

    def _matmul(self, a: list[Dim], b: list[Dim] | None, where: str) -> list[Dim]:
        if b is None or len(a) < 2 or len(b) < 2:
            raise LayoutError(f"{where}: needs operands of rank >= 2 with known shapes")
        unify(a[-1], b[-2], where)
        self._no_channels([a[-1]], where, "contracts over")  # channels summed together
        batch = broadcast([a[:-2], b[:-2]], where) if len(a) > 2 or len(b) > 2 else []
        return [*batch, a[-2], b[-1]]

    def _reduce(self, n: gs.Node, x: list[Dim], where: str) -> list[Dim]:
        axes = self._axes(n, 1)
        if axes is None:
            if n.attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(len(x)))
        axes = [a % len(x) for a in axes]
        self._no_channels([x[a] for a in axes], where, "reduces over")
        if n.attrs.get("keepdims", 1):
            return [[] if a in axes else d for a, d in enumerate(x)]
        return [d for a, d in enumerate(x) if a not in axes]

    def _concat(self, n: gs.Node, where: str) -> list[Dim]:
        parts = [self._dims(n, i) for i, t in enumerate(n.inputs) if t.name]
        if any(p is None for p in parts):
            raise LayoutError(f"{where}: an input's rank is unknown")
        rank = len(parts[0])
        axis = n.attrs.get("axis", 0) % rank
        out = []
        for a in range(rank):
            if a != axis:
                for p in parts[1:]:
                    unify(parts[0][a], p[a], where)
                out.append(parts[0][a])
                continue
            for p in parts:
                self._no_channels([p[a]], where, "concatenates along")
            values = [dim_value(p[a]) for p in parts]
            out.append([sum(values)] if None not in values else [self._opaque(None)])
        return out

    def _split(self, n: gs.Node, x: list[Dim], where: str) -> list[list[Dim]]:
        axis = n.attrs.get("axis", 0) % len(x)
        count = len(n.outputs)
        if len(n.inputs) > 1 and n.inputs[1].name:
            sizes: list[Dim] | None = self._shape_input(n, 1)
        elif "split" in n.attrs:
            sizes = [[int(s)] for s in n.attrs["split"]]
        else:
            sizes = None
        d = x[axis]
        if not syms(d):
            total = dim_value(d)
            if sizes is not None:
                parts = [[dim_value(s)] if dim_value(s) is not None else [self._opaque(None)] for s in sizes]
            elif total is not None and total % count == 0:
                parts = [[total // count]] * count
            else:
                parts = [[self._opaque(None)] for _ in range(count)]
        else:
            f = flat(d)
            if not (isinstance(f[0], int) and f[0] % count == 0):
                raise LayoutError(f"{where}: splits the channel axis {fmt(d)} into {count} unequal parts")
            head = [f[0] // count] if f[0] // count != 1 else []
            part = head + f[1:]
            for s in sizes or []:
                if dim_value(s) != dim_value(part):
                    raise LayoutError(f"{where}: splits the channel axis {fmt(d)} into unequal parts")
                unify(s, part, where)
            parts = [list(part) for _ in range(count)]
        return [[p if a == axis else dim for a, dim in enumerate(x)] for p in parts]

    def _slice(self, n: gs.Node, x: list[Dim], where: str) -> list[Dim]:
        starts = self._raw(n, 1, "starts", optional=True)
        ends = self._raw(n, 2, "ends", optional=True)
        axes = self._raw(n, 3, "axes", optional=True)
        steps = self._raw(n, 4, "steps", optional=True)
        if starts is None or ends is None:  # bounds computed at run time
            count = len(np.ravel(axes)) if axes is not None else len(x)
            axes_l = [int(a) % len(x) for a in np.ravel(axes)] if axes is not None else list(range(count))
            self._no_channels([x[a] for a in axes_l], where, "slices")
            return [[self._opaque(None)] if a in axes_l else d for a, d in enumerate(x)]
        starts, ends = np.ravel(starts), np.ravel(ends)
        axes_l = [int(a) % len(x) for a in np.ravel(axes)] if axes is not None else list(range(len(starts)))
        steps_l = np.ravel(steps) if steps is not None else np.ones(len(starts), dtype=np.int64)
        out = list(x)
        for a, s, e, st in zip(axes_l, starts, ends, steps_l, strict=True):
            self._no_channels([x[a]], where, "slices")
            size = dim_value(x[a])
            out[a] = (
                [self._opaque(None)] if size is None else [len(range(size)[slice(int(s), int(e), int(st))])]
            )
        return out

    def _gather(self, n: gs.Node, x: list[Dim], where: str) -> list[Dim]:
        axis = n.attrs.get("axis", 0) % len(x)
        self._no_channels([x[axis]], where, "gathers along")
        idx = n.inputs[1]
        v = constant_value(idx)
        if v is not None:
            idims: list[Dim] | None = [[int(s)] for s in np.shape(v)]
        else:
            idims = self.dims.get(id(idx)) or self.offpath(idx)
        if idims is None:
            raise LayoutError(f"{where}: the rank of its indices is unknown")
        return [*x[:axis], *idims, *x[axis + 1 :]]

    # --------------------------------------------------------------------- apply
    def apply(self, keep: Callable[[list[Factor]], np.ndarray], tag: str) -> dict[str, int]:
        """Rewrite the graph for the new `Sym` sizes; `keep(factors)` gives the kept indices
        of an axis laid out as `factors`. Every new value is computed before the graph is
        touched, so a `LayoutError` leaves it unchanged. Returns counts of what changed."""
        counts = {"shape_constants": 0, "sliced_constants": 0, "io_dims": 0}
        literal_changes = []
        for use in self.uses:
            changes: dict[tuple[int, int], np.ndarray] = {}
            for key, leaf in use.leaves.items():
                new = leaf.values.reshape(-1).copy()
                for i, var in enumerate(leaf.vars):
                    new[i] = new_value(var)
                if not np.array_equal(new, leaf.values.reshape(-1)):
                    changes[key] = new.reshape(leaf.values.shape).astype(leaf.values.dtype)
            if changes:
                literal_changes.append((use, changes))
        sliced_consts = []
        for const in self.consts.values():
            arr = np.asarray(constant_value(const.tensor))
            new = arr
            for axis, d in enumerate(const.dims):
                factors = flat(d)
                if any(isinstance(f, Sym) for f in factors):
                    new = np.take(new, keep(factors), axis=axis)
            if new is not arr and const.edges:
                sliced_consts.append((const, new))
        input_dims = []
        for t, dims in self.inputs.values():
            for axis, d in enumerate(dims):
                if isinstance(d[0], Var) and new_value(d[0]) != d[0].value:
                    input_dims.append((t, axis, new_value(d[0])))
        output_dims = []
        for t in self.path.values():
            if id(t) in self._graph_outputs:
                shape = list(t.shape or [])
                for axis, d in enumerate(self.dims.get(id(t), [])):
                    if axis < len(shape) and isinstance(shape[axis], int):
                        nv = dim_new_value(d)
                        if nv is not None and nv != shape[axis]:
                            output_dims.append((t, axis, nv))
        # ---- mutate
        clones: dict[Any, gs.Tensor] = {}
        self._taken = set(self.graph.tensors()) | {n.name for n in self.graph.nodes}
        for use, changes in literal_changes:
            counts["shape_constants"] += len(changes)
            self._rebuild(use, changes, tag, clones)
        for const, new in sliced_consts:
            counts["sliced_constants"] += 1
            sliced = gs.Constant(self._name(f"{const.tensor.name}__{tag}"), np.ascontiguousarray(new))
            for node, i in const.edges:
                node.inputs[i] = sliced
        for t, axis, nv in input_dims + output_dims:
            shape = list(t.shape)
            shape[axis] = nv
            t.shape = shape
            counts["io_dims"] += 1
        for t in self.path.values():
            if id(t) not in self._graph_outputs and not isinstance(t, gs.Constant):
                t.shape = None  # stale: onnxruntime infers it again
        return counts

    def _name(self, base: str) -> str:
        """`base`, or `base_<n>`, unused by any tensor or node of the graph."""
        name, n = base, 0
        while name in self._taken:
            n += 1
            name = f"{base}_{n}"
        self._taken.add(name)
        return name

    def _rebuild(self, use: _ShapeUse, changes: dict, tag: str, clones: dict) -> None:
        """Point `use.node`'s shape input at a copy of its shape computation with the
        changed literals (nodes shared with other users are cloned, never edited)."""
        signature = (id(use.tensor), tuple(sorted((k, v.tobytes()) for k, v in changes.items())))
        if signature in clones and (id(use.node), use.index) not in changes:
            use.node.inputs[use.index] = clones[signature]
            return
        memo: dict[int, gs.Tensor] = {}

        def rebuild(t: gs.Tensor, node: gs.Node, idx: int) -> gs.Tensor:
            key = (id(node), idx)
            if key in changes:
                return gs.Constant(self._name(f"{t.name}__{tag}"), changes[key])
            if constant_value(t) is not None:
                return t
            p = producer(t)
            if p is None or p.op == "Shape":
                return t
            if id(t) in memo:
                return memo[id(t)]
            new_inputs = [rebuild(x, p, j) if x.name else x for j, x in enumerate(p.inputs)]
            if all(a is b for a, b in zip(new_inputs, p.inputs, strict=True)):
                memo[id(t)] = t
                return t
            outs = [gs.Variable(self._name(f"{o.name}__{tag}"), dtype=o.dtype) for o in p.outputs]
            self.graph.nodes.append(
                gs.Node(p.op, self._name(f"{p.name}__{tag}"), dict(p.attrs), new_inputs, outs)
            )
            result = next(o for o, orig in zip(outs, p.outputs, strict=True) if orig is t)
            memo[id(t)] = result
            return result

        new = rebuild(use.tensor, use.node, use.index)
        clones[signature] = new
        use.node.inputs[use.index] = new


# ------------------------------------------------------------------- inferred shapes
class ShapeTable(dict):
    """Dims by tensor name (int, a label for an unknown size, or None for unknown rank);
    `probed` names the tensors whose dims were measured by `probe_dims`."""

    def __init__(self, *args):
        super().__init__(*args)
        self.probed: set[str] = set()


def infer_dims(model: Model) -> ShapeTable:
    """Static dims of every tensor by name (int, dim_param string, or None), from ONNX
    shape inference on a weight-free copy of the graph; falls back to the stored shapes."""
    shapes = ShapeTable()
    for t in model.graph.tensors().values():
        if isinstance(t, gs.Variable) and t.shape is not None:
            shapes[t.name] = list(t.shape)
    try:
        graph = model.graph.copy()
        for t in list(graph.tensors().values()):
            if isinstance(t, gs.Constant) and np.dtype(t.dtype).kind == "f" and int(np.prod(t.shape)) > 16:
                stand_in = gs.Variable(t.name, dtype=t.dtype, shape=list(t.shape))  # weights: shape only
                for node in list(t.outputs):
                    for i, x in enumerate(node.inputs):
                        if x is t:
                            node.inputs[i] = stand_in
                graph.inputs.append(stand_in)
        proto = gs.export_onnx(graph, do_type_check=False)
        del proto.opset_import[:]
        proto.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in model.meta.opset_imports)
        if not model.meta.opset_imports:
            proto.opset_import.extend([onnx.helper.make_opsetid("", model.graph.opset)])
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # inference is a help, not a requirement
        return shapes
    for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        shapes[vi.name] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        ]
    return shapes


def probe_dims(model: Model, names: Iterable[str], seed: int = 0) -> dict[str, list]:
    """Dims of the tensors `names` measured in onnxruntime on random feeds of two sizes
    (batch 1, seq 3 and batch 2, seq 5): a dim equal in both runs is taken as static, one
    that differs is a dynamic size. For what shape inference cannot see (a mask expanded
    through `Where(Equal(shape, -1), ...)`). Empty when the model cannot be run."""
    import onnxruntime as ort

    from sparsegraph.feeds import feed_candidates
    from sparsegraph.model import PROTOBUF_LIMIT

    names = sorted(set(names))
    if not names or model.weight_nbytes() > PROTOBUF_LIMIT:
        return {}
    proto = model.to_proto()
    present = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception:
        return {}
    runs = []
    for batch, seq in ((1, 3), (2, 5)):
        for feeds in feed_candidates(model, seed, batch, seq):
            try:
                runs.append([np.shape(x) for x in session.run(names, feeds)])
                break
            except Exception:
                continue
        else:
            return {}
    out = {}
    for name, a, b in zip(names, *runs, strict=True):
        if len(a) == len(b):
            out[name] = [
                x if x == y else f"probe:{name}:{axis}" for axis, (x, y) in enumerate(zip(a, b, strict=True))
            ]
    return out
