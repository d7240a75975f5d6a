"""The CUDA compile path: target parsing, compiling stories260K for a GPU without one
(codegen only, what CI can check), the bytes-model dispatch, the runtime's device checks;
and, where a CUDA GPU is visible, the compiled logits on the GPU vs onnxruntime (CPU)."""

import json

import numpy as np
import pytest

import sparsegraph as sg
from sparsegraph.codegen.cuda_compile import compile_cuda
from sparsegraph.codegen.cuda_dispatch import BYTES_RATIO, CUDADispatcher, gpu_visible
from sparsegraph.codegen.dispatch import TuningDB
from sparsegraph.compile import resolve_target
from sparsegraph.runtime import Session
from sparsegraph.validate import run

from paths import EXAMPLES, STORIES

GPU = gpu_visible()
needs_gpu = pytest.mark.skipif(not GPU, reason="no CUDA GPU visible to TVM")
PRUNE70 = {"steps": [{"pass": "magnitude", "sparsity": 0.7, "granularity": "row"}]}
#: logits vs onnxruntime, relative to max |logit|: fp16-stored sparse weights (fp32 math),
#: and the all-fp32 dense path (dlight, no TF32)
TOL_FP16_WEIGHTS = 2e-2
TOL_FP32 = 1e-4


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    return sg.compile_model(STORIES, PRUNE70, tmp_path_factory.mktemp("pruned"), validate=False).portable


@pytest.fixture(scope="module")
def cuda_folder(pruned, tmp_path_factory):
    """stories260K pruned to 70 %, compiled for the H100 tag by the bytes model (no GPU needed)."""
    out = tmp_path_factory.mktemp("cuda")
    manifest = compile_cuda(
        pruned,
        out,
        target=resolve_target("nvidia/nvidia-h100"),
        batch_sizes=[1],
        seq_len=2,
        db_path=out / "db.json",
        measure_kernels=False,
    )
    return out, manifest


def test_targets_parse_or_fail_clearly():
    assert resolve_target("llvm").kind.name == "llvm"
    h100 = resolve_target("nvidia/nvidia-h100")
    assert h100.kind.name == "cuda" and h100.attrs["arch"].startswith("sm_90") and h100.host is not None
    assert resolve_target("cuda -arch=sm_80").attrs["arch"] == "sm_80"
    assert resolve_target('{"kind": "cuda", "arch": "sm_86"}').attrs["arch"] == "sm_86"
    assert resolve_target("cuda").attrs["arch"].startswith("sm_")
    for bad, why in [
        ("bogus", "bogus"),
        ("{not json", "JSON"),
        ("c", "cannot be compiled"),
        ("cuda arch", ""),
    ]:
        with pytest.raises(sg.UsageError, match=why):
            resolve_target(bad)


def test_cli_rejects_a_bad_target_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from sparsegraph.cli import app

    out = tmp_path / "out"
    args = ["compile", str(STORIES), "-r", str(EXAMPLES / "recipes" / "nm24.yaml"), "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--target", "nvidia/no-such-gpu"])
    assert result.exit_code == 2 and "--target 'nvidia/no-such-gpu'" in result.output
    assert not out.exists()


def test_cuda_compile_without_a_gpu_writes_the_module(cuda_folder):
    out, manifest = cuda_folder
    assert {"module.so", "params.npz", "manifest.json"} <= {p.name for p in out.iterdir()}
    stored = json.loads((out / "manifest.json").read_text())
    assert stored["device"] == "cuda" and json.loads(stored["target"])["kind"] == "cuda"
    assert stored["measured"] is False
    assert stored["extern_functions"] == []  # the bytes model never prefers dense cuBLAS
    if not GPU:  # nothing can be timed; with a GPU the buckets are timed (see the GPU tests)
        assert stored["timing_seconds"] == {}
    # the projections are 70 % sparse: a sparse kernel where one fits reads fewer bytes than
    # fp16 dense; the unpruned lm_head stays with the dense matmul
    decisions = [(op, d) for op in manifest["ops"] for d in op["decisions"].values()]
    sparse = [(op, d) for op, d in decisions if d["format"] != "dense"]
    assert len(sparse) >= 25
    if not GPU:  # with a GPU, a bucket whose dense build is faster ships dense
        assert manifest["kernels_swapped"] == len(sparse) and manifest["kernel_symbols"]
    assert all(not d["measured"] for _, d in decisions)
    for op, d in sparse:
        assert op["sparsity"] > 0.5 and d["nbytes"] <= BYTES_RATIO * op["shape"][0] * op["shape"][1] * 2
    assert all(d["format"] == "dense" for op, d in decisions if op["sparsity"] == 0)
    blob = (out / "module.so").read_bytes()
    for symbol in manifest["kernel_symbols"]:  # the sparse kernels are in the device code
        assert symbol.encode() in blob
    assert b"__global__" in blob or b".nv.info" in blob  # CUDA source, or a cubin where CUDA exists
    if not GPU:  # with a GPU, the dense build may ship (no packed weights then)
        with np.load(out / "params.npz") as params:
            assert any(params[n].dtype == np.float16 for n in params.files)  # packed fp16 values


