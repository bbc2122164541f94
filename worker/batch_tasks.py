"""Batch bookkeeping tasks on the `inferq.batch` queue (served by `inferq webhook-worker`: no GPU, no torch):
expand an input file into jobs, stop a batch (cancel or expiry), and write the output and error files."""
from __future__ import annotations

import json
import logging
from functools import lru_cache

from pydantic import ValidationError

from api.batches import BATCH_PRIORITY, ENDPOINTS, BatchStore, error_line
from api.celery_client import BATCH_EXPAND, BATCH_FINALIZE, BATCH_STOP, app
from api.files import FileStore
from api.job_record import TERMINAL, JobStatus
from api.lanes import BulkLane
from api.lifecycle import finalize_when_counted, pump, settle
from api.schemas import ENDPOINTS as REQUEST_SCHEMAS
from api.settings import get_settings
from api.store import JobStore
from api.webhook_events import enqueue_batch_event
from worker.patience import patiently

log = logging.getLogger(__name__)


# Lines reach the bulk lane in pages that grow from FIRST_PAGE to LAST_PAGE: the engine starts on the first lines
# within milliseconds instead of after hundreds of them are recorded (measured on an H200, a 1,024-line batch of
# ~8 s spent its first 0.5-1 s expanding before any line ran), and a long file still costs few lane calls.
FIRST_PAGE, LAST_PAGE = 16, 512
EXPAND_PATIENCE_S = 600.0  # a batch left `validating` stays so for good: ride out long Redis outages


@lru_cache(maxsize=1)
def _stores() -> tuple[JobStore, BatchStore, FileStore]:
    settings = get_settings()
    jobs = JobStore.from_url(settings.redis_url, prefix=settings.key_prefix,
                             retention_seconds=settings.result_retention_seconds)
    return jobs, BatchStore(jobs), FileStore(jobs.r, settings.key_prefix)


@app.task(name=BATCH_EXPAND, ignore_result=True)
def expand(batch_id: str) -> None:
    """Validate every line of the input file; queue the valid ones as jobs, report the others in the error file.
    Every step can run twice (a line's job is created once, by its idempotency key; a line's outcome is recorded
    once): a Redis outage half-way starts the expansion again once Redis is back, and a redelivered message (this
    process killed half-way) does the same."""
    patiently(lambda: _expand(batch_id), EXPAND_PATIENCE_S)


def _expand(batch_id: str) -> None:
    jobs, batches, files = _stores()
    batch = batches.get(batch_id)
    if batch is None or batch.status != "validating":
        return
    job_endpoint = ENDPOINTS[batch.endpoint]
    served = set(jobs.registry.known_models())
    seen: set[str] = set()
    total = 0
    pending: dict[str, list[str]] = {}  # model -> job ids, handed to the bulk lane in pages
    page = FIRST_PAGE
    for number, raw in files.iter_lines(batch.input_file_id):
        if not raw.strip():
            continue
        total += 1
        if batches.get(batch_id).status != "validating":  # cancelled while expanding: queue nothing more
            batches.record_line(batch_id, f"line-{number}",
                                error_line(_custom_id(raw), "batch_cancelled", f"line {number}: not started"), False)
            continue
        problem, custom_id, body = _check_line(raw, number, batch.endpoint, job_endpoint, seen, served)
        if problem:
            batches.record_line(batch_id, f"line-{number}", error_line(custom_id, "invalid_request", problem), False)
            continue
        job, _ = jobs.create(owner=batch.owner, model=body["model"], endpoint=job_endpoint, request=body,
                             priority=BATCH_PRIORITY, bulk=True, idempotency_key=f"{batch_id}:line:{number}",
                             metadata={"batch_id": batch_id, "custom_id": custom_id, "line": str(number)})
        batches.add_job(batch_id, job.id)
        pending.setdefault(body["model"], []).append(job.id)
        if len(pending[body["model"]]) >= page:
            _hand_over(jobs, pending)
            page = min(2 * page, LAST_PAGE)
    _hand_over(jobs, pending)
    if total == 0:
        batches.update(batch_id, errors=[{"code": "empty_file", "message": "the input file has no lines",
                                          "line": None, "param": "input_file_id"}])
        if batches.set_status(batch_id, "failed"):
            _notify(batches, batch_id, "failed")
        return
    batches.update(batch_id, total=total)
    batches.set_status(batch_id, "in_progress")
    finalize_when_counted(batch_id, batches.get(batch_id).done, total)


