"""Recipes: YAML lists of pass steps, shared by the CLI and the Python API.

Schema::

    steps:
      - pass: magnitude          # a registered pass name (`sparsegraph passes` lists them)
        sparsity: 0.5            # the pass's parameters as keys
        granularity: row
        targets: ["role:ffn.*"]  # optional selectors (see sparsegraph.selectors)
        ignore: ["layers:0"]

Top-level keys other than `steps` (besides `name` and `description`) are errors, as are
unknown passes and unknown or invalid parameters; messages name the file, the step and
the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError
from .pass_manager import Pass, get_pass

TOP_LEVEL_KEYS = {"steps", "name", "description"}


@dataclass
class Recipe:
    steps: list[Pass]
    source: str = "<recipe>"
    name: str = ""
    description: str = ""

    @classmethod
    def load(cls, recipe: str | os.PathLike | dict | list | Recipe) -> Recipe:
        """From a YAML file path, a YAML string, a dict with `steps`, or a list of steps."""
        if isinstance(recipe, Recipe):
            return recipe
        source = "<recipe>"
        if isinstance(recipe, os.PathLike) or (
            isinstance(recipe, str) and "\n" not in recipe and recipe.endswith((".yaml", ".yml"))
        ):
            path = Path(recipe)
            if not path.is_file():
                raise RecipeError(f"{path}: recipe file not found")
            source, text = str(path), path.read_text()
            recipe = _parse_yaml(text, source)
        elif isinstance(recipe, str):
            recipe = _parse_yaml(recipe, source)
        if isinstance(recipe, list):
            recipe = {"steps": recipe}
        if not isinstance(recipe, dict):
            raise RecipeError(f"{source}: a recipe is a mapping with a 'steps:' list")
        unknown = set(recipe) - TOP_LEVEL_KEYS
        if unknown:
            raise RecipeError(
                f"{source}: unknown top-level key {sorted(unknown)[0]!r} (allowed: steps, name, description)"
            )
        steps = recipe.get("steps")
        if not isinstance(steps, list) or not steps:
            raise RecipeError(f"{source}: 'steps:' must be a non-empty list")
        return cls(
            [_make_step(step, i, source) for i, step in enumerate(steps, 1)],
            source,
            str(recipe.get("name", "")),
            str(recipe.get("description", "")),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [{"pass": p.name, **p.config.model_dump(exclude_defaults=True)} for p in self.steps]}


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None


def _make_step(step: Any, index: int, source: str) -> Pass:
    where = f"{source}, step {index}"
    if not isinstance(step, dict) or "pass" not in step:
        raise RecipeError(f"{where}: each step is a mapping with a 'pass:' key")
    params = dict(step)
    name = params.pop("pass")
    try:
        cls = get_pass(str(name))
        return cls(**params)
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
