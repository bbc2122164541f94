"""The Files API: FileStore against the real Redis, then the real API process (no worker needed) through httpx and
the official `openai` client, including a 50,000-line upload that must not sit whole in the API's memory."""
from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from api.files import FileGoneError, FileStore, FileTooLargeError, rechunk
from tests.service import API_KEYS, Service, running
from tests.test_service import assert_error

# Lines longer than a chunk (64 bytes in the store tests), one cut inside a 2-byte character, CRLF, a blank line,
# and no final newline.
CONTENT = (b'{"a": 1}\n' + b'{"long": "' + b"x" * 150 + b'"}\n' + json.dumps({"k": "é" * 60}, ensure_ascii=False)
           .encode() + b"\r\n\n" + b"".join(b'{"n": %d}\n' % i for i in range(20)) + b'{"last": true}')


def expected_lines(content: bytes) -> list[bytes]:
    *complete, rest = content.split(b"\n")
    return [line + b"\n" for line in complete] + ([rest] if rest else [])


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


# ---- FileStore ---------------------------------------------------------------------------------------------------

@pytest.fixture(params=["bytes", "decoding"])
def files(redis_url: str, request) -> Iterator[FileStore]:
    """Small chunks, so that every boundary case happens in a small file; both kinds of client (JobStore's decodes)."""
    client = redis.Redis.from_url(redis_url, decode_responses=request.param == "decoding")
    yield FileStore(client, prefix=f"t{uuid.uuid4().hex[:12]}", retention_seconds=600, chunk_bytes=64)
    client.close()


def keys(store: FileStore) -> list:
    return list(store.r.scan_iter(f"{store.prefix}:*"))


def test_rechunk_cuts_on_newlines_unless_a_line_is_longer() -> None:
    chunks = list(rechunk([CONTENT[i:i + 7] for i in range(0, len(CONTENT), 7)], 64))
    assert b"".join(chunks) == CONTENT and all(len(c) <= 64 for c in chunks)
    for chunk in chunks[:-1]:
        assert chunk.endswith(b"\n") or len(chunk) == 64  # 64 = part of the 160-byte line


def test_chunks_and_lines_round_trip(files: FileStore) -> None:
    meta = files.create("alice", "in.jsonl", "batch", [CONTENT[i:i + 100] for i in range(0, len(CONTENT), 100)])
    stored = list(files.iter_chunks(meta.id))
    assert b"".join(stored) == CONTENT and len(stored) == meta.chunks > 3
    assert meta.bytes == len(CONTENT) and meta.lines == len(expected_lines(CONTENT))
    lines = list(files.iter_lines(meta.id))
    assert [line for _, line in lines] == expected_lines(CONTENT)
    assert [n for n, _ in lines] == list(range(1, len(lines) + 1))
    assert lines[1][1] == b'{"long": "' + b"x" * 150 + b'"}\n' and lines[-1][1] == b'{"last": true}'
    assert json.loads(lines[2][1]) == {"k": "é" * 60}
    assert any(not _is_utf8(chunk) for chunk in stored)  # a chunk ends inside "é": it must come back raw
    assert 590 <= files.r.ttl(f"{files.prefix}:file:{meta.id}") <= 600
    assert 590 <= files.r.ttl(f"{files.prefix}:file:{meta.id}:chunks") <= 600


def test_metadata_and_empty_file(files: FileStore) -> None:
    meta = files.create("alice", "empty.jsonl", "batch", [])
    assert files.get(meta.id) == meta and meta.bytes == meta.chunks == meta.lines == 0
    assert list(files.iter_lines(meta.id)) == [] and list(files.iter_chunks(meta.id)) == []
    public = meta.public()
    assert public["id"].startswith("file-") and public["object"] == "file" and public["status"] == "processed"
    assert "owner" not in public and public["expires_at"] == public["created_at"] + 600


def test_write_lines_terminates_every_line(files: FileStore) -> None:
    meta = files.write_lines("alice", "out.jsonl", "batch_output", [b'{"i": %d}' % i for i in range(50)] + [b"{}\n"])
    assert meta.purpose == "batch_output" and meta.lines == 51
    assert b"".join(files.iter_chunks(meta.id)) == b"".join(b'{"i": %d}\n' % i for i in range(50)) + b"{}\n"


