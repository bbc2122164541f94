"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions (through the same queue)."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Body
from fastapi.responses import StreamingResponse

from api.deps import APIError, CeleryDep, OwnerDep, SettingsDep, StoreDep
from api.store import JobStore
from api.submit import submit

router = APIRouter(prefix="/v1", tags=["openai"])

# How long a synchronous OpenAI call waits for its job; a client wanting longer uses /v1/jobs.
SYNC_TIMEOUT_S = 600.0


@router.get("/models")
def list_models(store: StoreDep, _: OwnerDep) -> dict:
    data = []
    for name, workers in sorted(store.models().items()):
        if workers:
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "inferq",
                         "max_model_len": min(int(w.get("max_model_len", 0)) for w in workers),
                         # The weight formats its workers run (--load-in-low-bit); empty: the checkpoint's own.
                         "load_in_low_bit": sorted({w["load_in_low_bit"] for w in workers
                                                    if w.get("load_in_low_bit")})})
    return {"object": "list", "data": data}


@router.post("/completions")
def completions(store: StoreDep, settings: SettingsDep, celery: CeleryDep, owner: OwnerDep,
                body: dict[str, Any] = Body(...)):
    return _run(store, settings, celery, owner, "completions", body)


@router.post("/chat/completions")
def chat_completions(store: StoreDep, settings: SettingsDep, celery: CeleryDep, owner: OwnerDep,
                     body: dict[str, Any] = Body(...)):
    return _run(store, settings, celery, owner, "chat.completions", body)


def _run(store: JobStore, settings, celery, owner: str, endpoint: str, body: dict[str, Any]):
    job, _ = submit(store, settings, celery, owner, endpoint, body)
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(_sse(store, job.id, job.model, endpoint, include_usage),
                                 media_type="text/event-stream")
    done = store.wait_for_terminal(job.id, SYNC_TIMEOUT_S)
    if done is None:
        store.request_cancel(job.id)
        raise APIError(504, f"the job did not finish within {SYNC_TIMEOUT_S:.0f} s", type="timeout")
    if done.status == "succeeded":
        return done.result
    raise_job_error(done)


def raise_job_error(job) -> None:
    error = dict(job.error or {"message": f"the job ended {job.status}", "type": "server_error"})
    status = int(error.pop("status_code", 500 if job.status == "failed" else 409))
    raise APIError(status, error.get("message", ""), type=error.get("type", "server_error"),
                   param=error.get("param"), code=error.get("code"))


def job_events(store: JobStore, job_id: str) -> Iterator[dict]:
    """The job's stream events in order until its end event (a restart event means: discard what came before)."""
    last = "0"
    while True:
        for last, event in store.read_stream(job_id, last, block_ms=1000):
            yield event
            if event.get("type") == "end":
                return


def _sse(store: JobStore, job_id: str, model: str, endpoint: str, include_usage: bool) -> Iterator[str]:
    chat = endpoint == "chat.completions"
    base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{job_id}", "created": int(time.time()), "model": model,
            "object": "chat.completion.chunk" if chat else "text_completion"}
    started: set[int] = set()
    sent: dict[int, int] = {}  # characters sent so far, per choice
    resend: dict[int, int] = {}  # after a restart: characters the rerun regenerates that were sent already
    for event in job_events(store, job_id):
        if event["type"] == "restart":
            # The worker died and a new attempt starts from scratch; a client cannot take text back, so the rerun's
            # text is sent only past what was already sent (greedy or seeded reruns repeat it exactly).
            resend = dict(sent)
        elif event["type"] == "delta":
            for choice in event["choices"]:
                index, text = choice["index"], choice["text"]
                skip = min(resend.get(index, 0), len(text))
                resend[index] = resend.get(index, 0) - skip
                text = text[skip:]
                if not text and choice["finish_reason"] is None:
                    continue
                sent[index] = sent.get(index, 0) + len(text)
                if chat:
                    delta = {"content": text}
                    if index not in started:
                        delta["role"] = "assistant"
                        started.add(index)
                    item = {"index": index, "delta": delta, "logprobs": None, "finish_reason": choice["finish_reason"]}
                else:
                    item = {"index": index, "text": text, "logprobs": None, "finish_reason": choice["finish_reason"]}
                yield _data({**base, "choices": [item]})
        elif event["type"] == "end":
            job = store.get(job_id)
            if event["status"] == "failed" and job is not None:
                yield _data({"error": job.error})
            elif include_usage and job is not None:
                yield _data({**base, "choices": [], "usage": job.usage})
    yield "data: [DONE]\n\n"


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
