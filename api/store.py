"""The job store: the one module that knows the Redis key layout.

Keys (all under `{p}:` = the configured prefix):
  {p}:job:{id}                  hash, the job record (fields: see `Job`); TTL = retention once terminal
  {p}:job:{id}:stream           stream of token/progress events for SSE, each entry's JSON under "data";
                                finish() and cancel-before-start append a final {"type": "end", "status": ...}
  {p}:job:{id}:done             pub/sub channel; the terminal status is published there when the job ends
  {p}:idem:{owner}:{key}        idempotency key -> job id (TTL = retention)
  {p}:owner:{owner}:jobs        sorted set of the owner's job ids, score = created_at
  {p}:queued:{model}            sorted set of queued interactive job ids of one model (queue depth), score =
                                created_at; bulk (batch) jobs wait in the bulk lane instead (api/lanes.py)
  {p}:leases:{model}            set of worker ids that may hold leases (recovery looks for dead ones here)
  {p}:leases:{model}:{wid}      set of the job ids running on that worker
  {p}:cancel                    pub/sub channel; job ids whose cancellation was requested while running
  {p}:worker:{model}:{wid}      string, JSON of a live worker's info, TTL = its heartbeat lease
  {p}:workers:{model}           sorted set of that model's worker ids, score = lease expiry (unix seconds)
  {p}:models                    set of model names ever announced

Every message that asks a worker to run a job carries the job's `dispatch` number; sending again (after a
worker died) increments it, so a worker runs a job only from its newest message and never twice at once.

Status transitions are Lua scripts, so that racing writers (cancel vs finish, duplicate deliveries) have exactly
one winner and a terminal status is never overwritten. Sync redis-py: callers are FastAPI sync endpoints and
Celery worker threads; one `redis.Redis` (thread-safe connection pool) is shared.
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

import redis

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ENDPOINTS = frozenset({"completions", "chat.completions"})
STREAM_END = "end"  # "type" of the last event of every job's stream
STREAM_MAXLEN = 100_000  # approximate cap per job stream: bounds memory if a job runs away
_BLOCK_CHUNK_MS = 1000  # long waits are cut in blocking reads of this length (stays under any socket timeout)
_TIMES = ("created_at", "started_at", "first_token_at", "finished_at")
_JSON_OR_NONE = ("webhook", "result", "usage", "error", "webhook_deliveries")

# ---- Lua: every status change is one script, so concurrent writers see one consistent record ----------------
# Common tail of "this job just became terminal": KEYS = job, stream, queued set; ARGV[1..] as noted per script.
_END_LUA = """
local function end_job(status, now, ttl, job_id, channel, end_event, maxlen)
  redis.call('HSET', KEYS[1], 'status', status, 'finished_at', now)
  redis.call('ZREM', KEYS[3], job_id)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'data', end_event)
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('PUBLISH', channel, status)
end
local function is_terminal(st) return st == 'succeeded' or st == 'failed' or st == 'cancelled' end
"""
# KEYS: job, owner index, queued set, idempotency key ("-" = none). ARGV: id, created, idem ttl, has idem, fields.
_CREATE_LUA = """
if ARGV[4] == '1' then
  local existing = redis.call('GET', KEYS[4])
  if existing then return {0, existing} end
  redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[3])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if KEYS[3] ~= '-' then redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1]) end
return {1, ARGV[1]}
"""
# KEYS: job. ARGV: "first" (never sent yet) or "again" (sent before). A queued job's next dispatch number, or nil.
_DISPATCH_LUA = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return nil end
local sent = tonumber(redis.call('HGET', KEYS[1], 'dispatch') or '0') > 0
if (ARGV[1] == 'first') == sent then return nil end
return redis.call('HINCRBY', KEYS[1], 'dispatch', 1)
"""
# KEYS: job, queued set. ARGV: id. A job whose worker died: running -> queued, with a new dispatch number (or nil).
_REQUEUE_LUA = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return nil end
redis.call('HSET', KEYS[1], 'status', 'queued')
if redis.call('HGET', KEYS[1], 'bulk') ~= '1' then
  redis.call('ZADD', KEYS[2], redis.call('HGET', KEYS[1], 'created_at'), ARGV[1])
