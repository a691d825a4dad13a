"""Issue 4's walk-through with real processes, through the gateway only, on S3 storage (a moto server): each
format uploaded and ready, previewed, filtered, profiled, downloaded, versioned and shared; another user sees only
what was shared. (The same on local storage is in test_suite.py and, per format, in the service's API tests.)"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xlsxwriter

from strata.common.procs import SERVICES, NatsServer, ServiceProcess, free_port, suite_env

pytestmark = pytest.mark.slow
ADMIN = ("walk@example.com", "walkthrough admin password")


def xlsx() -> bytes:
    buffer = io.BytesIO()
    book = xlsxwriter.Workbook(buffer, {"in_memory": True})
    sheet = book.add_worksheet("data")
    sheet.write_row(0, 0, ["agent", "rating"])
    for i in range(1, 21):
        sheet.write_row(i, 0, [f"a{i}", i % 5])
    book.close()
    return buffer.getvalue()


def parquet() -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"agent": [f"a{i}" for i in range(20)], "rating": [i % 5 for i in range(20)]}), sink)
    return sink.getvalue()


CSV = ("agent,rating\n" + "".join(f"a{i},{i % 5}\n" for i in range(20))).encode()
FILES = {
    "calls.csv": CSV,
    "calls.tsv": CSV.replace(b",", b"\t"),
    "calls.json": json.dumps([{"agent": f"a{i}", "rating": i % 5} for i in range(20)]).encode(),
    "calls.ndjson": "".join(json.dumps({"agent": f"a{i}", "rating": i % 5}) + "\n" for i in range(20)).encode(),
    "calls.xlsx": xlsx(),
    "calls.parquet": parquet(),
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, s3_server: str) -> Iterator[tuple[str, dict[str, str]]]:
    root = tmp_path_factory.mktemp("walk")
    bucket = f"walk-{uuid.uuid4().hex[:8]}"
    boto3.client(
        "s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    ).create_bucket(Bucket=bucket)
    nats = NatsServer(store_dir=root / "nats").start()
    ports = {name: free_port() for name in SERVICES}
    env = suite_env(
        data_dir=root / "data",
        nats_url=nats.url,
        ports=ports,
        extra={
            "STRATA_LOG_FORMAT": "json",
            "STRATA_ADMIN_EMAIL": ADMIN[0],
            "STRATA_ADMIN_PASSWORD": ADMIN[1],
            "STRATA_STORAGE_URL": f"s3://{bucket}/strata",
            "STRATA_DATASETS_S3_ENDPOINT_URL": s3_server,
            "STRATA_DATASETS_S3_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
        },
    )
    procs = [
        ServiceProcess(name, ports[name], env, log_file=root / f"{name}.log").start()
        for name in ("auth", "datasets", "gateway")
    ]
    try:
        for proc in procs:
            proc.wait_healthy(timeout_s=60)
        url = procs[-1].url
        token = httpx.post(url + "/api/v1/auth/token", data={"username": ADMIN[0], "password": ADMIN[1]}, timeout=10)
        assert token.status_code == 200, token.text
        yield url, {"Authorization": f"Bearer {token.json()['access_token']}"}
    finally:
        for proc in reversed(procs):
            proc.stop()
        nats.stop()


def wait_ready(gw: str, headers: dict[str, str], dataset_id: str, version: int = 1) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        got: dict[str, Any] = httpx.get(f"{gw}/api/v1/datasets/{dataset_id}", headers=headers).json()
        if (got["status"] == "ready" and got["version"] >= version) or got["status"] == "failed":
            return got
        assert time.monotonic() < deadline, got
        time.sleep(0.1)


def test_walkthrough_on_s3(gateway: tuple[str, dict[str, str]]) -> None:
    gw, admin = gateway
    ids = {}
    for filename, data in FILES.items():
        resp = httpx.post(gw + "/api/v1/datasets", headers=admin, files={"file": (filename, data)}, timeout=30)
        assert resp.status_code == 202, (filename, resp.text)
        ids[filename] = resp.json()["id"]
    for filename, dataset_id in ids.items():
        got = wait_ready(gw, admin, dataset_id)
        assert got["status"] == "ready" and got["row_count"] == 20, (filename, got)

    dataset_id = ids["calls.csv"]
    base = f"{gw}/api/v1/datasets/{dataset_id}"
    preview = httpx.get(base + "/preview", headers=admin, params={"filter": "rating:gte:3", "sort": "-rating"}).json()
    assert preview["meta"]["total_rows"] == 8 and preview["data"][0][1] == 4
    deadline = time.monotonic() + 30
    while (profile := httpx.get(base + "/profile", headers=admin)).status_code == 409:  # it follows ready
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert profile.json()["rows"] == 20
    assert httpx.get(base + "/download", headers=admin, params={"format": "original"}).content == CSV
    assert pq.read_table(io.BytesIO(httpx.get(base + "/download", headers=admin).content)).num_rows == 20
    assert httpx.get(base + "/manifest", headers=admin).json()["storage_url"].startswith("s3://")

    new = httpx.post(base + "/versions", headers=admin, files={"file": ("calls.csv", CSV + b"a99,4\n")}, timeout=30)
    assert new.status_code == 202
    assert wait_ready(gw, admin, dataset_id, version=2)["row_count"] == 21

    other = httpx.post(
        gw + "/api/v1/auth/users",
        headers=admin,
        json={"email": "reader@example.com", "password": "reader password 1", "display_name": "R", "role": "viewer"},
    )
    token = httpx.post(
        gw + "/api/v1/auth/token", data={"username": "reader@example.com", "password": "reader password 1"}
    ).json()
    reader = {"Authorization": f"Bearer {token['access_token']}"}
    assert httpx.get(gw + "/api/v1/datasets", headers=reader).json()["data"] == []
    assert httpx.get(base, headers=reader).status_code == 404
    shared = httpx.post(base + "/shares", headers=admin, json={"user_id": other.json()["id"], "permission": "read"})
    assert shared.status_code == 201
    listed = httpx.get(gw + "/api/v1/datasets", headers=reader).json()["data"]
    assert [d["id"] for d in listed] == [dataset_id]
    assert httpx.get(base + "/preview", headers=reader).status_code == 200
    assert httpx.delete(base, headers=reader).status_code == 403
    assert httpx.get(f"{gw}/api/v1/datasets/{ids['calls.json']}", headers=reader).status_code == 404
