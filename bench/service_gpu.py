"""Throughput of the whole service against its own engine alone, on one GPU (the CPU: a smoke test of the script).

Workload: N requests (--requests, 1024) of random token-id prompts (64-512 tokens) and random max_tokens (16-256),
greedy, EOS ignored, seeded; random-weight Llama of --shape written to a temporary directory (or --model DIR).
  engine    engine.llm.LLM.generate on every request at once, in this process: the ceiling for the service. It
            stays loaded beside the service and runs before and after every path, so that its runs sample the
            whole bench. A path's share is its median over the rounds against the median of every offline run:
            on these hosts the same offline run takes 7 to 12 s from one run to the next, with no trend, so one
            pair of runs around a path is a poor reference (the table also shows that paired share).
Then the service, started from its command line as a user would (local Redis, `worker.cli worker`,
`webhook-worker` for batch bookkeeping, `api`), answers the same requests through each path of --paths:
  batch        one JSONL file, POST /v1/files + POST /v1/batches, polled until the batch ends (--timeout);
  completions  --clients concurrent clients of POST /v1/completions;
  jobs         --clients concurrent clients of POST /v1/jobs, each long-polling GET /v1/jobs/{id}?wait=60 (also
               reports where each job's time outside the engine went: submit, queued, to its first token, and
               from its end to the client's answer, median and p90 in ms);
  stream       --clients concurrent SSE streams of POST /v1/completions (include_usage);
  ttft         20 streamed requests one at a time (128-token prompt, 16 out) on the idle service, against the
               engine's own time to first token.
Each path reports out tok/s (completion tokens of its answers), its share of the engine's, the worker's median
engine batch size (GET /metrics, sampled every 0.5 s) and every answer that was not a success; with --rounds N
every path runs N times and the table shows medians (and the range of the shares). Clients run in
several processes (asyncio + httpx each) so that the client is never the limit. A benchmark: nothing is asserted.

    python bench/service_gpu.py --rounds 3                       # TinyLlama-1.1B shape on cuda
    python bench/service_gpu.py --shape llama2-7b --paths batch,stream
    python bench/service_gpu.py --shape tiny --device cpu --requests 48 --clients 16   # smoke test

Children's logs go to $OUT/service-logs (else a temporary directory, named at the end); numbers to
$OUT/service.json.
"""
from __future__ import annotations

import argparse, asyncio, gc, json, multiprocessing, os, queue, random, signal, statistics, subprocess, sys
import tempfile, threading, time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    # The demo model's tiny size (engine/demo_model.py): a smoke test of this script on the CPU.
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2000),
}
MODEL = "bench"
JOB_TERMINAL = {"succeeded", "failed", "cancelled"}
BATCH_TERMINAL = {"completed", "failed", "cancelled", "expired"}


