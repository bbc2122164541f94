"""Back-pressure and availability: 429 when a model's queue is too deep, 503 when its workers are gone."""
from __future__ import annotations

import time

from tests.service import MODEL, Service
from tests.test_service import assert_error
from worker.runtime import capacities

LONG = {"model": MODEL, "prompt": "busy", "max_tokens": 1500, "temperature": 0, "ignore_eos": True}


def test_queue_full_then_no_worker(redis_url, demo_model_dir, tmp_path):
    service = Service(redis_url, demo_model_dir, tmp_path, INFERQ_MAX_QUEUE_DEPTH="2")
    try:
        service.start_worker(max_num_seqs=1)
        service.start_api()
        with service.client() as client:
            # Every thread of the worker busy (one in the engine's batch, the rest waiting in the engine)...
            running = [client.post("/v1/jobs", json=LONG).json()["id"] for _ in range(capacities(1)["threads"])]
            deadline = time.monotonic() + 30
            while any(client.get(f"/v1/jobs/{job_id}").json()["status"] != "running" for job_id in running):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            # ... so these wait in the queue.
            queued = [client.post("/v1/jobs", json=LONG).json()["id"] for _ in range(2)]
            refused = client.post("/v1/jobs", json=LONG)
            assert_error(refused, 429, "2 jobs are queued")
            assert refused.headers["retry-after"] == "5"
            for job_id in [*running, *queued]:  # nothing was lost by refusing the third
                assert client.get(f"/v1/jobs/{job_id}").json()["status"] in ("queued", "running")

            service.kill_worker()
            deadline = time.monotonic() + 30
            while service.store.registry.workers(MODEL):  # the heartbeat lease runs out
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert_error(client.post("/v1/completions", json=LONG), 503, "no worker is serving")
            assert client.get("/ready").status_code == 503
    finally:
        service.stop()
