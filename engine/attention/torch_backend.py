"""Portable attention over the paged cache: gather each request's blocks, then scaled_dot_product_attention.

Works on every torch device; it is the reference the faster kernels are checked against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale, sliding_window):
        k_cache, v_cache = kv_cache
        num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)

        n = meta.num_decode_tokens
        if n:
            # [num_decodes, max_blocks * block_size, num_kv_heads, head_dim] -> heads before positions for SDPA.
            keys = k_cache[meta.decode_block_tables].flatten(1, 2).transpose(1, 2)
            values = v_cache[meta.decode_block_tables].flatten(1, 2).transpose(1, 2)
            positions = torch.arange(keys.shape[2], device=q.device)
            lens = meta.decode_context_lens[:, None]
            mask = positions[None, :] < lens  # [num_decodes, context]
            if sliding_window is not None:
                mask &= positions[None, :] > lens - 1 - sliding_window
            out[:n] = F.scaled_dot_product_attention(
                q[:n, :, None, :], keys, values, attn_mask=mask[:, None, None, :],
                scale=scale, enable_gqa=True)[:, :, 0, :]

        for first, num_new, context_len, block_table in meta.prefills:
            keys = k_cache[block_table].flatten(0, 1)[:context_len].transpose(0, 1)  # [kv_heads, context, dim]
            values = v_cache[block_table].flatten(0, 1)[:context_len].transpose(0, 1)
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