def workload(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    r = random.Random(seed)
    return [([r.randrange(3, vocab) for _ in range(r.randint(64, 512))], r.randint(16, 256)) for _ in range(n)]


def ttft_prompts(vocab: int, n: int = 22) -> list[list[int]]:
    """The TTFT requests (the first two are warm-ups), the same for the engine and the service."""
    r = random.Random(2)
    return [[r.randrange(3, vocab) for _ in range(128)] for _ in range(n)]


def write_model(shape: str, out: Path, device: str) -> Path:
    """A random-weight Llama of `shape` saved by transformers, with a tokenizer of one word per token id."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32 if device == "cpu" else torch.bfloat16)
    try:
        with torch.device(device):  # on the GPU: a 7B model is built in seconds, on the CPU in minutes
            LlamaForCausalLM(LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)).save_pretrained(out)
    finally:
        torch.set_default_dtype(torch.float32)
    # The worker always loads a tokenizer, and a stream skips tokens that decode to no text: a borrowed tokenizer
    # smaller than the model's vocabulary would hide most tokens from SSE clients, so every id gets its own word.
    vocab = SHAPES[shape]["vocab_size"]
    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, vocab)}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out)
    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()
    return out


class OfflineEngine:
    """Path A, the ceiling: every request into one LLM.generate call. Loaded once and kept beside the service (each
    with --memory-share of the device's memory), so that an offline run comes right before and right after every
    path: the GPU hosts drift (the same offline steps have taken 8.9 to 19.5 ms each), and the offline runs then
    sample the same stretch of time as the paths."""

    def __init__(self, model_dir: Path, device: str, dtype: str, memory_share: float) -> None:
        from engine.llm import LLM
        from engine.sampling_params import SamplingParams

        self.llm = LLM(str(model_dir), device=device, dtype=dtype, max_num_seqs=256, max_num_batched_tokens=8192,
                       gpu_memory_utilization=memory_share)
        self.sampling = SamplingParams
        warm = [p for p, _ in workload(16, self.llm.engine.vocab_size, seed=1)]  # first-use costs, untimed
        self.llm.generate(warm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        self.steps, step = 0, self.llm.engine.step

        def counted_step():
            self.steps += 1
            return step()

        self.llm.engine.step = counted_step

    def run(self, reqs) -> dict:
        params = [self.sampling(temperature=0, max_tokens=m, ignore_eos=True) for _, m in reqs]
        steps, start = self.steps, time.monotonic()
        outs = self.llm.generate([p for p, _ in reqs], params)  # returns once every token is on the host
        seconds = time.monotonic() - start
        run = {"seconds": seconds, "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
               "steps": self.steps - steps}
        print(f"engine offline: {run['tokens'] / seconds:.0f} out tok/s, {seconds:.2f} s, {run['steps']} steps, "
              f"{1e3 * seconds / run['steps']:.1f} ms each", flush=True)
        return run

    def ttft(self, prompts: list[list[int]]) -> float:
        """The engine's time to first token of one request alone (p50, the first two untimed)."""
        engine, times = self.llm.engine, []
        for i, prompt in enumerate(prompts):
            start = time.monotonic()
            engine.add_request(f"ttft{i}", prompt, self.sampling(temperature=0, max_tokens=16, ignore_eos=True))
            first = None
            while engine.has_unfinished_requests():
                outputs = engine.step()  # with async scheduling a step may return nothing yet: time the first tokens
                if first is None and any(o.outputs[0].token_ids for o in outputs):
                    first = time.monotonic() - start
            times.append(first)
        return statistics.median(times[2:])


# ---- the service ----

def spawn(name: str, args: list[str], env: dict, log_dir: Path) -> subprocess.Popen:
    with open(log_dir / f"{name}.log", "ab") as log:
        # Own session: a Ctrl-C at the terminal reaches only this script, which then stops the children in order.
        return subprocess.Popen([sys.executable, "-m", "worker.cli", *args], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def start_service(model_dir: Path, device: str, dtype: str, redis_url: str, port: int, log_dir: Path,
                  children: dict, api_workers: int, memory_share: float) -> None:
    # /metrics shows the batch size of the worker's last heartbeat: beat every second (default 5) for 0.5 s samples.
    env = os.environ | {"INFERQ_REDIS_URL": redis_url, "INFERQ_API_KEYS": "", "PYTHONUNBUFFERED": "1",
                        "INFERQ_WORKER_HEARTBEAT_SECONDS": "1"}
    children["worker"] = spawn("worker", ["worker", "--model", str(model_dir), "--served-model-name", MODEL,
                                          "--device", device, "--dtype", dtype, "--max-num-seqs", "256",
                                          "--max-num-batched-tokens", "8192",
                                          "--gpu-memory-utilization", str(memory_share)], env, log_dir)
    children["webhook-worker"] = spawn("webhook-worker", ["webhook-worker"], env, log_dir)
    children["api"] = spawn("api", ["api", "--port", str(port), "--workers", str(api_workers)], env, log_dir)


def wait_ready(url: str, children: dict, log_dir: Path, timeout: float = 900) -> None:
    """Until GET /v1/models lists the model (the worker has loaded it and announced itself)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, child in children.items():
            if child.poll() is not None:
                tail = (log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {child.returncode} while starting; its log ends:\n{tail}")
        try:
            if any(m["id"] == MODEL for m in httpx.get(f"{url}/v1/models", timeout=5).json()["data"]):
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(1)
    raise TimeoutError(f"the service did not list model {MODEL!r} within {timeout:.0f} s; logs in {log_dir}")


def stop_children(children: dict) -> None:
    """SIGTERM (Celery's warm shutdown, uvicorn's graceful one), API first; SIGKILL what lingers after 30 s."""
    for child in children.values():
        if child.poll() is None:
            child.terminate()
    for child in children.values():
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples whose labels include `labels`."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(w in line for w in want))


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each named process with its children (the API's `--workers`),
    except the worker, whose children are counted apart as "engine" (its engine process); and by the whole
    machine ("machine")."""
    import psutil

    def used(processes) -> float:
        total = 0.0
        for process in processes:
            try:
                total += sum(process.cpu_times()[:2])
            except psutil.Error:
                pass
        return total

    seconds = {}
    for name, pid in pids.items():
        try:
            parent = psutil.Process(pid)
            children = parent.children(recursive=True)
        except psutil.Error:
            seconds[name] = 0.0
            continue
        if name == "worker":
            seconds["worker"], seconds["engine"] = used([parent]), used(children)
        else:
            seconds[name] = used([parent, *children])
    times = psutil.cpu_times()
    seconds["machine"] = sum(times) - times.idle - getattr(times, "iowait", 0.0)
    return seconds


@contextmanager
def probe(url: str, pids: dict[str, int]):
    """While the block runs: the worker's engine batch size, sampled from GET /metrics every 0.5 s; its steps and
    the time inside them; the CPU (in cores) each service process used."""
    found = {"batch_sizes": []}
    stop = threading.Event()

    def counters(client) -> tuple[float, float]:
        text = client.get("/metrics").text
        return (metric(text, "inferq_worker_engine_steps_total", model=MODEL),
                metric(text, "inferq_worker_engine_busy_seconds_total", model=MODEL))

    def sample() -> None:
        with httpx.Client(base_url=url, timeout=5) as client:
            while not stop.wait(0.5):
                try:
                    found["batch_sizes"].append(metric(client.get("/metrics").text, "inferq_worker_batch_size",
                                                       model=MODEL))
                except httpx.HTTPError:
                    pass

    with httpx.Client(base_url=url, timeout=10) as client:
        steps0, busy0 = counters(client)
    cpu0, start = cpu_seconds(pids), time.monotonic()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        stop.set()
        thread.join()
        wall = time.monotonic() - start
        cpu1 = cpu_seconds(pids)
        found["cpu_cores"] = {name: round((cpu1[name] - cpu0[name]) / wall, 2) for name in cpu1}
        time.sleep(1.5)  # the worker announces its counters every second
        with httpx.Client(base_url=url, timeout=10) as client:
            steps1, busy1 = counters(client)
        found["engine_steps"], found["engine_busy_s"] = steps1 - steps0, round(busy1 - busy0, 3)


def wait_idle(url: str, timeout: float = 300) -> None:
    """Until no job is queued or running, so that a path that gave up does not slow the next one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"{url}/metrics", timeout=10).text
            if "inferq_jobs{" in text and metric(text, "inferq_jobs", model=MODEL) == 0:
                return
        except httpx.HTTPError as exc:
            print(f"warning: GET /metrics failed: {exc!r}", flush=True)
        time.sleep(1)
    print(f"warning: jobs still queued or running after {timeout:.0f} s", flush=True)


# ---- client paths: one request each, returning (HTTP statuses, completion tokens, error or None) ----

async def call_completions(client: httpx.AsyncClient, body: dict):
    r = await client.post("/v1/completions", json=body)
    if r.status_code != 200:
        return [r.status_code], 0, r.text[:300]
    return [200], r.json()["usage"]["completion_tokens"], None


PHASES: dict = {}  # per client process: job id -> where its time went (call_jobs), read back by drive()


async def call_jobs(client: httpx.AsyncClient, body: dict):
    sent = time.time()
    r = await client.post("/v1/jobs", json=body)
    codes = [r.status_code]
    while r.status_code in (200, 202) and r.json()["status"] not in JOB_TERMINAL:
        r = await client.get(f"/v1/jobs/{r.json()['id']}", params={"wait": 60})
        codes.append(r.status_code)
    if r.status_code not in (200, 202):
        return codes, 0, r.text[:300]
    job = r.json()
    if job["status"] != "succeeded":
        return codes, 0, f"job {job['status']}: {job.get('error')}"
    # Wall-clock stamps of one machine: the client's and the job record's (API, worker) agree.
    PHASES[job["id"]] = {"submit": job["created_at"] - sent, "queued": job["started_at"] - job["created_at"],
                         "first_token": job["first_token_at"] - job["started_at"],
                         "answer": time.time() - job["finished_at"]}
    return codes, job["usage"]["completion_tokens"], None


async def call_stream(client: httpx.AsyncClient, body: dict):
    body = body | {"stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return [r.status_code], 0, (await r.aread()).decode(errors="replace")[:300]
        tokens, error, done = 0, None, False
        async for line in r.aiter_lines():  # every event, to the end, as a real client reads them
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = f"error event: {chunk['error']}"
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return [200], tokens, error or (None if done else "stream ended without [DONE]")


CALLS = {"completions": call_completions, "jobs": call_jobs, "stream": call_stream}


async def drive(url: str, kind: str, bodies: list[dict], lanes: int, counter, barrier, deadline_s: float) -> list:
    """`lanes` clients in this process, each taking the next request of all processes' shared counter."""
    limits = httpx.Limits(max_connections=lanes, max_keepalive_connections=lanes)
    records = []
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900, connect=60), limits=limits) as client:
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)  # all processes start together
        deadline = time.monotonic() + deadline_s

        async def lane() -> None:
            while time.monotonic() < deadline:
                with counter.get_lock():
                    index = counter.value
                    counter.value += 1
                if index >= len(bodies):
                    return
                start = time.monotonic()
                try:
                    codes, tokens, error = await asyncio.wait_for(CALLS[kind](client, bodies[index]),
                                                                  max(1.0, deadline - start))
                except Exception as exc:  # noqa: BLE001 - a timeout, a lost connection, a malformed answer: all count
                    codes, tokens, error = [type(exc).__name__], 0, repr(exc)[:300]
                records.append({"start": start, "end": time.monotonic(), "codes": codes, "tokens": tokens,
                                "error": error})

        await asyncio.gather(*(lane() for _ in range(lanes)))
    if PHASES and records:
        records[0]["phases"] = list(PHASES.values())
    return records


