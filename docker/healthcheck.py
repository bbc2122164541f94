"""Healthchecks of inferq's Celery workers in a container (docker-compose.yml), which have no HTTP port.

    inferq-healthcheck worker           a model worker: its heartbeat is in Redis (the worker announces itself every
                                        INFERQ_WORKER_HEARTBEAT_SECONDS once its engine runs; the record lives three
                                        beats) and its Celery consumer answers a ping
    inferq-healthcheck webhook-worker   the webhook worker's Celery consumer answers a ping

Each looks only for the workers of this host (container): a model worker's id and every worker's Celery node name
start with or end in socket.gethostname() (worker/runtime.py, worker/cli.py). Exit 0: healthy; 1: not, with the
reason on stderr (`docker inspect` shows it). One Redis round trip per model for the heartbeat, and one ping
answered only by this host's node: cheap enough every 30 s.
"""
from __future__ import annotations

import socket
import sys
import time

PING_TIMEOUT_S = 3.0


def live_worker_ids(hostname: str) -> list[str]:
    """The ids of this host's model workers whose heartbeat lease has not expired (api/registry.py's keys)."""
    import redis

    from api.settings import get_settings

    settings = get_settings()
    r = redis.Redis.from_url(settings.redis_url, socket_timeout=PING_TIMEOUT_S, socket_connect_timeout=PING_TIMEOUT_S,
                             decode_responses=True)
    try:
        prefix, now, ids = settings.key_prefix, time.time(), []
        for model in r.smembers(f"{prefix}:models"):
            ids += [wid for wid in r.zrangebyscore(f"{prefix}:workers:{model}", now, "+inf")
                    if wid.startswith(f"{hostname}-")]
        return ids
    finally:
        r.close()


def ping(**where) -> list[str]:
    """Celery node names that answered a ping (`pattern=..., matcher="glob"`: only those nodes answer), at most one
    reply awaited."""
    from api.celery_client import app

    try:
        return [name for reply in app.control.ping(timeout=PING_TIMEOUT_S, limit=1, **where) for name in reply]
    finally:
        app.close()


def check(kind: str) -> str | None:
    """None if healthy, else why not."""
    hostname = socket.gethostname()
    if kind == "worker":
        ids = live_worker_ids(hostname)
        if not ids:
            return f"no live heartbeat of a model worker of host {hostname} in Redis (still loading its model?)"
        # The worker's Celery node is named after its id's random part and this host (worker/cli.py:
        # `<model>-<hex>@<host>`; before that, `<worker id>@<host>`).
        patterns = [f"*-{wid.rsplit('-', 1)[-1]}@{hostname}" for wid in ids]
        if not any(ping(pattern=pattern, matcher="glob") for pattern in patterns):
            return (f"the Celery consumer of worker {', '.join(ids)} ({', '.join(patterns)}) did not answer a ping "
                    f"within {PING_TIMEOUT_S:g} s")
        return None
    if kind == "webhook-worker":
        if not ping(pattern=f"webhooks-*@{hostname}", matcher="glob"):
            return (f"no webhook worker of host {hostname} answered a ping within {PING_TIMEOUT_S:g} s")
        return None
    return f"unknown kind {kind!r}: worker | webhook-worker"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 1  # Docker reserves 2
    try:
        problem = check(argv[0])
    except Exception as exc:  # noqa: BLE001 - Redis away, a bad URL: unhealthy, and say why
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
