"""Automatic prefix caching: requests that share full blocks of tokens share their KV, and nothing they compute
changes. Greedy outputs equal transformers' with caching on and off under every scheduler setting, blocks in use by
several requests are never written, every reference is returned, and cached blocks give way under memory pressure."""
from __future__ import annotations

import pytest
import torch

from engine.block_manager import BlockManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from tests.test_engine import GREEDY, assert_all_blocks_free, drain, engine_for, tiny  # noqa: F401 (fixture)
from tests.checkpoints import greedy_reference

SYSTEM = [7, 3, 9, 4, 11, 5, 8, 2, 6, 10] * 5  # 50 tokens: three full blocks of 16 and a partial one


def shared_prefix_work(n: int = 10) -> dict[str, tuple[list[int], int]]:
    """n requests with one system prompt and a few tokens of their own, and one that repeats another exactly."""
    work = {f"r{i}": (SYSTEM + [12 + i, 13 + i * 3 % 7][: 1 + i % 2], 6 + i % 5 * 4) for i in range(n)}
    work["again"] = work["r1"]
    return work


def run(engine, work):
    """Add the requests one per step (later ones find what earlier ones cached), drain, check every block free."""
    finished = {}
    for request_id, (prompt, max_tokens) in work.items():
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    finished |= drain(engine)
    assert_all_blocks_free(engine)
    manager = engine.scheduler.block_manager
    assert all(manager.reference_count(b) == 0 for b in range(manager.num_blocks))
    return finished


@pytest.mark.parametrize("options", [dict(), dict(max_num_batched_tokens=16), dict(max_num_seqs=1),
                                     dict(num_kv_blocks=10, max_num_seqs=6), dict(async_scheduling=True)],
                         ids=["default", "chunked-prefill", "one-at-a-time", "preemption", "async-scheduling"])
def test_outputs_equal_transformers_with_caching_on_and_off(tiny, options):
    directory, model = tiny
    work = shared_prefix_work()
    results = {}
    for caching in (False, True):
        engine = engine_for(directory, enable_prefix_caching=caching, **options)
        finished = run(engine, work)
        results[caching] = {rid: o.outputs[0].token_ids for rid, o in finished.items()}
        stats = engine.stats()
        if caching:
            assert stats["prefix_cache_hits"] >= 3 * 16  # the system prompt's full blocks, found at least once
            if "num_kv_blocks" in options:
                assert sum(o.num_preemptions for o in finished.values()) > 0
        else:
            assert stats["prefix_cache_hits"] == 0
    assert results[True] == results[False]
    for request_id, (prompt, max_tokens) in work.items():
        assert results[True][request_id] == greedy_reference(model, prompt, max_tokens)


def test_cached_tokens_are_counted_per_request(tiny):
    directory, _ = tiny
    engine = engine_for(directory)
    engine.add_request("first", SYSTEM + [12], SamplingParams(max_tokens=4, **GREEDY))
    drain(engine)
    engine.add_request("second", SYSTEM + [13], SamplingParams(max_tokens=4, **GREEDY))
    second = drain(engine)["second"]
    assert second.num_cached_tokens == 48  # three full blocks of 16; the partial fourth is computed
    engine.add_request("exact", SYSTEM[:48], SamplingParams(max_tokens=4, **GREEDY))
    assert drain(engine)["exact"].num_cached_tokens == 32  # the last prompt token is computed (it is sampled from)


def test_blocks_shared_by_running_requests_are_never_written(tiny):
    """While requests that share the system prompt's blocks run, decode and prefill beside them, the KV in those
    blocks stays exactly what the first request computed."""
    directory, _ = tiny
    engine = engine_for(directory, max_num_batched_tokens=16)
    engine.add_request("first", SYSTEM + [12], SamplingParams(max_tokens=3, **GREEDY))
    drain(engine)
    manager = engine.scheduler.block_manager
    engine.add_request("probe", SYSTEM + [13], SamplingParams(max_tokens=3, **GREEDY))
    engine.step()
    shared = list(engine.scheduler.running[0].block_ids[:3])
    kv = engine.runner.kv_caches
    before = [(k[shared].clone(), v[shared].clone()) for k, v in kv]
    for i in range(6):
        engine.add_request(f"r{i}", SYSTEM + [14 + i] * (1 + i), SamplingParams(max_tokens=8, **GREEDY))
    while engine.has_unfinished_requests():
        engine.step()
        for request in engine.scheduler.running:
            if request.num_computed_tokens >= 48:
                assert request.block_ids[:3] == shared
        assert all(manager.reference_count(b) >= 0 for b in shared)
    for (k, v), (k0, v0) in zip(kv, before):
        assert torch.equal(k[shared], k0) and torch.equal(v[shared], v0)
    assert_all_blocks_free(engine)