def _hand_over(jobs: JobStore, pending: dict[str, list[str]]) -> None:
    for model, job_ids in pending.items():
        BulkLane(jobs, model).add(job_ids)
        pump(jobs, model)
    pending.clear()


def _custom_id(raw: bytes) -> str | None:
    """A line's custom_id where it has one (the error line of a line never started still names it)."""
    try:
        line = json.loads(raw)
    except ValueError:
        return None
    custom_id = line.get("custom_id") if isinstance(line, dict) else None
    return custom_id if isinstance(custom_id, str) and custom_id else None


def _check_line(raw: bytes, number: int, url: str, job_endpoint: str, seen: set[str],
                served: set[str]) -> tuple[str | None, str | None, dict]:
    """(problem or None, custom_id, body) of one input line, checked as OpenAI checks batch lines."""
    try:
        line = json.loads(raw)
    except ValueError as exc:
        return f"line {number}: not valid JSON ({exc})", None, {}
    if not isinstance(line, dict):
        return f"line {number}: a line must be a JSON object", None, {}
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return f"line {number}: custom_id is missing", None, {}
    if custom_id in seen:
        return f"line {number}: custom_id {custom_id!r} is a duplicate", custom_id, {}
    seen.add(custom_id)
    if line.get("method") != "POST":
        return f"line {number}: method must be POST", custom_id, {}
    if line.get("url") != url:
        return f"line {number}: url must be {url}, the batch's endpoint", custom_id, {}
    body = line.get("body")
    if not isinstance(body, dict):
        return f"line {number}: body must be an object", custom_id, {}
    try:
        request = REQUEST_SCHEMAS[job_endpoint].model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        return f"line {number}: body.{'.'.join(map(str, first['loc']))}: {first['msg']}", custom_id, {}
    if request.stream:
        return f"line {number}: stream is not supported in a batch", custom_id, {}
    if request.model not in served:
        return f"line {number}: the model {request.model!r} does not exist", custom_id, {}
    return None, custom_id, body


@app.task(name=BATCH_STOP, ignore_result=True)
def stop(batch_id: str) -> None:
    """Cancel (or expire) a batch: lines not started never run; running ones are aborted; finished ones stay."""
    jobs, batches, _ = _stores()
    batch = batches.get(batch_id)
    if batch is None or batch.status != "cancelling":
        return
    for job_id in batches.job_ids(batch_id):
        before = jobs.get(job_id)
        if before is None or before.status in TERMINAL:
            continue
        if jobs.request_cancel(job_id) == JobStatus.CANCELLED and before.status == JobStatus.QUEUED:
            settle(jobs, jobs.get(job_id))  # ended here, not by a worker: its aftermath is done here
    batch = batches.get(batch_id)
    if batch is not None:
        finalize_when_counted(batch_id, batch.done, batch.total)


@app.task(name=BATCH_FINALIZE, ignore_result=True)
def finalize(batch_id: str) -> None:
    """Write the output and error files and end the batch: completed, cancelled or expired."""
    _, batches, files = _stores()
    previous = batches.set_status(batch_id, "finalizing")
    if previous is None:
        return  # someone else finalizes, or it is not time yet
    batch = batches.get(batch_id)
    outputs = {}
    for part, name in (("out", "output"), ("err", "error")):
        if batches.r.llen(batches.key(batch_id, part)):
            written = files.write_lines(batch.owner, f"{batch_id}_{name}.jsonl", f"batch_{name}",
                                        batches.iter_lines(batch_id, part))
            outputs[f"{name}_file_id"] = written.id
    batches.update(batch_id, **outputs)
    final = "expired" if batch.expiring else ("cancelled" if previous == "cancelling" else "completed")
    batches.set_status(batch_id, final)
    log.info("batch %s %s", batch_id, final)
    _notify(batches, batch_id, final)


def _notify(batches: BatchStore, batch_id: str, status: str) -> None:
    batch = batches.get(batch_id)
    if batch is not None and batch.webhook:
        enqueue_batch_event(batch_id, batch.webhook, status, batch.public())
