"""Op selectors: which weighted ops a pass touches.

A selector is one or more terms joined by `&` (all must hold); a list of selectors is a
union. Terms:

- `op:MatMul`       op type (glob allowed: `op:*Conv*`)
- `role:ffn.*`      transformer role from the `roles` analysis (glob; `attn.q` also
                    matches a fused `attn.qkv` projection)
- `name:<glob>`     glob on the node name or its weight's initializer name
- `re:<regex>`      regular expression searched in the node name or weight name
- `layers:0-3`      layer indices: `3`, `0-3`, `0,2,5-7`

Default targets (no `targets:` given) are every linear op (MatMul/Gemm/Conv) except the
`lm_head`, other output `head`s and embeddings.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .errors import RecipeError

KINDS = ("op", "role", "name", "re", "layers")
ROLES = (
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.o",
    "attn.qkv",
    "attn.qk",
    "attn.kv",
    "ffn.up",
    "ffn.gate",
    "ffn.down",
    "lm_head",
    "head",
    "embed",
)
DEFAULT_EXCLUDED_ROLES = ("lm_head", "head", "embed")


@dataclass(frozen=True)
class Selector:
    text: str
    terms: tuple[tuple[str, Any], ...]

    def matches(self, op, role) -> bool:
        """`op` is a WeightedOp, `role` its OpRole or None."""
        return all(_term_matches(kind, value, op, role) for kind, value in self.terms)

    def __str__(self) -> str:
        return self.text


def parse_selector(text: str) -> Selector:
    """Parse `kind:value [& kind:value ...]`; raises ValueError with the reason."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty selector {text!r}")
    terms = []
    for part in text.split("&"):
        part = part.strip()
        kind, sep, value = part.partition(":")
        if not sep or kind not in KINDS:
            raise ValueError(f"bad selector {part!r}: expected one of {', '.join(k + ':...' for k in KINDS)}")
        if not value:
            raise ValueError(f"selector {part!r} has an empty value")
        terms.append((kind, _parse_value(kind, value, part)))
    return Selector(text, tuple(terms))


def _parse_value(kind: str, value: str, part: str) -> Any:
    if kind == "re":
        try:
            return re.compile(value)
        except re.error as exc:
            raise ValueError(f"selector {part!r}: bad regular expression ({exc})") from None
    if kind == "role":
        if not any(fnmatch.fnmatchcase(r, value) for r in ROLES):
            raise ValueError(f"selector {part!r}: matches no known role ({', '.join(ROLES)})")
        return value
    if kind == "layers":
        layers: set[int] = set()
        for chunk in value.split(","):
            lo, dash, hi = chunk.strip().partition("-")
            try:
                a, b = int(lo), int(hi) if dash else int(lo)
            except ValueError:
                raise ValueError(f"selector {part!r}: layers must look like 3, 0-3 or 0,2,5-7") from None
            if a < 0 or b < a:
                raise ValueError(f"selector {part!r}: empty or negative layer range {chunk!r}")
            layers.update(range(a, b + 1))
        return frozenset(layers)
    return value


def _term_matches(kind: str, value: Any, op, role) -> bool:
    if kind == "op":
        return fnmatch.fnmatchcase(op.op_type, value)
    if kind == "name":
        return fnmatch.fnmatchcase(op.name, value) or fnmatch.fnmatchcase(op.weight.name, value)
    if kind == "re":
        return bool(value.search(op.name) or value.search(op.weight.name))
    if kind == "role":
        return role is not None and role.matches(lambda r: fnmatch.fnmatchcase(r, value))
    if kind == "layers":
        return role is not None and role.layer in value
    raise AssertionError(kind)


def parse_selectors(texts: Iterable[str] | None) -> list[Selector] | None:
    return None if texts is None else [parse_selector(t) for t in texts]


def select(ops, roles, targets: list[str] | None, ignore: list[str], where: str) -> list:
    """The weighted ops picked by `targets` minus `ignore`, in graph order.

    `ops` is the `sparsifiable` finding, `roles` the `roles` finding; `where` names the
    pass and model for messages. A selector that matches no op is a `RecipeError`.
    """
    role_of = roles.get
    all_ops = list(ops)
    if targets is None:
        chosen = [
            op
            for op in all_ops
            if op.is_linear
            and (role_of(op.name) is None or role_of(op.name).role not in DEFAULT_EXCLUDED_ROLES)
        ]
    else:
        chosen = [
            op
            for op in all_ops
            if any(s.matches(op, role_of(op.name)) for s in _checked(targets, all_ops, role_of, where))
        ]
    drop = _checked(ignore, all_ops, role_of, where, what="ignore selector")
    return [op for op in chosen if not any(s.matches(op, role_of(op.name)) for s in drop)]


def _checked(texts, all_ops, role_of, where: str, what: str = "selector") -> list[Selector]:
    selectors = [parse_selector(t) if isinstance(t, str) else t for t in texts]
    for s in selectors:
        if not any(s.matches(op, role_of(op.name)) for op in all_ops):
            raise RecipeError(f"{where}: {what} {s.text!r} matched no op")
    return selectors
