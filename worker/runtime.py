"""One engine per worker, in a process of its own (engine/engine_process.py) started before the Celery worker,
plus the threads that keep it reachable: the output writer (worker/output_writer.py), a heartbeat that announces
what the worker serves and sweeps, and a listener that aborts cancelled jobs in the engine.

The sweep, every heartbeat: recover dead workers' jobs (worker/recovery.py); queue again the jobs leased to this
worker that no task of it runs any more (a task that could not record its job's failure); settle ended jobs whose
aftermath nobody did (api/lifecycle.py); repair the books of the bulk lane and of open interactive jobs; send jobs
that never got a message; pump the bulk lane.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import redis

from api.job_record import JobStatus
from api.lifecycle import pump, run_again_or_end, settle, sweep_ended
from api.registry import spread_tokens
from api.settings import Settings
from api.store import JobStore
from api.tokenization import publish_tokenizer
from api.tool_calls import parser_for_template
from engine.config import EngineConfig
from engine.engine_process import EngineProcess
from engine.loader import load_tokenizer
from engine.sampling_params import SamplingParams
from worker.output_writer import OutputWriter, engine_request_id, split_request_id
from worker.recovery import JobLeases, repair_lane, send_never_sent

log = logging.getLogger(__name__)


class ActiveJobs:
    """Jobs that a task of this process is running (counted: a stale duplicate message of a running job must not
    take it out when it ends)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, job_id: str) -> None:
        with self._lock:
            self._counts[job_id] += 1

    def discard(self, job_id: str) -> None:
        with self._lock:
            self._counts[job_id] -= 1
            if self._counts[job_id] <= 0:
                del self._counts[job_id]

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._counts

    def __len__(self) -> int:
        return len(self._counts)

    def ids(self) -> set[str]:
        with self._lock:
            return set(self._counts)


