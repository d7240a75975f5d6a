"""Analysis passes (read-only), one module per analysis."""

from . import cost_model, roles, sparsifiable, weight_stats  # noqa: F401  (register the passes)
from .attention import Attention  # noqa: F401  (attention sites, KV cache)
from .owl import Owl  # noqa: F401  (OWL per-layer sparsity plan)
from .sensitivity import Sensitivity  # noqa: F401  (per-op sensitivity and sparsity allocation)
