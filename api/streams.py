"""A job's event stream: what the worker writes as the job runs, and the API's async readers of it.

Events (the JSON under each entry's "data" field):
  {"type": "delta", "choices": [{"index", "text", "finish_reason"}]}   text generated since the last delta
  {"type": "restart", "attempt": n}       the job runs again after a failure: readers drop what came before
  {"type": "end", "status": "succeeded" | "failed" | "cancelled"}        always the last one

Only jobs that stream (OpenAI `stream: true`, and /v1/jobs, whose events may be read at any time) get deltas; every
job gets its end event, which is what long-polls and synchronous requests wait for.

The API reads with `redis.asyncio`: a waiting client holds a socket, never a thread.
"""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from enum import Enum
from typing import TypedDict

import redis.asyncio as aredis

from api.job_record import TERMINAL, Job
from api.keys import Keys

STREAM_MAXLEN = 100_000  # approximate cap per job stream: bounds memory if a job runs away
BLOCK_CHUNK_MS = 1000  # long waits are cut in blocking reads of this length (stays under any socket timeout)


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


class AsyncStreams:
    """The API side: read a job's events, or wait until it ends, without holding a thread."""

    def __init__(self, client: aredis.Redis, keys: Keys) -> None:
        self.r = client
        self.keys = keys

    async def get(self, job_id: str) -> Job | None:
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
        # Take the stream position *before* reading the status: an end event written after the read is then
        # still ahead of `last_id`, so it cannot slip between the check and the blocking read.
        newest = await self.r.xrevrange(self.keys.stream(job_id), count=1)
        last_id = newest[0][0] if newest else "0-0"
        job = await self.get(job_id)
        while job is not None and job.status not in TERMINAL:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                break
            # Blocking reads wake only on new events: token events just move the cursor; the record is re-read
            # on the end event, or once per quiet chunk as a safety net.
            events = await self.read(job_id, last_id, block_ms=min(remaining_ms, BLOCK_CHUNK_MS), count=1000)
            if events:
                last_id = events[-1][0]
            if not events or any(event.get("type") == EventType.END for _, event in events):
                job = await self.get(job_id)
        return job
