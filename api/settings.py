"""Service configuration, read from `INFERQ_*` environment variables.

Every knob of the API, the job store, the GPU workers and the webhook sender lives here so that one environment
file configures the whole deployment. Import-light on purpose: the API must start without torch or the engine.
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_list(value: Any) -> Any:
    """Accept `a,b,c` (the natural shell form) as well as a JSON list for list-valued variables."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    return [part.strip() for part in text.split(",") if part.strip()]


class Settings(BaseSettings):
    """All service settings; each field is set by the environment variable `INFERQ_<FIELD NAME IN CAPITALS>`."""

    model_config = SettingsConfigDict(env_prefix="INFERQ_", extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis holding the job records, token streams and worker registry (also the Celery broker).",
    )
    # NoDecode: pydantic-settings would otherwise insist on JSON for list fields; the validator takes both forms.
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Accepted bearer keys, comma-separated in the environment. Empty list = authentication off.",
    )
    result_retention_seconds: int = Field(
        86400, gt=0, description="How long a finished job's record, result and token stream are kept."
    )
    max_body_bytes: int = Field(1_000_000, gt=0, description="Largest request body the API accepts (413 above).")
    max_file_bytes: int = Field(
        512 * 1024 * 1024, gt=0, description="Largest file `POST /v1/files` accepts (413 above)."
    )
    file_retention_seconds: int = Field(
        30 * 86400, gt=0, description="How long an uploaded or batch-written file is kept after its creation."
    )
    max_queue_depth: int = Field(
        1000, gt=0, description="Queued jobs per model at most; further submissions are refused with 429."
    )
    worker_heartbeat_seconds: int = Field(
        5, gt=0, description="How often a worker re-announces itself; its registry entry lives 3x this long."
    )
    key_prefix: str = Field("inferq", min_length=1, description="Prefix of every Redis key this service writes.")
    webhook_allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Hosts that webhooks may target even if they resolve to private/loopback addresses "
            "(comma-separated, e.g. `127.0.0.1` in tests)."
        ),
    )
    webhook_secret: str = Field(
        "",
        description=(
            "Standard Webhooks signing secret: `whsec_` + base64 of the key bytes (e.g. of 32 random bytes: "
            "`echo whsec_$(openssl rand -base64 32)`); receivers verify with the same string. Deliveries carry "
            "`webhook-signature: v1,<base64 HMAC-SHA256(key, id.timestamp.body)>`. Empty = deliveries are not signed."
        ),
    )
    job_max_attempts: int = Field(
        3, gt=0, description="Runs of a job at most: a worker that dies or a task that fails queues it again until "
                             "then; after the last run it fails with a server error.",
    )
    resume_checkpoint_tokens: int = Field(
        32, ge=0, description="A job run again (its worker died) resumes from the output tokens saved before: a "
                              "job that does not stream saves them every this many tokens (a streaming job with "
                              "every delta). 0: nothing is saved, and a rerun starts over.",
    )
    api_redis_connections: int = Field(
        2048, gt=0, description="Redis connections of one API process at most (each waiting request or stream "
                                "holds one while it waits); requests past it wait for a free one.",
    )
    webhook_max_attempts: int = Field(5, gt=0, description="Delivery attempts per webhook before giving up.")
    webhook_backoff_seconds: float = Field(
        1.0, ge=0, description="Base delay between webhook attempts; doubled after each failure."
    )
    visibility_timeout_seconds: int = Field(
        43200,
        gt=0,
        description="Seconds before the broker redelivers an unacknowledged job (must exceed the longest job).",
    )

    @field_validator("api_keys", "webhook_allow_hosts", mode="before")
    @classmethod
    def _lists_from_strings(cls, value: Any) -> Any:
        return _split_list(value)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once (tests call `get_settings.cache_clear()` after changing env)."""
    return Settings()