def client_process(url, kind, bodies, lanes, counter, barrier, results, deadline_s) -> None:
    results.put(asyncio.run(drive(url, kind, bodies, lanes, counter, barrier, deadline_s)))


def run_clients(url: str, kind: str, bodies: list[dict], clients: int, procs: int, timeout: float) -> dict:
    ctx = multiprocessing.get_context("spawn")  # never fork this process: it has held the GPU
    n = min(procs, clients)
    counter, barrier, results = ctx.Value("i", 0), ctx.Barrier(n + 1), ctx.Queue()
    workers = [ctx.Process(target=client_process, daemon=True,
                           args=(url, kind, bodies, clients // n + (p < clients % n), counter, barrier, results,
                                 timeout)) for p in range(n)]
    for w in workers:
        w.start()
    try:
        barrier.wait(timeout=120)
        records, pending = [], n
        while pending:
            try:
                records += results.get(timeout=5)
                pending -= 1
            except queue.Empty:
                if not any(w.is_alive() for w in workers):
                    raise RuntimeError(f"{pending} client processes ended without results") from None
    except BaseException:  # Ctrl-C or a broken client: stop the clients now, not after their requests
        for w in workers:
            w.terminate()
        raise
    for w in workers:
        w.join(timeout=10)
    if not records:
        raise RuntimeError("no request was sent")
    ok = [r for r in records if r["error"] is None]
    result = {"seconds": max(r["end"] for r in records) - min(r["start"] for r in records),
              "tokens": sum(r["tokens"] for r in records), "done": len(ok), "errors": len(records) - len(ok),
              "codes": Counter(str(c) for r in records for c in r["codes"]),
              "first_errors": [r["error"] for r in records if r["error"]][:5]}
    phases = [p for r in records for p in r.get("phases", ())]
    if phases:  # /v1/jobs: where a job's time outside the engine went, median and 90th percentile in ms
        result["phases_ms"] = {name: [round(1e3 * statistics.median(values), 1),
                                      round(1e3 * statistics.quantiles(values, n=10)[-1], 1)]
                               for name in phases[0] for values in [[p[name] for p in phases]]}
    if len(records) < len(bodies):
        result["note"] = f"(did not finish: {len(ok)} of {len(bodies)} done in {timeout:g} s)"
    return result


