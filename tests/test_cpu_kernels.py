"""Tests for sparsegraph.codegen.cpu_kernels / target: every kernel against a float64 numpy
reference on random shapes and sparsities, plus the target and assembly checks."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsegraph.codegen import cpu_kernels as ck
from sparsegraph.codegen import formats as fmts
from sparsegraph.codegen.formats import UnfitError
from sparsegraph.codegen.target import (
    cpu_flags,
    has_avx512,
    host_target,
    select_mcpu,
    target_has_features,
    time_function,
)

# Each example compiles one kernel (~0.05-0.3 s), so keep the example counts small.
SETTINGS = settings(max_examples=10, deadline=None)
MS = st.sampled_from([1, 3, 8, 17, 64])
SIZES = st.integers(1, 16).map(lambda a: 16 * a)  # 16 .. 256
SPARSITIES = st.sampled_from([0.0, 0.5, 0.9, 0.95, 1.0])
SEEDS = st.integers(0, 2**32 - 1)

TARGET = host_target()
AVX512 = target_has_features(TARGET)
needs_avx512 = pytest.mark.skipif(not AVX512, reason="host target has no AVX-512 (avx512f/bw/dq/vl)")
# An AVX2-only target runs on any x86-64-v3 host (this one included): exercises the
# non-AVX-512 code paths (scalarised gathers) and checks that no zmm register is used.
needs_avx2 = pytest.mark.skipif("avx2" not in cpu_flags(), reason="host CPU flags list no AVX2")
AVX2_TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": os.cpu_count() or 1})


def random_weight(n, k, sparsity, seed, empty_rows=0.0):
    """N(0,1) weight with a `sparsity` fraction zeroed and a fraction of whole rows empty."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[rng.random((n, k)) < sparsity] = 0.0
    w[rng.random(n) < empty_rows] = 0.0
    return w


