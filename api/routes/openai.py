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
from api.openai_compat import SYSTEM_FINGERPRINT, finish_reason, usage_body
from api.responses import ChatCompletion, Completion, ModelCard, ModelList, errors, json_or_events, ok
from api.schemas import ChatCompletionRequest, CompletionRequest, raw_json_object
from api.store import JobStore
from api.streams import AsyncStreams, EventType, join_logprobs, logprobs_from, logprobs_len
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
    served = sorted(store.registry.snapshot()[0].items())
    created = store.registry.created([name for name, _ in served])
    return {"object": "list", "data": [_model(name, workers, created.get(name, 0)) for name, workers in served]}


@router.get("/models/{model:path}", response_model=None, responses=ok(ModelCard) | errors(401, 404, 503))
def retrieve_model(model: str, store: StoreDep, _: OwnerDep) -> dict:
    workers = store.registry.snapshot()[0].get(model)
    if not workers:
        raise APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
    return _model(model, workers, store.registry.created([model]).get(model, 0))


def _model(name: str, workers: list[dict], created: int) -> dict:
    # `created`: when a worker first announced the model (api/registry.py).
    return {"id": name, "object": "model", "created": created, "owned_by": "inferq",
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
        options = body.get("stream_options") or {}
        # vLLM's continuous_usage_stats: every chunk carries the usage so far (the worker writes it with each delta).
        return StreamingResponse(_sse(store, streams, job, endpoint, bool(options.get("include_usage")),
                                      bool(options.get("continuous_usage_stats")), int(body.get("n") or 1)),
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


async def _sse(store: JobStore, streams: AsyncStreams, job: Job, endpoint: str, include_usage: bool = False,
               continuous_usage: bool = False, n: int = 1) -> AsyncIterator[str]:
    job_id = job.id
    chat = endpoint == "chat.completions"
    # The same id, created and fingerprint as the job's stored result (worker/openai_format.py).
    base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{job_id}", "created": int(job.created_at or time.time()),
            "model": job.model, "system_fingerprint": SYSTEM_FINGERPRINT,
            "object": "chat.completion.chunk" if chat else "text_completion"}
    sent: dict[int, int] = {}  # characters sent so far, per choice
    resend: dict[int, int] = {}  # after a restart: characters the rerun regenerates that were sent already
    # per choice: [text, finish reason, tool calls, logprobs] of the deltas read, not sent
    pending: dict[int, list] = {}
    calls_sent: dict[int, int] = {}  # tool calls sent so far, per choice
    calls_resend: dict[int, int] = {}  # after a restart: calls the rerun makes again that were sent already
    # The same for the tokens whose logprobs were sent: counted per token, not per character, so a rerun's
    # logprobs are skipped exactly as far as they were sent, wherever its text deltas split.
    logprobs_sent: dict[int, int] = {}
    logprobs_resend: dict[int, int] = {}
    usage: dict | None = None  # with continuous_usage: the newest usage the worker wrote
    roles_sent = False
    ended = False

    def roles() -> Iterator[str]:
        """A chat stream opens with a role-only chunk per choice, as OpenAI's and vLLM's do."""
        nonlocal roles_sent
        if chat and not roles_sent:
            roles_sent = True
            first = {} if not continuous_usage else {
                "usage": usage_body((usage or {}).get("prompt_tokens", 0), 0)}
            for index in range(n):
                yield _data({**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}], **first})

    def chunks() -> Iterator[str]:
        """One chunk per choice for the deltas read together: a client that falls behind gets fewer, larger
        chunks instead of falling further behind (OpenAI's chunks may carry any number of tokens)."""
        yield from roles()
        extra = {"usage": usage} if continuous_usage and usage is not None else {}
        for index, (text, reason, calls, logprobs) in sorted(pending.items()):
            if chat:
                delta = {"content": text} if text or not calls else {}
                if calls:  # whole calls (worker/output_writer.py holds a call's text until it is complete)
                    delta["tool_calls"] = calls
                item = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason(reason)}
            else:
                item = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(reason)}
            yield _data({**base, "choices": [item], **extra})
        pending.clear()

    try:
        if not continuous_usage:  # at once (with usage, the first chunk waits for the prompt's token count)
            for chunk in roles():
                yield chunk
        async for batch in streams.event_batches(job_id):
            for event in batch:
                if event["type"] == EventType.RESTART:
                    # A new attempt starts from scratch; a client cannot take text back, so the rerun's text is
                    # sent only past what was already sent (greedy or seeded reruns repeat it exactly), and its
                    # logprobs only past the tokens whose logprobs were sent.
                    for chunk in chunks():
                        yield chunk
                    resend, calls_resend, logprobs_resend = dict(sent), dict(calls_sent), dict(logprobs_sent)
                elif event["type"] == EventType.DELTA:
                    usage = event.get("usage") or usage
                    for choice in event["choices"]:
                        index, text = choice["index"], choice["text"]
                        text = text[_repeated(resend, index, len(text)):]
                        calls = choice.get("tool_calls") or []
                        calls = calls[_repeated(calls_resend, index, len(calls)):]
                        logprobs = choice.get("logprobs")
                        skip = _repeated(logprobs_resend, index, logprobs_len(logprobs))
                        logprobs = logprobs_from(logprobs, skip) if skip < logprobs_len(logprobs) else None
                        if not text and not calls and logprobs is None and choice["finish_reason"] is None:
                            continue
                        sent[index] = sent.get(index, 0) + len(text)
                        calls_sent[index] = calls_sent.get(index, 0) + len(calls)
                        logprobs_sent[index] = logprobs_sent.get(index, 0) + logprobs_len(logprobs)
                        entry = pending.setdefault(index, ["", None, [], None])
                        entry[0] += text
                        entry[1] = choice["finish_reason"]
                        entry[2] += calls
                        entry[3] = join_logprobs(entry[3], logprobs)
                elif event["type"] == EventType.END:
                    for chunk in chunks():
                        yield chunk
                    ended = True
                    job = await streams.get(job_id)
                    if event["status"] == JobStatus.FAILED and job is not None:
                        yield _data({"error": {k: v for k, v in (job.error or {}).items() if k != "status_code"}})
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


def _repeated(resend: dict[int, int], index: int, size: int) -> int:
    """How many of a delta's `size` new items (characters, calls, tokens) of choice `index` a rerun repeats from
    before its restart: they were sent already. Counts them off `resend`."""
    skip = min(resend.get(index, 0), size)
    resend[index] = resend.get(index, 0) - skip
    return skip


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
