"""The `inferq` command line: demo-model, generate (offline), quantize, worker, webhook-worker, api, and serve
(everything locally)."""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import typing
from pathlib import Path

from engine.config import LOW_BIT_FORMATS, EngineConfig, inferq_home

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LOG_LEVEL = "WARNING"
# `inferq serve`'s Redis: a fixed port, so that `celery -A worker.celery_app` and Flower can be pointed at it (and
# not Redis' own 6379, which a system Redis may hold).
DEFAULT_REDIS_PORT = 6390


def default_model_dir() -> Path:
    """The embedded default model: the demo checkpoint, written on first use."""
    return inferq_home() / "demo-model"


def ensure_demo_model(path: Path) -> Path:
    if not (path / "config.json").is_file():
        from engine.demo_model import write_demo_model

        logging.getLogger(__name__).info("writing the demo model to %s", path)
        write_demo_model(path)
    return path


def engine_flag_fields() -> list[dataclasses.Field]:
    """EngineConfig's fields that have a command-line flag (engine/config.py says why the others have none)."""
    return [f for f in dataclasses.fields(EngineConfig) if "no_flag" not in f.metadata]


def engine_flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field, with its help and default: generate, worker and serve all get the same
    ones, and serve forwards every one to its worker (engine_argv)."""
    group = parser.add_argument_group("engine options")
    types = typing.get_type_hints(EngineConfig)
    for f in engine_flag_fields():
        # `int | None` -> int: None is the default that means "decided at start-up", never typed in.
        kind = next(t for t in typing.get_args(types[f.name]) or (types[f.name],) if t is not type(None))
        options: dict = {"dest": f.name, "help": f.metadata["help"],
                         "default": None if f.default is dataclasses.MISSING else f.default}
        if "choices" in f.metadata:
            options["choices"] = f.metadata["choices"]
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction  # --flag / --no-flag, None left as "decide"
        else:
            options["type"] = kind
            if "choices" not in f.metadata:  # argparse lists the choices as the metavar
                options["metavar"] = engine_flag(f).removeprefix("--").upper().replace("-", "_")
        group.add_argument(engine_flag(f), **options)


def engine_argv(options: dict) -> list[str]:
    """The engine flags that reproduce `options` (engine_options' result) on another command line: what serve
    passes to its worker. Every value is written out, defaults too, so nothing is lost on the way."""
    argv: list[str] = []
    for f in engine_flag_fields():
        value, flag = options[f.name], engine_flag(f)
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag.removeprefix("--"))
        else:
            argv += [flag, str(value)]
    return argv


def add_tool_parser_argument(parser: argparse.ArgumentParser) -> None:
    from api.tool_calls import PARSERS

    parser.add_argument("--tool-call-parser", choices=PARSERS,
                        help="the format the model writes tool calls in (default: from its chat template, else "
                             "hermes)")


def engine_options(args: argparse.Namespace) -> dict:
    """EngineConfig's keyword arguments from the engine flags; the demo model (written on first use) without
    --model."""
    options = {f.name: getattr(args, f.name) for f in engine_flag_fields()}
    options["model"] = str(Path(args.model) if args.model else ensure_demo_model(default_model_dir()))
    return options


def add_chat_template_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chat-template",
                        help="a Jinja chat template, or a file holding one, used instead of the tokenizer's (for "
                             "/v1/chat/completions and /tokenize)")


def read_chat_template(value: str) -> str:
    """--chat-template: a file's content, or the template itself (as vLLM's flag)."""
    try:
        path = Path(value).expanduser()
        if path.is_file():
            return path.read_text()
    except OSError:  # a template longer than a file name can be
        pass
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r}: no such file, and no Jinja template either")


def served_model_name(model: str | Path) -> str:
    """The name clients use unless given: a checkpoint directory's name, a GGUF file's stem."""
    model = Path(model)
    return model.stem if model.suffix == ".gguf" else model.name


def cmd_demo_model(args: argparse.Namespace) -> int:
    from engine.demo_model import write_demo_model

    path = write_demo_model(Path(args.dir), size=args.size, vocab_size=args.vocab_size, seed=args.seed)
    print(path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    options = engine_options(args)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.sampling_seed,
                            max_tokens=args.max_tokens, stop=args.stop or [])
    llm = LLM(**options)
    for output in llm.generate(args.prompt, params):
        for choice in output.outputs:
            print(choice.text)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from engine.quantized_checkpoint import save_quantized

    src = Path(args.model) if args.model else ensure_demo_model(default_model_dir())
    dst = save_quantized(src, args.output, args.load_in_low_bit)
    print(f"{dst}: {args.load_in_low_bit}, weights {_weight_bytes(src) / 1e6:.1f} MB -> "
          f"{_weight_bytes(dst) / 1e6:.1f} MB")
    return 0


def _weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.pinning import pin_device

    device = pin_device(args.device)  # before anything initialises the GPU
    from api.celery_client import app, queue_for
    from api.settings import get_settings
    from api.tool_calls import parser_for_template
    from worker.runtime import capacities, start_runtime

    import worker.tasks  # noqa: F401 - registers the tasks

    chat_template = read_chat_template(args.chat_template) if args.chat_template else None
    options = engine_options(args) | {"device": device}
    name = args.served_model_name or served_model_name(options["model"])
    # The tool-call format is read from the chat template the worker uses: an overriding one decides it.
    tool_call_parser = args.tool_call_parser or (parser_for_template(chat_template) if chat_template else None)
    runtime = start_runtime(EngineConfig(**options), name, get_settings(),
                            {"requested_device": args.device, "tool_call_parser": tool_call_parser}, chat_template)
    # Threads, never prefork with a GPU: a thread per sequence the engine can hold plus the lanes' reserve (see
    # worker/runtime.py), so that many jobs are inside the engine at once and are batched token by token. A thread
    # only waits: the engine's outputs reach Redis through one writer.
    threads = capacities(args.max_num_seqs)["threads"]
    # Named after the model it serves (`celery inspect`, Flower), with the runtime's id (its registry entry).
    node = f"{celery_safe(name)}-{runtime.worker_id.rsplit('-', 1)[-1]}@%h"
    logging.getLogger(__name__).info("worker %s serves %r from queue %s with %d threads",
                                     node.replace("%h", socket.gethostname()), name, queue_for(name), threads)
    argv = ["worker", "--pool=threads", f"--concurrency={threads}", "-Q", queue_for(name), "-n", node,
            f"--loglevel={args.log_level}", "--without-gossip", "--without-mingle"]
    # The engine and the jobs running in it outlive a restart of the Celery worker; its consumer then sends again
    # the messages the old one may have dropped (worker/tasks.py).
    run_celery_worker(app, argv, args.log_level)
    runtime.stop()
    return 0


def celery_safe(name: str) -> str:
    """A served model name as part of a Celery node name (`name@host`: no `@`, and no path separators)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def run_celery_worker(app, argv: list[str], log_level: str) -> None:
    """Celery's worker until it is asked to stop. Celery gives up on some broker failures (kombu cannot restore its
    unacknowledged messages while Redis is away, and calls that unrecoverable): the worker starts again here."""
    import threading
    import warnings

    from celery.exceptions import SecurityWarning
    from celery.signals import worker_shutting_down

    # Celery warns whenever it runs as root (containers often do); its danger is pickle, which this app never
    # accepts (accept_content=["json"], api/celery_client.py), and Celery refuses to start as root with pickle.
    warnings.filterwarnings("ignore", category=SecurityWarning)
    if log_level != "DEBUG":
        # Celery's banner prints to stdout whatever the level: kept for DEBUG (cmd_worker logs its gist at INFO).
        argv = ["--quiet", *argv]
    asked_to_stop = threading.Event()
    # Sent by Celery's signal handlers only (Ctrl-C, SIGTERM): an "unrecoverable error" stops the worker too, with
    # an exit code that does not tell the two apart.
    worker_shutting_down.connect(lambda **_: asked_to_stop.set(), weak=False)
    while True:
        app.worker_main(argv)
        if asked_to_stop.is_set():
            return
        logging.getLogger(__name__).error("the Celery worker stopped on an error; starting it again")
        time.sleep(1.0)


