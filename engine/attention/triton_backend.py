"""Attention over the paged cache with Triton kernels: the torch backend's semantics at GPU speed (CUDA or Intel XPU).

A decode-only step (no prefill chunks) launches a fixed sequence of kernels whose shapes come from tensor shapes
alone: no host/device synchronisation and no branch on data, so the step can be captured in a CUDA graph (warm the
kernels up once before capturing: the first call compiles them).
"""
from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.attention.triton_kernels import (paged_decode, paged_prefill, prefill_plan, rotate_and_store_kv,
                                             store_kv)


class TritonAttentionBackend(AttentionBackend):
    supports_graphs = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                scale: float, sliding_window: int | None,
                cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        if cos_sin is None:
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        else:  # one kernel instead of two: a decode step at batch 1 is a chain of ~300 short kernels
            rotate_and_store_kv(q, k, v, *cos_sin, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        num_decodes = meta.decode_block_tables.shape[0]
        if num_decodes:
            paged_decode(q[:num_decodes], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                         scale, sliding_window, out=out[:num_decodes])
        if meta.prefills:
            heads = (q.shape[1], k_cache.shape[2])
            plan = meta.backend_state.get(("prefill_plan", heads))
            if plan is None:  # the first layer of the step
                plan = meta.backend_state[("prefill_plan", heads)] = prefill_plan(meta.prefills, *heads, q.device)
            paged_prefill(q, k_cache, v_cache, meta.prefills, scale, sliding_window, out=out, plan=plan)
        return out
