"""OpenAI's Files API for purpose "batch": upload JSONL, list, retrieve, download, delete (per API key, like jobs).

No request holds a whole file in memory: Starlette spools the multipart upload to a temporary file, which is read
here in pieces and pushed to Redis as it goes (api/files.py); downloads stream chunk by chunk. Lines are not
parsed here: a malformed line is the batch's business, reported in its error file like OpenAI does.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse

from api.deps import APIError, OwnerDep, SettingsDep
from api.files import CHUNK_BYTES, FileGoneError, FileObject, FileStore, FileTooLargeError
from api.responses import FileDeleted, FileList, errors, ok
from api.responses import FileObject as FileReply

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/files", tags=["files"])

UPLOAD_PURPOSES = frozenset({"batch"})  # output files ("batch_output") are written by the batch finalizer only


def get_file_store(request: Request) -> FileStore:
    return request.app.state.files


FilesDep = Annotated[FileStore, Depends(get_file_store)]


def _get(files: FileStore, file_id: str, owner: str) -> FileObject:
    meta = files.get(file_id, owner)
    if meta is None:
        raise APIError(404, f"No such File object: {file_id}", param="file_id", code="file_not_found")
    return meta


@router.post("", response_model=None, responses=ok(FileReply) | errors(400, 401, 413, 503))
def upload_file(files: FilesDep, settings: SettingsDep, owner: OwnerDep, file: Annotated[UploadFile, File()],
                purpose: Annotated[str, Form(json_schema_extra={"enum": sorted(UPLOAD_PURPOSES)})]) -> dict:
    """multipart/form-data with `file` (JSONL, one batch request per line) and `purpose` ("batch")."""
    if purpose not in UPLOAD_PURPOSES:
        raise APIError(400, f"purpose must be one of {sorted(UPLOAD_PURPOSES)}, got {purpose!r}", param="purpose")
    if file.size is not None and file.size > settings.max_file_bytes:  # known up front: refuse before storing
        raise APIError(413, f"the file is {file.size} bytes; the limit is {settings.max_file_bytes}", param="file",
                       code="file_too_large")
    if file.size == 0:
        raise APIError(400, "the file is empty", param="file", code="empty_file")
    # Sync endpoint (a worker thread), so the spooled file and Redis are used with blocking calls.
    pieces = iter(lambda: file.file.read(CHUNK_BYTES), b"")
    try:
        meta = files.create(owner, file.filename or "upload.jsonl", purpose, pieces, max_bytes=settings.max_file_bytes)
    except FileTooLargeError as exc:  # the size was not known up front (no size on the part)
        raise APIError(413, str(exc), param="file", code="file_too_large") from None
    return meta.public()


@router.get("", response_model=None, responses=ok(FileList) | errors(400, 401, 503))
def list_files(files: FilesDep, owner: OwnerDep, limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
               after: str | None = None, purpose: str | None = None,
               order: Literal["asc", "desc"] = "desc") -> dict:
    page, has_more = files.list(owner, limit=limit, after=after, purpose=purpose, order=order)
    return {"object": "list", "data": [f.public() for f in page], "has_more": has_more,
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}


@router.get("/{file_id}", response_model=None, responses=ok(FileReply) | errors(401, 404, 503))
def retrieve_file(file_id: str, files: FilesDep, owner: OwnerDep) -> dict:
    return _get(files, file_id, owner).public()


@router.get("/{file_id}/content", response_class=StreamingResponse, responses=errors(401, 404, 503) | {
    200: {"description": "The file's bytes",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
def file_content(file_id: str, files: FilesDep, owner: OwnerDep) -> StreamingResponse:
    meta = _get(files, file_id, owner)

    def body() -> Iterator[bytes]:
        try:
            yield from files.iter_chunks(file_id)
        except FileGoneError:
            # Headers are sent: the short body (under Content-Length) tells the client the download failed.
            log.warning("%s was deleted or expired during its download", file_id)

    return StreamingResponse(body(), media_type="application/octet-stream",
                             headers={"Content-Length": str(meta.bytes)})


@router.delete("/{file_id}", response_model=None, responses=ok(FileDeleted) | errors(401, 404, 503))
def delete_file(file_id: str, files: FilesDep, owner: OwnerDep) -> dict:
    if not files.delete(file_id, owner):
        raise APIError(404, f"No such File object: {file_id}", param="file_id", code="file_not_found")
    return {"id": file_id, "object": "file", "deleted": True}