def checked(r: httpx.Response, codes: Counter) -> dict:
    codes[str(r.status_code)] += 1
    if r.status_code != 200:
        raise RuntimeError(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:300]}")
    return r.json()


def run_batch(url: str, bodies: list[dict], timeout: float) -> dict:
    """The Batch API, timed from the batch's creation to its end. Batch lines may fill at most three quarters of the
    worker's sequences (api/lanes.py keeps the rest for interactive work): its batch median is at most 192 of 256."""
    codes = Counter()
    with httpx.Client(base_url=url, timeout=120) as client:
        lines = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": b})
                        + "\n" for i, b in enumerate(bodies))
        upload = checked(client.post("/v1/files", data={"purpose": "batch"},
                                     files={"file": ("bench.jsonl", lines.encode())}), codes)
        start = time.monotonic()
        batch = checked(client.post("/v1/batches", json={"input_file_id": upload["id"], "endpoint": "/v1/completions",
                                                         "completion_window": "24h"}), codes)
        while batch["status"] not in BATCH_TERMINAL and time.monotonic() - start < timeout:
            time.sleep(0.1)  # the batch's own timestamps are whole seconds: poll often enough to time ~10 s
            batch = checked(client.get(f"/v1/batches/{batch['id']}"), codes)
        seconds, counts = time.monotonic() - start, batch["request_counts"]
        result = {"seconds": seconds, "status": batch["status"], "done": counts["completed"],
                  "errors": counts["failed"], "tokens": 0, "codes": codes}
        if batch["status"] not in BATCH_TERMINAL:
            checked(client.post(f"/v1/batches/{batch['id']}/cancel"), codes)
            result["note"] = f"(did not finish: {counts['completed']} of {len(bodies)} done in {timeout:g} s)"
            return result
        if batch.get("output_file_id"):
            content = client.get(f"/v1/files/{batch['output_file_id']}/content")
            codes[str(content.status_code)] += 1
            for line in content.text.splitlines():
                response = json.loads(line)["response"]
                if response["status_code"] == 200:
                    result["tokens"] += response["body"]["usage"]["completion_tokens"]
        if batch["status"] != "completed":
            result["note"] = f"(batch {batch['status']})"
        return result


