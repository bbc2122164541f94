"""The pure-Python block manager and scheduler, without a model."""
from __future__ import annotations

from engine.block_manager import BlockManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler


def test_allocate_is_all_or_nothing_and_free_returns_blocks():
    manager = BlockManager(num_blocks=4, block_size=4)
    table: list[int] = []
    assert manager.allocate(table, 5) and len(table) == 2
    assert manager.allocate(table, 8) and len(table) == 2  # still fits in two blocks
    other: list[int] = []
    assert not manager.allocate(other, 13) and other == []  # needs 4, only 2 free: nothing taken
    assert manager.num_free_blocks == 2
    manager.free(table)
    assert table == [] and manager.num_free_blocks == 4
    assert manager.can_hold(16) and not manager.can_hold(17)


def make_request(i: int, prompt_len: int, priority: int = 0) -> Request:
    # Prompts of their own (tokens 100 * i + ...): no request finds another's blocks in the prefix cache.
    return Request(str(i), [100 * i + t for t in range(prompt_len)], SamplingParams(), max_tokens=8, arrival=i,
                   priority=priority)


def test_scheduler_respects_token_budget_and_chunks_prompts():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    for i, length in enumerate([6, 9, 3]):
        scheduler.add(make_request(i, length))
    out = scheduler.schedule()
    assert [(c.request.request_id, c.num_tokens, c.sample) for c in out.chunks] == [("0", 6, True), ("1", 4, False)]
    scheduler.update(out)
    out.chunks[0].request.append_token(5)
    out = scheduler.schedule()  # decode of 0 first, then the rest of 1, then 2 with what is left
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("0", 1), ("1", 5), ("2", 3)]


def test_priority_orders_waiting_requests_and_preemption_takes_the_lowest_newest():
    scheduler = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=100)
    low_old, high, low_new = make_request(0, 4), make_request(1, 4, priority=5), make_request(2, 4)
    for request in (low_old, high, low_new):
        scheduler.add(request)
    assert scheduler.waiting == [high, low_old, low_new]
    out = scheduler.schedule()
    scheduler.update(out)
    assert scheduler.running == [high, low_old, low_new]
    for request in scheduler.running:
        request.append_token(7)  # each now needs a second block; only one is free
    out = scheduler.schedule()
    assert out.preempted == [low_new]
    assert [c.request for c in out.chunks] == [high, low_old]
    assert low_new.status == RequestStatus.PREEMPTED and low_new.block_ids == []
    assert low_new.num_computed_tokens == 0 and scheduler.waiting == [low_new]
