"""Batches (OpenAI's Batch API): one record per batch, each valid input line run as a job, results gathered as
the jobs end, then written as output and error files.

Keys, under the job store's prefix:
  {p}:batch:{id}           hash: the batch record and its counters (total, completed, failed, done, and the
                           tokens of its lines: input_tokens, output_tokens), and the model of its first line
  {p}:batch:{id}:jobs      set of the batch's job ids (for cancel and expiry)
  {p}:batch:{id}:out       list of output lines (JSON), one per succeeded line
  {p}:batch:{id}:err       list of error lines (JSON): invalid, failed, cancelled or expired lines
  {p}:owner:{owner}:batches  sorted set of the owner's batch ids by creation time

Lines run at a lower priority than interactive requests, so the engine schedules interactive work first.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field, fields

from api.store import JobStore

BATCH_ID_PREFIX = "batch_"
BATCH_ID = re.compile(BATCH_ID_PREFIX + r"[0-9a-f]{32}")

ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat.completions"}
BATCH_PRIORITY = -10
_WINDOW = re.compile(r"^(\d+)([smh])$")
_UNITS = {"s": 1, "m": 60, "h": 3600}
MAX_WINDOW_S = 7 * 24 * 3600
_TIMES = ("created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
          "cancelling_at", "cancelled_at")
_COUNTS = ("total", "completed", "failed", "done", "input_tokens", "output_tokens", "cached_tokens")
# Status -> the statuses it may be entered from (compare-and-set in Lua: one winner for racing writers).
_TRANSITIONS = {"in_progress": ("validating",), "failed": ("validating",),
                "cancelling": ("validating", "in_progress"), "finalizing": ("in_progress", "cancelling"),
                "completed": ("finalizing",), "cancelled": ("finalizing",), "expired": ("finalizing",)}
_SET_STATUS_LUA = """
local st = redis.call('HGET', KEYS[1], 'status')
for i = 3, #ARGV do
  if st == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[1] .. '_at', ARGV[2])
    return st
  end
end
return false
"""

# KEYS: batch, recorded set, out or err list. ARGV: line key, line JSON, counter, input tokens, output tokens,
# cached input tokens.
# Idempotent per line key.
_RECORD_LINE_LUA = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[3], ARGV[2])
  redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
  redis.call('HINCRBY', KEYS[1], 'done', 1)
  redis.call('HINCRBY', KEYS[1], 'input_tokens', ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'output_tokens', ARGV[5])
  redis.call('HINCRBY', KEYS[1], 'cached_tokens', ARGV[6])
end
return {redis.call('HGET', KEYS[1], 'done'), redis.call('HGET', KEYS[1], 'total')}
"""

# KEYS: batch's job set, batch, job. ARGV: job id. The batch's model is its first line's (OpenAI's batches are of
# one model).
_ADD_JOB_LUA = """
redis.call('SADD', KEYS[1], ARGV[1])
local model = redis.call('HGET', KEYS[3], 'model')
if model then redis.call('HSETNX', KEYS[2], 'model', model) end
"""


def parse_window(window: str) -> int:
    """"24h", "30m", "90s" -> seconds (OpenAI accepts only "24h"; shorter windows serve tests and tight SLAs)."""
    match = _WINDOW.match(window or "")
    if not match or not 0 < int(match[1]) * _UNITS[match[2]] <= MAX_WINDOW_S:
        raise ValueError(f"completion_window must look like 24h, 30m or 90s (at most 7 days), got {window!r}")
    return int(match[1]) * _UNITS[match[2]]


