"""The job store: job records and their transitions, in Redis (keys: api/keys.py; records: api/job_record.py;
event streams: api/streams.py; worker registry: api/registry.py).

Every message that asks a worker to run a job carries the job's `dispatch` number; sending again (after a worker
died or a task failed) increments it, so a worker runs a job only from its newest message and never twice at once.

Status transitions are Lua scripts, so that racing writers (cancel vs finish, duplicate deliveries) have exactly
one winner and a terminal status is never overwritten. Every script that ends a job also drops it from its worker's
lease set and adds it to the `ended` set, so a job's aftermath (api/lifecycle.py) is found even if the process
that ended it dies before doing it.

Sync redis-py on a blocking connection pool sized to the caller's concurrency: a thread past the pool's size waits
for a connection instead of failing (redis-py 8's plain pool raises past 100). Connection errors are retried with
backoff, so a Redis restart is ridden out rather than failing every caller.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from api.job_record import ENDPOINTS, TERMINAL, Job, JobStatus, dump, is_job_id
from api.keys import Keys
from api.registry import WorkerRegistry
from api.streams import STREAM_MAXLEN, parse_read

SETTLE_GRACE_S = 10.0  # an ended job's aftermath is left to whoever ended it for this long, then a sweeper does it

# ---- Lua ------------------------------------------------------------------------------------------------------
# Every script that may end a job takes KEYS = job, stream, queued set, open interactive set, progress list (an
# ended job has nothing to resume: deleted) and starts its ARGV with END_ARGS:
# now, ttl, job id, done channel, stream maxlen, lease key prefix, ended set, settle-at.
_END_LUA = """
local function end_job(status)
  local model = redis.call('HGET', KEYS[1], 'model')
  local worker = redis.call('HGET', KEYS[1], 'worker')
  redis.call('HSET', KEYS[1], 'status', status, 'finished_at', ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[3])
  redis.call('ZREM', KEYS[4], ARGV[3])
  if worker and worker ~= '' then redis.call('SREM', ARGV[6] .. model .. ':' .. worker, ARGV[3]) end
  redis.call('ZADD', ARGV[7], ARGV[8], ARGV[3])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'data', cjson.encode({type='end', status=status}))
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  redis.call('DEL', KEYS[5])
  redis.call('PUBLISH', ARGV[4], status)
end
local function is_terminal(st) return st == 'succeeded' or st == 'failed' or st == 'cancelled' end
"""
RECENT_JOBS = 50  # interactive jobs per owner in its recent-jobs index (the dashboard's list: api/dashboard.py)

# KEYS: job, owner index, queued set, idempotency key ("-" = none), open interactive set ("-" = bulk), the owner's
# recent interactive jobs ("-" = bulk). ARGV: id, created, idem ttl (the retention), has idem, fields...
_CREATE_LUA = """
if ARGV[4] == '1' then
  local existing = redis.call('GET', KEYS[4])
  if existing then return {0, existing} end
  redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[3])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if KEYS[3] ~= '-' then
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
  redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
  redis.call('ZADD', KEYS[6], ARGV[2], ARGV[1])
  redis.call('ZREMRANGEBYRANK', KEYS[6], 0, -KEEP_PLUS_ONE)
  redis.call('EXPIRE', KEYS[6], ARGV[3])
end
return {1, ARGV[1]}
""".replace("KEEP_PLUS_ONE", str(RECENT_JOBS + 1))
# KEYS: job. ARGV: "first" (never sent yet) or "again" (sent before). A queued job's next dispatch number, or nil.
_DISPATCH_LUA = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return nil end
local sent = tonumber(redis.call('HGET', KEYS[1], 'dispatch') or '0') > 0
if (ARGV[1] == 'first') == sent then return nil end
return redis.call('HINCRBY', KEYS[1], 'dispatch', 1)
"""
# KEYS: end keys. ARGV: END_ARGS, error JSON, max attempts.
# A running job that cannot go on where it is (its worker died, its task raised): queued again with a new dispatch
# number, unless a cancel was asked for (it ends cancelled) or it has used its attempts (it ends failed).
# Returns {outcome, dispatch} or nil when it is not running.
_REQUEUE_LUA = _END_LUA + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return nil end
if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'last_error', ARGV[9]) end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  end_job('cancelled')
  return {'cancelled', 0}