def test_bytes_model_keeps_dense_weights_dense():
    rng = np.random.default_rng(0)
    target = resolve_target("nvidia/nvidia-h100")
    d = CUDADispatcher(target, TuningDB(None), measure=False)
    w = rng.standard_normal((128, 256)).astype(np.float32)
    assert d.kernel("dense_op", w, 1) is None
    assert d.decisions[("dense_op", 1)].format == "dense"
    sparse = w * (rng.random(w.shape) < 0.1)
    kernel = d.kernel("sparse_op", sparse.astype(np.float32), 1)
    decision = d.decisions[("sparse_op", 1)]
    assert kernel is not None and decision.format == kernel.format and not decision.measured
    assert decision.nbytes <= BYTES_RATIO * 128 * 256 * 2


def test_bytes_model_prices_cuda_core_multiply_adds_past_m_1():
    """Unmeasured, an unstructured weight keeps its sparse kernel at M = 1 at 50-90 %, but
    from M = 8 its CUDA-core multiply-adds are priced too: 50 % goes dense at M = 8, 70 % at
    M = 16, 90 % stays sparse (as measured on the H100: the row kernels beat cuBLAS at M = 16
    only at 90 %)."""
    rng = np.random.default_rng(3)
    d = CUDADispatcher(resolve_target("nvidia/nvidia-h100"), TuningDB(None), measure=False)
    chosen = {}
    for s in (0.5, 0.7, 0.9):
        w = (rng.standard_normal((256, 2048)) * (rng.random((256, 2048)) >= s)).astype(np.float32)
        for m in (1, 8, 16):
            d.kernel(f"op{s}_{m}", w, m)
            chosen[s, m] = d.decisions[(f"op{s}_{m}", m)].format
    assert all(chosen[s, 1] != "dense" for s in (0.5, 0.7, 0.9))
    assert chosen[0.5, 8] == chosen[0.5, 16] == chosen[0.7, 16] == "dense"
    assert chosen[0.7, 8] != "dense" and chosen[0.9, 16] != "dense"
    assert chosen[0.5, 1] == "dcsr" and chosen[0.9, 1] == "dcsr6"  # the fewest bytes at M = 1


def test_bytes_model_builds_the_formats_first_schedule():
    """Without measuring, a BSR 16x16 weight gets the block kernel at M = 1 and tensor cores
    from M = 2, up to M = 64 where only they take it (not the row kernel, which stops at 16);
    a 2:4 weight gets sparse tensor cores at every M."""
    from sparsegraph.codegen import cuda_kernels as ck

    rng = np.random.default_rng(1)
    keep = np.kron(rng.random((8, 16)) < 0.3, np.ones((16, 16)))
    w = (rng.standard_normal((128, 256)) * keep).astype(np.float32)
    d = CUDADispatcher(resolve_target("nvidia/nvidia-h100"), TuningDB(None), measure=False)
    kernels = {m: d.kernel(f"op{m}", w, m) for m in (1, 16, 48)}
    assert all(k is not None and k.format == "bsr" for k in kernels.values())
    assert "ks" in kernels[1].schedule and "tc" not in kernels[1].schedule
    assert kernels[16].schedule["tc"] == 1 and kernels[48].schedule["tc"] == 1
    # 2:4: sparse tensor cores at every M (a 1:4 weight has no kernel past the row kernel's M)
    groups = np.argsort(rng.random((128, 64, 4)), axis=2)[:, :, :2]
    w24 = rng.standard_normal((128, 64, 4)).astype(np.float32)
    np.put_along_axis(w24, groups, 0, axis=2)
    for m in (1, 16, 48):
        kernel = d.kernel(f"nm{m}", w24.reshape(128, 256), m)
        assert kernel is not None and kernel.format == "nm" and kernel.schedule["tc"] == 1
        assert "mma.sp.sync" in kernel.source()
    assert ck.schedules("nm", 48, 128, 256, None, n=1) == []


