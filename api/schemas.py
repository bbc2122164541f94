"""Request and response shapes shared by the API and the worker (one definition for both sides).

Field names and ranges follow the OpenAI API; vLLM's extra sampling fields (top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, stop_token_ids) are accepted too. Nothing here imports torch or the engine.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator, model_validator

Stop = str | list[str] | None


class SamplingFields(BaseModel):
    """What both OpenAI endpoints share; unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stop: Stop = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    # vLLM extensions
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] = 1.0
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: Stop) -> Stop:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return value

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for engine.SamplingParams (the worker builds it; the API never imports the engine)."""
        return dict(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                    presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                    repetition_penalty=self.repetition_penalty, seed=self.seed, max_tokens=self.max_tokens,
                    min_tokens=self.min_tokens, stop=self.stop or [], stop_token_ids=self.stop_token_ids or [],
                    ignore_eos=self.ignore_eos, logprobs=self.num_logprobs())

    def num_logprobs(self) -> int | None:
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[int]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False

    def num_logprobs(self) -> int | None:
        return self.logprobs


class ContentPart(BaseModel):
    """One part of a message's content: a text part's `text` must be a string; other kinds pass (and are unread)."""

    model_config = ConfigDict(extra="allow")

    type: StrictStr
    text: StrictStr | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs its text, a string")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = ""

    def text(self) -> str:
        """Text content; OpenAI also allows a list of parts, of which we take the text ones."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content if part.type == "text")
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def sampling_kwargs(self) -> dict[str, Any]:
        kwargs = super().sampling_kwargs()
        kwargs["max_tokens"] = self.max_completion_tokens or self.max_tokens
        return kwargs


ENDPOINTS: dict[str, type[SamplingFields]] = {"completions": CompletionRequest,
                                               "chat.completions": ChatCompletionRequest}


class JobCreate(BaseModel):
    """POST /v1/jobs: an OpenAI completion or chat body, plus delivery options."""

    model_config = ConfigDict(extra="allow")

    webhook: str | None = None
    webhook_events: list[Literal["start", "completed"]] = Field(default_factory=lambda: ["completed"])
    metadata: dict[str, str] = Field(default_factory=dict)
    priority: Annotated[int, Field(ge=-100, le=100)] = 0


class BatchCreate(BaseModel):
    """POST /v1/batches: OpenAI's fields, plus an optional `webhook` URL told when the batch ends."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: StrictStr
    endpoint: StrictStr
    completion_window: StrictStr = "24h"
    metadata: Annotated[dict[str, StrictStr], Field(max_length=16)] | None = None
    webhook: StrictStr | None = None


def first_invalid_text(value: Any, path: str = "") -> str | None:
    """Where in a decoded JSON body a string is not valid Unicode (a lone surrogate, which JSON's `\\ud800`
    escape allows), or None: such text cannot be encoded for the tokenizer, Redis or a reply."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        for key, item in value.items():
            where = first_invalid_text(key, path) or first_invalid_text(item, f"{path}.{key}" if path else str(key))
            if where:
                return where
    elif isinstance(value, list):
        for index, item in enumerate(value):
            where = first_invalid_text(item, f"{path}.{index}" if path else str(index))
            if where:
                return where
    return None


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
