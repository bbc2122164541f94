"""/openapi.json of the running API: a valid OpenAPI document, typed bodies, the error statuses each route really
answers (in OpenAI's error shape, never FastAPI's 422), the bearer scheme on keyed routes; /docs and /redoc load
nothing from outside."""
from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from openapi_spec_validator import validate

from tests.service import Service, running

ERROR_REF = "#/components/schemas/ErrorResponse"
UNKEYED = {"/health", "/ready", "/metrics"}  # probes and scrapers hold no API key
# The error statuses each operation can answer (500 on every one: any route can fail unexpectedly).
ERRORS = {
    ("get", "/health"): {500},
    ("get", "/ready"): {500, 503},
    ("get", "/metrics"): {500, 503},
    ("get", "/v1/models"): {401, 500, 503},
    ("get", "/v1/models/{model}"): {401, 404, 500, 503},
    ("post", "/v1/completions"): {400, 401, 404, 409, 413, 429, 500, 503, 504},
    ("post", "/v1/chat/completions"): {400, 401, 404, 409, 413, 429, 500, 503, 504},
    ("post", "/v1/jobs"): {400, 401, 404, 413, 429, 500, 503},
    ("get", "/v1/jobs"): {400, 401, 500, 503},
    ("get", "/v1/jobs/{job_id}"): {400, 401, 404, 500, 503},
    ("post", "/v1/jobs/{job_id}/cancel"): {401, 404, 409, 500, 503},
    ("get", "/v1/jobs/{job_id}/events"): {401, 404, 500, 503},
    ("post", "/v1/files"): {400, 401, 413, 500, 503},
    ("get", "/v1/files"): {400, 401, 500, 503},
    ("get", "/v1/files/{file_id}"): {401, 404, 500, 503},
    ("delete", "/v1/files/{file_id}"): {401, 404, 500, 503},
    ("get", "/v1/files/{file_id}/content"): {401, 404, 500, 503},
    ("post", "/v1/batches"): {400, 401, 404, 413, 500, 503},
    ("get", "/v1/batches"): {400, 401, 500, 503},
    ("get", "/v1/batches/{batch_id}"): {401, 404, 500, 503},
    ("post", "/v1/batches/{batch_id}/cancel"): {401, 404, 409, 500, 503},
    ("post", "/tokenize"): {400, 401, 404, 413, 500, 503},
    ("post", "/detokenize"): {400, 401, 404, 413, 500, 503},
}


@pytest.fixture(scope="module")
def service(redis_url, tmp_path_factory) -> Iterator[Service]:
    """Only the API process: the document and the pages need no worker."""
    logs = tmp_path_factory.mktemp("openapi-logs")
    with running(Service(redis_url, model_dir=logs / "no-model", log_dir=logs), worker=False) as svc:
        yield svc


@pytest.fixture(scope="module")
def document(service: Service) -> dict:
    response = httpx.get(f"{service.url}/openapi.json")
    assert response.status_code == 200
    return response.json()


def operations(document: dict) -> Iterator[tuple[str, str, dict]]:
    for path, items in document["paths"].items():
        for method, operation in items.items():
            yield method, path, operation


def test_the_document_is_valid_openapi(document):
    validate(document)
    assert document["openapi"].startswith("3.1")
    assert {(m, p) for m, p, _ in operations(document)} == set(ERRORS)  # every route, none left out


def test_every_operation_documents_its_errors_in_openai_shape(document):
    for method, path, operation in operations(document):
        responses = operation["responses"]
        errors = {int(status) for status in responses if int(status) >= 400}
        assert errors == ERRORS[method, path], (method, path)
        for status in errors:
            if (path, status) == ("/ready", 503):  # a readiness probe answers its own body when not ready
                assert responses["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/Ready")
                continue
            assert responses[str(status)]["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}
    error = document["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) == {"message", "type", "param", "code"} and error["additionalProperties"] is False


def test_no_422_anywhere(document, service):
    text = httpx.get(f"{service.url}/openapi.json").text
    assert '"422"' not in text and "HTTPValidationError" not in text and "ValidationError" not in text
    # ... because validation errors are 400s:
    response = httpx.get(f"{service.url}/v1/jobs", params={"limit": 0},
                         headers={"Authorization": "Bearer key-alpha"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "query.limit"


def test_bodies_are_typed(document):
    schemas = document["components"]["schemas"]
    for method, path, operation in operations(document):
        for status, response in operation["responses"].items():
            for media_type, content in response.get("content", {}).items():
                schema = content["schema"]
                if media_type == "application/json":  # a named model, never a free-form object
                    assert set(schema) == {"$ref"}, (method, path, status)
                elif media_type == "text/event-stream":  # each event (as OpenAPI 3.2's itemSchema)
                    assert schema["title"] == "ServerSentEvent" and schema["required"] == ["data"]
                else:  # a file's content and the Prometheus text
                    assert schema["type"] == "string", (method, path, status, media_type)
    completion = document["paths"]["/v1/completions"]["post"]
    body = completion["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "prompt", "max_tokens", "temperature"} <= set(body["properties"])
    assert completion["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Completion")
    assert set(completion["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    jobs = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {s["$ref"].rsplit("/", 1)[1] for s in jobs["anyOf"]} == {"CompletionJob", "ChatJob"}
    assert {"webhook", "priority", "messages"} <= set(schemas["ChatJob"]["properties"])
    upload = document["paths"]["/v1/files"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in upload


def test_keyed_routes_declare_the_bearer_scheme(document):
    assert document["components"]["securitySchemes"] == {"HTTPBearer": {"type": "http", "scheme": "bearer"}}
    for method, path, operation in operations(document):
        if path in UNKEYED:
            assert "security" not in operation, path
        else:
            assert operation["security"] == [{"HTTPBearer": []}], (method, path)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_nothing_from_outside(service, page):
    with httpx.Client(base_url=service.url) as client:
        html = client.get(page)
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        assert not re.search(r"https?://", html.text), re.findall(r"https?://\S+", html.text)
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text)
        assert len(assets) >= 2  # the script (and the style or icon)
        for asset in assets:
            response = client.get(asset)
            assert response.status_code == 200 and len(response.content) > 0, asset
        # the page's script reads the document from here
        assert "/openapi.json" in html.text and client.get("/openapi.json").status_code == 200
