"""What the engine hands back each step: per prompt, the state of each of its n choices."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class CompletionOutput:
    """One choice. Until it is finished, `token_ids` and `logprobs` are the engine's live lists (they grow with
    later steps: copy them to keep a snapshot); a finished output owns its copies."""

    index: int
    text: str
    token_ids: list[int]
    # Text and tokens added since the previous output of this request: what a stream sends.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    # Per generated token: {token id: log-prob}, the chosen token plus the top `logprobs` alternatives.
    logprobs: list[dict[int, float]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV the prefix cache held at its first step
    # With SamplingParams.prompt_logprobs, once the prompt is computed: per prompt token (None for the first).
    prompt_logprobs: list[dict[int, float] | None] | None = None
