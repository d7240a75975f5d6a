"""Tensor-core dense GEMM for CUDA (`sparsegraph.codegen.cuda_mma`).

Without a GPU (CI): kernels build for several schedules, M (tile multiples or not) and X
dtypes, and the generated CUDA source issues the tensor-core path (``mma.sync`` m16n8k16,
``ldmatrix``, ``cp.async`` with commit / wait groups); unfit shapes raise `UnfitError`.
With a GPU: every schedule matches numpy (float64 reference from the same fp16 values;
tolerance max |y - ref| / max |ref| <= 2e-3 for fp16 Y, 1e-3 for fp32 Y), and every
element of Y is written (Y starts as NaN).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from sparsegraph.codegen import cuda_kernels as ck
from sparsegraph.codegen import cuda_mma as cm
from sparsegraph.codegen.formats import UnfitError

HAS_GPU = tvm.cuda().exist
HOPPER = HAS_GPU and tvm.cuda().compute_version == "9.0"


def _w(n, k, seed=0):
    return (np.random.default_rng(seed).standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)


@pytest.mark.parametrize(
    ("m", "x_dtype", "sched"),
    [(2048, "float16", 6), (100, "float32", 7), (16, "float16", 13), (37, "float32", 14)],
)
def test_builds_tensor_core_source(m, x_dtype, sched):
    w = _w(256, 512)
    assert not cm.SCHEDULE_SPACE[sched]["wg"]
    kern = cm.build(w, m, x_dtype=x_dtype, **cm.SCHEDULE_SPACE[sched])
    assert kern.format == "mma" and kern.shape == (m, 256, 512)
    assert list(kern.weights) == ["w"] and kern.weights["w"].dtype == np.float16
    assert kern.weights["w"].shape == (256, 512)
    src = kern.source()
    assert kern.symbol in src
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src
    assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in src
    assert "cp.async.cg.shared.global" in src
    assert "cp.async.commit_group" in src and "cp.async.wait_group" in src


@pytest.mark.parametrize(("m", "sched"), [(2048, 0), (100, 3), (16, 5)])
def test_builds_wgmma_source(m, sched):
    kern = cm.build(_w(256, 512), m, **cm.SCHEDULE_SPACE[sched])
    assert kern.schedule["wg"] == 1
    src = kern.source(cm.hopper_target())
    assert "wgmma.mma_async.sync.aligned.m64n" in src and "wgmma.wait_group.sync.aligned" in src
    assert "fence.proxy.async.shared::cta" in src and "cp.async.cg.shared.global" in src


def test_schedules_fit_and_unfit():
    fit = cm.schedules(16, 4096, 4096)
    assert fit and fit[0]["bm"] == 16  # small M: a 16-row tile first
    assert cm.schedules(2048, 4096, 4096)[0]["bm"] == 128
    assert all(not s["wg"] for s in cm.schedules(256, 4096, 4096, "float32"))
    assert any(s["wg"] for s in cm.schedules(256, 4096, 4096))
    for s in cm.schedules(64, 4096, 11008):
        assert 4096 % s["bn"] == 0 and 11008 % s["bk"] == 0
        assert cm.smem_bytes(s) <= cm.SMEM_MAX
    with pytest.raises(UnfitError):
        cm.build(_w(100, 512), 16)  # N not a multiple of 16
    with pytest.raises(UnfitError):
        cm.build(_w(256, 512), 16, bk=96)  # K % bk
    with pytest.raises(UnfitError):
        cm.build(_w(256, 512), 16, x_dtype="int8")
    with pytest.raises(UnfitError):
        cm.build(_w(256, 512), 256, x_dtype="float32", **cm.SCHEDULE_SPACE[0])  # wgmma: fp16 X
    with pytest.raises(UnfitError):
        cm.build(_w(256, 512), 256, target=ck.cuda_target("sm_90"), **cm.SCHEDULE_SPACE[0])  # needs sm_90a
    assert cm.build(_w(256, 512), 256, target=cm.hopper_target(), **cm.SCHEDULE_SPACE[0]).schedule["wg"]


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("i", range(len(cm.SCHEDULE_SPACE)))
@pytest.mark.parametrize("x_dtype", ["float16", "float32"])
def test_matches_numpy_on_gpu(x_dtype, i):
    sched = cm.SCHEDULE_SPACE[i]
    if sched["wg"] and (x_dtype != "float16" or not HOPPER):
        pytest.skip("wgmma schedules: fp16 X on sm_90 only")
    rng = np.random.default_rng(i)
    n, k = 256, 1024
    w = _w(n, k, 5)
    w16 = w.astype(np.float16).astype(np.float64)
    dev = tvm.cuda()
    for m in (1, 37 + 64 * (i % 3)):  # one row; a partial tile
        kern = cm.build(w, m, x_dtype=x_dtype, **sched)
        fn = kern.compile(cm.hopper_target() if HOPPER else None)[kern.symbol]
        x = rng.standard_normal((m, k)).astype(x_dtype)
        y = tvm.runtime.tensor(np.full((m, n), np.nan, x_dtype), dev)
        fn(tvm.runtime.tensor(x, dev), tvm.runtime.tensor(kern.weights["w"], dev), y)
        out = y.numpy().astype(np.float64)
        assert np.isfinite(out).all(), (kern.label, m)
        ref = x.astype(np.float16).astype(np.float64) @ w16.T
        err = np.abs(out - ref).max() / np.abs(ref).max()
        assert err <= (2e-3 if x_dtype == "float16" else 1e-3), (kern.label, m, err)
