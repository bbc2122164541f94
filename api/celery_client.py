"""The Celery app and its send side: what the API and the workers both use to put work on the broker.

Only the task names and their queues live here, never the tasks themselves: the API sends `generate`, batch and
webhook tasks by name, and the worker processes (worker/) register the functions under those names. Neither torch
nor the engine is imported.
"""
from __future__ import annotations

from celery import Celery

from api.settings import Settings, get_settings
from api.store import JobStore

GENERATE_TASK = "inferq.generate"
WEBHOOK_TASK = "inferq.deliver_webhook"
WEBHOOK_QUEUE = "inferq.webhooks"
BATCH_QUEUE = "inferq.batch"  # batch bookkeeping (expand, stop, finalize), served with the webhooks
BATCH_EXPAND, BATCH_STOP, BATCH_FINALIZE = "inferq.batch.expand", "inferq.batch.stop", "inferq.batch.finalize"


def queue_for(model: str) -> str:
    """One queue per served model: every worker of that model consumes it."""
    return f"inferq.generate.{model}"


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
        broker_connection_retry=True,
        broker_connection_max_retries=None,  # Redis that goes away and comes back: reconnect for as long as it takes
        # Sends retry while Redis restarts instead of failing the request or the job that sends.
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 30, "interval_start": 0.2, "interval_step": 0.5,
                                   "interval_max": 2.0},
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


app = create_app()


def send_job(job_id: str, dispatch: int, model: str, celery: Celery | None = None) -> None:
    (celery or app).send_task(GENERATE_TASK, args=[job_id, dispatch], queue=queue_for(model))


def enqueue(store: JobStore, job_id: str, model: str, *, again: bool = False, celery: Celery | None = None) -> bool:
    """Send a queued job to its model's queue with the next dispatch number: its first message, or with
    `again` a replacement for one that may be lost (the older message is then skipped). False if not sent."""
    dispatch = store.dispatch(job_id, again=again)
    if dispatch is None:
        return False
    send_job(job_id, dispatch, model, celery)
    return True


def send_batch_task(task: str, batch_id: str, celery: Celery | None = None) -> None:
    (celery or app).send_task(task, args=[batch_id], queue=BATCH_QUEUE)


def send_webhook(subject_id: str, event: str, webhook_id: str, url: str, body: str,
                 celery: Celery | None = None) -> None:
    (celery or app).send_task(WEBHOOK_TASK, args=[subject_id, event, webhook_id, url, body], queue=WEBHOOK_QUEUE)
