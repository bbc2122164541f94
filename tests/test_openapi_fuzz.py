"""Fuzz the real service (Redis, worker, API) through its own /openapi.json with schemathesis 4: every operation
gets valid and invalid requests (examples, coverage and fuzzing phases, a bounded number each), then sequences of
calls pass real ids between operations. No reply is a 5xx, every 4xx is in OpenAI's error shape, every reply
matches what the document says (status, content type, schema; keyed routes refuse a missing or wrong key), and the
worker still serves a normal completion afterwards."""
from __future__ import annotations

import time
from collections import Counter

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_schema_conformance,
    status_code_conformance,
)

from api.main import create_app
from api.settings import Settings
from tests.service import API_KEYS, MODEL, Service, running
from tests.test_service import COMPLETION

pytestmark = pytest.mark.load

# Per operation and phase, and the stateful sequences: about two minutes in all on two cores. Deterministic (the
# same inputs every run), so that a failure reproduces and the suite does not fail at random on a new find.
MAX_EXAMPLES = 200
# Not negative_data_rejection: request bodies are parsed in pydantic's lax mode, as by vLLM, so `"n": 1.0`,
# `"echo": 0` or `"priority": false` are accepted as 1, false and 0 although the document says integer or boolean.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          ignored_auth]
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/jobs")
WORKFLOWS, STEPS = 100, 8  # sequences of calls, and calls in each
MAX_TOKENS = 8  # generated lengths are capped: the fuzz is about the API, not about the engine's speed


@pytest.fixture(scope="module")
def service(redis_url, demo_model_dir, tmp_path_factory):
    with running(Service(redis_url, demo_model_dir, tmp_path_factory.mktemp("fuzz-logs"))) as svc:
        yield svc


def the_document() -> dict:
    """/openapi.json as the API builds it (no connection is made: Redis and Celery clients connect lazily).
    Needed at import time, before the service runs: schemathesis makes one test per operation while pytest
    collects (its fixture-based loader, schemathesis.pytest.from_fixture, fails on pytest 9.2: it reads
    Node._nodeid, which pytest no longer has). test_the_service_serves_this_document checks that the running API
    serves this same document."""
    return create_app(Settings(redis_url="redis://127.0.0.1:1")).openapi()


schema = schemathesis.openapi.from_dict(the_document())
schema.config.phases.update(phases=["examples", "coverage", "fuzzing", "stateful"])
# The key is sent with every call (not generated: a random bearer token is only ever a 401).
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=MAX_EXAMPLES,
                                with_security_parameters=False, deterministic=True, database="none")
AUTH = {"Authorization": f"Bearer {API_KEYS[0]}"}
FUZZED: Counter = Counter()  # test_fuzz's ("POST /v1/completions", 200) -> how many: did it reach the worker?


def test_the_service_serves_this_document(service):
    with service.client() as client:
        assert client.get("/openapi.json").json() == the_document()


def aim_at_the_worker(case) -> None:
    """Generated model names are random (a 404 before anything runs): name the served model instead, and cap the
    lengths, so that valid bodies reach the worker and the engine."""
    if case.path not in GENERATION_PATHS or not isinstance(case.body, dict):
        return
    body = case.body
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    for field in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(field), int) and body[field] > MAX_TOKENS:
            body[field] = MAX_TOKENS
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:  # else: up to the context
        body["max_tokens"] = MAX_TOKENS


def check(case, response) -> None:
    case.validate_response(response, checks=CHECKS, headers=AUTH)  # ignored_auth then retries without the key
    if 400 <= response.status_code < 500:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, response.text
        assert isinstance(error["message"], str) and error["message"], response.text


@schema.parametrize()
def test_fuzz(case, service):
    aim_at_the_worker(case)
    response = case.call(base_url=service.url, headers=AUTH, timeout=60)
    FUZZED[f"{case.method.upper()} {case.path}", response.status_code] += 1
    check(case, response)


def test_workflows(service):
    """Sequences of calls that pass real ids from one reply to the next (links schemathesis infers from the
    document: a created job's id to its GET, cancel and events; a file's to its GET, DELETE and content; a
    batch's to its GET and cancel), so the routes behind an id are fuzzed with ids that exist."""

    class Workflow(schema.as_state_machine()):
        def before_call(self, case):
            aim_at_the_worker(case)

        def get_call_kwargs(self, case):
            return {"base_url": service.url, "headers": AUTH, "timeout": 60}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            check(case, response)

    Workflow.run(settings=hypothesis.settings(max_examples=WORKFLOWS, stateful_step_count=STEPS, deadline=None,
                                              derandomize=True, database=None,
                                              suppress_health_check=list(hypothesis.HealthCheck)))


def test_the_worker_still_serves_after_the_fuzz(service):
    # Runs after test_fuzz (file order): jobs the fuzz queued may still be running, so allow for them.
    if FUZZED:  # test_fuzz ran: its valid bodies were run by the engine, not all refused before it
        assert FUZZED["POST /v1/completions", 200] and FUZZED["POST /v1/chat/completions", 200], FUZZED
        assert FUZZED["POST /v1/jobs", 202] and FUZZED["POST /v1/files", 200], FUZZED
    deadline = time.monotonic() + 120
    with service.client() as client:
        while True:
            response = client.post("/v1/completions", json=COMPLETION)
            if response.status_code != 429 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == COMPLETION["max_tokens"]
        assert client.get("/ready").json()["status"] == "ready"
