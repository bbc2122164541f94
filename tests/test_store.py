"""JobStore against a real Redis (the session's private server); every test has its own key prefix."""
from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from api.local_redis import start_redis
from api.settings import Settings
from api.job_record import TERMINAL, owner_id
from api.store import JobStore
from api.streams import AsyncStreams, EventType

STREAM_END = EventType.END.value

REQUEST = {"model": "demo", "prompt": "Hello", "max_tokens": 4}


@pytest.fixture
def store(redis_url: str) -> Iterator[JobStore]:
    s = JobStore.from_url(redis_url, prefix=f"t{uuid.uuid4().hex[:12]}", retention_seconds=600)
    yield s
    s.r.close()


def new_job(store: JobStore, owner: str = "alice", **kw):
    kw.setdefault("model", "demo")
    kw.setdefault("endpoint", "completions")
    kw.setdefault("request", REQUEST)
    job, created = store.create(owner=owner, **kw)
    assert created
    return job


def test_owner_id_hashes_keys() -> None:
    assert owner_id(None) == owner_id("") == "anonymous"
    assert owner_id("sk-1") != owner_id("sk-2")
    assert len(owner_id("sk-1")) == 64 and "sk-1" not in owner_id("sk-1")


def test_create_get_and_owner_isolation(store: JobStore) -> None:
    job = new_job(store, metadata={"run": 7}, webhook={"url": "http://127.0.0.1/hook"}, priority=3)
    got = store.get(job.id, owner="alice")
    assert got is not None and got == job
    assert got.status == "queued" and got.priority == 3 and got.metadata == {"run": 7}
    assert got.request == REQUEST and got.webhook == {"url": "http://127.0.0.1/hook"}
    assert got.started_at is None and got.result is None and not got.cancel_requested
    assert store.get(job.id, owner="mallory") is None
    assert store.get("job_nope") is None
    public = got.public()
    assert "owner" not in public and public["id"] == job.id and public["status"] == "queued"
    assert store.queue_depth("demo") == 1
    with pytest.raises(ValueError):
        store.create(owner="alice", model="demo", endpoint="embeddings", request=REQUEST)


