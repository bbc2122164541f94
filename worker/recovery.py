"""Put the jobs of a dead worker back in the queue.

Celery's Redis transport redelivers an unacknowledged message only after the visibility timeout, and that timeout
must outlast the longest job (hours), or long jobs would run twice. So a worker killed mid-job would leave its jobs
"running" for hours. Instead each worker keeps the ids of its running jobs in a lease set next to its heartbeat;
once a worker's heartbeat has expired, any live worker of the same model claims its lease set and re-enqueues the
jobs that are not finished. When the old message finally comes back, its job is terminal and the task skips it,
so no job runs to completion twice.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

import redis

from api.store import TERMINAL, Job, JobStore

log = logging.getLogger(__name__)


class JobLeases:
    def __init__(self, store: JobStore, model: str, worker_id: str) -> None:
        self.store = store
        self.model = model
        self.worker_id = worker_id
        self._index = f"{store.prefix}:leases:{model}"  # worker ids that hold (or held) leases

    def _leases(self, worker_id: str) -> str:
        return f"{self.store.prefix}:leases:{self.model}:{worker_id}"

    def hold(self, job_id: str) -> None:
        pipe = self.store.r.pipeline(transaction=True)
        pipe.sadd(self._index, self.worker_id)
        pipe.sadd(self._leases(self.worker_id), job_id)
        pipe.execute()

    def release(self, job_id: str) -> None:
        self.store.r.srem(self._leases(self.worker_id), job_id)

    def recover(self, enqueue: Callable[[str], None], settle: Callable[[Job], None]) -> list[str]:
        """Re-enqueue the unfinished jobs of workers whose heartbeat expired; returns their ids. Jobs they had
        finished are passed to `settle`: the dead worker may have died between finishing and recording them."""
        r = self.store.r
        live = {w["worker_id"] for w in self.store.workers(self.model)} | {self.worker_id}
        recovered: list[str] = []
        for worker_id in r.smembers(self._index) - live:
            # RENAME is atomic: of several live workers recovering at once, exactly one gets each dead lease set.
            claim = f"{self.store.prefix}:leases:claimed:{uuid.uuid4().hex}"
            try:
                r.rename(self._leases(worker_id), claim)
            except redis.ResponseError:  # no such key: nothing held, or another worker claimed it
                r.srem(self._index, worker_id)
                continue
            r.srem(self._index, worker_id)
            for job_id in r.smembers(claim):
                job = self.store.get(job_id)
                if job is None:
                    continue
                if job.status in TERMINAL:
                    settle(job)
                else:
                    log.warning("worker %s died during job %s: queueing it again", worker_id, job_id)
                    enqueue(job_id)
                    recovered.append(job_id)
            r.delete(claim)
        return recovered
