"""Huge-page weight copies (`codegen/hugepages.py`): exact copies, alignment, huge pages granted
where the kernel allows them, and a fused kernel reading its weights from them vs numpy."""

import numpy as np
import pytest
import tvm

from sparsegraph.codegen import act_kernels as ak
from sparsegraph.codegen import hugepages as hp


@pytest.mark.parametrize(
    ("shape", "dtype"), [((768, 1024), np.float32), ((3, 5), np.int32), ((4096,), np.uint16)]
)
def test_hugepage_array_is_an_exact_aligned_copy(shape, dtype):
    src = (np.random.default_rng(0).standard_normal(shape) * 100).astype(dtype)
    a = hp.hugepage_array(src)
    assert a.shape == src.shape and a.dtype == src.dtype and np.array_equal(a, src)
    assert a.flags.c_contiguous and a.flags.writeable
    assert not np.shares_memory(a, src)
    align = hp.HUGE_PAGE if src.nbytes >= hp.MIN_BYTES else 64
    assert a.ctypes.data % align == 0


def test_hugepage_tensor_shares_the_copy_and_outlives_it():
    src = np.arange(3 << 20, dtype=np.float32).reshape(3072, 1024)  # 12 MB
    t = hp.hugepage_tensor(src)
    view = np.from_dlpack(t)
    view[0, 0] = -1.0  # the tensor is the huge-page copy, not a further copy
    assert t.numpy()[0, 0] == -1.0
    del view
    assert np.array_equal(t.numpy()[1:], src[1:])  # the mapping lives as long as the tensor


@pytest.mark.skipif(
    hp.thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off on this machine"
)
def test_huge_pages_are_granted():
    src = np.ones((4096, 1024), np.float32)  # 16 MB
    before = hp.anon_hugepage_bytes()
    a = hp.hugepage_array(src)
    assert hp.anon_hugepage_bytes() - before >= 8 << 20  # most of the 16 MB on 2 MB pages
    assert a.sum() == src.size


def test_fused_kernel_on_hugepage_weights_matches_numpy():
    rng = np.random.default_rng(1)
    k, n = 512, 1536  # 3 MB of W: a huge-page mapping
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((1, k)).astype(np.float32)
    t = float(np.quantile(np.abs(x), 0.7))
    kern = ak.build_act_dense(w, t, 1)
    args = [tvm.runtime.tensor(x), *(hp.hugepage_tensor(a) for a in kern.weights.values())]
    y = tvm.runtime.empty((1, n), "float32")
    kern.executable[kern.symbol](*args, y)
    ref = ak.reference(x, t, w)
    assert np.abs(y.numpy() - ref).max() <= 1e-5 * np.abs(ref).max() * np.sqrt(k)