def cmd_webhook_worker(args: argparse.Namespace) -> int:
    """Delivers webhooks and keeps batches' books (expand, stop, finalize): no engine, no torch, so it is cheap to
    run next to the API or anywhere."""
    import uuid

    from api.celery_client import BATCH_QUEUE, WEBHOOK_QUEUE, app
    from api.settings import get_settings
    import worker.batch_tasks  # noqa: F401 - registers the tasks
    from worker.webhooks import secret_key

    secret = get_settings().webhook_secret
    if secret:
        secret_key(secret)  # a malformed secret stops the worker here, not at every delivery (ValueError -> exit 2)
    else:
        logging.getLogger(__name__).warning("INFERQ_WEBHOOK_SECRET is empty: webhooks are sent unsigned")
    # Threads: deliveries wait on the network, not the CPU; a slow receiver holds one thread for at most the
    # per-attempt timeout.
    run_celery_worker(app, ["worker", "--pool=threads", f"--concurrency={args.concurrency}", "-Q",
                            f"{WEBHOOK_QUEUE},{BATCH_QUEUE}", "-n", f"webhooks-{uuid.uuid4().hex[:8]}@%h",
                            f"--loglevel={args.log_level}", "--without-gossip", "--without-mingle"], args.log_level)
    return 0


# ---- listening ------------------------------------------------------------------------------------------------
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


