"""`inferq serve` (a local Redis, the API, one worker and the webhook worker; the banner once the model answers) and
the checks `inferq api` shares with it before it listens (no public bind without API keys, ports in use)."""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from engine.config import inferq_home
from worker.engine_flags import engine_argv, engine_options, read_chat_template, served_model_name

# `inferq serve`'s Redis: a fixed port, so that `celery -A worker.celery_app` and Flower can be pointed at it (and
# not Redis' own 6379, which a system Redis may hold).
DEFAULT_REDIS_PORT = 6390


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # any other name may resolve to a public address
        return False


def check_auth_for(host: str, allow_no_auth: bool) -> None:
    """An API without keys serves and bills anyone who reaches it: beyond loopback only when asked for."""
    from api.settings import get_settings

    if is_loopback(host) or allow_no_auth or get_settings().api_keys:
        return
    raise ValueError(f"refusing to listen on {host} without API keys: set INFERQ_API_KEYS, or pass --allow-no-auth "
                     "(INFERQ_ALLOW_NO_AUTH=1) to let anyone who reaches it in")


def check_port_free(host: str, port: int, flag: str, what: str) -> None:
    """Fail before starting anything, with the flag that picks another port, rather than in a child's log."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the servers bind: a port in TIME_WAIT is free for them, only a listener counts.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
            return
        except OSError as exc:
            if exc.errno not in (98, 48):  # EADDRINUSE (Linux, macOS); anything else is the server's to report
                return
    raise ValueError(f"port {port} ({what}) is in use{_redis_holder(port, what)}: stop what listens there, or "
                     f"choose another port with {flag}")


def _redis_holder(port: int, what: str) -> str:
    """Who holds serve's Redis port, when it is a Redis: another `inferq serve` (or one left behind, outside Linux,
    where children do not die with their parent) is never shared, since it has its own worker and data."""
    if what != "Redis":
        return ""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # One try: what listens may be no Redis at all, and never answer (redis-py retries timeouts by default).
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=0.5,
                         retry=Retry(NoBackoff(), 0))
    try:
        pid = client.info("server")["process_id"]
        directory = client.config_get("dir").get("dir", "?")
    except redis.RedisError:
        return ""
    finally:
        client.close()
    return f" by redis-server pid {pid} (data in {directory}; another inferq serve?)"


def client_url(host: str, port: int) -> str:
    """The URL a client on this machine uses for a server listening on host:port."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host.strip('[]')}]:{port}" if ":" in host else f"http://{host}:{port}"


