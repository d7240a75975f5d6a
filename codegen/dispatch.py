"""Measured dispatch: for each weight and M, time the kernels that can run it and keep the fastest.

Candidates for a weight `W[N, K]`: the dense packed kernel always; CSR and the 16-output
bitmap when W is at least `MIN_SPARSITY` sparse; N:M when W already is n:m; BSR with the
largest standard block whose zeros W's pattern respects. Each candidate is built for the
exact (M, N, K, pattern) and timed on the target in the cache regime the model will run in:
cold (a buffer larger than the last-level cache is read before every call) when the
model's weights do not fit in that cache, hot otherwise.

Every measurement and every decision is written to a `TuningDB` (JSON on disk), keyed by
target, kernel, shape, format, schedule and sparsity bucket, so a second compile of the
same model reuses the decisions and only rebuilds the chosen kernels.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import cpu_kernels
from .formats import UnfitError
from .target import target_has_features

MIN_SPARSITY = 0.3
NM_PATTERNS = ((2, 4), (1, 4), (4, 8), (2, 8), (1, 8))
BSR_BLOCKS = ((32, 32), (16, 16), (16, 1), (1, 16), (8, 8), (4, 4))


def default_db_path() -> Path:
    return Path(os.environ.get("SPARSEGRAPH_CACHE", Path.home() / ".cache" / "sparsegraph")) / "tuning.json"


class TuningDB:
    """Measurements and decisions on disk: `{key: record}` in one JSON file, written atomically."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_db_path()
        try:
            self.records: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.records = {}
        self.hits = 0

    def get(self, key: str) -> Any:
        value = self.records.get(key)
        if value is not None:
            self.hits += 1
        return value

    def put(self, key: str, value: Any) -> None:
        self.records[key] = value

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.records, indent=0, sort_keys=True))
        os.replace(tmp, self.path)


@dataclass
class Candidate:
    format: str
    params: dict[str, Any] = field(default_factory=dict)  # builder arguments besides w, M, target
    schedule: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in {**self.params, **(self.schedule or {})}.items())
        return f"{self.format}({extra})" if extra else self.format


@dataclass
class Decision:
    """The kernel chosen for one weight at one M, with every candidate's time."""

    format: str
    label: str
    seconds: float
    dense_seconds: float
    timings: dict[str, float]
    cold: bool
    from_db: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sparsity_bucket(w: np.ndarray) -> float:
    return round(float(1 - np.count_nonzero(w) / w.size) * 20) / 20


def candidates(w: np.ndarray, avx512: bool) -> list[Candidate]:
    """Kernels that can run `w[N, K]` (see the module docstring)."""
    n, k = w.shape
    found = [Candidate("dense")]
    nz = w != 0
    sparsity = 1 - nz.mean()
    if sparsity < MIN_SPARSITY:
        return found
    found.append(Candidate("csr"))
    if avx512 and n % 16 == 0:
        found.append(Candidate("bitmap"))
    for pn, pm in NM_PATTERNS:
        if k % pm == 0 and (nz.reshape(n, -1, pm).sum(axis=2) <= pn).all():
            found.append(Candidate("nm", {"n": pn, "m": pm}))
            break
    nnz = nz.sum()
    for r, c in BSR_BLOCKS:
        if n % r or k % c:
            continue
        blocks = nz.reshape(n // r, r, k // c, c).any(axis=(1, 3)).sum()
        if blocks * r * c <= 1.02 * nnz:
            found.append(Candidate("bsr", {"block": (r, c)}))
            break
    return found


def build(w: np.ndarray, cand: Candidate, m: int, target: Any) -> cpu_kernels.CPUKernel:
    builder = getattr(cpu_kernels, f"build_{cand.format}")
    if cand.format == "bsr":
        return builder(w, cand.params["block"], m, target, schedule=cand.schedule)
    if cand.format == "nm":
        return builder(w, cand.params["n"], cand.params["m"], m, target, schedule=cand.schedule)
    return builder(w, m, target, schedule=cand.schedule)


def llc_bytes() -> int:
    """Size of the largest CPU cache (from sysfs; 32 MiB if unknown)."""
    sizes = []
    for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = p.read_text().strip()
        scale = {"K": 2**10, "M": 2**20}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=32 * 2**20)