def test_owner_isolation_and_delete(files: FileStore) -> None:
    meta = files.create("alice", "in.jsonl", "batch", [CONTENT])
    assert files.get(meta.id, "bob") is None and files.list("bob") == ([], False)
    assert not files.delete(meta.id, "bob") and files.get(meta.id, "alice") == meta
    assert files.delete(meta.id, "alice") and not files.delete(meta.id, "alice")
    assert files.get(meta.id) is None and files.list("alice") == ([], False)
    assert keys(files) == []  # metadata, chunks and the (now empty) owner index are gone
    with pytest.raises(FileGoneError):
        next(files.iter_chunks(meta.id))


def test_list_pages_filters_and_orders(files: FileStore) -> None:
    made = [files.create("alice", f"{i}.jsonl", "batch" if i % 2 else "batch_output", [b"{}\n"]) for i in range(5)]
    ids = [m.id for m in reversed(made)]  # newest first
    page, more = files.list("alice", limit=2)
    assert [m.id for m in page] == ids[:2] and more
    page, more = files.list("alice", limit=2, after=ids[1])
    assert [m.id for m in page] == ids[2:4] and more
    page, more = files.list("alice", limit=2, after=ids[3])
    assert [m.id for m in page] == ids[4:] and not more
    assert [m.id for m in files.list("alice", purpose="batch")[0]] == [made[3].id, made[1].id]
    assert [m.id for m in files.list("alice", order="asc")[0]] == [m.id for m in made]
    assert files.list("alice", after="file-unknown") == ([], False)


def test_too_large_or_failing_uploads_leave_nothing(files: FileStore) -> None:
    with pytest.raises(FileTooLargeError):
        files.create("alice", "big.jsonl", "batch", [b"{}\n" * 100], max_bytes=200)

    def failing() -> Iterator[bytes]:
        yield b"{}\n" * 100
        raise ValueError("client went away")

    with pytest.raises(ValueError, match="went away"):
        files.create("alice", "half.jsonl", "batch", failing())
    assert keys(files) == [] and files.list("alice") == ([], False)
    assert files.create("alice", "ok.jsonl", "batch", [b"{}\n" * 100], max_bytes=300).bytes == 300


# ---- the API -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def service(redis_url, tmp_path_factory) -> Iterator[Service]:
    """Only the API process: the Files API needs no worker (so no model either)."""
    logs = tmp_path_factory.mktemp("files-logs")
    with running(Service(redis_url, model_dir=logs / "no-model", log_dir=logs), worker=False) as svc:
        yield svc


@pytest.fixture
def client(service: Service) -> Iterator[httpx.Client]:
    with service.client() as c:
        yield c


@pytest.fixture
def oai(service: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=API_KEYS[0], max_retries=0)


def upload(client: httpx.Client, content: bytes, purpose: str = "batch", name: str = "in.jsonl") -> httpx.Response:
    return client.post("/v1/files", files={"file": (name, content, "application/jsonl")}, data={"purpose": purpose})


def test_upload_retrieve_download_delete_with_httpx(client: httpx.Client) -> None:
    created = upload(client, CONTENT)
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["object"] == "file" and body["bytes"] == len(CONTENT) and body["filename"] == "in.jsonl"
    assert body["purpose"] == "batch" and body["status"] == "processed" and body["id"].startswith("file-")
    assert client.get(f"/v1/files/{body['id']}").json() == body
    content = client.get(f"/v1/files/{body['id']}/content")
    assert content.content == CONTENT and content.headers["content-length"] == str(len(CONTENT))
    # Lines are stored as sent, malformed or not: the batch reading them reports bad ones per line.
    odd = b'{"ok": 1}\n[1, 2]\n{broken\n\xff\xfe'
    assert client.get(f"/v1/files/{upload(client, odd).json()['id']}/content").content == odd
    assert client.delete(f"/v1/files/{body['id']}").json() == {"id": body["id"], "object": "file", "deleted": True}
    assert_error(client.get(f"/v1/files/{body['id']}"), 404, "No such File")


def test_openai_client_round_trip(oai: openai.OpenAI, tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                          "body": {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}})
                              .encode() + b"\n" for i in range(100)))
    with path.open("rb") as f:
        created = oai.files.create(file=f, purpose="batch")
    assert created.filename == "requests.jsonl" and created.bytes == path.stat().st_size
    assert oai.files.retrieve(created.id) == created
    assert oai.files.content(created.id).content == path.read_bytes()
    others = [oai.files.create(file=(f"{i}.jsonl", b"{}\n"), purpose="batch").id for i in range(3)]
    listed = [f.id for f in oai.files.list(limit=2)]  # the client follows the `after` cursor over pages
    assert listed[:4] == [*reversed(others), created.id]
    assert [f.id for f in oai.files.list(purpose="batch_output")] == []
    page = oai.files.list(limit=1)
    assert page.data[0].id == others[-1] and page.has_more
    deleted = oai.files.delete(created.id)
    assert deleted.deleted and deleted.id == created.id
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(created.id)