def nm_weight(n_rows, k, n, m, seed, fill=1.0):
    """Magnitude-pruned n:m weight; `fill` < 1 zeroes some kept values too."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n_rows, k // m, m)).astype(np.float32)
    order = np.argsort(np.abs(g), axis=-1)
    np.put_along_axis(g, order[..., : m - n], 0.0, axis=-1)
    g[rng.random(g.shape) > fill] = 0.0
    return g.reshape(n_rows, k)


def assert_matches(kernel, x, w, y):
    """|y - ref| <= 1e-4 |ref| + 1e-4 ||x_m|| ||w_n|| elementwise (ref in float64)."""
    assert y.shape == (x.shape[0], w.shape[0]) and y.dtype == np.float32
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    scale = np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(w.astype(np.float64), axis=1))
    bad = np.abs(y - ref) > 1e-4 * np.abs(ref) + 1e-4 * scale
    assert not bad.any(), (
        f"{kernel.format} {kernel.shape} {kernel.schedule}: {int(bad.sum())} bad entries, "
        f"max abs err {np.abs(y - ref).max():.3g}"
    )


def check(kernel, w, m, seed=0):
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((m, w.shape[1])).astype(np.float32)
    assert_matches(kernel, x, w, kernel(x))
    # the tvm tensors are reused: a second call with other data must not see stale values
    x2 = -x[::-1].copy()
    assert_matches(kernel, x2, w, kernel(x2))


def check_common(kernel, fmt, m, n, k):
    assert kernel.format == fmt
    assert kernel.shape == (m, n, k)
    assert kernel.nbytes == sum(a.nbytes for a in kernel.weights.values()) > 0
    assert isinstance(kernel.schedule, dict)
    assert isinstance(kernel.prim_func, tvm.tirx.PrimFunc)
    assert str(kernel.prim_func.attrs["global_symbol"]).startswith("sg_")
    assert len(kernel.prim_func.params) == 2 + len(kernel.weights)


# --------------------------------------------------------------------------- target


def test_host_target():
    t = host_target()
    assert str(t.kind.name) == "llvm"
    mcpu = str(t.attrs["mcpu"])
    assert mcpu not in ("", "generic", "native")
    assert int(t.attrs["num-cores"]) == (os.cpu_count() or 1)
    assert int(host_target(num_cores=3).attrs["num-cores"]) == 3
    if has_avx512():
        assert target_has_features(t), f"host has AVX-512 but target mcpu={mcpu} does not enable it"
    with pytest.raises(ValueError):
        host_target(num_cores=0)
    assert not target_has_features(AVX2_TARGET)


def test_select_mcpu_falls_back_without_avx512():
    avx2 = {"sse4_2", "popcnt", "avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"}
    avx512 = avx2 | {"avx512f", "avx512bw", "avx512dq", "avx512vl"}
    assert select_mcpu("znver5", avx512, True) == "znver5"
    assert select_mcpu("znver5", avx2, True) == "x86-64-v3"  # AVX-512 masked (e.g. a VM)
    assert select_mcpu("znver5", {"sse4_2", "popcnt"}, True) == "x86-64-v2"
    assert select_mcpu("haswell", avx2, False) == "haswell"
    assert select_mcpu("generic", avx2, False) == "x86-64-v3"
    assert select_mcpu("znver5", frozenset(), True) == "znver5"  # flags unknown


def test_time_function():
    calls = []
    t = time_function(lambda a: calls.append(a), (1,), repeat=3, number=4)
    assert t >= 0.0 and isinstance(t, float)
    assert len(calls) == 1 + 3 * 4  # one warm-up call
    with pytest.raises(ValueError):
        time_function(lambda: None, (), repeat=0)


# --------------------------------------------------------------------------- dense


@SETTINGS
@given(m=MS, n=SIZES, k=SIZES, seed=SEEDS)
def test_dense_matches_numpy(m, n, k, seed):
    w = random_weight(n, k, 0.0, seed)
    kern = ck.build_dense(w, m, TARGET)
    check_common(kern, "dense", m, n, k)
    check(kern, w, m, seed)


@pytest.mark.parametrize(
    "schedule",
    [
        {"m_tile": 3, "n_panel": 64, "k_unroll": 3},  # M, N and K tails
        {"m_tile": 16, "n_panel": 16, "k_unroll": 1},
        {"m_tile": 5, "n_panel": 48, "k_unroll": 5},
        {"m_tile": 8, "n_panel": 32, "k_unroll": 4, "prefetch": 8},  # prefetch (clamped at the K end)
        {"m_tile": 5, "n_panel": 48, "k_unroll": 3, "k_block": 32},  # K blocks: block and unroll tails
        {"m_tile": 6, "n_panel": 64, "k_unroll": 4, "k_block": 48},  # K blocks: partial last panel
    ],
)
def test_dense_schedules(schedule):
    w = random_weight(80, 112, 0.0, 7)
    kern = ck.build_dense(w, 17, TARGET, schedule)
    for key, value in schedule.items():
        assert kern.schedule[key] == value
    assert kern.weights["Wp"].shape[2] == schedule["n_panel"]
    check(kern, w, 17)


def test_dense_large_m_default_is_k_blocked():
    w = random_weight(72, 600, 0.0, 3)  # N tail in the last 64-wide panel, K = 512 + 88
    kern = ck.build_dense(w, 70, TARGET)
    assert kern.schedule["k_block"] == 512 and kern.schedule["n_panel"] == 64
    check(kern, w, 70)
    assert ck.build_dense(w, 8, TARGET).schedule["k_block"] == 0
    # one m tile (M <= m_tile): nothing reuses a K block, so a k_block request is dropped
    one = ck.build_dense(w, 4, TARGET, {"m_tile": 4, "n_panel": 96, "k_block": 512})
    assert one.schedule["k_block"] == 0 and one.schedule["m_tiles"] == 1
    check(one, w, 4)
    assert ck.build_dense(w, 9, TARGET, {"m_tile": 4, "k_block": 512}).schedule["k_block"] == 512


@pytest.mark.parametrize(
    "n, m, panels, used", [(48, 1, None, 2), (80, 1, 2, 1), (96, 3, 3, 3), (64, 1, 1, 1)]
)
def test_dense_panels_per_task(n, m, panels, used):
    """Several panels per task (default 2 at M = 1), with a partial last panel; a count that
    does not divide the panels falls back to 1."""
    w = random_weight(n, 40, 0.0, 5)  # K = 40: k_unroll tail too
    kern = ck.build_dense(w, m, TARGET, {"panels": panels})
    assert kern.schedule["panels"] == used
    check(kern, w, m)


def test_use_all_cores():
    """TVM's pool gets every physical core unless TVM_NUM_THREADS / OMP_NUM_THREADS says otherwise."""
    assert 1 <= ck.physical_cores() <= (os.cpu_count() or 1)
    n = ck.use_all_cores()
    assert n >= 1
    if os.environ.get("TVM_NUM_THREADS"):
        assert n == int(os.environ["TVM_NUM_THREADS"])


