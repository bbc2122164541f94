"""Riding out a Redis outage inside a task: retry the call while Redis restarts or refuses writes."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from kombu.exceptions import OperationalError

log = logging.getLogger(__name__)

REDIS_PATIENCE_S = 120.0  # how long a task rides out a Redis outage before it gives up (to the sweeper, for jobs)
T = TypeVar("T")


def patiently(call: Callable[[], T], patience_s: float = REDIS_PATIENCE_S) -> T:
    """`call()`, retried for up to `patience_s` while Redis is away (restarting) or refuses writes (out of memory):
    both pass, and a task that gave up instead would leave its work to slower recovery (or to none)."""
    deadline, delay = time.monotonic() + patience_s, 0.2
    while True:
        try:
            return call()
        except (redis.RedisError, OperationalError) as exc:  # OperationalError: kombu's, sending to the broker
            if not passing(exc) or time.monotonic() > deadline:
                raise
            log.warning("Redis unavailable; retrying in %.1f s", delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def passing(exc: Exception) -> bool:
    """Redis away, or out of memory (a write inside a script fails with a plain ResponseError saying OOM)."""
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OperationalError)) or "OOM" in str(exc)
