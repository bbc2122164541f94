"""Pin a worker process to one GPU before torch initialises any device (no torch import here)."""
from __future__ import annotations

import os


def pin_device(device: str) -> str:
    """Restrict the process to the named card and return the device name to use inside it.

    `xpu:2` sets ZE_AFFINITY_MASK=2 (Intel Level Zero) and `cuda:2` sets CUDA_VISIBLE_DEVICES=2; the card is then
    device 0 of the process. Other names (auto, cpu, a bare xpu/cuda) are returned unchanged.
    """
    kind, _, index = device.partition(":")
    if kind not in ("xpu", "cuda") or not index:
        return device
    if not index.isdigit():
        raise ValueError(f"device index must be a number, got {device!r}")
    os.environ["ZE_AFFINITY_MASK" if kind == "xpu" else "CUDA_VISIBLE_DEVICES"] = index
    return f"{kind}:0"