def test_dense_asm_uses_zmm():
    if not AVX512:
        pytest.skip(f"host target mcpu={TARGET.attrs['mcpu']} has no AVX-512, so no zmm registers expected")
    kern = ck.build_dense(random_weight(64, 64, 0.0, 1), 8, TARGET)
    asm = kern.asm()
    assert "zmm" in asm
    assert "vfmadd" in asm
    assert asm == ck.generated_asm(kern)


def test_bad_inputs():
    w = random_weight(32, 32, 0.5, 2)
    with pytest.raises(ValueError, match="unknown dense schedule"):
        ck.build_dense(w, 1, TARGET, {"tile": 4})
    with pytest.raises(ValueError, match="n_panel"):
        ck.build_dense(w, 1, TARGET, {"n_panel": 24})
    kern = ck.build_csr(w, 2, TARGET)
    with pytest.raises(ValueError, match="shape"):
        kern(np.zeros((3, 32), np.float32))
    with pytest.raises(UnfitError):
        ck.build_nm(w, 2, 4, 1, TARGET)  # not 2:4 sparse


def test_symbols_are_unique():
    w = random_weight(32, 32, 0.5, 3)
    a, b = ck.build_csr(w, 1, TARGET), ck.build_csr(w, 1, TARGET)
    assert a.symbol != b.symbol


# --------------------------------------------------------------------------- CSR


@SETTINGS
@given(
    m=MS, n=SIZES, k=SIZES, sparsity=SPARSITIES, seed=SEEDS, variant=st.sampled_from([None, "gather", "xt"])
)
def test_csr_matches_numpy(m, n, k, sparsity, seed, variant):
    w = random_weight(n, k, sparsity, seed, empty_rows=0.2)
    kern = ck.build_csr(w, m, TARGET, {"variant": variant})
    check_common(kern, "csr", m, n, k)
    assert kern.weights["indices"].dtype == np.uint16
    assert kern.weights["indptr"].dtype == np.int32
    assert np.all(np.diff(kern.weights["indptr"]) % 16 == 0)
    assert kern.schedule["variant"] == (variant or ("gather" if m == 1 else "xt"))
    check(kern, w, m, seed)


@pytest.mark.parametrize("variant", ["gather", "xt"])
@pytest.mark.parametrize("m", [1, 17])
def test_csr_edge_cases(variant, m):
    zero = np.zeros((48, 64), np.float32)
    kern = ck.build_csr(zero, m, TARGET, {"variant": variant})
    assert np.array_equal(kern(np.ones((m, 64), np.float32)), np.zeros((m, 48), np.float32))
    w = random_weight(48, 64, 0.95, 4, empty_rows=0.3)
    w[0] = 0.0
    w[-1] = 0.0
    check(ck.build_csr(w, m, TARGET, {"variant": variant, "m_tile": 8, "n_acc": 3}), w, m)


