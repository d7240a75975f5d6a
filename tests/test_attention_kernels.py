"""Block-sparse attention kernels vs numpy, and the compile rewrite vs onnxruntime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tvm

from sparsegraph.codegen import attention_kernels as ak

import graphs as g

MIN = np.finfo(np.float32).min
CUDA = {"kind": "cuda", "arch": "sm_90"}


def _qkv(nq, nk, lq, lk, d, dv=None, seed=0):
    rng = np.random.default_rng(seed)
    dv = dv or d
    return (
        rng.standard_normal((nq, lq, d)).astype(np.float32),
        rng.standard_normal((nk, d, lk)).astype(np.float32),
        rng.standard_normal((nk, lk, dv)).astype(np.float32),
    )


def _causal(lq, lk):
    return np.where(np.tril(np.ones((lq, lk), bool), k=lk - lq), 0, MIN).astype(np.float32)


def _window(L, w, n_global):
    i, j = np.ogrid[:L, :L]
    keep = (j <= i) & ((i - j < w) | (j < n_global))
    return np.where(keep, 0, MIN).astype(np.float32)


def _block_bias(keep, bs, rng):
    """Bias with dropped blocks, and small random values inside some kept blocks (partial)."""
    bias = np.repeat(np.repeat(np.where(keep, 0, MIN), bs, 0), bs, 1).astype(np.float32)
    noise = rng.standard_normal(bias.shape).astype(np.float32) * (rng.random(bias.shape) < 0.05)
    return np.where(bias == 0, noise, bias).astype(np.float32)


CASES = {
    # name: (nq, nk, L, d, dv, bs, bias builder)
    "causal": (2, 2, 256, 32, 32, 64, lambda L, rng: _causal(L, L)),
    "window_global": (2, 2, 256, 16, 16, 32, lambda L, rng: _window(L, 70, 5)),
    "random_blocks_gqa": (
        4,
        2,
        192,
        16,
        32,
        64,
        lambda L, rng: _block_bias(ak.random_blocks(3, 3, 0.5, 1), 64, rng),
    ),
    "per_head_masks": (2, 1, 128, 8, 8, 32, None),  # head dim 8 as in stories260K
}


def _bias(name, L, nq, rng):
    if name == "per_head_masks":  # one mask slice per head: causal and a window
        return np.stack([_causal(L, L), _window(L, 40, 0)])
    return CASES[name][-1](L, rng)


@pytest.mark.parametrize("name", list(CASES))
def test_llvm_kernel_matches_numpy(name):
    nq, nk, L, d, dv, bs, _ = CASES[name]
    rng = np.random.default_rng(2)
    bias = _bias(name, L, nq, rng)
    layout = ak.BlockLayout.from_bias(bias, bs)
    assert layout.kept < layout.n_slices * layout.nqb * layout.nkb  # something is skipped
    np.testing.assert_array_equal(
        np.maximum(layout.dense_bias(), ak.DROP), np.maximum(bias[None] if bias.ndim == 2 else bias, ak.DROP)
    )
    mdiv = 1 if bias.ndim == 3 else nq
    k = ak.build_attention(layout, nq, nk, d, dv, mdiv=mdiv)
    q, kt, v = _qkv(nq, nk, L, L, d, dv)
    np.testing.assert_allclose(k(q, kt, v), ak.reference(q, kt, v, bias, k.scale, mdiv), atol=2e-5, rtol=1e-4)


def test_llvm_kernel_chunked_prefill_lq_ne_lk():
    """Queries are the last Lq of Lk positions (chunked prefill over a cache): right-aligned causal."""
    lq, lk = 128, 320
    bias = _causal(lq, lk)
    layout = ak.BlockLayout.from_bias(bias, 64)
    assert (layout.nqb, layout.nkb, layout.kept) == (2, 5, 9)
    k = ak.build_attention(layout, 2, 1, 16)
    q, kt, v = _qkv(2, 1, lq, lk, 16)
    np.testing.assert_allclose(k(q, kt, v), ak.reference(q, kt, v, bias, k.scale), atol=2e-5, rtol=1e-4)


def test_layout_from_bias_classifies_blocks():
    bias = _causal(128, 128)
    lay = ak.BlockLayout.from_bias(bias, 64)
    assert lay.kept == 3 and lay.partial == 2  # diagonal blocks partial, the lower one full
    assert lay.tiles.shape == (1, 64, 64)  # both diagonal blocks share one stored bias tile
    np.testing.assert_array_equal(lay.ptr, [0, 1, 3])
    with pytest.raises(ValueError, match="drops every key"):
        ak.BlockLayout.from_bias(np.full((64, 64), MIN, np.float32), 32)
    with pytest.raises(ValueError, match="does not divide"):
        ak.BlockLayout.from_bias(np.zeros((96, 96), np.float32), 64)


@pytest.mark.parametrize("io", ["float16", "float32"])
def test_cuda_kernel_compiles_to_source(io, tmp_path):
    """CUDA C from TVM; where nvcc is installed (no GPU needed) it must also build a cubin."""
    import shutil
    import subprocess

    layout = ak.BlockLayout.from_bias(_causal(256, 256), 64)
    k = ak.build_attention(layout, 4, 2, 128, target=CUDA, io_dtype=io)
    src = k.executable.mod.imports[0].inspect_source()
    assert "__shfl_sync" in src and "__shared__" in src
    assert ("uint4" if io == "float16" else "float4") in src  # 16-byte global loads
    nvcc = shutil.which("nvcc")
    if nvcc:
        (tmp_path / "k.cu").write_text(src)
        cmd = [nvcc, "-arch=sm_90", "-cubin", "-w", str(tmp_path / "k.cu"), "-o", str(tmp_path / "k.cubin")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]


def _has_cuda() -> bool:
    try:
        return tvm.cuda().exist
    except Exception:
        return False


@pytest.mark.skipif(not _has_cuda(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["causal", "random_blocks_gqa"])
@pytest.mark.parametrize("io", ["float16", "float32"])
def test_cuda_kernel_matches_numpy(name, io):
    nq, nk, L, _, _, _, _ = CASES[name]
    d = 64
    rng = np.random.default_rng(2)
    bias = _bias(name, L, nq, rng)
    layout = ak.BlockLayout.from_bias(bias, 64)
    k = ak.build_attention(layout, nq, nk, d, target=CUDA, io_dtype=io)
    q, kt, v = (a.astype(np.float16) for a in _qkv(nq, nk, L, L, d))  # float16-exact inputs
    got = k(q, kt, v).astype(np.float32)
    np.testing.assert_allclose(got, ak.reference(q, kt, v, bias, k.scale), atol=1e-2)


# ----------------------------------------------------------------------------- compile rewrite


def attention_model(
    seq: int | None, window: int | None, d_model: int = 32, heads: int = 2, kv_heads: int = 1
):
    """One GQA attention layer ``Y = attn(X Wq, X Wk, X Wv) Wo`` on X[batch, seq, d_model] with a
    causal mask built from the input's shape (Shape/Range/Where, as exporters do) and, when
    `window` is set, an extra constant additive window mask (0 kept, float32 min dropped)
    right before the Softmax; `seq` None = symbolic."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(5)
    d = d_model // heads
    w = {
        "Wq": rng.standard_normal((d_model, heads * d)) / np.sqrt(d_model),
        "Wk": rng.standard_normal((d_model, kv_heads * d)) / np.sqrt(d_model),
        "Wv": rng.standard_normal((d_model, kv_heads * d)) / np.sqrt(d_model),
        "Wo": rng.standard_normal((heads * d, d_model)) / np.sqrt(d_model),
        "qshape": np.array([0, 0, heads, d]),
        "kshape": np.array([0, 0, kv_heads, d]),
        "oshape": np.array([0, 0, heads * d]),
        "one": np.array(1, np.int64),
        "zero": np.array(0, np.int64),
        "scale": np.array(np.sqrt(d), np.float32),
        "neg": np.array(MIN, np.float32),
    }
    w = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in w.items()}
    n = helper.make_node
    nodes = [
        n("MatMul", ["X", "Wq"], ["q0"]),
        n("MatMul", ["X", "Wk"], ["k0"]),
        n("MatMul", ["X", "Wv"], ["v0"]),
        n("Reshape", ["q0", "qshape"], ["q1"]),
        n("Reshape", ["k0", "kshape"], ["k1"]),
        n("Reshape", ["v0", "kshape"], ["v1"]),
        n("Transpose", ["q1"], ["q"], perm=[0, 2, 1, 3]),
        n("Transpose", ["k1"], ["kt"], perm=[0, 2, 3, 1]),
        n("Transpose", ["v1"], ["v"], perm=[0, 2, 1, 3]),
        n("MatMul", ["q", "kt"], ["s0"]),
        n("Div", ["s0", "scale"], ["s1"]),
        n("Shape", ["X"], ["xs"]),
        n("Gather", ["xs", "one"], ["L"], axis=0),
        n("Range", ["zero", "L", "one"], ["pos"]),
        n("Unsqueeze", ["pos", "one"], ["rows"]),
        n("LessOrEqual", ["pos", "rows"], ["causal"]),
        n("Where", ["causal", "s1", "neg"], ["s2"]),
    ]
    last = "s2"
    if window is not None:
        i, j = np.ogrid[:seq, :seq]
        w["window"] = np.where((i - j < window) | (j < 4), 0, MIN).astype(np.float32)
        nodes.append(n("Add", ["s2", "window"], ["s3"]))
        last = "s3"
    nodes += [
        n("Softmax", [last], ["p"], axis=-1),
        n("MatMul", ["p", "v"], ["o0"]),
        n("Transpose", ["o0"], ["o1"], perm=[0, 2, 1, 3]),
        n("Reshape", ["o1", "oshape"], ["o2"]),
        n("MatMul", ["o2", "Wo"], ["Y"]),
    ]
    f = TensorProto.FLOAT
    x = helper.make_tensor_value_info("X", f, ["batch", seq if seq else "seq", d_model])
    y = helper.make_tensor_value_info("Y", f, ["batch", seq if seq else "seq", d_model])
    return g.make_model(nodes, [x], [y], w, name="attention")


