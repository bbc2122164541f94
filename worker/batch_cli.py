"""`inferq batch submit|status|results|cancel`: the Batch API from the command line (an HTTP client of the API)."""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

TERMINAL = ("completed", "failed", "cancelled", "expired")
DEFAULT_URL = "http://127.0.0.1:8000"


def _reaching_the_api(command):
    """A server that is down, or goes away during `--wait`, is one line and exit status 1, not a traceback."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except httpx.TransportError as exc:  # refused, reset, timed out, closed mid-answer
            raise SystemExit(f"error: cannot reach the inferq API at {args.url}: "
                             f"{str(exc) or type(exc).__name__}") from None
    return run


def _client(args: argparse.Namespace) -> httpx.Client:
    api_key = args.api_key or os.environ.get("INFERQ_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=args.url, headers=headers, timeout=120)


def _check(response: httpx.Response) -> dict:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise SystemExit(f"error: HTTP {response.status_code}: {message}")
    return response.json()


def submit(args: argparse.Namespace) -> int:
    with _client(args) as client, open(args.file, "rb") as data:
        upload = _check(client.post("/v1/files", data={"purpose": "batch"},
                                    files={"file": (Path(args.file).name, data, "application/jsonl")}))
        batch = _check(client.post("/v1/batches", json={"input_file_id": upload["id"], "endpoint": args.endpoint,
                                                         "completion_window": args.completion_window}))
        print(batch["id"])
        if args.wait:
            batch = _follow(client, batch["id"])
            print(f"{batch['id']}: {batch['status']}", file=sys.stderr)
            return 0 if batch["status"] == "completed" else 1
    return 0


def _follow(client: httpx.Client, batch_id: str) -> dict:
    """Poll with a progress bar: completed / failed / total, rate and ETA (tqdm computes both)."""
    with tqdm(total=None, unit="line", desc=batch_id[:18], file=sys.stderr) as bar:
        while True:
            batch = _check(client.get(f"/v1/batches/{batch_id}"))
            counts = batch["request_counts"]
            bar.total = counts["total"] or None
            bar.n = counts["completed"] + counts["failed"]
            bar.set_postfix(status=batch["status"], completed=counts["completed"], failed=counts["failed"])
            bar.refresh()
            if batch["status"] in TERMINAL:
                return batch
            time.sleep(1.0)


def status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(json.dumps(_check(client.get(f"/v1/batches/{args.batch_id}")), indent=2))
    return 0


def results(args: argparse.Namespace) -> int:
    with _client(args) as client:
        batch = _check(client.get(f"/v1/batches/{args.batch_id}"))
        for file_id, target in ((batch["output_file_id"], args.output), (batch["error_file_id"], args.errors)):
            if file_id is None or target is None:
                continue
            with client.stream("GET", f"/v1/files/{file_id}/content") as response, open(target, "wb") as out:
                if response.status_code >= 400:
                    response.read()
                    _check(response)
                for chunk in response.iter_bytes():
                    out.write(chunk)
        if batch["status"] not in TERMINAL:
            print(f"batch {args.batch_id} is still {batch['status']}", file=sys.stderr)
            return 1
    return 0


def cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(_check(client.post(f"/v1/batches/{args.batch_id}/cancel"))["status"])
    return 0


def add_batch_commands(commands, add_command) -> None:
    """`add_command(subparsers, name, help=..., parents=[...])`: worker/cli.py's, which gives every command the
    global flags."""
    batch = add_command(commands, "batch", help="submit and follow bulk work (OpenAI Batch API)")
    batch.add_argument("--url", default=os.environ.get("INFERQ_API_URL", DEFAULT_URL),
                       help="the API (env INFERQ_API_URL)")
    # Read from the environment when used (_client), not as the default: --help shows defaults, never a key.
    batch.add_argument("--api-key", help="bearer key (env INFERQ_API_KEY)")
    # The same flags after the verb too (`inferq batch submit f --url ...`); SUPPRESS, so that an absent one keeps
    # what was given before the verb (or the default above).
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--url", default=argparse.SUPPRESS,
                        help=f"the API (env INFERQ_API_URL; default: {DEFAULT_URL})")
    client.add_argument("--api-key", default=argparse.SUPPRESS, help="bearer key (env INFERQ_API_KEY)")
    verbs = batch.add_subparsers(dest="verb", required=True)

    def add_verb(name: str, func, help: str) -> argparse.ArgumentParser:
        verb = add_command(verbs, name, help=help, parents=[client])
        verb.set_defaults(func=_reaching_the_api(func))
        return verb

    p = add_verb("submit", submit, "upload a JSONL file and create a batch; prints its id")
    p.add_argument("file", help="JSONL, one request per line (OpenAI's batch input format)")
    p.add_argument("--endpoint", default="/v1/chat/completions", help="the lines' endpoint")
    p.add_argument("--completion-window", default="24h", help="after this the batch expires")
    p.add_argument("--wait", action="store_true", help="follow it with a progress bar until it ends")
    p = add_verb("status", status, "the batch object")
    p.add_argument("batch_id")
    p = add_verb("results", results, "download the output (and error) file")
    p.add_argument("batch_id")
    p.add_argument("-o", "--output", default="output.jsonl", help="where the output file goes")
    p.add_argument("-e", "--errors", help="also write the error file here")
    p = add_verb("cancel", cancel, "cancel a batch; finished results are kept")
    p.add_argument("batch_id")