def cmd_serve(args: argparse.Namespace) -> int:
    """Everything on this machine: a local Redis, the API, one worker with the model and the webhook worker;
    Ctrl-C stops them. The curl example is printed once the model answers."""
    import redis

    from api.local_redis import die_with_parent, start_redis
    from api.registry import WorkerRegistry
    from api.settings import get_settings

    # What can be refused is refused before anything starts.
    check_auth_for(args.host, args.allow_no_auth)
    check_port_free(args.host, args.port, "--port", "the API")
    check_port_free("127.0.0.1", args.redis_port, "--redis-port", "Redis")
    if args.chat_template:
        read_chat_template(args.chat_template)

    def interrupt(signum, frame):  # SIGTERM stops everything in order, like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its INFO line per readiness probe tells nobody anything
    options = engine_options(args)
    name = args.served_model_name or served_model_name(options["model"])
    url = client_url(args.host, args.port)
    api_key = next(iter(get_settings().api_keys), None)
    # Append-only in $INFERQ_HOME/redis: jobs, files and batches outlive a restart of `inferq serve`.
    with start_redis(port=args.redis_port, data_dir=inferq_home() / "redis", appendonly=True) as redis_server:
        env = os.environ | {"INFERQ_REDIS_URL": redis_server.url}
        base = [sys.executable, "-m", "worker.cli", "--log-level", args.log_level]
        worker_cmd = [*base, *serve_worker_argv(args, options, name)]
        api_cmd = [*base, "api", "--host", args.host, "--port", str(args.port)]
        if args.allow_no_auth:
            api_cmd.append("--allow-no-auth")
        # Own sessions, so a Ctrl-C (or a signal to this process group) reaches only this process, which then stops
        # the children before Redis; each child also stops if this process dies without doing so (SIGKILL).
        popen = dict(env=env, start_new_session=True, preexec_fn=die_with_parent)
        started = time.time()
        children = {"worker": subprocess.Popen(worker_cmd, **popen), "API": subprocess.Popen(api_cmd, **popen),
                    "webhook worker": subprocess.Popen([*base, "webhook-worker"], **popen)}
        registry = WorkerRegistry(redis.Redis.from_url(redis_server.url, decode_responses=True, socket_timeout=2),
                                  get_settings().key_prefix)
        print(f"inferq is starting: loading {name!r} (device {args.device}); the example follows once it answers.",
              flush=True)
        code = 0
        try:
            ready = False
            while True:
                stopped = [(what, child.returncode) for what, child in children.items() if child.poll() is not None]
                if stopped:
                    what, returncode = stopped[0]
                    print(f"error: the {what} stopped (exit code {returncode}); stopping inferq", file=sys.stderr)
                    code = 1
                    break
                if not ready and serves(url, name, api_key, registry, started):
                    print(banner(url, name, redis_server.url, redis_server.data_dir, api_key is not None), flush=True)
                    ready = True
                time.sleep(0.5 if ready else 0.2)
        except KeyboardInterrupt:
            pass
        finally:
            for child in children.values():
                if child.poll() is None:
                    child.send_signal(signal.SIGINT)
            for child in children.values():
                try:
                    child.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    child.kill()
    return code


def serve_worker_argv(args: argparse.Namespace, options: dict, name: str) -> list[str]:
    """`inferq worker ...` for serve's worker: every engine option, and the worker's own flags."""
    argv = ["worker", *engine_argv(options), "--served-model-name", name]
    if args.tool_call_parser:
        argv += ["--tool-call-parser", args.tool_call_parser]
    if args.chat_template:
        argv += ["--chat-template", args.chat_template]
    return argv


def serves(url: str, model: str, api_key: str | None, registry, since: float) -> bool:
    """The API is up and takes requests for `model`: /ready counts a live worker of it, and the model is in the
    API's view of the registry (a registry snapshot, api/registry.py: what a completion's model check reads, so
    the first request does not get a 404). The registry is read first, directly: no request (and no access log
    line) while the model loads; and only a worker heard from `since` counts, not the lease of the one a previous
    run left in Redis."""
    import httpx
    import redis

    try:
        if not any(worker.get("last_seen", 0) >= since for worker in registry.workers(model)):
            return False
    except redis.RedisError:
        return False
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        if not httpx.get(f"{url}/ready", timeout=2).json().get("workers", {}).get(model):
            return False
        return httpx.get(f"{url}/v1/models/{model}", headers=headers, timeout=2).status_code == 200
    except (httpx.HTTPError, ValueError, AttributeError):  # not up yet, or not answering JSON
        return False


def banner(url: str, model: str, redis_url: str, data_dir: Path, with_key: bool) -> str:
    body = shlex.quote(json.dumps({"model": model, "prompt": "Hello", "max_tokens": 16}))
    auth = ' -H "Authorization: Bearer $INFERQ_API_KEY"' if with_key else ""
    return (f"inferq is ready at {url}, serving {model!r}. Try:\n"
            f"  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} -d {body}\n"
            f"API docs: {url}/docs\n"
            f"Redis:    {redis_url} (data in {data_dir})\n"
            f"Celery:   {celery_command()} -A worker.celery_app --broker {redis_url} inspect active\n"
            "Ctrl-C stops everything.")


def celery_command() -> str:
    """How to run this environment's `celery` from here: `celery` if it is the one on PATH, else its path."""
    celery = Path(sys.executable).parent / "celery"
    if not celery.exists() or shutil.which("celery") == str(celery):
        return "celery"
    try:
        return str(celery.relative_to(Path.cwd()))
    except ValueError:
        return str(celery)
