"""docker-compose.yml is valid against the Compose specification (the schema ships with check-jsonschema)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_file_is_valid():
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(ROOT / "docker-compose.yml")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_the_whole_service():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert {"redis", "api", "worker-xpu", "webhook-worker"} <= set(services)
    assert "--appendonly" in services["redis"]["command"]
    worker = services["worker-xpu"]
    assert "/dev/dri:/dev/dri" in worker["devices"] and worker["environment"]["ZE_AFFINITY_MASK"] == "0"
