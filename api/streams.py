"""A job's event stream: what the worker writes as the job runs, and the API's async readers of it.

Events (the JSON under each entry's "data" field):
  {"type": "delta", "choices": [{"index", "text", "finish_reason"}]}   text generated since the last delta
                                          (and "usage" so far, when the OpenAI stream asked for it; and per
                                          choice its new tokens' "logprobs", when an OpenAI stream asked)
  {"type": "restart", "attempt": n}       the job runs again from scratch after a failure: readers drop what came
                                          before (a rerun that resumes from saved tokens writes none: its deltas
                                          continue where the last attempt's stopped)
  {"type": "end", "status": "succeeded" | "failed" | "cancelled"}        always the last one

Only jobs that stream get deltas as they come: OpenAI `stream: true` from the start, and a /v1/jobs job from when
someone begins to read its events (request_deltas: its worker then writes what came before, and the rest as it
comes; a reader that finds no deltas when the job ends gets its text from the result, result_deltas). Every job
gets its end event. Long-polls and synchronous requests wait for a job's end on its `done` channel instead,
through one subscription per API process (EndListener): a waiter then wakes once, at the end, not at every token
its stream gets (256 long-polls of streaming jobs made one API process re-read thousands of events a second).

Streams are read the same way (StreamHub): one blocking XREAD per API process covers every followed job stream,
instead of one per stream per token (256 SSE streams made one API process issue a read per stream at every engine
step, and it became the limit of the streaming path).

The API reads with `redis.asyncio`: a waiting client holds a socket, never a thread.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from enum import Enum
from typing import TypedDict

import redis.asyncio as aredis

from api.job_record import TERMINAL, Job, is_job_id
from api.keys import Keys

log = logging.getLogger(__name__)

STREAM_MAXLEN = 100_000  # approximate cap per job stream: bounds memory if a job runs away
BLOCK_CHUNK_MS = 1000  # long waits are cut in blocking reads of this length (stays under any socket timeout)
RECHECK_S = 2.0  # a waiter for a job's end re-reads its record this often anyway (an end missed while reconnecting)


class EventType(str, Enum):
    DELTA = "delta"
    RESTART = "restart"
    END = "end"

    __str__ = str.__str__


class DeltaChoice(TypedDict, total=False):
    index: int
    text: str
    finish_reason: str | None
    tool_calls: list[dict]  # whole tool calls in OpenAI's shape, each with its index among the choice's calls
    # The logprobs of tokens not in an earlier delta, in the shape of an OpenAI chunk's (chat's or completions'):
    # only for a job that streams from the start and asked for logprobs (worker/output_writer.py).
    logprobs: dict


def join_logprobs(first: dict | None, second: dict | None) -> dict | None:
    """Two chunks' logprobs as one: every list in either shape is per token (chat's `content`; completions'
    `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`), so the second's lists follow the first's."""
    if first is None or second is None:
        return second if first is None else first
    return {key: value + second[key] if isinstance(value, list) else value for key, value in first.items()}


def logprobs_len(logprobs: dict | None) -> int:
    """How many tokens a chunk's logprobs are of."""
    return 0 if logprobs is None else len(logprobs["content"] if "content" in logprobs else logprobs["tokens"])


def logprobs_from(logprobs: dict, start: int) -> dict:
    """A chunk's logprobs without its first `start` tokens'."""
    return {key: value[start:] if isinstance(value, list) else value for key, value in logprobs.items()}


def delta_event(choices: list[DeltaChoice], usage: dict | None = None) -> dict:
    """`usage`: the job's usage so far (only for streams that asked for vLLM's continuous_usage_stats)."""
    event = {"type": EventType.DELTA.value, "choices": choices}
    if usage is not None:
        event["usage"] = usage
    return event


def restart_event(attempt: int) -> dict:
    return {"type": EventType.RESTART.value, "attempt": attempt}


def end_event(status: str) -> dict:
    return {"type": EventType.END.value, "status": str(status)}


def sent_so_far(events: list[dict]) -> tuple[dict[int, int], dict[int, int]]:
    """Per choice, the characters of text and the tool calls that a stream's deltas carry since its last
    restart: what a resumed job has sent its readers already."""
    chars: dict[int, int] = {}
    calls: dict[int, int] = {}
    for event in events:
        if event["type"] == EventType.RESTART:
            chars, calls = {}, {}
        elif event["type"] == EventType.DELTA:
            for choice in event["choices"]:
                index = choice["index"]
                chars[index] = chars.get(index, 0) + len(choice["text"])
                calls[index] = calls.get(index, 0) + len(choice.get("tool_calls") or ())
    return chars, calls


