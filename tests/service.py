"""Run the real service for tests: a worker process (Celery + engine on the demo model), a webhook worker and an
API process (uvicorn), all against the test session's Redis server, on 127.0.0.1 only."""
from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from api.store import JobStore

API_KEYS = ("key-alpha", "key-beta")
MODEL = "demo"
# Standard Webhooks secret ("whsec_" + base64 of the key bytes); tests verify deliveries with it.
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"inferq-test-webhook-key-32-bytes").decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



@contextmanager
def running(service: Service, worker: bool = True) -> Iterator[Service]:
    """The service's API (and a worker, unless `worker=False`) for the duration of the block; then all stopped."""
    try:
        if worker:
            service.start_worker()
        service.start_api()
        yield service
    finally:
        service.stop()


class Service:
    def __init__(self, redis_url: str, model_dir: Path, log_dir: Path, **env: str) -> None:
        self.prefix = f"t{uuid.uuid4().hex[:8]}"
        self.env = os.environ | {"INFERQ_REDIS_URL": redis_url, "INFERQ_KEY_PREFIX": self.prefix,
                                 "INFERQ_API_KEYS": ",".join(API_KEYS), "INFERQ_WORKER_HEARTBEAT_SECONDS": "1",
                                 "PYTHONUNBUFFERED": "1",
                                 # Webhook receivers in tests listen on loopback; retries must be quick.
                                 "INFERQ_WEBHOOK_ALLOW_HOSTS": "127.0.0.1", "INFERQ_WEBHOOK_SECRET": WEBHOOK_SECRET,
                                 "INFERQ_WEBHOOK_BACKOFF_SECONDS": "0.2"} | env
        self.model_dir = model_dir
        self.log_dir = log_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = JobStore.from_url(redis_url, prefix=self.prefix)
        self.worker: subprocess.Popen | None = None
        self.api: subprocess.Popen | None = None
        self.webhook_worker: subprocess.Popen | None = None

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        return subprocess.Popen([sys.executable, "-m", "worker.cli", "--log-level", "INFO", *args], env=self.env,
                                stdout=log, stderr=subprocess.STDOUT)

    def start_worker(self, max_num_seqs: int = 8, device: str = "cpu", extra_args: tuple[str, ...] = ()) -> None:
        self.worker = self._spawn("worker", "worker", "--model", str(self.model_dir), "--served-model-name", MODEL,
                                  "--device", device, "--max-num-seqs", str(max_num_seqs), *extra_args)
        self._wait(lambda: bool(self.store.registry.workers(MODEL)), "the worker to announce itself", self.worker)

    def start_webhook_worker(self) -> None:
        self.webhook_worker = self._spawn("webhook-worker", "webhook-worker", "--concurrency", "4")
        self._wait(self._webhook_worker_up, "the webhook worker to answer a ping", self.webhook_worker)

    def _webhook_worker_up(self) -> bool:
        from api.settings import Settings
        from api.celery_client import create_app

        app = create_app(Settings(redis_url=self.env["INFERQ_REDIS_URL"]))
        try:
            replies = app.control.ping(timeout=0.5)
        finally:
            app.close()
        return any(name.startswith("webhooks-") for reply in replies for name in reply)

    def start_api(self) -> None:
        self.api = self._spawn("api", "api", "--port", str(self.port))
        self._wait(self._api_up, "the API to answer", self.api)

    def _api_up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def _wait(self, ready, what: str, process: subprocess.Popen, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"process exited while waiting for {what}; see {self.log_dir}")
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out waiting for {what}; see {self.log_dir}")

    @staticmethod
    def _stop(process: subprocess.Popen | None, signal_kill: bool = False) -> None:
        if process is None or process.poll() is not None:
            return
        if signal_kill:
            process.kill()
        else:
            process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill_worker(self) -> None:
        """kill -9: the worker gets no chance to clean up."""
        self._stop(self.worker, signal_kill=True)

    def stop(self) -> None:
        self._stop(self.api)
        self._stop(self.worker)
        self._stop(self.webhook_worker)

    def wait_for_job(self, job_id: str, timeout_s: float = 60.0):
        """The job once it is terminal (polled from the store), or as it is when the time runs out."""
        deadline = time.monotonic() + timeout_s
        job = self.store.get(job_id)
        while job is not None and not job.status.terminal and time.monotonic() < deadline:
            time.sleep(0.05)
            job = self.store.get(job_id)
        return job

    def client(self, key: str | None = API_KEYS[0]) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


def wait_done(client: httpx.Client, job_id: str) -> dict:
    """The job once it ended, long-polling (5 s at a time, 5 minutes at most)."""
    for _ in range(60):
        job = client.get(f"/v1/jobs/{job_id}", params={"wait": 5}).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
    raise AssertionError(f"job {job_id} did not finish")
