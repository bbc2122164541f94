"""One engine per worker process, built before the Celery worker starts, plus the threads that keep it reachable:
a heartbeat announcing what it serves, and a listener that aborts cancelled jobs in the engine."""
from __future__ import annotations

import logging
import socket
import threading
import uuid
from dataclasses import dataclass, field

from api.settings import Settings
from api.store import JobStore
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import LLMEngine
from worker.batch_tasks import on_job_finished, pump, repair_lane
from worker.recovery import JobLeases, send_never_sent

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerRuntime:
    engine: AsyncEngine
    store: JobStore
    settings: Settings
    model_name: str
    info: dict
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}")
    # Jobs running in this worker's engine (the cancel listener aborts only those).
    active: set[str] = field(default_factory=set)
    leases: JobLeases | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.leases = JobLeases(self.store, self.model_name, self.worker_id)

    @property
    def bulk_slots(self) -> int:
        """Sequences batch lines may take; the rest (a quarter) stay free for interactive requests."""
        max_num_seqs = self.engine.engine.config.max_num_seqs
        return max(1, max_num_seqs - max(1, max_num_seqs // 4))

    def end(self, job_id: str) -> None:
        """The job ran here and its outcome is recorded: no longer cancellable here, nor leased."""
        self.active.discard(job_id)
        self.leases.release(job_id)

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    def start_background_threads(self) -> None:
        threading.Thread(target=self._heartbeat, name="inferq-heartbeat", daemon=True).start()
        threading.Thread(target=self._cancel_listener, name="inferq-cancel", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.engine.shutdown()

    def announcement(self) -> dict:
        engine = self.engine
        return {**self.info, **engine.stats(), "worker_id": self.worker_id, "bulk_slots": self.bulk_slots,
                "batch_size": engine.last_batch_size,
                "max_batch_size": engine.max_batch_size, "steps": engine.num_steps,
                "generated_tokens": engine.num_generated_tokens, "active_jobs": len(self.active)}

    def _heartbeat(self) -> None:
        period = self.settings.worker_heartbeat_seconds
        while not self._stop.is_set():
            try:
                self.store.announce_worker(self.worker_id, self.announcement(), ttl_s=int(period * 3) + 1)
                self.leases.join()
                self.leases.recover(lambda job: on_job_finished(self.store, job))
                repair_lane(self.store, self.model_name)
                send_never_sent(self.store, self.model_name)
                pump(self.store, self.model_name)  # capacity may have grown: this worker is (newly) alive
            except Exception:  # noqa: BLE001 - Redis may blip; the next beat retries
                log.warning("heartbeat failed", exc_info=True)
            self._stop.wait(period)

    def _cancel_listener(self) -> None:
        """Revoke cannot stop a task running in a thread: cancels come by pub/sub and abort in the engine."""
        while not self._stop.is_set():
            try:
                pubsub = self.store.r.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.store.cancel_channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message["data"] in self.active:
                        log.info("aborting cancelled job %s", message["data"])
                        self.engine.abort(message["data"])
            except Exception:  # noqa: BLE001 - reconnect after a Redis error
                if not self._stop.is_set():
                    log.warning("cancel listener error; reconnecting", exc_info=True)
                self._stop.wait(1.0)


_runtime: WorkerRuntime | None = None


def start_runtime(config: EngineConfig, model_name: str, settings: Settings, extra_info: dict) -> WorkerRuntime:
    global _runtime
    llm_engine = LLMEngine(config)
    info = {"model": model_name, "max_model_len": llm_engine.max_model_len, "device": str(llm_engine.device),
            "dtype": str(llm_engine.dtype).removeprefix("torch."), "load_in_low_bit": config.load_in_low_bit,
            **extra_info}
    _runtime = WorkerRuntime(AsyncEngine(llm_engine).start(), JobStore.from_url(
        settings.redis_url, prefix=settings.key_prefix, retention_seconds=settings.result_retention_seconds),
        settings, model_name, info)
    _runtime.start_background_threads()
    return _runtime


def get_runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("the worker runtime is not started (run the worker with `inferq worker`)")
    return _runtime
