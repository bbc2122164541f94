"""The dashboard (api/dashboard.py) against the real service (Redis, a worker on the demo model, the batch and
webhook worker, the API): its JSON (keyed in OpenAI's error shape, scoped to the caller's jobs and batches), its
page and assets (nothing from outside), and the page itself in headless Chromium while a batch runs.

The browser is the system's Chromium (Debian's `chromium`: `make test` installs it as root when missing), driven by
Playwright without its own browser download; without a Chromium the browser test is skipped."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest

from api.registry import THROUGHPUT_BUCKET_S, THROUGHPUT_WINDOW_S, spread_tokens
from api.store import RECENT_JOBS
from tests.service import API_KEYS, MODEL, Service, wait_done

MAX_NUM_SEQS = 16
# The batch must still run while the page is checked (then it is cancelled): 600 lines of 8 tokens finished in 8 s
# on a 2-core machine, before the page looked; of 64 tokens, they take about a minute.
BATCH_LINES, BATCH_LINE_TOKENS = 600, 64
JOB = {"model": MODEL, "prompt": "def main():", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
SVG_NAMESPACE = "http://www.w3.org/2000/svg"  # a name, not a URL that is loaded


@pytest.fixture(scope="module")
def service(redis_url, demo_model_dir, tmp_path_factory):
    svc = Service(redis_url, demo_model_dir, tmp_path_factory.mktemp("dashboard-logs"))
    try:
        svc.start_worker(max_num_seqs=MAX_NUM_SEQS)
        svc.start_webhook_worker()  # it also runs the batch bookkeeping (expansion, finalizing)
        svc.start_api()
        yield svc
    finally:
        svc.stop()


def chromium() -> str | None:
    for name in (os.environ.get("INFERQ_CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def submit_jobs(client: httpx.Client, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        response = client.post("/v1/jobs", json=JOB)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def submit_batch(service: Service, lines: int) -> str:
    oai = openai.OpenAI(base_url=f"{service.url}/v1", api_key=API_KEYS[0], max_retries=0)
    text = "\n".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
                                 "body": {"model": MODEL, "prompt": f"line {i}:", "max_tokens": BATCH_LINE_TOKENS,
                                          "temperature": 0, "ignore_eos": True}}) for i in range(lines))
    file_id = oai.files.create(file=("lines.jsonl", io.BytesIO(text.encode())), purpose="batch").id
    return oai.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h").id


# ---- the throughput buckets ---------------------------------------------------------------------------------
def test_a_heartbeats_tokens_are_shared_among_the_buckets_it_spans():
    size = THROUGHPUT_BUCKET_S
    assert spread_tokens(100, 2 * size + 1, 2 * size + 3) == {2 * size: 100}  # within one bucket
    shares = spread_tokens(100, size - 1, size + 4)  # one second in the first bucket, four in the next
    assert shares == {0: 20, size: 80}
    odd = spread_tokens(12345, 3.3, 47.9)
    assert sum(odd.values()) == 12345 and set(odd) == {i * size for i in range(int(47.9 // size) + 1)}
    assert spread_tokens(0, 0, 10) == {} and spread_tokens(7, 10, 10) == {10 - 10 % size: 7}
    # A long gap (Redis was away): only the plotted window is written, at the interval's rate.
    gap = spread_tokens(3 * THROUGHPUT_WINDOW_S, 0, 3 * THROUGHPUT_WINDOW_S)
    assert len(gap) <= THROUGHPUT_WINDOW_S // size + 1 and sum(gap.values()) <= THROUGHPUT_WINDOW_S + 3 * size


# ---- the JSON -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [None, "not-a-key"], ids=["no-key", "wrong-key"])
def test_the_data_needs_a_key(service, key):
    with service.client(key) as client:
        response = client.get("/dashboard/data")
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"


def test_the_data_shows_workers_queues_the_callers_jobs_and_throughput(service):
    with service.client() as alpha, service.client(API_KEYS[1]) as beta:
        mine = submit_jobs(alpha, 3)
        theirs = submit_jobs(beta, 1)
        for job_id in mine + theirs:
            assert wait_done(alpha if job_id in mine else beta, job_id)["status"] == "succeeded"
        # Workers report with their heartbeats: the tokens reach the worker's row with the next one, and the plot
        # once their bucket has ended (and a heartbeat after it).
        deadline = time.monotonic() + 20
        while True:
            data = alpha.get("/dashboard/data").json()
            generated = sum(w["generated_tokens"] for w in data["workers"])
            if (generated >= 4 * JOB["max_tokens"] and sum(data["throughput"]["total"]) * THROUGHPUT_BUCKET_S
                    >= 4 * JOB["max_tokens"]) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        other = beta.get("/dashboard/data").json()

    assert data["object"] == "dashboard" and abs(data["now"] - time.time()) < 5
    [worker] = [w for w in data["workers"] if w["model"] == MODEL]
    assert worker["device"] == "cpu" and worker["dtype"] == "float32" and worker["load_in_low_bit"] is None
    assert worker["max_num_seqs"] == MAX_NUM_SEQS and 0 <= worker["running"] <= MAX_NUM_SEQS
    assert 0.0 <= worker["kv_cache_usage"] <= 1.0 and worker["kv_blocks"] > 0
    assert worker["generated_tokens"] >= 4 * JOB["max_tokens"] and worker["seen_s_ago"] < 5
    [queue] = [q for q in data["queues"] if q["model"] == MODEL]
    assert queue["workers"] == 1 and set(queue) == {"model", "workers", "interactive_queued", "interactive_running",
                                                     "bulk_pending", "bulk_in_flight"}

    # Only the caller's jobs, newest first, with their latencies.
    recent = [job["id"] for job in data["recent_jobs"]]
    assert recent[:3] == mine[::-1] and theirs[0] not in recent
    assert [job["id"] for job in other["recent_jobs"]][:1] == theirs and not set(mine) & {
        job["id"] for job in other["recent_jobs"]}
    job = data["recent_jobs"][0]
    assert job["status"] == "succeeded" and job["finished"] and job["completion_tokens"] == JOB["max_tokens"]
    assert job["model"] == MODEL and job["endpoint"] == "completions"
    assert 0 <= job["queued_s"] <= job["ttft_s"] <= job["latency_s"] < 60

    throughput = data["throughput"]
    times = throughput["times"]
    assert throughput["bucket_s"] == THROUGHPUT_BUCKET_S and len(times) == THROUGHPUT_WINDOW_S // THROUGHPUT_BUCKET_S
    assert times == list(range(times[0], times[0] + THROUGHPUT_WINDOW_S, THROUGHPUT_BUCKET_S))
    assert times[-1] + THROUGHPUT_BUCKET_S <= data["now"]  # only buckets that ended
    assert len(throughput["total"]) == len(times), throughput["total"][-10:]
    assert round(sum(throughput["total"]) * THROUGHPUT_BUCKET_S) == worker["generated_tokens"]  # each token once
    assert throughput["models"][MODEL] == throughput["total"]  # one model: its series is the total


def test_the_recent_jobs_index_is_capped_and_leaves_batch_lines_out(service):
    store, owner = service.store, "dashboard-cap-test"
    ids = [store.create(owner=owner, model="nobody-serves-this", endpoint="completions", request={})[0].id
           for _ in range(RECENT_JOBS + 5)]
    store.create(owner=owner, model="nobody-serves-this", endpoint="completions", request={}, bulk=True)
    assert store.r.zrevrange(store.recent_key(owner), 0, -1) == ids[::-1][:RECENT_JOBS]
    assert store.r.ttl(store.recent_key(owner)) > 0


def test_the_page_loads_only_its_own_assets(service):
    with httpx.Client(base_url=service.url) as client:
        page = client.get("/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assets = re.findall(r"""(?:src|href)=["'](/[^"']+)["']""", page.text)
        assert sorted(assets) == ["/dashboard/dashboard.css", "/dashboard/dashboard.js"]
        for text in [page.text] + [client.get(asset).text for asset in assets]:
            assert not re.findall(r"https?://", text.replace(SVG_NAMESPACE, ""))
        for asset, kind in zip(sorted(assets), ("text/css", "text/javascript")):
            response = client.get(asset)
            assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        missing = client.get("/dashboard/other.js")
        assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}


# ---- the page in a browser ----------------------------------------------------------------------------------
def test_the_dashboard_in_a_browser(service, tmp_path):
    executable = chromium()
    if executable is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; `make test` does it as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extras)")

    batch_id = submit_batch(service, BATCH_LINES)
    with service.client() as client:
        jobs = submit_jobs(client, 4)
    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            # The first poll, without a key, is a 401 (Chromium logs the failed load): anything else is a fault.
            page.on("console", lambda m: m.type == "error" and "401" not in m.text and errors.append(m.text))
            page.goto(f"{service.url}/dashboard")

            page.wait_for_selector("#key-form:not([hidden])", timeout=10_000)  # asks for the key
            page.fill("#key-input", API_KEYS[0])
            page.click("#key-submit")

            row = page.locator("#workers tbody tr[data-worker]").first
            row.wait_for(timeout=10_000)
            assert row.locator(".model").inner_text() == MODEL and row.locator(".device").inner_text() == "cpu"
            assert re.fullmatch(rf"\d+ / {MAX_NUM_SEQS}", row.locator(".batch-size .value").inner_text())
            assert page.locator("#queues tbody tr[data-model]").first.get_attribute("data-model") == MODEL

            batch = f'#batches .batch[data-batch="{batch_id}"]'
            # Generous waits: a busy 2-core machine can be slow to show the batch's first lines.
            page.wait_for_function(
                """sel => { const b = document.querySelector(sel);
                            return b && b.dataset.status === "in_progress"
                                   && Number(b.querySelector(".progress").dataset.completed) > 0; }""",
                arg=batch, timeout=90_000)
            counts = page.locator(f"{batch} .counts").inner_text()
            assert re.fullmatch(rf"\d+ completed · \d+ failed · {BATCH_LINES} total", counts), counts
            bar = page.locator(f"{batch} .progress .completed")
            assert bar.bounding_box()["width"] > 0
            assert "ETA" in page.locator(f"{batch} .meta").inner_text()

            page.wait_for_function(  # two buckets of tokens at least: a line, not a dot
                """() => [...document.querySelectorAll("#throughput path.series")]
                           .some(p => Number(p.dataset.nonzero) >= 2)""", timeout=90_000)
            path = page.locator("#throughput path.series").first
            assert int(path.get_attribute("data-points")) > 1 and path.get_attribute("d").count("L") > 1
            assert "tok/s" in page.locator("#tps-now").inner_text()

            rows = page.locator("#jobs tbody tr[data-job]")
            assert rows.count() >= len(jobs)
            assert set(jobs) <= {rows.nth(i).get_attribute("data-job") for i in range(rows.count())}

            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("INFERQ_SCREENSHOT_DIR"):
                target = Path(os.environ["INFERQ_SCREENSHOT_DIR"])
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, target / "dashboard.png")
            assert shot.stat().st_size > 10_000

            # The key is kept: a reload shows the data without asking again.
            assert page.evaluate("() => localStorage.getItem('inferq.dashboard.apiKey')") == API_KEYS[0]
            page.reload()
            page.locator("#workers tbody tr[data-worker]").first.wait_for(timeout=10_000)
            assert page.locator("#key-form").is_hidden()
        finally:
            browser.close()
    assert not errors, errors
    with service.client() as client:
        client.post(f"/v1/batches/{batch_id}/cancel")  # the rest of its lines need not run