@dataclass(slots=True)
class Batch:
    id: str
    owner: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str = "validating"
    metadata: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    webhook: str | None = None
    model: str | None = None
    # Outcome of each batch webhook event, as job webhooks keep theirs: {"completed": {"status", "attempts", ...}}
    webhook_deliveries: dict | None = None
    expiring: bool = False
    created_at: int | None = None
    expires_at: int | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    done: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0  # of input_tokens, those the engine's prefix cache held

    def public(self) -> dict:
        body = {"id": self.id, "object": "batch", "endpoint": self.endpoint, "input_file_id": self.input_file_id,
                "completion_window": self.completion_window, "status": self.status,
                "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
                "errors": {"object": "list", "data": self.errors} if self.errors else None,
                "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
                "metadata": self.metadata or None, "model": self.model,
                # OpenAI's BatchUsage, summed over the lines that ended (reasoning tokens: none here).
                "usage": {"input_tokens": self.input_tokens,
                          "input_tokens_details": {"cached_tokens": self.cached_tokens},
                          "output_tokens": self.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": self.input_tokens + self.output_tokens}}
        if self.webhook:
            body["webhook_deliveries"] = self.webhook_deliveries or {}
        return body | {name: getattr(self, name) for name in _TIMES}

    @classmethod
    def from_fields(cls, f: dict[str, str]) -> Batch | None:
        if not f or "id" not in f:
            return None
        values: dict = {}
        for item in fields(cls):
            raw = f.get(item.name)
            if raw is None or raw == "":
                continue
            if item.name in _TIMES or item.name in _COUNTS:
                values[item.name] = int(float(raw))
            elif item.name in ("metadata", "errors", "webhook_deliveries"):
                values[item.name] = json.loads(raw)
            elif item.name == "expiring":
                values[item.name] = raw == "1"
            else:
                values[item.name] = raw
        return cls(**values)


class BatchStore:
    def __init__(self, store: JobStore) -> None:
        self.jobs = store
        self.r = store.r
        self.prefix = store.prefix
        self._set_status = self.r.register_script(_SET_STATUS_LUA)
        self._record = self.r.register_script(_RECORD_LINE_LUA)
        self._add_job = self.r.register_script(_ADD_JOB_LUA)

    def key(self, batch_id: str, part: str = "") -> str:
        return f"{self.prefix}:batch:{batch_id}" + (f":{part}" if part else "")

    def _owner_key(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:batches"

    def create(self, owner: str, endpoint: str, input_file_id: str, completion_window: str,
               metadata: dict | None, webhook: str | None = None) -> Batch:
        now = int(time.time())
        batch = Batch(id=f"{BATCH_ID_PREFIX}{uuid.uuid4().hex}", owner=owner, endpoint=endpoint, input_file_id=input_file_id,
                      completion_window=completion_window, metadata=metadata or {}, created_at=now,
                      expires_at=now + parse_window(completion_window), webhook=webhook)
        record = {"id": batch.id, "owner": owner, "endpoint": endpoint, "input_file_id": input_file_id,
                  "completion_window": completion_window, "status": batch.status,
                  "metadata": json.dumps(batch.metadata), "created_at": now, "expires_at": batch.expires_at,
                  "total": 0, "completed": 0, "failed": 0, "done": 0, "webhook": webhook or ""}
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.key(batch.id), mapping=record)
        pipe.zadd(self._owner_key(owner), {batch.id: now})
        pipe.execute()
        return batch

    def get(self, batch_id: str, owner: str | None = None) -> Batch | None:
        if BATCH_ID.fullmatch(batch_id) is None:  # another kind of key, e.g. `batch_<id>:jobs`: no batch
            return None
        batch = Batch.from_fields(self.r.hgetall(self.key(batch_id)))
        if batch is None or (owner is not None and batch.owner != owner):
            return None
        return batch

    def list(self, owner: str, limit: int, after: str | None) -> tuple[list[Batch], bool]:
        key = self._owner_key(owner)
        start = 0
        if after:
            rank = self.r.zrevrank(key, after)
            start = 0 if rank is None else rank + 1
        ids = self.r.zrevrange(key, start, start + limit)
        batches = [b for b in (self.get(i) for i in ids[:limit]) if b is not None]
        return batches, len(ids) > limit

    def set_status(self, batch_id: str, status: str) -> str | None:
        """Move to `status` if the batch is in a state that allows it; returns the previous status, or None."""
        previous = self._set_status(keys=[self.key(batch_id)],
                                    args=[status, int(time.time()), *_TRANSITIONS[status]])
        return previous or None

    def update(self, batch_id: str, **values) -> None:
        self.r.hset(self.key(batch_id), mapping={k: json.dumps(v) if isinstance(v, (list, dict)) else v
                                                 for k, v in values.items()})

    def add_job(self, batch_id: str, job_id: str) -> None:
        self._add_job(keys=[self.key(batch_id, "jobs"), self.key(batch_id), self.jobs.keys.job(job_id)],
                      args=[job_id])

    def job_ids(self, batch_id: str) -> set[str]:
        return self.r.smembers(self.key(batch_id, "jobs"))

    def record_line(self, batch_id: str, line_key: str, line: dict, ok: bool,
                    usage: dict | None = None) -> tuple[int, int]:
        """Store one line's outcome, once per line_key (a job id, or the input line number) however often it is
        reported, and its job's token usage; returns (lines done, total). total is 0 until every line is queued."""
        usage = usage or {}
        done, total = self._record(keys=[self.key(batch_id), self.key(batch_id, "recorded"),
                                         self.key(batch_id, "out" if ok else "err")],
                                   args=[line_key, json.dumps(line), "completed" if ok else "failed",
                                         int(usage.get("prompt_tokens") or 0),
                                         int(usage.get("completion_tokens") or 0),
                                         int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)])
        return int(done), int(total or 0)

    def iter_lines(self, batch_id: str, part: str, page: int = 1000):
        """The stored output ("out") or error ("err") lines, a page at a time (never all in memory)."""
        key = self.key(batch_id, part)
        for start in range(0, self.r.llen(key), page):
            for line in self.r.lrange(key, start, start + page - 1):
                yield line.encode() + b"\n"


def output_line(job, custom_id: str) -> tuple[dict, bool]:
    """OpenAI's batch output/error line for a finished job; True when it belongs in the output file."""
    line_id = f"batch_req_{job.id.removeprefix('job_')}"
    if job.status == "succeeded":
        return {"id": line_id, "custom_id": custom_id, "error": None,
                "response": {"status_code": 200, "request_id": job.id, "body": job.result}}, True
    if job.status == "failed":
        error = dict(job.error or {})
        status = int(error.pop("status_code", 500))
        return {"id": line_id, "custom_id": custom_id, "error": None,
                "response": {"status_code": status, "request_id": job.id, "body": {"error": error}}}, False
    return error_line(custom_id, "batch_cancelled", "the batch was cancelled before this request finished",
                      line_id), False


def error_line(custom_id: str | None, code: str, message: str, line_id: str | None = None) -> dict:
    return {"id": line_id or f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}
