"""The worker registry: which workers are alive and what each serves, from their heartbeats.

Keys: {p}:worker:{model}:{wid} (string, JSON of the worker's info, TTL = its heartbeat lease),
{p}:workers:{model} (sorted set of worker ids, score = lease expiry), {p}:models (every model ever announced),
{p}:models:created (hash, model -> when a worker first announced it: the model object's `created`),
{p}:throughput:{t} (hash, model -> completion tokens generated in the THROUGHPUT_BUCKET_S seconds from Unix time t,
a multiple of the bucket: each heartbeat adds what its worker's engine generated since the one before; TTL = the
window the dashboard plots, plus a minute).
"""
from __future__ import annotations

import json
import time

import redis

from api.job_record import dump

THROUGHPUT_BUCKET_S = 5
THROUGHPUT_WINDOW_S = 600  # what the dashboard plots (api/dashboard.py): 120 buckets


def throughput_key(prefix: str, bucket: int) -> str:
    return f"{prefix}:throughput:{bucket}"


def spread_tokens(tokens: int, start: float, end: float) -> dict[int, int]:
    """`tokens` generated between Unix times `start` and `end`, shared among the throughput buckets that interval
    spans in proportion to their overlap with it (bucket start -> tokens; the shares sum to `tokens`, less what
    falls before the window): a heartbeat's period need not match the bucket's."""
    if tokens <= 0:
        return {}
    size = THROUGHPUT_BUCKET_S
    if end <= start:
        return {int(end // size) * size: tokens}
    first, last = int(max(start, end - THROUGHPUT_WINDOW_S) // size), int(end // size)
    shares: dict[int, int] = {}
    given = max(0, round(tokens * (first * size - start) / (end - start)))  # before the window: dropped
    for index in range(first, last + 1):
        upto = min(end, (index + 1) * size)
        share = round(tokens * (upto - start) / (end - start)) - given
        if share > 0:
            shares[index * size] = share
            given += share
    return shares


class WorkerRegistry:
    def __init__(self, redis_client: redis.Redis, prefix: str) -> None:
        self.r = redis_client
        self.prefix = prefix
        self._snapshot: tuple[float, dict[str, list[dict]], set[str]] | None = None

    def announce(self, worker_id: str, info: dict, ttl_s: int, tokens: dict[int, int] | None = None) -> None:
        """Heartbeat: the worker serving `info["model"]` is alive for `ttl_s` more seconds; `tokens`: what its
        engine generated since the last heartbeat, per throughput bucket (spread_tokens)."""
        model, now = info["model"], time.time()
        record = {**info, "worker_id": worker_id, "last_seen": now}
        pipe = self.r.pipeline(transaction=True)
        pipe.set(f"{self.prefix}:worker:{model}:{worker_id}", dump(record), px=max(1, int(ttl_s * 1000)))
        pipe.zadd(f"{self.prefix}:workers:{model}", {worker_id: now + ttl_s})
        pipe.sadd(f"{self.prefix}:models", model)
        pipe.hsetnx(f"{self.prefix}:models:created", model, int(now))
        for bucket, count in (tokens or {}).items():
            key = throughput_key(self.prefix, bucket)
            pipe.hincrby(key, model, count)
            pipe.expire(key, THROUGHPUT_WINDOW_S + 60)
        pipe.execute()

    def created(self, models: list[str]) -> dict[str, int]:
        """When a worker first announced each model (Unix seconds); models never announced are left out."""
        if not models:
            return {}
        values = self.r.hmget(f"{self.prefix}:models:created", models)
        return {model: int(value) for model, value in zip(models, values) if value is not None}

    def workers(self, model: str | None = None) -> list[dict]:
        """Live workers (of one model, or of all), by model then worker id."""
        names = [model] if model is not None else sorted(self.r.smembers(f"{self.prefix}:models"))
        live: list[dict] = []
        for name in names:
            index = f"{self.prefix}:workers:{name}"
            # Pruning by lease expiry (not by a missing key) cannot undo a heartbeat that lands meanwhile.
            self.r.zremrangebyscore(index, "-inf", time.time())
            ids = sorted(self.r.zrange(index, 0, -1))
            values = self.r.mget([f"{self.prefix}:worker:{name}:{wid}" for wid in ids]) if ids else []
            live.extend(json.loads(value) for value in values if value is not None)
        return live

    def known_models(self) -> set[str]:
        """Every model a worker has ever announced, live or not (tells "no worker now" from "no such model")."""
        return set(self.r.smembers(f"{self.prefix}:models"))

    def snapshot(self, max_age_s: float = 1.0) -> tuple[dict[str, list[dict]], set[str]]:
        """(models(), known_models()), read from Redis at most every `max_age_s` by this registry: every
        submission and every batch line's end needs them, and heartbeats change them only every few seconds."""
        now = time.monotonic()
        if self._snapshot is None or now - self._snapshot[0] > max_age_s:
            self._snapshot = (now, self.models(), self.known_models())
        return self._snapshot[1], self._snapshot[2]

    def models(self) -> dict[str, list[dict]]:
        """Model name -> its live workers' infos; models without a live worker are left out."""
        served: dict[str, list[dict]] = {}
        for info in self.workers():
            served.setdefault(info["model"], []).append(info)
        return served
