"""EngineProcess: the engine's loop in a process of its own, fed by a pipe (as vLLM v1 runs its engine core).

Why a process: on a GPU most of a step is host work (scheduling, input preparation, sampling bookkeeping,
detokenization), and a service's process also runs hundreds of Celery threads, a broker consumer, an output writer
and per-job bookkeeping that contend with it for the GIL. Measured on an H200 (TinyLlama shape, 1,024 requests),
the engine's loop as a thread of the worker kept its batch full but produced about half its offline tokens. In its
own process the loop has a core to itself; the service's process only sends requests and receives outputs.

The parent talks to the child over one duplex pipe. Commands go down (add, abort, stats, stop); the child
answers each command in order and sends every step's outputs in one message. An unfinished output travels
as plain tuples without what the parent already has (the prompt, the text, tokens and logprobs of earlier steps):
the parent restores them, so the outputs it hands to its sink read as LLMEngine.step()'s own.

The child exits when the pipe closes, so a parent killed with SIGKILL does not leave the device held. A child
that dies fails the requests it had (the sink's on_failed) and is started again; calls wait for it meanwhile.
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from engine.config import EngineConfig
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

START_TIMEOUT_S = 900.0  # loading a large checkpoint and capturing its graphs takes minutes on a slow disk


class OutputSink(Protocol):
    """Receives the outputs of every request, on the process's reader thread: keep both calls short."""

    def on_outputs(self, outputs: list[RequestOutput]) -> None: ...

    def on_failed(self, request_ids: list[str], exc: BaseException) -> None: ...


class EngineStartError(RuntimeError):
    """The engine process could not build its engine (a bad checkpoint, no such device, out of memory)."""


@dataclass(slots=True, eq=False)
class _Submitted:
    """A request inside the child, as the parent knows it: what unfinished outputs travel without."""

    prompt_token_ids: list[int]
    text: dict[int, str] = field(default_factory=dict)  # per choice index, the text so far
    token_ids: dict[int, list[int]] = field(default_factory=dict)  # per choice index, the tokens so far
    logprobs: dict[int, list[dict[int, float]]] = field(default_factory=dict)  # per choice index, if it asked
    resumed: int = 0  # tokens it resumed from (LLMEngine.add_request): its outputs carry them, but they are not new


