"""`inferq serve` (what `make run` runs): its children never outlive it, even when it is killed with SIGKILL."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from tests.service import free_port


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _descendants(marker: bytes) -> list[int]:
    """Live processes whose environment holds `marker` (every process serve starts inherits it)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in environ.split(b"\0") and state != b"Z":  # a zombie has ended, only not been reaped yet
            found.append(int(entry))
    return found


def test_a_killed_serve_leaves_no_process_behind(tmp_path):
    port, redis_port = free_port(), free_port()
    log = open(tmp_path / "serve.log", "w+b")
    # INFERQ_CPU_KERNELS=0: a fresh INFERQ_HOME would build the C++ kernels first (tens of seconds).
    serve = subprocess.Popen([sys.executable, "-m", "worker.cli", "serve", "--port", str(port), "--redis-port",
                              str(redis_port), "--max-num-seqs", "8"],
                             env=os.environ | {"INFERQ_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1",
                                               "INFERQ_CPU_KERNELS": "0"},
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).json()["data"]:
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("inferq serve did not come up: " + (tmp_path / "serve.log").read_text())
        assert _accepts(port) and _accepts(redis_port)
        serve.send_signal(signal.SIGKILL)
        serve.wait(10)
        deadline = time.monotonic() + 30
        while (_accepts(port) or _accepts(redis_port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _accepts(port), "the API outlived inferq serve"
        assert not _accepts(redis_port), "Redis outlived inferq serve"
        if os.path.isdir("/proc"):  # the workers (and the engine process) too
            marker = f"INFERQ_HOME={tmp_path / 'home'}".encode()
            while _descendants(marker) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not _descendants(marker), "processes outlived inferq serve"
    finally:
        if serve.poll() is None:
            serve.kill()
        log.close()
