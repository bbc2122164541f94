"""The Celery app the workers run (`celery -A worker.celery_app inspect active` reaches them); configured and sent
to in api/celery_client.py, which the API shares."""
from api.celery_client import app  # noqa: F401
