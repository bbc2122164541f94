"""EngineProcess: the engine's loop in its own process; many caller threads share it and their requests are batched
token by token; its outputs equal the engine's own; a child that dies fails its requests and comes back."""
from __future__ import annotations

import os
import signal
import threading
import time
from collections import defaultdict

import pytest

from engine.config import EngineConfig
from engine.engine_process import EngineProcess
from engine.sampling_params import SamplingParams
from tests.checkpoints import greedy_reference, write_checkpoint


class CollectingSink:
    """Keeps every output per request; `wait(id)` returns the finished one (or raises the failure)."""

    def __init__(self) -> None:
        self.outputs = defaultdict(list)
        self.failed: dict[str, BaseException] = {}
        self._done = defaultdict(threading.Event)
        self._lock = threading.Lock()

    def on_outputs(self, outputs) -> None:
        with self._lock:
            for output in outputs:
                self.outputs[output.request_id].append(output)
                if output.finished:
                    self._done[output.request_id].set()

    def on_failed(self, request_ids, exc) -> None:
        with self._lock:
            for request_id in request_ids:
                self.failed[request_id] = exc
                self._done[request_id].set()

    def wait(self, request_id: str, timeout: float = 120):
        with self._lock:
            done = self._done[request_id]
        assert done.wait(timeout), f"{request_id} never finished"
        if request_id in self.failed:
            raise self.failed[request_id]
        return self.outputs[request_id][-1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("engine-process")
    model = write_checkpoint(directory, "llama3-gqa-tied")
    sink = CollectingSink()
    engine = EngineProcess(EngineConfig(model=str(directory), skip_tokenizer_init=True), sink).start()
    yield engine, sink, model
    engine.shutdown()


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_concurrent_callers_are_batched_and_exact(setup):
    engine, sink, model = setup
    prompts = {f"r{i}": [3 + i, 7, 11 + i] * (1 + i % 4) for i in range(16)}
    threads = [threading.Thread(target=engine.submit_to_sink, args=(rid, prompt, GREEDY))
               for rid, prompt in prompts.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for request_id, prompt in prompts.items():
        final = sink.wait(request_id)
        streamed = [t for output in sink.outputs[request_id] for t in output.outputs[0].delta_token_ids]
        assert final.outputs[0].token_ids == streamed == greedy_reference(model, prompt, 12)
        assert final.prompt_token_ids == prompt
        # Unfinished outputs travel without their earlier tokens; the parent gives them back.
        for output in sink.outputs[request_id]:
            assert output.prompt_token_ids == prompt
            assert streamed[:len(output.outputs[0].token_ids)] == output.outputs[0].token_ids
    assert engine.max_batch_size > 1
    assert engine.running_ids() == set()


def test_bad_request_raises_in_the_caller_and_others_continue(setup):
    engine, sink, _ = setup
    engine.submit_to_sink("good", [5, 6, 7], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    with pytest.raises(ValueError, match="prompt must not be empty"):
        engine.submit_to_sink("bad", [], SamplingParams())
    assert len(sink.wait("good").outputs[0].token_ids) == 5
    assert "bad" not in engine.running_ids()


def test_abort_ends_the_request_and_frees_blocks(setup):
    engine, sink, _ = setup
    engine.submit_to_sink("long", [5] * 50, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
    deadline = time.monotonic() + 60
    while not sink.outputs["long"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.abort("long")
    final = sink.wait("long")
    assert final.outputs[0].finish_reason == "abort" and len(final.outputs[0].token_ids) < 400
    stats = engine.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]
    assert not engine.abort("long")


def test_a_request_that_is_not_incremental_gets_the_first_and_the_last_output(setup):
    engine, sink, model = setup
    engine.submit_to_sink("quiet", [5, 6, 7], GREEDY, incremental=False)
    final = sink.wait("quiet")
    outputs = sink.outputs["quiet"]
    assert len(outputs) == 2 and outputs[0].outputs[0].delta_token_ids and final.finished
    assert final.outputs[0].token_ids == greedy_reference(model, [5, 6, 7], 12)


def test_a_resumed_request_through_the_process_counts_only_its_new_tokens(setup):
    """Resumed tokens travel to the child and come back in the outputs, with checkpoints of a quiet request; the
    generated-tokens counter (a Prometheus counter on the worker) counts only what this run generated."""
    engine, sink, model = setup
    expected = greedy_reference(model, [5, 6, 7], 12)
    before = engine.num_generated_tokens
    engine.submit_to_sink("resumed", [5, 6, 7], GREEDY, incremental=False, resume=[expected[:5]], checkpoint_every=3)
    final = sink.wait("resumed")
    assert final.outputs[0].token_ids == expected
    # The first output brings the resumed tokens and the first new one; then one every 3 tokens.
    assert [len(o.outputs[0].delta_token_ids) for o in sink.outputs["resumed"]] == [6, 3, 3]
    assert engine.num_generated_tokens - before == 12 - 5


def test_a_dead_engine_process_fails_its_requests_and_starts_again(setup):
    engine, sink, model = setup
    engine.submit_to_sink("doomed", [5] * 20, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    deadline = time.monotonic() + 60
    while not sink.outputs["doomed"] and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(engine._process.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="engine process died"):
        sink.wait("doomed")
    assert "doomed" not in engine.running_ids()
    # Calls wait for the new child, which serves as the old one did.
    engine.submit_to_sink("after", [5, 6, 7], GREEDY)
    assert sink.wait("after").outputs[0].token_ids == greedy_reference(model, [5, 6, 7], 12)


def test_an_engine_that_cannot_start_raises_at_start(tmp_path):
    """The engine's own ValueError (the caller's mistake) stays a ValueError: the CLI reports it and exits 2."""
    with pytest.raises(ValueError, match="is not a model directory"):
        EngineProcess(EngineConfig(model=str(tmp_path / "missing"), skip_tokenizer_init=True),
                      CollectingSink()).start()
