"""`inferq worker --device cuda:0-3` / `cpu,cpu`: a worker process per device under a supervisor (worker/supervisor.py)
that restarts the ones that die and stops them all when asked; device lists (worker/pinning.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.service import MODEL, Service
from tests.test_cli import _non_default_engine_argv
from worker import supervisor
from worker.cli import build_parser
from worker.engine_flags import engine_options
from worker.pinning import expand_devices
from worker.supervisor import Supervisor, child_argv, child_env, restart_delay


# ---- device lists ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, devices", [
    ("cuda:0,1,2,3", ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),
    ("cuda:0-3", ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),
    ("xpu:0,1", ["xpu:0", "xpu:1"]),
    ("xpu:0-3", ["xpu:0", "xpu:1", "xpu:2", "xpu:3"]),
    ("xpu:0,2-3", ["xpu:0", "xpu:2", "xpu:3"]),
    ("cuda:0,cuda:1", ["cuda:0", "cuda:1"]),
    ("cuda:0, 1", ["cuda:0", "cuda:1"]),
    ("cpu,cpu", ["cpu", "cpu"]),
    ("cpu,cpu,cpu", ["cpu"] * 3),
    # One device: as before lists, one process.
    ("cuda:1", ["cuda:1"]), ("xpu:2", ["xpu:2"]), ("cuda:2-2", ["cuda:2"]),
    ("cpu", ["cpu"]), ("auto", ["auto"]), ("cuda", ["cuda"]), ("xpu", ["xpu"]),
])
def test_expand_devices(spec, devices):
    assert expand_devices(spec) == devices


@pytest.mark.parametrize("spec, message", [
    ("cuda:3-1", "runs down"),
    ("cuda:a", "not a device index"),
    ("cuda:0,a", "not a device index"),
    ("cuda:1-", "not a device index"),
    ("cuda:0-1-2", "not a device index"),
    ("cuda:0,xpu:1", "one kind of device"),
    ("cuda:0,cpu", "one kind of device"),
    ("cpu,cuda:0", "repeats `cpu`"),
    ("cpu:0,cpu:1", "repeats `cpu`"),
    ("cuda:0,0", "named twice"),
    ("cuda:0-2,1", "named twice"),
    ("cuda:0,", "empty item"),
    ("auto,auto", "names cards"),
    ("cuda,cuda", "names cards"),
])
def test_expand_devices_refuses(spec, message):
    with pytest.raises(ValueError, match=message):
        expand_devices(spec)


def test_a_bad_device_list_is_one_line():
    result = subprocess.run([sys.executable, "-m", "worker.cli", "worker", "--device", "cuda:3-1"],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --device 'cuda:3-1': the range 3-1 runs down; write 1-3"], result


# ---- the children's command lines -------------------------------------------------------------------------------
def _worker_parser(parser):
    return next(action for action in parser._subparsers._group_actions).choices["worker"]


def test_child_argv_keeps_every_flag():
    """Every flag of `inferq worker`, each away from its default, reaches the child as given; only the device is
    the child's own."""
    parser = build_parser()
    argv = ["--log-level", "DEBUG", "worker", *_non_default_engine_argv(), "--device", "cuda:0-3",
            "--served-model-name", "m", "--tool-call-parser", "llama3_json", "--chat-template", "{{ 'x' }}"]
    args = parser.parse_args(argv)
    for action in _worker_parser(parser)._actions:  # none left at its default: a new flag must be passed on too
        if action.dest not in ("help", "log_level"):
            assert getattr(args, action.dest) != action.default, action.dest
    assert args.log_level != parser.get_default("log_level")
    for device in expand_devices(args.device):
        child = parser.parse_args(child_argv(args, engine_options(args), device))
        assert vars(child) == vars(args) | {"device": device}


def test_child_argv_without_optional_flags():
    """The defaults stay defaults: no model given is the demo model, the served name its directory's."""
    parser = build_parser()
    args = parser.parse_args(["worker", "--device", "cpu,cpu", "--max-num-seqs", "4"])
    options = engine_options(args) | {"model": "/models/demo-model"}
    child = parser.parse_args(child_argv(args, options, "cpu"))
    assert (child.device, child.max_num_seqs, child.model) == ("cpu", 4, "/models/demo-model")
    assert (child.served_model_name, child.tool_call_parser, child.chat_template) == ("demo-model", None, None)
    assert child.log_level == "WARNING"


