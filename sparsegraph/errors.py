"""Errors the toolkit raises on purpose.

Every error a user can cause carries a one-line message naming the file, op or key at
fault and the reason. The CLI prints it without a traceback; `exit_code` is what the
process returns (2 for usage errors, as is the convention for command-line tools).
"""

from __future__ import annotations


class SparsegraphError(Exception):
    """Base class; `exit_code` is the CLI's exit status for this error."""

    exit_code = 1


class UsageError(SparsegraphError):
    """The user asked for something that cannot be done as asked (bad file, recipe, value)."""

    exit_code = 2


class ModelLoadError(UsageError):
    """A model file is missing, not ONNX, truncated, or its external data cannot be found."""


class RecipeError(UsageError):
    """A recipe is malformed: unknown pass, unknown key, bad value, or a selector matching nothing."""


class UnsupportedOpError(UsageError):
    """A pass was pointed at an op it cannot rewrite."""


class PassError(SparsegraphError):
    """A pass broke its own contract (a pre- or post-condition failed)."""


class ValidationError(SparsegraphError):
    """A rewritten model failed onnx.checker or could not be run by onnxruntime."""
