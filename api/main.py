"""create_app(): the FastAPI front end. Never imports the engine or torch."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse

from api.files import FileStore
from api.routes import batches, files, health, jobs, openai
from api.schemas import error_body
from api.settings import Settings, get_settings
from api.store import JobStore
from worker.celery_app import create_app as create_celery_app

MULTIPART_SLACK_BYTES = 64 * 1024  # form fields and part headers around an uploaded file


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="inferq", version="0.1.0")
    app.state.settings = settings
    app.state.store = JobStore.from_url(settings.redis_url, prefix=settings.key_prefix,
                                        retention_seconds=settings.result_retention_seconds)
    app.state.files = FileStore.from_url(settings.redis_url, prefix=settings.key_prefix,
                                         retention_seconds=settings.file_retention_seconds)
    app.state.celery = create_celery_app(settings)
    for module in (health, openai, jobs, files, batches):
        app.include_router(module.router)

    @app.middleware("http")
    async def limit_body_size(request: Request, call_next):
        # File uploads are streamed to Redis, never held whole: they get the file limit (plus room for the
        # multipart framing); the exact limit on the content is enforced while storing it.
        upload = request.method == "POST" and request.url.path.rstrip("/") == "/v1/files"
        limit = settings.max_file_bytes + MULTIPART_SLACK_BYTES if upload else settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return JSONResponse(error_body(f"request body is {length} bytes; the limit is {limit}",
                                           code="body_too_large"), status_code=413)
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        kind = detail.get("type") or ("not_found_error" if exc.status_code == 404 else "invalid_request_error")
        return JSONResponse(error_body(detail.get("message", ""), type=kind, param=detail.get("param"),
                                       code=detail.get("code")), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return JSONResponse(error_body(f"{param}: {first['msg']}" if param else first["msg"], param=param),
                            status_code=400)

    return app