def test_eviction_under_memory_pressure(tiny):
    """A cache of 10 blocks and prompts of 3 full blocks each, all different: cached blocks are evicted for new
    ones (least recently freed first), every output is still transformers', and a prompt whose blocks were evicted
    computes them again."""
    directory, model = tiny
    engine = engine_for(directory, num_kv_blocks=10, max_num_seqs=2)
    prompts = {f"p{i}": [20 + i] * 48 + [5] for i in range(6)}
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=4, **GREEDY))
    finished = drain(engine)
    for request_id, prompt in prompts.items():
        assert finished[request_id].outputs[0].token_ids == greedy_reference(model, prompt, 4)
    assert engine.stats()["num_cached_kv_blocks"] <= 10
    engine.add_request("p0-again", prompts["p0"], SamplingParams(max_tokens=4, **GREEDY))
    again = drain(engine)["p0-again"]
    assert again.num_cached_tokens == 0  # evicted by the later prompts
    assert again.outputs[0].token_ids == finished["p0"].outputs[0].token_ids
    engine.add_request("p5-again", prompts["p5"], SamplingParams(max_tokens=4, **GREEDY))
    again = drain(engine)["p5-again"]
    assert again.num_cached_tokens == 48  # the newest stayed
    # Its three blocks hold the same tokens at different positions: each is found by its place in the chain.
    assert again.outputs[0].token_ids == finished["p5"].outputs[0].token_ids
    assert_all_blocks_free(engine)


def test_block_manager_reference_counts_and_lru():
    manager = BlockManager(num_blocks=4, block_size=2)

    def request(tokens):
        return Request("r", tokens, SamplingParams(max_tokens=1), max_tokens=1, arrival=0)

    a = request([1, 2, 3, 4, 5])
    assert manager.take_cached_prefix(a) == 0 and manager.allocate(a.block_ids, 5)
    a.num_computed_tokens = 5
    manager.cache_full_blocks(a, 5)
    assert manager.num_cached_blocks == 2  # [1, 2] and [3, 4]; the partial [5] is not
    b = request([1, 2, 3, 4, 6])
    assert manager.take_cached_prefix(b) == 4 and b.block_ids == a.block_ids[:2]
    assert [manager.reference_count(x) for x in b.block_ids] == [2, 2]
    manager.free(a.block_ids)
    assert [manager.reference_count(x) for x in b.block_ids] == [1, 1] and manager.num_free_blocks == 2
    manager.free(b.block_ids)
    assert manager.num_free_blocks == 4 and manager.num_cached_blocks == 2  # free, still findable
    c = request([9, 9, 9, 9, 9, 9, 9])
    assert manager.allocate(c.block_ids, 7)  # all four blocks: the uncached two first, then both cached evicted
    assert manager.num_cached_blocks == 0 and manager.num_free_blocks == 0
    manager.free(c.block_ids)
    d = request([1, 2, 3, 4, 5])
    assert manager.take_cached_prefix(d) == 0


def test_caching_off_finds_nothing():
    manager = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = Request("a", [1, 2, 3], SamplingParams(max_tokens=1), max_tokens=1, arrival=0)
    manager.allocate(a.block_ids, 3)
    a.num_computed_tokens = 3
    manager.cache_full_blocks(a, 5)
    assert manager.num_cached_blocks == 0


def test_requests_admitted_in_one_step_compute_the_shared_prefix_once(tiny):
    """A batch arriving at once: the first request's prefix blocks are findable from the step that computes them,
    so the others, admitted in that same step, compute only their own tokens; outputs are still transformers'."""
    directory, model = tiny
    engine = engine_for(directory)
    prompts = {f"r{i}": SYSTEM + [12 + i] * (1 + i) for i in range(8)}
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=5, **GREEDY))
    engine.step()
    assert engine.scheduler.prefix_hit_tokens == 7 * 48
    finished = drain(engine)
    for request_id, prompt in prompts.items():
        assert finished[request_id].outputs[0].token_ids == greedy_reference(model, prompt, 5)
        assert finished[request_id].num_cached_tokens == (0 if request_id == "r0" else 48)
    assert_all_blocks_free(engine)