def test_errors(service: Service, client: httpx.Client) -> None:
    assert_error(upload(client, CONTENT, purpose="fine-tune"), 400, "purpose must be one of")
    assert_error(client.post("/v1/files", data={"purpose": "batch"}), 400, "file")
    assert_error(upload(client, b""), 400, "empty")
    for request in (client.get, client.delete):
        assert_error(request("/v1/files/file-nope"), 404, "No such File object: file-nope")
    assert_error(client.get("/v1/files/file-nope/content"), 404, "No such File")

    mine = upload(client, CONTENT).json()["id"]
    with service.client(API_KEYS[1]) as other:
        for path in (f"/v1/files/{mine}", f"/v1/files/{mine}/content"):
            assert_error(other.get(path), 404, "No such File")
        assert_error(other.delete(f"/v1/files/{mine}"), 404, "No such File")
        assert mine not in [f["id"] for f in other.get("/v1/files").json()["data"]]
    with service.client(None) as anonymous:
        assert anonymous.get("/v1/files").status_code == 401
    assert client.get(f"/v1/files/{mine}").status_code == 200  # the other key's delete did nothing


def test_size_limits(redis_url: str, tmp_path: Path, client: httpx.Client) -> None:
    # The default API takes files far over its 1 MB body limit (the memory test goes further) ...
    big = b'{"pad": "' + b"y" * 1000 + b'"}\n'
    assert upload(client, big * 2000).status_code == 200
    # ... and an API with a small file limit refuses more, by Content-Length or by the size of the file part.
    small = Service(redis_url, model_dir=tmp_path / "no-model", log_dir=tmp_path, INFERQ_MAX_FILE_BYTES="4096")
    try:
        small.start_api()
        with small.client() as c:
            assert upload(c, big * 4).status_code == 200
            assert_error(upload(c, big * 5), 413, "limit is 4096")
            assert_error(upload(c, big * 100), 413, "limit")  # over limit + multipart slack: the middleware
            assert_error(c.post("/v1/jobs", json={"prompt": "x" * 2_000_000}), 413, "limit")
            # Chunked (no Content-Length): the bytes received count, the upload is refused part-way.
            assert_error(c.post("/v1/files", content=_chunked_upload(big * 100), headers={
                "Content-Type": f"multipart/form-data; boundary={BOUNDARY.decode()}"}), 413, "limit")
            assert [f["bytes"] for f in c.get("/v1/files").json()["data"]] == [len(big) * 4]
    finally:
        small.stop()


BOUNDARY = b"inferq-test-boundary"


def _chunked_upload(content: bytes, piece: int = 8192):
    """A multipart upload of `content` as a generator: httpx sends it chunked, without a Content-Length."""
    yield (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--' + BOUNDARY
           + b'\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n')
    for start in range(0, len(content), piece):
        yield content[start:start + piece]
    yield b"\r\n--" + BOUNDARY + b"--\r\n"


def _peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.timeout(180)
def test_50k_line_upload_and_download_stream(service: Service, client: httpx.Client, tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    with path.open("wb") as f:
        for i in range(50_000):
            body = {"model": "demo", "messages": [{"role": "user", "content": f"request {i} " + "z" * 30}]}
            f.write(json.dumps({"custom_id": f"req-{i:05d}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}).encode() + b"\n")
    size = path.stat().st_size
    assert 9_000_000 < size < 12_000_000
    # Warm up the upload and download paths first: lazily imported code and first-use buffers are not growth.
    warm = upload(client, CONTENT).json()["id"]
    assert client.get(f"/v1/files/{warm}/content").content == CONTENT
    before = _peak_rss_bytes(service.api.pid)

    with path.open("rb") as f:
        created = client.post("/v1/files", files={"file": ("big.jsonl", f, "application/jsonl")},
                              data={"purpose": "batch"})
    assert created.status_code == 200, created.text
    assert created.json()["bytes"] == size
    digest, received = hashlib.sha256(), 0
    with client.stream("GET", f"/v1/files/{created.json()['id']}/content") as response:
        for part in response.iter_bytes():
            digest.update(part)
            received += len(part)
    assert received == size and digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()

    growth = _peak_rss_bytes(service.api.pid) - before
    print(f"file {size} bytes; API peak RSS growth {growth} bytes")
    assert growth < 0.5 * size, f"API peak RSS grew by {growth} bytes for a {size}-byte file"
