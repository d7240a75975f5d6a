"""Fused activation-sparse kernels: CPU kernels vs numpy (M = 1, 4, 8; scalar and per-channel
thresholds; both W layouts; the weight-sparse variant), the Relax rewrite inside a compiled
model vs onnxruntime, and the CUDA kernel (compiled to CUDA source here; run where a GPU is)."""

import json

import numpy as np
import onnx
import pytest
from onnx import helper

import sparsegraph as sg
from sparsegraph.codegen import act_kernels as ak
from sparsegraph.codegen.dispatch import TuningDB
from sparsegraph.codegen.llvm_compile import compile_llvm
from sparsegraph.codegen.target import has_avx512, host_target
from sparsegraph.report import _codegen_markdown
from sparsegraph.runtime import Session

import graphs as g
from paths import EXAMPLES, STORIES


def _case(m, k, n, sparsity, per_channel, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    if per_channel:
        t = np.quantile(np.abs(x), sparsity, axis=0).astype(np.float32) if m > 1 else None
        t = np.abs(rng.standard_normal(k)).astype(np.float32) * sparsity * 2 if t is None else t
    else:
        t = np.float32(np.quantile(np.abs(x), sparsity))
    return x, t, w


def _check(kern, x, t, w):
    y = kern(x)
    ref = ak.reference(x, t, w)
    assert y.shape == ref.shape
    tol = 1e-5 * max(1.0, np.abs(ref).max()) * np.sqrt(x.shape[1])
    assert np.abs(y - ref).max() <= tol


@pytest.mark.parametrize(
    ("m", "k", "n", "sparsity", "per_channel", "schedule"),
    [
        (1, 300, 1040, 0.5, False, None),  # rows layout, partial last tile
        (1, 300, 1040, 0.7, True, {"tile": 512, "k_unroll": 2}),  # accumulator in L1, not registers
        (1, 64, 37, 0.9, True, None),  # N not a multiple of 16
        (4, 257, 200, 0.7, True, {"k_unroll": 1, "prefetch": 0}),
        (8, 128, 96, 0.25, False, {"tile": 64}),
        (1, 96, 130, 0.5, False, {"layout": "panel"}),
        (1, 200, 1000, 0.7, True, {"layout": "strips", "tile": 256}),  # padded last strip
        (4, 64, 48, 0.5, False, {"layout": "strips", "k_unroll": 3}),
        (8, 200, 64, 0.9, True, {"layout": "panel", "j_chunk": 16}),  # two m tiles, chunked
    ],
)
def test_act_dense_matches_numpy(m, k, n, sparsity, per_channel, schedule):
    x, t, w = _case(m, k, n, sparsity, per_channel)
    kern = ak.build_act_dense(w, t, m, schedule=schedule)
    _check(kern, x, t, w)
    assert kern.weights["threshold"].shape == (k,)


def test_act_dense_all_and_no_channels_active():
    x, _, w = _case(4, 80, 64, 0.0, False, seed=3)
    for t in (-1.0, float(np.abs(x).max())):  # every channel active / none active (Y = 0)
        _check(ak.build_act_dense(w, t, 4), x, t, w)
    assert not ak.build_act_dense(w, 1e9, 4)(x).any()


@pytest.mark.skipif(not has_avx512(), reason="the bitmap variant needs AVX-512")
@pytest.mark.parametrize(("m", "sparsity"), [(1, 0.5), (4, 0.7), (8, 0.3)])
def test_act_bitmap_weight_sparse_matches_numpy(m, sparsity):
    x, t, w = _case(m, 160, 128, sparsity, True, seed=m)
    w = w * (np.random.default_rng(9).random(w.shape) < 0.4)  # 60 % zeros in W
    kern = ak.build_act_bitmap(w, t, m)
    _check(kern, x, t, w)
    assert kern.nbytes < ak.build_act_dense(w, t, m).nbytes  # stores only W's nonzeros


def test_bad_arguments():
    w = np.ones((8, 16), np.float32)
    with pytest.raises(ValueError, match="threshold"):
        ak.build_act_dense(w, np.ones(5, np.float32), 1)
    with pytest.raises(ValueError, match="layout"):
        ak.build_act_dense(w, 0.1, 1, schedule={"layout": "csc"})
    with pytest.raises(ValueError, match="unknown"):
        ak.build_act_dense(w, 0.1, 1, schedule={"tiles": 3})


# ------------------------------------------------------------------ in a compiled model


def _thresholded_mlp(k=64, h=128, n=48, seed=0):
    """X -> Where(|X| > t0) -> MatMul W0 -> Relu -> Where(|.| > T1 per channel) -> Gemm (W1
    stored transposed, transB=1, bias). `inits["W1"]` is the [K, N] view the kernel sees."""
    rng = np.random.default_rng(seed)
    inits = {
        "W0": rng.standard_normal((k, h)).astype(np.float32),
        "W1": rng.standard_normal((h, n)).astype(np.float32),
        "T0": np.array(0.6, np.float32),
        "T1": (np.abs(rng.standard_normal(h)) * 4).astype(np.float32),
        "Z": np.array(0.0, np.float32),
    }
    nodes = []
    for i, (src, dst) in enumerate((("X", "y0"), ("r0", "y1"))):
        nodes += [
            helper.make_node("Abs", [src], [f"a{i}"]),
            helper.make_node("Greater", [f"a{i}", f"T{i}"], [f"g{i}"]),
            helper.make_node("Where", [f"g{i}", src, "Z"], [dst]),
        ]
        if i == 0:
            nodes += [
                helper.make_node("MatMul", ["y0", "W0"], ["h0"]),
                helper.make_node("Relu", ["h0"], ["r0"]),
            ]
    nodes.append(helper.make_node("Gemm", ["y1", "W1t", "B1"], ["Y"], transB=1))
    stored = {key: v for key, v in inits.items() if key != "W1"}
    stored |= {"W1t": np.ascontiguousarray(inits["W1"].T), "B1": np.ones(n, np.float32)}
    return g.make_model(nodes, [g._x(["batch", k])], [g._y(["batch", n])], stored), inits


def _feeds(batch, k=64, seed=1):
    return {"X": np.random.default_rng(seed).standard_normal((batch, k)).astype(np.float32)}


def test_compiled_model_with_where_pattern_matches_onnxruntime(tmp_path):
    model, _ = _thresholded_mlp()
    path = tmp_path / "mlp.onnx"
    path.write_bytes(model.SerializeToString())
    man = compile_llvm(
        path, tmp_path / "out", batch_sizes=[1, 4], db_path=tmp_path / "db.json", tune_trials=1
    )
    # one measured decision per (weight, bucket), each with both timings
    man["fused"] = [f for f in man["fused"] if f.get("technique") == "activation_sparsity"]
    assert len(man["fused"]) == 4
    assert {(tuple(f["weight_shape"]), f["M"]) for f in man["fused"]} == {
        ((64, 128), 1),
        ((64, 128), 4),
        ((128, 48), 1),
        ((128, 48), 4),
    }
    assert {f["threshold"] for f in man["fused"]} == {"scalar", "per-channel"}
    assert all(
        f["fused_us"] > 0 and f["dense_us"] > 0 and f["chosen"] in ("fused", "dense") for f in man["fused"]
    )
    # no calibrated sparsity recorded in this model: timed at the assumed 50 %, and said so
    assert all(
        f["calibrated_sparsity"] is None and f["timed_activation_sparsity"] == ak.ASSUMED_SPARSITY
        and f["sparsity_source"].startswith("assumed") for f in man["fused"]
    )  # fmt: skip
    sess = Session(tmp_path / "out")
    for batch in (1, 4):
        feeds = _feeds(batch)
        (got,) = sess.run(["Y"], feeds)
        (ref,) = g.run_ort(model, feeds)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert sess.fallbacks == 0


def test_fused_kernel_from_tuning_db_runs_in_the_module(tmp_path):
    """A stored 'fused' decision is rebuilt without timing and runs inside the module; the two
    weights have one shape, so they share one PrimFunc with their own constants."""
    model, inits = _thresholded_mlp(k=64, h=64, n=64, seed=2)
    path = tmp_path / "mlp.onnx"
    path.write_bytes(model.SerializeToString())
    db_path = tmp_path / "db.json"
    db = TuningDB(db_path)
    target = host_target()
    for w, t in ((inits["W0"], inits["T0"]), (inits["W1"], inits["T1"])):
        key = ak.decision_key(target, w, ak.thresholds(t, w.shape[0]), 1, False)
        db.put(key, {"technique": "activation_sparsity", "weight_shape": list(w.shape), "M": 1,
                     "threshold": "scalar", "kernel": "act_strips",
                     "weight_sparsity": 0.0, "assumed_activation_sparsity": 0.5, "calibrated_sparsity": None,
                     "fused_us": 1.0, "fused_guard_us": 2.0, "dense_kernel": "dense", "dense_us": 2.0,
                     "chosen": "fused"})  # fmt: skip
    db.save()
    man = compile_llvm(path, tmp_path / "out", batch_sizes=[1], db_path=db_path, tune_trials=1)
    man["fused"] = [f for f in man["fused"] if f.get("technique") == "activation_sparsity"]
    assert [f["chosen"] for f in man["fused"]] == ["fused", "fused"]
    assert all(f["from_db"] for f in man["fused"])
    md = "\n".join(_codegen_markdown(man))
    assert "Fused kernels" in md and md.count("| fused |") == 2
    # a record declined before timing (the CUDA kernel's N % 4 != 0) is listed with its reason
    declined = {"technique": "activation_sparsity", "M": 1, "weight_shape": [64, 62], "threshold": "scalar"}
    man["fused"].append(declined | {"chosen": "dense", "reason": "the CUDA kernel needs N % 4 == 0"})
    assert "64x62 | 1 | scalar | – | – | – | – | dense: the CUDA kernel needs N % 4 == 0" in "\n".join(
        _codegen_markdown(man)
    )
    feeds = _feeds(1, seed=5)
    (got,) = Session(tmp_path / "out").run(["Y"], feeds)
    (ref,) = g.run_ort(model, feeds)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_recorded_sparsity_sets_the_timing_per_threshold(tmp_path):
    """A model recording a calibrated sparsity for one of its two thresholds (metadata keyed
    by the threshold's values): that weight's fused kernel is timed at it, the other at the
    assumed 50 %; the decisions are cached per sparsity; the module still matches onnxruntime."""
    from sparsegraph.passes.rewrite.activation_sparsity import METADATA_KEY, threshold_key

    model, inits = _thresholded_mlp(seed=3)
    key = threshold_key(inits["T0"], 64)
    meta = {"version": 1, "thresholds": {key: {"sparsity": 0.8321, "source": "held_out", "k": 64}}}
    helper.set_model_props(model, {METADATA_KEY: json.dumps(meta)})
    path = tmp_path / "mlp.onnx"
    path.write_bytes(model.SerializeToString())
    db = tmp_path / "db.json"
    man = compile_llvm(path, tmp_path / "out", batch_sizes=[1], db_path=db, tune_trials=1)
    act = {tuple(f["weight_shape"]): f for f in man["fused"] if f.get("technique") == "activation_sparsity"}
    assert act[(64, 128)]["calibrated_sparsity"] == 0.8321
    assert act[(64, 128)]["timed_activation_sparsity"] == 0.83  # on the 1 % grid
    assert act[(64, 128)]["sparsity_source"] == "calibrated"
    assert act[(128, 48)]["calibrated_sparsity"] is None
    assert act[(128, 48)]["timed_activation_sparsity"] == ak.ASSUMED_SPARSITY
    stored = json.loads(db.read_text())
    assert any(k.endswith("|s0.8300") for k in stored)  # its own tuning-DB entry
    md = "\n".join(_codegen_markdown(man))
    assert "83% calibrated" in md and "50% assumed" in md
    feeds = _feeds(1, seed=4)
    (got,) = Session(tmp_path / "out").run(["Y"], feeds)
    (ref,) = g.run_ort(model, feeds)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


# ------------------------------------------------------------------ CUDA


@pytest.mark.parametrize("m", [1, 8])
def test_cuda_kernel_compiles_to_cuda_source(m):
    import tvm

    from sparsegraph.codegen.cuda_act_kernels import act_cuda_func

    kern = act_cuda_func(m, 2048, 1000)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    with target:
        ex = tvm.compile(tvm.IRModule({kern.symbol: kern.prim_func}), target=target)
    src = ex.mod.imports[0].inspect_source()
    assert "__ballot_sync" in src and "*(half4*)(W_ptr" in src  # compaction + 8-byte W loads
    # one launch: the blocks of a cluster sum their K slices through distributed shared memory
    assert "%cluster_ctarank" in src and "barrier.cluster" in src and "ld.shared::cluster" in src
    assert "atomicAdd" not in src
    assert src.count("__global__ void") == 2  # declaration + definition of the one kernel


def test_cuda_kernel_rejects_bad_shapes():
    from sparsegraph.codegen.cuda_act_kernels import act_cuda_func

    with pytest.raises(ValueError, match="M <= 8"):
        act_cuda_func(9, 64, 64)
    with pytest.raises(ValueError, match="dividing N"):
        act_cuda_func(1, 62, 64)
    with pytest.raises(ValueError, match="warps 1..16"):
        act_cuda_func(1, 64, 4096, warps=32)
    assert act_cuda_func(1, 4096, 4000, warps=16, vec=8).warps == 16  # 512-thread blocks build


@pytest.mark.parametrize(
    ("m", "x_dtype", "k", "n", "plan"),
    [
        (1, "float16", 1000, 2048, {}),
        (4, "float32", 3000, 2056, {"warps": 2, "cluster": 2, "chunk": 64}),  # 12 chunks, ragged N
        (8, "float16", 1000, 2048, {}),
        (1, "float16", 4000, 4096, {"warps": 16, "vec": 8}),  # 512 threads, 16-byte W loads
    ],
)
def test_cuda_kernel_matches_torch_on_gpu(m, x_dtype, k, n, plan):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    import tvm

    from sparsegraph.codegen.cuda_act_kernels import act_cuda_func

    kern = act_cuda_func(m, n, k, x_dtype=x_dtype, **plan)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    with target:
        fn = tvm.compile(tvm.IRModule({kern.symbol: kern.prim_func}), target=target)[kern.symbol]
    gen = torch.Generator().manual_seed(m)
    w = (torch.randn(k, n, generator=gen) / k**0.5).half().cuda()
    th = (torch.rand(k, generator=gen) * 1.5).cuda()
    dt = getattr(torch, x_dtype)
    for _ in range(3):
        x = torch.randn(m, k, generator=gen).to(dt).cuda()
        y, y2 = (torch.empty(m, n, dtype=dt, device="cuda") for _ in range(2))
        fn(x, th, w, y)
        fn(x, th, w, y2)
        ref = torch.where(x.float().abs() > th, x.float(), 0.0) @ w.float()
        assert float((y.float() - ref).abs().max()) <= 2e-3 * float(ref.abs().max())
        assert torch.equal(y, y2)  # fixed summation order: deterministic


def test_activation_sparsity_pass_output_is_fused_on_stories260k(tmp_path):
    """End to end with the pass that inserts the pattern (TEAL thresholds calibrated on
    TinyStories): every site is recognised, decided by measurement, and the compiled model
    matches the portable model in onnxruntime."""
    recipe = {"steps": [{"pass": "activation_sparsity", "method": "teal", "sparsity": 0.5}]}
    sg.compile_model(
        STORIES, recipe, tmp_path, calib=EXAMPLES / "data" / "tinystories_valid.txt",
        tokenizer=EXAMPLES / "stories260K" / "tok512.bin", calib_samples=4, seqlen=32, target="llvm",
        batch_sizes=(1,), seq_len=1, tuning_db=tmp_path / "db.json",
    )  # fmt: skip
    man = json.loads((tmp_path / "manifest.json").read_text())
    act = [f for f in man["fused"] if f.get("technique") == "activation_sparsity"]
    assert len(act) == 35  # 5 layers x 7 projections, each behind a Where
    assert {f["threshold"] for f in act} == {"scalar"}
    # every fused kernel was timed at the sparsity its threshold reached (held-out, here with
    # 4 samples in one batch: calibration), which the pass recorded in portable.onnx and the
    # compile read back by the threshold's values
    report = json.loads((tmp_path / "report.json").read_text())
    tensors = report["activation_sparsity"]["tensors"]
    held = {t["held_out"] if t["held_out"] is not None else t["calibration"] for t in tensors}
    assert len(held) == 20 and all(0.3 < h < 0.7 for h in held)
    assert sorted({f["calibrated_sparsity"] for f in act}) == pytest.approx(sorted(held), abs=1e-6)
    assert all(f["timed_activation_sparsity"] == round(f["calibrated_sparsity"], 2) for f in act)
    assert "calibrated" in (tmp_path / "report.md").read_text()
    tokens = np.array([[5]], dtype=np.int64)
    (got,) = Session(tmp_path).run(["logits"], {"tokens": tokens})
    (ref,) = g.run_ort(onnx.load(tmp_path / "portable.onnx"), {"tokens": tokens})
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
