"""The Batch API end to end: files in, jobs through the real queue and worker, output and error files out."""
from __future__ import annotations

import io
import json
import time

import openai
import pytest

from tests.service import API_KEYS, MODEL, Service


@pytest.fixture(scope="module")
def service(redis_url, demo_model_dir, tmp_path_factory):
    svc = Service(redis_url, demo_model_dir, tmp_path_factory.mktemp("batch-logs"))
    try:
        svc.start_worker(max_num_seqs=32)
        svc.start_webhook_worker()
        svc.start_api()
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def oai(service):
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=API_KEYS[0], max_retries=0)


def line(custom_id: str, prompt: str = "Hello", max_tokens: int = 4, **extra) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}}


def upload(oai, lines: list) -> str:
    text = "\n".join(item if isinstance(item, str) else json.dumps(item) for item in lines) + "\n"
    return oai.files.create(file=("input.jsonl", io.BytesIO(text.encode())), purpose="batch").id


def wait_for(oai, batch_id: str, statuses=("completed", "failed", "cancelled", "expired"), timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = oai.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} still {batch.status}")


def read_lines(oai, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in oai.files.content(file_id).content.decode().splitlines() if x]


def test_openai_client_batch_round_trip(oai):
    file_id = upload(oai, [line(f"req-{i}", f"prompt {i}") for i in range(20)])
    batch = oai.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h",
                               metadata={"purpose": "test"})
    assert batch.status == "validating" and batch.metadata == {"purpose": "test"}
    done = wait_for(oai, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 20 and done.request_counts.failed == 0
    outputs = read_lines(oai, done.output_file_id)
    assert sorted(o["custom_id"] for o in outputs) == sorted(f"req-{i}" for i in range(20))
    for output in outputs:
        assert output["response"]["status_code"] == 200 and output["error"] is None
        assert output["response"]["body"]["object"] == "text_completion"
    assert oai.batches.list().data[0].id == batch.id


def test_malformed_lines_are_reported_and_the_rest_runs(oai):
    lines = [line("ok-1"), "{not json", {**line("bad-method"), "method": "GET"}, {**line("bad-url"), "url": "/v1/x"},
             {k: v for k, v in line("x").items() if k != "custom_id"}, line("ok-1"),
             line("bad-body", temperature=5), line("bad-model") | {"body": {**line("m")["body"], "model": "nope"}},
             line("ok-2")]
    done = wait_for(oai, oai.batches.create(input_file_id=upload(oai, lines), endpoint="/v1/completions",
                                            completion_window="24h").id)
    assert (done.status, done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == ("completed", 9, 2, 7)
    assert sorted(o["custom_id"] for o in read_lines(oai, done.output_file_id)) == ["ok-1", "ok-2"]
    errors = {e["error"]["message"].split(":")[0]: e for e in read_lines(oai, done.error_file_id)}
    assert set(errors) == {f"line {n}" for n in (2, 3, 4, 5, 6, 7, 8)}
    assert "duplicate" in errors["line 6"]["error"]["message"]
    assert "temperature" in errors["line 7"]["error"]["message"]


def test_cancel_keeps_finished_results(oai, service):
    lines = [line(f"quick-{i}", max_tokens=2) for i in range(4)]
    lines += [line(f"slow-{i}", max_tokens=1500, ignore_eos=True) for i in range(60)]
    batch = oai.batches.create(input_file_id=upload(oai, lines), endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while oai.batches.retrieve(batch.id).request_counts.completed < 4:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert oai.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = wait_for(oai, batch.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    outputs, errors = read_lines(oai, done.output_file_id), read_lines(oai, done.error_file_id)
    ids = [o["custom_id"] for o in outputs + errors]
    assert sorted(ids) == sorted(x["custom_id"] for x in lines)  # every line exactly once
    assert {f"quick-{i}" for i in range(4)} <= {o["custom_id"] for o in outputs}
    assert all(e["error"]["code"] == "batch_cancelled" for e in errors)


def test_expiry_reports_unfinished_lines_as_expired(oai):
    lines = [line("fast", max_tokens=2)] + [line(f"long-{i}", max_tokens=1500, ignore_eos=True) for i in range(40)]
    batch = oai.batches.create(input_file_id=upload(oai, lines), endpoint="/v1/completions", completion_window="4s")
    time.sleep(5)
    done = wait_for(oai, batch.id)
    assert done.status == "expired" and done.expired_at is not None
    outputs, errors = read_lines(oai, done.output_file_id), read_lines(oai, done.error_file_id)
    assert "fast" in {o["custom_id"] for o in outputs}
    assert len(outputs) + len(errors) == 41
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}


def test_two_thousand_lines_are_all_accounted_for(oai):
    lines = [line(f"n{i}", f"{i}", max_tokens=1) for i in range(2000)]
    done = wait_for(oai, oai.batches.create(input_file_id=upload(oai, lines), endpoint="/v1/completions",
                                            completion_window="24h").id, timeout=300)
    assert done.status == "completed" and done.request_counts.completed == 2000
    assert len({o["custom_id"] for o in read_lines(oai, done.output_file_id)}) == 2000


def test_batch_errors_in_openai_shape(oai):
    with pytest.raises(openai.NotFoundError):
        oai.batches.create(input_file_id="file-nope", endpoint="/v1/completions", completion_window="24h")
    file_id = upload(oai, [line("a")])
    with pytest.raises(openai.BadRequestError):
        oai.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        oai.batches.retrieve("batch_nope")


def test_command_line_submit_wait_results(service, tmp_path):
    import subprocess
    import sys

    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(line(f"c{i}")) for i in range(5)) + "\n")
    env = {**service.env, "INFERQ_API_URL": service.url, "INFERQ_API_KEY": API_KEYS[0]}
    cli = [sys.executable, "-m", "worker.cli", "batch"]
    submitted = subprocess.run([*cli, "submit", str(source), "--endpoint", "/v1/completions", "--wait"], env=env,
                               capture_output=True, text=True, timeout=180)
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    assert "completed" in submitted.stderr  # the progress bar's final state
    status = subprocess.run([*cli, "status", batch_id], env=env, capture_output=True, text=True, timeout=60)
    assert json.loads(status.stdout)["request_counts"]["completed"] == 5
    out = tmp_path / "out.jsonl"
    fetched = subprocess.run([*cli, "results", batch_id, "-o", str(out)], env=env, capture_output=True, text=True,
                             timeout=60)
    assert fetched.returncode == 0, fetched.stderr
    assert sorted(json.loads(x)["custom_id"] for x in out.read_text().splitlines()) == [f"c{i}" for i in range(5)]
    cancelled = subprocess.run([*cli, "cancel", batch_id], env=env, capture_output=True, text=True, timeout=60)
    assert cancelled.returncode != 0 and "cannot be cancelled" in cancelled.stderr



def test_worker_killed_mid_batch_loses_and_repeats_nothing(oai, service):
    lines = [line(f"k{i}", f"line {i}", max_tokens=120, ignore_eos=True) for i in range(40)]
    batch = oai.batches.create(input_file_id=upload(oai, lines), endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 120
    while oai.batches.retrieve(batch.id).request_counts.completed < 5:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    service.kill_worker()
    service.start_worker(max_num_seqs=32)
    done = wait_for(oai, batch.id, timeout=240)
    assert done.status == "completed" and done.request_counts.completed == 40 and done.request_counts.failed == 0
    outputs = read_lines(oai, done.output_file_id)
    assert sorted(o["custom_id"] for o in outputs) == sorted(x["custom_id"] for x in lines)  # each line once
