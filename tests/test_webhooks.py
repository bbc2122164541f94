"""Job webhooks: signing (Standard Webhooks), the target check, and delivery end to end through the real worker,
webhook worker and API processes to a receiver listening on 127.0.0.1."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from api.store import JobStore
from api.webhook_targets import WebhookTargetError, check_target
from tests.service import MODEL, WEBHOOK_SECRET, Service, free_port
from api.celery_client import WEBHOOK_QUEUE, WEBHOOK_TASK
from api.webhook_events import enqueue_event
from api.settings import Settings
from worker.webhooks import MAX_BACKOFF_S, backoff_seconds, headers_for, post_once, secret_key, sign

MAX_ATTEMPTS = 5  # more than Celery's default of 3 retries: the attempt count must be ours
JOB = {"model": MODEL, "prompt": "def main():", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


# ---- signing ----------------------------------------------------------------------------------------------------

def test_signature_matches_the_standard_webhooks_vector():
    # The example of the Standard Webhooks specification (and of its reference libraries' tests).
    key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    signature = sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, '{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_headers_verify_with_the_library():
    body = json.dumps({"type": "job.completed", "data": {"id": "job_1"}})
    headers = headers_for("job_1:completed", body, WEBHOOK_SECRET)
    assert headers["webhook-id"] == "job_1:completed" and headers["webhook-signature"].startswith("v1,")
    assert Webhook(WEBHOOK_SECRET).verify(body, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 43).verify(body, headers)  # another secret
    with pytest.raises(WebhookVerificationError):
        Webhook(WEBHOOK_SECRET).verify(body.replace("job_1", "job_2"), headers)  # another body
    assert "webhook-signature" not in headers_for("job_1:completed", body, "")  # no secret: unsigned


def test_secret_formats():
    assert secret_key("whsec_" + "AAEC") == secret_key("AAEC") == b"\x00\x01\x02"
    with pytest.raises(ValueError):
        secret_key("whsec_")
    with pytest.raises(ValueError):
        secret_key("whsec_A")  # not base64


def test_backoff_doubles_with_jitter_and_a_cap():
    rng = random.Random(0)
    for attempt in range(1, 6):
        nominal = 0.2 * 2 ** (attempt - 1)
        assert 0.5 * nominal <= backoff_seconds(attempt, 0.2, rng) < nominal
    assert backoff_seconds(40, 1.0, rng) < MAX_BACKOFF_S


# ---- the target check ---------------------------------------------------------------------------------------------

def fake_dns(table: dict[str, list[str]]):
    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise WebhookTargetError(f"webhook host {host!r} does not resolve")
        return table[host]
    return resolve


DNS = fake_dns({"hooks.example.com": ["93.184.216.34"], "localhost": ["127.0.0.1", "::1"],
                "internal.corp": ["10.1.2.3"], "split.example.com": ["93.184.216.34", "192.168.1.5"]})


@pytest.mark.parametrize("url, allow", [
    ("https://hooks.example.com/inferq", []),
    ("http://93.184.216.34:8080/x", []),
    ("http://127.0.0.1:9000/hook", ["127.0.0.1"]),
    ("http://internal.corp/hook", ["internal.corp"]),  # allow-listed by name
    ("http://internal.corp/hook", ["10.0.0.0/8"]),  # allow-listed by network
    ("http://[::1]:9000/hook", ["::1"]),
    ("http://[64:ff9b::5db8:d822]/hook", []),  # NAT64 of a public IPv4 address
    ("http://[2002:5db8:d822::1]/hook", []),  # 6to4 of a public IPv4 address
])
def test_allowed_targets(url, allow):
    check_target(url, allow, resolver=DNS)


@pytest.mark.parametrize("url, allow, why", [
    ("http://10.0.0.1/", [], "non-public"),
    ("http://192.168.1.1/", ["127.0.0.1"], "non-public"),
    ("http://127.0.0.1:9000/", [], "non-public"),
    ("http://localhost:9000/", [], "non-public"),
    ("http://localhost:9000/", ["127.0.0.1"], "non-public"),  # ::1 is not allow-listed
    ("http://169.254.169.254/latest/meta-data", [], "non-public"),  # cloud metadata
    ("http://[::ffff:10.0.0.1]/", [], "non-public"),
    ("http://[fd00::1]/", [], "non-public"),
    ("http://0.0.0.0/", [], "non-public"),
    ("http://split.example.com/", [], "non-public"),  # one private address is enough
    ("http://internal.corp/", [], "non-public"),
    ("ftp://hooks.example.com/", [], "http or https"),
    ("http:///path", [], "no host"),
    ("http://hooks.example.com:99999/", [], "invalid"),
    ("http://nowhere.invalid/", [], "does not resolve"),
    # IPv6 forms that carry a private IPv4 address, and private IPv6 ranges is_global misses:
    ("http://[::127.0.0.1]/", [], "non-public"),  # IPv4-compatible
    ("http://[64:ff9b::a9fe:a9fe]/", [], "non-public"),  # NAT64 of 169.254.169.254 (cloud metadata)
    ("http://[64:ff9b:1::a00:1]/", [], "non-public"),  # NAT64 local use
    ("http://[2002:c0a8:101::1]/", [], "non-public"),  # 6to4 wrapping 192.168.1.1
    ("http://[2002:7f00:1::1]/", [], "non-public"),  # 6to4 wrapping 127.0.0.1
    ("http://[fec0::1]/", [], "non-public"),  # site-local
])
def test_refused_targets(url, allow, why):
    with pytest.raises(WebhookTargetError, match=why):
        check_target(url, allow, resolver=DNS)


def test_check_returns_the_addresses_it_checked():
    assert check_target("https://hooks.example.com/x", [], resolver=DNS) == ["93.184.216.34"]
    assert check_target("http://93.184.216.34/x", [], resolver=DNS) == []  # a literal: nothing to resolve
    assert check_target("http://internal.corp/x", ["internal.corp"], resolver=DNS) == []  # trusted by name


def test_delivery_connects_to_the_checked_address_not_a_second_lookup():
    """DNS rebinding: the name is resolved once, checked, and the connection goes to that address (the name stays
    in the Host header). The receiver here is reachable only because the checked address is used: the name does
    not resolve anywhere else."""
    seen = {}

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            seen["host"] = self.headers["Host"]
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        settings = Settings(webhook_allow_hosts=["127.0.0.1"], webhook_secret="")
        only_once = fake_dns({"hooks.rebind.invalid": ["127.0.0.1"]})
        status = post_once(f"http://hooks.rebind.invalid:{port}/hook", "msg_1", "{}", settings, resolver=only_once)
        assert status == 204 and seen["host"] == f"hooks.rebind.invalid:{port}"
    finally:
        server.shutdown()


def test_real_resolver_refuses_localhost():
    with pytest.raises(WebhookTargetError, match="non-public"):
        check_target("http://localhost:8000/hook", [])


def test_webhook_modules_do_not_import_torch():
    code = ("import sys, api.webhook_targets, worker.webhooks, api.main; "
            "assert 'torch' not in sys.modules and 'engine' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---- store and enqueue ---------------------------------------------------------------------------------------------

@pytest.fixture
def store(redis_url):
    s = JobStore.from_url(redis_url, prefix=f"t{uuid.uuid4().hex[:12]}", retention_seconds=600)
    yield s
    s.r.close()


class FakeCelery:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list, str]] = []

    def send_task(self, name: str, args: list, queue: str) -> None:
        self.sent.append((name, args, queue))


def test_enqueue_only_the_wanted_events(store):
    celery = FakeCelery()
    plain, _ = store.create(owner="o", model=MODEL, endpoint="completions", request=JOB)
    default, _ = store.create(owner="o", model=MODEL, endpoint="completions", request=JOB,
                              webhook={"url": "http://127.0.0.1:1/h", "events": ["completed"]}, metadata={"k": "v"})
    assert not enqueue_event(store, plain, "completed", celery)
    assert not enqueue_event(store, default, "start", celery)
    assert enqueue_event(store, default, "completed", celery)
    [(name, args, queue)] = celery.sent
    assert (name, queue) == (WEBHOOK_TASK, WEBHOOK_QUEUE)
    job_id, event, webhook_id, url, body = args
    assert (job_id, event, webhook_id, url) == (default.id, "completed", f"{default.id}:completed",
                                                "http://127.0.0.1:1/h")
    payload = json.loads(body)
    assert payload["type"] == "job.completed" and payload["data"]["metadata"] == {"k": "v"}
    assert "request" not in payload["data"] and "webhook" not in payload["data"]


def test_record_webhook(store):
    job, _ = store.create(owner="o", model=MODEL, endpoint="completions", request=JOB)
    assert store.get(job.id).public()["webhook_deliveries"] is None
    assert store.record_webhook(job.id, "start", "delivered", 1)
    assert store.record_webhook(job.id, "completed", "failed", 5, "HTTP 500")
    deliveries = store.get(job.id).webhook_deliveries
    assert deliveries["start"]["status"] == "delivered" and deliveries["start"]["last_error"] is None
    assert deliveries["completed"] | {"at": 0} == {"status": "failed", "attempts": 5, "last_error": "HTTP 500",
                                                   "at": 0}
    assert not store.record_webhook("job_gone", "completed", "failed", 1)
    assert not store.r.exists(store.keys.job("job_gone"))  # not resurrected as a partial record


# ---- end to end ---------------------------------------------------------------------------------------------------

@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: str
    at: float


class Receiver:
    """An HTTP receiver on 127.0.0.1: records every POST and answers each path with planned statuses."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.plans: dict[str, list[int]] = {}
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                with receiver.changed:
                    plan = receiver.plans.get(self.path, [])
                    status = plan.pop(0) if len(plan) > 1 else (plan[0] if plan else 200)  # the last one repeats
                    receiver.deliveries.append(Delivery(self.path, dict(self.headers), body, time.monotonic()))
                    receiver.changed.notify_all()
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, *statuses: int) -> str:
        """A fresh URL answered with `statuses` in order (the last repeats; default 200)."""
        path = f"/{path}/{uuid.uuid4().hex[:8]}"
        self.plans[path] = list(statuses)
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def wait_for(self, url: str, count: int, timeout: float = 30) -> list[Delivery]:
        path = urlsplit(url).path
        with self.changed:
            self.changed.wait_for(lambda: len([d for d in self.deliveries if d.path == path]) >= count, timeout)
            return [d for d in self.deliveries if d.path == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def service(redis_url, demo_model_dir, tmp_path_factory):
    svc = Service(redis_url, demo_model_dir, tmp_path_factory.mktemp("webhook-logs"),
                  INFERQ_WEBHOOK_MAX_ATTEMPTS=str(MAX_ATTEMPTS))
    try:
        svc.start_webhook_worker()
        svc.start_worker()
        svc.start_api()
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def client(service):
    with service.client() as c:
        yield c


def submit(client: httpx.Client, **options) -> dict:
    response = client.post("/v1/jobs", json={**JOB, **options})
    assert response.status_code == 202, response.text
    return response.json()


def wait_for_delivery_record(client: httpx.Client, job_id: str, event: str, timeout: float = 30) -> dict:
    """The job once its webhook outcome for `event` is recorded (that happens just after the receiver answered)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", params={"wait": 5}).json()
        if event in (job.get("webhook_deliveries") or {}):
            return job
        time.sleep(0.1)
    raise AssertionError(f"no {event} delivery recorded for job {job_id}: {job}")


def verified(delivery: Delivery) -> dict:
    return Webhook(WEBHOOK_SECRET).verify(delivery.body, delivery.headers)


def test_start_and_completed_are_delivered_signed(client, receiver):
    url = receiver.url("both")
    created = submit(client, webhook=url, webhook_events=["start", "completed"], metadata={"run": "7"})
    job = wait_for_delivery_record(client, created["id"], "completed")
    assert job["status"] == "succeeded"
    deliveries = receiver.wait_for(url, 2)
    by_type = {verified(d)["type"]: (d, verified(d)) for d in deliveries}
    assert sorted(by_type) == ["job.completed", "job.start"] and len(deliveries) == 2
    start_delivery, start = by_type["job.start"]
    done_delivery, done = by_type["job.completed"]
    assert start_delivery.headers["webhook-id"] == f"{job['id']}:start"
    assert done_delivery.headers["webhook-id"] == f"{job['id']}:completed"
    assert start["data"]["status"] == "running" and start["data"]["result"] is None
    assert done["data"]["id"] == job["id"] and done["data"]["status"] == "succeeded"
    assert done["data"]["result"] == job["result"] and done["data"]["usage"] == job["usage"]
    assert done["data"]["result"]["choices"][0]["text"] and done["data"]["metadata"] == {"run": "7"}
    assert wait_for_delivery_record(client, job["id"], "start")["webhook_deliveries"]["start"]["status"] == "delivered"
    assert job["webhook_deliveries"]["completed"]["status"] == "delivered"


def test_retries_carry_the_same_webhook_id(client, receiver):
    url = receiver.url("flaky", 500, 500, 200)
    created = submit(client, webhook=url)  # default events: completed only
    job = wait_for_delivery_record(client, created["id"], "completed")
    outcome = job["webhook_deliveries"]["completed"]
    assert outcome["status"] == "delivered" and outcome["attempts"] == 3
    tries = receiver.wait_for(url, 3)
    assert len(tries) == 3
    assert {t.headers["webhook-id"] for t in tries} == {f"{job['id']}:completed"}
    assert len({t.body for t in tries}) == 1  # the same message; only the timestamp and signature may differ
    assert all(verified(t)["type"] == "job.completed" for t in tries)
    # Backoff: at least half the nominal 0.2 s, then 0.4 s (the jitter never goes lower).
    assert tries[1].at - tries[0].at >= 0.1 and tries[2].at - tries[1].at >= 0.2


def test_failed_delivery_is_recorded(client, receiver):
    failing = receiver.url("down", 503)
    closed = f"http://127.0.0.1:{free_port()}/nobody-listens"  # network error on every try
    jobs = [submit(client, webhook=failing)["id"], submit(client, webhook=closed)["id"]]
    outcomes = [wait_for_delivery_record(client, job_id, "completed")["webhook_deliveries"]["completed"]
                for job_id in jobs]
    assert [o["status"] for o in outcomes] == ["failed", "failed"]
    assert [o["attempts"] for o in outcomes] == [MAX_ATTEMPTS, MAX_ATTEMPTS]
    assert outcomes[0]["last_error"] == "HTTP 503" and "Connect" in outcomes[1]["last_error"]
    assert len(receiver.wait_for(failing, MAX_ATTEMPTS)) == MAX_ATTEMPTS


@pytest.mark.parametrize("url", ["http://10.0.0.1/hook", "http://192.168.0.10:8080/", "http://169.254.169.254/",
                                 "http://[::1]:8080/", "ftp://127.0.0.1/"])
def test_private_targets_are_refused_at_submission(client, url):
    response = client.post("/v1/jobs", json={**JOB, "webhook": url})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == "webhook" and error["type"] == "invalid_request_error"


def test_batch_webhook_is_signed_retried_and_recorded(client, receiver):
    url = receiver.url("batch", 500, 200)
    lines = "\n".join(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions",
                                  "body": {**JOB, "max_tokens": 2}}) for i in range(3))
    upload = client.post("/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", lines.encode())})
    created = client.post("/v1/batches", json={"input_file_id": upload.json()["id"], "endpoint": "/v1/completions",
                                               "completion_window": "24h", "webhook": url}).json()
    tries = receiver.wait_for(url, 2)
    assert {t.headers["webhook-id"] for t in tries} == {f"{created['id']}:completed"}
    event = verified(tries[-1])
    assert event["type"] == "batch.completed" and event["data"]["id"] == created["id"]
    assert event["data"]["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    deadline = time.monotonic() + 30
    while not (batch := client.get(f"/v1/batches/{created['id']}").json())["webhook_deliveries"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert batch["webhook_deliveries"]["completed"]["status"] == "delivered"
    assert batch["webhook_deliveries"]["completed"]["attempts"] == 2
