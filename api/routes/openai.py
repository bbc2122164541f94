"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions (through the same queue).

A client that goes away before its answer aborts its job, as vLLM does: nobody is left to read it, and its engine
slot and KV blocks are worth more to the others. (Jobs of /v1/jobs are meant to be polled: they keep running.)
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import redis
from fastapi import APIRouter, Body, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse

from api.deps import APIError, CeleryDep, OwnerDep, SettingsDep, StoreDep, StreamsDep
from api.job_record import TERMINAL, Job, JobStatus
from api.responses import ChatCompletion, Completion, ModelCard, ModelList, errors, json_or_events, ok
from api.schemas import ChatCompletionRequest, CompletionRequest, raw_json_object
from api.store import JobStore
from api.streams import AsyncStreams, EventType
from api.submit import submit

router = APIRouter(prefix="/v1", tags=["openai"])

# How long a synchronous OpenAI call waits for its job; a client wanting longer uses /v1/jobs.
SYNC_TIMEOUT_S = 600.0
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection": logged, never seen by the client


GENERATION_ERRORS = errors(400, 401, 404, 409, 413, 429, 503, 504)
CompletionBody = raw_json_object(CompletionRequest)
ChatCompletionBody = raw_json_object(ChatCompletionRequest)


@router.get("/models", response_model=None, responses=ok(ModelList) | errors(401, 503))
def list_models(store: StoreDep, _: OwnerDep) -> dict:
    return {"object": "list", "data": [_model(name, workers)
                                       for name, workers in sorted(store.registry.snapshot()[0].items())]}


@router.get("/models/{model:path}", response_model=None, responses=ok(ModelCard) | errors(401, 404, 503))
def retrieve_model(model: str, store: StoreDep, _: OwnerDep) -> dict:
    workers = store.registry.snapshot()[0].get(model)
    if not workers:
        raise APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
    return _model(model, workers)


def _model(name: str, workers: list[dict]) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "inferq",
            "max_model_len": min(int(w.get("max_model_len", 0)) for w in workers),
            # The weight formats its workers run (--load-in-low-bit); empty: the checkpoint's own.
            "load_in_low_bit": sorted({w["load_in_low_bit"] for w in workers if w.get("load_in_low_bit")})}


@router.post("/completions", response_model=None, responses=GENERATION_ERRORS | json_or_events(
    Completion, "The completion; with `stream`, server-sent `text_completion` chunks, then `data: [DONE]`."))
async def completions(request: Request, store: StoreDep, streams: StreamsDep, settings: SettingsDep,
                      celery: CeleryDep, owner: OwnerDep, body: CompletionBody = Body(...)):
    return await _run(request, store, streams, settings, celery, owner, "completions", body)


@router.post("/chat/completions", response_model=None, responses=GENERATION_ERRORS | json_or_events(
    ChatCompletion, "The chat completion; with `stream`, server-sent `chat.completion.chunk`s, then `data: [DONE]`."))
async def chat_completions(request: Request, store: StoreDep, streams: StreamsDep, settings: SettingsDep,
                           celery: CeleryDep, owner: OwnerDep, body: ChatCompletionBody = Body(...)):
    return await _run(request, store, streams, settings, celery, owner, "chat.completions", body)


async def _run(request: Request, store: JobStore, streams: AsyncStreams, settings, celery, owner: str,
               endpoint: str, body: dict[str, Any]):
    stream = bool(body.get("stream"))
    job, _ = await run_in_threadpool(submit, store, settings, celery, owner, endpoint, body, stream=stream)
    if stream:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(_sse(store, streams, job.id, job.model, endpoint, include_usage),
                                 media_type="text/event-stream")
    done = await _wait_unless_disconnected(request, streams, job.id)
    if done is _GONE:
        await cancel_shielded(store, job.id)
        return Response(status_code=CLIENT_CLOSED)
    if done is None or done.status not in TERMINAL:
        await cancel_shielded(store, job.id)
        raise APIError(504, f"the job did not finish within {SYNC_TIMEOUT_S:.0f} s", type="timeout")
    if done.status == JobStatus.SUCCEEDED:
        return done.result
    raise_job_error(done)


