"""kill -9 a worker in the middle of jobs, start a new one: every job still succeeds, exactly once."""
from __future__ import annotations

import json
import threading
import time

from tests.service import MODEL, Service

LONG = {"model": MODEL, "max_tokens": 300, "temperature": 0, "ignore_eos": True}


def test_worker_killed_mid_job_resumes_where_it_stopped(redis_url, demo_model_dir, tmp_path):
    """Greedy and seeded jobs, streamed and not, in flight when their worker is killed: the new worker resumes each
    from its saved tokens. Every stream reads as one unbroken output, no restart, nothing repeated or missing;
    the results equal runs that were never interrupted, and usage counts every token once."""
    service = Service(redis_url, demo_model_dir, tmp_path)
    seeded = {**LONG, "temperature": 0.9, "seed": 11}
    try:
        service.start_worker()
        service.start_api()
        streams = {"greedy": {**LONG, "prompt": "streamed:"}, "seeded": {**seeded, "prompt": "seeded:"}}
        streamed = {name: {"text": "", "id": "", "events": []} for name in streams}
        started = {name: threading.Event() for name in streams}

        def stream_client(name: str) -> None:
            """An OpenAI streaming request in flight when the worker dies."""
            with service.client() as c, \
                    c.stream("POST", "/v1/completions", json={**streams[name], "stream": True}) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        streamed[name]["id"] = chunk["id"].removeprefix("cmpl-")
                        streamed[name]["text"] += "".join(choice["text"] for choice in chunk["choices"])
                        started[name].set()

        def events_reader(job_id: str) -> None:
            """The same job's /v1/jobs events, read beside its OpenAI stream."""
            with service.client() as c, c.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        streamed["greedy"]["events"].append(json.loads(line[6:]))

        clients = [threading.Thread(target=stream_client, args=(name,)) for name in streams]
        for thread in clients:
            thread.start()
        assert all(event.wait(60) for event in started.values())
        reader = threading.Thread(target=events_reader, args=(streamed["greedy"]["id"],))
        reader.start()
        with service.client() as client:
            bodies = [{**(seeded if i % 2 else LONG), "prompt": f"job {i}:"} for i in range(6)]
            ids = [client.post("/v1/jobs", json=body).json()["id"] for body in bodies]
            deadline = time.monotonic() + 60
            while not all(len(service.store.read_progress(i).get(0, ())) > 40 for i in ids):  # past a checkpoint
                assert time.monotonic() < deadline, "jobs did not start"
                time.sleep(0.05)
            service.kill_worker()
            assert all(client.get(f"/v1/jobs/{i}").json()["status"] == "running" for i in ids)
            service.start_worker()
            jobs = [client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json() for job_id in ids]
            for thread in [*clients, reader]:
                thread.join(timeout=120)
            streamed_jobs = {name: client.get(f"/v1/jobs/{streamed[name]['id']}").json() for name in streams}
            # Runs never interrupted, on the worker that is alive now.
            fresh = {i: client.post("/v1/completions", json=bodies[i]).json() for i in (0, 1)}
            fresh_streams = {name: client.post("/v1/completions", json=body).json() for name, body in streams.items()}
        for name, job in streamed_jobs.items():
            assert (job["status"], job["attempts"]) == ("succeeded", 2), name
            assert job["resumed_tokens"] > 0, name
            assert streamed[name]["text"] == job["result"]["choices"][0]["text"], name  # nothing repeated or lost
            assert job["result"]["choices"][0]["text"] == fresh_streams[name]["choices"][0]["text"], name
            assert job["usage"]["completion_tokens"] == 300, name
        events = streamed["greedy"]["events"]
        assert "restart" not in [e["type"] for e in events] and events[-1] == {"type": "end", "status": "succeeded"}
        assert "".join(c["text"] for e in events if e["type"] == "delta" for c in e["choices"]) == \
            streamed_jobs["greedy"]["result"]["choices"][0]["text"]
        assert [j["status"] for j in jobs] == ["succeeded"] * 6
        assert all(j["attempts"] == 2 and j["resumed_tokens"] > 40 for j in jobs)
        assert all(j["usage"]["completion_tokens"] == 300 for j in jobs)
        for i in (0, 1):  # greedy, seeded
            assert jobs[i]["result"]["choices"][0]["text"] == fresh[i]["choices"][0]["text"]
        assert not any(service.store.r.exists(service.store.keys.progress(i)) for i in ids)  # deleted at the end
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
