"""kill -9 a worker in the middle of jobs, start a new one: every job still succeeds, exactly once."""
from __future__ import annotations

import json
import threading
import time

from tests.service import MODEL, Service

LONG = {"model": MODEL, "max_tokens": 300, "temperature": 0, "ignore_eos": True}


def test_worker_killed_mid_job_loses_nothing(redis_url, demo_model_dir, tmp_path):
    service = Service(redis_url, demo_model_dir, tmp_path)
    try:
        service.start_worker()
        service.start_api()
        streamed: dict[str, str] = {"text": "", "id": ""}
        first_chunk = threading.Event()

        def stream_client() -> None:
            """An OpenAI streaming request that is in flight when the worker dies."""
            body = {**LONG, "prompt": "streamed:", "stream": True}
            with service.client() as c, c.stream("POST", "/v1/completions", json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        streamed["id"] = chunk["id"].removeprefix("cmpl-")
                        streamed["text"] += "".join(choice["text"] for choice in chunk["choices"])
                        first_chunk.set()

        streaming = threading.Thread(target=stream_client)
        streaming.start()
        assert first_chunk.wait(60)
        with service.client() as client:
            ids = [client.post("/v1/jobs", json={**LONG, "prompt": f"job {i}:"}).json()["id"] for i in range(6)]
            deadline = time.monotonic() + 60
            while not all(client.get(f"/v1/jobs/{i}").json()["first_token_at"] for i in ids):
                assert time.monotonic() < deadline, "jobs did not start"
                time.sleep(0.05)
            service.kill_worker()
            assert all(client.get(f"/v1/jobs/{i}").json()["status"] == "running" for i in ids)
            service.start_worker()
            jobs = []
            for job_id in ids:
                job = client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
                jobs.append(job)
            streaming.join(timeout=120)
            streamed_job = client.get(f"/v1/jobs/{streamed['id']}").json()
        # The stream restarted with the job but sent each piece of text once.
        assert streamed_job["attempts"] == 2
        assert streamed["text"] == streamed_job["result"]["choices"][0]["text"]
        assert [j["status"] for j in jobs] == ["succeeded"] * 6
        assert all(j["attempts"] == 2 for j in jobs)
        assert all(j["usage"]["completion_tokens"] == 300 for j in jobs)
        # The greedy result of the rerun equals a run that was never interrupted.
        with service.client() as client:
            fresh = client.post("/v1/completions", json={**LONG, "prompt": "job 0:"}).json()
        assert fresh["choices"][0]["text"] == jobs[0]["result"]["choices"][0]["text"]
    finally:
        service.stop()


def test_job_recorded_by_an_api_that_died_before_sending_it_still_runs(redis_url, demo_model_dir, tmp_path):
    """The first half of a submission (the job recorded in Redis) without the second (its message sent): what an
    API process killed between the two leaves behind. A worker's heartbeat sends it."""
    service = Service(redis_url, demo_model_dir, tmp_path)
    try:
        service.start_worker()
        body = {**LONG, "max_tokens": 8, "prompt": "orphan:"}
        job, created = service.store.create(owner="o", model=MODEL, endpoint="completions", request=body)
        assert created and service.store.get(job.id).dispatch == 0
        finished = service.wait_for_job(job.id, timeout_s=60)
        assert finished is not None and finished.status == "succeeded"
        assert (finished.attempts, finished.dispatch) == (1, 1)
        assert finished.usage["completion_tokens"] == 8
    finally:
        service.stop()
