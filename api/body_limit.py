"""A request body limit on the bytes actually received, whatever the framing.

Content-Length alone is not enough: a chunked body (Transfer-Encoding: chunked) has none, and the framework would
read all of it into memory. This ASGI middleware refuses a declared length over the limit before reading, and
counts the bytes of every body it passes on: past the limit, the read raises a 413 (FastAPI's request handling
re-raises HTTPExceptions from body reads, and the app's handler answers in OpenAI's shape), so no more is read.
"""
from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def too_large(limit: int, size: int | None = None) -> HTTPException:
    told = f"{size} bytes" if size is not None else f"over {limit} bytes"
    return HTTPException(413, {"message": f"request body is {told}; the limit is {limit}", "code": "body_too_large"})


class BodyLimit:
    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int]) -> None:
        self.app = app
        self.limit_for = limit_for  # the scope's limit (uploads get the file limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            refusal = too_large(limit, int(declared))
            await self.app(scope, _refusing(refusal), send)
            return
        received = 0

        async def counting() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large(limit)
            return message

        await self.app(scope, counting, send)


def _refusing(refusal: HTTPException) -> Receive:
    """A receive that raises at once: the route's first body read answers 413, nothing is read."""

    async def receive() -> Message:
        raise refusal

    return receive
