"""The `inferq` command line: global flags anywhere, --version, defaults in --help, one line for an unreachable
server, every EngineConfig field as a flag (forwarded by serve), no public bind without keys, and `make run`'s
flow: the banner's curl answers 200 the first time."""
from __future__ import annotations

import dataclasses
import http.server
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest

from engine.config import EngineConfig
from tests.service import free_port
from worker.cli import build_parser
from worker.engine_flags import engine_argv, engine_flag, engine_flag_fields, engine_options, read_chat_template
from worker.serve import check_auth_for, serve_worker_argv

REPO = Path(__file__).resolve().parent.parent


def inferq(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True, text=True, check=False,
                          timeout=timeout, env=os.environ | (env or {}), cwd=REPO)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The process failed with a one-line message (the last line of stderr: a progress bar may come before)."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


# ---- global flags, version, help --------------------------------------------------------------------------------
def test_global_flags_are_taken_after_the_subcommand_too():
    parser = build_parser()
    assert parser.parse_args(["serve", "--log-level", "info"]).log_level == "INFO"
    assert parser.parse_args(["--log-level", "DEBUG", "serve"]).log_level == "DEBUG"  # before it still works
    assert parser.parse_args(["serve"]).log_level == "WARNING"
    after = parser.parse_args(["batch", "submit", "f.jsonl", "--url", "http://h:1", "--api-key", "k"])
    assert (after.url, after.api_key) == ("http://h:1", "k")
    before = parser.parse_args(["batch", "--url", "http://h:2", "status", "batch_x"])
    assert before.url == "http://h:2"  # the verb's absent --url does not overwrite it
    # And on the real command line: the flags are accepted (the error is the unreachable server, not argparse).
    result = inferq("batch", "status", "batch_x", "--url", f"http://127.0.0.1:{free_port()}", "--log-level", "INFO")
    assert "unrecognized arguments" not in result.stderr and "cannot reach" in result.stderr


