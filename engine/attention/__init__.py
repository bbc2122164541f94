"""Attention backends behind one interface: the portable torch backend (every device) and Triton kernels (GPUs)."""
from __future__ import annotations

import os

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.attention.torch_backend import TorchAttentionBackend

__all__ = ["AttentionBackend", "AttentionMetadata", "select_backend"]


def select_backend(name: str, device: torch.device) -> AttentionBackend:
    """`torch`: portable; `triton`: Triton kernels (CUDA or Intel XPU, or the CPU under TRITON_INTERPRET=1);
    `auto`: triton on an accelerator where the triton package imports, else torch."""
    if name == "torch":
        return TorchAttentionBackend(device)
    if name == "triton":
        return _triton_backend(device)
    if name == "auto":
        if device.type in ("cuda", "xpu"):
            try:
                return _triton_backend(device)
            except ValueError:
                pass
        return TorchAttentionBackend(device)
    raise ValueError(f"unknown attention backend {name!r}")


def _triton_backend(device: torch.device) -> AttentionBackend:
    # Triton has no CPU code generator; its interpreter runs the kernels on the CPU (slowly, for tests).
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton attention backend needs a cuda or xpu device (or TRITON_INTERPRET=1 on the CPU)")
    try:
        # Imported here so the engine runs without the triton package.
        from engine.attention.triton_backend import TritonAttentionBackend
    except ImportError as exc:
        raise ValueError(f"the triton attention backend needs the triton package: {exc}") from exc
    return TritonAttentionBackend()
