"""The file store: uploaded batch inputs and the output/error files of batches, kept in Redis.

Why Redis, and why in chunks: every worker host already reaches Redis, so a batch expander or finalizer on any
host reads and writes files with no shared disk, and Redis stays the one stateful service. A file is never one
Redis value and never whole in a process's memory: it is a list of ~256 KiB chunks, cut on line boundaries where
possible, so uploads are pushed and downloads streamed chunk by chunk, and a reader walks lines across chunks.

Keys (all under `{p}:` = the configured prefix; every key expires `retention_seconds` after the file's creation):
  {p}:file:{id}                 hash, the file's metadata (fields: see `FileObject`)
  {p}:file:{id}:chunks          list of the content's chunks, in order (absent for an empty file)
  {p}:owner:{owner}:files       sorted set of the owner's file ids, score = created_at

The metadata hash is written last, in one transaction: a file whose upload failed or is still running is never
visible, and its orphaned chunks expire after `UPLOAD_TTL_S`.
"""
from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields

import redis
from redis.client import NEVER_DECODE

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
UPLOAD_TTL_S = 3600  # chunks of an upload that never finished (process died) go away after this long


class FileTooLargeError(ValueError):
    """The content went over the store's `max_bytes`; nothing was kept."""


class FileGoneError(LookupError):
    """The file was deleted or expired while being read."""


FILE_ID = re.compile(r"file-[0-9a-f]{32}")  # what FileStore.create mints


@dataclass(slots=True)
class FileObject:
    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    created_at: float
    expires_at: int
    chunks: int  # length of the chunk list
    lines: int  # as iter_lines() yields them, blank ones included: an upper bound on a batch's requests

    def public(self) -> dict:
        """OpenAI's file object."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": int(self.created_at),
                "expires_at": self.expires_at, "filename": self.filename, "purpose": self.purpose,
                "status": "processed", "status_details": None}

    @classmethod
    def from_fields(cls, raw: dict) -> FileObject | None:
        f = {_text(k): _text(v) for k, v in raw.items()}
        if "id" not in f:
            return None
        return cls(id=f["id"], owner=f["owner"], filename=f["filename"], purpose=f["purpose"], bytes=int(f["bytes"]),
                   created_at=float(f["created_at"]), expires_at=int(f["expires_at"]), chunks=int(f["chunks"]),
                   lines=int(f["lines"]))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def rechunk(pieces: Iterable[bytes], size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Pieces of any size -> chunks of at most `size` bytes, each ending at a newline unless one line is longer
    than `size` (that line is then cut, and readers join it again)."""
    buf = bytearray()
    for piece in pieces:
        buf += piece
        while len(buf) >= size:
            cut = buf.rfind(b"\n", 0, size) + 1 or size
            yield bytes(buf[:cut])
            del buf[:cut]
    if buf:
        yield bytes(buf)