class Timer:
    """Median wall time of a kernel call, hot or with the last-level cache flushed first."""

    def __init__(self, repeat: int = 7):
        self.repeat = repeat
        self._flush: np.ndarray | None = None

    def __call__(self, kernel: cpu_kernels.CPUKernel, cold: bool) -> float:
        kernel.run()  # warm up (page faults, first-touch)
        times = []
        for _ in range(self.repeat):
            if cold:
                self._evict()
            start = time.perf_counter()
            kernel.run()
            times.append(time.perf_counter() - start)
        return float(statistics.median(times))

    def _evict(self) -> None:
        if self._flush is None:
            self._flush = np.ones(2 * llc_bytes() // 8, dtype=np.float64)
        self._flush += 1.0  # read and write every line of a buffer twice the LLC


class Dispatcher:
    """Chooses and builds kernels per (weight, M), with a tuning database and a kernel cache."""

    def __init__(self, target: Any, db: TuningDB, cold: bool, tune_trials: int = 2, force: str | None = None):
        self.target = target
        self.db = db
        self.cold = cold
        self.tune_trials = tune_trials  # schedules tried per format (from cpu_kernels.SCHEDULE_SPACE)
        self.force = force  # "dense" builds only dense kernels (the baseline a compile is checked against)
        self.timer = Timer()
        self.kernels: dict[tuple[str, int], cpu_kernels.CPUKernel] = {}
        self.decisions: dict[tuple[str, int], Decision] = {}
        self.avx512 = target_has_features(target)

    def kernel(self, name: str, w: np.ndarray, m: int) -> cpu_kernels.CPUKernel:
        """The kernel for weight `w` (op `name`) at M = m, choosing it on first request."""
        key = (name, m)
        if key not in self.kernels:
            if self.force == "dense":
                self.kernels[key] = build(w, Candidate("dense"), m, self.target)
            else:
                self.kernels[key], self.decisions[key] = self._choose(w, m)
            # TVMScript's parser keeps the builders' frames in a reference cycle (inspect.stack),
            # and with them each build's copy of W and the timed candidates: free them now
            gc.collect()
        return self.kernels[key]

    def _db_key(self, w: np.ndarray, m: int, what: str) -> str:
        n, k = w.shape
        pattern = hashlib.sha1(np.packbits(w != 0).tobytes()).hexdigest()[:16]
        return f"{_target_key(self.target)}|{what}|M{m}|N{n}|K{k}|s{sparsity_bucket(w)}|{pattern}|{self.cold}"

    def _choose(self, w: np.ndarray, m: int) -> tuple[cpu_kernels.CPUKernel, Decision]:
        db_key = self._db_key(w, m, "decision")
        stored = self.db.get(db_key)
        if stored is not None:
            cand = Candidate(stored["format"], _params(stored["params"]), stored["schedule"])
            decision = Decision(
                **{k: v for k, v in stored["decision"].items() if k != "from_db"}, from_db=True
            )
            return build(w, cand, m, self.target), decision
        timings: dict[str, float] = {}
        best: tuple[float, Candidate, cpu_kernels.CPUKernel] | None = None
        for cand in self._expand(candidates(w, self.avx512)):
            try:
                kernel = build(w, cand, m, self.target)
            except UnfitError:
                continue
            seconds = self.timer(kernel, self.cold)
            timings[cand.label] = seconds
            if best is None or seconds < best[0]:
                best = (seconds, cand, kernel)
        assert best is not None
        dense = min(v for k, v in timings.items() if k.startswith("dense"))
        decision = Decision(best[1].format, best[1].label, best[0], dense, timings, self.cold)
        self.db.put(
            db_key,
            {
                "format": best[1].format,
                "params": best[1].params,
                "schedule": best[1].schedule,
                "decision": decision.to_dict(),
            },
        )
        return best[2], decision

    def _expand(self, cands: list[Candidate]) -> list[Candidate]:
        space = getattr(cpu_kernels, "SCHEDULE_SPACE", {})
        out = []
        for c in cands:
            schedules = space.get(c.format, [None])[: max(1, self.tune_trials)]
            out += [Candidate(c.format, c.params, s) for s in schedules]
        return out


def _params(p: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in p.items()}


def _target_key(target: Any) -> str:
    return f"{target.kind.name}:{target.attrs.get('mcpu', '')}:{target.attrs.get('num-cores', '')}"
