"""The whole service end to end: API process -> Redis -> Celery worker process -> engine -> Redis -> client."""
from __future__ import annotations

import json
import os
import threading
import time

import httpx
import openai
import pytest

from tests.service import API_KEYS, MODEL, Service, running, wait_done
from worker.runtime import capacities

COMPLETION = {"model": MODEL, "prompt": "def main():", "max_tokens": 12, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def service(redis_url, demo_model_dir, tmp_path_factory):
    with running(Service(redis_url, demo_model_dir, tmp_path_factory.mktemp("service-logs"))) as svc:
        yield svc


@pytest.fixture
def client(service):
    with service.client() as c:
        yield c


def submit(client: httpx.Client, body: dict | None = None, **headers) -> dict:
    response = client.post("/v1/jobs", json=body or COMPLETION, headers=headers)
    assert response.status_code in (200, 202), response.text
    return response.json()


def assert_error(response: httpx.Response, status: int, text: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert text in error["message"], error
    return error



@pytest.mark.parametrize("endpoint, body, text", [
    # The demo chat template renders a lone system message as nothing.
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."}]}, "prompt must not be empty"),
    ("/v1/completions", {"prompt": [10**9]}, "prompt token ids must be"),
], ids=["lone-system-message", "token-id-past-the-vocabulary"])
def test_requests_the_engine_refuses_are_the_callers_errors(client, endpoint, body, text):
    """What only the engine can check (the rendered prompt, the vocabulary) is a 400 on the first attempt, not a
    worker failure retried and then answered as a 500."""
    response = client.post(endpoint, json={"model": MODEL, "max_tokens": 4, **body})
    assert_error(response, 400, text)

# ---- jobs ----

def test_submit_poll_result(client):
    created = submit(client)
    assert created["status"] in ("queued", "running") and created["urls"]["self"] == f"/v1/jobs/{created['id']}"
    job = wait_done(client, created["id"])
    assert job["status"] == "succeeded", job
    assert job["usage"]["completion_tokens"] == 12 and len(job["result"]["choices"][0]["text"]) > 0
    assert job["created_at"] <= job["started_at"] <= job["first_token_at"] <= job["finished_at"]


def test_long_poll_returns_when_done(client):
    created = submit(client, {**COMPLETION, "max_tokens": 40})
    start = time.monotonic()
    job = client.get(f"/v1/jobs/{created['id']}", params={"wait": 30}).json()
    assert job["status"] == "succeeded" and time.monotonic() - start < 25


def test_idempotent_submit_returns_the_same_job(client):
    first = submit(client, **{"Idempotency-Key": "abc-123"})
    again = client.post("/v1/jobs", json=COMPLETION, headers={"Idempotency-Key": "abc-123"})
    assert again.status_code == 200 and again.json()["id"] == first["id"]


def test_list_is_paginated_and_private(service, client):
    ids = [submit(client)["id"] for _ in range(3)]
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = client.get("/v1/jobs", params={"limit": 2, "after": page["last_id"]}).json()
    assert rest["data"][0]["id"] == ids[0]
    with service.client(API_KEYS[1]) as other:
        assert ids[0] not in [j["id"] for j in other.get("/v1/jobs").json()["data"]]
        assert_error(other.get(f"/v1/jobs/{ids[0]}"), 404, "no job")


def test_concurrent_jobs_are_batched(service):
    results: list[dict] = []

    def one_client(i: int) -> None:
        with service.client() as c:
            job = submit(c, {**COMPLETION, "prompt": f"item {i}:", "max_tokens": 24})
            results.append(wait_done(c, job["id"]))

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 32 and all(r["status"] == "succeeded" for r in results)
    time.sleep(1.5)  # one heartbeat
    assert max(w["max_batch_size"] for w in service.store.registry.workers(MODEL)) > 1


def test_cancel_running_and_queued(service, client):
    long = {**COMPLETION, "max_tokens": 1500}
    running = submit(client, long)
    for _ in range(100):
        if client.get(f"/v1/jobs/{running['id']}").json()["first_token_at"]:
            break
        time.sleep(0.1)
    # More long jobs than the worker's threads (max_num_seqs 8 plus the lanes' reserve): the last ones wait in the
    # queue.
    others = [submit(client, long)["id"] for _ in range(capacities(8)["threads"])]
    queued = others[-1]
    assert client.get(f"/v1/jobs/{queued}").json()["status"] == "queued"
    assert client.post(f"/v1/jobs/{queued}/cancel").json()["status"] == "cancelled"
    cancel_sent = time.monotonic()
    client.post(f"/v1/jobs/{running['id']}/cancel")
    for job_id in others[:-1]:
        client.post(f"/v1/jobs/{job_id}/cancel")
    job = wait_done(client, running["id"])
    assert job["status"] == "cancelled" and time.monotonic() - cancel_sent < 10
    assert job["usage"]["completion_tokens"] < 1500
    for job_id in others[:-1]:
        assert wait_done(client, job_id)["status"] == "cancelled"
    queued_job = wait_done(client, queued)
    assert queued_job["status"] == "cancelled" and queued_job["started_at"] is None
    time.sleep(2.5)  # heartbeats
    worker = service.store.registry.workers(MODEL)[0]
    assert worker["num_free_kv_blocks"] == worker["num_kv_blocks"]
    assert_error(client.post(f"/v1/jobs/{submit_and_finish(client)}/cancel"), 409, "cannot be cancelled")


def submit_and_finish(client) -> str:
    job_id = submit(client)["id"]
    wait_done(client, job_id)
    return job_id


def test_job_events_deliver_the_final_text(client):
    job = submit(client, {**COMPLETION, "max_tokens": 30})
    text, end = "", None
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["type"] == "delta":
                    text += "".join(c["text"] for c in event["choices"])
                elif event["type"] == "end":
                    end = event
    assert end["status"] == "succeeded"
    assert text == wait_done(client, job["id"])["result"]["choices"][0]["text"]



def read_events(client: httpx.Client, job_id: str) -> list[dict]:
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def test_a_job_nobody_reads_writes_no_deltas(client, service):
    """A /v1/jobs job writes its text deltas only once someone reads its events: unread, its stream holds no
    delta; read after its end, its events give the whole text (from its result) and the end."""
    job = submit(client, {**COMPLETION, "max_tokens": 30})
    done = wait_done(client, job["id"])
    assert [e["type"] for _, e in service.store.read_stream(job["id"])] == ["end"]
    events = read_events(client, job["id"])
    assert [e["type"] for e in events] == ["delta", "end"]
    assert events[0]["choices"] == [{"index": 0, "text": done["result"]["choices"][0]["text"],
                                     "finish_reason": "length"}]


def test_a_reader_that_comes_mid_run_gets_the_whole_text_then_live_deltas(client, service):
    """A reader that begins while the job runs: the worker writes the text so far, then every step's delta; the
    reader's text is the result's."""
    job = submit(client, {**COMPLETION, "max_tokens": 1500})
    deadline = time.monotonic() + 30
    while service.store.get(job["id"]).first_token_at is None:  # running, with text already generated
        assert time.monotonic() < deadline
        time.sleep(0.01)
    events = read_events(client, job["id"])
    done = wait_done(client, job["id"])
    assert done["status"] == "succeeded" and events[-1] == {"type": "end", "status": "succeeded"}
    deltas = [e for e in events if e["type"] == "delta"]
    assert len(deltas) > 2, "the deltas came as they were generated, not only at the end"
    assert "".join(c["text"] for e in deltas for c in e["choices"]) == done["result"]["choices"][0]["text"]
    written = [e["type"] for _, e in service.store.read_stream(job["id"])]
    assert written.count("delta") == len(deltas)  # the reader's deltas are the worker's, none made up

# ---- errors ----

@pytest.mark.parametrize("body, status, text", [
    ({**COMPLETION, "temperature": 5}, 400, "temperature"),
    ({**COMPLETION, "model": "nope"}, 404, "does not exist"),
    ({**COMPLETION, "max_tokens": 5000}, 400, "max_tokens is 5000, but the model's context is 2048"),
    ({"model": MODEL, "max_tokens": 3}, 400, "prompt"),
])
def test_invalid_requests(client, body, status, text):
    assert_error(client.post("/v1/completions", json=body), status, text)


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/completions", b'{"model": "demo", "prompt": "a\\ud800b"}', "prompt"),
    ("/v1/jobs", b'{"model": "demo", "prompt": "\\udfff"}', "prompt"),
    ("/v1/chat/completions", b'{"model": "demo", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages.0.content"),
    ("/v1/jobs", b'{"model": "demo", "prompt": "hi", "metadata": {"k": "\\ud800"}}', "metadata.k"),
    ("/v1/chat/completions",
     b'{"model": "demo", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
     "messages.0.content"),
])
def test_text_that_is_not_unicode_or_not_text_is_refused_at_the_door(client, path, raw, param):
    """A lone surrogate (JSON's \\ud800 escape) or a text part that is no string: 400, no job, and the owner's
    jobs still read."""
    before = client.get("/v1/jobs").json()["data"]
    error = assert_error(client.post(path, content=raw, headers={"Content-Type": "application/json"}), 400, "")
    assert error["param"].startswith(param), error
    assert client.get("/v1/jobs").json()["data"] == before


@pytest.mark.parametrize("body, param", [
    ({"endpoint": ["x"], "input_file_id": "file-x"}, "endpoint"),
    ({}, "input_file_id"),
    ({"endpoint": "/v1/completions", "input_file_id": "f", "completion_window": 5}, "completion_window"),
    ({"endpoint": "/v1/completions", "input_file_id": "f", "webhook": 5}, "webhook"),
    ({"endpoint": "/v1/completions", "input_file_id": "f", "webhook": True}, "webhook"),
    ({"endpoint": "/v1/completions", "input_file_id": "f", "metadata": {"a": 1}}, "metadata"),
    ({"endpoint": "/v1/completions", "input_file_id": "f", "metadata": {"a": "\ud800"}}, "metadata.a"),
    ({"endpoint": "/v1/completions", "input_file_id": "f", "metadata": {str(i): "v" for i in range(17)}},
     "metadata"),
])
def test_malformed_batch_requests_are_400(client, body, param):
    # Sent as ASCII JSON: a lone surrogate travels as its \\u escape, as a careless client would send it.
    response = client.post("/v1/batches", content=json.dumps(body), headers={"Content-Type": "application/json"})
    error = assert_error(response, 400, "")
    assert error["param"].startswith(param), error


def test_prompt_plus_max_tokens_over_context(client):
    body = {**COMPLETION, "prompt": "word " * 400, "max_tokens": 1900}
    error = assert_error(client.post("/v1/completions", json=body), 400, "max_tokens is 1900")
    assert "context is 2048 tokens" in error["message"]


def test_auth_errors(service):
    with service.client(None) as anonymous:
        assert_error(anonymous.get("/v1/models"), 401, "API key")
    with service.client("wrong") as wrong:
        assert_error(wrong.post("/v1/completions", json=COMPLETION), 401, "API key")


@pytest.mark.parametrize("kind, path, message", [
    ("job", "/v1/jobs/{}", "no job"), ("job", "/v1/jobs/{}/events", "no job"), ("job", "/v1/jobs/{}/cancel", "no job"),
    ("batch", "/v1/batches/{}", "batch"), ("file", "/v1/files/{}", "No such File"),
    ("file", "/v1/files/{}/content", "No such File")])
def test_ids_that_name_other_keys_are_unknown(client, kind, path, message):
    """An id with a suffix reaches another kind of Redis key (`job_<id>:stream`, `file-<id>:chunks`): it must answer
    as an unknown id does, for a real id of another key too, never 500."""
    if kind == "job":
        real = submit(client)["id"]
    elif kind == "batch":
        real = "batch_" + "0" * 32
    else:
        real = client.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "batch"}).json()["id"]
    method = "POST" if path.endswith("/cancel") else "GET"
    unknown = client.request(method, path.format(f"{kind}_unknown"))
    assert unknown.status_code == 404
    for suffix in (":stream", ":chunks", ":jobs", ":out", "x"):
        response = client.request(method, path.format(real + suffix))
        error = assert_error(response, 404, message)
        assert {k: v for k, v in error.items() if k != "message"} == {
            k: v for k, v in unknown.json()["error"].items() if k != "message"}


