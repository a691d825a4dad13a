"""A datasets replica killed while ingesting: another replica takes the work over and the dataset becomes ready."""

from __future__ import annotations

import time
from pathlib import Path

import duckdb
import httpx
import pytest

from strata.common.procs import NatsServer, ServiceProcess, free_port

pytestmark = pytest.mark.slow
ADMIN = ("failover@example.com", "failover admin password")


def test_a_killed_worker_leaves_the_work_to_another(tmp_path: Path) -> None:
    nats = NatsServer(store_dir=tmp_path / "nats").start()
    env = {
        "STRATA_DATA_DIR": str(tmp_path / "data"),
        "STRATA_NATS_URL": nats.url,
        "STRATA_LOG_FORMAT": "json",
        "STRATA_ADMIN_EMAIL": ADMIN[0],
        "STRATA_ADMIN_PASSWORD": ADMIN[1],
        "STRATA_DATASETS_INGEST_ACK_WAIT_S": "2",
    }
    procs: list[ServiceProcess] = []
    try:
        auth = ServiceProcess("auth", free_port(), env, log_file=tmp_path / "auth.log").start()
        procs.append(auth)
        first = ServiceProcess("datasets", free_port(), env, log_file=tmp_path / "datasets-1.log").start()
        procs.append(first)
        auth.wait_healthy()
        first.wait_healthy()
        token = httpx.post(auth.url + "/api/v1/auth/token", data={"username": ADMIN[0], "password": ADMIN[1]}).json()
        headers = {"Authorization": f"Bearer {token['access_token']}"}
        csv_path = tmp_path / "big.csv"
        duckdb.sql(
            f"COPY (SELECT range AS id, 'row ' || range AS label, range * 0.5 AS x FROM range(3000000)) "
            f"TO '{csv_path}' (HEADER)"
        )
        with csv_path.open("rb") as fh:
            upload = httpx.post(
                first.url + "/api/v1/datasets", headers=headers, files={"file": ("big.csv", fh)}, timeout=60
            )
        assert upload.status_code == 202, upload.text
        dataset_id = upload.json()["id"]
        time.sleep(0.3)  # let it take the work item; the test holds whether or not it had
        first.kill()
        second = ServiceProcess("datasets", free_port(), env, log_file=tmp_path / "datasets-2.log").start()
        procs.append(second)
        second.wait_healthy()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = httpx.get(f"{second.url}/api/v1/datasets/{dataset_id}", headers=headers).json()
            if got["status"] != "processing":
                break
            time.sleep(0.2)
        assert got["status"] == "ready", got
        assert got["row_count"] == 3_000_000
    finally:
        for proc in reversed(procs):
            proc.stop()
        nats.stop()
