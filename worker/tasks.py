"""The `generate` task: job id -> engine -> job store. The task thread prepares the request and waits; the
engine's outputs reach Redis through the worker's one writer (worker/output_writer.py).

Every way out of a task ends the job or queues it again: a bad request fails it (400, in OpenAI's shape); any other
exception (a Redis error, a bug, an engine failure) aborts it in the engine and queues it again, up to
INFERQ_JOB_MAX_ATTEMPTS runs, after which it fails with a server error. If even that cannot be recorded (Redis
away for long), the job stays leased to this worker with no task running it, and the worker's sweeper
(worker/runtime.py) queues it again once Redis answers.
"""
from __future__ import annotations

import logging
from dataclasses import replace

from celery import bootsteps

from api.celery_client import GENERATE_TASK, app
from api.job_record import Job, JobStatus
from api.lifecycle import run_again_or_end, settle
from api.schemas import ENDPOINTS, ChatCompletionRequest, CompletionRequest, error_body
from api.streams import restart_event, sent_so_far
from api.tool_calls import constraint
from api.webhook_events import enqueue_event
from engine.sampling_params import SamplingParams, StructuredOutputsParams
from engine.structured_output import grammar_for
from worker.patience import patiently
from worker.runtime import WorkerRuntime, get_runtime

log = logging.getLogger(__name__)


class ResendAfterReconnect(bootsteps.StartStopStep):
    """Celery drops the messages a consumer had taken but not started when its broker connection breaks, and
    kombu's Redis transport may fail to give them back: after every reconnect (or restart of the Celery worker in
    this process), the queued jobs' messages are sent again (older ones become stale), so no queued job waits for a
    message that is gone."""

    requires = {"celery.worker.consumer.tasks:Tasks"}
    starts = 0  # per process: a Celery worker started again in the same process (worker/cli.py) counts too

    def start(self, parent) -> None:
        ResendAfterReconnect.starts += 1
        if ResendAfterReconnect.starts > 1:
            log.warning("the broker connection came back: sending the queued jobs' messages again")
            get_runtime().after_consumer_restart()


app.steps["consumer"].add(ResendAfterReconnect)


@app.task(name=GENERATE_TASK)
def generate(job_id: str, dispatch: int) -> None:
    runtime = get_runtime()
    # In `active` before the lease exists, so the sweeper never takes a job whose task is just starting.
    runtime.active.add(job_id)
    try:
        # Leased from here to its end: if this process dies, a live worker runs the job again (worker/recovery.py).
        job = patiently(lambda: runtime.store.mark_running(job_id, dispatch, runtime.worker_id))
        if job is None:
            log.info("job %s: message %d is not its newest, or the job runs or ended; skipping it", job_id, dispatch)
            return
        try:
            run(runtime, job)
        except Exception as exc:  # noqa: BLE001 - every exception ends the job or queues it again
            log.exception("job %s failed on attempt %d", job_id, job.attempts)
            runtime.writer.forget(job_id)
            _abort_quietly(runtime, job_id)
            retry_or_fail(runtime, job, exc)
    finally:
        runtime.active.discard(job_id)


def run(runtime: WorkerRuntime, job: Job) -> None:
    store = runtime.store
    if job.attempts == 1:
        enqueue_event(store, job, "start")  # once per job: a rerun does not start it again for the client
    try:
        body = ENDPOINTS[job.endpoint].model_validate(job.request)
        params = SamplingParams(**body.sampling_kwargs())
        tool_parser = None
        if isinstance(body, ChatCompletionRequest) and body.uses_tools():
            tool_parser = runtime.tool_call_parser
            tag = constraint(tool_parser, body.tool_definitions(), body.tool_choice_value(), body.parallel_tool_calls)
            params = replace(params, structured_outputs=StructuredOutputsParams(structural_tag=tag))
        if params.structured_outputs is not None:  # a bad schema, regex or grammar: the caller's, before the engine
            grammar_for(params.structured_outputs)
        prompts = _prompts(runtime, body)  # a completion may have several, each an engine request of its own
        for prompt_ids in prompts:
            _check_context(runtime, len(prompt_ids), params.max_tokens)
    except ValueError as exc:
        _fail_as_invalid(store, job, exc)
        return
    resumable = runtime.settings.resume_checkpoint_tokens > 0 and params.logprobs is None
    resume, sent = _resume_point(runtime, job, resumable)
    chat = isinstance(body, ChatCompletionRequest)
    tracked = runtime.writer.track(job, chat, (body.top_logprobs or 0) if chat else 0, prompts, params.n,
                                   tool_parser, resumable, resume, sent)
    try:
        # Non-streaming jobs get outputs only at their first token, every few dozen tokens (to save them for a
        # resume) and at their end: no per-token work.
        runtime.submit(job.id, prompts, params, job.priority, incremental=job.stream, resume=resume,
                       checkpoint_every=runtime.settings.resume_checkpoint_tokens if resumable else None)
    except ValueError as exc:  # the engine refused it (an empty prompt, a token id past the vocabulary): no rerun
        runtime.writer.forget(job.id)
        _fail_as_invalid(store, job, exc)
        return
    # A cancel, or a reader of its events, that came before the listener could know this job.
    cancel, deltas = store.requests_while_starting(job.id)
    if cancel:
        runtime.abort(job.id)
    elif deltas and not job.stream:
        runtime.stream_deltas(job.id)
    if tracked.wait():
        settle(store, store.get(job.id))


