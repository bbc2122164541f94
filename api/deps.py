"""Request-scoped dependencies: settings, the job store (sync, and its async readers), the Celery app, and the
caller's identity."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.job_record import owner_id
from api.settings import Settings
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


# Parses `Authorization: Bearer <key>` and declares the scheme in /openapi.json; it never answers by itself
# (auto_error=False): a missing or wrong key is our 401 below, in OpenAI's shape.
bearer = HTTPBearer(auto_error=False)


def get_owner(settings: Annotated[Settings, Depends(get_settings)],
              credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    """The caller: the hash of its bearer key (401 if keys are configured and it is missing or wrong)."""
    if not settings.api_keys:
        return owner_id(None)
    key = credentials.credentials if credentials else None
    if key not in settings.api_keys:
        raise APIError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                       type="authentication_error", code="invalid_api_key")
    return owner_id(key)


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
StreamsDep = Annotated[AsyncStreams, Depends(get_streams)]
CeleryDep = Annotated[object, Depends(get_celery)]
OwnerDep = Annotated[str, Depends(get_owner)]
