"""The dashboard: `GET /dashboard`, one hand-written page (api/static/: HTML, JS and CSS, served by the API; no CDN,
no build step) that polls `GET /dashboard/data` every two seconds with the API key it keeps in localStorage.

`/dashboard/data` answers one JSON document, read from what the service keeps anyway:

- `workers`: each live worker's heartbeat (api/registry.py, worker/runtime.py): model, device, dtype, low-bit
  format, running sequences now against max_num_seqs, sequences waiting in the engine, KV-cache use;
- `queues`: per model and lane, interactive jobs queued and running, batch lines pending in the bulk lane and in
  flight (api/lanes.py);
- `recent_jobs`: the caller's newest interactive jobs (the store's capped recent index, written by the create
  script) with their status and latencies;
- `batches`: the caller's newest batches (api/batches.py) with their counts, rate and ETA;
- `throughput`: completion tokens/s per model over the last ten minutes, from the buckets the workers' heartbeats
  fill (api/registry.py: spread_tokens).

Cost per poll: three pipelined round trips of bounded size (about 120 throughput buckets, five keys per model, one
record per worker, recent job and batch: no scan of all jobs, nothing on the hot path); the part every caller shares
(workers, queues, throughput) is read at most once a second per API process, however many pages are open.

The route is keyed like the rest of the API (401 in OpenAI's shape) and left out of /openapi.json, as /docs is: it
is the page's, not a client API.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from api.deps import APIError, OwnerDep
from api.registry import THROUGHPUT_BUCKET_S, THROUGHPUT_WINDOW_S, throughput_key
from api.store import RECENT_JOBS, JobStore

STATIC_DIR = Path(__file__).parent / "static"
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
# The page loads only its own script and style and talks only to this API.
HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                      "img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                                      "frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"}
RECENT_BATCHES = 10
SHARED_MAX_AGE_S = 1.0
_JOB_FIELDS = ("status", "model", "endpoint", "created_at", "started_at", "first_token_at", "finished_at", "usage")
_BATCH_FIELDS = ("id", "status", "model", "endpoint", "total", "completed", "failed", "done", "created_at",
                 "in_progress_at", "finalizing_at", "completed_at", "failed_at", "cancelled_at", "expired_at",
                 "expires_at")
_BATCH_ENDS = ("completed_at", "failed_at", "cancelled_at", "expired_at")

router = APIRouter(tags=["dashboard"], include_in_schema=False)


@router.get("/dashboard")
def page() -> FileResponse:
    """The page itself holds no data: it asks for the key and reads /dashboard/data."""
    return FileResponse(STATIC_DIR / "dashboard.html", media_type="text/html", headers=HEADERS)


@router.get("/dashboard/data")
def data(request: Request, owner: OwnerDep) -> dict:
    """Everything the page shows (see the module's docstring)."""
    return request.app.state.dashboard.read(owner)


@router.get("/dashboard/{name}")
def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise APIError(404, f"Invalid URL (GET /dashboard/{name})", type="not_found_error")
    return FileResponse(STATIC_DIR / name, media_type=ASSETS[name], headers=HEADERS)


class DashboardReader:
    """Reads what /dashboard/data answers; one per API process (app.state.dashboard)."""

    def __init__(self, store: JobStore, heartbeat_s: float) -> None:
        self.store = store
        self.heartbeat_s = float(heartbeat_s)
        self._shared: tuple[float, dict] | None = None
        self._lock = threading.Lock()

    def read(self, owner: str) -> dict:
        store, r, now = self.store, self.store.r, time.time()
        with self._lock:
            shared = self._shared if self._shared and time.monotonic() - self._shared[0] < SHARED_MAX_AGE_S else None
        buckets = self._buckets(now)
        # Round trip 1: the ids everything else hangs on (and the throughput buckets, which need none).
        pipe = r.pipeline(transaction=False)
        pipe.zrevrange(store.recent_key(owner), 0, RECENT_JOBS - 1)
        pipe.zrevrange(f"{store.prefix}:owner:{owner}:batches", 0, RECENT_BATCHES - 1)
        if shared is None:
            pipe.smembers(f"{store.prefix}:models")
            for bucket in buckets:
                pipe.hgetall(throughput_key(store.prefix, bucket))
        first = pipe.execute()
        job_ids, batch_ids = first[0], first[1]
        # Round trip 2: the records, and per model its live workers and queues.
        pipe = r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(store.keys.job(job_id), _JOB_FIELDS)
        for batch_id in batch_ids:
            pipe.hmget(f"{store.prefix}:batch:{batch_id}", _BATCH_FIELDS)
        if shared is None:
            models = sorted(first[2])
            for model in models:
                pipe.zrangebyscore(f"{store.prefix}:workers:{model}", now, "+inf")
                pipe.zcard(store.keys.queued(model))
                pipe.zcard(store.keys.open_interactive(model))
                pipe.llen(f"{store.prefix}:bulk:{model}:pending")
                pipe.zcard(f"{store.prefix}:bulk:{model}:inflight")
        second = pipe.execute()
        jobs = [_job(job_id, values, now) for job_id, values in zip(job_ids, second)]
        batches = [_batch(values, now) for values in second[len(job_ids):len(job_ids) + len(batch_ids)]]
        if shared is None:
            shared = self._shared_part(models, second[len(job_ids) + len(batch_ids):], buckets, first[3:], now)
            with self._lock:
                self._shared = (time.monotonic(), shared)
        else:
            shared = shared[1]
        return {"object": "dashboard", "now": now, **shared,
                "recent_jobs": [job for job in jobs if job is not None],
                "batches": [batch for batch in batches if batch is not None]}

    def _buckets(self, now: float) -> list[int]:
        """The plotted buckets, oldest first: the window's, up to the newest one every heartbeat has filled."""
        size = THROUGHPUT_BUCKET_S
        last = int((now - self.heartbeat_s) // size) - 1  # ended at least a heartbeat ago
        return [index * size for index in range(last - THROUGHPUT_WINDOW_S // size + 1, last + 1)]

    def _shared_part(self, models: list[str], per_model: list, buckets: list[int], counts: list[dict],
                     now: float) -> dict:
        r, prefix = self.store.r, self.store.prefix
        queues, worker_keys = [], []
        for i, model in enumerate(models):
            ids, queued, open_interactive, pending, in_flight = per_model[5 * i:5 * i + 5]
            worker_keys += [f"{prefix}:worker:{model}:{wid}" for wid in sorted(ids)]
            queues.append({"model": model, "workers": len(ids), "interactive_queued": queued,
                           "interactive_running": max(0, open_interactive - queued), "bulk_pending": pending,
                           "bulk_in_flight": in_flight})
        # Round trip 3: the live workers' heartbeats.
        infos = [json.loads(v) for v in r.mget(worker_keys) if v is not None] if worker_keys else []
        series: dict[str, list[float]] = {}
        for index, count in enumerate(counts):
            for model, tokens in count.items():
                series.setdefault(model, [0.0] * len(buckets))[index] = int(tokens) / THROUGHPUT_BUCKET_S
        total = [round(sum(values), 2) for values in zip(*series.values())] if series else [0.0] * len(buckets)
        return {"workers": [_worker(info, now) for info in infos], "queues": queues,
                "throughput": {"bucket_s": THROUGHPUT_BUCKET_S, "window_s": THROUGHPUT_WINDOW_S,
                               "start": buckets[0], "times": buckets, "total": total,
                               "models": {model: [round(v, 2) for v in values]
                                          for model, values in sorted(series.items())}}}


def _worker(info: dict, now: float) -> dict:
    blocks = int(info.get("num_kv_blocks") or 0)
    free = int(info.get("num_free_kv_blocks", blocks) or 0)
    return {"worker_id": info.get("worker_id"), "model": info.get("model"), "device": info.get("device"),
            "dtype": info.get("dtype"), "load_in_low_bit": info.get("load_in_low_bit"),
            "running": int(info.get("num_running", 0)), "max_num_seqs": info.get("max_num_seqs"),
            "waiting": int(info.get("num_waiting", 0)), "active_jobs": int(info.get("active_jobs", 0)),
            "kv_cache_usage": round(1.0 - free / blocks, 4) if blocks else None, "kv_blocks": blocks,
            "generated_tokens": int(info.get("generated_tokens", 0)),
            "seen_s_ago": round(max(0.0, now - float(info.get("last_seen", now))), 1)}


def _float(value) -> float | None:
    return float(value) if value else None


def _job(job_id: str, values: list, now: float) -> dict | None:
    status, model, endpoint, created, started, first_token, finished, usage = values
    if status is None:  # expired
        return None
    created, started, first_token, finished = map(_float, (created, started, first_token, finished))
    usage = json.loads(usage) if usage else {}

    def since_created(t):
        return round(t - created, 3) if t is not None and created is not None else None

    return {"id": job_id, "model": model, "endpoint": endpoint, "status": status, "created_at": created,
            "queued_s": since_created(started), "ttft_s": since_created(first_token),
            # ended: submission to end; not yet: how long it has been waiting or running
            "latency_s": since_created(finished if finished is not None else now), "finished": finished is not None,
            "completion_tokens": usage.get("completion_tokens")}


def _batch(values: list, now: float) -> dict | None:
    f = dict(zip(_BATCH_FIELDS, values))
    if f["id"] is None:
        return None
    total, completed, failed, done = (int(f[name] or 0) for name in ("total", "completed", "failed", "done"))
    created = _float(f["created_at"])
    ended = next((_float(f[name]) for name in _BATCH_ENDS if f[name]), None)
    elapsed = max(1.0, (ended or now) - created) if created else None
    rate = done / elapsed if elapsed and done else 0.0
    running = f["status"] in ("validating", "in_progress")
    eta = round((total - done) / rate, 1) if running and total and rate else None
    return {"id": f["id"], "status": f["status"], "model": f["model"], "endpoint": f["endpoint"], "total": total,
            "completed": completed, "failed": failed, "done": done, "created_at": created, "ended_at": ended,
            "lines_per_s": round(rate, 2), "eta_s": eta, "elapsed_s": round(elapsed, 1) if elapsed else None}
