"""A tensor-parallel rank's slice of a checkpoint tensor (--tensor-parallel-size; which dimension: the model's
`shard_dim`, engine/models/llama.py).

Float tensors in safetensors files are read as their slice only (safetensors' get_slice): a rank never holds a
whole projection, on its device or on the host. Quantized weights (pre-quantized directories, GGUF files) are read
whole on the host, one tensor at a time, and sliced there before they go to the device, in their stored layout:
rows of qweight, scale and offset for a column-parallel split; whole groups of inputs for a row-parallel one (a
weight with one scale per row keeps it: w = q * scale holds for any slice of the row). So a quantized checkpoint
runs under tensor parallelism with exactly its stored values.
"""
from __future__ import annotations

import torch

from engine.low_bit import QuantizedWeight

FLAG = "--tensor-parallel-size"


def bounds(name: str, length: int, rank: int, size: int) -> tuple[int, int]:
    if length % size:
        raise ValueError(f"{FLAG} {size} does not divide {name}'s {length} rows/columns to split")
    part = length // size
    return rank * part, (rank + 1) * part


def read_slice(name: str, handle, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s part of tensor `name` along `dim`, read from an open safetensors file as that part only."""
    part = handle.get_slice(name)
    start, end = bounds(name, part.get_shape()[dim], rank, size)
    return part[start:end] if dim == 0 else part[:, start:end]


def shard(name: str, value: torch.Tensor | QuantizedWeight, dim: int, rank: int,
          size: int) -> torch.Tensor | QuantizedWeight:
    """Rank `rank`'s part of a whole tensor (on the host) along `dim`, as a tensor of its own."""
    if isinstance(value, QuantizedWeight):
        return _shard_quantized(name, value, dim, rank, size)
    start, end = bounds(name, value.shape[dim], rank, size)
    return value.narrow(dim, start, end - start).clone()


def _shard_quantized(name: str, weight: QuantizedWeight, dim: int, rank: int, size: int) -> QuantizedWeight:
    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[start:end].clone()

    if dim == 0:
        start, end = bounds(name, weight.shape[0], rank, size)
        return QuantizedWeight(weight.bits, weight.group_size, rows(weight.qweight), rows(weight.scale),
                               rows(weight.offset))
    k = weight.shape[1]
    start, end = bounds(name, k, rank, size)
    per_byte = 8 // weight.bits  # a 4-bit weight packs two inputs per byte (within runs of 32: whole groups)
    qweight = weight.qweight[:, start // per_byte:end // per_byte].clone()
    groups = weight.scale.shape[1]
    if groups == 1:  # one scale per row: every slice of the row keeps it
        return QuantizedWeight(weight.bits, end - start, qweight, weight.scale.clone(),
                               None if weight.offset is None else weight.offset.clone())
    if (end - start) % weight.group_size:
        raise ValueError(f"{FLAG} {size} leaves {end - start} of {name}'s {k} inputs on each rank, not whole "
                         f"groups of {weight.group_size} of its quantized format: use a size that keeps "
                         f"{k} / size a multiple of {weight.group_size}")
    g0, g1 = start // weight.group_size, end // weight.group_size

    def columns(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[:, g0:g1].clone()

    return QuantizedWeight(weight.bits, weight.group_size, qweight, columns(weight.scale), columns(weight.offset))
