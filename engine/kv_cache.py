"""The paged KV cache: per layer one key and one value tensor of fixed-size blocks, sized from a memory budget."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.device import free_device_memory, reserved_device_memory

log = logging.getLogger(__name__)


@dataclass(slots=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element


def num_blocks_for_budget(spec: KVCacheSpec, device: torch.device, *, num_blocks: int | None,
                          gpu_memory_utilization: float, cpu_bytes: int, activation_reserve: int = 0) -> int:
    """Blocks that fit: an explicit count, else the CPU byte budget, else this engine's share of the accelerator
    (gpu_memory_utilization of its memory) less what this process already holds (the weights) and an activation
    reserve, and never more than is free. The share is this engine's alone, as in vLLM: two engines of 0.4 each fit
    one device, whichever starts first."""
    if num_blocks is not None:
        return num_blocks
    if device.type == "cpu":
        budget = cpu_bytes
    else:
        free, total = free_device_memory(device)
        budget = min(int(total * gpu_memory_utilization) - reserved_device_memory(device), free) - activation_reserve
    blocks = budget // spec.bytes_per_block
    if blocks < 1:
        raise ValueError(f"no memory left for the KV cache on {device} (budget {budget} bytes, "
                         f"{spec.bytes_per_block} bytes per block): lower max_num_batched_tokens, raise "
                         "gpu_memory_utilization or the CPU KV budget, or pass num_kv_blocks")
    log.info("KV cache: %d blocks of %d tokens (%.1f MiB) on %s", blocks, spec.block_size,
             blocks * spec.bytes_per_block / 2**20, device)
    return blocks


def allocate_kv_cache(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (key, value) pair per layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""
    shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return [(torch.zeros(shape, dtype=spec.dtype, device=device), torch.zeros(shape, dtype=spec.dtype, device=device))
            for _ in range(spec.num_layers)]
