"""Webhook events: which ones a job wants, their fixed ids and signed-to-be bodies, and sending them to the
webhook queue. Delivery (signing, retries) is the webhook worker's (worker/webhooks.py)."""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone

from api.celery_client import send_webhook
from api.job_record import Job

log = logging.getLogger(__name__)

EVENTS = ("start", "completed")
DEFAULT_EVENTS = ("completed",)
# Fields of the public job that a webhook carries; the request (maybe large) and the webhook config stay out.
PAYLOAD_FIELDS = ("id", "model", "endpoint", "status", "metadata", "created_at", "started_at", "first_token_at",
                  "finished_at", "attempts", "result", "usage", "error")


def wanted_events(job: Job) -> tuple[str, ...]:
    if not job.webhook or not job.webhook.get("url"):
        return ()
    return tuple(job.webhook.get("events") or DEFAULT_EVENTS)


def make_webhook_id(job_id: str, event: str) -> str:
    """One id per (job, event): fixed when the event is created, so retries and redeliveries share it."""
    return f"{job_id}:{event}"


def _stamp(now: float | None = None) -> str:
    return datetime.fromtimestamp(now if now is not None else time.time(), tz=timezone.utc).isoformat() \
        .replace("+00:00", "Z")


def build_payload(job: Job, event: str, now: float | None = None) -> str:
    """The body, as the exact text that is signed and sent (Standard Webhooks' {type, timestamp, data} envelope)."""
    public = job.public()
    data = {"object": "job", **{name: public[name] for name in PAYLOAD_FIELDS}}
    return json.dumps({"type": f"job.{event}", "timestamp": _stamp(now), "data": data}, separators=(",", ":"))


def enqueue_batch_event(batch_id: str, url: str, status: str, data: dict, celery=None) -> None:
    """A batch ended (completed, failed, cancelled or expired): tell its webhook, signed and retried like jobs'."""
    body = json.dumps({"type": f"batch.{status}", "timestamp": _stamp(), "data": data}, separators=(",", ":"))
    try:
        send_webhook(batch_id, status, make_webhook_id(batch_id, status), url, body, celery)
    except Exception:  # noqa: BLE001 - the batch's outcome stands; only this notification is lost
        log.exception("could not enqueue the %s webhook of batch %s", status, batch_id)


def enqueue_event(store, job: Job, event: str, celery=None) -> bool:
    """Send the delivery task for `event` if the job has a webhook that wants it; True if sent.
    `job` must be current (for "completed": read after finish, so the payload holds the result). Never raises:
    the job itself has already succeeded or started, and a webhook problem must not fail it."""
    if event not in EVENTS:
        raise ValueError(f"unknown webhook event {event!r}; expected one of {EVENTS}")
    if event not in wanted_events(job):
        return False
    try:
        send_webhook(job.id, event, make_webhook_id(job.id, event), job.webhook["url"], build_payload(job, event),
                     celery)
    except Exception:  # noqa: BLE001 - broker down: the job's outcome stands; only this notification is lost
        log.exception("could not enqueue the %s webhook of job %s", event, job.id)
        return False
    log.info("enqueued the %s webhook of job %s", event, job.id)
    return True