@pytest.mark.skipif(GPU, reason="checks the error where no GPU is visible")
def test_session_on_a_cuda_module_without_a_gpu_is_a_usage_error(cuda_folder):
    out, _ = cuda_folder
    with pytest.raises(sg.UsageError, match="no CUDA GPU"):
        Session(out)
    with pytest.raises(sg.UsageError, match="compiled for cuda"):
        Session(out, device="cpu")


@needs_gpu
@pytest.mark.parametrize("sparsity", [0.0, 0.7])
def test_gpu_logits_match_onnxruntime(tmp_path, sparsity):
    torch = pytest.importorskip("torch")
    recipe = {"steps": [{"pass": "magnitude", "sparsity": sparsity, "granularity": "row"}]}
    portable = sg.compile_model(STORIES, recipe, tmp_path, validate=False).portable
    manifest = compile_cuda(
        portable,
        tmp_path,
        target=resolve_target("cuda"),
        batch_sizes=[1, 4],
        seq_len=8,
        reference=STORIES,
        db_path=tmp_path / "db.json",
        measure_kernels=False,  # measured dispatch: checked below on one weight (compiles each candidate)
    )
    timing = manifest["timing_seconds"]  # with a GPU the buckets are timed, and vs the dense build
    assert set(timing) == {"b1_s8", "b4_s8"} and all(
        t["compiled"] > 0 and "onnxruntime" in t for t in timing.values()
    )
    sess = Session(tmp_path, device="cuda:0")
    tokens = np.random.default_rng(1).integers(0, 512, (4, 8)).astype(np.int64)
    ref = run(portable, {"tokens": tokens})["logits"]
    (got,) = sess.run(["logits"], {"tokens": tokens})
    tol = TOL_FP16_WEIGHTS if manifest["kernels_swapped"] else TOL_FP32
    assert np.abs(got - ref).max() / np.abs(ref).max() < tol
    assert sess.fallbacks == 0
    # DLPack in and out: a torch CUDA tensor, a TVM tensor back on the GPU
    (dev_out,) = sess.run(["logits"], {"tokens": torch.from_numpy(tokens).cuda()}, as_numpy=False)
    back = torch.from_dlpack(dev_out)
    assert back.is_cuda
    np.testing.assert_allclose(back.cpu().numpy(), got, rtol=1e-6, atol=1e-6)
    shipped = {t["shipped"] for t in timing.values()}  # dense where the dense build was faster
    # a bucket with no sparse kernel (M > 16 here) may ship "dispatched" yet swap nothing
    assert shipped <= {"dense", "dispatched"}
    assert manifest["kernels_swapped"] == 0 or "dispatched" in shipped
    chose_sparse = any(d["format"] != "dense" for op in manifest["ops"] for d in op["decisions"].values())
    assert chose_sparse == (sparsity > 0)


@needs_gpu
@pytest.mark.parametrize(("sparsity", "batch"), [(0.7, 1), (0.9, 2)])  # M = 8 / 16 (70 %: dense at 16)
def test_gpu_sparse_kernels_inside_the_model_match_onnxruntime(tmp_path, sparsity, batch):
    """Every sparse kernel the bytes model picks, run inside the compiled model on the GPU
    (the shipping step of `compile_cuda` may prefer the dense build on a model this small);
    at 90 % they include dcsr6, whose index words are uint64 constants of the module."""
    import onnx

    from sparsegraph.codegen import relax_build
    from sparsegraph.codegen.llvm_compile import linear_weights
    from sparsegraph.model import Model
    from sparsegraph.pass_manager import PassContext

    recipe = {"steps": [{"pass": "magnitude", "sparsity": sparsity, "granularity": "row"}]}
    pruned = sg.compile_model(STORIES, recipe, tmp_path, validate=False).portable
    target = resolve_target("cuda")
    weights = linear_weights(Model.load(pruned), pruned, PassContext(0))
    d = CUDADispatcher(target, TuningDB(None), measure=False)
    tag = f"b{batch}_s8"
    buckets = {tag: {"tokens": [batch, 8]}}
    ex, swaps, params, names = relax_build.build_module(
        onnx.load(str(pruned)), buckets, lambda key, m, _tag: d.kernel(*weights[key], m), set(weights), target
    )
    assert len(swaps) >= 25 and all(fmt != "dense" for _, _, fmt in swaps)
    assert ("dcsr6" in {fmt for _, _, fmt in swaps}) == (sparsity == 0.9)
    assert _gpu_logits_error(ex, params, names, pruned, tag, (batch, 8), seed=2) < TOL_FP16_WEIGHTS


