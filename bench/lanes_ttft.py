"""Interactive time to first token while a large batch saturates the worker, against an idle worker.

Starts the whole service on this machine (local Redis, one worker with the demo model or --model, the webhook and
batch worker, the API), streams N interactive completions one after another on the idle service, then submits a
batch of --batch-lines lines and, while it runs, streams the same N completions again. Prints both TTFTs (median
and p90) and their ratio. A benchmark, not a test: nothing is asserted.

    python bench/lanes_ttft.py [--model DIR] [--device auto] [--batch-lines 2000]
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from api.local_redis import start_redis  # noqa: E402
from tests.service import API_KEYS, MODEL, Service  # noqa: E402
from worker.engine_flags import default_model_dir, ensure_demo_model  # noqa: E402


def ttft(client: httpx.Client, prompt: str, max_tokens: int) -> float:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    start = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/completions", json=body) as response:
        # Read to the end, as a real client does; only the first token's arrival is timed.
        for line in response.iter_lines():
            if first is None and line.startswith("data: {") and json.loads(line[6:])["choices"]:
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("stream ended without a token")
    return first


def measure(client: httpx.Client, n: int, max_tokens: int) -> list[float]:
    return [ttft(client, f"interactive request {i}:", max_tokens) for i in range(n)]


def summary(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[int(0.9 * (len(ordered) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--batch-lines", type=int, default=2000)
    parser.add_argument("--batch-max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    model = Path(args.model) if args.model else ensure_demo_model(default_model_dir())
    with start_redis() as redis, tempfile.TemporaryDirectory() as logs:
        service = Service(redis.url, model, Path(logs))
        try:
            service.start_worker(max_num_seqs=args.max_num_seqs, device=args.device)
            service.start_webhook_worker()
            service.start_api()
            with service.client() as client:
                measure(client, 3, args.max_tokens)  # warm-up
                idle = measure(client, args.requests, args.max_tokens)
                lines = "\n".join(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/completions",
                                              "body": {"model": MODEL, "prompt": f"bulk line {i}:",
                                                       "max_tokens": args.batch_max_tokens, "ignore_eos": True}})
                                  for i in range(args.batch_lines))
                upload = client.post("/v1/files", data={"purpose": "batch"},
                                     files={"file": ("bulk.jsonl", io.BytesIO(lines.encode()))}).json()
                batch = client.post("/v1/batches", json={"input_file_id": upload["id"],
                                                         "endpoint": "/v1/completions",
                                                         "completion_window": "24h"}).json()
                while client.get(f"/v1/batches/{batch['id']}").json()["status"] == "validating":
                    time.sleep(0.2)
                time.sleep(2)  # let the batch fill the worker
                busy = measure(client, args.requests, args.max_tokens)
                state = client.get(f"/v1/batches/{batch['id']}").json()
                client.post(f"/v1/batches/{batch['id']}/cancel")
        finally:
            service.stop()
    (idle_median, idle_p90), (busy_median, busy_p90) = summary(idle), summary(busy)
    print(f"model {model.name}, device {args.device}, max_num_seqs {args.max_num_seqs}; batch of "
          f"{args.batch_lines} lines x {args.batch_max_tokens} tokens ({state['request_counts']['completed']} done "
          f"while measuring); {args.requests} interactive requests of {args.max_tokens} tokens, streamed")
    print("worker state        | TTFT median (s) | TTFT p90 (s)")
    print(f"idle                | {idle_median:15.3f} | {idle_p90:.3f}")
    print(f"batch running       | {busy_median:15.3f} | {busy_p90:.3f}")
    print(f"ratio (busy / idle) | {busy_median / idle_median:15.2f} | {busy_p90 / idle_p90:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
