"""Prometheus metrics. Workers record per-job numbers in Redis when a job ends, so every API replica serves the
same totals; the API renders them together with live gauges (queue depth, per-worker batch size and KV use)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from api.job_record import Job
from api.store import JobStore

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STATUSES = ("succeeded", "failed", "cancelled")


def _key(store: JobStore, model: str) -> str:
    return f"{store.prefix}:metrics:{model}"


def record_finished(store: JobStore, job: Job) -> None:
    """Count a job that just became terminal; called once, by whoever's finish or cancel won."""
    key = _key(store, job.model)
    tokens = int((job.usage or {}).get("completion_tokens", 0))
    pipe = store.r.pipeline(transaction=False)
    pipe.sadd(f"{store.prefix}:metrics:models", job.model)
    pipe.hincrby(key, f"jobs_{job.status}", 1)
    pipe.hincrby(key, "generated_tokens", tokens)
    if job.first_token_at and job.created_at:
        _observe(pipe, key, "ttft", job.first_token_at - job.created_at, TTFT_BUCKETS, 1)
    if job.first_token_at and job.finished_at and tokens > 1:
        # Per-token times are not kept: each of the job's gaps counts as the job's mean gap.
        _observe(pipe, key, "itl", (job.finished_at - job.first_token_at) / (tokens - 1), ITL_BUCKETS, tokens - 1)
    pipe.execute()


def _observe(pipe, key: str, name: str, value: float, buckets: tuple[float, ...], weight: int) -> None:
    bucket = next((str(b) for b in buckets if value <= b), "+Inf")
    pipe.hincrby(key, f"{name}_bucket_{bucket}", weight)
    pipe.hincrbyfloat(key, f"{name}_sum", value * weight)
    pipe.hincrby(key, f"{name}_count", weight)


class _Collector:
    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self):
        store = self.store
        workers = store.registry.workers()
        models = sorted(set(store.registry.known_models()) | store.r.smembers(f"{store.prefix}:metrics:models"))
        jobs = GaugeMetricFamily("inferq_jobs", "Jobs queued or running now", labels=["model", "state"])
        finished = CounterMetricFamily("inferq_jobs_finished", "Jobs ended, by final status", labels=["model", "status"])
        tokens = CounterMetricFamily("inferq_generated_tokens", "Completion tokens generated", labels=["model"])
        ttft = HistogramMetricFamily("inferq_time_to_first_token_seconds", "Submission to first token",
                                     labels=["model"])
        itl = HistogramMetricFamily("inferq_inter_token_latency_seconds", "Time between generated tokens",
                                    labels=["model"])
        for model in models:
            stats = store.r.hgetall(_key(store, model))
            running = sum(int(w.get("active_jobs", 0)) for w in workers if w.get("model") == model)
            jobs.add_metric([model, "queued"], store.queue_depth(model))
            jobs.add_metric([model, "running"], running)
            for status in STATUSES:
                finished.add_metric([model, status], int(stats.get(f"jobs_{status}", 0)))
            tokens.add_metric([model], int(stats.get("generated_tokens", 0)))
            for family, name, buckets in ((ttft, "ttft", TTFT_BUCKETS), (itl, "itl", ITL_BUCKETS)):
                cumulative, rows = 0, []
                for bound in [*map(str, buckets), "+Inf"]:
                    cumulative += int(stats.get(f"{name}_bucket_{bound}", 0))
                    rows.append((bound, cumulative))
                family.add_metric([model], rows, float(stats.get(f"{name}_sum", 0.0)))
        yield from (jobs, finished, tokens, ttft, itl)

        labels = ["model", "worker"]
        batch = GaugeMetricFamily("inferq_worker_batch_size", "Requests in the worker's last engine step", labels=labels)
        peak = GaugeMetricFamily("inferq_worker_max_batch_size", "Largest engine step batch so far", labels=labels)
        kv = GaugeMetricFamily("inferq_worker_kv_cache_usage_ratio", "Share of KV-cache blocks in use", labels=labels)
        waiting = GaugeMetricFamily("inferq_worker_waiting_requests", "Requests waiting in the engine", labels=labels)
        steps = CounterMetricFamily("inferq_worker_engine_steps", "Engine steps run", labels=labels)
        busy = CounterMetricFamily("inferq_worker_engine_busy_seconds", "Time the engine spent in its steps",
                                   labels=labels)
        # As vLLM's prefix_cache_queries / prefix_cache_hits: their ratio over an interval is the hit rate.
        queries = CounterMetricFamily("inferq_worker_prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                      "cache at their request's first step", labels=labels)
        hits = CounterMetricFamily("inferq_worker_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                   labels=labels)
        for w in workers:
            key = [w["model"], w["worker_id"]]
            queries.add_metric(key, w.get("prefix_cache_queries", 0))
            hits.add_metric(key, w.get("prefix_cache_hits", 0))
            batch.add_metric(key, w.get("batch_size", 0))
            peak.add_metric(key, w.get("max_batch_size", 0))
            total = w.get("num_kv_blocks") or 1
            kv.add_metric(key, 1.0 - w.get("num_free_kv_blocks", total) / total)
            waiting.add_metric(key, w.get("num_waiting", 0))
            steps.add_metric(key, w.get("steps", 0))
            busy.add_metric(key, w.get("engine_busy_seconds", 0.0))
        yield from (batch, peak, kv, waiting, steps, busy, queries, hits)


def render(store: JobStore) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(store))
    return generate_latest(registry)
