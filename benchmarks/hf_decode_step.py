"""A Hugging Face causal LM as one decode step with flat key/value tensors, for torch.onnx
export (benchmarks only: needs torch and transformers)."""

from __future__ import annotations

import torch
from transformers import DynamicCache


class FlatKVStep(torch.nn.Module):
    """``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)``: the past and
    present caches as flat tensors, layer by layer (key, value)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        n = self.model.config.num_hidden_layers
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(n)], config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        flat = []
        for layer in out.cache.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)
