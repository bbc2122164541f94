"""create_app(): the FastAPI front end. Never imports the engine, torch or the worker."""
from __future__ import annotations

from contextlib import asynccontextmanager

import redis
import redis.asyncio as aredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException  # FastAPI's subclasses it; the router raises this one (404, 405)

from api import dashboard, docs
from api.body_limit import BodyLimit
from api.celery_client import create_app as create_celery_app
from api.files import FileStore
from api.routes import batches, files, health, jobs, openai, tokenize
from api.schemas import error_body
from api.server_errors import ServerErrors
from api.settings import Settings, get_settings
from api.store import JobStore
from api.streams import AsyncStreams
from api.tokenization import TokenizerCache

MULTIPART_SLACK_BYTES = 64 * 1024  # form fields and part headers around an uploaded file
API_REDIS_RETRIES = 3  # while Redis is away the API answers 503 at once rather than after a long retry


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Waits (long-polls, synchronous completions, streams) run on the event loop over redis.asyncio: a waiting
        # client costs a socket, not one of the threadpool's 40 threads.
        pool = aredis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=settings.api_redis_connections,
                                                      timeout=30, decode_responses=True)
        client = aredis.Redis(connection_pool=pool)
        app.state.streams = AsyncStreams(client, app.state.store.keys)
        try:
            yield
        finally:
            await app.state.streams.close()
            await client.aclose()

    app = FastAPI(title="inferq", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    docs.install(app)  # /openapi.json, and /docs and /redoc without a CDN
    app.state.settings = settings
    # The sync store serves the short calls (create, get, cancel), which run in the threadpool.
    app.state.store = JobStore.from_url(settings.redis_url, max_connections=64, retries=API_REDIS_RETRIES,
                                        prefix=settings.key_prefix, retention_seconds=settings.result_retention_seconds)
    app.state.files = FileStore(app.state.store.r, settings.key_prefix, settings.file_retention_seconds)
    app.state.celery = create_celery_app(settings)
    app.state.tokenizers = TokenizerCache(app.state.store.r, settings.key_prefix)  # for /tokenize, /detokenize
    app.state.dashboard = dashboard.DashboardReader(app.state.store, settings.worker_heartbeat_seconds)
    for module in (health, openai, jobs, files, batches, tokenize, dashboard):
        app.include_router(module.router)

    def body_limit(scope) -> int:
        # File uploads are streamed to Redis, never held whole: they get the file limit (plus room for the
        # multipart framing); the exact limit on the content is enforced while storing it.
        upload = scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/files"
        return settings.max_file_bytes + MULTIPART_SLACK_BYTES if upload else settings.max_body_bytes

    app.add_middleware(BodyLimit, limit_for=body_limit)
    app.add_middleware(ServerErrors)  # added last: outside BodyLimit, so it answers for everything within

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc.detail, dict):
            detail = exc.detail
        elif exc.status_code in (404, 405) and exc.detail in ("Not Found", "Method Not Allowed"):
            # The router's own: no such route, or not with this method (OpenAI says "Invalid URL").
            detail = {"message": f"Invalid URL ({request.method} {request.url.path})",
                      "type": "invalid_request_error"}
        else:
            detail = {"message": str(exc.detail)}
        kind = detail.get("type") or ("not_found_error" if exc.status_code == 404 else "invalid_request_error")
        return JSONResponse(error_body(detail.get("message", ""), type=kind, param=detail.get("param"),
                                       code=detail.get("code")), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":  # loc holds a character offset, not a parameter
            where = first["loc"][-1]
            reason = (first.get("ctx") or {}).get("error", "JSON decode error")
            return JSONResponse(error_body(f"the request body is not valid JSON ({reason} at character {where})"),
                                status_code=400)
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return JSONResponse(error_body(f"{param}: {first['msg']}" if param else first["msg"], param=param),
                            status_code=400)

    async def redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
        return redis_down_response(exc)

    for error in (redis.ConnectionError, redis.TimeoutError):  # redis.asyncio raises the same classes
        app.add_exception_handler(error, redis_unavailable)
    return app


def redis_down_response(exc: Exception) -> JSONResponse:
    return JSONResponse(error_body(f"the job store is unavailable ({type(exc).__name__}); retry shortly",
                                   type="service_unavailable", code="store_unavailable"),
                        status_code=503, headers={"Retry-After": "2"})