end
if tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') >= tonumber(ARGV[10]) then
  redis.call('HSET', KEYS[1], 'error', ARGV[9])
  end_job('failed')
  return {'failed', 0}
end
local model = redis.call('HGET', KEYS[1], 'model')
local worker = redis.call('HGET', KEYS[1], 'worker')
if worker and worker ~= '' then redis.call('SREM', ARGV[6] .. model .. ':' .. worker, ARGV[3]) end
redis.call('HSET', KEYS[1], 'status', 'queued')
if redis.call('HGET', KEYS[1], 'bulk') ~= '1' then
  redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'created_at'), ARGV[3])
end
return {'queued', redis.call('HINCRBY', KEYS[1], 'dispatch', 1)}
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
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[2])
return redis.call('HGETALL', KEYS[1])
"""
# KEYS: job. ARGV: now. Only sets the field when it is still empty (and never resurrects an expired job).
_FIRST_TOKEN_LUA = """
if redis.call('HGET', KEYS[1], 'first_token_at') == '' then redis.call('HSET', KEYS[1], 'first_token_at', ARGV[1]) end
"""
# KEYS: end keys. ARGV: END_ARGS, status, result, usage, error.
_FINISH_LUA = _END_LUA + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st or is_terminal(st) then return 0 end
redis.call('HSET', KEYS[1], 'result', ARGV[10], 'usage', ARGV[11], 'error', ARGV[12])
end_job(ARGV[9])
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
# KEYS: end keys. ARGV: END_ARGS, cancel channel.
_CANCEL_LUA = _END_LUA + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'not_found' end
if st == 'queued' then
  end_job('cancelled')
  return 'cancelled'
end
if st == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  redis.call('PUBLISH', ARGV[9], ARGV[3])
  return 'cancelling'
end
return st
"""
# KEYS: ended set. ARGV: now, grace, count. Ended jobs whose aftermath is due, each pushed back by `grace` (so two
# sweepers do not take the same one at once).
_CLAIM_ENDED_LUA = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[1] + ARGV[2], id) end
return ids
"""


def connect(url: str, max_connections: int = 64, timeout_s: float | None = 30.0, retries: int = 12) -> redis.Redis:
    """A sync client on a blocking pool of `max_connections`: a caller past it waits up to `timeout_s` for a free
    connection. Connection errors are retried with jittered backoff, by default for about 10 s (a Redis restart);
    the API retries less, since it answers 503 while Redis is away."""
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout_s,
                                                 decode_responses=True, health_check_interval=30)
    return redis.Redis(connection_pool=pool,
                       retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=retries),
                       retry_on_error=[redis.ConnectionError, redis.TimeoutError])


class JobStore:
    """Jobs and their transitions; `registry` has the live workers."""

    def __init__(self, redis_client: redis.Redis, prefix: str = "inferq", retention_seconds: int = 86400) -> None:
        self.r = redis_client
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.registry = WorkerRegistry(redis_client, prefix)
        self.retention_seconds = int(retention_seconds)
        self._create = self.r.register_script(_CREATE_LUA)
        self._mark_running = self.r.register_script(_MARK_RUNNING_LUA)
        self._dispatch = self.r.register_script(_DISPATCH_LUA)
        self._requeue = self.r.register_script(_REQUEUE_LUA)
        self._first_token = self.r.register_script(_FIRST_TOKEN_LUA)
        self._finish = self.r.register_script(_FINISH_LUA)
        self._cancel = self.r.register_script(_CANCEL_LUA)
        self._record_webhook = self.r.register_script(_RECORD_WEBHOOK_LUA)
        self._claim_ended = self.r.register_script(_CLAIM_ENDED_LUA)

    @classmethod
    def from_url(cls, url: str, max_connections: int = 64, retries: int = 12, **kw: Any) -> JobStore:
        return cls(connect(url, max_connections, retries=retries), **kw)

    def _model_of(self, job_id: str) -> str | None:
        # The model never changes after create, so reading it outside the scripts is race-free.
        return self.r.hget(self.keys.job(job_id), "model")

    def _end_keys(self, job_id: str, model: str) -> list[str]:
        return [self.keys.job(job_id), self.keys.stream(job_id), self.keys.queued(model),
                self.keys.open_interactive(model), self.keys.progress(job_id)]

    def _end_args(self, job_id: str) -> list:
        now = time.time()
        return [repr(now), self.retention_seconds, job_id, self.keys.done(job_id), STREAM_MAXLEN,
                self.keys.lease_prefix, self.keys.ended, repr(now + SETTLE_GRACE_S)]

    # ---- jobs -------------------------------------------------------------------------------------------------
    def create(self, *, owner: str, model: str, endpoint: str, request: dict, priority: int = 0,
               metadata: dict | None = None, webhook: dict | None = None, idempotency_key: str | None = None,
               bulk: bool = False, stream: bool = False) -> tuple[Job, bool]:
        """Store a new queued job; with an idempotency key already used by this owner, return that job instead.
        `bulk` jobs (batch lines) are not counted in the model's queue depth: the bulk lane holds them.
        `stream`: the worker writes its text deltas to its stream as they come."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}, got {endpoint!r}")
        idem_key = self.keys.idempotency(owner, idempotency_key) if idempotency_key else ""
        for _ in range(2):
            job = Job(id=f"job_{uuid.uuid4().hex}", owner=owner, model=model, endpoint=endpoint, request=request,
                      priority=int(priority), metadata=metadata or {}, webhook=webhook, created_at=time.time(),
                      bulk=bulk, stream=stream)
            interactive = not bulk
            created, job_id = self._create(
                keys=[self.keys.job(job.id), self.keys.owner_jobs(owner),
                      self.keys.queued(model) if interactive else "-", idem_key or "-",
                      self.keys.open_interactive(model) if interactive else "-",
                      self.recent_key(owner) if interactive else "-"],
                args=[job.id, repr(job.created_at), self.retention_seconds, "1" if idem_key else "0", *[part for pair in job.to_fields().items() for part in pair]],
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

    def recent_key(self, owner: str) -> str:
        """{p}:owner:{owner}:recent: sorted set of the owner's newest RECENT_JOBS interactive jobs (batch lines are
        left out: their batch stands for them), score = created_at; kept by the create script, in its step."""
        return f"{self.prefix}:owner:{owner}:recent"

    def get(self, job_id: str, owner: str | None = None) -> Job | None:
        """The job, or None if it does not exist (or expired), is no job id, or belongs to another owner than
        `owner`."""
        if not is_job_id(job_id):
            return None
        job = Job.from_fields(self.r.hgetall(self.keys.job(job_id)))
        if job is None or (owner is not None and job.owner != owner):
            return None
        return job

    def list(self, owner: str, *, limit: int = 20, after: str | None = None,
             status: str | None = None) -> tuple[list[Job], bool]:
        """The owner's jobs newest first, starting after job id `after`; returns (page, has_more)."""
        key = self.keys.owner_jobs(owner)
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
                pipe.hgetall(self.keys.job(job_id))
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
        key = self.keys.owner_jobs(owner)
        old = self.r.zrangebyscore(key, "-inf", time.time() - self.retention_seconds, start=0, num=count)
        if not old:
            return
        pipe = self.r.pipeline(transaction=False)
        for job_id in old:
            pipe.exists(self.keys.job(job_id))
        gone = [job_id for job_id, exists in zip(old, pipe.execute()) if not exists]
        if gone:
            self.r.zrem(key, *gone)

    def queue_depth(self, model: str) -> int:
        """Interactive jobs of `model` still queued (not yet picked up by a worker)."""
        return int(self.r.zcard(self.keys.queued(model)))

    def interactive_open(self, model: str) -> bool:
        """Whether interactive work for `model` is queued or running (what the bulk lane leaves room for)."""
        return bool(self.r.zcard(self.keys.open_interactive(model)))

    def prune_open_interactive(self, model: str, older_than_s: float = 60.0, count: int = 100) -> int:
        """Drop ids from the open interactive set whose job ended or is gone (a script that ends a job removes
        it; this repairs what an older version, or a deleted record, left behind). Returns how many."""
        key = self.keys.open_interactive(model)
        ids = self.r.zrangebyscore(key, "-inf", time.time() - older_than_s, start=0, num=count)
        if not ids:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(self.keys.job(job_id), "status")
        stale = [job_id for job_id, status in zip(ids, pipe.execute()) if status is None or status in TERMINAL]
        if stale:
            self.r.zrem(key, *stale)
        return len(stale)

    def queued_ids(self, model: str, older_than_s: float = 0.0) -> list[str]:
        """Queued interactive jobs of `model`, oldest first; with `older_than_s`, only those created that long ago."""
        if not older_than_s:
            return self.r.zrange(self.keys.queued(model), 0, -1)
        return self.r.zrangebyscore(self.keys.queued(model), "-inf", time.time() - older_than_s)

    def never_sent(self, job_ids: list[str]) -> list[str]:
        """Those of `job_ids` still queued that no message was ever sent for (dispatch number 0)."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.keys.job(job_id), "status", "dispatch")
        return [job_id for job_id, (status, dispatch) in zip(job_ids, pipe.execute())
                if status == JobStatus.QUEUED and not int(dispatch or 0)]

    def leased(self, model: str, worker_id: str) -> set[str]:
        """The jobs recorded as running on that worker."""
        return self.r.smembers(self.keys.lease(model, worker_id))

    # ---- transitions ------------------------------------------------------------------------------------------
    def dispatch(self, job_id: str, *, again: bool = False) -> int | None:
        """The number to put in a new message for a queued job: its first (`again=False`, None if one was sent
        already) or a replacement (`again=True`, None if none was sent): older messages become stale."""
        number = self._dispatch(keys=[self.keys.job(job_id)], args=["again" if again else "first"])
        return None if number is None else int(number)

    def requeue(self, job_id: str, error: dict | None = None, max_attempts: int = 3) -> tuple[str, int] | None:
        """A running job that cannot go on where it is: ("queued", the number for its new message), or
        ("cancelled", 0) if a cancel was asked, or ("failed", 0) with `error` once it ran `max_attempts` times;
        None if it is not running."""
        model = self._model_of(job_id)
        if model is None:
            return None
        reply = self._requeue(keys=self._end_keys(job_id, model),
                              args=[*self._end_args(job_id), dump(error), int(max_attempts)])
        return None if reply is None else (str(reply[0]), int(reply[1]))

    def mark_running(self, job_id: str, dispatch: int, worker_id: str) -> Job | None:
        """queued -> running (attempts += 1), leased to `worker_id`; None when the job is not queued (running,
        ended or gone) or `dispatch` is not the number of its newest message: skip it then."""
        model = self._model_of(job_id)
        if model is None:
            return None
        flat = self._mark_running(keys=[self.keys.job(job_id), self.keys.queued(model),
                                        self.keys.lease(model, worker_id), self.keys.lease_index(model)],
                                  args=[repr(time.time()), job_id, str(int(dispatch)), worker_id])
        return Job.from_flat(flat)

    def mark_first_token(self, job_id: str, pipe=None) -> None:
        """Record when the first token came out (only the first call counts)."""
        self._first_token(keys=[self.keys.job(job_id)], args=[repr(time.time())], client=pipe)

    def finish(self, job_id: str, status: str, *, result: dict | None = None, usage: dict | None = None,
               error: dict | None = None, model: str | None = None, pipe=None) -> bool:
        """Make the job terminal unless it already is; True if this call won. Starts the retention clock.
        With `pipe`, the call is queued on that pipeline and its reply (1 = won) comes from pipe.execute()."""
        if status not in TERMINAL:
            raise ValueError(f"finish() needs a terminal status {sorted(TERMINAL)}, got {status!r}")
        model = model or self._model_of(job_id)
        if model is None:
            return False
        won = self._finish(keys=self._end_keys(job_id, model),
                           args=[*self._end_args(job_id), str(status), dump(result), dump(usage), dump(error)],
                           client=pipe)
        return won if pipe is not None else bool(won)

    def request_cancel(self, job_id: str) -> str:
        """queued -> "cancelled" (terminal at once); running -> "cancelling" (flag set, id published on the
        cancel channel); terminal -> that status unchanged; "not_found" if there is no such job."""
        model = self._model_of(job_id)
        if model is None:
            return "not_found"
        return str(self._cancel(keys=self._end_keys(job_id, model), args=[*self._end_args(job_id), self.keys.cancel]))

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(self.keys.job(job_id), "cancel_requested") == "1"

    def requests_while_starting(self, job_id: str) -> tuple[bool, bool]:
        """(cancel requested, deltas requested), in one read: what a task checks once its job is in the engine
        (a request published before then reached no listener that knew the job)."""
        cancel, stream = self.r.hmget(self.keys.job(job_id), ["cancel_requested", "stream"])
        return cancel == "1", stream == "1"

    def claim_ended(self, count: int = 100) -> list[str]:
        """Ended jobs whose aftermath nobody did within the grace period (their process died or failed)."""
        return list(self._claim_ended(keys=[self.keys.ended], args=[repr(time.time()), SETTLE_GRACE_S, count]))

    def settled(self, job_id: str) -> None:
        """The job's aftermath is done."""
        self.r.zrem(self.keys.ended, job_id)

    def record_webhook(self, job_id: str, event: str, status: str, attempts: int, last_error: str | None = None,
                       *, key: str | None = None, **extra: Any) -> bool:
        """Record how the webhook of `event` ended ("delivered" or "failed") in the job's `webhook_deliveries`
        (or in the hash at `key`, e.g. a batch's); False if it is gone (expired). `extra` (e.g. webhook_id,
        status_code) is stored alongside."""
        if status not in ("delivered", "failed"):
            raise ValueError(f"webhook delivery status must be delivered or failed, got {status!r}")
        outcome = {"status": status, "attempts": int(attempts), "last_error": last_error, "at": time.time(), **extra}
        return bool(self._record_webhook(keys=[key or self.keys.job(job_id)], args=[event, dump(outcome)]))

    # ---- event streams (written by the worker; api/streams.py reads them for the API) ------------------------
    def append_stream(self, job_id: str, event: dict, pipe=None, expire: bool = True) -> None:
        """Append one event to the job's stream; `expire` keeps the stream from outliving the retention period
        (once per job is enough: a running job's stream is renewed when it ends)."""
        target = pipe if pipe is not None else self.r.pipeline(transaction=False)
        target.xadd(self.keys.stream(job_id), {"data": dump(event)}, maxlen=STREAM_MAXLEN, approximate=True)
        if expire:
            target.expire(self.keys.stream(job_id), self.retention_seconds)
        if pipe is None:
            target.execute()

    def save_progress(self, job_id: str, tokens: dict[int, list], pipe, expire: bool = True) -> None:
        """Queue on `pipe` the append of a running job's new output tokens to its progress list (what a rerun
        resumes from: read_progress): per choice index, [position of the first, token ids]. The positions make a
        save sent twice harmless. `expire` as in append_stream."""
        key = self.keys.progress(job_id)
        pipe.rpush(key, dump(tokens))
        if expire:
            pipe.expire(key, self.retention_seconds)

    def read_progress(self, job_id: str) -> dict[int, list[int]]:
        """Per choice index, the output tokens saved so far (none once the job has ended)."""
        tokens: dict[int, list[int]] = {}
        for entry in self.r.lrange(self.keys.progress(job_id), 0, -1):
            for index, (start, ids) in json.loads(entry).items():
                have = tokens.setdefault(int(index), [])
                if start <= len(have):  # a save sent twice overlaps what is there (a gap never comes)
                    have.extend(ids[len(have) - start:])
        return tokens

    def record_resume(self, job_id: str, num_tokens: int) -> None:
        self.r.hset(self.keys.job(job_id), "resumed_tokens", num_tokens)

    def read_stream(self, job_id: str, last_id: str = "0", block_ms: int = 0,
                    count: int | None = None) -> list[tuple[str, dict]]:
        """Events after `last_id`; waits up to `block_ms` for one (0 = don't wait, unlike Redis' BLOCK 0)."""
        return parse_read(self.r.xread({self.keys.stream(job_id): last_id}, count=count, block=block_ms or None))