class EngineProcess:
    def __init__(self, config: EngineConfig, sink: OutputSink, log_level: int | str = logging.WARNING) -> None:
        self.config = config
        self.sink = sink
        self.log_level = log_level
        self.info: dict = {}  # what the child reports once its engine is built (max_model_len, device, dtype)
        self._context = multiprocessing.get_context("spawn")  # never fork a process that may hold a device
        self._process = None
        self._conn = None
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # guards _requests and _futures
        self._requests: dict[str, _Submitted] = {}
        self._futures: dict[int, Future] = {}
        self._ids = itertools.count()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        # Counters the worker exports as metrics; written by the reader thread only.
        self.num_steps = 0
        self.busy_seconds = 0.0  # time the child spent inside its steps: against wall time, how loaded it is
        self.num_generated_tokens = 0
        self.last_batch_size = 0
        self.max_batch_size = 0

    # ---- lifecycle ----

    def start(self) -> EngineProcess:
        """Start the child and wait until its engine is built; ValueError if the configuration cannot work (as
        LLMEngine raises it), EngineStartError for any other failure."""
        self._spawn()
        self._reader = threading.Thread(target=self._read, name="inferq-engine-reader", daemon=True)
        self._reader.start()
        return self

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stop.set()
        try:
            with self._send_lock:
                self._conn.send(None)
        except (OSError, ValueError, AttributeError):
            pass
        process = self._process
        if process is not None:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join(5)
        if self._reader is not None:
            self._reader.join(5)

    @property
    def max_model_len(self) -> int:
        return self.info["max_model_len"]

    # ---- calls ----

    def submit_to_sink(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       priority: int = 0, incremental: bool = True, resume: list[list[int]] | None = None,
                       checkpoint_every: int | None = None) -> None:
        """Queue a request (token ids: tokenize in the caller's thread); ValueError if the engine rejects it. With
        `incremental=False` its outputs come only after its first token and at its end (and every
        `checkpoint_every` tokens); `resume`: per choice, tokens an earlier run generated (LLMEngine.add_request)."""
        with self._lock:
            self._requests[request_id] = _Submitted(list(prompt_token_ids), resumed=sum(map(len, resume or ())))
        try:
            self._call("add", request_id, prompt_token_ids, params, priority, incremental, resume, checkpoint_every)
        except BaseException:
            with self._lock:
                self._requests.pop(request_id, None)
            raise

    def stream(self, request_id: str) -> bool:
        """Outputs after every step from now on for a request submitted with incremental=False (LLMEngine.
        stream_request). False if unknown or already done."""
        return self._call("stream", request_id)

    def abort(self, request_id: str) -> bool:
        """Stop a request; its last output then has finish_reason "abort". False if unknown or already done."""
        return self._call("abort", request_id)

    def running_ids(self) -> set[str]:
        """Ids of the requests submitted and not yet finished."""
        with self._lock:
            return set(self._requests)

    def stats(self) -> dict[str, int]:
        return self._call("stats")

    def _call(self, name: str, *args):
        if not self._ready.wait(START_TIMEOUT_S) or self._stop.is_set():
            raise RuntimeError("the engine process is not running")
        future: Future = Future()
        call_id = next(self._ids)
        with self._lock:
            self._futures[call_id] = future
        try:
            with self._send_lock:
                self._conn.send((name, call_id, *args))
        except (OSError, ValueError) as exc:  # the child died under us: the reader fails the rest
            with self._lock:
                self._futures.pop(call_id, None)
            raise RuntimeError(f"the engine process is not running: {exc}") from exc
        return future.result()

    # ---- the parent's side of the pipe ----

    def _spawn(self) -> None:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(target=_engine_main, args=(self.config, child_conn, self.log_level),
                                        name="inferq-engine", daemon=True)
        process.start()
        child_conn.close()  # ours is closed, so the child's death reads as EOF here
        try:
            # Wait for the ready message; a child that dies while loading reads as EOF.
            while not parent_conn.poll(1.0):
                if not process.is_alive():
                    raise EOFError
            kind, payload = parent_conn.recv()
        except (EOFError, OSError) as exc:
            process.join(5)
            raise EngineStartError(f"the engine process exited while starting (exit code {process.exitcode})") \
                from exc
        if kind != "ready":
            process.join(5)
            error, message = payload
            # A ValueError is the caller's (a bad checkpoint, a format the device lacks): it stays one.
            raise ValueError(message) if error == "ValueError" else EngineStartError(f"{error}: {message}")
        self.info = payload
        self._process, self._conn = process, parent_conn
        self._ready.set()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                if self._stop.is_set():
                    return
                self._restart()
                continue
            if message[0] == "step":
                self._on_step(*message[1:])
            elif message[0] == "reply":
                self._on_reply(*message[1:])
            elif message[0] == "failed":
                self._fail(message[1], RuntimeError(f"engine step failed: {message[2]}"))

    def _on_step(self, wired: list, batch_size: int, seconds: float) -> None:
        self.num_steps += 1
        self.busy_seconds += seconds
        self.last_batch_size = batch_size
        self.max_batch_size = max(self.max_batch_size, batch_size)
        if not wired:
            return
        outputs = []
        with self._lock:
            for item in wired:
                if isinstance(item, RequestOutput):  # finished: it carries everything
                    self._count(self._requests.pop(item.request_id, None),
                                sum(len(c.delta_token_ids) for c in item.outputs))
                    outputs.append(item)
                    continue
                request_id, num_preemptions, choices = item
                submitted = self._requests.get(request_id)
                if submitted is None:
                    continue
                output = RequestOutput(request_id, submitted.prompt_token_ids, [], False, num_preemptions)
                for index, delta_text, delta_token_ids, finish_reason, stop_reason, delta_logprobs in choices:
                    self._count(submitted, len(delta_token_ids))
                    tokens = submitted.token_ids.setdefault(index, [])
                    tokens += delta_token_ids
                    text = submitted.text[index] = submitted.text.get(index, "") + delta_text
                    logprobs = None
                    if delta_logprobs is not None:
                        logprobs = submitted.logprobs.setdefault(index, [])
                        logprobs += delta_logprobs
                    output.outputs.append(CompletionOutput(index, text, tokens, delta_text, delta_token_ids,
                                                           finish_reason, stop_reason, logprobs))
                outputs.append(output)
        try:
            self.sink.on_outputs(outputs)
        except Exception:  # noqa: BLE001 - the sink's trouble must not stop the reader
            log.exception("the output sink failed")

    def _count(self, submitted: _Submitted | None, num_tokens: int) -> None:
        """Add a request's new tokens to num_generated_tokens, less the resumed ones its outputs repeat."""
        repeated = min(submitted.resumed, num_tokens) if submitted is not None else 0
        if submitted is not None:
            submitted.resumed -= repeated
        self.num_generated_tokens += num_tokens - repeated

    def _on_reply(self, call_id: int, ok: bool, value) -> None:
        with self._lock:
            future = self._futures.pop(call_id, None)
        if future is None:
            return
        if ok:
            future.set_result(value)
        else:
            kind, message = value
            future.set_exception(ValueError(message) if kind == "ValueError" else RuntimeError(message))

    def _fail(self, request_ids: list[str], exc: BaseException) -> None:
        with self._lock:
            failed = [rid for rid in request_ids if self._requests.pop(rid, None) is not None]
        if failed:
            self.sink.on_failed(failed, exc)

    def _restart(self) -> None:
        """The child died: fail what it had, then start a new one (retrying while that fails)."""
        self._ready.clear()
        code = self._process.exitcode if self._process is not None else None
        error = RuntimeError(f"the engine process died (exit code {code})")
        log.error("%s; failing its requests and starting it again", error)
        with self._lock:
            futures, self._futures = list(self._futures.values()), {}
            lost = list(self._requests)
        for future in futures:
            future.set_exception(error)
        self._fail(lost, error)
        delay = 1.0
        while not self._stop.is_set():
            try:
                self._spawn()
                return
            except Exception:  # noqa: BLE001 - e.g. the device's memory is still held: try again
                log.exception("the engine process could not start again; retrying in %.0f s", delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 60.0)


