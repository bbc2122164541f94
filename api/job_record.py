"""A job as the store keeps it: its states, its record, and how the record maps onto a Redis hash."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any


class JobStatus(str, Enum):
    """queued -> running -> succeeded | failed | cancelled; a running job whose worker died or whose task raised
    goes back to queued (bounded attempts). Terminal states are never left."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    __str__ = str.__str__  # f-strings and logs show "queued", not "JobStatus.QUEUED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ENDPOINTS = frozenset({"completions", "chat.completions"})
_TIMES = ("created_at", "started_at", "first_token_at", "finished_at")
_JSON_OR_NONE = ("webhook", "result", "usage", "error", "webhook_deliveries")


JOB_ID = re.compile(r"job_[0-9a-f]{32}")  # what JobStore.create mints: any other id names no job


def is_job_id(value: str) -> bool:
    """Checked before an id reaches a Redis key: `job_<id>:stream` would name another kind of key."""
    return JOB_ID.fullmatch(value) is not None


@dataclass(slots=True)
class Job:
    """One job record, decoded from its Redis hash."""

    id: str
    owner: str
    model: str
    endpoint: str
    request: dict
    status: JobStatus = JobStatus.QUEUED
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
    stream: bool = False  # its text deltas are written to its stream as they come (it streams, or has a reader)
    worker: str = ""  # the worker that runs it (or ran it last)
    # Output tokens its latest attempt took over from the attempts before it (a resume after its worker died).
    resumed_tokens: int = 0
    result: dict | None = None
    usage: dict | None = None
    error: dict | None = None
    cancel_requested: bool = False
    # Webhook outcome per event: {"completed": {"status": "delivered"|"failed", "attempts", "last_error", ...}}
    webhook_deliveries: dict | None = None

    def public(self) -> dict:
        """JSON-able view for API responses: every field but the owner hash and the worker's name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("owner", "worker")}

    def to_fields(self) -> dict[str, str]:
        """The Redis hash fields ("" for None: hashes hold strings only)."""
        out = {"id": self.id, "owner": self.owner, "model": self.model, "endpoint": self.endpoint,
               "request": dump(self.request), "status": self.status.value, "priority": str(int(self.priority)),
               "metadata": dump(self.metadata or {}), "attempts": str(int(self.attempts)),
               "dispatch": str(int(self.dispatch)), "bulk": "1" if self.bulk else "0",
               "stream": "1" if self.stream else "0", "worker": self.worker,
               "resumed_tokens": str(int(self.resumed_tokens)),
               "cancel_requested": "1" if self.cancel_requested else "0"}
        out.update({name: dump(getattr(self, name)) for name in _JSON_OR_NONE})
        out.update({name: "" if getattr(self, name) is None else repr(getattr(self, name)) for name in _TIMES})
        return out

    @classmethod
    def from_fields(cls, f: dict[str, str]) -> Job | None:
        """Decode a hash; None for an empty one (missing or expired key)."""
        if not f or "id" not in f:
            return None
        return cls(id=f["id"], owner=f.get("owner", ""), model=f.get("model", ""), endpoint=f.get("endpoint", ""),
                   request=load(f.get("request")) or {}, status=JobStatus(f.get("status") or "queued"),
                   priority=int(f.get("priority") or 0), metadata=load(f.get("metadata")) or {},
                   attempts=int(f.get("attempts") or 0), dispatch=int(f.get("dispatch") or 0),
                   bulk=f.get("bulk") == "1", stream=f.get("stream") == "1", worker=f.get("worker", ""),
                   resumed_tokens=int(f.get("resumed_tokens") or 0),
                   cancel_requested=f.get("cancel_requested") == "1",
                   **{name: load(f.get(name)) for name in _JSON_OR_NONE},
                   **{name: float(f[name]) if f.get(name) else None for name in _TIMES})

    @classmethod
    def from_flat(cls, flat: list) -> Job | None:
        """Decode a Lua script's HGETALL reply (a flat [field, value, ...] list)."""
        return cls.from_fields(dict(zip(flat[::2], flat[1::2]))) if flat else None


def owner_id(api_key: str | None) -> str:
    """The owner of jobs submitted with `api_key`: its SHA-256 (keys are never stored), or "anonymous"."""
    if not api_key:
        return "anonymous"
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def dump(value: Any) -> str:
    return "" if value is None else json.dumps(value, separators=(",", ":"))


def load(text: str | None) -> Any:
    return json.loads(text) if text else None
