"""Rewrite passes (mutate the model), one module per technique."""

from . import activation_sparsity  # noqa: F401  (TEAL / CATS / CHESS / top-K)
from . import block, lowrank, magnitude, nm, sparsegpt, topk, wanda  # noqa: F401  (register the passes)
from .asvd import ASVD  # noqa: F401  (activation-aware SVD)
from .structured import PruneHeads, PruneLayers, PruneNeurons  # noqa: F401  (structured pruning)
from . import kv_cache, sparse_attention, topk_attention  # noqa: F401  (attention masks, decode top-k, bounded KV cache)
