"""Data-parallel scale-out through the whole service: the same workload against one worker and against a worker per
device (`inferq worker --device cuda:0-3`), one service at a time, each started from its command line as a user
would (local Redis, the worker or the supervisor of workers, `webhook-worker`, `inferq api --workers N`).

Workload: bench/service_gpu.py's (N requests of random token-id prompts of 64-512 tokens and max_tokens 16-256,
greedy, EOS ignored, seeded) through --clients concurrent clients of POST /v1/completions, after an untimed
warm-up. For each device list: out tok/s, its ratio to the first list's (one worker) and that ratio over the
number of workers (target: at least 0.95), and the CPU each service process used, in cores: Redis is one thread,
so its cores are the share of what it can serve (it is the limit near 1.0). A benchmark: nothing is asserted.

    python bench/scale_out.py --devices cuda:0 cuda:0-1 cuda:0-3          # TinyLlama-1.1B shape
    python bench/scale_out.py --shape llama2-7b --devices cuda:0 cuda:0-1 --api-workers 2
    python bench/scale_out.py --shape tiny --devices cpu cpu,cpu --requests 48 --clients 16   # smoke test

Logs go to $OUT/scale-out-logs (else a temporary directory); numbers to $OUT/scale_out.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_gpu import (MODEL, add_load_arguments, completion_bodies, probe, run_clients,  # noqa: E402
                         start_service, stop_children, wait_idle, wait_ready, workload, write_model)
from worker.pinning import expand_devices  # noqa: E402

TARGET = 0.95


def wait_workers(url: str, count: int, timeout: float = 900) -> None:
    """Until /ready counts `count` workers of the model (every worker of the supervisor has loaded it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5).json().get("workers", {}).get(MODEL, 0) >= count:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    raise TimeoutError(f"fewer than {count} workers of {MODEL!r} after {timeout:.0f} s")


def run_service(args, devices: str, model_dir: Path, dtype: str, bodies: list[dict], log_dir: Path) -> dict:
    from api.local_redis import free_port, start_redis

    count = len(expand_devices(devices))
    logs = log_dir / devices.replace(",", "+").replace(":", "")
    logs.mkdir(parents=True, exist_ok=True)
    children, redis = {}, start_redis()
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        start_service(model_dir, devices, dtype, redis.url, port, logs, children, args.api_workers,
                      args.memory_share)
        wait_ready(url, children, logs)
        wait_workers(url, count)
        pids = {name: child.pid for name, child in children.items()} | {"redis": redis.process.pid}
        # Untimed: every worker's first prefills of each size pay for kernel compilation.
        warm = [b | {"max_tokens": 8} for b in bodies[:16 * count]]
        run_clients(url, "completions", warm, len(warm), 1, args.timeout)
        wait_idle(url)
        with probe(url, pids) as found:
            result = run_clients(url, "completions", bodies, args.clients, args.client_procs, args.timeout)
        result |= found
        result.update(devices=devices, workers=count)
        print(f"{devices}: {result['tokens'] / result['seconds']:.0f} out tok/s, {result['errors']} errors, "
              f"CPU cores {found['cpu_cores']}", flush=True)
        return result
    finally:
        stop_children(children)
        redis.stop()


def print_table(report: dict) -> None:
    runs = report["runs"]
    base = runs[0]["tokens"] / runs[0]["seconds"] / runs[0]["workers"]
    print(f"\n== scale-out through the service, {report['device_name']}, {report['shape']}, {report['requests']} "
          f"requests, {report['clients']} clients, {report['api_workers']} API process(es) ==")
    print("| devices | workers | out tok/s | × one worker | per worker (target >= 0.95) | errors | Redis CPU (cores) "
          "| API CPU | workers + engines CPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        rate = r["tokens"] / r["seconds"]
        cores = r["cpu_cores"]
        print(f"| {r['devices']} | {r['workers']} | {rate:.0f} | {rate / base:.2f} | {rate / base / r['workers']:.2f} "
              f"| {r['errors']} | {cores.get('redis', 0):.2f} | {cores.get('api', 0):.2f} | "
              f"{cores.get('worker', 0) + cores.get('engine', 0):.2f} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", nargs="+", default=["cuda:0", "cuda:0-1"],
                        help="a worker's --device per service run; the first is the reference (one worker)")
    add_load_arguments(parser)
    parser.add_argument("--memory-share", type=float, default=0.8, help="each engine's share of its device's memory")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    import torch

    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    log_dir = out / "scale-out-logs" if out else Path(tempfile.mkdtemp(prefix="inferq-scale-out-logs-"))
    first = expand_devices(args.devices[0])[0]
    dtype = "float32" if first == "cpu" else "bfloat16"
    shape = Path(args.model).name if args.model else args.shape
    report = {"shape": shape, "requests": args.requests, "clients": args.clients, "api_workers": args.api_workers,
              "device_name": torch.cuda.get_device_name() if first.startswith("cuda") else first, "runs": []}
    with tempfile.TemporaryDirectory(prefix="inferq-bench-model-") as tmp:
        model_dir = Path(args.model) if args.model else write_model(args.shape, Path(tmp) / shape, first)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        bodies = completion_bodies(workload(args.requests, vocab))
        for devices in args.devices:
            report["runs"].append(run_service(args, devices, model_dir, dtype, bodies, log_dir))
    print_table(report)
    print(f"service logs: {log_dir}")
    if out:
        (out / "scale_out.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