def run_ttft(url: str, prompts: list[list[int]]) -> dict:
    """Streamed requests one at a time: time to the first chunk that carries a choice (the first two warm up)."""
    codes, times = Counter(), []
    with httpx.Client(base_url=url, timeout=120) as client:
        for prompt in prompts:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            start, first = time.monotonic(), None
            with client.stream("POST", "/v1/completions", json=body) as r:
                codes[str(r.status_code)] += 1
                for line in r.iter_lines():
                    if first is None and line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                        first = time.monotonic() - start
            times.append(first)
    measured = [t for t in times[2:] if t is not None]
    return {"ttft_s": statistics.median(measured) if measured else None, "errors": len(times[2:]) - len(measured),
            "codes": codes}


# ---- report ----

def tok_s(result: dict) -> float:
    return result["tokens"] / result["seconds"]


def row(name: str, rounds: list[dict], reference: float) -> str:
    failed = [r["failed"] for r in rounds if "failed" in r]
    if failed:
        return f"| {name} | FAILED: {failed[0]} |"
    shares = [tok_s(r) / reference for r in rounds]
    share = (f"{statistics.median(shares):.2f}" + (f" ({min(shares):.2f}-{max(shares):.2f})" if len(shares) > 1 else ""))
    paired = statistics.median(r["paired_share"] for r in rounds)
    batches = [b for r in rounds for b in r.get("batch_sizes", [])]
    steps = statistics.median(r["engine_steps"] for r in rounds)
    ms = statistics.median(1e3 * r["engine_busy_s"] / max(r["engine_steps"], 1) for r in rounds)
    busy = statistics.median(r["engine_busy_s"] / r["seconds"] for r in rounds)
    statuses = Counter()
    for r in rounds:
        statuses.update(r["codes"])
    return (f"| {name} | {statistics.median(tok_s(r) for r in rounds):.0f} | "
            f"{share} | {paired:.2f} | {steps:.0f} ({ms:.1f}) | "
            f"{busy:.0%} | {f'{statistics.median(batches):.0f}' if batches else '-'} | {sum(r['errors'] for r in rounds)} | "
            f"{' '.join(f'{code}x{n}' for code, n in sorted(statuses.items()))} |")