def capacities(max_num_seqs: int) -> dict[str, int]:
    """How a worker shares its engine between lanes. `threads`: Celery threads, enough for every bulk line it
    may hold plus the interactive reserve, so an interactive job always finds a thread."""
    reserve = max(1, max_num_seqs // 4)
    headroom = max(1, max_num_seqs // 8)  # lines waiting in the engine, ready for the next free slot
    bulk_idle = max_num_seqs + headroom
    return {"bulk_slots": max(1, max_num_seqs - reserve), "bulk_slots_idle": bulk_idle,
            "threads": bulk_idle + reserve}


@dataclass(slots=True)
class WorkerRuntime:
    engine: EngineProcess
    store: JobStore
    settings: Settings
    model_name: str
    info: dict
    writer: OutputWriter
    tokenizer: object  # the model's, for prompts and result bodies (the engine process has its own)
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}")
    active: ActiveJobs = field(default_factory=ActiveJobs)
    leases: JobLeases | None = None
    _orphans: set[str] = field(default_factory=set)  # leased here, no task: seen at the last sweep
    _resend_pending: bool = False  # after_consumer_restart could not reach Redis: the next sweep does it
    _tokenizer_published: bool = False  # for the API's /tokenize (api/tokenization.py): before the first announce
    # The engine's generated tokens as of the last heartbeat that reached Redis, and when: each heartbeat adds the
    # tokens since to the throughput buckets (api/registry.py) the dashboard plots.
    _tokens_announced: int = 0
    _tokens_announced_at: float = field(default_factory=time.time)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.leases = JobLeases(self.store, self.model_name, self.worker_id, self.settings.job_max_attempts)

    @property
    def tool_call_parser(self) -> str:
        """The format this model writes tool calls in (api/tool_calls.py)."""
        return self.info["tool_call_parser"]

    @property
    def capacities(self) -> dict[str, int]:
        return capacities(self.engine.config.max_num_seqs)

    def start_background_threads(self) -> None:
        threading.Thread(target=self._heartbeat, name="inferq-heartbeat", daemon=True).start()
        threading.Thread(target=self._cancel_listener, name="inferq-cancel", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.engine.shutdown()
        self.writer.stop()

    def announcement(self) -> dict:
        engine = self.engine
        caps = self.capacities
        return {**self.info, **engine.stats(), "worker_id": self.worker_id, "bulk_slots": caps["bulk_slots"],
                "bulk_slots_idle": caps["bulk_slots_idle"], "batch_size": engine.last_batch_size,
                "max_batch_size": engine.max_batch_size, "steps": engine.num_steps,
                "engine_busy_seconds": round(engine.busy_seconds, 3), "max_num_seqs": engine.config.max_num_seqs,
                "generated_tokens": engine.num_generated_tokens, "active_jobs": len(self.active)}

    def sweep(self) -> None:
        """One round of reconciliation (see the module's docstring); every step is safe to repeat."""
        self.leases.join()
        if self._resend_pending:
            self.leases.replace_sent_messages()
            self._resend_pending = False
        self.leases.recover(lambda job: settle(self.store, job))
        self.requeue_orphans()
        sweep_ended(self.store)
        repair_lane(self.store, self.model_name)
        self.store.prune_open_interactive(self.model_name)
        send_never_sent(self.store, self.model_name)
        pump(self.store, self.model_name)  # capacity may have grown: this worker is (newly) alive

    def after_consumer_restart(self) -> None:
        """Messages this worker had taken but not started may be gone with its old consumer: every queued job of
        the model gets a fresh one (older ones become stale), as when a worker dies."""
        try:
            self.leases.replace_sent_messages()
        except Exception:  # noqa: BLE001 - Redis may still be away: the heartbeat's sweeps go on meanwhile
            log.warning("could not send the queued jobs' messages again", exc_info=True)
            self._resend_pending = True

    def requeue_orphans(self) -> list[str]:
        """Jobs leased to this worker that no task here runs, two sweeps in a row, go back to the queue (or end,
        if cancelled or out of attempts)."""
        orphans = self.store.leased(self.model_name, self.worker_id) - self.active.ids()
        confirmed, self._orphans = orphans & self._orphans, orphans
        requeued = []
        for job_id in confirmed:
            status = run_again_or_end(self.store, job_id, self.model_name, "the job's task on its worker was lost",
                                      "worker_error", self.settings.job_max_attempts)
            if status is not None:
                log.warning("job %s was leased here with no task running it: %s", job_id, status)
            if status == JobStatus.QUEUED:
                requeued.append(job_id)
        return requeued

    def _heartbeat(self) -> None:
        period = self.settings.worker_heartbeat_seconds
        while not self._stop.is_set():
            try:
                if not self._tokenizer_published:
                    self._publish_tokenizer()
                self._announce(ttl_s=int(period * 3) + 1)
                self.sweep()
            except Exception:  # noqa: BLE001 - Redis may blip; the next beat retries
                log.warning("heartbeat failed", exc_info=True)
            self._stop.wait(period)

    def _announce(self, ttl_s: int) -> None:
        info, now = self.announcement(), time.time()
        generated = info["generated_tokens"]
        tokens = spread_tokens(generated - self._tokens_announced, self._tokens_announced_at, now)
        self.store.registry.announce(self.worker_id, info, ttl_s=ttl_s, tokens=tokens)
        self._tokens_announced, self._tokens_announced_at = generated, now  # not before: a failed beat's carry over

    def _publish_tokenizer(self) -> None:
        try:
            publish_tokenizer(self.store.r, self.store.prefix, self.model_name, self.tokenizer,
                              self.engine.max_model_len)
        except redis.RedisError:
            raise  # the next beat tries again
        except Exception:  # noqa: BLE001 - /tokenize cannot serve this model, the rest of the worker can
            log.exception("could not publish the tokenizer of %s", self.model_name)
        self._tokenizer_published = True

    def stream_deltas(self, job_id: str) -> None:
        """Someone began to read the job's events: its deltas are written from now on (what came before first),
        and the engine sends its outputs after every step."""
        if self.writer.stream(job_id):
            for request_id in self.engine_requests(job_id):
                self.engine.stream(request_id)

    def submit(self, job_id: str, prompts: list[list[int]], params: SamplingParams, priority: int = 0,
               incremental: bool = True, resume: dict[int, list[int]] | None = None,
               checkpoint_every: int | None = None) -> None:
        """The job's prompts into the engine, one request each (engine_request_id): a completion with several
        prompts is answered as one (worker/output_writer.py merges them), and cancels and readers reach every part
        (abort, stream_deltas). ValueError if the engine refuses one; the parts already in are aborted then.
        `resume`: per job choice index (prompt k's choice i is k * n + i), the tokens an earlier attempt saved."""
        n = params.n
        for part, prompt_ids in enumerate(prompts):
            tokens = [(resume or {}).get(part * n + i, []) for i in range(n)]
            try:
                self.engine.submit_to_sink(engine_request_id(job_id, part, len(prompts)), prompt_ids, params,
                                           priority, incremental=incremental,
                                           resume=tokens if any(tokens) else None, checkpoint_every=checkpoint_every)
            except ValueError:
                self.abort(job_id)
                raise

    def engine_requests(self, job_id: str) -> list[str]:
        """The job's requests in the engine (not finished yet)."""
        return [request_id for request_id in self.engine.running_ids() if split_request_id(request_id)[0] == job_id]

    def abort(self, job_id: str) -> None:
        """Stop every engine request of the job (a cancel, a failed attempt)."""
        for request_id in self.engine_requests(job_id):
            self.engine.abort(request_id)

    def _cancel_listener(self) -> None:
        """Revoke cannot stop a task running in a thread: cancels come by pub/sub and abort in the engine. So do
        the requests for a job's deltas (a reader of its events)."""
        keys = self.store.keys
        while not self._stop.is_set():
            try:
                pubsub = self.store.r.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(keys.cancel, keys.deltas)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if not message or message["data"] not in self.active:
                        continue
                    if message["channel"] == keys.cancel:
                        log.info("aborting cancelled job %s", message["data"])
                        self.abort(message["data"])
                    else:
                        self.stream_deltas(message["data"])
            except Exception:  # noqa: BLE001 - reconnect after a Redis error
                if not self._stop.is_set():
                    log.warning("cancel listener error; reconnecting", exc_info=True)
                self._stop.wait(1.0)


_runtime: WorkerRuntime | None = None


def start_runtime(config: EngineConfig, model_name: str, settings: Settings, extra_info: dict,
                  chat_template: str | None = None) -> WorkerRuntime:
    """The worker's runtime: its engine process, writer and background threads. `chat_template` replaces the
    tokenizer's own (for the worker's chat prompts and the tokenizer it publishes for the API's /tokenize)."""
    global _runtime
    # One connection per Celery thread, plus the writer, heartbeat, cancel listener and some slack: threads past
    # the pool wait for a connection rather than fail.
    store = JobStore.from_url(settings.redis_url, max_connections=capacities(config.max_num_seqs)["threads"] + 16,
                              prefix=settings.key_prefix, retention_seconds=settings.result_retention_seconds)
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not extra_info.get("tool_call_parser"):
        extra_info = extra_info | {"tool_call_parser": parser_for_template(getattr(tokenizer, "chat_template", None))}
    writer = OutputWriter(store, tokenizer).start()
    engine = EngineProcess(config, sink=writer, log_level=logging.getLogger().level).start()
    info = {"model": model_name, "max_model_len": engine.max_model_len, "device": engine.info["device"],
            "dtype": engine.info["dtype"], "load_in_low_bit": engine.info["load_in_low_bit"], **extra_info}
    _runtime = WorkerRuntime(engine, store, settings, model_name, info, writer, tokenizer)
    _runtime.start_background_threads()
    return _runtime


def get_runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("the worker runtime is not started (run the worker with `inferq worker`)")
    return _runtime
