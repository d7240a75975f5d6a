"""The LLVM host target for the CPU kernels, and a small wall-clock timing helper.

TVM 0.27 rejects target strings and silently turns ``"mcpu": "native"`` into ``generic``
(SSE-only code), so `host_target` passes the real CPU name that LLVM reports for this host
(``tvm.target.codegen.llvm_get_system_cpu()``, e.g. ``znver5``). If the kernel's CPU flags
say the host cannot run AVX-512 code (a VM that masks it, an LLVM CPU name the host does not
fully implement), the target falls back to an AVX2-safe ``x86-64-v3`` (or ``x86-64-v2`` /
``x86-64`` on older hosts), so generated code never uses instructions the host lacks.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

__all__ = [
    "cpu_flags",
    "has_avx512",
    "host_target",
    "select_mcpu",
    "target_has_features",
    "time_function",
]

# What the kernels call "AVX-512": the F/BW/DQ/VL subset every AVX-512 x86 since Skylake-X has.
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl")
_AVX2_FLAGS = ("avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The host CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags") or line.startswith("Features"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def has_avx512() -> bool:
    """True when the host CPU flags list every AVX-512 subset the kernels use."""
    flags = cpu_flags()
    return all(f in flags for f in AVX512_FLAGS)


def select_mcpu(cpu: str, flags: frozenset[str] | set[str], cpu_implies_avx512: bool) -> str:
    """The mcpu to compile for, given LLVM's host CPU name and the host's CPU flags.

    Keeps `cpu` unless it implies AVX-512 (``cpu_implies_avx512``) while `flags` lack one of
    `AVX512_FLAGS`, or it is ``generic``; then picks the best generic x86-64 level the flags
    allow (``x86-64-v3`` = AVX2/FMA, ``x86-64-v2``, ``x86-64``). Empty `flags` (flags
    unknown) trust `cpu`.
    """
    if not flags:
        return cpu
    avx512 = all(f in flags for f in AVX512_FLAGS)
    if (cpu_implies_avx512 and not avx512) or cpu in ("generic", ""):
        if all(f in flags for f in _AVX2_FLAGS):
            return "x86-64-v3"
        if "sse4_2" in flags and "popcnt" in flags:
            return "x86-64-v2"
        return "x86-64"
    return cpu


@lru_cache(maxsize=1)
def _host_mcpu() -> str:
    import tvm.target.codegen as cg
    from tvm.target import Target

    cpu = str(cg.llvm_get_system_cpu())
    if not _is_x86():
        return cpu
    implies = bool(cg.llvm_cpu_has_features("avx512f", Target({"kind": "llvm", "mcpu": cpu})))
    return select_mcpu(cpu, cpu_flags(), implies)


def host_target(num_cores: int | None = None):
    """``tvm.target.Target`` for this host: llvm, the real ``mcpu``, ``num-cores``.

    ``num_cores`` defaults to ``os.cpu_count()``. The mcpu is LLVM's name for the host CPU
    (``llvm_get_system_cpu()``), unless the CPU flags show the host lacks AVX-512 that
    name implies, in which case an AVX2-safe ``x86-64-v3`` is used (see the module doc).
    """
    from tvm.target import Target

    cores = int(num_cores) if num_cores is not None else (os.cpu_count() or 1)
    if cores < 1:
        raise ValueError(f"num_cores must be >= 1; got {num_cores}")
    return Target({"kind": "llvm", "mcpu": _host_mcpu(), "num-cores": cores})


def target_has_features(target: Any, features: Sequence[str] = AVX512_FLAGS) -> bool:
    """True when an llvm `target` (a Target or None = host) enables all LLVM `features`."""
    import tvm.target.codegen as cg

    if target is None:
        target = host_target()
    if str(target.kind.name) != "llvm":
        return False
    return all(bool(cg.llvm_cpu_has_features(f, target)) for f in features)


def time_function(
    fn: Callable[..., Any],
    args: Sequence[Any] = (),
    repeat: int = 5,
    number: int = 10,
    warmup: int = 1,
) -> float:
    """Median over `repeat` runs of the mean wall-clock seconds of one ``fn(*args)`` call.

    Each run times `number` back-to-back calls with ``time.perf_counter``; `warmup` calls
    are made first and not timed. Back-to-back calls keep small weights cache-resident, so
    this is a hot-cache number.
    """
    if repeat < 1 or number < 1:
        raise ValueError(f"repeat and number must be >= 1; got {repeat}, {number}")
    args = tuple(args)
    for _ in range(max(0, warmup)):
        fn(*args)
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn(*args)
        runs.append((time.perf_counter() - t0) / number)
    return float(statistics.median(runs))