end
return redis.call('HINCRBY', KEYS[1], 'dispatch', 1)
"""
# KEYS: job, queued set, the worker's lease set, lease index. ARGV: now, id, dispatch, worker id.
# queued -> running and leased to the worker in one step (a lease-less running job could never be recovered).
# Returns the record (flat HGETALL), or nil when the job is not queued or the message is not its newest.
_MARK_RUNNING_LUA = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return nil end
if (redis.call('HGET', KEYS[1], 'dispatch') or '0') ~= ARGV[3] then return nil end
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[4])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if redis.call('HGET', KEYS[1], 'started_at') == '' then redis.call('HSET', KEYS[1], 'started_at', ARGV[1]) end
redis.call('HSET', KEYS[1], 'status', 'running')
redis.call('ZREM', KEYS[2], ARGV[2])
return redis.call('HGETALL', KEYS[1])
"""
# KEYS: job. ARGV: now. Only sets the field when it is still empty (and never resurrects an expired job).
_FIRST_TOKEN_LUA = """
if redis.call('HGET', KEYS[1], 'first_token_at') == '' then redis.call('HSET', KEYS[1], 'first_token_at', ARGV[1]) end
"""
# KEYS: job, stream, queued. ARGV: status, now, ttl, result, usage, error, id, done channel, end event, maxlen.
_FINISH_LUA = _END_LUA + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st or is_terminal(st) then return 0 end
redis.call('HSET', KEYS[1], 'result', ARGV[4], 'usage', ARGV[5], 'error', ARGV[6])
end_job(ARGV[1], ARGV[2], ARGV[3], ARGV[7], ARGV[8], ARGV[9], ARGV[10])
return 1
"""
# KEYS: job. ARGV: event, its outcome (JSON). One script, so outcomes of two events landing at once both stay; and a
# job that expired meanwhile is not resurrected as a partial record without a TTL.
_RECORD_WEBHOOK_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local current = redis.call('HGET', KEYS[1], 'webhook_deliveries')
local deliveries = {}
if current and current ~= '' then deliveries = cjson.decode(current) end
deliveries[ARGV[1]] = cjson.decode(ARGV[2])
redis.call('HSET', KEYS[1], 'webhook_deliveries', cjson.encode(deliveries))
return 1
"""
# KEYS: job, stream, queued. ARGV: now, ttl, id, done channel, end event, maxlen, cancel channel.
_CANCEL_LUA = _END_LUA + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'not_found' end
if st == 'queued' then
  end_job('cancelled', ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
  return 'cancelled'
end
if st == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  redis.call('PUBLISH', ARGV[7], ARGV[3])
  return 'cancelling'
end
return st
"""


@dataclass(slots=True)
class Job:
    """One job record, decoded from its Redis hash."""

    id: str
    owner: str
    model: str
    endpoint: str
    request: dict
    status: str = "queued"
    priority: int = 0
    metadata: dict = field(default_factory=dict)
    webhook: dict | None = None
    created_at: float | None = None
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    dispatch: int = 0  # number of the newest message sent for this job (0 = not sent yet)
    bulk: bool = False  # a batch line: waits in the bulk lane, not in the queued set
    result: dict | None = None
    usage: dict | None = None
    error: dict | None = None
    cancel_requested: bool = False
    # Webhook outcome per event: {"completed": {"status": "delivered"|"failed", "attempts", "last_error", ...}}
    webhook_deliveries: dict | None = None

    def public(self) -> dict:
        """JSON-able view for API responses: every field but the owner hash."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "owner"}

    def to_fields(self) -> dict[str, str]:
        """The Redis hash fields ("" for None: hashes hold strings only)."""
        out = {"id": self.id, "owner": self.owner, "model": self.model, "endpoint": self.endpoint,
               "request": _dump(self.request), "status": self.status, "priority": str(int(self.priority)),
               "metadata": _dump(self.metadata or {}), "attempts": str(int(self.attempts)),
               "dispatch": str(int(self.dispatch)), "bulk": "1" if self.bulk else "0",
               "cancel_requested": "1" if self.cancel_requested else "0"}
        out.update({name: _dump(getattr(self, name)) for name in _JSON_OR_NONE})
        out.update({name: "" if getattr(self, name) is None else repr(getattr(self, name)) for name in _TIMES})
        return out

    @classmethod
    def from_fields(cls, f: dict[str, str]) -> Job | None:
        """Decode a hash; None for an empty one (missing or expired key)."""
        if not f or "id" not in f:
            return None
        return cls(id=f["id"], owner=f.get("owner", ""), model=f.get("model", ""), endpoint=f.get("endpoint", ""),
                   request=_load(f.get("request")) or {}, status=f.get("status", "queued"),
                   priority=int(f.get("priority") or 0), metadata=_load(f.get("metadata")) or {},
                   attempts=int(f.get("attempts") or 0), dispatch=int(f.get("dispatch") or 0),
                   bulk=f.get("bulk") == "1", cancel_requested=f.get("cancel_requested") == "1",
                   **{name: _load(f.get(name)) for name in _JSON_OR_NONE},
                   **{name: float(f[name]) if f.get(name) else None for name in _TIMES})


def owner_id(api_key: str | None) -> str:
    """The owner of jobs submitted with `api_key`: its SHA-256 (keys are never stored), or "anonymous"."""
    if not api_key:
        return "anonymous"
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def _dump(value: dict | None) -> str:
    return "" if value is None else json.dumps(value, separators=(",", ":"))


def _load(text: str | None) -> Any:
    return json.loads(text) if text else None


class JobStore:
    """Jobs, their token streams and the worker registry in one Redis."""

    def __init__(self, redis_client: redis.Redis, prefix: str = "inferq", retention_seconds: int = 86400) -> None:
        self.r = redis_client
        self.prefix = prefix
        self.retention_seconds = int(retention_seconds)
        self._create = self.r.register_script(_CREATE_LUA)
        self._mark_running = self.r.register_script(_MARK_RUNNING_LUA)
        self._dispatch = self.r.register_script(_DISPATCH_LUA)
        self._requeue = self.r.register_script(_REQUEUE_LUA)
        self._first_token = self.r.register_script(_FIRST_TOKEN_LUA)
        self._finish = self.r.register_script(_FINISH_LUA)
        self._cancel = self.r.register_script(_CANCEL_LUA)
        self._record_webhook = self.r.register_script(_RECORD_WEBHOOK_LUA)

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True), **kw)

    # ---- keys -------------------------------------------------------------------------------------------------
    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def stream_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:stream"

    def done_channel(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:done"

    @property
    def cancel_channel(self) -> str:
        return f"{self.prefix}:cancel"

    def _owner_key(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:jobs"

    def _queued_key(self, model: str) -> str:
        return f"{self.prefix}:queued:{model}"

    def lease_key(self, model: str, worker_id: str) -> str:
        return f"{self.prefix}:leases:{model}:{worker_id}"

    def lease_index(self, model: str) -> str:
        return f"{self.prefix}:leases:{model}"

    def _model_of(self, job_id: str) -> str | None:
        # The model never changes after create, so reading it outside the scripts is race-free.
        return self.r.hget(self.job_key(job_id), "model")

    # ---- jobs -------------------------------------------------------------------------------------------------
    def create(self, *, owner: str, model: str, endpoint: str, request: dict, priority: int = 0,
               metadata: dict | None = None, webhook: dict | None = None, idempotency_key: str | None = None,
               bulk: bool = False) -> tuple[Job, bool]:
        """Store a new queued job; with an idempotency key already used by this owner, return that job instead.
        `bulk` jobs (batch lines) are not counted in the model's queue depth: the bulk lane holds them."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}, got {endpoint!r}")
        idem_key = f"{self.prefix}:idem:{owner}:{idempotency_key}" if idempotency_key else ""
        for _ in range(2):
            job = Job(id=f"job_{uuid.uuid4().hex}", owner=owner, model=model, endpoint=endpoint, request=request,
                      status="queued", priority=int(priority), metadata=metadata or {}, webhook=webhook,
                      created_at=time.time(), bulk=bulk)
            queued_key = "-" if bulk else self._queued_key(model)
            created, job_id = self._create(
                keys=[self.job_key(job.id), self._owner_key(owner), queued_key, idem_key or "-"],
                args=[job.id, repr(job.created_at), self.retention_seconds, "1" if idem_key else "0",
                      *[part for pair in job.to_fields().items() for part in pair]],
            )
            if int(created):
                self._prune_owner(owner)
                return job, True
            existing = self.get(job_id)
            if existing is not None:
                return existing, False
            # The key outlived its job (both expired on their own clocks): forget it and create afresh.
            self.r.delete(idem_key)
        raise RuntimeError("idempotent create kept racing with expiry")  # pragma: no cover

    def get(self, job_id: str, owner: str | None = None) -> Job | None:
        """The job, or None if it does not exist (or expired) or belongs to another owner than `owner`."""
        job = Job.from_fields(self.r.hgetall(self.job_key(job_id)))
        if job is None or (owner is not None and job.owner != owner):
            return None
        return job

    def list(self, owner: str, *, limit: int = 20, after: str | None = None,
             status: str | None = None) -> tuple[list[Job], bool]:
        """The owner's jobs newest first, starting after job id `after`; returns (page, has_more)."""
        key = self._owner_key(owner)
        start = 0
        if after:
            rank = self.r.zrevrank(key, after)
            if rank is None:
                return [], False
            start = rank + 1
        batch = max(limit + 1, 50)
        found: list[Job] = []
        while len(found) <= limit:
            ids = self.r.zrevrange(key, start, start + batch - 1)
            if not ids:
                break
            start += len(ids)
            pipe = self.r.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(self.job_key(job_id))
            missing = []
            for job_id, fields in zip(ids, pipe.execute()):
                job = Job.from_fields(fields)
                if job is None:
                    missing.append(job_id)
                elif status is None or job.status == status:
                    found.append(job)
            if missing:
                self.r.zrem(key, *missing)  # expired jobs: the index forgets them lazily
                start -= len(missing)
        return found[:limit], len(found) > limit

    def _prune_owner(self, owner: str, count: int = 20) -> None:
        """Drop a few of the owner's oldest index entries whose jobs expired, so the index does not grow forever."""
        key = self._owner_key(owner)
        old = self.r.zrangebyscore(key, "-inf", time.time() - self.retention_seconds, start=0, num=count)
        if not old:
            return
        pipe = self.r.pipeline(transaction=False)
        for job_id in old:
            pipe.exists(self.job_key(job_id))
        gone = [job_id for job_id, exists in zip(old, pipe.execute()) if not exists]
        if gone:
            self.r.zrem(key, *gone)

    def queue_depth(self, model: str) -> int:
        """Interactive jobs of `model` still queued (not yet picked up by a worker)."""
        return int(self.r.zcard(self._queued_key(model)))

    def queued_ids(self, model: str, older_than_s: float = 0.0) -> list[str]:
        """Queued interactive jobs of `model`, oldest first; with `older_than_s`, only those created that long ago."""
        if not older_than_s:
            return self.r.zrange(self._queued_key(model), 0, -1)
        return self.r.zrangebyscore(self._queued_key(model), "-inf", time.time() - older_than_s)

    def never_sent(self, job_ids: list[str]) -> list[str]:
        """Those of `job_ids` still queued that no message was ever sent for (dispatch number 0)."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.job_key(job_id), "status", "dispatch")
        return [job_id for job_id, (status, dispatch) in zip(job_ids, pipe.execute())
                if status == "queued" and not int(dispatch or 0)]

    # ---- transitions ------------------------------------------------------------------------------------------
    def dispatch(self, job_id: str, *, again: bool = False) -> int | None:
        """The number to put in a new message for a queued job: its first (`again=False`, None if one was sent
        already) or a replacement (`again=True`, None if none was sent): older messages become stale."""
        number = self._dispatch(keys=[self.job_key(job_id)], args=["again" if again else "first"])
        return None if number is None else int(number)

    def requeue(self, job_id: str) -> int | None:
        """A running job whose worker died goes back to queued; returns the number for its new message."""
        model = self._model_of(job_id)
        if model is None:
            return None
        number = self._requeue(keys=[self.job_key(job_id), self._queued_key(model)], args=[job_id])
        return None if number is None else int(number)

    def mark_running(self, job_id: str, dispatch: int, worker_id: str) -> Job | None:
        """queued -> running (attempts += 1), leased to `worker_id`; None when the job is not queued (running,
        ended or gone) or `dispatch` is not the number of its newest message: skip it then.
        A job run again after a worker died may carry `cancel_requested`: the caller should honour it."""
        model = self._model_of(job_id)
        if model is None:
            return None
        fields = self._mark_running(keys=[self.job_key(job_id), self._queued_key(model),
                                          self.lease_key(model, worker_id), self.lease_index(model)],
                                    args=[repr(time.time()), job_id, str(int(dispatch)), worker_id])
        if not fields:
            return None
        return Job.from_fields(dict(zip(fields[::2], fields[1::2])))

    def mark_first_token(self, job_id: str) -> None:
        """Record when the first token came out (only the first call counts)."""
        self._first_token(keys=[self.job_key(job_id)], args=[repr(time.time())])

    def finish(self, job_id: str, status: str, *, result: dict | None = None, usage: dict | None = None,
               error: dict | None = None) -> bool:
        """Make the job terminal unless it already is; True if this call won. Starts the retention clock."""
        if status not in TERMINAL:
            raise ValueError(f"finish() needs a terminal status {sorted(TERMINAL)}, got {status!r}")
        model = self._model_of(job_id)
        if model is None:
            return False
        won = self._finish(
            keys=[self.job_key(job_id), self.stream_key(job_id), self._queued_key(model)],
            args=[status, repr(time.time()), self.retention_seconds, _dump(result), _dump(usage), _dump(error),
                  job_id, self.done_channel(job_id), _dump({"type": STREAM_END, "status": status}), STREAM_MAXLEN],
        )
        return bool(won)

    def request_cancel(self, job_id: str) -> str:
        """queued -> "cancelled" (terminal at once); running -> "cancelling" (flag set, id published on the
        cancel channel); terminal -> that status unchanged; "not_found" if there is no such job."""
        model = self._model_of(job_id)
        if model is None:
            return "not_found"
        return str(self._cancel(
            keys=[self.job_key(job_id), self.stream_key(job_id), self._queued_key(model)],
            args=[repr(time.time()), self.retention_seconds, job_id, self.done_channel(job_id),
                  _dump({"type": STREAM_END, "status": "cancelled"}), STREAM_MAXLEN, self.cancel_channel],
        ))

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(self.job_key(job_id), "cancel_requested") == "1"

    def record_webhook(self, job_id: str, event: str, status: str, attempts: int, last_error: str | None = None,
                       *, key: str | None = None, **extra: Any) -> bool:
        """Record how the webhook of `event` ended ("delivered" or "failed") in the job's `webhook_deliveries`
        (or in the hash at `key`, e.g. a batch's); False if it is gone (expired). `extra` (e.g. webhook_id,
        status_code) is stored alongside."""
        if status not in ("delivered", "failed"):
            raise ValueError(f"webhook delivery status must be delivered or failed, got {status!r}")
        outcome = {"status": status, "attempts": int(attempts), "last_error": last_error, "at": time.time(), **extra}
        return bool(self._record_webhook(keys=[key or self.job_key(job_id)], args=[event, _dump(outcome)]))

    # ---- token streams ----------------------------------------------------------------------------------------
    def append_stream(self, job_id: str, event: dict) -> None:
        """Append one event to the job's stream (and keep the stream from outliving the retention period)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.xadd(self.stream_key(job_id), {"data": _dump(event)}, maxlen=STREAM_MAXLEN, approximate=True)
        pipe.expire(self.stream_key(job_id), self.retention_seconds)
        pipe.execute()

    def read_stream(self, job_id: str, last_id: str = "0", block_ms: int = 0,
                    count: int | None = None) -> list[tuple[str, dict]]:
        """Events after `last_id`; waits up to `block_ms` for one (0 = don't wait, unlike Redis' BLOCK 0)."""
        reply = self.r.xread({self.stream_key(job_id): last_id}, count=count, block=block_ms or None)
        if not reply:
            return []
        return [(entry_id, json.loads(fields["data"])) for entry_id, fields in reply[0][1]]

    def wait_for_terminal(self, job_id: str, timeout_s: float) -> Job | None:
        """Long-poll: the job as soon as it is terminal, or as it is when `timeout_s` runs out (None if gone)."""
        deadline = time.monotonic() + timeout_s
        # Take the stream position *before* reading the status: an end event written after the read is then
        # still ahead of `last_id`, so it cannot slip between the check and the blocking read.
        newest = self.r.xrevrange(self.stream_key(job_id), count=1)
        last_id = newest[0][0] if newest else "0-0"
        job = self.get(job_id)
        while job is not None and job.status not in TERMINAL:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                break
            # Blocking reads wake only on new events: no polling loop. Token events just move the cursor;
            # the record is re-read on the end event, or once per quiet chunk as a safety net.
            events = self.read_stream(job_id, last_id, block_ms=min(remaining_ms, _BLOCK_CHUNK_MS), count=1000)
            if events:
                last_id = events[-1][0]
            if not events or any(event.get("type") == STREAM_END for _, event in events):
                job = self.get(job_id)
        return job

    # ---- worker registry --------------------------------------------------------------------------------------
    def announce_worker(self, worker_id: str, info: dict, ttl_s: int) -> None:
        """Heartbeat: the worker serving `info["model"]` is alive for `ttl_s` more seconds."""
        model, now = info["model"], time.time()
        record = {**info, "worker_id": worker_id, "last_seen": now}
        pipe = self.r.pipeline(transaction=True)
        pipe.set(f"{self.prefix}:worker:{model}:{worker_id}", _dump(record), px=max(1, int(ttl_s * 1000)))
        pipe.zadd(f"{self.prefix}:workers:{model}", {worker_id: now + ttl_s})
        pipe.sadd(f"{self.prefix}:models", model)
        pipe.execute()

    def workers(self, model: str | None = None) -> list[dict]:
        """Live workers (of one model, or of all), by model then worker id."""
        names = [model] if model is not None else sorted(self.r.smembers(f"{self.prefix}:models"))
        live: list[dict] = []
        for name in names:
            index = f"{self.prefix}:workers:{name}"
            # Pruning by lease expiry (not by a missing key) cannot undo a heartbeat that lands meanwhile.
            self.r.zremrangebyscore(index, "-inf", time.time())
            ids = sorted(self.r.zrange(index, 0, -1))
            values = self.r.mget([f"{self.prefix}:worker:{name}:{wid}" for wid in ids]) if ids else []
            live.extend(json.loads(value) for value in values if value is not None)
        return live

    def known_models(self) -> set[str]:
        """Every model a worker has ever announced, live or not (tells "no worker now" from "no such model")."""
        return set(self.r.smembers(f"{self.prefix}:models"))

    def models(self) -> dict[str, list[dict]]:
        """Model name -> its live workers' infos; models without a live worker are left out."""
        served: dict[str, list[dict]] = {}
        for info in self.workers():
            served.setdefault(info["model"], []).append(info)
        return served
