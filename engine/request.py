"""One generation request (one choice of one prompt) as the scheduler and engine track it."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from engine.detokenizer import IncrementalDetokenizer


class RequestStatus(IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                RequestStatus.FINISHED_ABORTED: "abort"}.get(self)


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # Output tokens allowed: max_tokens clamped to what the context has room for.
    max_tokens: int
    # Monotonic arrival number: first come, first served within one priority.
    arrival: int
    priority: int = 0
    eos_token_ids: frozenset[int] = frozenset()
    generator: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None
    # Prompt followed by the generated tokens; the scheduler computes KV for token_ids[:num_computed_tokens].
    token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    # What ended it: a stop string or stop token id (None for EOS or length), as in vLLM.
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None
    # Per prompt token, with params.prompt_logprobs: {token id: log-prob} of it and the top alternatives given the
    # tokens before it (None for the first token, which has no context), filled as its prompt chunks compute.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_preemptions: int = 0
    # Prefix caching (engine/block_manager.py): the hashes of its full blocks, how many of its blocks are findable
    # by them, and the prompt tokens its first step found cached (what usage reports as cached_tokens).
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    num_cached_tokens: int = 0
    # Its grammar's state (an xgrammar matcher) under structured outputs (engine/structured_output.py), else None.
    grammar: object | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: higher priority first, then earlier arrival."""
        return (-self.priority, self.arrival)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)

    def suppressed_token_ids(self) -> list[int]:
        """Tokens that would end the request before min_tokens: not allowed yet."""
        if self.num_output_tokens >= self.params.min_tokens:
            return []
        suppressed = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            suppressed |= self.eos_token_ids
        return sorted(suppressed)

    def stop_by_token(self) -> RequestStatus | None:
        """Finish state after the last appended token, judged on token ids alone (stop strings are the engine's)."""
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= self.params.min_tokens:
            if last in self.params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
            if not self.params.ignore_eos and last in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