def result_deltas(job: Job) -> list[DeltaChoice]:
    """A finished job's whole text as one delta per choice, from its result (completion or chat body)."""
    choices = (job.result or {}).get("choices") or []
    return [{"index": c.get("index", i),
             "text": c.get("text") if "text" in c else (c.get("message") or {}).get("content") or "",
             "finish_reason": c.get("finish_reason")} for i, c in enumerate(choices)]


# Sets the job's `stream` field (only if the job still exists: HSET would create a record) and tells the workers.
_REQUEST_DELTAS_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('HGET', KEYS[1], 'stream') ~= '1' then
  redis.call('HSET', KEYS[1], 'stream', '1')
  redis.call('PUBLISH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


def parse_read(reply) -> list[tuple[str, dict]]:
    """An XREAD reply for one stream -> [(entry id, event)]."""
    if not reply:
        return []
    return [(entry_id, json.loads(fields["data"])) for entry_id, fields in reply[0][1]]


def _discard(registry: dict[str, set], key: str, item) -> None:
    """Take `item` out of `registry[key]`, and the key out once its set is empty."""
    items = registry.get(key)
    if items is not None:
        items.discard(item)
        if not items:
            del registry[key]


async def _cancel(task: asyncio.Task | None) -> None:
    if task is not None:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
            pass


class EndListener:
    """One subscription, per API process, to every job's `done` channel (by pattern): wakes the waiters of a job
    when it ends. Started on first use, inside the running event loop."""

    def __init__(self, client: aredis.Redis, keys: Keys) -> None:
        self.r = client
        self._pattern = keys.done("*")
        self._head, self._tail = self._pattern.split("*")
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task | None = None

    @contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set when the job ends (or the subscription came back, when ends may have been missed)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._listen())
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            _discard(self._waiters, job_id, event)

    async def close(self) -> None:
        await _cancel(self._task)

    async def _listen(self) -> None:
        while True:
            pubsub = self.r.pubsub()
            try:
                await pubsub.psubscribe(self._pattern)
                self._wake(list(self._waiters))  # ends published while (re)subscribing were missed: re-read all
                async for message in pubsub.listen():
                    if message["type"] == "pmessage":
                        self._wake([message["channel"][len(self._head):len(message["channel"]) - len(self._tail)]])
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - Redis away: waiters re-read their records meanwhile (RECHECK_S)
                log.warning("the job-end subscription failed; subscribing again", exc_info=True)
                await asyncio.sleep(1.0)
            finally:
                await pubsub.aclose()

    def _wake(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            for event in self._waiters.get(job_id, ()):
                event.set()


def _entry_key(entry_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = entry_id.partition("-")
    return int(milliseconds), int(sequence or 0)


class _Follower:
    """One reader of one job stream: the entries the hub found for it, in order, or the error that ended the
    hub's read."""

    def __init__(self, last_id: str) -> None:
        self.last_id = last_id
        self.entries: list[tuple[str, dict]] = []
        self.error: BaseException | None = None
        self.ready = asyncio.Event()

    def push(self, entries: list[tuple[str, dict]]) -> None:
        last = _entry_key(self.last_id)
        new = [entry for entry in entries if _entry_key(entry[0]) > last]  # another follower of the key lags
        if new:
            self.entries += new
            self.last_id = new[-1][0]
            self.ready.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.ready.set()

    async def take(self) -> list[tuple[str, dict]]:
        """Everything found since the last take (a reader that falls behind gets more at once)."""
        await self.ready.wait()
        self.ready.clear()
        if self.error is not None:
            raise self.error
        entries, self.entries = self.entries, []
        return entries


class StreamHub:
    """One reader, per API process, of every job stream a client follows: a blocking XREAD over all of them, the
    entries handed to each stream's followers. A new follower wakes a read in progress through this process's own
    small wake stream, so that it is read from the next round on without waiting out the block."""

    WAKE_TTL_S = 60

    def __init__(self, client: aredis.Redis, keys: Keys) -> None:
        self.r = client
        self._wake_key = f"{keys.prefix}:api-stream-hub:{uuid.uuid4().hex}"
        self._wake_last = "0"
        self._followers: dict[str, set[_Follower]] = {}
        self._task: asyncio.Task | None = None
        self._reading = False

    @asynccontextmanager
    async def follow(self, stream_key: str, last_id: str) -> AsyncIterator[_Follower]:
        """A follower of the stream's entries after `last_id`, for the duration of the block."""
        follower = _Follower(last_id)
        self._followers.setdefault(stream_key, set()).add(follower)
        try:
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._run())
            elif self._reading:
                async with self.r.pipeline(transaction=False) as pipe:
                    pipe.xadd(self._wake_key, {"w": "1"}, maxlen=16, approximate=True)
                    pipe.expire(self._wake_key, self.WAKE_TTL_S)
                    await pipe.execute()
            yield follower
        finally:
            _discard(self._followers, stream_key, follower)

    async def close(self) -> None:
        await _cancel(self._task)

    async def _run(self) -> None:
        while self._followers:
            wanted = {key: min((f.last_id for f in followers), key=_entry_key)
                      for key, followers in self._followers.items()}
            self._reading = True
            try:
                reply = await self.r.xread({self._wake_key: self._wake_last, **wanted}, count=1000,
                                           block=BLOCK_CHUNK_MS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. Redis away: each follower gets the error, as its own read would
                for followers in self._followers.values():
                    for follower in followers:
                        follower.fail(exc)
                self._followers.clear()
                return
            finally:
                self._reading = False
            for key, entries in (reply.items() if isinstance(reply, dict) else reply or ()):
                if key == self._wake_key:
                    self._wake_last = entries[-1][0]
                    continue
                parsed = [(entry_id, json.loads(fields["data"])) for entry_id, fields in entries]
                for follower in self._followers.get(key, ()):
                    follower.push(parsed)


class AsyncStreams:
    """The API side: read a job's events, or wait until it ends, without holding a thread."""

    def __init__(self, client: aredis.Redis, keys: Keys) -> None:
        self.r = client
        self.keys = keys
        self.ends = EndListener(client, keys)
        self.hub = StreamHub(client, keys)
        self._request_deltas = client.register_script(_REQUEST_DELTAS_LUA)

    async def get(self, job_id: str) -> Job | None:
        if not is_job_id(job_id):
            return None
        return Job.from_fields(await self.r.hgetall(self.keys.job(job_id)))

    async def request_deltas(self, job_id: str) -> bool:
        """Someone reads the job's events: its deltas are written from now on. False if they already were."""
        return bool(await self._request_deltas(keys=[self.keys.job(job_id), self.keys.deltas], args=[job_id]))

    async def read(self, job_id: str, last_id: str = "0", block_ms: int = 0,
                   count: int | None = None) -> list[tuple[str, dict]]:
        """Events after `last_id`; waits up to `block_ms` for one (0 = don't wait)."""
        return parse_read(await self.r.xread({self.keys.stream(job_id): last_id}, count=count,
                                             block=block_ms or None))

    async def events(self, job_id: str) -> AsyncIterator[dict]:
        """The job's events in order, up to and including its end event."""
        async for batch in self.event_batches(job_id):
            for event in batch:
                yield event

    async def event_batches(self, job_id: str) -> AsyncIterator[list[dict]]:
        """The job's events in order, as each read returns them (a reader that falls behind gets more at once), up
        to and including its end event. What is already written is read at once; the rest through the hub."""
        entries = await self.read(job_id, "0", count=1000)
        last = entries[-1][0] if entries else "0"
        batch = _through_end([event for _, event in entries])
        if batch:
            yield batch
            if batch[-1].get("type") == EventType.END:
                return
        async with self.hub.follow(self.keys.stream(job_id), last) as follower:
            while True:
                batch = _through_end([event for _, event in await follower.take()])
                yield batch
                if batch[-1].get("type") == EventType.END:
                    return

    async def close(self) -> None:
        await self.ends.close()
        await self.hub.close()

    async def wait_for_terminal(self, job_id: str, timeout_s: float) -> Job | None:
        """The job as soon as it is terminal, or as it is when `timeout_s` runs out (None if gone)."""
        deadline = time.monotonic() + timeout_s
        # Watching before reading the status: an end published after the read still wakes this waiter.
        with self.ends.watch(job_id) as ended:
            job = await self.get(job_id)
            while job is not None and job.status not in TERMINAL:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(ended.wait(), min(remaining, RECHECK_S))
                except asyncio.TimeoutError:
                    pass
                ended.clear()
                job = await self.get(job_id)
        return job


def _through_end(batch: list[dict]) -> list[dict]:
    """The events up to and including the first end event (nothing after a job's end belongs to it)."""
    for i, event in enumerate(batch):
        if event.get("type") == EventType.END:
            return batch[:i + 1]
    return batch