@pytest.mark.parametrize(
    "schedule",
    [
        {"variant": "xt", "k_chunk": 32},  # column chunks (K tail chunk too), scratch accumulation
        {"variant": "xt", "k_chunk": 48, "m_tile": 8, "row_block": 5, "n_acc": 2},  # 3 m tiles, N tail
        {"variant": "xt", "prefetch": 0, "row_block": 1},
        {"variant": "gather", "prefetch": 64},
    ],
)
def test_csr_chunks_and_prefetch(schedule):
    w = random_weight(37, 112, 0.7, 21, empty_rows=0.2)
    for m in (1, 3, 17):
        kern = ck.build_csr(w, m, TARGET, schedule)
        check(kern, w, m)
        if schedule.get("k_chunk"):
            p = kern.weights["indptr"]
            assert p.shape == (-(-112 // schedule["k_chunk"]) * 38,)
            assert np.all(np.diff(p.reshape(-1, 38), axis=1) % 16 == 0)


def test_chunk_csr_layout():
    w = random_weight(5, 40, 0.6, 22)
    vals, cols, ptr = ck.chunk_csr(fmts.CSR.pack(w, pad=16), 16)
    out = np.zeros_like(w)
    for c in range(3):
        for r in range(5):
            seg = slice(ptr[c * 6 + r], ptr[c * 6 + r + 1])
            assert np.all((cols[seg] >= 16 * c) & (cols[seg] < 16 * c + 16) | (vals[seg] == 0))
            np.add.at(out[r], cols[seg], vals[seg])
    assert np.array_equal(out, w)


def test_builders_take_packed_formats():
    w = random_weight(64, 96, 0.8, 23)
    check(ck.build_csr(fmts.CSR.pack(w, pad=16), 3, TARGET), w, 3)
    check(ck.build_csr(fmts.CSR.pack(w), 3, TARGET), w, 3)  # other padding: repacked
    check(ck.build_bsr(fmts.BSR.pack(w, block=(16, 1)), (16, 1), 3, TARGET), w, 3)
    if AVX512:
        check(ck.build_bitmap(fmts.Bitmap.pack(w), 3, TARGET), w, 3)
    wn = nm_weight(64, 96, 2, 4, 23)
    check(ck.build_nm(fmts.NM.pack(wn, n=2, m=4), 2, 4, 3, TARGET), wn, 3)


# --------------------------------------------------------------------------- BSR

BLOCKS = st.sampled_from(
    [(16, 1), (1, 16), (8, 8), (16, 16), (32, 32), (4, 4), (1, 1), (2, 16), (8, 1), (1, 8)]
)


@SETTINGS
@given(m=MS, a=st.integers(1, 8), b=st.integers(1, 8), block=BLOCKS, sparsity=SPARSITIES, seed=SEEDS)
def test_bsr_matches_numpy(m, a, b, block, sparsity, seed):
    r, c = block
    n, k = a * math.lcm(16, r), b * math.lcm(16, c)
    w = random_weight(n, k, sparsity, seed, empty_rows=0.2)
    kern = ck.build_bsr(w, block, m, TARGET)
    check_common(kern, "bsr", m, n, k)
    assert kern.schedule["block"] == (r, c)
    assert kern.schedule["variant"] == ("c" if r < 8 <= c else "r")
    check(kern, w, m, seed)


@pytest.mark.parametrize(
    ("block", "variant"), [((12, 1), "r"), ((1, 12), "c"), ((4, 12), "c"), ((16, 1), "r"), ((2, 8), "r")]
)
def test_bsr_odd_blocks_and_variants(block, variant):
    w = random_weight(48, 96, 0.6, 5, empty_rows=0.2)
    for m in (1, 17):
        kern = ck.build_bsr(w, block, m, TARGET, {"variant": variant, "m_tile": 4})
        assert kern.schedule["variant"] == variant
        check(kern, w, m)
    zero = np.zeros((48, 96), np.float32)
    assert not ck.build_bsr(zero, block, 3, TARGET)(np.ones((3, 96), np.float32)).any()


def test_bsr_block_structured_sparsity():
    rng = np.random.default_rng(6)
    w = random_weight(256, 256, 0.0, 6)
    keep = rng.random((16, 256)) < 0.1  # 90 % of 16x1 blocks pruned
    w *= np.repeat(keep, 16, axis=0)
    kern = ck.build_bsr(w, (16, 1), 8, TARGET)
    assert kern.nbytes < 0.2 * w.nbytes
    check(kern, w, 8)


@pytest.mark.parametrize(
    ("block", "schedule"),
    [
        ((1, 16), {"k_chunk": 32, "row_block": 7}),  # chunked "c" variant, default at M > 16
        ((16, 1), {"k_chunk": 40, "row_block": 2}),  # chunked "r" variant
        ((32, 32), {"k_chunk": 64, "m_tile": 3}),
        ((4, 12), {"k_chunk": 24, "variant": "c"}),
        ((16, 1), {"k_chunk": 0, "prefetch": 100}),  # prefetch (clamped at the array end)
        ((1, 16), {"k_chunk": 48, "prefetch": 64}),
        ((32, 32), {"k_chunk": 0, "prefetch": 0}),
    ],
)
def test_bsr_chunked(block, schedule):
    r, c = block
    rng = np.random.default_rng(24)
    n, k = 3 * math.lcm(16, r), 7 * math.lcm(16, c)
    w = random_weight(n, k, 0.0, 24)
    w *= np.kron(rng.random((n // r, k // c)) < 0.4, np.ones((r, c), np.float32))
    for m in (1, 17, 40):
        kern = ck.build_bsr(w, block, m, TARGET, schedule)
        assert kern.schedule["k_chunk"] == schedule["k_chunk"] // c * c
        check(kern, w, m)


# --------------------------------------------------------------------------- Bitmap


@needs_avx512
@SETTINGS
@given(m=MS, n=SIZES, k=SIZES, sparsity=SPARSITIES, seed=SEEDS)
def test_bitmap_matches_numpy(m, n, k, sparsity, seed):
    w = random_weight(n, k, sparsity, seed, empty_rows=0.2)
    kern = ck.build_bitmap(w, m, TARGET)
    check_common(kern, "bitmap", m, n, k)
    check(kern, w, m, seed)


@needs_avx512
@pytest.mark.parametrize(
    "schedule",
    [
        {"k_unroll": 3},
        {"k_unroll": 1, "m_tile": 5},
        {"k_unroll": 2, "expand": "mem"},
        {"prefetch": 0},
        {"prefetch": 40, "k_unroll": 4},  # prefetch addresses clamped at both array ends
    ],
)
def test_bitmap_schedules(schedule):
    w = random_weight(64, 80, 0.9, 8, empty_rows=0.2)
    for m in (1, 17):
        check(ck.build_bitmap(w, m, TARGET, schedule), w, m)


@needs_avx512
def test_bitmap_uses_register_expand():
    kern = ck.build_bitmap(random_weight(32, 64, 0.7, 9), 1, TARGET)
    asm = kern.asm()
    assert "vexpandps\t%zmm" in asm, "expected the register form of vexpandps"
    assert "zmm" in asm


def test_bitmap_needs_avx512():
    with pytest.raises(UnfitError, match="AVX-512"):
        ck.build_bitmap(random_weight(32, 32, 0.5, 10), 1, AVX2_TARGET)


# --------------------------------------------------------------------------- N:M

NM_PATTERNS = st.sampled_from([(2, 4), (1, 4), (1, 2), (2, 8), (4, 8), (1, 8), (4, 16)])


@SETTINGS
@given(m=MS, n=SIZES, k=SIZES, pattern=NM_PATTERNS, fill=st.sampled_from([1.0, 0.5, 0.0]), seed=SEEDS)
def test_nm_matches_numpy(m, n, k, pattern, fill, seed):
    nn, mm = pattern
    w = nm_weight(n, k, nn, mm, seed, fill)
    kern = ck.build_nm(w, nn, mm, m, TARGET)
    check_common(kern, "nm", m, n, k)
    assert (kern.schedule["n"], kern.schedule["m"]) == (nn, mm)
    assert kern.schedule["mode"] == ("permute" if AVX512 else "scalar")
    check(kern, w, m, seed)


@pytest.mark.parametrize("mode", ["permute", "gather", "scalar"])
def test_nm_modes_and_tails(mode):
    if mode != "scalar" and not AVX512:
        pytest.skip("AVX-512 modes need an AVX-512 host")
    w = nm_weight(40, 96, 2, 4, 11)  # N = 40: a partial 16-row group
    w[3] = 0.0
    for m in (1, 17):
        kern = ck.build_nm(w, 2, 4, m, TARGET, {"mode": mode, "m_tile": 4})
        assert kern.weights["values"].shape == (3, 48, 16)
        check(kern, w, m)


def test_nm_large_m_group_uses_gather():
    w = nm_weight(32, 64, 2, 32, 12)  # m = 32 > 16: no permute window
    kern = ck.build_nm(w, 2, 32, 3, TARGET)
    assert kern.schedule["mode"] == ("gather" if AVX512 else "scalar")
    check(kern, w, 3)


# --------------------------------------------------------------------------- non-AVX-512 target


@needs_avx2
@pytest.mark.parametrize("m", [1, 8])
def test_avx2_target_paths(m):
    w = random_weight(64, 96, 0.8, 13, empty_rows=0.2)
    wn = nm_weight(64, 96, 2, 4, 13)
    kernels = [
        (ck.build_dense(w, m, AVX2_TARGET), w),
        (ck.build_csr(w, m, AVX2_TARGET), w),
        (ck.build_bsr(w, (16, 1), m, AVX2_TARGET), w),
        (ck.build_bsr(w, (1, 16), m, AVX2_TARGET), w),
        (ck.build_nm(wn, 2, 4, m, AVX2_TARGET), wn),
    ]
    for kern, wk in kernels:
        assert "zmm" not in kern.asm(), kern.format
        check(kern, wk, m)
    assert kernels[-1][0].schedule["mode"] == "scalar"


# --------------------------------------------------------------------------- schedule space


def test_schedule_space_builds_and_matches():
    """Every SCHEDULE_SPACE entry is accepted by its builder and correct at several M."""
    assert set(ck.SCHEDULE_SPACE) >= {"dense", "csr", "bsr", "bitmap", "nm"}
    w = random_weight(64, 96, 0.75, 25)
    wn = nm_weight(64, 96, 2, 4, 25)
    for fmt, space in ck.SCHEDULE_SPACE.items():
        assert 1 <= len(space) <= 6 and space[0] == {}
        for sch in space:
            for m in (1, 8, 20):
                if fmt == "bitmap" and not AVX512:
                    continue
                if fmt == "bsr":
                    kern, ref = ck.build_bsr(w, (16, 1), m, TARGET, sch), w
                elif fmt == "nm":
                    kern, ref = ck.build_nm(wn, 2, 4, m, TARGET, sch), wn
                else:
                    kern, ref = getattr(ck, f"build_{fmt}")(w, m, TARGET, sch), w
                check(kern, ref, m)


# --------------------------------------------------------------------------- cpu_schedule


def _attention_like_onnx():
    """softmax(Q @ K^T * s + mask) @ V, RMSNorm and SiLU-gating: ops our kernels do not cover."""
    from onnx import TensorProto, helper, numpy_helper

    f = TensorProto.FLOAT
    mask = np.triu(np.full((32, 32), -1e9, np.float32), 1)
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["s2"]),
        helper.make_node("Add", ["s2", "mask"], ["s3"]),
        helper.make_node("Softmax", ["s3"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"]),
        helper.make_node("Mul", ["o", "o"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["ms2"]),
        helper.make_node("Sqrt", ["ms2"], ["rms"]),
        helper.make_node("Div", ["o", "rms"], ["n"]),
        helper.make_node("Sigmoid", ["n"], ["sg"]),
        helper.make_node("Mul", ["n", "sg"], ["y"]),
    ]
    shape = [2, 4, 32, 64]
    graph = helper.make_graph(
        nodes,
        "attn",
        [helper.make_tensor_value_info(n, f, shape) for n in ("q", "k", "v")],
        [helper.make_tensor_value_info("y", f, shape)],
        [
            numpy_helper.from_array(np.array(0.125, np.float32), "scale"),
            numpy_helper.from_array(mask, "mask"),
            numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_cpu_schedule_schedules_other_ops_and_matches_onnxruntime():
    import onnxruntime as ort
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
    from tvm.relax.frontend.onnx import from_onnx

    from sparsegraph.codegen import cpu_schedule

    model = _attention_like_onnx()
    mod = from_onnx(model, keep_params_in_input=False)
    with TARGET:
        fused = tvm.transform.Sequential(cpu_pipeline.legalize_passes(TARGET))(mod)
        scheduled = cpu_schedule.schedule_pass()(fused)
    prims = {gv.name_hint: f for gv, f in scheduled.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert prims and all(f.attrs and f.attrs.get("tirx.is_scheduled") for f in prims.values())
    matmuls = [str(f) for name, f in prims.items() if "matmul" in name]
    assert len(matmuls) == 2  # Q @ K^T (with scale and mask folded in) and P @ V
    assert all("T.vectorized" in s for s in matmuls)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((2, 4, 32, 64)).astype(np.float32) for n in ("q", "k", "v")}
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )[0]
    vm = relax.VirtualMachine(cpu_schedule.compile_cpu(mod, TARGET), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(feeds[n]) for n in ("q", "k", "v")])
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_cpu_schedule_leaves_our_kernels_alone():
    from sparsegraph.codegen import cpu_schedule

    kern = ck.build_dense(random_weight(32, 48, 0.0, 4), 3, TARGET)
    assert kern.prim_func.attrs["tirx.is_scheduled"]
    mod = tvm.IRModule({kern.symbol: kern.prim_func})
    with TARGET:
        out = cpu_schedule.schedule_pass()(mod)
    assert out[kern.symbol].same_as(kern.prim_func)
