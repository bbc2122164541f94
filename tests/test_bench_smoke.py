"""The benchmark scripts that run on the CPU still run end to end (tiny models); their speed is not checked."""
from __future__ import annotations

import json
import os
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


def test_prefix_caching_bench_runs_and_finds_the_shared_prompt():
    """bench/prefix_caching.py on a tiny model: it prints its table, and the shared-prefix run with caching on hits."""
    script = SCRIPT.parent / "prefix_caching.py"
    result = subprocess.run([sys.executable, str(script), "--shape", "tiny", "--device", "cpu", "--requests", "8",
                             "--system-tokens", "64", "--rounds", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| shared prefix")]
    hit_rate = {row[3].strip(): float(row[7]) for row in rows}
    assert hit_rate["on"] > 0.5 and hit_rate["off"] == 0


def test_cpu_low_bit_bench_runs_and_tables_every_format():
    """bench/cpu_low_bit.py --quick: the decode and per-projection tables, a ratio for every format."""
    script = SCRIPT.parent / "cpu_low_bit.py"
    result = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    header = next(line for line in result.stdout.splitlines() if line.startswith("| model | batch"))
    assert all(f"{fmt} vs f32" in header for fmt in ("sym_int8", "sym_int4", "asym_int4"))
    assert [line for line in result.stdout.splitlines() if line.startswith("| demo | 1 |")]


def test_tensor_parallel_bench_smoke_runs_tp1_and_tp2_on_the_cpu():
    """bench/tensor_parallel.py --smoke: a tiny shape over gloo, the decode-step table with both sizes and their
    ratio, and the workload's row against its floor."""
    script = SCRIPT.parent / "tensor_parallel.py"
    result = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("| tiny | 1 |")]
    assert [line for line in lines if line.startswith("| tiny | 2 |") and "<= 0.62" in line]
    assert [line for line in lines if line.startswith("| tiny, W16 | 2 | 16 |")]


def test_scale_out_bench_runs_one_and_two_cpu_workers_through_the_service(tmp_path):
    """bench/scale_out.py on the tiny shape: a service with one CPU worker, then one with a worker per `cpu,cpu`,
    each answering every request; the table has both rows and Redis' CPU."""
    script = SCRIPT.parent / "scale_out.py"
    env = {**os.environ, "OUT": str(tmp_path)}
    result = subprocess.run([sys.executable, str(script), "--shape", "tiny", "--devices", "cpu", "cpu,cpu",
                             "--requests", "32", "--clients", "8", "--client-procs", "2"],
                            capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| cpu")]
    assert [(r[1].strip(), r[2].strip(), r[6].strip()) for r in rows] == [("cpu", "1", "0"), ("cpu,cpu", "2", "0")]
    runs = json.loads((tmp_path / "scale_out.json").read_text())["runs"]
    assert [r["done"] for r in runs] == [32, 32] and all("redis" in r["cpu_cores"] for r in runs)