_GONE = object()


async def _wait_unless_disconnected(request: Request, streams: AsyncStreams, job_id: str):
    """The job once terminal, or _GONE as soon as the client disconnects."""
    waiter = asyncio.ensure_future(streams.wait_for_terminal(job_id, SYNC_TIMEOUT_S))
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        finished, _ = await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiter, gone):
            if not task.done():
                task.cancel()
    if waiter in finished:
        return waiter.result()
    return _GONE


async def _disconnect(request: Request) -> None:
    """Returns when the client has closed the connection (the body is read: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_shielded(store: JobStore, job_id: str) -> None:
    """Cancel the job even while this request is itself being cancelled (its client went away)."""
    with anyio.CancelScope(shield=True):
        try:
            await run_in_threadpool(store.request_cancel, job_id)
        except (redis.ConnectionError, redis.TimeoutError):
            pass  # the job runs to its end; nobody reads it


def raise_job_error(job: Job) -> None:
    error = dict(job.error or {"message": f"the job ended {job.status}", "type": "server_error"})
    status = int(error.pop("status_code", 500 if job.status == JobStatus.FAILED else 409))
    raise APIError(status, error.get("message", ""), type=error.get("type", "server_error"),
                   param=error.get("param"), code=error.get("code"))


async def _sse(store: JobStore, streams: AsyncStreams, job_id: str, model: str, endpoint: str,
               include_usage: bool) -> AsyncIterator[str]:
    chat = endpoint == "chat.completions"
    base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{job_id}", "created": int(time.time()), "model": model,
            "object": "chat.completion.chunk" if chat else "text_completion"}
    started: set[int] = set()
    sent: dict[int, int] = {}  # characters sent so far, per choice
    resend: dict[int, int] = {}  # after a restart: characters the rerun regenerates that were sent already
    pending: dict[int, list] = {}  # per choice: [text, finish reason] of the deltas read but not sent yet
    ended = False

    def chunks() -> Iterator[str]:
        """One chunk per choice for the deltas read together: a client that falls behind gets fewer, larger
        chunks instead of falling further behind (OpenAI's chunks may carry any number of tokens)."""
        for index, (text, finish_reason) in sorted(pending.items()):
            if chat:
                delta = {"content": text}
                if index not in started:
                    delta["role"] = "assistant"
                    started.add(index)
                item = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                item = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
            yield _data({**base, "choices": [item]})
        pending.clear()

    try:
        async for batch in streams.event_batches(job_id):
            for event in batch:
                if event["type"] == EventType.RESTART:
                    # A new attempt starts from scratch; a client cannot take text back, so the rerun's text is
                    # sent only past what was already sent (greedy or seeded reruns repeat it exactly).
                    for chunk in chunks():
                        yield chunk
                    resend = dict(sent)
                elif event["type"] == EventType.DELTA:
                    for choice in event["choices"]:
                        index, text = choice["index"], choice["text"]
                        skip = min(resend.get(index, 0), len(text))
                        resend[index] = resend.get(index, 0) - skip
                        text = text[skip:]
                        if not text and choice["finish_reason"] is None:
                            continue
                        sent[index] = sent.get(index, 0) + len(text)
                        entry = pending.setdefault(index, ["", None])
                        entry[0] += text
                        entry[1] = choice["finish_reason"]
                elif event["type"] == EventType.END:
                    for chunk in chunks():
                        yield chunk
                    ended = True
                    job = await streams.get(job_id)
                    if event["status"] == JobStatus.FAILED and job is not None:
                        yield _data({"error": job.error})
                    elif include_usage and job is not None:
                        yield _data({**base, "choices": [], "usage": job.usage})
            for chunk in chunks():
                yield chunk
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        # The answer has started: the status cannot change any more, so the error goes in the stream.
        yield _data({"error": {"message": f"the job store became unavailable ({type(exc).__name__})",
                               "type": "service_unavailable", "param": None, "code": "store_unavailable"}})
    finally:
        if not ended:  # the client went away (or the store did): nobody reads the rest
            await cancel_shielded(store, job_id)
    yield "data: [DONE]\n\n"


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
