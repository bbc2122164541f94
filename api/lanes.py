"""The bulk lane: batch lines reach the broker and the engine only as fast as workers have bulk capacity.

Interactive jobs (completions, chat, /v1/jobs) are enqueued at once. Batch lines wait in a per-model pending list
and are sent to the model's Celery queue only while fewer than the workers' bulk capacity are in flight. Each
worker announces two capacities: `bulk_slots_idle` (its whole running batch plus a few waiting lines, so that the
engine refills a slot the step it frees) for when no interactive work is around, and `bulk_slots` (its
max_num_seqs less a reserve for interactive work) for when interactive jobs are queued or running. The reserve is
thus held back only while interactive work exists or arrives (a job counts from its submission); a worker runs more
Celery threads than bulk lines, so an interactive job always finds a thread, and the engine schedules it ahead of
waiting lines (batch lines run at a lower priority). A batch of 50,000 lines never stands in the broker between an
interactive request and a worker.

Keys: {p}:bulk:{model}:pending (list of job ids, FIFO across batches), {p}:bulk:{model}:inflight (sorted set of
job ids, score = when the line left the pending list).
"""
from __future__ import annotations

import time

from api.store import JobStore

# KEYS: pending list, in-flight set. ARGV: capacity, job key prefix, now. Moves queued jobs from pending to in
# flight while there is capacity; jobs cancelled while pending are dropped. Returns the ids to send.
_PUMP_LUA = """
local capacity = tonumber(ARGV[1])
local sent = {}
while redis.call('ZCARD', KEYS[2]) < capacity do
  local id = redis.call('LPOP', KEYS[1])
  if not id then break end
  if redis.call('HGET', ARGV[2] .. id, 'status') == 'queued' then
    redis.call('ZADD', KEYS[2], ARGV[3], id)
    table.insert(sent, id)
  end
end
return sent
"""


class BulkLane:
    def __init__(self, store: JobStore, model: str) -> None:
        self.store = store
        self.model = model
        self._pending = f"{store.prefix}:bulk:{model}:pending"
        self._inflight = f"{store.prefix}:bulk:{model}:inflight"
        self._pump = store.r.register_script(_PUMP_LUA)

    def add(self, job_ids: list[str]) -> None:
        if job_ids:
            self.store.r.rpush(self._pending, *job_ids)

    def capacity(self) -> int:
        field = "bulk_slots" if self.store.interactive_open(self.model) else "bulk_slots_idle"
        workers = self.store.registry.snapshot()[0].get(self.model, [])
        return sum(int(w.get(field, w.get("bulk_slots", 0))) for w in workers)

    def pump(self, send) -> int:
        """Send pending lines while the workers have bulk capacity; `send(job_id)` enqueues one. Returns how many.
        A process that dies between moving and sending leaves lines in flight unsent: see `unsent_since`."""
        sent = self._pump(keys=[self._pending, self._inflight],
                          args=[self.capacity(), f"{self.store.prefix}:job:", repr(time.time())])
        for job_id in sent:
            send(job_id)
        return len(sent)

    def release(self, job_id: str) -> bool:
        """A line ended; its slot is free. False if it was never in flight (e.g. cancelled while pending)."""
        return bool(self.store.r.zrem(self._inflight, job_id))

    def in_flight(self, older_than_s: float = 0.0) -> list[str]:
        """Lines in flight, or only those that left the pending list more than `older_than_s` ago."""
        return self.store.r.zrangebyscore(self._inflight, "-inf", time.time() - older_than_s)

    def pending(self) -> int:
        return self.store.r.llen(self._pending)
