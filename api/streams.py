"""A job's event stream: what the worker writes as the job runs, and the API's async readers of it.

Events (the JSON under each entry's "data" field):
  {"type": "delta", "choices": [{"index", "text", "finish_reason"}]}   text generated since the last delta
  {"type": "restart", "attempt": n}       the job runs again after a failure: readers drop what came before
  {"type": "end", "status": "succeeded" | "failed" | "cancelled"}        always the last one

Only jobs that stream (OpenAI `stream: true`, and /v1/jobs, whose events may be read at any time) get deltas; every
job gets its end event. Long-polls and synchronous requests wait for a job's end on its `done` channel instead,
through one subscription per API process (EndListener): a waiter then wakes once, at the end, not at every token
its stream gets (256 long-polls of streaming jobs made one API process re-read thousands of events a second).

The API reads with `redis.asyncio`: a waiting client holds a socket, never a thread.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
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


class DeltaChoice(TypedDict):
    index: int
    text: str
    finish_reason: str | None


def delta_event(choices: list[DeltaChoice]) -> dict:
    return {"type": EventType.DELTA.value, "choices": choices}


def restart_event(attempt: int) -> dict:
    return {"type": EventType.RESTART.value, "attempt": attempt}


def end_event(status: str) -> dict:
    return {"type": EventType.END.value, "status": str(status)}


def parse_read(reply) -> list[tuple[str, dict]]:
    """An XREAD reply for one stream -> [(entry id, event)]."""
    if not reply:
        return []
    return [(entry_id, json.loads(fields["data"])) for entry_id, fields in reply[0][1]]


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
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[job_id]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass

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


class AsyncStreams:
    """The API side: read a job's events, or wait until it ends, without holding a thread."""

    def __init__(self, client: aredis.Redis, keys: Keys) -> None:
        self.r = client
        self.keys = keys
        self.ends = EndListener(client, keys)

    async def get(self, job_id: str) -> Job | None:
        if not is_job_id(job_id):
            return None
        return Job.from_fields(await self.r.hgetall(self.keys.job(job_id)))

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
        to and including its end event."""
        last = "0"
        while True:
            entries = await self.read(job_id, last, block_ms=BLOCK_CHUNK_MS, count=1000)
            if not entries:
                continue
            last = entries[-1][0]
            batch = [event for _, event in entries]
            for i, event in enumerate(batch):
                if event.get("type") == EventType.END:
                    yield batch[:i + 1]
                    return
            yield batch

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
