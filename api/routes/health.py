"""Liveness, readiness and metrics."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import StoreDep
from api.metrics import render
from api.responses import Health, Ready, errors, ok

router = APIRouter(tags=["health"])


@router.get("/health", response_model=None, responses=ok(Health) | errors())
def health() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/ready", response_model=None,
            responses=ok(Ready) | errors() | ok(Ready, 503, "Redis is unavailable, or a model has no live worker."))
def ready(store: StoreDep) -> JSONResponse:
    """Redis answers and every model known to the cluster has a live worker."""
    try:
        store.r.ping()
        models = store.registry.models()
    except Exception as exc:  # noqa: BLE001 - any Redis failure means not ready
        return JSONResponse({"status": "unavailable", "redis": str(exc)}, status_code=503)
    workers = {name: len(w) for name, w in models.items()}
    ok = bool(workers) and all(workers.values())
    return JSONResponse({"status": "ready" if ok else "degraded", "redis": "ok", "workers": workers},
                        status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response, responses=errors(503) | {
    200: {"description": "Prometheus text format", "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
def metrics(store: StoreDep) -> Response:
    """Prometheus text format (unauthenticated, like /health: scrapers rarely hold API keys)."""
    return Response(render(store), media_type=CONTENT_TYPE_LATEST)
