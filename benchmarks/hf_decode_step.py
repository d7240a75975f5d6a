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


def export_decode_step(
    model, args: tuple, path, dynamic_shapes=None, external_data: bool = False
) -> tuple[list[str], list[str]]:
    """torch.onnx (dynamo, opset 18) export of `FlatKVStep` (model) called with `args` =
    (input_ids, attention_mask, position_ids, *past) to `path`; returns the input names
    (those three, then ``past_key_values.{i}.key|value``) and the output names (``logits``,
    ``present.{i}.key|value``)."""
    import warnings

    names, outs = ["input_ids", "attention_mask", "position_ids"], ["logits"]
    for i in range(model.config.num_hidden_layers):
        for kv in ("key", "value"):
            names.append(f"past_key_values.{i}.{kv}")
            outs.append(f"present.{i}.{kv}")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            FlatKVStep(model).eval(),
            args,
            dynamo=True,
            opset_version=18,
            input_names=names,
            output_names=outs,
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    prog.save(str(path), external_data=external_data)
    return names, outs
