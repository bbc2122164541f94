"""Celery tasks. `generate`: job id -> engine -> job store, streaming text deltas as they come."""
from __future__ import annotations

import logging

from api.metrics import record_finished
from api.schemas import ENDPOINTS, ChatCompletionRequest, CompletionRequest, error_body
from api.store import Job, JobStore
from engine.sampling_params import SamplingParams
from worker.batch_tasks import on_job_finished
from worker.celery_app import GENERATE_TASK, app
from worker.openai_format import chat_body, completion_body, usage
from worker.runtime import WorkerRuntime, get_runtime
from worker.webhooks import enqueue_event

log = logging.getLogger(__name__)


@app.task(name=GENERATE_TASK)
def generate(job_id: str, dispatch: int) -> None:
    runtime = get_runtime()
    # Leased from here to the end, result recorded included: if this process dies, a live worker re-runs the
    # job or, if it already finished, settles what the dead one had not recorded yet (worker/recovery.py).
    job = runtime.store.mark_running(job_id, dispatch, runtime.worker_id)
    if job is None:
        log.info("job %s: message %d is not its newest, or the job runs or ended; skipping it", job_id, dispatch)
        return
    runtime.active.add(job_id)
    try:
        _run(runtime, job)
    finally:
        runtime.end(job_id)


def _run(runtime: WorkerRuntime, job: Job) -> None:
    store, job_id = runtime.store, job.id
    if job.attempts > 1:
        # A redelivery after a worker died: clients reading the stream start over from this event.
        store.append_stream(job_id, {"type": "restart", "attempt": job.attempts})
    else:
        enqueue_event(store, job, "start")  # once per job: a redelivery does not start it again for the client
    try:
        body = ENDPOINTS[job.endpoint].model_validate(job.request)
        params = SamplingParams(**body.sampling_kwargs())
        prompt_ids = _prompt_ids(runtime, body)
        _check_context(runtime, len(prompt_ids), params.max_tokens)
        # Batch lines stream no tokens (their result goes to the batch's output file): with hundreds of them in the
        # engine, per-token wake-ups and Redis writes would slow the interactive requests beside them.
        stream = runtime.engine.submit(job_id, prompt_ids, params, job.priority, incremental=not job.bulk)
    except ValueError as exc:
        _finish(store, job_id, "failed", error=error_body(str(exc))["error"] | {"status_code": 400})
        return

    if store.cancel_requested(job_id):  # a cancel that came before the listener could see this job
        runtime.engine.abort(job_id)
    first_token = True
    for output in stream:
        deltas = [{"index": c.index, "text": c.delta_text, "finish_reason": c.finish_reason}
                  for c in output.outputs if c.delta_token_ids or c.delta_text or c.finish_reason]
        if first_token and any(c.delta_token_ids for c in output.outputs):
            store.mark_first_token(job_id)
            first_token = False
        if deltas and not job.bulk:
            store.append_stream(job_id, {"type": "delta", "choices": deltas})

    final = stream.final
    aborted = any(c.finish_reason == "abort" for c in final.outputs)
    status = "cancelled" if aborted else "succeeded"
    if isinstance(body, ChatCompletionRequest):
        result = chat_body(job_id, job.model, final, runtime.tokenizer, body.top_logprobs or 0)
    else:
        result = completion_body(job_id, job.model, final, runtime.tokenizer)
    _finish(store, job_id, status, result=result, usage=usage(final))  # also ends the stream


def _finish(store: JobStore, job_id: str, status: str, **outcome) -> None:
    """store.finish, then the "completed" webhook if this call is the one that ended the job (a cancel or a
    duplicate delivery that won first sends nothing here)."""
    if store.finish(job_id, status, **outcome):
        job = store.get(job_id)  # re-read: the payload carries the final result and timestamps
        if job is not None:
            record_finished(store, job)
            on_job_finished(store, job)
            enqueue_event(store, job, "completed")


def _check_context(runtime: WorkerRuntime, prompt_len: int, max_tokens: int | None) -> None:
    limit = runtime.engine.engine.max_model_len
    if max_tokens is not None and prompt_len + max_tokens > limit:
        raise ValueError(f"this model's context is {limit} tokens, but the prompt has {prompt_len} tokens and "
                         f"max_tokens is {max_tokens} ({prompt_len + max_tokens} in all): shorten the prompt or "
                         "lower max_tokens")


def _prompt_ids(runtime: WorkerRuntime, body: CompletionRequest | ChatCompletionRequest) -> list[int]:
    """Tokenized here, in the task's thread, so the engine loop does not pay for it."""
    tokenizer = runtime.tokenizer
    if isinstance(body, CompletionRequest):
        if isinstance(body.prompt, list):
            return body.prompt
        return tokenizer.encode(body.prompt) if body.prompt else []
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"model {runtime.model_name} has no chat template; use /v1/completions")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        # Token ids straight from the template: its text already holds the BOS token, so re-encoding would
        # add a second one.
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    except Exception as exc:  # jinja raises for e.g. non-alternating roles: the caller's error
        raise ValueError(f"messages do not fit the model's chat template: {exc}") from exc
