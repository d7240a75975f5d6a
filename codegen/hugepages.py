"""Weights on transparent huge pages (2 MB) for the CPU kernels.

TVM's CPU allocator (``tvm.runtime.tensor`` / ``empty``) does not ask for huge pages, so where
the kernel only grants them on request (THP mode ``madvise``, the common default) a weight
sits on 4 KB pages: a kernel that reads scattered segments of it (the activation-sparse
kernels read 1-2 KB of each active channel's row) touches a new page, a TLB miss, per
segment. `hugepage_array` copies an array into a private anonymous mapping advised with
``MADV_HUGEPAGE`` before its first touch, 2 MB aligned; `hugepage_tensor` wraps that as a
tvm tensor without a copy (DLPack; the tensor keeps the mapping alive).

Measured (`benchmarks/act_kernels.py` and interleaved runs of the same kernels, W 4096x11008
and 11008x4096 fp32, M = 1, cold, 2 threads, Zen 5 guest of a KVM host): 1-3 % for our dense
kernel, 0-4 % for the default ("rows", 1 KB segments) fused kernel, 2-17 % for the "strips"
layout: a modest gain (the guest's huge pages may be 4 KB pages on the host). Where huge
pages cannot be had (no ``madvise`` in `mmap`, THP off) the memory is an ordinary aligned
mapping and everything still works.
"""

from __future__ import annotations

import mmap
import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["HUGE_PAGE", "anon_hugepage_bytes", "hugepage_array", "hugepage_tensor", "thp_mode"]

HUGE_PAGE = 2 << 20
#: arrays below this stay on ordinary pages (a mapping wastes up to 2 MB of address space)
MIN_BYTES = HUGE_PAGE


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode (``always``, ``madvise``, ``never``), or
    ``unknown`` where the setting cannot be read (not Linux)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else "unknown"


def anon_hugepage_bytes() -> int:
    """Bytes of this process's anonymous memory on huge pages (``AnonHugePages`` of
    ``/proc/self/smaps_rollup``; 0 where it cannot be read)."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return 0
    m = re.search(r"AnonHugePages:\s+(\d+)\s+kB", text)
    return int(m.group(1)) * 1024 if m else 0


def _mapping(nbytes: int) -> np.ndarray:
    """``nbytes`` of zero-filled, 2 MB aligned memory (uint8) in a private anonymous mapping
    advised MADV_HUGEPAGE before any page is touched."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=flags) if flags else mmap.mmap(-1, nbytes + HUGE_PAGE)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            m.madvise(advice)
        except OSError:  # e.g. a kernel built without THP: ordinary pages
            pass
    base = np.frombuffer(m, np.uint8)  # keeps `m` alive; unmapped when the last view goes
    off = -base.ctypes.data % HUGE_PAGE
    return base[off : off + nbytes]


def hugepage_array(a: Any) -> np.ndarray:
    """A C-contiguous, writable copy of `a` on huge pages (2 MB aligned); arrays under
    `MIN_BYTES` (or empty) as an ordinary 64-byte-aligned copy."""
    src = np.asarray(a)
    if src.nbytes < MIN_BYTES:
        out = np.empty(src.nbytes + 64, np.uint8)
        off = -out.ctypes.data % 64
        view = out[off : off + src.nbytes].view(src.dtype).reshape(src.shape)
    else:
        view = _mapping(src.nbytes).view(src.dtype).reshape(src.shape)
    view[...] = src
    return view


def hugepage_tensor(a: Any, device: Any = None) -> Any:
    """`a` as a CPU tvm tensor on huge pages (`hugepage_array`, wrapped without a copy).
    `device` other than the CPU: an ordinary ``tvm.runtime.tensor`` copy there."""
    import tvm

    from sparsegraph.codegen.cpu_kernels import as_tvm

    if device is not None and device.dlpack_device_type() != 1:
        return tvm.runtime.tensor(np.ascontiguousarray(a), device)
    return as_tvm(hugepage_array(a))  # aligned and writable: the same memory (DLPack)
