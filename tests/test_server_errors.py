"""An unexpected error in a route: a 500 in OpenAI's shape, its traceback logged once, and the client's keep-alive
connection still usable. The fault is real: a value of the wrong Redis type where a real job's record is."""
from __future__ import annotations

import time

from tests.service import Service
from tests.test_service import COMPLETION, assert_error


def local_port(response) -> int:
    """The client side's port of the connection that carried `response` (a new connection has a new one)."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_a_500_keeps_the_connection_open(redis_url, demo_model_dir, tmp_path):
    service = Service(redis_url, demo_model_dir, tmp_path)
    try:
        service.start_worker()
        service.start_api()
        with service.client() as client:
            job_id = client.post("/v1/jobs", json=COMPLETION).json()["id"]
            assert service.wait_for_job(job_id).status == "succeeded"
            before = local_port(client.get("/health"))
            # The job's record is a hash: a string there makes the API's HGETALL fail (WRONGTYPE).
            service.store.r.set(service.store.keys.job(job_id), "not a hash")
            try:
                broken = client.get(f"/v1/jobs/{job_id}")
                error = assert_error(broken, 500, "the server had an error")
                assert error["type"] == "server_error" and "WRONGTYPE" not in error["message"]
                after = client.get("/health")
                assert after.status_code == 200
                assert local_port(broken) == local_port(after) == before  # one connection throughout
            finally:
                service.store.r.delete(service.store.keys.job(job_id))
            assert client.post("/v1/completions", json=COMPLETION).status_code == 200
    finally:
        service.stop()
    time.sleep(0.2)  # the API's last log lines
    log = (tmp_path / "api.log").read_text()
    assert log.count("Traceback (most recent call last)") == 1 and "WRONGTYPE" in log
