"""Liveness, readiness and metrics."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import StoreDep
from api.metrics import render

router = APIRouter(tags=["health"])


@router.get("/health")
def health() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/ready")
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


@router.get("/metrics")
def metrics(store: StoreDep) -> Response:
    """Prometheus text format (unauthenticated, like /health: scrapers rarely hold API keys)."""
    return Response(render(store), media_type=CONTENT_TYPE_LATEST)
