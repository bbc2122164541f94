"""Device and dtype selection, generic over cpu, cuda and xpu (Intel GPUs) through torch.accelerator."""
from __future__ import annotations

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16, "float": torch.float32}


def _accelerator_type() -> str | None:
    """The build's accelerator (a torch build has at most one: xpu or cuda) if a device of it is present."""
    if not torch.accelerator.is_available():
        return None
    return torch.accelerator.current_accelerator().type


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` takes the accelerator torch sees (an Intel or NVIDIA GPU), else the CPU; `cuda:1`, `xpu:0` name one."""
    accelerator = _accelerator_type()
    if name == "auto":
        return torch.device(accelerator, 0) if accelerator else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device must be auto, cpu, cuda[:i] or xpu[:i], got {name!r}") from exc
    if device.type not in ("cpu", "cuda", "xpu"):
        raise ValueError(f"device must be auto, cpu, cuda[:i] or xpu[:i], got {name!r}")
    if device.type == "cpu":
        return device
    if device.type != accelerator:
        raise ValueError(f"device {name!r} was asked for but torch sees no {device.type} device")
    index = device.index or 0
    if index >= torch.accelerator.device_count():
        raise ValueError(f"device {name!r} does not exist: torch sees {torch.accelerator.device_count()} "
                         f"{device.type} devices")
    return torch.device(device.type, index)


def resolve_dtype(name: str, checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
    """`auto` takes the checkpoint's dtype on accelerators; on the CPU half precision is slow, so auto means float32."""
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {name!r}")
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return _DTYPES.get(str(checkpoint_dtype or "bfloat16").removeprefix("torch."), torch.bfloat16)


def use_device(device: torch.device) -> None:
    """Make device the current one, so kernels and allocations without an explicit device land there."""
    if device.type != "cpu":
        torch.accelerator.set_device_index(device.index)


def free_device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of an accelerator."""
    get_memory_info = getattr(torch.accelerator, "get_memory_info", None)  # torch >= 2.9
    if get_memory_info is not None:
        return get_memory_info(device)
    return getattr(torch, device.type).mem_get_info(device)


def reserved_device_memory(device: torch.device) -> int:
    """Bytes this process's caching allocator holds on an accelerator (its weights and buffers so far)."""
    memory_reserved = getattr(torch.accelerator, "memory_reserved", None)  # torch >= 2.9
    if memory_reserved is not None:
        return memory_reserved(device)
    return getattr(torch, device.type).memory_reserved(device)