def chunked(total: int, piece: int = 64 * 1024):
    """A body of `total` bytes sent with Transfer-Encoding: chunked (no Content-Length)."""
    yield b'{"model": "demo", "prompt": "'
    for _ in range(total // piece):
        yield b"x" * piece
    yield b'"}'


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/jobs", "/v1/batches"])
def test_chunked_bodies_are_held_to_the_limit(client, path):
    """The limit counts the bytes received: a chunked body has no Content-Length to check (it used to be read
    whole, and a 39 MB prompt accepted)."""
    response = client.post(path, content=chunked(3_000_000), headers={"Content-Type": "application/json"})
    error = assert_error(response, 413, "the limit is 1000000")
    assert error["code"] == "body_too_large"
    assert client.post(path, content=chunked(1000), headers={"Content-Type": "application/json"}).status_code != 413


def test_unknown_job_and_oversized_body(client):
    assert_error(client.get("/v1/jobs/does-not-exist"), 404, "no job")
    assert_error(client.post("/v1/completions", json={**COMPLETION, "prompt": "x" * 2_000_000}), 413, "limit")


@pytest.mark.parametrize("method, path", [("GET", "/nope"), ("GET", "/v1"), ("DELETE", "/v1/completions"),
                                          ("PUT", "/v1/jobs")])
def test_unknown_routes_and_methods_answer_in_openai_shape(client, method, path):
    status = 404 if method == "GET" else 405
    error = assert_error(client.request(method, path), status, f"Invalid URL ({method} {path})")
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/jobs", "/v1/batches"])
def test_invalid_json_says_where(client, path):
    response = client.post(path, content=b'{"model": "demo", ', headers={"Content-Type": "application/json"})
    error = assert_error(response, 400, "not valid JSON")
    assert "at character 18" in error["message"] and error["param"] is None


def test_the_api_runs_several_processes_on_one_port(service):
    """`inferq api --workers 2`: uvicorn's worker processes share the port, each with its own app."""
    import subprocess
    import sys

    from tests.service import free_port

    port = free_port()
    api = subprocess.Popen([sys.executable, "-m", "worker.cli", "api", "--port", str(port), "--workers", "2"],
                           env=service.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5,
                          headers={"Authorization": f"Bearer {API_KEYS[0]}"}) as client:
            while time.monotonic() < deadline:
                assert api.poll() is None, "inferq api --workers 2 exited"
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [MODEL]
            children = f"/proc/{api.pid}/task/{api.pid}/children"
            if os.path.exists(children):  # Linux: the two worker processes
                deadline = time.monotonic() + 30
                while len(open(children).read().split()) < 2 and time.monotonic() < deadline:
                    time.sleep(0.3)
                assert len(open(children).read().split()) >= 2
    finally:
        api.terminate()
        api.wait(30)


def test_health_ready_models(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["workers"] == {MODEL: 1}
    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == [MODEL] and models[0]["max_model_len"] == 2048


# ---- the official openai client ----

@pytest.fixture
def oai(service):
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=API_KEYS[0], max_retries=0)


def test_openai_client_completion_and_stream(oai):
    done = oai.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=16, temperature=0)
    assert done.usage.completion_tokens <= 16 and done.choices[0].finish_reason in ("stop", "length")
    chunks = list(oai.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=16, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens


def test_openai_client_chat_and_stream(oai):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    done = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert done.choices[0].message.role == "assistant"
    stream = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == done.choices[0].message.content


def test_openai_client_retrieves_a_model(oai):
    model = oai.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    with pytest.raises(openai.NotFoundError) as raised:
        oai.models.retrieve("nope")
    assert raised.value.body["code"] == "model_not_found"


def test_openai_client_errors(oai):
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"},
                                                           {"role": "user", "content": "b"}])


