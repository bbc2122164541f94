"""The `inferq` command line: demo-model, generate (offline), quantize, worker, webhook-worker, api, and serve
(everything locally)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine.config import LOW_BIT_FORMATS, inferq_home


def default_model_dir() -> Path:
    """The embedded default model: the demo checkpoint, written on first use."""
    return inferq_home() / "demo-model"


def ensure_demo_model(path: Path) -> Path:
    if not (path / "config.json").is_file():
        from engine.demo_model import write_demo_model

        logging.getLogger(__name__).info("writing the demo model to %s", path)
        write_demo_model(path)
    return path


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Engine flags, named as in the seed recipe and vLLM."""
    parser.add_argument("--model", help="HF checkpoint directory or GGUF file (default: the demo model)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] | xpu[:i]")
    parser.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--attention-backend", default="auto", help="auto | torch | triton")
    parser.add_argument("--enforce-eager", action="store_true", help="never replay decode steps from device graphs")
    parser.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false", default=None,
                        help="read each step's tokens before queuing the next step (default: queue decode steps "
                             "ahead on GPUs)")
    parser.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                        help="compute every prompt in full (default: reuse the KV of prefixes already computed)")
    parser.add_argument("--load-in-low-bit", choices=LOW_BIT_FORMATS,
                        help="weight format, applied while the checkpoint loads: "
                             "sym_int4 | asym_int4 | sym_int8 | fp8 (e4m3) | fp16 | bf16")


def add_tool_parser_argument(parser: argparse.ArgumentParser) -> None:
    from api.tool_calls import PARSERS

    parser.add_argument("--tool-call-parser", choices=PARSERS,
                        help="the format the model writes tool calls in (default: from its chat template, else "
                             "hermes)")


def engine_options(args: argparse.Namespace) -> dict:
    model = Path(args.model) if args.model else ensure_demo_model(default_model_dir())
    return dict(model=str(model), device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                gpu_memory_utilization=args.gpu_memory_utilization, attention_backend=args.attention_backend,
                enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling,
                enable_prefix_caching=args.enable_prefix_caching, load_in_low_bit=args.load_in_low_bit)


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
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
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
    from engine.config import EngineConfig
    from worker.runtime import capacities, start_runtime

    import worker.tasks  # noqa: F401 - registers the tasks

    options = engine_options(args) | {"device": device}
    name = args.served_model_name or served_model_name(options["model"])
    runtime = start_runtime(EngineConfig(**options), name, get_settings(),
                            {"requested_device": args.device, "tool_call_parser": args.tool_call_parser})
    # Threads, never prefork with a GPU: a thread per sequence the engine can hold plus the lanes' reserve (see
    # worker/runtime.py), so that many jobs are inside the engine at once and are batched token by token. A thread
    # only waits: the engine's outputs reach Redis through one writer.
    threads = capacities(args.max_num_seqs)["threads"]
    argv = ["worker", "--pool=threads", f"--concurrency={threads}", "-Q", queue_for(name),
            "-n", f"{runtime.worker_id}@%h", f"--loglevel={args.log_level}", "--without-gossip", "--without-mingle"]
    # The engine and the jobs running in it outlive a restart of the Celery worker; its consumer then sends again
    # the messages the old one may have dropped (worker/tasks.py).
    run_celery_worker(app, argv)
    runtime.stop()
    return 0