# ---- the child ----

def _engine_main(config: EngineConfig, conn, log_level) -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from engine.engine import LLMEngine  # here: the parent never imports torch's device code for the engine

    try:
        engine = LLMEngine(config)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        log.exception("the engine could not start")
        conn.send(("failed_to_start", ("ValueError" if isinstance(exc, ValueError) else type(exc).__name__,
                                       str(exc))))
        return
    conn.send(("ready", {"max_model_len": engine.max_model_len, "device": str(engine.device),
                         "dtype": str(engine.dtype).removeprefix("torch."), "load_in_low_bit": engine.load_in_low_bit}))
    try:
        _EngineLoop(engine, conn).run()
    finally:
        engine.shutdown()  # its tensor-parallel followers, if any, end with it


class _EngineLoop:
    def __init__(self, engine, conn) -> None:
        self.engine = engine
        self.conn = conn
        self.live: set[str] = set()  # requests added and not finished: what a failed step fails

    def run(self) -> None:
        from engine.tensor_parallel import TensorParallelError  # here: the parent never imports torch

        engine, conn = self.engine, self.conn
        while True:
            # Block for commands only when idle; otherwise take what is queued and step.
            if not engine.has_unfinished_requests():
                conn.poll(None)
            try:
                while conn.poll():
                    message = conn.recv()
                    if message is None:
                        return
                    self._command(*message)
            except (EOFError, OSError):
                return  # the parent is gone
            if not engine.has_unfinished_requests():
                continue
            start = time.perf_counter()
            try:
                outputs = engine.step()
            except TensorParallelError:
                # A rank is gone: this engine cannot step again. Ending the process fails its requests in the
                # parent, which starts a new engine (with new followers).
                log.exception("engine step failed: a tensor-parallel rank is gone; ending the engine process")
                raise
            except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the process
                log.exception("engine step failed; failing every request in it")
                self._fail_all(exc)
                continue
            for output in outputs:
                if output.finished:
                    self.live.discard(output.request_id)
            conn.send(("step", [_wire(o) for o in outputs], engine.last_step_batch_size,
                       time.perf_counter() - start))

    def _command(self, name: str, call_id: int, *args) -> None:
        try:
            if name == "add":
                request_id, prompt, params, priority, incremental, resume, checkpoint_every = args
                self.engine.add_request(request_id, prompt, params, priority, stream=incremental, resume=resume,
                                        checkpoint_every=checkpoint_every)
                self.live.add(request_id)
                value = None
            elif name == "abort":
                value = self.engine.abort_request(*args)
            elif name == "stream":
                value = self.engine.stream_request(*args)
            elif name == "stats":
                value = self.engine.stats()
            else:
                raise RuntimeError(f"unknown engine command {name!r}")
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            kind = "ValueError" if isinstance(exc, ValueError) else "error"
            self.conn.send(("reply", call_id, False, (kind, str(exc))))
        else:
            self.conn.send(("reply", call_id, True, value))

    def _fail_all(self, exc: Exception) -> None:
        failed, self.live = list(self.live), set()
        for request_id in failed:
            self.engine.abort_request(request_id)
        try:
            self.engine.step()  # drain the abort outputs
        except Exception:  # noqa: BLE001 - nothing is left to fail
            log.exception("engine step after a failure failed too")
        self.conn.send(("failed", failed, f"{type(exc).__name__}: {exc}"))


def _wire(output: RequestOutput):
    """What travels for one output. A finished output as it is (it carries its own copies of everything). An
    unfinished one as plain tuples of what the parent lacks, (request_id, num_preemptions, [(index, delta_text,
    delta_token_ids, finish_reason, stop_reason, delta_logprobs)]): the parent has the prompt and the earlier text,
    tokens and logprobs. `delta_logprobs` is the logprobs entries of the delta's tokens, or None for a request that
    asked for none (most: nothing more to pickle for them). Tuples because a streaming step sends one per running
    request, and pickling dataclasses costs several times more (about 1 ms a step for 256 streams, on the engine's
    core)."""
    if output.finished:
        return output
    return (output.request_id, output.num_preemptions,
            [(c.index, c.delta_text, c.delta_token_ids, c.finish_reason, c.stop_reason,
              None if c.logprobs is None else c.logprobs[len(c.token_ids) - len(c.delta_token_ids):])
             for c in output.outputs])
