"""The projections on the CPU through oneDNN, with each weight packed once, at load, in oneDNN's own layout.

F.linear on the CPU repacks its weight for every call; at the row counts of a decode step that is much of the
time. Measured on a 2-core x86-64 VM (AVX-512, torch 2.13, float32), GFLOPS of F.linear against the packed weight:
64 rows [768 -> 4096] 105 vs 150, the 32,000-token head at 64 rows 69 vs 144, 200 rows 123 vs 168, 2,048 rows about
equal. The sums run in another order than F.linear's, so results differ from it in the last bits (float32: the
greedy parity tests stay token-exact with transformers).
"""
from __future__ import annotations

import torch
from torch import nn


def packs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the projections of a model on `device` in `dtype` are packed (the CPU, with oneDNN). bfloat16 only
    where oneDNN has a bfloat16 kernel for this CPU (AVX-512 BW/VL/DQ or AVX-NE-CONVERT): elsewhere its linear
    refuses to run, and the model keeps F.linear."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """nn.Linear with its weight in oneDNN's layout (an opaque tensor: only this module reads it)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # A buffer, so that what counts a model's weights (low_bit.weight_bytes) finds it.
        self.register_buffer("packed", weight.detach().to_mkldnn(), persistent=False)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch._C._nn.mkldnn_linear(rows.to_mkldnn(), self.packed, self.bias).to_dense()
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: nn.Module) -> None:
    """Every nn.Linear of `model` with a plain weight (low-bit ones keep theirs: engine/low_bit.py) replaced by its
    PackedLinear (the dense weight is freed), and a packed copy of a tied embedding as the head (`lm_head`: the
    embedding's lookup keeps the dense one)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and type(child.weight) in (torch.Tensor, nn.Parameter):
                setattr(module, child_name, PackedLinear(child.weight, child.bias))
    if getattr(model, "tie_word_embeddings", False):
        model.lm_head = PackedLinear(model.model.embed_tokens.weight, None)
