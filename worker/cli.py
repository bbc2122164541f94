"""The `inferq` command line: demo-model, generate (offline), quantize, worker, webhook-worker, api, and serve
(everything locally)."""
from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path

from engine.config import LOW_BIT_FORMATS, EngineConfig
from worker.engine_flags import (
    add_chat_template_argument,
    add_engine_arguments,
    add_tool_parser_argument,
    default_model_dir,
    engine_options,
    ensure_demo_model,
    read_chat_template,
    served_model_name,
)
from worker.serve import DEFAULT_REDIS_PORT, check_auth_for, cmd_serve

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LOG_LEVEL = "WARNING"


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
    from worker.pinning import expand_devices, pin_device

    devices = expand_devices(args.device)
    if len(devices) > 1 and args.tensor_parallel_size > 1:
        raise ValueError(f"--tensor-parallel-size {args.tensor_parallel_size} takes one --device, the first of its "
                         f"cards (cuda:0 for cuda:0-{args.tensor_parallel_size - 1}), not a list of workers")
    if len(devices) > 1:  # `cuda:0-3`, `cpu,cpu`: a worker process per device (worker/supervisor.py)
        from worker.supervisor import supervise

        return supervise(args, devices)
    # Before anything initialises the GPU; a tensor-parallel engine's followers take the cards after it.
    device = pin_device(devices[0], args.tensor_parallel_size)
    from api.celery_client import app, queue_for
    from api.settings import get_settings
    from api.tool_calls import parser_for_template
    from worker.runtime import capacities, start_runtime

    import worker.tasks  # noqa: F401 - registers the tasks

    chat_template = read_chat_template(args.chat_template) if args.chat_template else None
    options = engine_options(args) | {"device": device}
    if not options["model"].endswith(".gguf"):
        from engine.loader import check_model_dir

        check_model_dir(options["model"])  # an empty mount fails here, not deep in the tokenizer's loading
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


def cmd_api(args: argparse.Namespace) -> int:
    check_auth_for(args.host, args.allow_no_auth)
    import uvicorn

    # An import string, so that uvicorn can start `--workers` processes on one socket, each building its own app.
    uvicorn.run("api.main:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level=args.log_level.lower())
    return 0


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

    worker = add_command(commands, "worker", help="a Celery worker owning one engine on one device (or one "
                                                    "such worker per device of a list)")
    worker.add_argument("--served-model-name", help="the model name clients use (default: the directory name)")
    add_tool_parser_argument(worker)
    add_chat_template_argument(worker)
    add_engine_arguments(worker)
    device = next(action for action in worker._actions if action.dest == "device")
    device.help += ("; or several, one worker process each, supervised: cuda:0,1,2,3 | cuda:0-3 | xpu:0-3 | "
                    "cpu,cpu (CPU engines, the cores shared)")
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
