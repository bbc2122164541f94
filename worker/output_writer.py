"""One thread that writes every engine step's outputs to Redis in one pipeline.

The engine process's reader thread hands each step's outputs over (a queue put, nothing more), so no Redis round
trip and no JSON holds up the next step's outputs, and no task thread wakes per token. The writer coalesces
whatever steps queued up while it wrote the previous batch, and sends, in one pipeline: the text deltas of jobs
that stream (appended per job, across the coalesced steps; with their tokens' logprobs for OpenAI streams that
asked), the first-token times, and the results of the jobs that finished. Then it tells each finished job's task
thread whether its finish won (a cancel may have ended it first).

Jobs that can resume (worker/tasks.py) also get their new output tokens appended to their progress list, in the
same transaction as their text deltas: every token whose text a reader has seen is saved, so a rerun after a crash
continues from there (a job that does not stream gets its tokens saved every few dozen, as the engine sends them:
LLMEngine.add_request's checkpoint_every). A resumed job's writer leaves out of its stream the text its earlier
attempts wrote there already: its readers see one unbroken output.

If Redis is away, the batch is retried with backoff until it comes back: the engine goes on meanwhile, deltas pile
up in memory and are written later, and the task threads wait for their results. A transaction whose reply was
lost may be sent twice: finishes, first-token times and saved tokens (each saved with its position) are
idempotent, a delta could then repeat. Any other error
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
from api.openai_compat import finish_reason, usage_body
from api.schemas import CompletionRequest
from api.store import JobStore
from api.streams import DeltaChoice, delta_event, join_logprobs
from api.tool_calls import ToolCallStream
from engine.outputs import RequestOutput
from worker.openai_format import LogprobStream, chat_body, completion_body, echo_texts, usage

log = logging.getLogger(__name__)


def engine_request_id(job_id: str, part: int, parts: int) -> str:
    """A job runs as one engine request per prompt (a completion may have several): "{job id}#{k}", or the job's
    own id for the usual single prompt."""
    return job_id if parts == 1 else f"{job_id}#{part}"


def split_request_id(request_id: str) -> tuple[str, int]:
    """(job id, prompt index) of an engine request id."""
    job_id, _, part = request_id.partition("#")
    return job_id, int(part or 0)


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
    # Its engine requests, one per prompt: prompt k's choice i is the job's choice k * n + i; the job is finished
    # when every part is.
    n: int = 1
    prompt_lens: list[int] = field(default_factory=list)
    parts: dict[int, RequestOutput] = field(default_factory=dict)
    echo: list[str] | None = None  # completions' echo: each prompt's text, written before its choices' text
    echoed: set[int] = field(default_factory=set)
    tokens: dict[int, int] = field(default_factory=dict)  # generated so far, per choice
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats: every delta carries usage
    # A chat with tools: the format its tool calls come in, and per choice the stream that splits them from text.
    tool_parser: str | None = None
    tool_streams: dict[int, ToolCallStream] = field(default_factory=dict)
    logprob_streams: dict[int, LogprobStream] = field(default_factory=dict)  # per choice, of an OpenAI stream
    # Resuming (see the module's docstring): whether its tokens are saved; per choice, how many are, and those
    # not yet; the text and tool calls its earlier attempts wrote to its stream, not to be written again.
    resumable: bool = False
    saved: dict[int, int] = field(default_factory=dict)
    unsaved: dict[int, list[int]] = field(default_factory=dict)
    progress_expiry_set: bool = False
    resent: dict[int, int] = field(default_factory=dict)
    calls_resent: dict[int, int] = field(default_factory=dict)

    @property
    def num_parts(self) -> int:
        return len(self.prompt_lens) or 1

    def usage_so_far(self) -> dict:
        return usage_body(sum(self.prompt_lens), sum(self.tokens.values()))

    def keep_for_resume(self, index: int, start: int, token_ids: list[int]) -> None:
        """Choice `index`'s tokens from output position `start` on: those not saved or kept already wait for the
        next save (a resumed job's first output repeats the tokens it resumed from)."""
        have = self.saved.get(index, 0) + len(self.unsaved.get(index, ()))
        new = token_ids[max(0, have - start):]
        if new:
            self.unsaved.setdefault(index, []).extend(new)

    def progress_entry(self) -> dict[int, list]:
        """The tokens to save now, per choice: [position of the first, token ids]."""
        return {index: [self.saved.get(index, 0), list(ids)] for index, ids in self.unsaved.items()}

    def progress_saved(self, entry: dict[int, list]) -> None:
        for index, (_, ids) in entry.items():
            self.saved[index] = self.saved.get(index, 0) + len(ids)
            del self.unsaved[index][:len(ids)]
            if not self.unsaved[index]:
                del self.unsaved[index]

    def drop_resent(self, choices: list[DeltaChoice]) -> list[DeltaChoice]:
        """The deltas without the text and tool calls that earlier attempts wrote to the stream already (a resumed
        job generates them again, identically, from its saved tokens); choices left with nothing are dropped."""
        if not self.resent and not self.calls_resent:
            return choices
        kept = []
        for choice in choices:
            index = choice["index"]
            skip = min(self.resent.get(index, 0), len(choice["text"]))
            calls = choice.get("tool_calls") or []
            skip_calls = min(self.calls_resent.get(index, 0), len(calls))
            if skip or skip_calls:
                self.resent[index] = self.resent.get(index, 0) - skip
                self.calls_resent[index] = self.calls_resent.get(index, 0) - skip_calls
                choice = {**choice, "text": choice["text"][skip:]}
                if calls:
                    choice["tool_calls"] = calls[skip_calls:]
            if choice["text"] or choice.get("tool_calls") or choice["finish_reason"] is not None:
                kept.append(choice)
        return kept

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

    def track(self, job: Job, chat: bool, top_logprobs: int = 0, prompts: list[list[int]] | None = None,
              n: int = 1, tool_parser: str | None = None, resumable: bool = False,
              resume: dict[int, list[int]] | None = None, sent: tuple[dict, dict] | None = None) -> Tracked:
        """Call before submitting the job to the engine; `prompts`: its prompts' token ids, one engine request
        each (engine_request_id); `tool_parser`: the format of the tool calls its replies may hold; `resumable`:
        save its tokens as they come; `resume`: per choice, the saved tokens this attempt resumes from; `sent`:
        (characters, tool calls) per choice that its stream holds already (api/streams.sent_so_far)."""
        tracked = Tracked(job, chat, top_logprobs, streaming=job.stream, n=n,
                          prompt_lens=[len(p) for p in prompts or ()], tool_parser=tool_parser, resumable=resumable,
                          saved={index: len(ids) for index, ids in (resume or {}).items()})
        if sent is not None:
            tracked.resent, tracked.calls_resent = dict(sent[0]), dict(sent[1])
        options = job.request.get("stream_options")
        tracked.continuous_usage = isinstance(options, dict) and bool(options.get("continuous_usage_stats"))
        if not chat and job.request.get("echo"):
            tracked.echo = echo_texts(CompletionRequest.model_validate(job.request).prompts(), self.tokenizer)
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
        for job_id in dict.fromkeys(split_request_id(request_id)[0] for request_id in request_ids):
            with self._lock:
                tracked = self._jobs.get(job_id)
            if tracked is not None:
                self._end(job_id, tracked, won=False, error=exc)

    def _write(self, outputs: list[RequestOutput]) -> None:
        deltas: dict[str, dict[int, DeltaChoice]] = {}
        first: list[str] = []
        finals: dict[str, Tracked] = {}
        with self._lock:
            jobs = {job_id: self._jobs.get(job_id) for job_id in {split_request_id(o.request_id)[0] for o in outputs}}
        for output in outputs:
            job_id, part = split_request_id(output.request_id)
            tracked = jobs[job_id]
            if tracked is None:
                continue
            if not tracked.first_token_seen and any(c.token_ids for c in output.outputs):
                tracked.first_token_seen = True
                first.append(job_id)
            if tracked.streaming:
                merged = deltas.setdefault(job_id, tracked.held)
                tracked.held = {}
            else:
                merged = tracked.held
            for c in output.outputs:
                index = part * tracked.n + c.index
                echo = tracked.echo[part] if tracked.echo and index not in tracked.echoed else ""
                if not (c.delta_token_ids or c.delta_text or c.finish_reason or echo):
                    continue
                if echo:
                    tracked.echoed.add(index)
                position = tracked.tokens.get(index, 0)
                tracked.tokens[index] = position + len(c.delta_token_ids)
                if tracked.resumable and c.delta_token_ids:
                    tracked.keep_for_resume(index, position, c.delta_token_ids)
                entry = merged.setdefault(index, {"index": index, "text": "", "finish_reason": None})
                text = echo + c.delta_text
                if tracked.tool_parser is not None:  # text that may be a call is held until the call is whole
                    tool_stream = tracked.tool_streams.setdefault(index, ToolCallStream(tracked.tool_parser))
                    text, calls = tool_stream.feed(text, c.finish_reason is not None)
                    if calls:
                        entry.setdefault("tool_calls", []).extend(calls)
                entry["text"] += text
                # Logprobs go with the delta of the step that made their tokens, whatever of its text is held
                # (by the detokenizer, or above while a tool call is parsed): so every token's logprob is sent
                # exactly once, even a tool call's, whose text never is. Only OpenAI streams (job.stream) carry
                # them: a job read through /v1/jobs events gets text, and its logprobs in its result.
                if c.logprobs is not None and tracked.job.stream:
                    logprob_stream = tracked.logprob_streams.get(index)
                    if logprob_stream is None:
                        logprob_stream = tracked.logprob_streams[index] = LogprobStream(
                            self.tokenizer, tracked.chat, tracked.top_logprobs,
                            len(tracked.echo[part]) if tracked.echo else 0)
                    logprobs = logprob_stream.take(c)
                    if logprobs is not None:
                        entry["logprobs"] = join_logprobs(entry.get("logprobs"), logprobs)
                entry["finish_reason"] = finish_reason(c.finish_reason)
                if c.finish_reason == "stop" and index in tracked.tool_streams and \
                        tracked.tool_streams[index].sent_calls:
                    entry["finish_reason"] = "tool_calls"
            if output.finished:
                tracked.parts[part] = output
                if len(tracked.parts) == tracked.num_parts:
                    finals[job_id] = tracked
        try:
            results = {job_id: self._result(tracked) for job_id, tracked in finals.items()}
            deltas = {job_id: kept for job_id, choices in deltas.items()
                      if (kept := jobs[job_id].drop_resent(list(choices.values())))}
            # An ending job's progress is deleted by its finish: nothing to save.
            progress = {job_id: tracked.progress_entry() for job_id, tracked in jobs.items()
                        if tracked is not None and tracked.unsaved and job_id not in results}
            replies = self._send(deltas, first, results, jobs, progress)
        except Exception as exc:  # noqa: BLE001 - e.g. Redis refusing writes (out of memory)
            # Every job of the batch lost something (its result, or deltas its readers will never see): that
            # attempt fails, its task aborts it and queues it again, and readers are told to start over.
            failed = [(job_id, tracked) for job_id, tracked in jobs.items() if tracked is not None]
            log.error("could not write the outputs of %d job(s); failing their attempts: %s", len(failed), exc)
            for job_id, tracked in failed:
                self._end(job_id, tracked, won=False, error=exc)
        else:
            for (job_id, tracked), won in zip(finals.items(), replies):
                self._end(job_id, tracked, won=bool(won))

    def _end(self, job_id: str, tracked: Tracked, won: bool, error: BaseException | None = None) -> None:
        tracked.won, tracked.error = won, error
        with self._lock:
            self._jobs.pop(job_id, None)
        tracked.done.set()

    def _result(self, tracked: Tracked) -> dict:
        job = tracked.job
        parts = [tracked.parts[k] for k in sorted(tracked.parts)]
        aborted = any(c.finish_reason == "abort" for part in parts for c in part.outputs)
        created = int(job.created_at) if job.created_at else None  # the stream's chunks carry the same
        if tracked.chat:
            body = chat_body(job.id, job.model, parts[0], self.tokenizer, tracked.top_logprobs, created=created,
                             tool_parser=tracked.tool_parser)
        else:
            body = completion_body(job.id, job.model, parts, self.tokenizer, n=tracked.n, echo=tracked.echo,
                                   created=created)
        return {"status": JobStatus.CANCELLED if aborted else JobStatus.SUCCEEDED, "result": body,
                "usage": usage(parts)}

    def _send(self, deltas, first, results, jobs, progress) -> list:
        """One transaction for the whole batch (a job's deltas never land without its saved tokens); retried
        until Redis takes it. The finishes' replies, in order."""
        delay = 0.1
        while True:
            pipe = self.store.r.pipeline(transaction=True)
            for job_id, choices in deltas.items():
                tracked = jobs[job_id]
                self.store.append_stream(job_id, delta_event(choices, tracked.usage_so_far()
                                                             if tracked.continuous_usage else None),
                                         pipe=pipe, expire=not tracked.stream_expiry_set)
            for job_id, entry in progress.items():
                self.store.save_progress(job_id, entry, pipe, expire=not jobs[job_id].progress_expiry_set)
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
            for job_id, entry in progress.items():
                jobs[job_id].progress_expiry_set = True
                jobs[job_id].progress_saved(entry)
            return replies[len(replies) - len(results):] if results else []
