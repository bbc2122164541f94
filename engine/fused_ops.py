"""The element-wise work of a decoder layer as one kernel per op: RMSNorm (with the residual add before it), rotary
embedding of q and k, and SiLU(gate) * up.

Why: a decode step is bound by the number of kernels, not by arithmetic. In plain torch these ops are ~30 small
kernels per layer (RMSNorm alone is a cast, pow, mean, add, rsqrt, mul, cast and mul); each still costs a few
microseconds of GPU time inside a replayed CUDA graph.

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


@functools.cache
def _triton_kernels() -> ModuleType | None:
    # Imported on first use so the engine runs without the triton package, and CPU-only runs never load it.
    try:
        from engine import fused_kernels
    except ImportError:
        return None
    return fused_kernels
