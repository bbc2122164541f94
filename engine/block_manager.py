"""Paged KV-cache bookkeeping: which fixed-size blocks each request holds, and which full blocks can be reused
(automatic prefix caching, as vLLM v1 does it). Pure Python, no torch.

A full block is identified by its hash: the hash of the block before it and its own token ids, so equal hashes mean
equal tokens at equal positions, hence equal KV (one engine has one model and one weight format). Blocks carry
reference counts: a block in several requests' tables is computed once and only read after. A request's first
step (or first after a preemption) finds the longest run of its full blocks already cached and starts after it; it
never writes a block it shares, because it computes from a block boundary into blocks of its own. A block is
findable from the step that computes it on. A block whose last reference goes stays findable in the free list,
evicted (its hash forgotten) only when its memory is taken for a new block: least recently freed first, and within
a request its last block first (a longer prefix is worth less than its start).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """A block's identity: its parent's and its own tokens'. sha256, because a collision would hand one request
    another's KV (Python's hash() of a tuple collides by design on crafted input)."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class BlockManager:
    """Block ids with reference counts, and a free list that keeps freed full blocks findable by their hash.

    A request's block table is a plain list that grows as its tokens are computed; its `block_hashes` (on the
    Request) are those of its full blocks, computed as the blocks fill."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # hash -> the block that holds it (in use or free)
        # Blocks nobody holds, in the order they are taken: blocks without a hash first, then least recently freed.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody holds (cached ones among them: they are taken when needed)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

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
        for _ in range(needed):
            block, _ = self._free.popitem(last=False)
            evicted = self._hash_of[block]
            if evicted is not None:  # its memory is taken: it can no longer be found
                del self._cached[evicted]
                self._hash_of[block] = None
            self._refs[block] = 1
            block_table.append(block)
        return True

    def free(self, block_table: list[int]) -> None:
        """Drop a request's hold on every block of block_table and empty it. Last block first, so that of one
        request's blocks the end of its prefix is evicted before the start."""
        for block in reversed(block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                if self._hash_of[block] is None:  # nothing to find in it: taken before any cached block
                    self._free.move_to_end(block, last=False)
        block_table.clear()

    def take_cached_prefix(self, request) -> int:
        """At a request's first step (nothing computed, no blocks): hold the longest run of its full blocks that are
        cached, and return the number of tokens they cover. At least one prompt token is left to compute, since
        the first token is sampled from its logits."""
        if not self.enable_prefix_caching or request.num_computed_tokens or request.block_ids \
                or request.params.prompt_logprobs is not None:  # (its prompt's every row is scored)
            return 0
        self.hash_full_blocks(request, request.num_tokens - 1)
        for block_hash_ in request.block_hashes:
            block = self._cached.get(block_hash_)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
            request.block_ids.append(block)
        request.num_registered_blocks = len(request.block_ids)
        return len(request.block_ids) * self.block_size

    def cache_full_blocks(self, request, num_tokens: int) -> None:
        """Make the request's blocks that are full within its first num_tokens tokens findable by their hash. The
        scheduler calls it for the tokens a step will compute, so a request admitted in the same step finds them
        too: the attention backends write the KV of a whole step's tokens into the cache before any of them reads
        it. A hash some other block already holds stays with that block (this one is then freed as an ordinary
        block)."""
        full = min(num_tokens, request.num_tokens) // self.block_size
        full = min(full, len(request.block_ids))
        if full <= request.num_registered_blocks or not self.enable_prefix_caching:
            return
        self.hash_full_blocks(request, full * self.block_size)
        for index in range(request.num_registered_blocks, full):
            block, hash_ = request.block_ids[index], request.block_hashes[index]
            if self._hash_of[block] is None and hash_ not in self._cached:
                self._cached[hash_] = block
                self._hash_of[block] = hash_
        request.num_registered_blocks = full

    def hash_full_blocks(self, request, num_tokens: int) -> None:
        """Extend request.block_hashes over the full blocks of its first num_tokens tokens."""
        size, hashes, tokens = self.block_size, request.block_hashes, request.token_ids
        for index in range(len(hashes), num_tokens // size):
            hashes.append(block_hash(hashes[-1] if hashes else b"", tokens[index * size:(index + 1) * size]))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (as vLLM's reset_prefix_cache): only when no request holds a block; False
        otherwise. For benchmarks that compare runs from a cold cache."""
        if len(self._free) != self.num_blocks:
            return False
        self._cached.clear()
        self._hash_of = [None] * self.num_blocks
        return True

    def reference_count(self, block: int) -> int:
        return self._refs[block]
