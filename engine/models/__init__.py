"""Model registry: the `architectures` name in a checkpoint's config.json -> our model class.

Adding a model: write engine/models/<name>.py with a class taking the HF config (parameter names equal to the
checkpoint's tensor names; forward(input_ids, positions, kv_caches, meta, backend) and compute_logits(hidden)),
then add one line below.
"""
from __future__ import annotations

from torch import nn

from engine.models.llama import LlamaForCausalLM, Qwen2ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


def model_class(architectures: list[str] | None) -> type[nn.Module]:
    for name in architectures or []:
        if name in MODEL_REGISTRY:
            return MODEL_REGISTRY[name]
    raise ValueError(f"unknown architecture {architectures!r} in config.json; supported: {', '.join(MODEL_REGISTRY)}")