def print_report(report: dict) -> None:
    paths, offline = report["paths"], report["engine_runs"]
    print(f"\n== service vs engine, {report['device_name']}, {report['shape']}, {report['requests']} requests, "
          f"{report['clients']} clients, {report['api_workers']} API process(es), {report['rounds']} round(s) ==")
    reference = statistics.median(map(tok_s, offline))
    print(f"engine offline: {len(offline)} runs, median {reference:.0f} out tok/s "
          f"({min(map(tok_s, offline)):.0f}-{max(map(tok_s, offline)):.0f}; "
          f"{statistics.median(r['steps'] for r in offline):.0f} steps)")
    print("| path | out tok/s | share of the engine offline (range) | paired share | engine steps (ms each) "
          "| engine busy | engine batch median | errors | HTTP statuses |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rounds in paths.items():
        if name != "ttft":
            print(row(name, rounds, reference))
        for r in rounds:
            if r.get("first_errors"):
                print(f"  {name}, first errors: {r['first_errors']}")
    ttft = paths.get("ttft", [{}])[0]
    if ttft.get("ttft_s") is not None:
        engine = report["engine_ttft_s"]
        print(f"TTFT p50 (128-token prompt, idle): engine {1e3 * engine:.1f} ms, service "
              f"{1e3 * ttft['ttft_s']:.1f} ms, difference {1e3 * (ttft['ttft_s'] - engine):.1f} ms; "
              f"{ttft['errors']} errors, HTTP statuses {dict(ttft['codes'])}")
    elif ttft:
        print(f"TTFT: {ttft.get('failed') or 'no request produced a token'}")


def run_path(args, name: str, url: str, bodies: list[dict], prompts: list[list[int]], pids: dict[str, int]) -> dict:
    print(f"path {name} ...", flush=True)
    try:
        with probe(url, pids) as found:
            if name == "batch":
                result = run_batch(url, bodies, args.timeout)
            elif name == "ttft":
                result = run_ttft(url, prompts)
            else:
                result = run_clients(url, name, bodies, args.clients, args.client_procs, args.timeout)
        result |= found
    except Exception as exc:  # report the path and go on with the others
        result = {"failed": f"{type(exc).__name__}: {exc}"}
    print(f"path {name}: { {k: v for k, v in result.items() if k != 'batch_sizes'} }", flush=True)
    if "engine_steps" in result:
        steps, busy = result["engine_steps"], result["engine_busy_s"]
        print(f"  engine: {steps:.0f} steps, {1e3 * busy / max(steps, 1):.1f} ms each, busy {busy:.1f} s of "
              f"{result.get('seconds', 0):.1f} s; CPU cores used: {result['cpu_cores']}", flush=True)
    wait_idle(url)
    return result


def completion_bodies(reqs: list[tuple[list[int], int]]) -> list[dict]:
    """The workload's (prompt, max_tokens) pairs as greedy /v1/completions bodies that ignore EOS."""
    return [{"model": MODEL, "prompt": p, "max_tokens": m, "temperature": 0, "ignore_eos": True} for p, m in reqs]


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and the client load, shared with bench/scale_out.py."""
    parser.add_argument("--shape", default="tinyllama-1.1b", choices=SHAPES)
    parser.add_argument("--model", help="an existing HF checkpoint directory (with its tokenizer) instead")
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--client-procs", type=int, default=8, help="processes the clients are spread over")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a run gives up")
    parser.add_argument("--api-workers", type=int, default=1, help="API processes (`inferq api --workers`)")


def run_paths(args, url: str, reqs, prompts: list[list[int]], pids: dict[str, int], offline: OfflineEngine,
              offline_runs: list[dict]) -> dict:
    """Every path --rounds times, each between two offline runs (its paired share: tokens over the mean time of
    those two). TTFT runs once."""
    bodies = completion_bodies(reqs)
    # Untimed, as the engine's warm-up: the worker's first prefills of each size pay for kernel compilation.
    warm = [b | {"max_tokens": 8} for b in bodies[:16]]
    try:
        print(f"warm-up: {run_clients(url, 'completions', warm, len(warm), 1, args.timeout)}", flush=True)
    except Exception as exc:  # the paths will show what is wrong
        print(f"warm-up failed: {exc!r}", flush=True)
    results: dict[str, list[dict]] = {name: [] for name in args.paths}
    if "ttft" in results:
        results["ttft"].append(run_path(args, "ttft", url, bodies, prompts, pids))
    offline_runs.append(offline.run(reqs))
    for _ in range(args.rounds):
        for name in (n for n in args.paths if n != "ttft"):
            result = run_path(args, name, url, bodies, prompts, pids)
            offline_runs.append(offline.run(reqs))
            if "failed" not in result:
                around = statistics.mean(r["seconds"] for r in offline_runs[-2:])
                result["paired_share"] = tok_s(result) * around / offline_runs[-1]["tokens"]
            results[name].append(result)
    return results


def parse_args() -> argparse.Namespace:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_load_arguments(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=1, help="times each path runs (the table shows medians)")
    parser.add_argument("--memory-share", type=float, default=0.4,
                        help="the device's memory for each of the two engines (offline, the service's)")
    parser.add_argument("--paths", default="batch,completions,jobs,stream,ttft",
                        type=lambda s: [p for p in s.split(",") if p])
    args = parser.parse_args()
    unknown = set(args.paths) - {"batch", "completions", "jobs", "stream", "ttft"}
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}")
    return args


def main() -> int:
    args = parse_args()
    import torch
    from api.local_redis import free_port, start_redis

    def interrupt(signum, frame):  # SIGTERM stops everything in order, as Ctrl-C does
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    log_dir = out / "service-logs" if out else Path(tempfile.mkdtemp(prefix="inferq-service-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    shape = Path(args.model).name if args.model else args.shape
    report = {"shape": shape, "device": args.device, "requests": args.requests, "clients": args.clients,
              "api_workers": args.api_workers, "rounds": args.rounds,
              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device}
    with tempfile.TemporaryDirectory(prefix="inferq-bench-model-") as tmp:
        model_dir = Path(args.model) if args.model else write_model(args.shape, Path(tmp) / shape, args.device)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        reqs, prompts = workload(args.requests, vocab), ttft_prompts(vocab)
        print(f"workload: {len(reqs)} requests, {sum(len(p) for p, _ in reqs)} prompt tokens, "
              f"{sum(m for _, m in reqs)} output tokens; model {shape} in {dtype} on {args.device}", flush=True)
        offline = OfflineEngine(model_dir, args.device, dtype, args.memory_share)
        report["engine_ttft_s"] = offline.ttft(prompts)
        report["engine_runs"] = []
        children, redis = {}, start_redis()
        try:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            start_service(model_dir, args.device, dtype, redis.url, port, log_dir, children, args.api_workers,
                          args.memory_share)
            wait_ready(url, children, log_dir)
            pids = {name: child.pid for name, child in children.items()} | {"redis": redis.process.pid}
            report["paths"] = run_paths(args, url, reqs, prompts, pids, offline, report["engine_runs"])
        finally:
            stop_children(children)
            redis.stop()
    print_report(report)
    print(f"service logs: {log_dir}")
    if out:
        (out / "service.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