def _resume_point(runtime: WorkerRuntime, job: Job, resumable: bool) -> tuple[dict[int, list[int]], tuple | None]:
    """A rerun's starting point: per choice, the output tokens its earlier attempts saved, and what of their text
    its stream holds (api/streams.sent_so_far): it continues from there, and its readers see one output. With
    nothing to resume from (a first run, a job that saves nothing: one that asked for logprobs, which are not
    saved), it starts over, and its stream's readers are told to drop what came before."""
    store = runtime.store
    if job.attempts == 1:
        return {}, None
    resume = store.read_progress(job.id) if resumable else {}
    if not resume:
        if job.stream:
            store.append_stream(job.id, restart_event(job.attempts))
        return {}, None
    num_tokens = sum(map(len, resume.values()))
    store.record_resume(job.id, num_tokens)
    log.info("job %s resumes on attempt %d from %d saved tokens", job.id, job.attempts, num_tokens)
    return resume, sent_so_far([event for _, event in store.read_stream(job.id)])


def _fail_as_invalid(store, job: Job, exc: ValueError) -> None:
    """The request itself is wrong: the job fails as the caller's error (400), on its first attempt."""
    if store.finish(job.id, JobStatus.FAILED, error=error_body(str(exc))["error"] | {"status_code": 400}):
        settle(store, store.get(job.id))


def retry_or_fail(runtime: WorkerRuntime, job: Job, exc: BaseException) -> None:
    """Queue the job again (a new message), or end it: failed after its last attempt, cancelled if asked."""
    reason = f"the job failed on its worker: {type(exc).__name__}: {exc}"
    try:
        status = patiently(lambda: run_again_or_end(runtime.store, job.id, job.model, reason, "worker_error",
                                                    runtime.settings.job_max_attempts))
        if status == JobStatus.QUEUED:
            log.warning("job %s queued again after attempt %d", job.id, job.attempts)
    except Exception:  # noqa: BLE001 - still leased here: the sweeper takes it once Redis answers
        log.exception("job %s could not be queued again; the sweeper will", job.id)


def _abort_quietly(runtime: WorkerRuntime, job_id: str) -> None:
    try:
        runtime.abort(job_id)
    except Exception:  # noqa: BLE001 - the engine may be what failed
        log.exception("could not abort job %s in the engine", job_id)


def _check_context(runtime: WorkerRuntime, prompt_len: int, max_tokens: int | None) -> None:
    limit = runtime.engine.max_model_len
    if max_tokens is not None and prompt_len + max_tokens > limit:
        raise ValueError(f"this model's context is {limit} tokens, but the prompt has {prompt_len} tokens and "
                         f"max_tokens is {max_tokens} ({prompt_len + max_tokens} in all): shorten the prompt or "
                         "lower max_tokens")


def _prompts(runtime: WorkerRuntime, body: CompletionRequest | ChatCompletionRequest) -> list[list[int]]:
    """The token ids of each prompt, tokenized here, in the task's thread, so the engine loop does not pay for it."""
    if isinstance(body, CompletionRequest):
        return [p if isinstance(p, list) else runtime.tokenizer.encode(p) for p in body.prompts()]
    return [_prompt_ids(runtime, body)]


def _prompt_ids(runtime: WorkerRuntime, body: ChatCompletionRequest) -> list[int]:
    """A chat's prompt: its messages through the model's chat template."""
    tokenizer = runtime.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"model {runtime.model_name} has no chat template; use /v1/completions")
    messages = [m.template_fields() for m in body.messages]
    # The template renders the tools (templates that know none leave them out; the grammar still holds the reply).
    tools = body.tool_definitions() if body.uses_tools() else None
    try:
        # Token ids straight from the template: its text already holds the BOS token, so re-encoding would
        # add a second one.
        return list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    except Exception as exc:  # jinja raises for e.g. non-alternating roles: the caller's error
        raise ValueError(f"messages do not fit the model's chat template: {exc}") from exc