@pytest.mark.parametrize("window", [None, 48])
def test_compiled_attention_matches_onnxruntime(tmp_path, window):
    """Causal model (mask from Shape/Range/Where), and the same after the `sparse_attention`
    pass added its window + sink mask: compiled at seq 256 it runs the block-sparse kernel and
    matches onnxruntime on the portable model."""
    import sparsegraph as sg
    from sparsegraph.codegen.llvm_compile import compile_llvm
    from sparsegraph.passes.rewrite.sparse_attention import SparseAttention
    from sparsegraph.runtime import Session

    L = 256
    model = sg.Model.from_proto(attention_model(None, None))
    if window:
        sg.PassManager([SparseAttention(pattern="window", window=window, globals=4)]).run(model)
    path = model.save(tmp_path / "attn.onnx")
    manifest = compile_llvm(path, tmp_path / "out", batch_sizes=[2], seq_len=L, db_path=tmp_path / "db.json")
    sites = [r for r in manifest["fused"] if r["technique"] == "sparse_attention"]
    assert len(sites) == 1 and sites[0]["rewritten"], sites
    site = sites[0]
    assert (site["heads"], site["kv_heads"], site["lq"], site["block"]) == (
        4,
        2,
        L,
        64,
    )  # batch 2 x 2 heads, GQA
    nqb = L // 64
    causal_kept = nqb * (nqb + 1) // 2
    assert site["blocks_total"] == nqb * nqb
    assert site["kernel_us"] > 0 and site["all_blocks_us"] > 0  # timed on llvm
    if window is None:
        assert site["blocks_kept"] == causal_kept and site["partial_blocks"] == nqb
    else:  # diagonal + the block below it, and the sink column
        assert site["blocks_kept"] == nqb + (nqb - 1) + (nqb - 2)
    x = np.random.default_rng(0).standard_normal((2, L, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(path)).run(None, {"X": x})[0]
    (got,) = Session(tmp_path / "out").run(None, {"X": x})
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_mask_from_an_input_is_declined_and_reported():
    from onnx import TensorProto, helper

    from sparsegraph.codegen import relax_build
    from sparsegraph.codegen.attention_rewrite import sparse_attention
    from sparsegraph.codegen.rewrites import RewriteContext
    from sparsegraph.codegen.target import host_target

    f = TensorProto.FLOAT
    n = helper.make_node
    nodes = [
        n("MatMul", ["Q", "Kt"], ["s"]),
        n("Add", ["s", "M"], ["sm"]),
        n("Softmax", ["sm"], ["p"], axis=-1),
        n("MatMul", ["p", "V"], ["Y"]),
    ]
    shapes = {"Q": [1, 2, 64, 16], "Kt": [1, 2, 16, 64], "V": [1, 2, 64, 16], "M": [1, 1, 64, 64]}
    ins = [helper.make_tensor_value_info(k, f, s) for k, s in shapes.items()]
    model = g.make_model(nodes, ins, [helper.make_tensor_value_info("Y", f, [1, 2, 64, 16])], {})
    mod = tvm.IRModule({"main_t": relax_build.import_bucket(model, shapes)})
    ctx = RewriteContext(host_target(), False, None)
    out = sparse_attention(ctx)(mod)
    assert ctx.decisions == [
        {
            "technique": "sparse_attention",
            "function": "main_t",
            "rewritten": False,
            "reason": ctx.decisions[0]["reason"],
        }
    ]
    assert "not a constant mask" in ctx.decisions[0]["reason"]
    assert "call_tir" not in out.script()


def _modules(mod):
    yield mod
    for m in mod.imports:
        yield from _modules(m)


def test_rewrite_builds_cuda_module_source():
    """The same rewrite for a CUDA target (float32 model: float16 staging) compiles with the
    rest of the graph under dlight; run on a GPU by the llvm test's twin when one is present."""
    from sparsegraph.codegen import relax_build
    from sparsegraph.codegen.attention_rewrite import sparse_attention
    from sparsegraph.codegen.rewrites import RewriteContext

    L = 128
    shapes = {"X": [1, L, 32]}
    mod = tvm.IRModule({"main_b1": relax_build.import_bucket(attention_model(L, 40), shapes)})
    mod = tvm.relax.transform.FoldConstant()(mod)
    target = tvm.target.Target(CUDA)
    ctx = RewriteContext(target, False, None)
    mod = sparse_attention(ctx)(mod)
    assert [d["rewritten"] for d in ctx.decisions] == [True]
    with target:
        ex = relax_build.compile_cuda_module(mod, target)
    src = "".join(m.inspect_source() for m in _modules(ex.mod) if m.kind == "cuda")
    assert ctx.decisions[0]["kernel"] in src and "__shfl_sync" in src


def _core_model(form: str, L: int = 128, h: int = 2, d: int = 16):
    """Attention core on inputs Q, K, V in several import forms, with constant masks."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    f = TensorProto.FLOAT
    n = helper.make_node
    lead = [h] if form == "3d" else [1, h]
    causal = np.tril(np.ones((L, L), bool))
    inits = {"c": np.array(1 / np.sqrt(d), np.float32), "neg": np.array(-np.inf, np.float32)}
    nodes = [n("Transpose", ["K"], ["Kt"], perm=[*range(len(lead)), len(lead) + 1, len(lead)])]
    if form == "scale_q":  # scale folded into Q (SDPA-style exports)
        nodes += [n("Mul", ["Q", "c"], ["Qs"]), n("MatMul", ["Qs", "Kt"], ["s"])]
        inits["bias"] = np.where(causal, 0, MIN).astype(np.float32)
        nodes += [n("Add", ["s", "bias"], ["z"])]
    elif form == "add_then_scale":  # (S + bias) * c, bias with small kept values too
        inits["bias"] = np.where(causal, rng.standard_normal((L, L)) * 0.5, MIN).astype(np.float32)
        nodes += [
            n("MatMul", ["Q", "Kt"], ["s"]),
            n("Add", ["bias", "s"], ["sb"]),
            n("Mul", ["sb", "c"], ["z"]),
        ]
    elif form == "where_inverted":  # Where(dropped, -inf, S)
        inits["drop"] = ~causal
        nodes += [n("MatMul", ["Q", "Kt"], ["s"]), n("Div", ["s", "sq"], ["ss"])]
        nodes += [n("Where", ["drop", "neg", "ss"], ["z"])]
        inits["sq"] = np.array(np.sqrt(d), np.float32)
    else:  # per-head masks [1, h, L, L] (3d: [h, L, L])
        i, j = np.ogrid[:L, :L]
        masks = np.stack([causal & (i - j < 20 + 50 * k) for k in range(h)])
        inits["bias"] = np.where(masks.reshape(*lead, L, L), 0, MIN).astype(np.float32)
        nodes += [
            n("MatMul", ["Q", "Kt"], ["s"]),
            n("Mul", ["s", "c"], ["ss"]),
            n("Add", ["ss", "bias"], ["z"]),
        ]
    nodes += [n("Softmax", ["z"], ["p"], axis=-1), n("MatMul", ["p", "V"], ["Y"])]
    shape = [*lead, L, d]
    ins = [helper.make_tensor_value_info(k, f, shape) for k in ("Q", "K", "V")]
    return g.make_model(nodes, ins, [helper.make_tensor_value_info("Y", f, shape)], inits), shape


@pytest.mark.parametrize("form", ["scale_q", "add_then_scale", "where_inverted", "per_head", "3d"])
def test_rewrite_import_forms_match_onnxruntime(form):
    from sparsegraph.codegen import relax_build
    from sparsegraph.codegen.attention_rewrite import sparse_attention
    from sparsegraph.codegen.rewrites import RewriteContext
    from sparsegraph.codegen.target import host_target

    model, shape = _core_model(form)
    feeds = {
        k: np.random.default_rng(i).standard_normal(shape).astype(np.float32) for i, k in enumerate("QKV")
    }
    func = relax_build.import_bucket(model, {k: shape for k in feeds}).with_attr("global_symbol", "main_t")
    mod = tvm.relax.transform.FoldConstant()(tvm.IRModule({"main_t": func}))
    ctx = RewriteContext(host_target(), False, None)
    mod = sparse_attention(ctx)(mod)
    (rec,) = ctx.decisions
    assert rec["rewritten"], rec
    assert rec["blocks_kept"] < rec["blocks_total"]
    assert rec["mask_slices"] == (2 if form in ("per_head", "3d") else 1)
    assert "R.matmul" not in mod["main_t"].script()  # the dense attention is gone
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, target=host_target()), tvm.cpu())
    got = vm["main_t"](*[tvm.runtime.tensor(feeds[k]) for k in "QKV"]).numpy()
    np.testing.assert_allclose(got, g.run_ort(model, feeds)[0], atol=2e-5, rtol=1e-4)


def test_dense_buckets_are_left_alone():
    from sparsegraph.codegen import relax_build
    from sparsegraph.codegen.attention_rewrite import sparse_attention
    from sparsegraph.codegen.rewrites import FACTORIES, RewriteContext
    from sparsegraph.codegen.target import host_target

    assert sparse_attention in FACTORIES
    model, shape = _core_model("scale_q")
    mod = tvm.IRModule({"main_t": relax_build.import_bucket(model, {k: shape for k in "QKV"})})
    mod = tvm.relax.transform.FoldConstant()(mod)
    ctx = RewriteContext(host_target(), False, None, dense_tags=frozenset({"t"}))
    out = sparse_attention(ctx)(mod)
    assert ctx.decisions == [] and "call_tir" not in out["main_t"].script()
