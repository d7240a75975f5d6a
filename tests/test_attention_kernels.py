"""Block-sparse attention kernels vs numpy, and the compile rewrite vs onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from sparsegraph.codegen import attention_kernels as ak

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


def test_layout_from_bias_classifies_blocks():
    bias = _causal(128, 128)
    lay = ak.BlockLayout.from_bias(bias, 64)
    assert lay.kept == 3 and lay.partial == 2  # diagonal blocks partial, the lower one full
    np.testing.assert_array_equal(lay.ptr, [0, 1, 3])
    with pytest.raises(ValueError, match="drops every key"):
        ak.BlockLayout.from_bias(np.full((64, 64), MIN, np.float32), 32)
    with pytest.raises(ValueError, match="does not divide"):
        ak.BlockLayout.from_bias(np.zeros((96, 96), np.float32), 64)


def test_cuda_kernel_compiles_to_source():
    layout = ak.BlockLayout.from_bias(_causal(256, 256), 64)
    k = ak.build_attention(layout, 4, 2, 128, target=CUDA)
    src = k.executable.mod.imports[0].inspect_source()
    assert "__shfl_sync" in src and "uint4" in src and "__shared__" in src


def _has_cuda() -> bool:
    try:
        return tvm.cuda().exist
    except Exception:
        return False


@pytest.mark.skipif(not _has_cuda(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["causal", "random_blocks_gqa"])
def test_cuda_kernel_matches_numpy(name):
    nq, nk, L, _, _, _, _ = CASES[name]
    d = 64
    rng = np.random.default_rng(2)
    bias = _bias(name, L, nq, rng)
    layout = ak.BlockLayout.from_bias(bias, 64)
    k = ak.build_attention(layout, nq, nk, d, target=CUDA)
    q, kt, v = (a.astype(np.float16) for a in _qkv(nq, nk, L, L, d))
    np.testing.assert_allclose(
        k(q, kt, v).astype(np.float32), ak.reference(q, kt, v, bias, k.scale), atol=1e-2
    )
