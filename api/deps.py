"""Request-scoped dependencies: settings, the job store (sync, and its async readers), the Celery app, and the
caller's identity."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from api.settings import Settings
from api.job_record import owner_id
from api.store import JobStore
from api.streams import AsyncStreams


class APIError(HTTPException):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status_code: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(status_code, {"message": message, "type": type, "param": param, "code": code}, headers)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_streams(request: Request) -> AsyncStreams:
    return request.app.state.streams


def get_celery(request: Request):
    return request.app.state.celery


def get_owner(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> str:
    """The caller: the hash of its bearer key (401 if keys are configured and it is missing or wrong)."""
    if not settings.api_keys:
        return owner_id(None)
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or key not in settings.api_keys:
        raise APIError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                       type="authentication_error", code="invalid_api_key")
    return owner_id(key)


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
StreamsDep = Annotated[AsyncStreams, Depends(get_streams)]
CeleryDep = Annotated[object, Depends(get_celery)]
OwnerDep = Annotated[str, Depends(get_owner)]
