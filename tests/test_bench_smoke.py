"""The CPU benchmark script still runs end to end (tiny model, --quick); its numbers are not checked."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "cpu_engine_vs_hf.py"


def test_bench_quick_runs_and_prints_both_rows():
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HF generate, static batches" in result.stdout
    assert "inferq continuous batching" in result.stdout
    assert "greedy agreement" in result.stdout
