"""Greedy outputs equal transformers token for token, for every architecture, however the engine batches,
chunks or preempts; afterwards every KV block is free."""
from __future__ import annotations

import random

import pytest

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.checkpoints import ARCHITECTURES, VOCAB, greedy_reference, write_checkpoint

NUM_REQUESTS = 36


def workload(seed: int = 1) -> list[tuple[list[int], int, int]]:
    """(prompt, max_tokens, step at which it arrives): prompts of 1-70 tokens, outputs of 1-24, 3 arrivals a step."""
    r = random.Random(seed)
    return [([r.randrange(3, VOCAB) for _ in range(r.randint(1, 70))], r.randint(1, 24), i // 3)
            for i in range(NUM_REQUESTS)]


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def checkpoint(request, tmp_path_factory):
    """(checkpoint dir, transformers references for workload())."""
    directory = tmp_path_factory.mktemp(request.param)
    model = write_checkpoint(directory, request.param)
    references = [greedy_reference(model, prompt, max_tokens) for prompt, max_tokens, _ in workload()]
    return directory, references


ENGINE_SETTINGS = {
    "default": dict(),
    "chunked-prefill": dict(max_num_batched_tokens=7),
    # 24 blocks of 4 tokens: the longest request (94 tokens) fits alone, a few together force preemption.
    "preemption": dict(block_size=4, num_kv_blocks=24),
    "one-seq": dict(max_num_seqs=1),
}


def run_staggered(engine: LLMEngine, requests) -> tuple[dict[str, list[int]], int, int]:
    """Add requests at their arrival steps while others run; return outputs, largest batch, preemptions."""
    pending = sorted(enumerate(requests), key=lambda item: item[1][2])
    params = {i: SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
              for i, (_, max_tokens, _) in enumerate(requests)}
    results: dict[str, list[int]] = {}
    step = largest_batch = preemptions = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][1][2] <= step:
            i, (prompt, _, _) = pending.pop(0)
            engine.add_request(str(i), prompt, params[i])
        largest_batch = max(largest_batch, len(engine.scheduler.running))
        for output in engine.step():
            if output.finished:
                results[output.request_id] = output.outputs[0].token_ids
                preemptions += output.num_preemptions
        step += 1
    return results, largest_batch, preemptions


@pytest.mark.parametrize("setting", list(ENGINE_SETTINGS))
def test_staggered_requests_match_transformers(checkpoint, setting):
    directory, references = checkpoint
    engine = LLMEngine(EngineConfig(model=str(directory), skip_tokenizer_init=True, **ENGINE_SETTINGS[setting]))
    results, largest_batch, preemptions = run_staggered(engine, workload())
    mismatches = [i for i in range(NUM_REQUESTS) if results[str(i)] != references[i]]
    assert not mismatches, f"{setting}: requests {mismatches} differ from transformers"
    if setting == "default":
        assert largest_batch > 8, "requests should have run together"
    if setting == "preemption":
        assert preemptions > 0, "the small cache should have forced preemption"
    if setting == "one-seq":
        assert largest_batch == 1
    assert engine.stats()["num_free_kv_blocks"] == engine.stats()["num_kv_blocks"]


def test_single_requests_match_transformers(checkpoint):
    directory, references = checkpoint
    llm = LLM(str(directory), skip_tokenizer_init=True)
    for i, (prompt, max_tokens, _) in enumerate(workload()[:6]):
        output = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))[0]
        assert output.outputs[0].token_ids == references[i]


def test_eos_stops_like_transformers(tmp_path):
    """With EOS on, the engine stops where transformers stops. Token 5 plays EOS so that some prompts hit it."""
    model = write_checkpoint(tmp_path, "llama3-gqa-tied")
    prompts = [prompt for prompt, _, _ in workload(seed=7)]
    references = [greedy_reference(model, prompt, 24, eos=5) for prompt in prompts]
    assert any(len(ref) < 24 for ref in references), "some reference should have stopped early"
    llm = LLM(str(tmp_path), skip_tokenizer_init=True)
    llm.engine.eos_token_ids = frozenset({5})
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24))
    for output, reference in zip(outputs, references):
        assert output.outputs[0].token_ids == reference
        assert output.outputs[0].finish_reason == ("stop" if reference[-1] == 5 else "length")
