"""What follows a job's end, whatever ended it (its worker, a cancel, recovery, a batch's expiry): one function,
`settle`, and the sweeper that runs it for ends whose process died before it could.

The aftermath: the job's metrics, its batch line (recorded once; the batch finalized after its last line), its
slot in the bulk lane (freed, and the lane pumped), and its "completed" webhook. Every step is safe to repeat
(batch lines are recorded once per job, lane slots freed once, webhooks carry a fixed id), so a sweeper that takes
over from a slow or dead process at worst repeats a step.
"""
from __future__ import annotations

import logging
import time

from api.batches import BatchStore, error_line, output_line
from api.celery_client import BATCH_FINALIZE, BATCH_STOP, enqueue, send_batch_task, send_job
from api.job_record import TERMINAL, Job, JobStatus
from api.lanes import BulkLane
from api.metrics import record_finished
from api.schemas import error_body
from api.store import JobStore
from api.webhook_events import enqueue_event

log = logging.getLogger(__name__)


def settle(store: JobStore, job: Job, celery=None) -> None:
    """Everything that follows the end of `job` (read after it ended); then it leaves the ended set."""
    _log_end(job)
    record_finished(store, job)
    if job.metadata.get("batch_id"):
        _settle_batch_line(store, job, celery)
    enqueue_event(store, job, "completed", celery)
    store.settled(job.id)


def _log_end(job: Job) -> None:
    """One INFO line per job, wherever it ended (`--log-level INFO` shows them)."""
    if not log.isEnabledFor(logging.INFO):
        return
    usage, error = job.usage or {}, job.error or {}
    took = f"{job.finished_at - job.created_at:.2f} s" if job.finished_at and job.created_at else "?"
    log.info("job %s %s: %s %s, %d prompt + %d output tokens, %s%s%s", job.id, job.status.value, job.model,
             job.endpoint, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), took,
             f", {job.attempts} attempts" if job.attempts > 1 else "",
             f", {error.get('code') or error.get('type')}: {error.get('message')}" if error else "")


def run_again_or_end(store: JobStore, job_id: str, model: str, reason: str, code: str, max_attempts: int,
                     celery=None) -> str | None:
    """A running job that cannot go on where it is (its worker died, its task failed or was lost): queued again
    with a new message, or ended (cancelled if asked, failed with a server error after its last attempt) and
    settled. Returns the outcome ("queued", "cancelled", "failed"), or None if it was not running."""
    error = error_body(reason, type="server_error", code=code)["error"] | {"status_code": 500}
    outcome = store.requeue(job_id, error, max_attempts)
    if outcome is None:
        return None
    status, dispatch = outcome
    if status == JobStatus.QUEUED:
        send_job(job_id, dispatch, model, celery)
    else:
        settle(store, store.get(job_id), celery)
    return status


def sweep_ended(store: JobStore, celery=None) -> int:
    """Settle the ended jobs nobody settled within the grace period; returns how many."""
    count = 0
    for job_id in store.claim_ended():
        job = store.get(job_id)
        if job is None or job.status not in TERMINAL:
            store.settled(job_id)  # expired meanwhile, or never really ended: nothing left to do
            continue
        log.warning("job %s ended without its aftermath: settling it now", job_id)
        settle(store, job, celery)
        count += 1
    return count


# ---- batches ------------------------------------------------------------------------------------------------
def pump(store: JobStore, model: str, celery=None) -> int:
    """Send the model's pending batch lines that its workers have room for."""
    return BulkLane(store, model).pump(lambda job_id: enqueue(store, job_id, model, celery=celery))


def _settle_batch_line(store: JobStore, job: Job, celery) -> None:
    batch_id = job.metadata["batch_id"]
    if BulkLane(store, job.model).release(job.id):
        pump(store, job.model, celery)
    batches = BatchStore(store)
    line, ok = output_line(job, job.metadata.get("custom_id", ""))
    if job.status == JobStatus.CANCELLED:
        batch = batches.get(batch_id)
        if batch is not None and batch.expiring:
            line = error_line(line["custom_id"], "batch_expired", "the batch expired before this request ran",
                              line["id"])
    finalize_when_counted(batch_id, *batches.record_line(batch_id, job.id, line, ok, job.usage), celery=celery)


def finalize_when_counted(batch_id: str, done: int, total: int, celery=None) -> None:
    """Once every line of the batch is counted (total is 0 until every line is queued), write its files and end
    it."""
    if total and done >= total:
        send_batch_task(BATCH_FINALIZE, batch_id, celery)


def check_expiry(batches: BatchStore, batch, celery=None):
    """Past its window, an unfinished batch expires: stopped like a cancel, unfinished lines reported expired."""
    if batch.status in ("validating", "in_progress") and batch.expires_at and time.time() > batch.expires_at:
        batches.update(batch.id, expiring="1")
        if batches.set_status(batch.id, "cancelling"):
            send_batch_task(BATCH_STOP, batch.id, celery)
        batch = batches.get(batch.id) or batch
    return batch
