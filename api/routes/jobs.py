"""The job API: submit, poll (with long-poll), list, cancel, and stream a job's text as server-sent events."""
from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Body, Header, Query
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from api.deps import APIError, CeleryDep, OwnerDep, SettingsDep, StoreDep, StreamsDep
from api.job_record import TERMINAL, Job, JobStatus
from api.lifecycle import settle
from api.responses import JobList, JobObject, errors, events, ok
from api.schemas import ChatJob, CompletionJob, JobCreate, raw_json_object
from api.store import JobStore
from api.streams import EventType, delta_event, result_deltas
from api.submit import check_text, submit
from api.webhook_targets import WebhookTargetError, check_target

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MAX_WAIT_S = 60.0
DELIVERY_FIELDS = set(JobCreate.model_fields)
JobBody = raw_json_object(CompletionJob | ChatJob)


def _links(job: Job) -> dict:
    return {**job.public(), "urls": {"self": f"/v1/jobs/{job.id}", "events": f"/v1/jobs/{job.id}/events",
                                     "cancel": f"/v1/jobs/{job.id}/cancel"}}


def _owned(job: Job | None, job_id: str, owner: str) -> Job:
    """The job if it exists and is the caller's; 404 otherwise (another key's job is not found either)."""
    if job is None or job.owner != owner:
        raise APIError(404, f"no job {job_id!r}", param="job_id", code="job_not_found")
    return job


def _get(store: JobStore, job_id: str, owner: str) -> Job:
    return _owned(store.get(job_id), job_id, owner)


@router.post("", status_code=202, response_model=None, responses=(
    ok(JobObject, 202, "The job, queued") | ok(JobObject, 200, "The job this Idempotency-Key already created")
    | errors(400, 401, 404, 413, 429, 503)))
def create_job(store: StoreDep, settings: SettingsDep, celery: CeleryDep, owner: OwnerDep,
               body: JobBody = Body(...),
               idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None):
    """An OpenAI completion body (`prompt`) or chat body (`messages`) plus webhook, metadata and priority."""
    delivery = {k: v for k, v in body.items() if k in DELIVERY_FIELDS}
    check_text(delivery)  # the request's own text is checked with the rest of it (submit)
    try:
        options = JobCreate.model_validate(delivery)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise APIError(400, f"{first['loc'][0]}: {first['msg']}", param=str(first["loc"][0])) from None
    request = {k: v for k, v in body.items() if k not in DELIVERY_FIELDS}
    if ("messages" in request) == ("prompt" in request):
        raise APIError(400, "a job needs either `prompt` (completion) or `messages` (chat)", param="prompt")
    if request.get("stream"):
        raise APIError(400, "jobs do not stream in the response: read /v1/jobs/{id}/events", param="stream")
    endpoint = "chat.completions" if "messages" in request else "completions"
    webhook = {"url": options.webhook, "events": options.webhook_events} if options.webhook else None
    if webhook:
        try:  # refuse private/loopback targets now, rather than fail every delivery later (SSRF)
            check_target(webhook["url"], settings.webhook_allow_hosts)
        except WebhookTargetError as exc:
            raise APIError(400, str(exc), param="webhook", code="invalid_webhook") from None
    # Its events may be read at any time (/events); its deltas are written once someone does (request_deltas).
    job, created = submit(store, settings, celery, owner, endpoint, request, priority=options.priority,
                          metadata=options.metadata, webhook=webhook, idempotency_key=idempotency_key)
    return JSONResponse(_links(job), status_code=202 if created else 200)


@router.get("", response_model=None, responses=ok(JobList) | errors(400, 401, 503))
def list_jobs(store: StoreDep, owner: OwnerDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
              after: str | None = None, status: str | None = None) -> dict:
    jobs, has_more = store.list(owner, limit=limit, after=after, status=status)
    return {"object": "list", "data": [_links(j) for j in jobs], "has_more": has_more,
            "last_id": jobs[-1].id if jobs else None}


@router.get("/{job_id}", response_model=None, responses=ok(JobObject) | errors(400, 401, 404, 503))
async def get_job(job_id: str, streams: StreamsDep, owner: OwnerDep,
                  wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0.0) -> dict:
    job = _owned(await streams.get(job_id), job_id, owner)
    if wait and job.status not in TERMINAL:
        job = await streams.wait_for_terminal(job_id, wait) or job
    return _links(job)


@router.post("/{job_id}/cancel", response_model=None, responses=ok(JobObject) | errors(401, 404, 409, 503))
def cancel_job(job_id: str, store: StoreDep, celery: CeleryDep, owner: OwnerDep) -> dict:
    before = _get(store, job_id, owner)
    outcome = store.request_cancel(job_id)
    if before.status == JobStatus.QUEUED and outcome == JobStatus.CANCELLED:
        settle(store, _get(store, job_id, owner), celery)  # ended here, never by a worker: its aftermath too
    if outcome in TERMINAL and outcome != JobStatus.CANCELLED:
        raise APIError(409, f"job {job_id} already {outcome}; it cannot be cancelled", code="job_finished")
    return _links(_get(store, job_id, owner))


@router.get("/{job_id}/events", response_class=StreamingResponse, responses=errors(401, 404, 503) | events(
    "`event: delta` with the text generated so far, then `event: end` with the final status"))
async def job_event_stream(job_id: str, streams: StreamsDep, owner: OwnerDep) -> StreamingResponse:
    """Text deltas as they are generated (`event: delta`), then `event: end` with the final status."""
    job = _owned(await streams.get(job_id), job_id, owner)
    if job.status not in TERMINAL and not job.stream:
        await streams.request_deltas(job_id)  # a job's deltas are written only once someone reads them

    async def events():
        deltas_seen = False
        async for event in streams.events(job_id):
            if event["type"] == EventType.END and not deltas_seen:  # it ended before its worker wrote any
                ended = await streams.get(job_id)
                if ended is not None and ended.result:
                    yield _event(delta_event(result_deltas(ended)))
            if event["type"] in (EventType.DELTA, EventType.RESTART):  # a restart drops what came before
                deltas_seen = event["type"] == EventType.DELTA
            yield _event(event)

    return StreamingResponse(events(), media_type="text/event-stream")


def _event(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
