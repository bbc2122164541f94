"""The whole service under the load users bring and the failures they meet: hundreds of concurrent clients beside a
2,000-line batch, a Redis error inside a running task, Redis killed and restarted mid-batch, a job whose task was
lost, and clients that disconnect. Every path must end every job. Real Redis, worker, API and webhook worker."""
from __future__ import annotations

import asyncio
import collections
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import redis

from api.local_redis import free_port, start_redis
from tests.service import API_KEYS, MODEL, Service
from tests.test_batches import line, read_lines, upload, wait_for

pytestmark = pytest.mark.load

COMPLETION = {"model": MODEL, "prompt": "load", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


def start(service: Service, max_num_seqs: int = 32) -> Service:
    service.start_worker(max_num_seqs=max_num_seqs)
    service.start_webhook_worker()
    service.start_api()
    return service


def openai_client(service: Service, max_retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=API_KEYS[0], max_retries=max_retries, timeout=60)


async def concurrent_completions(url: str, bodies: list[dict], timeout_s: float = 600) -> list[httpx.Response]:
    """Every body POSTed to /v1/completions at once, each on its own connection."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)
    headers = {"Authorization": f"Bearer {API_KEYS[0]}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout_s) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=body) for body in bodies))


def unfinished_jobs(service: Service) -> dict[str, int]:
    """Status -> count of the service's jobs that are not terminal."""
    counts: collections.Counter[str] = collections.Counter()
    for key in service.store.r.scan_iter(match=f"{service.prefix}:job:*", count=1000):
        if key.count(":") == 2:  # the records, not their streams
            status = service.store.r.hget(key, "status")
            if status not in ("succeeded", "failed", "cancelled"):
                counts[status] += 1
    return dict(counts)


def check_batch(oai: openai.OpenAI, batch_id: str, n: int, timeout: float = 600) -> None:
    done = wait_for(oai, batch_id, timeout=timeout)
    assert done.status == "completed", done
    outputs, errors = read_lines(oai, done.output_file_id), read_lines(oai, done.error_file_id)
    assert errors == []
    ids = [o["custom_id"] for o in outputs]
    assert len(ids) == n and set(ids) == {f"n{i}" for i in range(n)}  # every line, once
    assert all(o["response"]["status_code"] == 200 for o in outputs)


def test_400_concurrent_completions_beside_a_2000_line_batch(redis_url, demo_model_dir, tmp_path):
    service = start(Service(redis_url, demo_model_dir, tmp_path))
    try:
        oai = openai_client(service)
        lines = [line(f"n{i}", f"{i}", max_tokens=2) for i in range(2000)]
        batch = oai.batches.create(input_file_id=upload(oai, lines), endpoint="/v1/completions",
                                   completion_window="24h")
        bodies = [{**COMPLETION, "prompt": f"client {i}"} for i in range(400)]
        responses = asyncio.run(concurrent_completions(service.url, bodies))
        assert collections.Counter(r.status_code for r in responses) == {200: 400}
        assert all(r.json()["usage"]["completion_tokens"] == 8 for r in responses)
        check_batch(oai, batch.id, 2000)
        assert unfinished_jobs(service) == {}
    finally:
        service.stop()


def test_a_queue_limit_below_the_load_answers_429_and_loses_nothing(redis_url, demo_model_dir, tmp_path):
    service = start(Service(redis_url, demo_model_dir, tmp_path, INFERQ_MAX_QUEUE_DEPTH="20"), max_num_seqs=8)
    try:
        bodies = [{**COMPLETION, "prompt": f"client {i}", "max_tokens": 32} for i in range(200)]
        responses = asyncio.run(concurrent_completions(service.url, bodies))
        statuses = collections.Counter(r.status_code for r in responses)
        assert set(statuses) == {200, 429} and statuses[429] > 0, statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.json()["error"]["code"] == "queue_full" and refused.headers["retry-after"]
        assert all(r.json()["usage"]["completion_tokens"] == 32 for r in responses if r.status_code == 200)
        assert unfinished_jobs(service) == {}
    finally:
        service.stop()


def read_events(service, job_id: str) -> list[dict]:
    with service.client() as client, client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as response:
        return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


@pytest.mark.parametrize("extra", [{}, {"logprobs": 1}], ids=["resumes", "logprobs-start-over"])
def test_a_redis_error_in_a_running_task_retries_the_job(demo_model_dir, tmp_path, extra):
    """Redis refuses every write (out of memory) while a job runs: its result cannot be recorded, so the attempt
    fails; once Redis takes writes again the job is queued again and succeeds on its second run. The rerun resumes
    from the tokens saved before, and its reader sees one output; a job with logprobs (not saved) starts over,
    and its reader is told so."""
    server = start_redis()
    service = Service(server.url, demo_model_dir, tmp_path)
    admin = redis.Redis.from_url(server.url)
    try:
        start(service)
        with service.client() as client:
            job_id = client.post("/v1/jobs", json={**COMPLETION, "max_tokens": 400, **extra}).json()["id"]
            reader = ThreadPoolExecutor(1)  # someone reads its events: its deltas are written
            read = reader.submit(read_events, service, job_id)
            deadline = time.monotonic() + 30
            while (service.store.get(job_id).status != "running"
                   or not service.store.requests_while_starting(job_id)[1]  # its reader's request is in
                   or (not extra and not service.store.read_progress(job_id))):  # a checkpoint to resume from
                assert time.monotonic() < deadline
                time.sleep(0.005)
            admin.config_set("maxmemory", "1")  # noeviction: every write command now fails with OOM
            time.sleep(6)  # the job finishes in the engine meanwhile; its result is refused
            assert service.store.get(job_id).status == "running"
            admin.config_set("maxmemory", "0")
            job = service.wait_for_job(job_id, timeout_s=60)
            assert job.status == "succeeded" and job.attempts == 2, job
            assert job.usage["completion_tokens"] == 400
            events = read.result(timeout=60)
            reader.shutdown()
            assert events[-1]["type"] == "end"
            result = client.get(f"/v1/jobs/{job_id}").json()["result"]["choices"][0]
            assert result["finish_reason"] == "length"
            types = [e["type"] for e in events]
            if extra:  # told that the text starts over, and the text after that is the whole result
                assert "restart" in types and job.resumed_tokens == 0
                events = events[max(i for i, t in enumerate(types) if t == "restart"):]
            else:
                assert "restart" not in types and job.resumed_tokens > 0
            assert "".join(c["text"] for e in events if e["type"] == "delta" for c in e["choices"]) \
                == result["text"]
    finally:
        admin.config_set("maxmemory", "0")
        service.stop()
        server.stop()


def test_redis_killed_and_restarted_mid_batch(demo_model_dir, tmp_path):
    """Redis (append-only) is killed with SIGKILL while a batch runs and started again on the same data: the API
    answers 503 meanwhile, every process reconnects, and the batch completes with every line exactly once."""
    port, data = free_port(), tmp_path / "redis-data"
    server = start_redis(port=port, data_dir=data, appendonly=True)
    service = Service(server.url, demo_model_dir, tmp_path)
    try:
        start(service)
        oai = openai_client(service)
        n = 600
        batch = oai.batches.create(input_file_id=upload(oai, [line(f"n{i}", f"{i}", max_tokens=8)
                                                              for i in range(n)]),
                                   endpoint="/v1/completions", completion_window="24h")
        deadline = time.monotonic() + 120
        while oai.batches.retrieve(batch.id).request_counts.completed < n // 5:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        server.process.kill()
        server.process.wait()
        with service.client() as client:
            down = client.get(f"/v1/batches/{batch.id}")
            assert down.status_code == 503 and down.json()["error"]["type"] == "service_unavailable"
            assert down.headers["retry-after"]
        time.sleep(2)
        server = start_redis(port=port, data_dir=data, appendonly=True)
        # While Redis loads its data the API still answers 503: a client that retries (as the openai one does
        # by default) rides it out.
        check_batch(openai_client(service, max_retries=8), batch.id, n, timeout=180)
        assert unfinished_jobs(service) == {}
    finally:
        service.stop()
        server.stop()


def test_a_job_leased_to_a_live_worker_without_a_task_runs_again(redis_url, demo_model_dir, tmp_path):
    """A job recorded as running on a live worker that no task of it runs (its task was lost): the worker's
    sweeper queues it again within a few heartbeats, and a cancel of such a job ends it."""
    service = Service(redis_url, demo_model_dir, tmp_path)
    try:
        service.start_worker()
        worker_id = service.store.registry.workers(MODEL)[0]["worker_id"]
        store = service.store
        lost, _ = store.create(owner="o", model=MODEL, endpoint="completions", request=COMPLETION)
        cancelled, _ = store.create(owner="o", model=MODEL, endpoint="completions", request=COMPLETION)
        for job in (lost, cancelled):
            assert store.mark_running(job.id, store.dispatch(job.id), worker_id) is not None
        assert store.request_cancel(cancelled.id) == "cancelling"
        done = service.wait_for_job(lost.id, timeout_s=30)
        assert done.status == "succeeded" and done.attempts == 2 and done.usage["completion_tokens"] == 8
        assert service.wait_for_job(cancelled.id, timeout_s=30).status == "cancelled"
    finally:
        service.stop()


def test_a_client_that_disconnects_aborts_its_job(redis_url, demo_model_dir, tmp_path):
    service = start(Service(redis_url, demo_model_dir, tmp_path))
    try:
        long = {**COMPLETION, "max_tokens": 1800}
        with service.client() as client:
            # Non-streaming: the client gives up after a second.
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/completions", json={**long, "prompt": "impatient"}, timeout=1.5)
            # Streaming: the client reads a few chunks, then closes the stream.
            with client.stream("POST", "/v1/completions", json={**long, "prompt": "stream", "stream": True}) as r:
                for count, _ in enumerate(r.iter_lines()):
                    if count > 3:
                        break
            jobs = client.get("/v1/jobs", params={"limit": 2}).json()["data"]
            assert {j["request"]["prompt"] for j in jobs} == {"impatient", "stream"}
            for job in jobs:
                done = service.wait_for_job(job["id"], timeout_s=30)
                assert done.status == "cancelled" and done.usage["completion_tokens"] < 1800, done
        time.sleep(2.5)  # heartbeats: the worker's announcement shows its KV blocks again
        worker = service.store.registry.workers(MODEL)[0]
        assert worker["num_free_kv_blocks"] == worker["num_kv_blocks"]
    finally:
        service.stop()


def test_the_api_answers_503_while_redis_is_down(demo_model_dir, tmp_path):
    server = start_redis(port=free_port())
    service = Service(server.url, demo_model_dir, tmp_path)
    try:
        service.start_api()
        server.stop()
        with service.client() as client:
            for method, path, body in (("POST", "/v1/completions", COMPLETION), ("POST", "/v1/jobs", COMPLETION),
                                       ("GET", "/v1/jobs/job_" + "0" * 32, None), ("GET", "/v1/models", None),
                                       ("GET", "/v1/jobs", None)):
                response = client.request(method, path, json=body)
                assert response.status_code == 503, (path, response.text)
                assert json.loads(response.text)["error"]["code"] == "store_unavailable"
                assert response.headers["retry-after"] == "2"
    finally:
        service.stop()
        server.stop()