@needs_gpu
def test_measured_dispatch_times_every_candidate_on_the_gpu(tmp_path):
    import tvm

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((1024, 512)) * (rng.random((1024, 512)) < 0.1)).astype(np.float32)
    db = TuningDB(tmp_path / "db.json")
    d = CUDADispatcher(resolve_target("cuda"), db, measure=True)
    kernel = d.kernel("op", w, 1)
    decision = d.decisions[("op", 1)]
    assert decision.measured and "dense" in decision.timings and len(decision.timings) >= 2
    assert decision.seconds == min(decision.timings.values())
    if kernel is not None:  # a compiled kernel or a registered function (cuBLAS), in its X dtype
        x = rng.standard_normal((1, 512)).astype(kernel.x_dtype)
        dev = tvm.cuda(0)
        args = [tvm.runtime.tensor(x, dev)] + [tvm.runtime.tensor(a, dev) for a in kernel.weights.values()]
        y = tvm.runtime.empty((1, 1024), kernel.x_dtype, dev)
        kernel.function(d.target)(*args, y)
        ref = x.astype(np.float32) @ w.T
        assert np.abs(y.numpy() - ref).max() / np.abs(ref).max() < TOL_FP16_WEIGHTS
    db.save()
    again = CUDADispatcher(resolve_target("cuda"), TuningDB(tmp_path / "db.json"), measure=True)
    again.kernel("op", w, 1)
    assert again.decisions[("op", 1)].from_db


# ------------------------------------------------------------------ activation sparsity


def _act_mlp(tmp_path):
    from test_act_kernels import _thresholded_mlp

    model, inits = _thresholded_mlp(k=64, h=128, n=48, seed=7)
    path = tmp_path / "mlp.onnx"
    path.write_bytes(model.SerializeToString())
    return path, model, inits


def _force_fused(db_path, target, inits):
    """Tuning-DB records that make both thresholded matmuls take the fused CUDA kernel."""
    from sparsegraph.codegen import act_kernels as ak

    db = TuningDB(db_path)
    for w, t in ((inits["W0"], inits["T0"]), (inits["W1"], inits["T1"])):
        base = ak.decision_key(target, w, ak.thresholds(t, w.shape[0]), 1, True)
        for how in ("|measured", "|bytes-model"):
            rec = {"technique": "activation_sparsity", "weight_shape": list(w.shape), "M": 1}
            db.put(
                base + how, rec | {"kernel": "act_cuda", "chosen": "fused", "fused_us": 1.0, "dense_us": 2.0}
            )
    db.save()


def test_act_sparse_pattern_is_decided_for_cuda(tmp_path):
    """The `Where(|x| > T, x, 0) @ W` pattern on a CUDA target: one decision per thresholded
    matmul (the bytes model without a GPU: these tiny weights stay dense); with stored
    'fused' decisions the fused kernel is compiled into the module (CUDA source present)."""
    path, _, inits = _act_mlp(tmp_path)
    target = resolve_target("cuda")
    man = compile_cuda(path, tmp_path / "a", target=target, db_path=tmp_path / "a.json")
    act = [f for f in man["fused"] if f.get("technique") == "activation_sparsity"]
    assert {tuple(f["weight_shape"]) for f in act} == {(64, 128), (128, 48)}
    assert all(f["measured"] == GPU and f["dense_us"] > 0 and f["fused_us"] > 0 for f in act)
    if not GPU:  # a few KB of W cannot pay the fused kernel's fixed cost
        assert [f["chosen"] for f in act] == ["dense", "dense"]
    _force_fused(tmp_path / "b.json", target, inits)
    man = compile_cuda(path, tmp_path / "b", target=target, db_path=tmp_path / "b.json")
    act = [f for f in man["fused"] if f.get("technique") == "activation_sparsity"]
    assert [f["chosen"] for f in act] == ["fused", "fused"] and all(f["from_db"] for f in act)
    assert (tmp_path / "b" / "module.so").stat().st_size > 0


