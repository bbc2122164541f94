"""Shared fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo checkpoint (trained tokenizer + random weights), written once per test session."""
    from engine.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo"), size="tiny")
