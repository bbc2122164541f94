"""Rotary position embedding with the scaling variants of Llama 2 and 3 (linear, llama3, yarn): the frequencies and
their cos/sin per position; the attention backend rotates q and k with them (engine/fused_ops.apply_rotary, or on a
GPU the kernel that writes the KV cache)."""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# Variants whose frequencies do not depend on the sequence length at run time.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_parameters(config) -> dict:
    """transformers 5 normalises rope settings into config.rope_parameters; 4.x kept rope_theta + rope_scaling."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return params


class RotaryEmbedding(nn.Module):
    def __init__(self, config, head_dim: int) -> None:
        super().__init__()
        params = rope_parameters(config)
        rope_type = params.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if rope_type == "default":
            # Explicitly on the CPU: models are built on the meta device, but these frequencies must be real.
            exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim
            inv_freq = 1.0 / (params["rope_theta"] ** exponents)
            self.attention_scaling = 1.0
        else:
            # The library's own frequency formulas: they are the definition checkpoints were trained with.
            with torch.device("cpu"):
                inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [num_tokens] -> cos, sin [num_tokens, 1, head_dim], in float32 then cast, as the reference does.
        Once per forward pass, shared by all layers. The second half of head_dim repeats the first (the rotary
        kernel reads only the first)."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos[:, None, :], sin[:, None, :]
