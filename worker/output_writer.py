"""One thread that writes every engine step's outputs to Redis in one pipeline.

The engine process's reader thread hands each step's outputs over (a queue put, nothing more), so no Redis round
trip and no JSON holds up the next step's outputs, and no task thread wakes per token. The writer coalesces
whatever steps queued up while it wrote the previous batch, and sends, in one pipeline: the text deltas of jobs
that stream (appended per job, across the coalesced steps), the first-token times, and the results of the jobs
that finished. Then it tells each finished job's task thread whether its finish won (a cancel may have ended it
first).

If Redis is away, the batch is retried with backoff until it comes back: the engine goes on meanwhile, deltas pile
up in memory and are written later, and the task threads wait for their results. A pipeline that broke half-way
may be sent twice: finishes and first-token times are idempotent, a delta could then repeat. Any other error
(Redis refusing writes, a result that cannot be built) fails the attempt of every job in the batch: their tasks
abort them and queue them again (worker/tasks.py).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import redis

from api.job_record import Job, JobStatus
from api.store import JobStore
from api.streams import DeltaChoice, delta_event
from engine.outputs import RequestOutput
from worker.openai_format import chat_body, completion_body, usage

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Tracked:
    """A job inside the engine, as the writer sees it; its task thread waits on `done`."""

    job: Job
    chat: bool
    top_logprobs: int
    first_token_seen: bool = False
    # Whether its text deltas are written as they come: from the start for a job that streams, or from when
    # someone begins to read its events (stream()); until then they are held here, and written first.
    streaming: bool = False
    held: dict[int, DeltaChoice] = field(default_factory=dict)
    stream_expiry_set: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    won: bool = False  # its finish was the one that ended the job
    error: BaseException | None = None  # the engine failed it

    def wait(self) -> bool:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.won


class OutputWriter:
    """The engine's OutputSink (engine/engine_process.py) for a worker's jobs."""

    def __init__(self, store: JobStore, tokenizer) -> None:
        self.store = store
        self.tokenizer = tokenizer
        self._jobs: dict[str, Tracked] = {}
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inferq-writer", daemon=True)
        self._stop = threading.Event()

    def start(self) -> OutputWriter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=10)

    def track(self, job: Job, chat: bool, top_logprobs: int = 0) -> Tracked:
        """Call before submitting the job to the engine."""
        tracked = Tracked(job, chat, top_logprobs, streaming=job.stream)
        with self._lock:
            self._jobs[job.id] = tracked
        return tracked

    def stream(self, job_id: str) -> bool:
        """Write the job's deltas from now on, beginning with what came before. False if it is not here."""
        with self._lock:
            tracked = self._jobs.get(job_id)
            if tracked is not None:
                tracked.streaming = True
        return tracked is not None

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    # ---- OutputSink: called on the engine process's reader thread -----------------------------------------------
    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        self._queue.put(outputs)

    def on_failed(self, request_ids: list[str], exc: BaseException) -> None:
        self._queue.put((request_ids, exc))

    # ---- the writer thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            items = [self._queue.get()]
            while True:  # coalesce every step that queued up meanwhile
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            outputs: list[RequestOutput] = []
            for item in items:
                if item is None:
                    continue
                if isinstance(item, tuple):
                    self._fail(*item)
                else:
                    outputs += item
            if outputs:
                try:
                    self._write(outputs)
                except Exception:  # noqa: BLE001 - never let the writer die: every waiting job depends on it
                    log.exception("writing %d engine outputs failed", len(outputs))

    def _fail(self, request_ids: list[str], exc: BaseException) -> None:
        for request_id in request_ids:
            with self._lock:
                tracked = self._jobs.get(request_id)
            if tracked is not None:
                self._end(request_id, tracked, won=False, error=exc)

    def _write(self, outputs: list[RequestOutput]) -> None:
        deltas: dict[str, dict[int, DeltaChoice]] = {}
        first: list[str] = []
        finals: dict[str, tuple[Tracked, RequestOutput]] = {}
        with self._lock:
            jobs = {o.request_id: self._jobs.get(o.request_id) for o in outputs}
        for output in outputs:
            tracked = jobs[output.request_id]
            if tracked is None:
                continue
            if not tracked.first_token_seen and any(c.token_ids for c in output.outputs):
                tracked.first_token_seen = True
                first.append(output.request_id)
            if tracked.streaming:
                merged = deltas.setdefault(output.request_id, tracked.held)
                tracked.held = {}
            else:
                merged = tracked.held
            for c in output.outputs:
                if not (c.delta_token_ids or c.delta_text or c.finish_reason):
                    continue
                entry = merged.setdefault(c.index, {"index": c.index, "text": "", "finish_reason": None})
                entry["text"] += c.delta_text
                entry["finish_reason"] = c.finish_reason
            if output.finished:
                finals[output.request_id] = (tracked, output)
        try:
            results = {job_id: self._result(tracked, output) for job_id, (tracked, output) in finals.items()}
            replies = self._send(deltas, first, results, jobs)
        except Exception as exc:  # noqa: BLE001 - e.g. Redis refusing writes (out of memory)
            # Every job of the batch lost something (its result, or deltas its readers will never see): that
            # attempt fails, its task aborts it and queues it again, and readers are told to start over.
            failed = [(job_id, tracked) for job_id, tracked in jobs.items() if tracked is not None]
            log.error("could not write the outputs of %d job(s); failing their attempts: %s", len(failed), exc)
            for job_id, tracked in failed:
                self._end(job_id, tracked, won=False, error=exc)
        else:
            for (job_id, (tracked, _)), won in zip(finals.items(), replies):
                self._end(job_id, tracked, won=bool(won))

    def _end(self, job_id: str, tracked: Tracked, won: bool, error: BaseException | None = None) -> None:
        tracked.won, tracked.error = won, error
        with self._lock:
            self._jobs.pop(job_id, None)
        tracked.done.set()

    def _result(self, tracked: Tracked, output: RequestOutput) -> dict:
        job = tracked.job
        aborted = any(c.finish_reason == "abort" for c in output.outputs)
        if tracked.chat:
            body = chat_body(job.id, job.model, output, self.tokenizer, tracked.top_logprobs)
        else:
            body = completion_body(job.id, job.model, output, self.tokenizer)
        return {"status": JobStatus.CANCELLED if aborted else JobStatus.SUCCEEDED, "result": body,
                "usage": usage(output)}

    def _send(self, deltas, first, results, jobs) -> list:
        """One pipeline for the whole batch; retried until Redis takes it. The finishes' replies, in order."""
        delay = 0.1
        while True:
            pipe = self.store.r.pipeline(transaction=False)
            for job_id, choices in deltas.items():
                tracked = jobs[job_id]
                self.store.append_stream(job_id, delta_event(list(choices.values())), pipe=pipe,
                                         expire=not tracked.stream_expiry_set)
            for job_id in first:
                self.store.mark_first_token(job_id, pipe=pipe)
            for job_id, outcome in results.items():
                self.store.finish(job_id, outcome["status"], result=outcome["result"], usage=outcome["usage"],
                                  model=jobs[job_id].job.model, pipe=pipe)
            try:
                replies = pipe.execute()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if self._stop.is_set():
                    raise
                log.warning("Redis unavailable (%s); retrying %d outputs in %.1f s", exc, len(jobs), delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            for job_id in deltas:
                jobs[job_id].stream_expiry_set = True
            return replies[len(replies) - len(results):] if results else []