def test_act_sparse_pattern_stays_dense_before_sm90(tmp_path):
    """The fused kernel sums over a thread-block cluster (sm_90+): an sm_80 target keeps every
    thresholded matmul dense, with the reason in the report."""
    path, _, _ = _act_mlp(tmp_path)
    target = resolve_target('{"kind": "cuda", "arch": "sm_80"}')
    man = compile_cuda(path, tmp_path / "a", target=target, db_path=tmp_path / "a.json")
    act = [f for f in man["fused"] if f.get("technique") == "activation_sparsity"]
    assert len(act) == 2 and all(f["chosen"] == "dense" and "sm_90" in f["reason"] for f in act)


@needs_gpu
def test_act_sparse_fused_kernel_runs_in_the_cuda_module(tmp_path):
    """The forced fused kernels inside the compiled module on the GPU match onnxruntime on the
    thresholded model (W stored fp16), call after call (the workspaces come back zeroed)."""
    import graphs as g

    path, model, inits = _act_mlp(tmp_path)
    target = resolve_target("cuda")
    _force_fused(tmp_path / "db.json", target, inits)
    compile_cuda(path, tmp_path / "out", target=target, db_path=tmp_path / "db.json")
    sess = Session(tmp_path / "out", device="cuda:0")
    for seed in range(3):
        feeds = {"X": np.random.default_rng(seed).standard_normal((1, 64)).astype(np.float32)}
        (got,) = sess.run(["Y"], feeds)
        (ref,) = g.run_ort(model, feeds)
        assert np.abs(got - ref).max() <= TOL_FP16_WEIGHTS * np.abs(ref).max()


def test_tensor_core_kernels_inside_the_model(pruned):
    """Every linear op whose shape the tensor-core GEMM fits, run by it (fp16 X: the graph
    casts X to fp16 and Y back) at M = 32 (prefill-like): the module compiles without a GPU
    and, on one, matches onnxruntime within the fp16-weight tolerance."""
    import onnx

    from sparsegraph.codegen import cuda_kernels as ck
    from sparsegraph.codegen import relax_build
    from sparsegraph.codegen.formats import UnfitError
    from sparsegraph.codegen.llvm_compile import linear_weights
    from sparsegraph.model import Model
    from sparsegraph.pass_manager import PassContext

    target = resolve_target("cuda")
    weights = linear_weights(Model.load(pruned), pruned, PassContext(0))

    def choose(key, m, tag):
        w = weights[key][1]
        sched = ck.schedules("mma", m, *w.shape, target)
        try:
            return ck.build("mma", w, m, target, "float16", **sched[0]) if sched else None
        except UnfitError:
            return None

    buckets = {"b4_s8": {"tokens": [4, 8]}}
    ex, swaps, params, names = relax_build.build_module(
        onnx.load(str(pruned)), buckets, choose, set(weights), target
    )
    assert len(swaps) >= 10 and {fmt for _, _, fmt in swaps} == {"mma"}
    if not GPU:
        return
    assert _gpu_logits_error(ex, params, names, pruned, "b4_s8", (4, 8), seed=3) < TOL_FP16_WEIGHTS


def _gpu_logits_error(ex, params, names, model, tag, shape, seed) -> float:
    """Max |logits - onnxruntime's| / max |onnxruntime's| of bucket `tag` of a built module
    run on the GPU with random tokens of `shape`."""
    import tvm
    from tvm import relax

    dev = tvm.cuda(0)
    tokens = np.random.default_rng(seed).integers(0, 512, shape).astype(np.int64)
    args = [tvm.runtime.tensor(tokens, dev)] + [
        tvm.runtime.tensor(params[n], dev) for n in names[f"main_{tag}"]
    ]
    got = relax.VirtualMachine(ex, dev)[f"main_{tag}"](*args)
    got = (got if hasattr(got, "numpy") else got[0]).numpy()
    ref = run(model, {"tokens": tokens})["logits"]
    return float(np.abs(got - ref).max() / np.abs(ref).max())
