"""Analysis passes (read-only), one module per analysis."""

from . import cost_model, roles, sparsifiable, weight_stats  # noqa: F401  (register the passes)
