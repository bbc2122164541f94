"""Pieces of OpenAI's reply vocabulary that the API (stream chunks, batch objects) and the worker (result bodies)
both write: one definition, so a stream and a stored result never disagree. Nothing here imports torch or the
engine."""
from __future__ import annotations

from importlib import metadata

try:
    VERSION = metadata.version("inferq")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "0.0.0"

# OpenAI's `system_fingerprint` names the backend configuration that produced a reply; ours is the build (API and
# workers are one code base, so the API can stamp stream chunks with the same value the worker puts in results).
SYSTEM_FINGERPRINT = f"fp_inferq_{VERSION}"


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens whose KV the engine's prefix cache already held."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def finish_reason(reason: str | None) -> str | None:
    """The engine's finish reason in OpenAI's vocabulary: an aborted choice (a cancel, a client gone) stopped."""
    return "stop" if reason == "abort" else reason
