"""The element-wise work of a decoder layer as one kernel per op: RMSNorm (with the residual add before it), rotary
embedding of q and k, and SiLU(gate) * up; and the projections of a single token (a decode step at batch 1).

Why: a decode step is bound by the number of kernels, not by arithmetic. In plain torch these ops are ~30 small
kernels per layer (RMSNorm alone is a cast, pow, mean, add, rsqrt, mul, cast and mul); each still costs a few
microseconds of GPU time inside a replayed CUDA graph.

A single token's projections are matrix-vector products, bound by reading the weight once: cuBLAS reaches 71-92%
of the copy rate on the 7B shapes (H100), the Triton GEMV 88-100%, and it takes SiLU-and-mul into the down
projection's input (one kernel less per layer).

Each op has two implementations:
- torch (`*_torch`): exactly the maths of transformers' Llama, so CPU outputs stay bit-identical to it; used for
  tensors on the CPU and where the triton package does not import.
- Triton (engine/fused_kernels.py): used for tensors on a GPU (cuda or xpu). Same maths, float32 inside, rounded to
  the input dtype once at the end, so half-precision results differ from torch's in the last bits.

Callers must use the returned tensors: the Triton versions write into some inputs (see each function), the torch
versions leave all inputs as they were.
"""
from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Llama's RMSNorm of x [tokens, hidden]: weight * (x / rms(x)), normalised in float32.

    With a residual [tokens, hidden], first adds it: s = x + residual, rounded to x's dtype (the residual stream is
    stored in the model dtype), and returns (rms_norm(s), s). The Triton version writes s into `residual`."""
    kernels = _triton_for(x)
    if kernels is not None:
        return kernels.rms_norm_triton(x, weight, eps, residual)
    return rms_norm_torch(x, weight, eps, residual)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding (Llama's rotate-half convention) of q [tokens, heads, head_dim] and k [tokens, kv_heads,
    head_dim]; cos, sin [tokens, 1, head_dim] as RotaryEmbedding.cos_sin returns them. q and k may be views with a
    contiguous last dim (slices of the fused qkv output). The Triton version rotates q and k in place."""
    kernels = _triton_for(q)
    if kernels is not None:
        return kernels.apply_rotary_triton(q, k, cos, sin)
    return apply_rotary_torch(q, k, cos, sin)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [tokens, 2 * inter] (gate, then up: the fused gate_up_proj output) -> silu(gate) * up [tokens, inter]."""
    kernels = _triton_for(gate_up)
    if kernels is not None:
        return kernels.silu_and_mul_triton(gate_up)
    return silu_and_mul_torch(gate_up)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); a single row on a GPU runs as the Triton GEMV."""
    kernels = _gemv_kernels_for(x, weight)
    if kernels is not None:
        return kernels.gemv_triton(x, weight, bias)
    return F.linear(x, weight, bias)


def project(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """layer(x) for an nn.Linear or a low-bit replacement of one (engine/low_bit.py): nn.Linear takes `linear`
    (which leaves quantized weight tensors to F.linear's dispatch), every other module its own forward."""
    if type(layer) is nn.Linear:
        return linear(x, layer.weight, layer.bias)
    return layer(x)


def silu_and_mul_project(gate_up: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """project(silu_and_mul(gate_up), layer); for a single row on a GPU, one kernel."""
    kernels = _gemv_kernels_for(gate_up, layer.weight) if type(layer) is nn.Linear else None
    if kernels is not None:
        return kernels.gemv_triton(gate_up, layer.weight, layer.bias, silu_mul=True)
    return project(silu_and_mul(gate_up), layer)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        summed = x + residual
        return rms_norm_torch(summed, weight, eps), summed
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def apply_rotary_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _triton_for(x: torch.Tensor) -> ModuleType | None:
    """The Triton kernels module when x lives on a GPU and triton imports, else None (use torch)."""
    if x.device.type not in ("cuda", "xpu"):
        return None
    return _triton_kernels()


def _gemv_kernels_for(x: torch.Tensor, weight: torch.Tensor) -> ModuleType | None:
    """The Triton kernels module when x is one contiguous row on a GPU and weight a plain floating-point tensor of
    its dtype (not a quantized tensor subclass, not int8) with contiguous rows, else None."""
    if (x.dim() != 2 or x.shape[0] != 1 or x.stride(1) != 1 or type(weight) not in (torch.Tensor, nn.Parameter)
            or weight.dtype not in (torch.float16, torch.bfloat16, torch.float32) or weight.dtype != x.dtype
            or weight.stride(1) != 1):
        return None
    return _triton_for(x)


@functools.cache
def _triton_kernels() -> ModuleType | None:
    # Imported on first use so the engine runs without the triton package, and CPU-only runs never load it.
    try:
        from engine import fused_kernels
    except ImportError:
        return None
    return fused_kernels
