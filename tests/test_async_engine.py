"""AsyncEngine: many caller threads share one engine loop; their requests are batched token by token."""
from __future__ import annotations

import threading

import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.checkpoints import greedy_reference, write_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("async")
    model = write_checkpoint(directory, "llama3-gqa-tied")
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(directory), skip_tokenizer_init=True))).start()
    yield engine, model
    engine.shutdown()


def test_concurrent_callers_are_batched_and_exact(setup):
    engine, model = setup
    prompts = {f"r{i}": [3 + i, 7, 11 + i] * (1 + i % 4) for i in range(16)}
    results: dict[str, list[int]] = {}

    def client(request_id: str) -> None:
        stream = engine.submit(request_id, prompts[request_id], SamplingParams(temperature=0, max_tokens=12,
                                                                               ignore_eos=True))
        streamed = [t for output in stream for t in output.outputs[0].delta_token_ids]
        assert streamed == stream.final.outputs[0].token_ids
        results[request_id] = streamed

    threads = [threading.Thread(target=client, args=(request_id,)) for request_id in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert set(results) == set(prompts)
    for request_id, prompt in prompts.items():
        assert results[request_id] == greedy_reference(model, prompt, 12)
    assert engine.max_batch_size > 1


def test_bad_request_raises_in_the_caller_and_others_continue(setup):
    engine, _ = setup
    good = engine.submit("good", [5, 6, 7], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    with pytest.raises(ValueError, match="prompt must not be empty"):
        engine.submit("bad", [], SamplingParams())
    assert len(good.result().outputs[0].token_ids) == 5


def test_abort_ends_the_stream_and_frees_blocks(setup):
    engine, _ = setup
    stream = engine.submit("long", [5] * 50, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
    first = next(iter(stream))
    assert not first.finished
    assert engine.abort("long")
    final = stream.result()
    assert final.outputs[0].finish_reason == "abort" and len(final.outputs[0].token_ids) < 400
    stats = engine.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]


def test_a_stream_that_is_not_incremental_gets_the_first_and_the_last_output(setup):
    engine, model = setup
    stream = engine.submit("quiet", [5, 6, 7], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                           incremental=False)
    outputs = list(stream)
    assert len(outputs) == 2 and outputs[0].outputs[0].delta_token_ids and outputs[-1].finished
    assert outputs[-1].outputs[0].token_ids == greedy_reference(model, [5, 6, 7], 12)
