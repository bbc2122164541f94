"""Device and dtype selection, generic over cpu, cuda and xpu (Intel GPUs) through torch.accelerator."""
from __future__ import annotations

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16, "float": torch.float32}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` prefers an Intel GPU, then an NVIDIA GPU, then the CPU; `cuda:1`, `xpu:0` etc. name one card."""
    if name == "auto":
        for kind in ("xpu", "cuda"):
            backend = getattr(torch, kind, None)
            if backend is not None and backend.is_available():
                return torch.device(kind, 0)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device must be auto, cpu, cuda[:i] or xpu[:i], got {name!r}") from exc
    if device.type not in ("cpu", "cuda", "xpu"):
        raise ValueError(f"device must be auto, cpu, cuda[:i] or xpu[:i], got {name!r}")
    if device.type != "cpu":
        backend = getattr(torch, device.type)
        if not backend.is_available():
            raise ValueError(f"device {name!r} was asked for but torch sees no {device.type} device")
        if device.index is None:
            device = torch.device(device.type, 0)
        if device.index >= backend.device_count():
            raise ValueError(f"device {name!r} does not exist: torch sees {backend.device_count()} {device.type} devices")
    return device


def resolve_dtype(name: str, checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
    """`auto` takes the checkpoint's dtype on accelerators; on the CPU half precision is slow, so auto means float32."""
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {name!r}")
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return _DTYPES.get(str(checkpoint_dtype or "bfloat16").removeprefix("torch."), torch.bfloat16)


def free_device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of an accelerator; cuda and xpu both expose mem_get_info."""
    return getattr(torch, device.type).mem_get_info(device)


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)
