"""Paged KV-cache bookkeeping: which fixed-size blocks each request holds. Pure Python, no torch."""
from __future__ import annotations

from collections import deque


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    """A free list of block ids. A request's block table is a plain list that grows as its tokens are computed."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def can_hold(self, num_tokens: int) -> bool:
        """Whether a request of num_tokens could ever fit, with the whole cache to itself."""
        return blocks_for(num_tokens, self.block_size) <= self.num_blocks

    def allocate(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow block_table in place to cover num_tokens. All or nothing: False (and no change) if blocks run out."""
        needed = blocks_for(num_tokens, self.block_size) - len(block_table)
        if needed <= 0:
            return True
        if needed > len(self._free):
            return False
        block_table.extend(self._free.popleft() for _ in range(needed))
        return True

    def free(self, block_table: list[int]) -> None:
        """Return every block of block_table to the free list and empty it."""
        self._free.extend(block_table)
        block_table.clear()
