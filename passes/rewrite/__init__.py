"""Rewrite passes (mutate the model), one module per technique."""

from . import block, lowrank, magnitude, nm, sparsegpt, topk, wanda  # noqa: F401  (register the passes)
from .asvd import ASVD  # noqa: F401  (activation-aware SVD)
from .structured import PruneHeads, PruneLayers, PruneNeurons  # noqa: F401  (structured pruning)
from . import sparse_attention  # noqa: F401  (attention masks: window, strided, block, dynamic block)
