"""OpenAI-compatible Batch API: create, retrieve, list, cancel."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.batches import ENDPOINTS, BatchStore, parse_window
from api.celery_client import BATCH_EXPAND, BATCH_STOP, send_batch_task
from api.deps import APIError, CeleryDep, OwnerDep, SettingsDep, StoreDep
from api.files import FileStore
from api.lifecycle import check_expiry
from api.responses import BatchList, BatchObject, errors, ok
from api.schemas import BatchCreate
from api.submit import check_text
from api.webhook_targets import WebhookTargetError, check_target

router = APIRouter(prefix="/v1/batches", tags=["batches"])


def _get(batches: BatchStore, batch_id: str, owner: str, celery):
    batch = batches.get(batch_id, owner)
    if batch is None:
        raise APIError(404, f"no batch {batch_id!r}", param="batch_id", code="batch_not_found")
    return check_expiry(batches, batch, celery)


@router.post("", response_model=None, responses=ok(BatchObject) | errors(400, 401, 404, 413, 503))
def create_batch(body: BatchCreate, store: StoreDep, settings: SettingsDep, celery: CeleryDep,
                 owner: OwnerDep) -> dict:
    """OpenAI's fields, plus an optional `webhook` URL told when the batch ends."""
    check_text(body.model_dump())
    endpoint, window, metadata, file_id, webhook = (body.endpoint, body.completion_window, body.metadata or {},
                                                    body.input_file_id, body.webhook)
    if endpoint not in ENDPOINTS:
        raise APIError(400, f"endpoint must be one of {sorted(ENDPOINTS)}, got {endpoint!r}", param="endpoint")
    try:
        parse_window(window)
    except ValueError as exc:
        raise APIError(400, str(exc), param="completion_window") from None
    input_file = FileStore(store.r, store.prefix).get(file_id, owner)
    if input_file is None:
        raise APIError(404, f"no input file {file_id!r}", param="input_file_id")
    if input_file.purpose != "batch":
        raise APIError(400, f"file {file_id} has purpose {input_file.purpose!r}; a batch needs 'batch'",
                       param="input_file_id")
    if webhook is not None:
        try:  # private/loopback targets are refused now, as for jobs (SSRF)
            check_target(webhook, settings.webhook_allow_hosts)
        except WebhookTargetError as exc:
            raise APIError(400, str(exc), param="webhook", code="invalid_webhook") from None
    batch = BatchStore(store).create(owner, endpoint, file_id, window, metadata, webhook)
    send_batch_task(BATCH_EXPAND, batch.id, celery)
    return batch.public()


@router.get("", response_model=None, responses=ok(BatchList) | errors(400, 401, 503))
def list_batches(store: StoreDep, celery: CeleryDep, owner: OwnerDep,
                 limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None) -> dict:
    batches = BatchStore(store)
    page, has_more = batches.list(owner, limit, after)
    data = [check_expiry(batches, b, celery).public() for b in page]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.get("/{batch_id}", response_model=None, responses=ok(BatchObject) | errors(401, 404, 503))
def get_batch(batch_id: str, store: StoreDep, celery: CeleryDep, owner: OwnerDep) -> dict:
    return _get(BatchStore(store), batch_id, owner, celery).public()


@router.post("/{batch_id}/cancel", response_model=None, responses=ok(BatchObject) | errors(401, 404, 409, 503))
def cancel_batch(batch_id: str, store: StoreDep, celery: CeleryDep, owner: OwnerDep) -> dict:
    batches = BatchStore(store)
    batch = _get(batches, batch_id, owner, celery)
    if batches.set_status(batch.id, "cancelling"):
        send_batch_task(BATCH_STOP, batch.id, celery)
    elif batch.status not in ("cancelling", "cancelled"):
        raise APIError(409, f"batch {batch_id} is {batch.status}; it cannot be cancelled", code="batch_finished")
    return batches.get(batch.id).public()
