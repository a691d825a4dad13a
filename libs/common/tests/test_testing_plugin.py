"""The test plugin's real parts work as later issues will use them."""

from __future__ import annotations

import boto3
import httpx

from strata.common.procs import ServiceProcess


def test_s3_server_is_a_real_s3_api(s3_server: str) -> None:
    s3 = boto3.client(
        "s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    )
    s3.create_bucket(Bucket="strata-test")
    s3.put_object(Bucket="strata-test", Key="datasets/a/v1/data.parquet", Body=b"PAR1")
    listed = s3.list_objects_v2(Bucket="strata-test", Prefix="datasets/")
    assert [o["Key"] for o in listed["Contents"]] == ["datasets/a/v1/data.parquet"]
    assert s3.get_object(Bucket="strata-test", Key="datasets/a/v1/data.parquet")["Body"].read() == b"PAR1"


def test_start_service_runs_a_real_process(start_service, nats_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc: ServiceProcess = start_service(
        "schemas", {"STRATA_NATS_URL": nats_url, "STRATA_DATA_DIR": str(tmp_path), "STRATA_LOG_FORMAT": "json"}
    )
    assert proc.process is not None and proc.process.poll() is None
    ready = httpx.get(proc.url + "/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["checks"] == {"nats": "ok", "database": "ok"}