def test_idempotent_create(store: JobStore) -> None:
    first, created = store.create(owner="alice", model="demo", endpoint="completions", request=REQUEST,
                                  idempotency_key="k1")
    again, created_again = store.create(owner="alice", model="demo", endpoint="completions", request=REQUEST,
                                        idempotency_key="k1")
    assert created and not created_again and again.id == first.id
    # Keys are scoped per owner.
    other, other_created = store.create(owner="bob", model="demo", endpoint="completions", request=REQUEST,
                                        idempotency_key="k1")
    assert other_created and other.id != first.id
    assert store.list("alice")[0] == [first]
    # Concurrent repeats of a fresh key: exactly one creates.
    results: list[tuple[str, bool]] = []

    def submit() -> None:
        job, made = store.create(owner="alice", model="demo", endpoint="completions", request=REQUEST,
                                 idempotency_key="k2")
        results.append((job.id, made))

    threads = [threading.Thread(target=submit) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len({job_id for job_id, _ in results}) == 1 and sum(made for _, made in results) == 1


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("API_KEYS", "REDIS_URL", "WEBHOOK_ALLOW_HOSTS", "MAX_QUEUE_DEPTH"):
        monkeypatch.delenv(f"INFERQ_{name}", raising=False)
    assert Settings().api_keys == [] and Settings().redis_url == "redis://127.0.0.1:6379/0"
    monkeypatch.setenv("INFERQ_API_KEYS", "sk-a, sk-b,")
    monkeypatch.setenv("INFERQ_WEBHOOK_ALLOW_HOSTS", "127.0.0.1")
    monkeypatch.setenv("INFERQ_MAX_QUEUE_DEPTH", "5")
    settings = Settings()
    assert settings.api_keys == ["sk-a", "sk-b"] and settings.webhook_allow_hosts == ["127.0.0.1"]
    assert settings.max_queue_depth == 5


def test_list_newest_first_with_cursor_and_status(store: JobStore) -> None:
    ids = [new_job(store).id for _ in range(7)]
    new_job(store, owner="bob")
    for job_id in ids[:3]:
        store.finish(job_id, "succeeded")
    newest_first = ids[::-1]
    page1, more1 = store.list("alice", limit=3)
    page2, more2 = store.list("alice", limit=3, after=page1[-1].id)
    page3, more3 = store.list("alice", limit=3, after=page2[-1].id)
    assert [j.id for j in page1 + page2 + page3] == newest_first
    assert (more1, more2, more3) == (True, True, False)
    done, more = store.list("alice", limit=2, status="succeeded")
    assert [j.id for j in done] == newest_first[4:6] and more
    done2, more = store.list("alice", limit=2, status="succeeded", after=done[-1].id)
    assert [j.id for j in done2] == [ids[0]] and not more
    assert store.list("alice", after="job_unknown") == ([], False)


def take(store: JobStore, job_id: str, worker_id: str = "w1"):
    """What a worker does: take the job's newest message and mark it running."""
    return store.mark_running(job_id, store.dispatch(job_id) or 0, worker_id)


def test_run_then_finish_once(store: JobStore) -> None:
    job = new_job(store)
    assert store.dispatch(job.id) == 1 and store.dispatch(job.id) is None  # one first message only
    assert store.mark_running(job.id, 0, "w1") is None  # not a message ever sent
    running = store.mark_running(job.id, 1, "w1")
    assert running is not None and running.status == "running" and running.attempts == 1
    assert running.started_at is not None and store.queue_depth("demo") == 0
    assert store.r.smembers(store.keys.lease("demo", "w1")) == {job.id}
    assert store.mark_running(job.id, 1, "w2") is None  # a duplicate message while it runs is skipped
    assert store.dispatch(job.id, again=True) is None  # running: nothing to replace
    store.mark_first_token(job.id)
    first = store.get(job.id).first_token_at
    store.mark_first_token(job.id)
    assert first is not None and store.get(job.id).first_token_at == first
    # Its worker died: queued again under a new number; the old message is stale, the new one runs it.
    assert store.requeue(job.id) == ("queued", 2)
    assert store.get(job.id).status == "queued" and store.queue_depth("demo") == 1
    assert store.mark_running(job.id, 1, "w2") is None
    again = store.mark_running(job.id, 2, "w2")
    assert again.attempts == 2 and again.started_at == running.started_at
    assert store.finish(job.id, "succeeded", result={"text": "hi"}, usage={"completion_tokens": 1})
    assert not store.finish(job.id, "failed", error={"message": "late"})
    final = store.get(job.id)
    assert final.status == "succeeded" and final.result == {"text": "hi"} and final.error is None
    assert final.finished_at is not None
    assert store.mark_running(job.id, 2, "w2") is None  # a redelivery of a finished job is skipped
    assert store.requeue(job.id) is None and store.dispatch(job.id, again=True) is None
    assert store.request_cancel(job.id) == "succeeded"  # terminal: unchanged
    assert store.get(job.id).status == "succeeded"
    with pytest.raises(ValueError):
        store.finish(job.id, "running")


def test_cancel_queued(store: JobStore) -> None:
    job = new_job(store)
    assert store.request_cancel(job.id) == "cancelled"
    assert store.get(job.id).status == "cancelled" and store.queue_depth("demo") == 0
    assert take(store, job.id) is None
    assert not store.finish(job.id, "succeeded")
    assert store.request_cancel(job.id) == "cancelled"
    assert store.request_cancel("job_nope") == "not_found"
    events = store.read_stream(job.id)
    assert events[-1][1] == {"type": STREAM_END, "status": "cancelled"}


def test_cancel_running_publishes(store: JobStore) -> None:
    job = new_job(store)
    take(store, job.id)
    pubsub = store.r.pubsub()
    pubsub.subscribe(store.keys.cancel)
    assert pubsub.get_message(timeout=1.0)["type"] == "subscribe"
    assert store.request_cancel(job.id) == "cancelling"
    assert store.cancel_requested(job.id) and store.get(job.id).status == "running"
    message = pubsub.get_message(timeout=1.0)
    pubsub.close()
    assert message is not None and message["type"] == "message" and message["data"] == job.id
    assert store.finish(job.id, "cancelled")
    assert store.get(job.id).status == "cancelled"


def test_finish_vs_cancel_race_has_one_winner(store: JobStore) -> None:
    for queued in (True, False):
        jobs = [new_job(store) for _ in range(20)]
        if not queued:
            for job in jobs:
                take(store, job.id)
        finish_won: dict[str, bool] = {}
        cancel_said: dict[str, str] = {}
        barrier = threading.Barrier(40)

        def finisher(job_id: str) -> None:
            barrier.wait()
            finish_won[job_id] = store.finish(job_id, "succeeded", result={"ok": True})

        def canceller(job_id: str) -> None:
            barrier.wait()
            cancel_said[job_id] = store.request_cancel(job_id)

        threads = [threading.Thread(target=f, args=(j.id,)) for j in jobs for f in (finisher, canceller)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        for job in jobs:
            final = store.get(job.id)
            assert final.status in TERMINAL
            if finish_won[job.id]:
                assert final.status == "succeeded" and final.result == {"ok": True}
                assert cancel_said[job.id] in ("succeeded", "cancelling")
            else:
                assert queued and final.status == "cancelled" and cancel_said[job.id] == "cancelled"
            ends = [e for _, e in store.read_stream(job.id) if e["type"] == STREAM_END]
            assert ends == [{"type": STREAM_END, "status": final.status}]


def test_stream_round_trip(store: JobStore) -> None:
    job = new_job(store)
    assert store.read_stream(job.id) == []
    for i in range(3):
        store.append_stream(job.id, {"type": "token", "text": f"t{i}"})
    events = store.read_stream(job.id)
    assert [e for _, e in events] == [{"type": "token", "text": f"t{i}"} for i in range(3)]
    assert store.read_stream(job.id, last_id=events[1][0]) == events[2:]
    start = time.monotonic()
    assert store.read_stream(job.id, last_id=events[-1][0], block_ms=100) == []
    assert 0.08 < time.monotonic() - start < 1.0
    assert 0 < store.r.ttl(store.keys.stream(job.id)) <= 600


def test_wait_for_terminal(store: JobStore, redis_url: str) -> None:
    import asyncio

    import redis.asyncio as aredis

    job = new_job(store)
    take(store, job.id)

    def finish_later() -> None:
        time.sleep(0.2)
        store.append_stream(job.id, {"type": "delta", "choices": []})  # a delta wakes nobody
        time.sleep(0.1)
        store.finish(job.id, "succeeded", result={"text": "x"})

    async def main() -> None:
        client = aredis.Redis.from_url(redis_url, decode_responses=True)
        streams = AsyncStreams(client, store.keys)
        start = time.monotonic()
        waited = await streams.wait_for_terminal(job.id, timeout_s=0.3)
        assert waited.status == "running" and 0.25 < time.monotonic() - start < 1.0
        threading.Thread(target=finish_later).start()
        start = time.monotonic()
        done = await streams.wait_for_terminal(job.id, timeout_s=10)
        elapsed = time.monotonic() - start
        assert done.status == "succeeded" and 0.25 < elapsed < 1.0
        assert (await streams.wait_for_terminal(job.id, timeout_s=5)).status == "succeeded"  # terminal: at once
        assert await streams.wait_for_terminal("job_nope", timeout_s=5) is None
        await streams.close()
        await client.aclose()

    asyncio.run(main())


def command_calls(store: JobStore, command: str) -> int:
    """How many times the store's Redis server has run `command`."""
    return store.r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def test_a_waiter_for_a_jobs_end_reads_nothing_per_token() -> None:
    """Long-polls wait on one subscription to the jobs' ends: the tokens streamed meanwhile cost the waiter no
    reads (it used to read the stream at every token). Its own Redis, so that nothing else's commands count."""
    import asyncio

    import redis.asyncio as aredis

    from api.streams import delta_event

    with start_redis() as server:
        store = JobStore.from_url(server.url, prefix="waits")
        job = new_job(store)
        take(store, job.id)

        def stream_then_finish() -> None:
            time.sleep(0.2)
            for _ in range(20):
                store.append_stream(job.id, delta_event([{"index": 0, "text": "t", "finish_reason": None}]))
                time.sleep(0.02)
            store.finish(job.id, "succeeded", result={"text": "x"})

        async def main() -> None:
            client = aredis.Redis.from_url(server.url, decode_responses=True)
            streams = AsyncStreams(client, store.keys)
            xreads, hgetalls = command_calls(store, "xread"), command_calls(store, "hgetall")
            writer = threading.Thread(target=stream_then_finish)
            writer.start()
            done = await streams.wait_for_terminal(job.id, timeout_s=10)
            writer.join()
            assert done.status == "succeeded"
            # No read of the stream; the record read at the start, the end, maybe a re-check.
            assert command_calls(store, "xread") == xreads and command_calls(store, "hgetall") - hgetalls <= 4
            await streams.close()
            await client.aclose()

        asyncio.run(main())


def test_stream_readers_share_one_read_per_round() -> None:
    """Every stream an API process follows is read by one blocking XREAD per round (StreamHub), not one per
    stream per token; every reader still gets every event once, in order, through the end event, a late second
    reader of a stream too. Its own Redis, so that nothing else's commands count."""
    import asyncio

    import redis.asyncio as aredis

    from api.streams import delta_event

    num_jobs, num_deltas = 40, 15
    with start_redis() as server:
        store = JobStore.from_url(server.url, prefix="hub")
        jobs = [new_job(store) for _ in range(num_jobs)]
        for job in jobs:
            take(store, job.id)

        def write() -> None:
            time.sleep(0.3)  # the readers have caught up and follow through the hub
            for i in range(num_deltas):  # a round as the worker writes an engine step: one pipeline
                pipe = store.r.pipeline(transaction=False)
                for job in jobs:
                    store.append_stream(job.id, delta_event([{"index": 0, "text": str(i), "finish_reason": None}]),
                                        pipe=pipe)
                pipe.execute()
                time.sleep(0.02)
            for job in jobs:
                store.finish(job.id, "succeeded", result={"text": "x"})

        async def main() -> None:
            client = aredis.Redis.from_url(server.url, decode_responses=True)
            streams = AsyncStreams(client, store.keys)

            async def texts(job_id: str, delay: float = 0.0) -> list[str]:
                await asyncio.sleep(delay)
                return [e["choices"][0]["text"] if e["type"] == "delta" else e["type"]
                        async for e in streams.events(job_id)]

            xreads = command_calls(store, "xread")
            writer = threading.Thread(target=write)
            writer.start()
            got = await asyncio.gather(*(texts(job.id) for job in jobs), texts(jobs[0].id, delay=0.4))
            writer.join()
            expected = [str(i) for i in range(num_deltas)] + ["end"]
            assert all(texts_ == expected for texts_ in got)
            # One catch-up read per reader, then about a read per written round (and at most one per job's end,
            # each its own write): not one per stream and round (num_jobs * num_deltas = 600).
            reads = command_calls(store, "xread") - xreads
            assert reads < 2 * num_jobs + 3 * num_deltas, reads
            await streams.close()
            await client.aclose()

        asyncio.run(main())


def test_a_new_stream_reader_does_not_wait_out_the_hubs_blocking_read(store: JobStore, redis_url: str) -> None:
    """The hub is blocked on a quiet stream (up to a second); a reader of another stream that joins is read from
    at once (it wakes the hub), so its end arrives in a moment, not when the block runs out."""
    import asyncio

    import redis.asyncio as aredis

    quiet, joining = new_job(store), new_job(store)
    for job in (quiet, joining):
        take(store, job.id)

    async def main() -> None:
        client = aredis.Redis.from_url(redis_url, decode_responses=True)
        streams = AsyncStreams(client, store.keys)
        quiet_reader = asyncio.ensure_future(streams.events(quiet.id).__anext__())
        await asyncio.sleep(0.1)  # the hub's read of the quiet stream is blocked now
        start = time.monotonic()
        finisher = threading.Timer(0.05, lambda: store.finish(joining.id, "succeeded", result={"text": "x"}))
        finisher.start()
        events = [event["type"] async for event in streams.events(joining.id)]
        elapsed = time.monotonic() - start
        finisher.join()
        assert events == ["end"] and elapsed < 0.5, elapsed
        quiet_reader.cancel()
        await streams.close()
        await client.aclose()

    asyncio.run(main())


def test_sse_sends_the_deltas_of_one_read_as_one_chunk(store: JobStore, redis_url: str) -> None:
    """A stream reader that falls behind catches up: the deltas one read returns go out as one chunk per choice."""
    import asyncio
    import json

    import redis.asyncio as aredis

    from api.routes.openai import _sse
    from api.streams import delta_event

    job = new_job(store)
    take(store, job.id)
    for text, finish in (("a", None), ("b", None), ("c", None), ("d", None), ("", "length")):
        store.append_stream(job.id, delta_event([{"index": 0, "text": text, "finish_reason": finish}]))
    store.finish(job.id, "succeeded", result={}, usage={"completion_tokens": 4})

    async def main() -> list[str]:
        client = aredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            return [chunk async for chunk in _sse(store, AsyncStreams(client, store.keys), job, "completions")]
        finally:
            await client.aclose()

    chunks = asyncio.run(main())
    payloads = [json.loads(c.removeprefix("data: ")) for c in chunks if c.startswith("data: {")]
    assert [(p["choices"][0]["text"], p["choices"][0]["finish_reason"]) for p in payloads] == [("abcd", "length")]
    assert chunks[-1] == "data: [DONE]\n\n"


def test_worker_registry_expires(store: JobStore) -> None:
    store.registry.announce("w1", {"model": "demo", "device": "cuda:0"}, ttl_s=1)
    store.registry.announce("w2", {"model": "demo"}, ttl_s=30)
    store.registry.announce("w3", {"model": "other"}, ttl_s=1)
    assert [w["worker_id"] for w in store.registry.workers("demo")] == ["w1", "w2"]
    assert store.registry.workers("demo")[0]["device"] == "cuda:0"
    assert {m: [w["worker_id"] for w in ws] for m, ws in store.registry.models().items()} == {
        "demo": ["w1", "w2"], "other": ["w3"]}
    time.sleep(1.1)
    assert [w["worker_id"] for w in store.registry.workers()] == ["w2"]
    assert list(store.registry.models()) == ["demo"]
    assert store.registry.known_models() == {"demo", "other"}  # "other" has no live worker but did exist
    assert store.registry.workers("nobody") == []


def test_retention_ttl_on_finished_jobs(store: JobStore) -> None:
    job = new_job(store)
    assert store.r.ttl(store.keys.job(job.id)) == -1  # unfinished jobs never expire
    take(store, job.id)
    store.append_stream(job.id, {"type": "token", "text": "a"})
    store.finish(job.id, "failed", error={"message": "boom"})
    assert 590 <= store.r.ttl(store.keys.job(job.id)) <= 600
    assert 590 <= store.r.ttl(store.keys.stream(job.id)) <= 600
    assert store.get(job.id).error == {"message": "boom"}


def test_expired_jobs_leave_the_listing(store: JobStore) -> None:
    jobs = [new_job(store) for _ in range(3)]
    store.r.delete(store.keys.job(jobs[1].id))  # as if its retention ran out
    assert [j.id for j in store.list("alice")[0]] == [jobs[2].id, jobs[0].id]
    store.mark_first_token(jobs[1].id)  # must not resurrect an expired record
    assert store.r.exists(store.keys.job(jobs[1].id)) == 0


def test_start_redis_stop_leaves_no_process(tmp_path) -> None:
    server = start_redis(data_dir=tmp_path / "data")
    pid = server.process.pid
    assert redis.Redis.from_url(server.url).ping()
    server.stop()
    server.stop()  # idempotent
    assert server.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with start_redis() as other:
        with pytest.raises(RuntimeError, match="Address already in use"):
            start_redis(port=other.port)  # must not mistake the running server for its own
    assert other.process.poll() is not None and not other.data_dir.exists()


def test_bulk_jobs_do_not_count_in_queue_depth(store: JobStore) -> None:
    new_job(store, bulk=True)
    interactive = new_job(store)
    assert store.queue_depth("demo") == 1 and store.queued_ids("demo") == [interactive.id]


def test_never_sent_finds_queued_jobs_without_a_message(store: JobStore) -> None:
    sent, orphan, cancelled = new_job(store), new_job(store), new_job(store)
    assert store.dispatch(sent.id) == 1
    store.request_cancel(cancelled.id)
    assert store.queued_ids("demo") == [sent.id, orphan.id]
    assert store.never_sent([sent.id, orphan.id, cancelled.id]) == [orphan.id]
    assert store.queued_ids("demo", older_than_s=60) == []  # all just created
    time.sleep(0.05)
    assert store.queued_ids("demo", older_than_s=0.01) == [sent.id, orphan.id]


def test_ended_jobs_wait_for_their_aftermath_then_a_sweeper_settles_them(store: JobStore) -> None:
    from api.lifecycle import sweep_ended

    job = new_job(store)
    take(store, job.id)
    assert store.finish(job.id, "succeeded", result={"text": "x"}, usage={"completion_tokens": 1})
    assert store.r.zscore(store.keys.ended, job.id) is not None
    assert store.claim_ended() == []  # its process may still do it: the grace period is not over
    store.r.zadd(store.keys.ended, {job.id: 0})  # the grace period passed (the process died)
    assert sweep_ended(store) == 1
    assert store.r.zscore(store.keys.ended, job.id) is None  # settled once: nothing left to sweep
    assert store.r.hget(f"{store.prefix}:metrics:demo", "jobs_succeeded") == "1"
    assert sweep_ended(store) == 0


def test_the_bulk_lane_takes_the_reserve_only_while_no_interactive_work_is_around(store: JobStore) -> None:
    from api.lanes import BulkLane

    store.registry.announce("w1", {"model": "demo", "bulk_slots": 6, "bulk_slots_idle": 9}, ttl_s=30)
    assert BulkLane(store, "demo").capacity() == 9
    new_job(store, bulk=True)  # a batch line is not interactive work
    assert BulkLane(store, "demo").capacity() == 9
    job = new_job(store)  # an interactive job: the reserve is held back while it is queued...
    assert BulkLane(store, "demo").capacity() == 6
    assert take(store, job.id) is not None
    assert BulkLane(store, "demo").capacity() == 6  # ... and while it runs...
    assert store.finish(job.id, "succeeded", result={}, usage={})
    assert BulkLane(store, "demo").capacity() == 9  # ... and no longer
    queued_then_cancelled = new_job(store)
    assert BulkLane(store, "demo").capacity() == 6
    store.request_cancel(queued_then_cancelled.id)
    assert BulkLane(store, "demo").capacity() == 9


def test_pruning_the_open_interactive_set_drops_only_ended_or_missing_jobs(store: JobStore) -> None:
    live, ended = new_job(store), new_job(store)
    store.request_cancel(ended.id)
    key = store.keys.open_interactive("demo")
    store.r.zadd(key, {ended.id: 1.0, "job_gone": 1.0})  # left behind, e.g. by an older version
    store.r.zadd(key, {live.id: 1.0})
    assert store.prune_open_interactive("demo") == 2
    assert store.r.zrange(key, 0, -1) == [live.id]