def cmd_api(args: argparse.Namespace) -> int:
    check_auth_for(args.host, args.allow_no_auth)
    import uvicorn

    # An import string, so that uvicorn can start `--workers` processes on one socket, each building its own app.
    uvicorn.run("api.main:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level=args.log_level.lower())
    return 0


# ---- serve ----------------------------------------------------------------------------------------------------
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


# ---- the parser -----------------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in its help, except where there is none to show (None, an on/off switch that is off)
    or the help says it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or "(default:" in text or action.default in (None, argparse.SUPPRESS)
                or (action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction))):
            return text
        return super()._get_help_string(action)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _subcommand_flags() -> argparse.ArgumentParser:
    """Global flags, accepted after the subcommand too (`inferq serve --log-level INFO`). Their default is SUPPRESS
    here: a subcommand's parser would otherwise write its default over a value given before the subcommand; the
    main parser holds the default."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=argparse.SUPPRESS,
                        help=f"log level of every process started (default: {DEFAULT_LOG_LEVEL})")
    return parent


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        package_version = version("inferq")
    except PackageNotFoundError:  # run from a checkout that was never installed
        package_version = "unknown"
    parser = argparse.ArgumentParser(prog="inferq", description="LLM inference engine and job queue",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version}")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=DEFAULT_LOG_LEVEL,
                        help="log level of every process started")
    commands = parser.add_subparsers(dest="command", required=True)
    global_flags = _subcommand_flags()

    def add_command(subparsers, name: str, help: str, parents=()) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, help=help, description=help, parents=[global_flags, *parents],
                                     formatter_class=HelpFormatter)

    demo = add_command(commands, "demo-model", help="write a small random-weight Llama checkpoint (HF format)")
    demo.add_argument("dir", help="the directory to write")
    demo.add_argument("--size", default="tiny", choices=("tiny", "small", "100m"), help="model size")
    demo.add_argument("--vocab-size", type=int, default=2000, help="tokenizer vocabulary")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    demo.set_defaults(func=cmd_demo_model)

    generate = add_command(commands, "generate", help="offline generation for one or more prompts")
    generate.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    generate.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    generate.add_argument("--top-k", type=int, help="sample among the k likeliest tokens")
    # dest: EngineConfig.seed is the engine's (--engine-seed).
    generate.add_argument("--seed", type=int, dest="sampling_seed", metavar="SEED",
                          help="the requests' seed (reproducible sampling)")
    generate.add_argument("--stop", action="append", help="a stop string; repeat for several")
    add_engine_arguments(generate)
    generate.set_defaults(func=cmd_generate)

    quantize = add_command(commands, "quantize", help="write a checkpoint with its decoder projections in an "
                                                      "integer format, to load without the 16-bit weights")
    quantize.add_argument("--model", help="HF checkpoint directory (default: the demo model)")
    quantize.add_argument("--load-in-low-bit", required=True, choices=LOW_BIT_FORMATS,
                          help="sym_int4 | asym_int4 | sym_int8 (the float formats apply at load time)")
    quantize.add_argument("--output", required=True, help="the directory to write (new or empty)")
    quantize.set_defaults(func=cmd_quantize)

    worker = add_command(commands, "worker", help="a Celery worker owning one engine on one device")
    worker.add_argument("--served-model-name", help="the model name clients use (default: the directory name)")
    add_tool_parser_argument(worker)
    add_chat_template_argument(worker)
    add_engine_arguments(worker)
    worker.set_defaults(func=cmd_worker)

    webhooks = add_command(commands, "webhook-worker", help="a Celery worker that delivers job webhooks and keeps "
                                                            "batches' books (no model)")
    webhooks.add_argument("--concurrency", type=int, default=8, help="deliveries in flight at once (threads)")
    webhooks.set_defaults(func=cmd_webhook_worker)

    def add_listen_arguments(command: argparse.ArgumentParser) -> None:
        command.add_argument("--host", default="127.0.0.1",
                             help="address to listen on; beyond loopback only with INFERQ_API_KEYS set or "
                                  "--allow-no-auth")
        command.add_argument("--port", type=int, default=8000, help="the API's port")
        command.add_argument("--allow-no-auth", action="store_true", default=env_flag("INFERQ_ALLOW_NO_AUTH"),
                             help="listen beyond loopback without API keys (env INFERQ_ALLOW_NO_AUTH=1)")

    api = add_command(commands, "api", help="the HTTP front end (FastAPI)")
    add_listen_arguments(api)
    api.add_argument("--workers", type=int, default=1,
                     help="API processes on the one port (each streams and waits for many clients at once)")
    api.set_defaults(func=cmd_api)

    serve = add_command(commands, "serve", help="local Redis, API, worker and webhook worker, to try inferq locally")
    add_listen_arguments(serve)
    serve.add_argument("--redis-port", type=int, default=DEFAULT_REDIS_PORT,
                       help="the local Redis' port (on 127.0.0.1), for `celery -A worker.celery_app` and Flower")
    serve.add_argument("--served-model-name", help="the model name clients use (default: the directory name)")
    add_tool_parser_argument(serve)
    add_chat_template_argument(serve)
    add_engine_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    from worker.batch_cli import add_batch_commands

    add_batch_commands(commands, add_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level == "INFO":
        # A job's end is logged once, by inferq (api/lifecycle.py): Celery's "received" and "succeeded" lines per
        # task would only repeat it, under Celery's own task ids. Back at DEBUG.
        for chatty in ("celery.app.trace", "celery.worker.strategy"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