class FileStore:
    """Files in Redis, owned by an API-key hash like jobs. Any client works, decoding or not (JobStore's does):
    chunks are always read raw, since a chunk may end inside a UTF-8 character."""

    def __init__(self, redis_client: redis.Redis, prefix: str = "inferq", retention_seconds: int = 30 * 86400,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self.r = redis_client
        self.prefix = prefix
        self.retention_seconds = int(retention_seconds)
        self.chunk_bytes = int(chunk_bytes)

    @classmethod
    def from_url(cls, url: str, **kw) -> FileStore:
        return cls(redis.Redis.from_url(url), **kw)

    def _meta_key(self, file_id: str) -> str:
        return f"{self.prefix}:file:{file_id}"

    def _chunks_key(self, file_id: str) -> str:
        return f"{self.prefix}:file:{file_id}:chunks"

    def _owner_key(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:files"

    def create(self, owner: str, filename: str, purpose: str, chunks: Iterable[bytes],
               max_bytes: int | None = None) -> FileObject:
        """Store the content given as pieces of any size (re-cut into line-aligned chunks, pushed one at a time);
        FileTooLargeError past `max_bytes`. If `chunks` raises, nothing is kept and the error propagates."""
        file_id = f"file-{uuid.uuid4().hex}"
        key = self._chunks_key(file_id)
        size = count = lines = 0
        last = b""
        try:
            for chunk in rechunk(chunks, self.chunk_bytes):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise FileTooLargeError(f"the file is over the limit of {max_bytes} bytes")
                pipe = self.r.pipeline(transaction=False)
                pipe.rpush(key, chunk)
                pipe.expire(key, UPLOAD_TTL_S)
                pipe.execute()
                count += 1
                lines += chunk.count(b"\n")
                last = chunk[-1:]
        except BaseException:
            self.r.delete(key)
            raise
        lines += 1 if last not in (b"", b"\n") else 0
        now = time.time()
        meta = FileObject(id=file_id, owner=owner, filename=filename, purpose=purpose, bytes=size, created_at=now,
                          expires_at=int(now) + self.retention_seconds, chunks=count, lines=lines)
        index = self._owner_key(owner)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self._meta_key(file_id), mapping={f.name: str(getattr(meta, f.name)) for f in fields(meta)})
        pipe.expire(self._meta_key(file_id), self.retention_seconds)
        pipe.expire(key, self.retention_seconds)
        pipe.zadd(index, {file_id: now})
        # Every file lives exactly `retention` from creation, so older index entries are certainly gone.
        pipe.zremrangebyscore(index, "-inf", now - self.retention_seconds)
        pipe.expire(index, self.retention_seconds)
        pipe.execute()
        log.info("stored %s (%s, %d bytes, %d lines, %d chunks)", file_id, purpose, size, lines, count)
        return meta

    def write_lines(self, owner: str, filename: str, purpose: str, lines: Iterable[bytes]) -> FileObject:
        """A file of the given lines (a batch's output or error file); a missing trailing newline is added."""
        return self.create(owner, filename, purpose, (ln if ln.endswith(b"\n") else ln + b"\n" for ln in lines))

    def get(self, file_id: str, owner: str | None = None) -> FileObject | None:
        """The file's metadata; None if it does not exist (or expired), is no file id, or belongs to another owner
        than `owner`."""
        if FILE_ID.fullmatch(file_id) is None:  # another kind of key, e.g. `file-<id>:chunks`: no file
            return None
        meta = FileObject.from_fields(self.r.hgetall(self._meta_key(file_id)))
        if meta is None or (owner is not None and meta.owner != owner):
            return None
        return meta

    def list(self, owner: str, *, limit: int = 20, after: str | None = None, purpose: str | None = None,
             order: str = "desc") -> tuple[list[FileObject], bool]:
        """The owner's files (newest first, or oldest with order="asc") after file id `after`: (page, has_more)."""
        key, newest_first = self._owner_key(owner), order != "asc"
        start = 0
        if after:
            rank = self.r.zrevrank(key, after) if newest_first else self.r.zrank(key, after)
            if rank is None:
                return [], False
            start = rank + 1
        batch = max(limit + 1, 50)
        found: list[FileObject] = []
        while len(found) <= limit:
            ids = (self.r.zrevrange if newest_first else self.r.zrange)(key, start, start + batch - 1)
            if not ids:
                break
            start += len(ids)
            pipe = self.r.pipeline(transaction=False)
            for file_id in ids:
                pipe.hgetall(self._meta_key(_text(file_id)))
            for meta in map(FileObject.from_fields, pipe.execute()):
                if meta is not None and (purpose is None or meta.purpose == purpose):
                    found.append(meta)
        return found[:limit], len(found) > limit

    def iter_chunks(self, file_id: str) -> Iterator[bytes]:
        """The content, one chunk (one Redis read) at a time; FileGoneError if it disappears meanwhile."""
        meta = self.get(file_id)
        if meta is None:
            raise FileGoneError(file_id)
        for i in range(meta.chunks):
            chunk = self.r.execute_command("LINDEX", self._chunks_key(file_id), i, **{NEVER_DECODE: []})
            if chunk is None:
                raise FileGoneError(file_id)
            yield chunk

    def iter_lines(self, file_id: str) -> Iterator[tuple[int, bytes]]:
        """(line number from 1, the line with its b"\\n" if it has one): joined, exactly the content."""
        number, pending = 0, []
        for chunk in self.iter_chunks(file_id):
            *complete, rest = chunk.split(b"\n")
            for part in complete:
                number += 1
                yield number, b"".join((*pending, part, b"\n"))
                pending.clear()
            if rest:
                pending.append(rest)
        if pending:
            yield number + 1, b"".join(pending)

    def delete(self, file_id: str, owner: str) -> bool:
        """Delete the owner's file; False if there is none (or it is another owner's)."""
        if self.get(file_id, owner) is None:  # the owner never changes: checking first is race-free
            return False
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self._meta_key(file_id), self._chunks_key(file_id))
        pipe.zrem(self._owner_key(owner), file_id)
        pipe.execute()
        log.info("deleted %s", file_id)
        return True
