"""Validate a generation request, record it as a job and enqueue it: the path every endpoint shares."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from api.celery_client import enqueue
from api.deps import APIError
from api.job_record import Job
from api.schemas import ENDPOINTS, SamplingFields, first_invalid_text
from api.settings import Settings
from api.store import JobStore


def check_text(body: Any) -> None:
    """400 for text that is not valid Unicode anywhere in a request body: it could be neither stored nor read."""
    invalid = first_invalid_text(body)
    if invalid:
        raise APIError(400, f"{invalid}: the text is not valid Unicode (a lone surrogate)", param=invalid)


def validate_body(endpoint: str, body: dict[str, Any]) -> SamplingFields:
    return parse_body(ENDPOINTS[endpoint], body)


def parse_body(model: type[BaseModel], body: dict[str, Any]) -> Any:
    """`body` as `model`, or a 400 naming the first parameter that does not fit."""
    check_text(body)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        # OpenAI's codes for a feature this server lacks (api/schemas.py's UNSUPPORTED, best_of, echo + logprobs).
        code = first["type"] if first["type"] in ("unsupported_parameter", "unsupported_value") else None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param,
                       code=code) from None


def check_model(store: JobStore, settings: Settings, request: SamplingFields) -> None:
    """404 for a model nobody serves, 503 when its workers are gone, 429 when its queue is too deep, 400 when
    max_tokens alone cannot fit the model's context (the worker checks prompt + max_tokens exactly)."""
    models, known = store.registry.snapshot()
    workers = models.get(request.model)
    if not workers:
        if request.model in known:
            raise APIError(503, f"no worker is serving {request.model!r} right now; try again later",
                           type="service_unavailable", code="no_worker", headers={"Retry-After": "5"})
        raise APIError(404, f"the model {request.model!r} does not exist", param="model", code="model_not_found")
    max_model_len = min(int(w.get("max_model_len", 0)) for w in workers)
    max_tokens = request.sampling_kwargs()["max_tokens"]
    if max_tokens is not None and max_tokens >= max_model_len:
        raise APIError(400, f"max_tokens is {max_tokens}, but the model's context is {max_model_len} tokens "
                            "(prompt and output together)", param="max_tokens")
    depth = store.queue_depth(request.model)
    if depth >= settings.max_queue_depth:
        raise APIError(429, f"{depth} jobs are queued for {request.model!r}; retry later",
                       type="rate_limit_error", code="queue_full", headers={"Retry-After": "5"})


def submit(store: JobStore, settings: Settings, celery, owner: str, endpoint: str, body: dict[str, Any], *,
           priority: int = 0, metadata: dict | None = None, webhook: dict | None = None,
           idempotency_key: str | None = None, stream: bool = False) -> tuple[Job, bool]:
    """`stream`: the worker writes the job's text deltas as they come (someone reads them)."""
    request = validate_body(endpoint, body)
    check_model(store, settings, request)
    job, created = store.create(owner=owner, model=request.model, endpoint=endpoint, request=body,
                                priority=priority, metadata=metadata, webhook=webhook,
                                idempotency_key=idempotency_key, stream=stream)
    if created:
        enqueue(store, job.id, request.model, celery=celery)
    return job, created
