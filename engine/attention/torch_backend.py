"""Portable attention over the paged cache: gather each request's blocks, then scaled_dot_product_attention.

Works on every torch device; it is the reference the faster kernels are checked against. On the CPU, decodes run
through a C++ kernel that reads the blocks in place (engine/attention/cpu_kernels.py) where it can be built: the
gathers were ~18% of a CPU decode step at batch 64, and a third of it once the projections got faster.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.attention.cpu_kernels import cpu_kernels
from engine.fused_ops import apply_rotary


class TorchAttentionBackend(AttentionBackend):
    def __init__(self, device: torch.device | None = None, use_cpu_kernel: bool = True) -> None:
        # Built (or found built) now, not during the first request: compiling takes about a minute.
        self.cpu_kernels = cpu_kernels() if use_cpu_kernel and device is not None and device.type == "cpu" else None

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale, sliding_window, cos_sin=None):
        if cos_sin is not None:
            q, k = apply_rotary(q, k, *cos_sin)
        k_cache, v_cache = kv_cache
        num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)

        num_decodes = len(meta.decode_context_lens_host)
        if self.cpu_kernels is not None and num_decodes:
            out[:num_decodes] = self.cpu_kernels.paged_decode_attention(
                q[:num_decodes], k_cache, v_cache, meta.decode_block_tables.int(), meta.decode_context_lens.int(),
                scale, sliding_window or 0)
            num_decodes = 0  # done
        for first, last in _decode_groups(meta.decode_context_lens_host[:num_decodes], block_size):
            # Decodes sorted longest first, in groups of similar length, so padding to the longest is cheap.
            lens = meta.decode_context_lens[first:last, None]
            width = -(-meta.decode_context_lens_host[first] // block_size)
            tables = meta.decode_block_tables[first:last, :width].flatten()
            # [group, width * block_size, num_kv_heads, head_dim] -> heads before positions for SDPA.
            keys = _gather(k_cache, tables).view(last - first, -1, num_kv_heads, head_dim).transpose(1, 2)
            values = _gather(v_cache, tables).view(last - first, -1, num_kv_heads, head_dim).transpose(1, 2)
            positions = torch.arange(keys.shape[2], device=q.device)
            mask = positions[None, :] < lens  # [group, context]
            if sliding_window is not None:
                mask &= positions[None, :] > lens - 1 - sliding_window
            out[first:last] = F.scaled_dot_product_attention(
                q[first:last, :, None, :], keys, values, attn_mask=mask[:, None, None, :],
                scale=scale, enable_gqa=True)[:, :, 0, :]

        for first, num_new, context_len, block_table in meta.prefills:
            if num_new == context_len:  # a whole prompt: its keys and values are the ones just computed
                keys = k[first:first + num_new].transpose(0, 1)  # [kv_heads, ctx, dim]
                values = v[first:first + num_new].transpose(0, 1)
            else:
                keys = _gather(k_cache, block_table).flatten(0, 1)[:context_len].transpose(0, 1)
                values = _gather(v_cache, block_table).flatten(0, 1)[:context_len].transpose(0, 1)
            query = q[first:first + num_new].transpose(0, 1)  # [heads, num_new, dim]
            start = context_len - num_new
            if start == 0 and sliding_window is None:
                attn = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=True)
            else:
                key_pos = torch.arange(context_len, device=q.device)
                query_pos = torch.arange(start, context_len, device=q.device)[:, None]
                mask = key_pos[None, :] <= query_pos
                if sliding_window is not None:
                    mask &= key_pos[None, :] > query_pos - sliding_window
                attn = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale,
                                                      enable_gqa=True)
            out[first:first + num_new] = attn.transpose(0, 1)
        return out


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """cache[block_ids] as whole-block copies: index_select on the leading dim is a row memcpy, about twice as fast
    on the CPU as advanced indexing."""
    return cache.index_select(0, block_ids)


# A decode joins the current group while the group's longest context is at most this many times its own.
_GROUP_SPREAD = 1.5


def _decode_groups(lens: list[int], block_size: int) -> list[tuple[int, int]]:
    """[first, last) ranges of the decodes (sorted by context length, longest first) to attend as one batch."""
    groups = []
    first = 0
    for i in range(1, len(lens) + 1):
        if i == len(lens) or -(-lens[first] // block_size) > _GROUP_SPREAD * -(-lens[i] // block_size):
            groups.append((first, i))
            first = i
    return groups
