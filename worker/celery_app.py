"""The Celery app, configured for long GPU jobs. Imported by the API (to enqueue) and the worker (to consume);
it must not import the engine or torch."""
from __future__ import annotations

from celery import Celery

from api.settings import Settings, get_settings
from api.store import JobStore

GENERATE_TASK = "inferq.generate"


def queue_for(model: str) -> str:
    """One queue per served model: every worker of that model consumes it."""
    return f"inferq.generate.{model}"


def enqueue(store: JobStore, job_id: str, model: str, *, again: bool = False, celery: Celery | None = None) -> bool:
    """Send a queued job to its model's queue with the next dispatch number: its first message, or with
    `again` a replacement for one that may be lost (the older message is then skipped). False if not sent."""
    dispatch = store.dispatch(job_id, again=again)
    if dispatch is None:
        return False
    send_job(job_id, dispatch, model, celery)
    return True


def send_job(job_id: str, dispatch: int, model: str, celery: Celery | None = None) -> None:
    (celery or app).send_task(GENERATE_TASK, args=[job_id, dispatch], queue=queue_for(model))


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("inferq", broker=settings.redis_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results live in the job store, not in Celery's backend
        # A job is acknowledged only once it ended, and a worker that dies mid-job gives it back: nothing is lost.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Redis redelivers unacknowledged messages after the visibility timeout: it must exceed any job's
        # queued-plus-running time, or long jobs run twice (celery#5935).
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_seconds},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


app = create_app()