def run_celery_worker(app, argv: list[str]) -> None:
    """Celery's worker until it is asked to stop. Celery gives up on some broker failures (kombu cannot restore its
    unacknowledged messages while Redis is away, and calls that unrecoverable): the worker starts again here."""
    import threading

    from celery.signals import worker_shutting_down

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
                            f"--loglevel={args.log_level}", "--without-gossip", "--without-mingle"])
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    # An import string, so that uvicorn can start `--workers` processes on one socket, each building its own app.
    uvicorn.run("api.main:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level=args.log_level.lower())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Everything on this machine: a local Redis, the API, one worker with the model and the webhook worker;
    Ctrl-C stops them."""
    from api.local_redis import die_with_parent, start_redis

    def interrupt(signum, frame):  # SIGTERM stops everything in order, like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    model = Path(args.model) if args.model else ensure_demo_model(default_model_dir())
    name = args.served_model_name or served_model_name(model)
    # Append-only in $INFERQ_HOME/redis: jobs, files and batches outlive a restart of `inferq serve`.
    with start_redis(data_dir=inferq_home() / "redis", appendonly=True) as redis:
        env = os.environ | {"INFERQ_REDIS_URL": redis.url}
        base = [sys.executable, "-m", "worker.cli", "--log-level", args.log_level]
        worker_cmd = [*base, "worker", "--model", str(model), "--served-model-name", name, "--device", args.device,
                      "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs),
                      "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
        if args.load_in_low_bit:
            worker_cmd += ["--load-in-low-bit", args.load_in_low_bit]
        if args.tool_call_parser:
            worker_cmd += ["--tool-call-parser", args.tool_call_parser]
        # Own sessions, so a Ctrl-C (or a signal to this process group) reaches only this process, which then stops
        # the children before Redis; each child also stops if this process dies without doing so (SIGKILL).
        options = dict(env=env, start_new_session=True, preexec_fn=die_with_parent)
        children = [subprocess.Popen(worker_cmd, **options),
                    subprocess.Popen([*base, "api", "--host", args.host, "--port", str(args.port)], **options),
                    subprocess.Popen([*base, "webhook-worker"], **options)]
        url = f"http://{args.host}:{args.port}"
        print(f"inferq is starting at {url} (Redis at {redis.url}, data in {redis.data_dir}); model {name!r}. Try:\n"
              f"  curl {url}/v1/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{name}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'\n"
              "Ctrl-C stops everything.", flush=True)
        try:
            while all(child.poll() is None for child in children):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGINT)
            for child in children:
                try:
                    child.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    child.kill()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferq", description="LLM inference engine and job queue")
    parser.add_argument("--log-level", default="WARNING")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo-model", help="write a small random-weight Llama checkpoint (HF format)")
    demo.add_argument("dir")
    demo.add_argument("--size", default="tiny", help="tiny | small | 100m")
    demo.add_argument("--vocab-size", type=int, default=2000)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo_model)

    generate = commands.add_parser("generate", help="offline generation for one or more prompts")
    add_engine_arguments(generate)
    generate.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", action="append")
    generate.set_defaults(func=cmd_generate)

    quantize = commands.add_parser("quantize", help="write a checkpoint with its decoder projections in an integer "
                                                    "format, to load without the 16-bit weights")
    quantize.add_argument("--model", help="HF checkpoint directory (default: the demo model)")
    quantize.add_argument("--load-in-low-bit", required=True, choices=LOW_BIT_FORMATS,
                          help="sym_int4 | asym_int4 | sym_int8 (the float formats apply at load time)")
    quantize.add_argument("--output", required=True, help="the directory to write (new or empty)")
    quantize.set_defaults(func=cmd_quantize)

    worker = commands.add_parser("worker", help="a Celery worker owning one engine on one device")
    add_engine_arguments(worker)
    worker.add_argument("--served-model-name", help="the model name clients use (default: the directory name)")
    add_tool_parser_argument(worker)
    worker.set_defaults(func=cmd_worker)

    webhooks = commands.add_parser("webhook-worker", help="a Celery worker that delivers job webhooks (no model)")
    webhooks.add_argument("--concurrency", type=int, default=8, help="deliveries in flight at once (threads)")
    webhooks.set_defaults(func=cmd_webhook_worker)

    api = commands.add_parser("api", help="the HTTP front end (FastAPI)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1,
                     help="API processes on the one port (each streams and waits for many clients at once)")
    api.set_defaults(func=cmd_api)

    serve = commands.add_parser("serve", help="local Redis, API, worker and webhook worker, to try inferq locally")
    add_engine_arguments(serve)
    serve.add_argument("--served-model-name")
    add_tool_parser_argument(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=cmd_serve)

    from worker.batch_cli import add_batch_commands

    add_batch_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
