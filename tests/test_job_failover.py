"""An execution replica killed while it runs a query: another replica takes the job over and finishes it, or, once
the job has used its attempts, fails it with a reason. No job stays running."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from strata.common.procs import NatsServer, ServiceProcess, free_port

pytestmark = pytest.mark.slow
ADMIN = ("failover@example.com", "failover admin password")
# A few seconds of DuckDB work on two threads, no tables needed.
SLOW_SQL = "SELECT sum(a.range * b.range) AS s FROM range(60000) a, range(60000) b"


def _job(url: str, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{url}/api/v1/jobs/{job_id}", headers=headers, timeout=10).json()
    return body


def _wait(url: str, job_id: str, headers: dict[str, str], states: set[str], timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    job = _job(url, job_id, headers)
    while job["state"] not in states and time.monotonic() < deadline:
        time.sleep(0.1)
        job = _job(url, job_id, headers)
    return job


@pytest.mark.parametrize("max_attempts, final", [(3, "succeeded"), (1, "failed")])
def test_a_killed_worker_leaves_its_job_to_another(tmp_path: Path, max_attempts: int, final: str) -> None:
    nats = NatsServer(store_dir=tmp_path / "nats").start()
    env = {
        "STRATA_DATA_DIR": str(tmp_path / "data"),
        "STRATA_NATS_URL": nats.url,
        "STRATA_LOG_FORMAT": "json",
        "STRATA_ADMIN_EMAIL": ADMIN[0],
        "STRATA_ADMIN_PASSWORD": ADMIN[1],
        "STRATA_EXECUTION_ACK_WAIT_S": "2",
        "STRATA_EXECUTION_MAX_ATTEMPTS": str(max_attempts),
    }
    procs: list[ServiceProcess] = []
    try:
        auth = ServiceProcess("auth", free_port(), env, log_file=tmp_path / "auth.log").start()
        procs.append(auth)
        first = ServiceProcess("execution", free_port(), env, log_file=tmp_path / "execution-1.log").start()
        procs.append(first)
        auth.wait_healthy()
        first.wait_healthy()
        token = httpx.post(auth.url + "/api/v1/auth/token", data={"username": ADMIN[0], "password": ADMIN[1]}).json()
        headers = {"Authorization": f"Bearer {token['access_token']}"}
        submitted = httpx.post(
            first.url + "/api/v1/queries", json={"sql": SLOW_SQL, "timeout_s": 120}, headers=headers, timeout=10
        )
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        assert _wait(first.url, job_id, headers, {"running"}, 20)["state"] == "running"
        first.kill()

        second = ServiceProcess("execution", free_port(), env, log_file=tmp_path / "execution-2.log").start()
        procs.append(second)
        second.wait_healthy()
        job = _wait(second.url, job_id, headers, {"succeeded", "failed", "cancelled", "timed_out"}, 90)
        assert job["state"] == final, job
        if final == "succeeded":
            assert job["attempts"] == 2
            rows = httpx.get(f"{second.url}/api/v1/jobs/{job_id}/results", headers=headers).json()["rows"]
            assert rows == [[str(sum(range(60000)) ** 2)]] or rows == [[sum(range(60000)) ** 2]]
        else:
            assert job["error"]["code"] == "WORKER_LOST"
    finally:
        for proc in reversed(procs):
            proc.stop()
        nats.stop()
