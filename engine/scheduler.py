"""Token-level scheduler: which requests compute which tokens in the next step.

Every step gets a token budget (max_num_batched_tokens) and a sequence cap (max_num_seqs). Running requests go
first, in priority order: one token each when decoding, or the next chunk of a prompt that did not fit in one step.
Waiting requests then start with whatever budget is left, their prompts chunked to fit. When KV blocks run out, the
running request with the lowest priority (the newest within a priority) is preempted: its blocks are freed and it
will recompute its prompt and generated tokens when it is scheduled again, so its output is unchanged. A request
starting (or restarting after preemption) first takes the longest prefix of its tokens whose blocks are cached
(engine/block_manager.py) and computes only the rest.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledChunk:
    """Compute KV for request.token_ids[start:start + num_tokens]; sample a token after it if `sample`."""

    request: Request
    start: int
    num_tokens: int
    sample: bool


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Both kept sorted by Request.sort_key: the front is scheduled first, the back is preempted first.
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        # Prefix cache use at admissions: prompt tokens looked up, and those found cached (for /metrics).
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    def add(self, request: Request) -> None:
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        kept: list[Request] = []
        running = list(self.running)
        while running and budget > 0:
            request = running.pop(0)
            num_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, num_tokens, running, out):
                continue
            self.block_manager.cache_full_blocks(request, request.num_computed_tokens + num_tokens)
            kept.append(request)
            out.chunks.append(self._chunk(request, num_tokens))
            budget -= num_tokens
        # Requests the budget did not reach this step stay running, blocks held.
        self.running = kept + running

        # New work only when nothing had to be preempted: otherwise it would take the blocks just freed.
        if not out.preempted:
            self._admit(out, budget, len(self.running))
        return out

    def _admit(self, out: SchedulerOutput, budget: int, num_running: int, ahead: bool = False) -> None:
        """Start waiting requests, front first, while the budget, the free blocks and the slots allow."""
        while self.waiting and budget > 0 and num_running < self.max_num_seqs:
            request = self.waiting[0]
            first = request.num_computed_tokens == 0
            if first:  # its cached prefix (a preempted request finds what is left of its own) is not recomputed
                request.num_computed_tokens = self.block_manager.take_cached_prefix(request)
            num_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            # Shaped as a decode (one token after a cached prefix): a step scheduled ahead has its decodes first,
            # fed by the device (see schedule_ahead); this one waits for schedule().
            decode_shaped = ahead and num_tokens == 1 and request.num_computed_tokens > 0
            if decode_shaped or not self.block_manager.allocate(request.block_ids,
                                                                request.num_computed_tokens + num_tokens):
                if first:  # let go of the prefix until it fits
                    self.block_manager.free(request.block_ids)
                    request.num_computed_tokens = 0
                break
            self.block_manager.cache_full_blocks(request, request.num_computed_tokens + num_tokens)
            if first:
                self.prefix_queried_tokens += request.num_tokens
                self.prefix_hit_tokens += request.num_computed_tokens
                if not request.num_preemptions:
                    # Prompt tokens only: a resumed request (engine.py) also finds its earlier outputs' blocks.
                    request.num_cached_tokens = min(request.num_computed_tokens, len(request.prompt_token_ids))
            self.waiting.pop(0)
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=lambda r: r.sort_key)
            out.chunks.append(self._chunk(request, num_tokens))
            budget -= num_tokens
            num_running += 1

    def schedule_ahead(self, chunks: list[ScheduledChunk]) -> tuple[SchedulerOutput, list[int]] | None:
        """The step after the one of `chunks`, scheduled before that step's tokens are known (async scheduling,
        engine.py), as schedule() would schedule it once they are: first one more token for each request that
        sampled in `chunks` and whose coming token does not bring it to max_tokens (its input is that coming
        token, still on the device), longest context first; then the next chunk of each prompt still being
        prefilled, and waiting requests admitted with the slots and budget left (their tokens are known).
        Returns that output and, for each of its first chunks, the index among `chunks`' sampled rows of the
        token it takes as input.

        None where the result could differ from schedule()'s: a running request the step left out, a request
        still under min_tokens (its suppressed tokens depend on the count), blocks that would need a preemption,
        or no token to take from the device. A stop token or string may still end a request: the engine then
        drops its extra token. A slot freed by such a stop is filled one step later than schedule() would: that
        moves when a request runs, never what it computes."""
        if len(chunks) != len(self.running) or not all(
                c.request.status == RequestStatus.RUNNING
                and (not c.sample or c.request.num_output_tokens >= c.request.params.min_tokens) for c in chunks):
            return None
        decodes: list[tuple[int, ScheduledChunk]] = []  # (sampled row, the next chunk)
        prefills: list[ScheduledChunk] = []
        row = 0
        for c in chunks:
            end = c.start + c.num_tokens
            if c.sample:
                if c.request.num_output_tokens + 1 < c.request.max_tokens:
                    decodes.append((row, ScheduledChunk(c.request, end, 1, sample=True)))
                row += 1
            else:
                prefills.append(ScheduledChunk(c.request, end, 0, sample=False))  # sized below
        if not decodes:
            return None
        decodes.sort(key=lambda d: d[1].start, reverse=True)  # as ModelRunner.order(): longest context first
        budget = self.max_num_batched_tokens - len(decodes)
        out = SchedulerOutput([chunk for _, chunk in decodes])
        for _, chunk in decodes:
            if not self.block_manager.allocate(chunk.request.block_ids, chunk.start + 1):
                return None  # blocks already taken by earlier requests are theirs next step anyway
        for chunk in prefills:
            num_tokens = min(chunk.request.num_tokens - chunk.start, budget)
            if num_tokens <= 0:
                return None  # schedule() would leave it out this step: not worth matching here
            if num_tokens == 1 and chunk.start > 0:
                # Shaped as a decode: the runner wants it among the decodes, ordered by length, where the device's
                # tokens go; rare enough to leave to schedule().
                return None
            if not self.block_manager.allocate(chunk.request.block_ids, chunk.start + num_tokens):
                return None
            self.block_manager.cache_full_blocks(chunk.request, chunk.start + num_tokens)
            out.chunks.append(ScheduledChunk(chunk.request, chunk.start, num_tokens,
                                             sample=chunk.start + num_tokens == chunk.request.num_tokens))
            budget -= num_tokens
        self._admit(out, budget, num_running=len(decodes) + len(prefills), ahead=True)
        return out, [r for r, _ in decodes]

    def _allocate_or_preempt(self, request: Request, num_tokens: int, lower: list[Request],
                             out: SchedulerOutput) -> bool:
        """Find blocks for request's next num_tokens, preempting from the back of `lower` (then request itself)."""
        while not self.block_manager.allocate(request.block_ids, request.num_computed_tokens + num_tokens):
            victim = lower.pop() if lower else request
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request.block_ids)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.add(request)

    @staticmethod
    def _chunk(request: Request, num_tokens: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        return ScheduledChunk(request, start, num_tokens, sample=start + num_tokens == request.num_tokens)

    def update(self, out: SchedulerOutput) -> None:
        """Mark the scheduled tokens as computed (their KV is now in the cache)."""
        for chunk in out.chunks:
            request = chunk.request
            request.num_computed_tokens += chunk.num_tokens
            if not request.status.finished:  # blocks filled by decodes (a finished request's blocks are gone)
                self.block_manager.cache_full_blocks(request, request.num_computed_tokens)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request in any state (finished or aborted): its blocks are free at once."""
        if request.status.finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.block_manager.free(request.block_ids)
