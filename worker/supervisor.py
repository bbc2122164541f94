"""`inferq worker --device cuda:0-3`: one worker process per device, all on the model's one queue, supervised.

Each child is a whole `inferq worker --device cuda:<i>` with every other flag as given (child_argv): it pins itself
to its card, runs its own engine and is its own Celery worker (`<model>-<id>@host`) with its own heartbeat and
leases, so a child that dies is one dead worker to the rest of the service (its jobs are recovered as any dead
worker's, worker/recovery.py). The supervisor starts no engine and touches no device. It restarts a child that
stops on its own, after a backoff (1 s, doubling to 30 s; back to 1 s after a run of a minute or more), so a child
that fails at start-up is tried again every 30 s, logged each time, never in a tight loop. SIGINT and SIGTERM are
passed on to every child (a second one too: Celery's cold shutdown), which then get STOP_TIMEOUT_S to finish
before they are killed; the supervisor then exits 0. The children run in sessions of their own (a Ctrl-C at the
terminal reaches the supervisor only, which stops them) and die with it if it is killed outright
(api/local_redis.die_with_parent), as `inferq serve`'s do.

`cpu,cpu` starts CPU engines the same way, each with its share of the cores (OMP_NUM_THREADS, unless set).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from worker.engine_flags import engine_options, read_chat_template, served_model_name
from worker.serve import serve_worker_argv

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0  # the first restart's wait
MAX_RESTART_DELAY_S = 30.0  # doubling up to this
STABLE_AFTER_S = 60.0  # a child that ran this long starts again after RESTART_DELAY_S
STOP_TIMEOUT_S = 30.0  # from SIGINT/SIGTERM to SIGKILL


def child_argv(args: argparse.Namespace, options: dict, device: str) -> list[str]:
    """`inferq ...` arguments of the worker on one `device`: every flag as parsed (`options`: engine_options(args),
    the engine's), the device replaced."""
    name = args.served_model_name or served_model_name(options["model"])
    return ["--log-level", args.log_level, *serve_worker_argv(args, options | {"device": device}, name)]


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def child_env(devices: list[str], base: dict[str, str] | None = None) -> dict[str, str]:
    """The children's environment: CPU engines share the cores (torch's threads: OMP_NUM_THREADS, unless given);
    a card's worker pins itself (worker/pinning.py)."""
    env = dict(os.environ if base is None else base)
    if devices[0] == "cpu" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, available_cpus() // len(devices)))
    return env


def restart_delay(previous: float, uptime: float) -> float:
    """The wait before starting again a child that stopped after `uptime` seconds, given the wait before its last
    start (0: it never waited)."""
    if previous <= 0 or uptime >= STABLE_AFTER_S:
        return RESTART_DELAY_S
    return min(previous * 2, MAX_RESTART_DELAY_S)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(slots=True)
class Child:
    label: str  # "worker 2/4 (cuda:1)"
    command: list[str]
    process: subprocess.Popen | None = None
    started: float = 0.0  # monotonic
    delay: float = 0.0  # the wait before its last start
    start_at: float = 0.0  # monotonic: when to start it (again)
    starts: int = 0


class Supervisor:
    """Keeps one process per command running until stop() (a signal handler's call); run() returns once every
    child has exited."""

    def __init__(self, commands: list[list[str]], labels: list[str], env: dict[str, str] | None = None,
                 stop_timeout_s: float = STOP_TIMEOUT_S, poll_s: float = 0.2) -> None:
        self.children = [Child(label, command) for label, command in zip(labels, commands, strict=True)]
        self.env = env
        self.stop_timeout_s = stop_timeout_s
        self.poll_s = poll_s
        self._signals: list[int] = []  # asked to stop, by these signals (in order)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop every child with `signum` (SIGINT or SIGTERM). Called from a signal handler: no lock taken."""
        self._signals.append(signum)

    def run(self) -> int:
        while not self._signals:
            now = time.monotonic()
            for child in self.children:
                if child.process is not None and child.process.poll() is not None:
                    self._stopped(child, now)
                if child.process is None and now >= child.start_at:
                    self._start(child)
            time.sleep(self.poll_s)
        self._stop_children()
        return 0

    def _start(self, child: Child) -> None:
        from api.local_redis import die_with_parent

        child.started, child.starts = time.monotonic(), child.starts + 1
        try:
            # Own session: a Ctrl-C at the terminal reaches this process only, which stops the children; each
            # child stops if this process dies without doing so (SIGKILL).
            child.process = subprocess.Popen(child.command, env=self.env, start_new_session=True,
                                             preexec_fn=die_with_parent)  # noqa: PLW1509 - no threads here
        except OSError as exc:
            child.delay = restart_delay(child.delay, 0.0)
            child.start_at = child.started + child.delay
            log.error("could not start %s (%s); trying again in %.0f s", child.label, exc, child.delay)
            return
        log.info("%s started (pid %d)", child.label, child.process.pid)

    def _stopped(self, child: Child, now: float) -> None:
        uptime, code = now - child.started, child.process.returncode
        how = f"was killed by {signal_name(-code)}" if code < 0 else f"exited with code {code}"
        child.delay = restart_delay(child.delay, uptime)
        child.start_at = now + child.delay
        log.error("%s (pid %d) %s after %.1f s; starting it again in %.0f s", child.label, child.process.pid, how,
                  uptime, child.delay)
        child.process = None

    def _stop_children(self) -> None:
        forwarded = 0
        deadline = time.monotonic() + self.stop_timeout_s
        while True:
            running = [c.process for c in self.children if c.process is not None and c.process.poll() is None]
            if not running:
                return
            for signum in self._signals[forwarded:]:  # a second Ctrl-C is passed on too (Celery's cold shutdown)
                for process in running:
                    process.send_signal(signum)
            forwarded = len(self._signals)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        for process in running:
            log.warning("pid %d did not stop within %.0f s of %s; killing it", process.pid, self.stop_timeout_s,
                        signal_name(self._signals[0]))
            process.kill()
        for process in running:
            process.wait()


def supervise(args: argparse.Namespace, devices: list[str]) -> int:
    """`inferq worker` on several devices: a worker process each (child_argv), supervised until SIGINT/SIGTERM."""
    from engine.config import EngineConfig

    # What would stop every child is refused once, here: a bad flag value, no checkpoint, no template file. The demo
    # model is written here too, once, not by every child at the same moment.
    options = engine_options(args)
    EngineConfig(**options | {"device": devices[0]})
    if not options["model"].endswith(".gguf"):
        from engine.loader import check_model_dir

        check_model_dir(options["model"])
    if args.chat_template:
        read_chat_template(args.chat_template)
    commands = [[sys.executable, "-m", "worker.cli", *child_argv(args, options, device)] for device in devices]
    labels = [f"worker {i + 1}/{len(devices)} ({device})" for i, device in enumerate(devices)]
    supervisor = Supervisor(commands, labels, child_env(devices))
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda received, frame: supervisor.stop(received))
    log.info("supervising %d workers on %s", len(devices), ", ".join(devices))
    return supervisor.run()