def test_cpu_engines_share_the_cores(monkeypatch):
    monkeypatch.setattr(supervisor, "available_cpus", lambda: 16)
    assert child_env(["cpu"] * 4, {})["OMP_NUM_THREADS"] == "4"
    assert child_env(["cpu"] * 3, {"PATH": "x"}) == {"PATH": "x", "OMP_NUM_THREADS": "5"}
    assert child_env(["cpu"] * 32, {})["OMP_NUM_THREADS"] == "1"
    assert child_env(["cpu"] * 2, {"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"  # given: kept
    assert "OMP_NUM_THREADS" not in child_env(["cuda:0", "cuda:1"], {})


# ---- supervision ------------------------------------------------------------------------------------------------
def test_restart_delay_doubles_to_its_cap_and_resets_after_a_long_run():
    delays, delay = [], 0.0
    for _ in range(8):
        delay = restart_delay(delay, uptime=0.5)
        delays.append(delay)
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert restart_delay(30, uptime=supervisor.STABLE_AFTER_S) == 1


def _run_in_thread(sup: Supervisor) -> tuple[threading.Thread, list[int]]:
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(sup.run()), daemon=True)
    thread.start()
    return thread, code


def test_a_child_that_keeps_failing_is_retried_with_backoff_not_in_a_loop(monkeypatch, caplog):
    monkeypatch.setattr(supervisor, "RESTART_DELAY_S", 0.2)
    monkeypatch.setattr(supervisor, "MAX_RESTART_DELAY_S", 0.4)
    sup = Supervisor([[sys.executable, "-c", "import sys; sys.exit(3)"]], ["failing"], poll_s=0.02)
    with caplog.at_level("ERROR", logger="worker.supervisor"):
        thread, code = _run_in_thread(sup)
        time.sleep(2.5)
        sup.stop()
        thread.join(10)
    child = sup.children[0]
    # Starts at about 0, 0.2, 0.6, 1.0, 1.4, 1.8, 2.2 s (python's start-up in between); a loop would start dozens.
    assert code == [0] and 3 <= child.starts <= 8, child.starts
    assert child.delay == 0.4
    assert "failing (pid " in caplog.text and "exited with code 3" in caplog.text


def test_stop_forwards_the_signal_then_kills_who_ignores_it(tmp_path):
    marker = tmp_path / "ignoring"
    stubborn = ("import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                f"signal.signal(signal.SIGINT, signal.SIG_IGN); pathlib.Path({str(marker)!r}).touch(); time.sleep(60)")
    sup = Supervisor([[sys.executable, "-c", "import time; time.sleep(60)"], [sys.executable, "-c", stubborn]],
                     ["polite", "stubborn"], stop_timeout_s=1.0, poll_s=0.02)
    thread, code = _run_in_thread(sup)
    deadline = time.monotonic() + 30
    while not (marker.exists() and all(c.process for c in sup.children)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = time.monotonic()
    sup.stop(signal.SIGTERM)
    thread.join(15)
    assert code == [0] and 1.0 <= time.monotonic() - started < 10
    polite, ignoring = (c.process.returncode for c in sup.children)
    assert (polite, ignoring) == (-signal.SIGTERM, -signal.SIGKILL)


# ---- end to end: two CPU workers under the supervisor -------------------------------------------------------------
def _children(pid: int) -> dict[int, list[str]]:
    """Live (not zombie) children of `pid`: pid -> command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if int(stat[1]) == pid and stat[0] != b"Z":
            found[int(entry)] = cmdline
    return found


def _descendants(pid: int) -> set[int]:
    found = set()
    for child in _children(pid):
        found |= {child, *_descendants(child)}
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _wait_until(condition, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.timeout(300)
def test_two_cpu_workers_supervised_restarted_and_stopped(redis_url, demo_model_dir, tmp_path):
    """`inferq worker --device cpu,cpu`: two workers register; jobs succeed; a child killed with -9 mid-jobs (and its
    engine process with it) is replaced, its jobs still succeed; SIGTERM stops every child, exit code 0."""
    service = Service(redis_url, demo_model_dir, tmp_path)
    service.env.pop("OMP_NUM_THREADS", None)
    registry = service.store.registry
    try:
        service.worker = sup = service._spawn("workers", "worker", "--model", str(demo_model_dir),
                                              "--served-model-name", MODEL, "--device", "cpu,cpu",
                                              "--max-num-seqs", "8", "--block-size", "32")
        service._wait(lambda: len(registry.workers(MODEL)) == 2, "two workers to announce themselves", sup)
        first_ids = {w["worker_id"] for w in registry.workers(MODEL)}
        children = _children(sup.pid)
        assert len(children) == 2 and len(first_ids) == 2, children
        for pid, cmdline in children.items():
            assert cmdline[cmdline.index("--device") + 1] == "cpu", cmdline
            assert cmdline[cmdline.index("--block-size") + 1] == "32", cmdline
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert f"OMP_NUM_THREADS={max(1, supervisor.available_cpus() // 2)}".encode() in environ
        service.start_api()
        with service.client() as client:
            assert client.get("/ready").json()["workers"] == {MODEL: 2}

            def submit(n: int, tag: str) -> list[str]:
                return [client.post("/v1/jobs", json={"model": MODEL, "prompt": f"{tag} {i}:", "max_tokens": 24,
                                                      "temperature": 0, "ignore_eos": True}).json()["id"]
                        for i in range(n)]

            def results(ids: list[str]) -> list[dict]:
                return [client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json() for job_id in ids]

            ids = submit(20, "before")
            _wait_until(lambda: any(service.store.get(i).status == "running" for i in ids), "a job to run", 30)
            victim = next(iter(children))
            engine = _descendants(victim)
            assert engine, "the worker's engine process"
            os.kill(victim, signal.SIGKILL)
            jobs = results(ids)
            assert [j["status"] for j in jobs] == ["succeeded"] * 20, jobs
            assert all(j["usage"]["completion_tokens"] == 24 for j in jobs)
            _wait_until(lambda: not any(_alive(pid) for pid in engine), "the dead worker's engine to exit", 30)

            # The replacement: a new child, a new worker in the registry, the dead one's lease gone.
            _wait_until(lambda: len(_children(sup.pid)) == 2 and victim not in _children(sup.pid), "a new child")
            _wait_until(lambda: len(registry.workers(MODEL)) == 2
                        and {w["worker_id"] for w in registry.workers(MODEL)} - first_ids, "the new worker")
            assert client.get("/ready").json()["workers"] == {MODEL: 2}
            more = results(submit(10, "after"))
            assert [j["status"] for j in more] == ["succeeded"] * 10, more
        log = (tmp_path / "workers.log").read_text()
        assert "was killed by SIGKILL" in log, log[-3000:]

        everything = _descendants(sup.pid)
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=60) == 0
        _wait_until(lambda: not any(_alive(pid) for pid in everything), "every child to exit", 30)
    finally:
        service.stop()
