"""Attention backends behind one interface; the portable torch backend runs on every device."""
from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.attention.torch_backend import TorchAttentionBackend

__all__ = ["AttentionBackend", "AttentionMetadata", "select_backend"]


def select_backend(name: str, device: torch.device) -> AttentionBackend:
    """`auto` picks the fastest backend for the device; only the portable torch backend exists so far."""
    if name in ("auto", "torch"):
        return TorchAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}")
