"""The attention backend interface and the per-step metadata every backend reads."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Where each token of the flat batch goes in the paged cache, and what it attends to.

    Tokens are laid out request after request. Decode requests (one new token) come first so a backend can treat
    them as one batch; prefill chunks (several new tokens) follow.
    """

    slot_mapping: torch.Tensor        # [num_tokens] cache slot (block * block_size + offset) of each new token
    # The first len(decode_context_lens_host) tokens are single-token decodes, one per request, sorted by context
    # length, longest first.
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] padded with block 0 (masked out by context_lens)
    decode_context_lens: torch.Tensor  # [num_decodes] tokens in context, the new one included
    decode_context_lens_host: list[int]  # the same on the host, so backends can plan without a device sync
    # One entry per prefill chunk: (first token index in the flat batch, new tokens, context length incl. them,
    # block table tensor). Python ints so backends can slice without a device sync.
    prefills: list[tuple[int, int, int, torch.Tensor]]
    # What a backend derives from the above once per step and reuses in every layer (its own keys).
    backend_state: dict = field(default_factory=dict)


class AttentionBackend(ABC):
    # True when a decode-only forward needs no host data (decode_context_lens_host unused, no syncs), so that it
    # can be captured in a device graph and replayed with padded rows (slot -1, context length 0).
    supports_graphs: bool = False

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                scale: float, sliding_window: int | None,
                cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Store k, v ([num_tokens, num_kv_heads, head_dim]) in the cache, attend with q ([num_tokens, num_heads,
        head_dim]) over each request's cached context, return [num_tokens, num_heads, head_dim].

        With cos_sin (RotaryEmbedding.cos_sin of the tokens' positions), q and k get the rotary embedding first
        (fused_ops.apply_rotary): a backend may do it in the kernel that writes the cache. q and k may be changed
        in place either way."""