def test_version():
    result = inferq("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"inferq {version('inferq')}"


def test_help_shows_defaults_and_describes_every_engine_flag():
    text = inferq("serve", "--help").stdout
    for shown in ("(default: 16)", "(default: 8000)", "(default: 6390)", "(default: WARNING)", "(default: 0.9)"):
        assert shown in text, shown
    assert "(default: None)" not in text
    for f in engine_flag_fields():
        assert f.metadata["help"] and engine_flag(f) in text, f.name


# ---- client commands against a server that is not there ------------------------------------------------------
def test_a_client_command_against_a_stopped_server_prints_one_line():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    line = one_error_line(inferq("batch", "status", "batch_abc", "--url", url))
    assert line.startswith(f"error: cannot reach the inferq API at {url}: "), line


class _BatchServer(http.server.ThreadingHTTPServer):
    """Just enough of the API for `batch submit --wait`: the batch stays in progress until the server goes away."""

    def __init__(self) -> None:
        polled = self.polled = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._answer({"id": "file-1"} if self.path == "/v1/files" else {"id": "batch_1"})

            def do_GET(self) -> None:
                polled.set()
                self._answer({"id": "batch_1", "status": "in_progress",
                              "request_counts": {"total": 2, "completed": 0, "failed": 0}})

        super().__init__(("127.0.0.1", 0), Handler)


def test_batch_wait_when_the_server_goes_away_prints_one_line(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"custom_id": "a"}\n')
    server = _BatchServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    waiting = subprocess.Popen([sys.executable, "-m", "worker.cli", "batch", "submit", str(source), "--wait",
                                "--url", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert server.polled.wait(30), "the command never polled the batch"
        server.shutdown()
        server.server_close()
        stdout, stderr = waiting.communicate(timeout=30)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert stdout.strip() == "batch_1"
    line = one_error_line(subprocess.CompletedProcess(waiting.args, waiting.returncode, stdout, stderr))
    assert line.startswith(f"error: cannot reach the inferq API at {url}: "), line


# ---- engine flags ---------------------------------------------------------------------------------------------
def test_generate_worker_and_serve_take_every_engine_config_field():
    flagged = {f.name for f in engine_flag_fields()}
    for f in dataclasses.fields(EngineConfig):  # a field without a flag says why
        assert f.name in flagged or f.metadata.get("no_flag"), f.name
    parser = build_parser()
    for command in (["generate", "--prompt", "x"], ["worker"], ["serve"]):
        args = vars(parser.parse_args(command))
        for f in engine_flag_fields():
            default = None if f.default is dataclasses.MISSING else f.default
            assert f.name in args and args[f.name] == default, (command[0], f.name)


def _non_default_engine_argv() -> list[str]:
    """A value other than the default for every engine flag."""
    argv = []
    for f in engine_flag_fields():
        flag, default = engine_flag(f), f.default
        if isinstance(default, bool) or (default is None and f.type in ("bool | None", "bool")):
            argv.append("--no-" + flag[2:] if default in (None, True) else flag)
        elif "choices" in f.metadata:
            argv += [flag, next(c for c in f.metadata["choices"] if c != default)]
        elif f.type.startswith("int"):
            argv += [flag, str((default or 0) + 3)]
        elif f.type.startswith("float"):
            argv += [flag, "0.5"]
        else:
            argv += [flag, f"some-{f.name}"]
    return argv


def test_serve_forwards_every_engine_flag_to_its_worker():
    parser = build_parser()
    args = parser.parse_args(["serve", *_non_default_engine_argv()])
    options = engine_options(args)
    for f in engine_flag_fields():  # every one was set away from its default
        assert options[f.name] != (None if f.default is dataclasses.MISSING else f.default), f.name
    worker = parser.parse_args(serve_worker_argv(args, options, "m"))
    assert worker.command == "worker" and engine_options(worker) == options
    assert engine_argv(engine_options(worker)) == engine_argv(options)


def test_chat_template_is_a_file_or_a_template(tmp_path):
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    (tmp_path / "chat.jinja").write_text(template)
    assert read_chat_template(str(tmp_path / "chat.jinja")) == template
    assert read_chat_template(template) == template
    assert read_chat_template(template * 300) == template * 300  # longer than a path may be
    with pytest.raises(ValueError, match="no such file"):
        read_chat_template(str(tmp_path / "missing.jinja"))
    result = inferq("serve", "--chat-template", str(tmp_path / "missing.jinja"), "--port", str(free_port()),
                    "--redis-port", str(free_port()), env={"INFERQ_HOME": str(tmp_path / "home")}, timeout=30)
    assert result.returncode == 2 and "--chat-template" in one_error_line(result)
    assert not (tmp_path / "home").exists()  # refused before anything started


# ---- no public bind without keys ------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["api", "serve"])
def test_public_bind_without_keys_is_refused_before_anything_starts(command, tmp_path):
    home = tmp_path / "home"
    result = inferq(command, "--host", "0.0.0.0", "--port", str(free_port()),
                    env={"INFERQ_API_KEYS": "", "INFERQ_ALLOW_NO_AUTH": "", "INFERQ_HOME": str(home)}, timeout=30)
    assert result.returncode == 2
    line = one_error_line(result)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "0.0.0.0" in line and "INFERQ_API_KEYS" in line and "--allow-no-auth" in line
    assert "INFERQ_ALLOW_NO_AUTH=1" in line
    assert not home.exists()  # no demo model written, no Redis started


def test_public_bind_is_allowed_with_keys_or_when_asked(monkeypatch):
    from api.settings import get_settings

    monkeypatch.setenv("INFERQ_API_KEYS", "")
    get_settings.cache_clear()
    try:
        for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"):
            check_auth_for(host, allow_no_auth=False)  # loopback is always fine
        with pytest.raises(ValueError, match="--allow-no-auth"):
            check_auth_for("0.0.0.0", allow_no_auth=False)
        with pytest.raises(ValueError):
            check_auth_for("inferq.example.com", allow_no_auth=False)
        check_auth_for("0.0.0.0", allow_no_auth=True)
        monkeypatch.setenv("INFERQ_ALLOW_NO_AUTH", "1")
        assert build_parser().parse_args(["api", "--host", "0.0.0.0"]).allow_no_auth
        monkeypatch.setenv("INFERQ_API_KEYS", "k1,k2")
        get_settings.cache_clear()
        check_auth_for("0.0.0.0", allow_no_auth=False)
    finally:
        get_settings.cache_clear()


def test_serve_refuses_a_redis_port_in_use_naming_the_flag(tmp_path):
    home = tmp_path / "home"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = inferq("serve", "--port", str(free_port()), "--redis-port", str(port),
                        env={"INFERQ_HOME": str(home)}, timeout=30)
    assert result.returncode == 2
    line = one_error_line(result)
    assert f"port {port}" in line and "--redis-port" in line
    assert not home.exists()


# ---- make run -------------------------------------------------------------------------------------------------
def _children_cmdlines(pid: int) -> list[list[str]]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode().split("\0")
        except (OSError, ValueError):
            continue
        if ppid == pid:
            found.append(cmdline)
    return found


@pytest.mark.timeout(120)
def test_make_run_banner_curl_answers_the_first_time(tmp_path):
    """`inferq serve` as `make run` runs it: the curl example appears only once it works."""
    port, redis_port = free_port(), free_port()
    # A chat template that ignores the messages: a chat's prompt is then its 40-odd tokens, never the demo
    # template's handful (the worker rendered the override).
    template = "{{ 'one two three four ' * 10 }}"
    # INFERQ_CPU_KERNELS=0: a fresh INFERQ_HOME would build the C++ kernels first (tens of seconds).
    env = os.environ | {"INFERQ_HOME": str(tmp_path / "home"), "INFERQ_CPU_KERNELS": "0", "PYTHONUNBUFFERED": "1",
                        "INFERQ_API_KEYS": ""}
    serve = subprocess.Popen([sys.executable, "-m", "worker.cli", "serve", "--port", str(port), "--redis-port",
                              str(redis_port), "--block-size", "32", "--max-num-seqs", "8",
                              "--chat-template", template, "--log-level", "INFO"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines: list[str] = []
    banner = threading.Event()

    def read() -> None:  # drain the pipe all along, so that no child ever blocks on it
        for line in serve.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C stops everything"):
                banner.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 90
        while not banner.wait(0.2):
            assert serve.poll() is None and time.monotonic() < deadline, "".join(lines)
        output = "".join(lines)
        curl = shlex.split(next(line for line in lines if line.strip().startswith("curl ")))
        url, body = curl[1], json.loads(curl[curl.index("-d") + 1])
        answer = httpx.post(url, json=body, timeout=60)  # at once: the banner promised it works
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["finish_reason"] in ("length", "stop")
        assert url == f"http://127.0.0.1:{port}/v1/completions" and body["model"] == "demo-model"

        assert "SecurityWarning" not in output and "[queues]" not in output  # no Celery banner, no root warning
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        assert f"Redis:    {redis_url} (data in {tmp_path / 'home' / 'redis'})" in output
        assert f"{port}/docs" in output

        workers = [c for c in _children_cmdlines(serve.pid) if "worker" in c]
        assert len(workers) == 1 and workers[0][workers[0].index("--block-size") + 1] == "32", workers

        chat = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                          json={"model": "demo-model", "messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": 2})
        assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] >= 40, chat.text
        # At INFO, one line per job where it ended.
        deadline = time.monotonic() + 10
        while not any(re.search(r"job \S+ succeeded: demo-model chat\.completions", line) for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)

        # The banner's Celery line reaches the worker, named after its model.
        celery = shlex.split(next(line for line in lines if line.startswith("Celery:")).split(":", 1)[1])
        assert celery[-2:] == ["inspect", "active"] and redis_url in celery
        inspected = subprocess.run(celery, capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
        assert inspected.returncode == 0 and re.search(r"->\s+demo-model-[0-9a-f]{8}@", inspected.stdout), inspected
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
    assert serve.returncode == 0, "".join(lines)


def test_a_worker_on_a_directory_without_a_checkpoint_says_so(tmp_path):
    """An empty --model directory (an unset docker mount) stops the worker with one line, before any loading."""
    result = inferq("worker", "--model", str(tmp_path), env={"INFERQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert one_error_line(result) == f"error: {tmp_path} is not a model directory: it has no config.json"
