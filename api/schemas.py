"""Request and response shapes shared by the API and the worker (one definition for both sides).

Field names and ranges follow the OpenAI API; vLLM's extra sampling fields (top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, stop_token_ids) are accepted too. Nothing here imports torch or the engine.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    StrictStr,
    TypeAdapter,
    field_validator,
    model_validator,
)

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
    # A 64-bit integer, as OpenAI's and vLLM's: the engine seeds a torch generator per choice with seed + index.
    seed: Annotated[int, Field(ge=-2**63, le=2**63 - 1)] | None = None
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

    @field_validator("prompt")
    @classmethod
    def _prompt_has_tokens(cls, value: str | list[int]) -> str | list[int]:
        # The engine refuses an empty prompt (nothing to continue from) and negative token ids; refused here, they
        # are the caller's 400 rather than a job failed in the engine. (The ids' upper bound is the model's.)
        if not value:
            raise ValueError("the prompt is empty")
        if isinstance(value, list) and min(value) < 0:
            raise ValueError("token ids are never negative")
        return value

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


class CompletionJob(JobCreate, CompletionRequest):
    """POST /v1/jobs with `prompt` (for the OpenAPI document only; the route splits the body itself)."""

    stream: Literal[False] = False  # a job's text is read from /v1/jobs/{id}/events


class ChatJob(JobCreate, ChatCompletionRequest):
    """POST /v1/jobs with `messages` (for the OpenAPI document only)."""

    stream: Literal[False] = False


def raw_json_object(documented_as: Any) -> Any:
    """The type of a request body that reaches its route as the JSON object received (a dict), documented in
    /openapi.json as `documented_as`. For the generation routes: they validate the body themselves (submit's
    checks and messages), and the body as sent is what is stored and handed to the worker."""
    adapter = TypeAdapter(documented_as)

    class RawJsonObject:
        @classmethod
        def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler):
            return handler.generate_schema(dict[str, Any])

        @classmethod
        def __get_pydantic_json_schema__(cls, schema: Any, handler: GetJsonSchemaHandler):
            return handler(adapter.core_schema)

    return RawJsonObject


class BatchCreate(BaseModel):
    """POST /v1/batches: OpenAI's fields, plus an optional `webhook` URL told when the batch ends."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: StrictStr
    # What the route accepts (api/batches.py's ENDPOINTS and parse_window), documented; the route checks them
    # itself, with its own messages.
    endpoint: Annotated[StrictStr, Field(json_schema_extra={"enum": ["/v1/completions", "/v1/chat/completions"]})]
    completion_window: Annotated[StrictStr, Field(json_schema_extra={"pattern": "^[0-9]+[smh]$"})] = "24h"
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
