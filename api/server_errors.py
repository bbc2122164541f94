"""An unexpected exception in a route answers 500 in OpenAI's shape and leaves the keep-alive connection open.

Starlette's ServerErrorMiddleware sends its 500 and then re-raises the exception (for servers and test clients to
see), and uvicorn closes the connection of any request whose app raised: a client's next request on that
connection fails. This middleware sits inside ServerErrorMiddleware: it logs the traceback (once: nothing is
re-raised, so neither Starlette nor uvicorn logs it again) and answers the 500 itself. A response that had already
started (a stream) cannot become a 500: then the exception goes on up and the cut connection tells the client.
"""
from __future__ import annotations

import logging

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.schemas import error_body

log = logging.getLogger(__name__)
MESSAGE = "the server had an error while processing the request; retry, or report it if it persists"


class ServerErrors:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watching(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watching)
        except Exception:
            if started:
                raise
            log.exception("unexpected error answering %s %s", scope["method"], scope["path"])
            await JSONResponse(error_body(MESSAGE, type="server_error"), status_code=500)(scope, receive, send)
