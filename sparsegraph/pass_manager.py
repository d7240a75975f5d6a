"""Pass infrastructure: passes, their results, the analysis cache, the registry, the manager.

Two kinds of pass (the LLVM/MLIR analysis-manager idea, as in onnx-ir and tvm.transform):

- `AnalysisPass.analyze(model, ctx) -> finding` never mutates the model. Its typed finding
  is cached in `PassContext` and computed at most once until the model changes.
- `RewritePass.run(model, ctx) -> PassResult(modified, changes)` mutates the model in
  place; it names the analyses it needs in `requires`, and the manager drops every
  cached finding after a rewrite that reports `modified=True`.

Each pass has a pydantic `Config` with `extra="forbid"`, so an unknown or mistyped
parameter is a `RecipeError` naming the pass and the key. `precondition` and
`postcondition` hooks check a pass's contract; a failure is a `PassError`.
Randomness comes only from `ctx.rng(name)`, seeded from the manager's seed.
"""

from __future__ import annotations

import abc
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pydantic

from .errors import PassError, RecipeError
from .model import Model


class PassConfig(pydantic.BaseModel):
    """Base of every pass's parameters: strict keys, immutable."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


@dataclass
class Change:
    """One thing a rewrite did to one op (`detail` is JSON-serialisable)."""

    op: str
    action: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassResult:
    modified: bool
    changes: list[Change] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class PassContext:
    """State shared by the passes of one run: seed, cached findings, per-pass results."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.findings: dict[type, Any] = {}
        self.computed: dict[str, int] = {}  # analysis name -> times computed (for inspection)
        self.history: list[tuple[str, PassResult, float]] = []
        self.extras: dict[str, Any] = {}  # inputs such as calibration feeds

    def rng(self, name: str) -> np.random.Generator:
        """A generator determined by the run's seed and `name` only."""
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def get(self, analysis: type[AnalysisPass], model: Model) -> Any:
        """The finding of `analysis` for the current model, computed once."""
        if analysis not in self.findings:
            instance = analysis()
            instance.precondition(model, self)
            self.store(analysis, instance.analyze(model, self))
        return self.findings[analysis]

    def store(self, analysis: type[AnalysisPass], finding: Any) -> None:
        self.findings[analysis] = finding
        self.computed[analysis.name] = self.computed.get(analysis.name, 0) + 1

    def invalidate(self, preserved: Iterable[type] = ()) -> None:
        keep = set(preserved)
        self.findings = {k: v for k, v in self.findings.items() if k in keep}


class Pass(abc.ABC):
    """A named, configured transformation or analysis of a `Model`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[PassConfig]] = PassConfig
    requires: ClassVar[tuple[type[AnalysisPass], ...]] = ()

    def __init__(self, config: PassConfig | None = None, **params: Any):
        self.config = config if config is not None else make_config(self.Config, params, self.name)

    def precondition(self, model: Model, ctx: PassContext) -> None:  # noqa: B027 (optional hook)
        """Raise `PassError` if the model is not one this pass can run on."""

    def postcondition(self, model: Model, ctx: PassContext, result: PassResult) -> None:  # noqa: B027
        """Raise `PassError` if the pass broke its contract."""

    @abc.abstractmethod
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        """Apply the pass (rewrites mutate `model`); say what changed."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config.model_dump().items())
        return f"{type(self).__name__}({params})"


class AnalysisPass(Pass):
    """Read-only; stores its finding in the context."""

    @abc.abstractmethod
    def analyze(self, model: Model, ctx: PassContext) -> Any:
        """The finding for `model` (never mutates it)."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        """Run as a recipe step: (re)compute the finding with this pass's own config."""
        ctx.store(type(self), self.analyze(model, ctx))
        return PassResult(modified=False)


class RewritePass(Pass):
    """Mutates the model in place."""


# --------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    """All registered passes by name (importing the built-in pass packages first)."""
    import sparsegraph.passes.analysis
    import sparsegraph.passes.rewrite  # noqa: F401

    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    passes = registry()
    if name not in passes:
        raise RecipeError(f"unknown pass {name!r} (known passes: {', '.join(passes)})")
    return passes[name]


def make_config(config_cls: type[PassConfig], params: dict[str, Any], pass_name: str) -> PassConfig:
    """Validate `params` against `config_cls`; errors name the pass and the key."""
    try:
        return config_cls.model_validate(params)
    except pydantic.ValidationError as exc:
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")  # typos first
        err = errors[0]
        key = ".".join(str(p) for p in err["loc"]) or "<params>"
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(config_cls.model_fields)
            raise RecipeError(f"pass {pass_name!r}: unknown key {key!r} (allowed: {allowed})") from None
        if err["type"] == "missing":
            raise RecipeError(f"pass {pass_name!r}: missing required key {key!r}") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise RecipeError(f"pass {pass_name!r}: {key}: {msg} (got {err.get('input')!r})") from None


# ---------------------------------------------------------------------- manager
class PassManager:
    """Runs passes in order, computing required analyses once and invalidating after rewrites."""

    def __init__(self, passes: Iterable[Pass], seed: int = 0, progress: Any = None):
        self.passes = list(passes)
        self.seed = seed
        self.progress = progress  # optional callable(pass_index, pass) for UIs

    def run(self, model: Model, ctx: PassContext | None = None) -> PassContext:
        ctx = ctx or PassContext(self.seed)
        model.ensure_node_names()
        for i, p in enumerate(self.passes):
            if self.progress:
                self.progress(i, p)
            start = time.perf_counter()
            for analysis in p.requires:
                ctx.get(analysis, model)
            p.precondition(model, ctx)
            result = p.run(model, ctx)
            if result.modified:
                model.graph.cleanup().toposort()
                ctx.invalidate()
            p.postcondition(model, ctx, result)
            ctx.history.append((p.name, result, time.perf_counter() - start))
        return ctx


def check(condition: bool, pass_name: str, message: str) -> None:
    """Raise `PassError` for a broken pass contract."""
    if not condition:
        raise PassError(f"pass {pass_name!r}: {message}")
