"""What the routes answer, as typed models, and the error statuses each can answer: /openapi.json is generated from
these (and from the request models of api/schemas.py).

The routes still build their replies as plain dicts (Job.public(), FileObject.public(), the worker's completion
bodies): these models describe them but do not re-validate every reply on the hot path. The fuzz test
(tests/test_openapi_fuzz.py) checks the real service's replies against the document. Our own models rather than
the `openai` package's types: the API does not depend on the SDK, and our objects carry fields of their own
(a model's max_model_len, a job's urls, a batch's webhook_deliveries).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from api.job_record import JobStatus


class ErrorDetail(BaseModel):
    """OpenAI's error object: all four fields are always present (param and code may be null)."""

    model_config = ConfigDict(extra="forbid")

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error reply (4xx and 5xx): {"error": {"message", "type", "param", "code"}}."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


_WHY = {
    400: "The request is invalid (a parameter is out of range, the JSON is malformed, a value is not allowed).",
    401: "The bearer API key is missing or not one of the configured keys.",
    404: "No such object (or it belongs to another API key), or no such model.",
    409: "The object is in a state that does not allow this (already finished, or the job was cancelled).",
    413: "The request body (or the uploaded file) is over the limit.",
    429: "The model's queue is full; retry after the Retry-After header's seconds.",
    500: "An unexpected error (on the generation routes, also: the job failed in its worker).",
    503: "The job store (Redis) is unavailable, or no worker serves the model right now; see Retry-After.",
    504: "The job did not finish within the synchronous call's time limit (use /v1/jobs for long jobs).",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: the given error statuses and 500 (any route can fail unexpectedly), each with
    OpenAI's error body."""
    return {status: {"model": ErrorResponse, "description": _WHY[status]} for status in sorted({*statuses, 500})}


def ok(model: type[BaseModel], status: int = 200, description: str = "Successful Response") -> dict:
    """A success response documented by a model the route does not return (it returns a dict or a Response)."""
    return {status: {"model": model, "description": description}}


class ServerSentEvent(BaseModel):
    """One event of a text/event-stream reply (OpenAPI before 3.2 has an event stream's schema describe each event,
    as 3.2's itemSchema does): `data` is JSON (a chunk, an event of a job, or {"error": ...}), or `[DONE]` last."""

    event: str | None = None
    data: str
    id: str | None = None
    retry: int | None = None


EVENT_STREAM = {"text/event-stream": {"schema": ServerSentEvent.model_json_schema()}}


def json_or_events(model: type[BaseModel], description: str) -> dict:
    """A 200 that is JSON (`model`), or server-sent events when the request asks to stream."""
    return {200: {"model": model, "description": description, "content": EVENT_STREAM}}


def events(description: str) -> dict:
    """A 200 that is server-sent events only."""
    return {200: {"description": description, "content": EVENT_STREAM}}


# ---- health ----

class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    """Also the 503 body of /ready: "degraded" (a model has no live worker) or "unavailable" (Redis)."""

    status: Literal["ready", "degraded", "unavailable"]
    redis: str
    workers: dict[str, int] | None = None


# ---- models ----

class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    load_in_low_bit: list[str]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


# ---- completions (the worker builds these: worker/openai_format.py) ----

class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV the engine's prefix cache held


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class Completion(BaseModel):
    """POST /v1/completions without `stream` (with it: text/event-stream of `text_completion` chunks)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    """POST /v1/chat/completions without `stream` (with it: text/event-stream of `chat.completion.chunk`s)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


# ---- jobs ----

class JobUrls(BaseModel):
    self: str
    events: str
    cancel: str


class JobObject(BaseModel):
    """A job (api/job_record.py's Job.public()) and where to poll, stream or cancel it."""

    id: str
    model: str
    endpoint: Literal["completions", "chat.completions"]
    request: dict[str, Any]
    status: JobStatus
    priority: int
    metadata: dict[str, Any]
    webhook: dict[str, Any] | None
    created_at: float | None
    started_at: float | None
    first_token_at: float | None
    finished_at: float | None
    attempts: int
    dispatch: int
    bulk: bool
    stream: bool
    resumed_tokens: int  # output tokens its latest attempt took over from earlier ones (its worker died)
    result: dict[str, Any] | None
    usage: dict[str, Any] | None
    error: dict[str, Any] | None
    cancel_requested: bool
    webhook_deliveries: dict[str, Any] | None
    urls: JobUrls


class JobList(BaseModel):
    object: Literal["list"]
    data: list[JobObject]
    has_more: bool
    last_id: str | None


# ---- files ----

class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    expires_at: int | None
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["processed"]
    status_details: str | None


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


# ---- batches ----

class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchInputTokensDetails(BaseModel):
    cached_tokens: int


class BatchOutputTokensDetails(BaseModel):
    reasoning_tokens: int


class BatchUsage(BaseModel):
    """OpenAI's BatchUsage: the tokens of the batch's lines that ended, summed."""

    input_tokens: int
    input_tokens_details: BatchInputTokensDetails
    output_tokens: int
    output_tokens_details: BatchOutputTokensDetails
    total_tokens: int


class BatchErrors(BaseModel):
    object: Literal["list"]
    data: list[dict[str, Any]]


class BatchObject(BaseModel):
    """OpenAI's batch object; `webhook_deliveries` only when the batch has a webhook."""

    id: str
    object: Literal["batch"]
    endpoint: str
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                    "cancelled"]
    output_file_id: str | None
    error_file_id: str | None
    errors: BatchErrors | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None
    model: str | None  # its lines' model, once the first line is queued
    usage: BatchUsage
    webhook_deliveries: dict[str, Any] | None = None
    created_at: int | None
    expires_at: int | None
    in_progress_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None


class BatchList(BaseModel):
    object: Literal["list"]
    data: list[BatchObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


# ---- tokenization (vLLM's /tokenize and /detokenize) ----

class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None  # the vocabulary's pieces, with return_token_strs


class DetokenizeResponse(BaseModel):
    prompt: str
