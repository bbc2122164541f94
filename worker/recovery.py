"""Run again what a dead worker left behind.

Celery's Redis transport gives an unacknowledged message back only after the visibility timeout, and that timeout
must outlast the longest job (hours), or long jobs would run twice. Worse, a worker killed just after taking a
message off the queue, before recording it as unacknowledged, loses that message for good. So inferq does not
rely on redelivery:
- a worker leases each job it runs (`JobStore.mark_running` adds it to the worker's lease set);
- once a worker's heartbeat has expired, one live worker of the same model claims its lease set: finished jobs
  are settled, unfinished ones are queued again;
- and since the dead worker may have held messages it had not started, every queued job of the model that was
  sent before gets a replacement message.
Each replacement carries a new dispatch number, so the older message of the same job (if it still exists, or
comes back after the visibility timeout) is skipped: no job runs twice.

The API can die too, between recording a job and sending its first message: `send_never_sent` sends it instead;
and a process can die half-way through moving batch lines from the bulk lane to the broker: `repair_lane`.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

import redis

from api.celery_client import enqueue
from api.job_record import TERMINAL, Job, JobStatus
from api.lanes import BulkLane
from api.lifecycle import run_again_or_end, settle
from api.store import JobStore

log = logging.getLogger(__name__)


class JobLeases:
    def __init__(self, store: JobStore, model: str, worker_id: str, max_attempts: int = 3) -> None:
        self.store = store
        self.max_attempts = max_attempts
        self.model = model
        self.worker_id = worker_id
        self._index = store.keys.lease_index(model)

    def join(self) -> None:
        """Enter the index of lease holders (every heartbeat), so that this worker is recovered if it dies."""
        self.store.r.sadd(self._index, self.worker_id)

    def recover(self, settle: Callable[[Job], None]) -> list[str]:
        """Recover every worker of this model whose heartbeat expired; returns the ids of the jobs sent again.
        Jobs a dead worker had finished are passed to `settle`: it may have died before recording them."""
        r = self.store.r
        live = {w["worker_id"] for w in self.store.registry.workers(self.model)} | {self.worker_id}
        resent: list[str] = []
        for worker_id in r.smembers(self._index) - live:
            if not r.srem(self._index, worker_id):
                continue  # another live worker is recovering this one
            resent += self._requeue_leases(worker_id, settle)
            resent += self.replace_sent_messages()
        return resent

    def _requeue_leases(self, worker_id: str, settle: Callable[[Job], None]) -> list[str]:
        claim = f"{self.store.prefix}:leases:claimed:{uuid.uuid4().hex}"
        try:
            self.store.r.rename(self.store.keys.lease(self.model, worker_id), claim)
        except redis.ResponseError:  # no such key: it ran nothing
            return []
        requeued = []
        for job_id in self.store.r.smembers(claim):
            job = self.store.get(job_id)
            if job is None:
                continue
            if job.status in TERMINAL:
                settle(job)
                continue
            status = run_again_or_end(self.store, job_id, self.model, f"its worker {worker_id} died while running "
                                      "it, on every attempt", "worker_died", self.max_attempts)
            if status == JobStatus.QUEUED:
                log.warning("worker %s died during job %s: queued it again", worker_id, job_id)
                requeued.append(job_id)
        self.store.r.delete(claim)
        return requeued

    def replace_sent_messages(self) -> list[str]:
        """Queued jobs whose message may have died with the worker get a new one (the old one, if alive, is
        skipped as stale). Interactive jobs keep their order among themselves: oldest first."""
        candidates = self.store.queued_ids(self.model) + BulkLane(self.store, self.model).in_flight()
        replaced = [job_id for job_id in candidates if enqueue(self.store, job_id, self.model, again=True)]
        if replaced:
            log.warning("sent %d queued job(s) of %s again (their messages may be lost)", len(replaced), self.model)
        return replaced


def send_never_sent(store: JobStore, model: str, grace_s: float = 2.0) -> list[str]:
    """Send the first message of every interactive job of `model` queued over `grace_s` ago with none sent (its
    API process died right after recording it). If that process still lives and sends too, only one first
    message wins (JobStore.dispatch)."""
    sent = [job_id for job_id in store.never_sent(store.queued_ids(model, older_than_s=grace_s))
            if enqueue(store, job_id, model)]
    if sent:
        log.warning("sent %d queued job(s) of %s that had no message (their API process died?)", len(sent), model)
    return sent


def repair_lane(store: JobStore, model: str, grace_s: float = 2.0) -> None:
    """Undo what a process that died half-way left in the bulk lane (every step here is idempotent): lines
    moved in flight but never sent are sent (if the mover still lives and sends too, only one first message
    wins: see JobStore.dispatch); lines that ended but were never counted are counted."""
    lane = BulkLane(store, model)
    for job_id in lane.in_flight(older_than_s=grace_s):
        job = store.get(job_id)
        if job is None:
            lane.release(job_id)
        elif job.status in TERMINAL:
            settle(store, job)
        elif job.dispatch == 0:
            log.warning("batch line %s was never sent: sending it", job_id)
            enqueue(store, job_id, model)
