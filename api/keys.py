"""Every Redis key of the job store, in one place (files, batches and lanes add their own beside them).

  {p}:job:{id}                  hash, the job record (fields: see api/job_record.py); TTL = retention once terminal
  {p}:job:{id}:stream           stream of the job's events (api/streams.py), each entry's JSON under "data"
  {p}:job:{id}:progress         list of the job's output tokens so far, each entry a JSON {choice index: [token ids]}
                                of the tokens since the entry before (worker/output_writer.py): what a rerun resumes
  {p}:job:{id}:done             pub/sub channel; the terminal status is published there when the job ends
  {p}:idem:{owner}:{key}        idempotency key -> job id (TTL = retention)
  {p}:owner:{owner}:jobs        sorted set of the owner's job ids, score = created_at
  {p}:queued:{model}            sorted set of queued interactive job ids of one model (queue depth), score =
                                created_at; bulk (batch) jobs wait in the bulk lane instead (api/lanes.py)
  {p}:open_interactive:{model}  sorted set of the interactive jobs of one model that have not ended (queued or
                                running), score = created_at: the bulk lane keeps the interactive reserve free
                                while it is not empty
  {p}:leases:{model}            set of worker ids that may hold leases (recovery looks for dead ones here)
  {p}:leases:{model}:{wid}      set of the job ids running on that worker (a job leaves it when it ends or is
                                queued again, in the same script)
  {p}:ended                     sorted set of jobs that ended and whose aftermath (metrics, batch counts, lanes,
                                webhooks: api/lifecycle.py) is not done yet, score = when a sweeper may do it
  {p}:cancel                    pub/sub channel; job ids whose cancellation was requested while running
  {p}:deltas                    pub/sub channel; job ids whose events someone began to read (their worker writes
                                their text deltas from then on)
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def stream(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:stream"

    def progress(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:progress"

    def done(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:done"

    def idempotency(self, owner: str, key: str) -> str:
        return f"{self.prefix}:idem:{owner}:{key}"

    def owner_jobs(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:jobs"

    def queued(self, model: str) -> str:
        return f"{self.prefix}:queued:{model}"

    def open_interactive(self, model: str) -> str:
        return f"{self.prefix}:open_interactive:{model}"

    def lease(self, model: str, worker_id: str) -> str:
        return f"{self.prefix}:leases:{model}:{worker_id}"

    def lease_index(self, model: str) -> str:
        return f"{self.prefix}:leases:{model}"

    @property
    def lease_prefix(self) -> str:  # + "{model}:{wid}" inside Lua scripts
        return f"{self.prefix}:leases:"

    @property
    def ended(self) -> str:
        return f"{self.prefix}:ended"

    @property
    def cancel(self) -> str:
        return f"{self.prefix}:cancel"

    @property
    def deltas(self) -> str:
        return f"{self.prefix}:deltas"
