"""Rewrite passes (mutate the model), one module per technique."""

from . import (  # noqa: F401  (importing a module registers its passes)
    activation_sparsity,
    block,
    kv_cache,
    lowrank,
    magnitude,
    nm,
    sparse_attention,
    sparsegpt,
    topk,
    topk_attention,
    wanda,
)
from .asvd import ASVD  # noqa: F401  (activation-aware SVD)
from .structured import PruneHeads, PruneLayers, PruneNeurons  # noqa: F401  (structured pruning)
