"""Rewrite passes (mutate the model), one module per technique."""

from . import block, lowrank, magnitude, nm, topk  # noqa: F401  (register the passes)
