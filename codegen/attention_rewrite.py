"""Compile rewrite: attention whose mask is a constant runs the block-sparse attention kernel.

Pattern (found by data flow in each imported, constant-folded ``main_<tag>``, whatever the
names): ``matmul(softmax(chain(matmul(Q, Kt)), axis=-1), V)`` where ``chain`` is any sequence
of

* ``multiply``/``divide`` by a positive scalar constant (the 1/sqrt(d) scale),
* ``add`` of a constant (an additive mask: 0 kept, <= -1e9 / float32 min / -inf dropped;
  other values are an elementwise bias),
* ``where(const cond, x, fill)`` / ``where(const cond, fill, x)`` with every used fill
  <= -1e9 (a boolean mask, e.g. a causal mask after constant folding).

The chain is folded into ``scale * Q Kt + bias`` with one constant bias; `BlockLayout.from_bias`
lists the kept (query block, key block) tiles, and the subgraph becomes one ``call_tir`` to
`attention_kernels.build_attention` (llvm: float32; CUDA: float16, or float32 staged in
float16), with Q, Kt, V reshaped to ``[heads, L, d]``. GQA is recognised when K/V's leading
dims equal the output's up to trailing ones (e.g. ``[1, Hkv, 1]`` vs ``[1, Hkv, G]``); other
broadcasts are materialised. On llvm each distinct kernel is also timed (hot, random inputs;
``kernel_us``) against the same kernel over all blocks (``all_blocks_us``: the work the mask
lets it skip), unless the dense attention exceeds 2e10 FLOPs. Declined sites (mask depends
on inputs, a row drops every key, no block size divides L, wrong dtype) are left to TVM's
lowering and reported. Buckets in ``ctx.dense_tags`` are not touched. Dead dense attention
bindings are removed afterwards.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import tvm
from tvm import relax

from . import attention_kernels as ak

if TYPE_CHECKING:
    from .rewrites import Rewrite, RewriteContext

_OP = {n: tvm.ir.Op.get(f"relax.{n}") for n in ("matmul", "add", "multiply", "divide", "where", "nn.softmax")}
#: block sizes tried, largest first (CUDA kernel: 64 only)
BLOCKS = (64, 32, 16)


class Decline(Exception):
    """This attention site is left to the default lowering (message = why)."""


@dataclass
class Site:
    q: Any
    kt: Any
    v: Any
    scale: float
    bias: np.ndarray  # float32, rank = scores rank, broadcastable to the scores


def sparse_attention(ctx: RewriteContext) -> Rewrite | None:
    """`rewrites.FACTORIES` entry: the block-sparse attention rewrite for llvm and CUDA targets."""
    if str(ctx.target.kind.name) not in ("llvm", "cuda"):
        return None

    def rewrite(mod: tvm.IRModule) -> tvm.IRModule:
        mod = _Rewriter(mod, ctx).run()
        return relax.transform.DeadCodeElimination()(mod)

    return rewrite


def _const(e) -> np.ndarray | None:
    return e.value.numpy() if isinstance(e, tvm.ir.expr.GenericConst) else None


def _shape(e) -> list[int]:
    return [int(d) for d in e.ty.shape]


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, ctx: RewriteContext):
        super().__init__(mod)
        self.mod_ = mod
        self.ctx = ctx
        self.kind = str(ctx.target.kind.name)
        self._tag = ""
        self._kernels: dict[tuple, tuple[Any, Any]] = {}  # same sizes + layout -> one PrimFunc

    def run(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self._tag = gv.name_hint.removeprefix("main_")
                if self._tag in self.ctx.dense_tags:
                    continue
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()

    def _value(self, e):
        """The expression bound to a variable (through the builder), else `e` itself."""
        if isinstance(e, relax.Var):
            bound = self.lookup_binding(e)
            return bound if bound is not None else e
        return e

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if call.op != _OP["matmul"] or len(call.args) != 2:
            return call
        probs = self._value(call.args[0])
        if not (isinstance(probs, relax.Call) and probs.op == _OP["nn.softmax"]):
            return call
        record = {"technique": "sparse_attention", "function": f"main_{self._tag}"}
        try:
            site = self._match(probs, call.args[1])
            out = self._emit(site, call, record)
        except Decline as why:
            self.ctx.decisions.append(record | {"rewritten": False, "reason": str(why)})
            return call
        self.ctx.decisions.append(record | {"rewritten": True})
        return out

    def _match(self, softmax, v) -> Site:
        rank = len(softmax.ty.shape)
        if int(softmax.attrs.axis) not in (-1, rank - 1):
            raise Decline("softmax is not over the last axis")
        ops, x = [], softmax.args[0]
        while True:
            e = self._value(x)
            if not isinstance(e, relax.Call):
                raise Decline("scores are not computed by a matmul")
            if e.op == _OP["matmul"]:
                break
            a, b = e.args[0], e.args[-1]
            ca, cb = _const(a), _const(b)
            if e.op in (_OP["multiply"], _OP["divide"]) and (ca is not None or cb is not None):
                c = cb if cb is not None else ca
                if e.op == _OP["divide"] and cb is None:
                    raise Decline("scores divide a constant")
                if c.size != 1 or float(c.reshape(())) <= 0:
                    raise Decline("scores scaled by a non-positive or non-scalar constant")
                c = float(c.reshape(()))
                ops.append(("mul", 1 / c if e.op == _OP["divide"] else c))
                x = a if cb is not None else b
            elif e.op == _OP["add"] and (ca is not None or cb is not None):
                ops.append(("add", cb if cb is not None else ca))
                x = a if cb is not None else b
            elif e.op == _OP["where"]:
                cond, t, f = (_const(arg) for arg in e.args)
                if cond is None:
                    raise Decline("the mask depends on the model's inputs")
                if f is not None and (f <= ak.DROP_BELOW).all():
                    ops.append(("keep", cond.astype(bool)))
                    x = e.args[1]
                elif t is not None and (t <= ak.DROP_BELOW).all():
                    ops.append(("keep", ~cond.astype(bool)))
                    x = e.args[2]
                else:
                    raise Decline("where() replaces scores by values that are not a mask")
            else:
                raise Decline(f"{e.op.name} between the scores and the softmax is not a constant mask")
        q, kt = e.args
        if _const(q) is not None or _const(kt) is not None:
            raise Decline("Q or K is a constant")
        scale, bias = 1.0, np.zeros((1, 1))
        for op, c in reversed(ops):
            if op == "mul":
                scale, bias = scale * c, bias * c
            elif op == "add":
                bias = bias + np.asarray(c, np.float64)
            else:
                bias = np.where(c, bias, -np.inf)
        bias = np.maximum(np.nan_to_num(bias, nan=-np.inf), float(ak.DROP)).astype(np.float32)
        bias = bias.reshape((1,) * (rank - bias.ndim) + bias.shape)
        return Site(q, kt, v, scale, bias)

    def _emit(self, site: Site, call, record: dict[str, Any]):
        dtype = str(call.ty.dtype)
        want = ("float16", "float32") if self.kind == "cuda" else ("float32",)
        if dtype not in want or {str(e.ty.dtype) for e in (site.q, site.kt, site.v)} != {dtype}:
            raise Decline(f"{self.kind} kernel takes {' or '.join(want)}; attention is {dtype}")
        out_shape = _shape(call)
        qs, ks, vs = _shape(site.q), _shape(site.kt), _shape(site.v)
        lead, (lq, dv), d, lk = out_shape[:-2], out_shape[-2:], qs[-1], ks[-1]
        if qs[:-2] != lead:
            raise Decline("Q is broadcast against K/V")
        nq = math.prod(lead)
        kt, v, nk = site.kt, site.v, nq
        pk, pv = _group(ks[:-2], lead), _group(vs[:-2], lead)
        if pk is not None and pk == pv:
            nk = math.prod(lead[:pk])
        else:  # materialise the broadcast (no GQA sharing)
            kt = self.builder_.emit(relax.op.broadcast_to(kt, [*lead, d, lk]))
            v = self.builder_.emit(relax.op.broadcast_to(v, [*lead, lk, dv]))
        bias = np.broadcast_to(site.bias, (*site.bias.shape[:-2], lq, lk))
        blead = list(bias.shape[:-2])
        blead = [1] * (len(lead) - len(blead)) + blead
        pb = max((i + 1 for i, n in enumerate(blead) if n != 1), default=0)
        bias = np.broadcast_to(bias.reshape(*blead, lq, lk), (*lead[:pb], *blead[pb:], lq, lk))
        n_slices, mdiv = math.prod(lead[:pb]), math.prod(lead[pb:])
        blocks = [b for b in (BLOCKS[:1] if self.kind == "cuda" else BLOCKS) if lq % b == 0 and lk % b == 0]
        if not blocks:
            raise Decline(f"no block size in {BLOCKS} divides {lq}x{lk}")
        bias = np.ascontiguousarray(bias.reshape(n_slices, lq, lk))
        digest = hashlib.sha1(bias.tobytes()).hexdigest()
        key = (nq, nk, d, dv, site.scale, mdiv, blocks[0], bias.shape, digest, dtype)
        if key not in self._kernels:
            try:
                layout = ak.BlockLayout.from_bias(bias, blocks[0])
                kernel = ak.build_attention(
                    layout, nq, nk, d, dv, site.scale, mdiv, self.ctx.target, io_dtype=dtype, compile=False
                )
            except ValueError as exc:
                raise Decline(str(exc)) from None
            timing = _time_llvm(kernel, self.ctx.target) if self.kind == "llvm" else {}
            self._kernels[key] = (kernel, self.builder_.add_func(kernel.prim_func, kernel.symbol), timing)
        kernel, gv, timing = self._kernels[key]
        layout = kernel.layout
        q3 = self.builder_.emit(relax.op.reshape(site.q, [nq, lq, d]))
        kt3 = self.builder_.emit(relax.op.reshape(kt, [nk, d, lk]))
        v3 = self.builder_.emit(relax.op.reshape(v, [nk, lk, dv]))
        consts = [relax.const(a) for a in kernel.consts]
        out = self.builder_.emit(
            relax.call_tir(gv, [q3, kt3, v3, *consts], out_ty=relax.TensorType([nq, lq, dv], dtype))
        )
        record.update(
            heads=nq,
            kv_heads=nk,
            lq=lq,
            lk=lk,
            head_dim=d,
            block=layout.bs,
            mask_slices=n_slices,
            blocks_kept=layout.kept,
            blocks_total=n_slices * layout.nqb * layout.nkb,
            density=round(layout.density, 4),
            partial_blocks=layout.partial,
            kernel=kernel.symbol,
            **timing,
        )
        return relax.op.reshape(out, out_shape)


def _time_llvm(kernel: ak.AttentionKernel, target: Any, max_flops: float = 2e10) -> dict[str, float]:
    """Hot wall time (µs) of `kernel` and of the same kernel over all blocks (the dense work it
    skips), on random inputs; {} when the dense attention exceeds `max_flops` (compile time)."""
    from .target import time_function

    s = kernel.shape
    if 2 * s["nq"] * s["lq"] * s["lk"] * (s["d"] + s["dv"]) > max_flops:
        return {}
    rng = np.random.default_rng(0)
    args = [
        tvm.runtime.tensor(rng.standard_normal(shape).astype(np.float32))
        for shape in ((s["nq"], s["lq"], s["d"]), (s["nk"], s["d"], s["lk"]), (s["nk"], s["lk"], s["dv"]))
    ]
    out = tvm.runtime.empty((s["nq"], s["lq"], s["dv"]), "float32", tvm.cpu())
    lay = kernel.layout
    dense = ak.BlockLayout.from_blocks(np.ones((lay.nqb, lay.nkb), bool), lay.bs)
    times = {}
    for name, layout in (("kernel_us", lay), ("all_blocks_us", dense)):
        mdiv = kernel.mdiv if layout is lay else s["nq"]
        built = ak.build_attention(layout, s["nq"], s["nk"], s["d"], s["dv"], kernel.scale, mdiv, target)
        consts = [tvm.runtime.tensor(a) for a in built.consts]
        fn = built.executable[built.symbol]
        times[name] = round(time_function(fn, [*args, *consts, out], repeat=3, number=1) * 1e6, 1)
    return times


def _group(k_lead: list[int], lead: list[int]) -> int | None:
    """p such that K's leading dims are ``lead[:p] + [1, ...]`` (query heads lead[p:] share a
    K head), or None."""
    k_lead = [1] * (len(lead) - len(k_lead)) + list(k_lead)
    p = max((i + 1 for i, n in enumerate(k_lead) if n != 1), default=0)
    return p if k_lead[:p] == lead[:p] else None