def test_metrics(service, client):
    from prometheus_client.parser import text_string_to_metric_families

    submit_and_finish(client)
    time.sleep(1.5)  # one heartbeat
    response = httpx.get(f"{service.url}/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("inferq_jobs_finished_total", (("model", MODEL), ("status", "succeeded")))] >= 1
    assert samples[("inferq_generated_tokens_total", (("model", MODEL),))] >= 12
    assert samples[("inferq_time_to_first_token_seconds_count", (("model", MODEL),))] >= 1
    assert samples[("inferq_inter_token_latency_seconds_count", (("model", MODEL),))] >= 11
    assert ("inferq_jobs", (("model", MODEL), ("state", "queued"))) in samples
    worker_samples = {name: value for (name, labels), value in samples.items() if name.startswith("inferq_worker")}
    assert {"inferq_worker_batch_size", "inferq_worker_kv_cache_usage_ratio", "inferq_worker_max_batch_size"} <= set(
        worker_samples)


def test_a_shared_system_prompt_is_served_from_the_prefix_cache(service, oai):
    """Two chats with one long system prompt: the second reports the cached prompt tokens in its usage (as OpenAI
    does), and /metrics counts the hits."""
    from prometheus_client.parser import text_string_to_metric_families

    system = {"role": "system", "content": " ".join(f"Rule {i}: answer in one short sentence." for i in range(12))}
    first = oai.chat.completions.create(model=MODEL, messages=[system, {"role": "user", "content": "Hi"}],
                                        max_tokens=4, temperature=0)
    second = oai.chat.completions.create(model=MODEL, messages=[system, {"role": "user", "content": "Yo"}],
                                         max_tokens=4, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 64 <= cached < second.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < cached
    time.sleep(1.5)  # one heartbeat
    hits = sum(sample.value for family in text_string_to_metric_families(httpx.get(f"{service.url}/metrics").text)
               for sample in family.samples if sample.name == "inferq_worker_prefix_cache_hits_total")
    assert hits >= cached
