"""Job webhooks: the GPU worker enqueues an event, the webhook worker delivers it.

Delivery is a Celery task on its own queue (`inferq.webhooks`, consumed by `inferq webhook-worker`), so a slow or
dead receiver never holds a GPU worker's thread. Messages follow Standard Webhooks (https://www.standardwebhooks.com):
headers `webhook-id`, `webhook-timestamp` and `webhook-signature` = "v1," + base64(HMAC-SHA256(key, id.timestamp.body)),
verifiable with the `standardwebhooks` library. The id and the body are fixed when the event is created and travel in
the task's arguments, so every retry (and a broker redelivery) carries the same id: receivers deduplicate on it.
Network errors and non-2xx answers are retried with exponential backoff and jitter; after the last try the job
records that the delivery failed (`webhook_deliveries` in the job record).

Imports neither torch nor the engine: the webhook worker is a small process without a model.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import random
import time
from functools import lru_cache

import httpx
from celery import Task

from api.batches import BATCH_ID_PREFIX, BatchStore
from api.celery_client import WEBHOOK_QUEUE, WEBHOOK_TASK, app
from api.settings import Settings, get_settings
from api.store import JobStore
from api.webhook_targets import Resolver, WebhookTargetError, check_target, resolve

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
TIMEOUT_S = 10.0  # per attempt; a receiver should answer fast and do its work later
MAX_BACKOFF_S = 3600.0  # exponential growth stops here, so a long retry chain still ends in hours, not days
USER_AGENT = "inferq-webhooks/0.1"


class DeliveryError(Exception):
    """One attempt failed in a way worth retrying (network error or non-2xx answer)."""


# ---- signing -------------------------------------------------------------------------------------------------
def secret_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: "whsec_" + base64(key) (the prefix is optional).
    Decoded exactly as the `standardwebhooks` library does, so its verification always agrees with our signing."""
    encoded = secret[len(SECRET_PREFIX):] if secret.startswith(SECRET_PREFIX) else secret
    try:
        key = base64.b64decode(encoded + "==")  # tolerates unpadded base64, like the library
    except binascii.Error as exc:
        raise ValueError(f"the webhook secret is not whsec_ + base64: {exc}") from None
    if not key:
        raise ValueError("the webhook secret decodes to an empty key; use whsec_ + base64 of random bytes")
    return key


def sign(key: bytes, webhook_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header value for one message."""
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers_for(webhook_id: str, body: str, secret: str, now: float | None = None) -> dict[str, str]:
    """Headers of one attempt; the timestamp is the attempt's (receivers refuse old ones), the id is the event's."""
    timestamp = int(now if now is not None else time.time())
    headers = {"content-type": "application/json", "user-agent": USER_AGENT, "webhook-id": webhook_id,
               "webhook-timestamp": str(timestamp)}
    if secret:
        headers["webhook-signature"] = sign(secret_key(secret), webhook_id, timestamp, body)
    return headers


# ---- delivery ------------------------------------------------------------------------------------------------
def backoff_seconds(attempt: int, base: float, rng: random.Random | None = None) -> float:
    """Delay after failed attempt number `attempt` (1-based): base * 2^(attempt-1), capped, times a jitter in
    [0.5, 1) so that receivers coming back from an outage are not hit by every retry at the same instant."""
    delay = min(base * 2 ** (attempt - 1), MAX_BACKOFF_S)
    return delay * (0.5 + 0.5 * (rng or random).random())


def post_once(url: str, webhook_id: str, body: str, settings: Settings, resolver: Resolver = resolve) -> int:
    """One attempt; returns the 2xx status or raises DeliveryError (WebhookTargetError if the target is refused)."""
    # Checked again at every attempt: the host's DNS may point somewhere private by now.
    checked = check_target(url, settings.webhook_allow_hosts, resolver)
    headers = headers_for(webhook_id, body, settings.webhook_secret)
    target, extensions = httpx.URL(url), {}
    if checked:
        # Connect to the address just checked, not to whatever a second lookup of the name returns (DNS
        # rebinding); the name still goes in the Host header and in TLS (SNI and the certificate check).
        headers["host"] = target.netloc.decode()
        extensions["sni_hostname"] = target.host
        target = target.copy_with(host=checked[0])
    try:
        # No redirects: a redirect could lead to an address the target check would refuse. The answer's body is
        # never read: only its status matters, and a hostile receiver could send gigabytes.
        with httpx.Client(timeout=TIMEOUT_S, follow_redirects=False) as client:
            with client.stream("POST", target, content=body.encode(), headers=headers,
                               extensions=extensions) as response:
                status = response.status_code
    except httpx.HTTPError as exc:
        raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
    if not 200 <= status < 300:
        raise DeliveryError(f"HTTP {status}")
    return status


@lru_cache(maxsize=1)
def _store() -> JobStore:
    settings = get_settings()
    return JobStore.from_url(settings.redis_url, prefix=settings.key_prefix,
                             retention_seconds=settings.result_retention_seconds)


def _record(subject_id: str, event: str, status: str, attempts: int, last_error: str | None, **extra) -> None:
    """Keep the outcome on the job or batch the event was about (its id tells which)."""
    store = _store()
    key = BatchStore(store).key(subject_id) if subject_id.startswith(BATCH_ID_PREFIX) else None
    store.record_webhook(subject_id, event, status, attempts, last_error, key=key, **extra)


# max_retries=None on the task: the attempt count is ours (INFERQ_WEBHOOK_MAX_ATTEMPTS), not Celery's default 3.
@app.task(bind=True, name=WEBHOOK_TASK, queue=WEBHOOK_QUEUE, ignore_result=True, max_retries=None)
def deliver_webhook(self: Task, job_id: str, event: str, webhook_id: str, url: str, body: str) -> None:
    """Deliver one event; on failure schedule the next attempt, or record the failure after the last one."""
    settings = get_settings()
    attempt = self.request.retries + 1
    try:
        status = post_once(url, webhook_id, body, settings)
    except WebhookTargetError as exc:  # a refusal does not get better by retrying
        log.warning("webhook %s refused: %s", webhook_id, exc)
        _record(job_id, event, "failed", attempt, str(exc), webhook_id=webhook_id)
        return
    except DeliveryError as exc:
        if attempt >= settings.webhook_max_attempts:
            log.warning("webhook %s failed after %d attempts: %s", webhook_id, attempt, exc)
            _record(job_id, event, "failed", attempt, str(exc), webhook_id=webhook_id)
            return
        delay = backoff_seconds(attempt, settings.webhook_backoff_seconds)
        log.info("webhook %s: attempt %d failed (%s); retrying in %.2f s", webhook_id, attempt, exc, delay)
        # Same args on the retry: same webhook id, same body.
        raise self.retry(countdown=delay, exc=exc)
    log.info("webhook %s delivered (HTTP %d, attempt %d)", webhook_id, status, attempt)
    _record(job_id, event, "delivered", attempt, None, webhook_id=webhook_id, status_code=status)
