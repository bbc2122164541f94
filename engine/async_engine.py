"""AsyncEngine: LLMEngine.step() in a background thread, shared by many callers in other threads.

Callers submit requests and read their outputs from a RequestStream as the engine produces them, or hand them to
an OutputSink that receives every step's outputs in one call (a service writes them out in one batch per step
instead of waking one thread per request per token). The engine is not thread-safe, so every call into it (add,
abort, step) happens on the loop thread: callers queue a command and wait for it to be done, which takes at most
one engine step.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Protocol

from engine.engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class RequestStream:
    """The outputs of one request, in order; iteration ends after the finished one."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: queue.Queue = queue.Queue()
        self.final: RequestOutput | None = None

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put(item)

    def __iter__(self) -> Iterator[RequestOutput]:
        while self.final is None:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                self.final = item
            yield item

    def result(self) -> RequestOutput:
        """Block until the request finishes; the last output."""
        for _ in self:
            pass
        assert self.final is not None
        return self.final


class OutputSink(Protocol):
    """Receives, on the loop thread, the outputs of the requests submitted to it: keep both calls short."""

    def on_outputs(self, outputs: list[RequestOutput]) -> None: ...

    def on_failed(self, request_ids: list[str], exc: BaseException) -> None: ...


class AsyncEngine:
    def __init__(self, engine: LLMEngine, sink: OutputSink | None = None) -> None:
        self.engine = engine
        self.sink = sink
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._sunk: set[str] = set()  # requests whose outputs go to the sink
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="inferq-engine", daemon=True)
        # Counters the worker exports as metrics; written by the loop thread only.
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.last_batch_size = 0
        self.max_batch_size = 0

    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(None)
        self._thread.join(timeout=30)

    def submit(self, request_id: str, prompt: str | list[int], params: SamplingParams,
               priority: int = 0, incremental: bool = True) -> RequestStream:
        """Queue a request; ValueError (raised here) if the engine rejects it. With `incremental=False` the stream
        carries only the first and the finished output (for callers that do not stream tokens): its reader wakes
        twice, not once per token, and the engine builds no outputs in between."""
        stream = RequestStream(request_id)

        def add() -> None:
            self.engine.add_request(request_id, prompt, params, priority, stream=incremental)
            self._streams[request_id] = stream

        self._call(add)
        return stream

    def submit_to_sink(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       priority: int = 0, incremental: bool = True) -> None:
        """Queue a request whose outputs go to the engine's sink (one call per step for all such requests)."""
        if self.sink is None:
            raise RuntimeError("this AsyncEngine has no output sink")

        def add() -> None:
            self.engine.add_request(request_id, prompt, params, priority, stream=incremental)
            self._sunk.add(request_id)

        self._call(add)

    def running_ids(self) -> set[str]:
        """Ids of the requests in the engine now (running or waiting)."""
        return self._call(lambda: set(self._streams) | set(self._sunk))

    def abort(self, request_id: str) -> bool:
        """Stop a request; its stream then ends with finish_reason "abort". False if unknown or already done."""
        return self._call(lambda: self.engine.abort_request(request_id))

    def stats(self) -> dict[str, int]:
        return self._call(self.engine.stats)

    def _call(self, fn: Callable):
        if not self._thread.is_alive():
            raise RuntimeError("the engine loop is not running")
        future: Future = Future()
        self._commands.put((fn, future))
        return future.result()

    def _loop(self) -> None:
        while not self._stop.is_set():
            # Block for work only when the engine is idle; otherwise take what is queued and step.
            self._run_commands(block=not self.engine.has_unfinished_requests())
            if self._stop.is_set() or not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - a failed step must fail its requests, not the thread
                log.exception("engine step failed; failing every request in it")
                self._fail_all(exc)
                continue
            self._record(outputs)
            self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        to_sink = []
        for output in outputs:
            if output.request_id in self._sunk:
                to_sink.append(output)
                if output.finished:
                    self._sunk.discard(output.request_id)
                continue
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            stream._put(output)
            if output.finished:
                del self._streams[output.request_id]
        if to_sink:
            try:
                self.sink.on_outputs(to_sink)
            except Exception:  # noqa: BLE001 - the sink's trouble must not stop the engine
                log.exception("the output sink failed")

    def _run_commands(self, block: bool) -> None:
        try:
            item = self._commands.get(block=block)
            while True:
                if item is None:
                    return
                fn, future = item
                try:
                    future.set_result(fn())
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)
                item = self._commands.get_nowait()
        except queue.Empty:
            return

    def _record(self, outputs: list[RequestOutput]) -> None:
        running = self.engine.last_step_batch_size
        self.num_steps += 1
        self.last_batch_size = running
        self.max_batch_size = max(self.max_batch_size, running)
        self.num_generated_tokens += sum(len(c.delta_token_ids) for o in outputs for c in o.outputs)

    def _fail_all(self, exc: Exception) -> None:
        error = RuntimeError(f"engine step failed: {exc}")
        for request_id, stream in list(self._streams.items()):
            self.engine.abort_request(request_id)
            stream._put(error)
        self._streams.clear()
        sunk, self._sunk = list(self._sunk), set()
        for request_id in sunk:
            self.engine.abort_request(request_id)
        if sunk:
            self.sink.on_failed(sunk, error)
        try:
            self.engine.step()  # drain the abort outputs
        except Exception:  # noqa: BLE001 - nothing is left to fail
            log.exception("engine step after a failure failed too")
