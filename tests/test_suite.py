"""The whole suite as real processes: nats-server and the five services, talking only through the gateway and NATS."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from strata.common.procs import SERVICES, NatsServer, ServiceProcess, free_port, suite_env

pytestmark = pytest.mark.slow
ADMIN = ("admin@example.com", "suite admin password 1")


@dataclass
class Suite:
    gateway: str
    procs: dict[str, ServiceProcess]
    logs: Path
    admin_headers: dict[str, str]

    def wait_for_records(self, service: str, predicate: Any, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Log records of ``service`` matching ``predicate``, waiting for them (logs are written after responses)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [r for r in self.log_records(service) if predicate(r)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def log_records(self, service: str) -> list[dict[str, Any]]:
        records = []
        for line in (self.logs / f"{service}.log").read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line some library printed raw
        return records


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    root = tmp_path_factory.mktemp("suite")
    nats = NatsServer(store_dir=root / "nats").start()
    ports = {name: free_port() for name in SERVICES}
    env = suite_env(
        data_dir=root / "data",
        nats_url=nats.url,
        ports=ports,
        extra={
            "STRATA_LOG_FORMAT": "json",
            "STRATA_ENVIRONMENT": "test",
            "STRATA_ADMIN_EMAIL": ADMIN[0],
            "STRATA_ADMIN_PASSWORD": ADMIN[1],
            "STRATA_GATEWAY_RATE_LIMIT_SIGNIN": "1/min;burst=8",  # refills too slowly to blur the test
            "STRATA_DATASETS_DEMO_DATA": "true",  # the query examples run on them
        },
    )
    procs = {
        name: ServiceProcess(service=name, port=ports[name], env=env, log_file=root / "logs" / f"{name}.log").start()
        for name in SERVICES
    }
    try:
        gateway = procs["gateway"].url
        deadline = time.monotonic() + 60
        body: Any = None
        while time.monotonic() < deadline:
            for proc in procs.values():
                assert proc.process is not None and proc.process.poll() is None, f"{proc.service} died"
            try:
                resp = httpx.get(gateway + "/readyz", timeout=2)
                body = resp.json()
                if resp.status_code == 200:
                    break
            except httpx.HTTPError as exc:
                body = repr(exc)
            time.sleep(0.2)
        else:
            pytest.fail(f"the suite was not ready within 60s: {body}")
        token = httpx.post(gateway + "/api/v1/auth/token", data={"username": ADMIN[0], "password": ADMIN[1]})
        assert token.status_code == 200, token.text
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        yield Suite(gateway=gateway, procs=procs, logs=root / "logs", admin_headers=headers)
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()
        nats.stop()


def test_readyz_reports_every_service_and_nats(suite: Suite) -> None:
    body = httpx.get(suite.gateway + "/readyz").json()
    assert body["status"] == "ready"
    assert body["checks"]["nats"] == "ok"
    for name in ("auth", "datasets", "execution", "schemas"):
        assert body["checks"][name]["status"] == "ok"
        assert body["checks"][name]["checks"] == {"nats": "ok", "database": "ok"}


def test_one_route_on_each_service_through_the_gateway(suite: Suite) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    for name in SERVICES:
        resp = httpx.get(
            f"{suite.gateway}/api/v1/system/{name}/info",
            headers={"X-Request-ID": f"suite-{name}", "traceparent": traceparent, **suite.admin_headers},
        )
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-request-id"] == f"suite-{name}"
        info = resp.json()
        assert info["service"] == name and info["nats"]["connected"] is True
        if name != "gateway":
            # The service's own access log has the request id and the caller's trace id: one trace across the hop.
            lines = suite.wait_for_records(name, lambda r, n=name: r.get("request_id") == f"suite-{n}")
            assert lines and all(r["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736" for r in lines), lines


def test_an_event_crosses_services_with_its_trace(suite: Suite) -> None:
    """datasets publishes instance.started through its outbox; the gateway consumes it, in the same trace."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        listed = httpx.get(suite.gateway + "/api/v1/system/instances", headers=suite.admin_headers).json()["data"]
        if {r["service"] for r in listed} >= set(SERVICES):
            break
        time.sleep(0.2)
    assert {r["service"] for r in listed} >= set(SERVICES), listed
    assert all(r["status"] == "live" for r in listed)

    staged = suite.wait_for_records(
        "datasets", lambda r: r["message"].startswith("staged strata.datasets.instance.started")
    )
    assert staged, "datasets did not log the event it staged"
    event_id = staged[-1]["message"].rsplit(" ", 1)[-1]
    handled = suite.wait_for_records("gateway", lambda r: f"(event {event_id})" in r["message"])
    assert handled, f"the gateway did not log event {event_id}"
    assert staged[-1]["trace_id"] and handled[0]["trace_id"] == staged[-1]["trace_id"]


def test_unknown_paths_and_errors_keep_the_envelope(suite: Suite) -> None:
    resp = httpx.get(suite.gateway + "/api/v1/nowhere", headers=suite.admin_headers)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "NOT_FOUND"
    resp = httpx.get(suite.gateway + "/api/v1/system/datasets/nothing", headers=suite.admin_headers)
    assert resp.status_code == 404 and resp.json()["error"]["request_id"] == resp.headers["x-request-id"]


def test_metrics_on_every_service(suite: Suite) -> None:
    for proc in suite.procs.values():
        text = httpx.get(proc.url + "/metrics").text
        assert "strata_http_requests_total" in text and "strata_nats_connected" in text


def test_a_dataset_through_the_gateway(suite: Suite) -> None:
    """Upload, ingest from the work queue, preview with a filter, and another user sees nothing unshared."""
    gw = suite.gateway
    rows = "".join(f"agent{i % 5},{['eu', 'us'][i % 2]},{i % 5 + 1}\n" for i in range(1000))
    upload = httpx.post(
        gw + "/api/v1/datasets",
        headers=suite.admin_headers,
        data={"name": "calls through the gateway"},
        files={"file": ("calls.csv", ("agent,region,rating\n" + rows).encode(), "text/csv")},
        timeout=30,
    )
    assert upload.status_code == 202, upload.text
    dataset_id = upload.json()["id"]
    deadline = time.monotonic() + 30
    while True:
        got = httpx.get(f"{gw}/api/v1/datasets/{dataset_id}", headers=suite.admin_headers).json()
        if got["status"] != "processing" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert got["status"] == "ready" and got["row_count"] == 1000, got
    preview = httpx.get(
        f"{gw}/api/v1/datasets/{dataset_id}/preview",
        headers=suite.admin_headers,
        params=[("filter", "region:eq:eu"), ("sort", "-rating"), ("limit", "5")],
    )
    assert preview.status_code == 200 and preview.json()["meta"]["total_rows"] == 500
    assert all(row[1] == "eu" for row in preview.json()["data"])

    created = httpx.post(
        gw + "/api/v1/auth/users",
        headers=suite.admin_headers,
        json={
            "email": "outsider@example.com",
            "password": "outsider password 1",
            "display_name": "O",
            "role": "analyst",
        },
    )
    assert created.status_code == 201
    token = httpx.post(
        gw + "/api/v1/auth/token", data={"username": "outsider@example.com", "password": "outsider password 1"}
    ).json()
    outsider = {"Authorization": f"Bearer {token['access_token']}"}
    assert httpx.get(f"{gw}/api/v1/datasets/{dataset_id}", headers=outsider).status_code == 404
    visible = httpx.get(f"{gw}/api/v1/datasets", headers=outsider).json()["data"]
    assert dataset_id not in {d["id"] for d in visible}  # only the demo datasets, shared with everyone


def _sign_up(suite: Suite, email: str, role: str) -> dict[str, str]:
    password = f"{role} password for {email}"
    created = httpx.post(
        suite.gateway + "/api/v1/auth/users",
        headers=suite.admin_headers,
        json={"email": email, "password": password, "display_name": email.split("@")[0], "role": role},
    )
    assert created.status_code == 201, created.text
    token = httpx.post(suite.gateway + "/api/v1/auth/token", data={"username": email, "password": password}).json()
    return {"Authorization": f"Bearer {token['access_token']}"}


def _wait_job(gw: str, job_id: str, headers: dict[str, str], timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job: dict[str, Any] = httpx.get(f"{gw}/api/v1/jobs/{job_id}", headers=headers).json()
        if job["state"] in ("succeeded", "failed", "cancelled", "timed_out") or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def test_queries_on_the_demo_datasets_through_the_gateway(suite: Suite) -> None:
    """An analyst runs every example on both engines, pages and downloads a result, cancels a long query and sees
    it stop; another analyst cannot see any of it."""
    gw = suite.gateway
    analyst = _sign_up(suite, "querier@example.com", "analyst")
    deadline = time.monotonic() + 90
    while True:  # the demo datasets are generated and ingested on first start
        names = {d["name"]: d["status"] for d in httpx.get(gw + "/api/v1/datasets", headers=analyst).json()["data"]}
        if names.get("support_calls") == "ready" and names.get("taxi_trips") == "ready":
            break
        assert time.monotonic() < deadline, names
        time.sleep(0.5)

    examples = httpx.get(gw + "/api/v1/queries/examples", headers=analyst).json()
    assert {e["engine"] for e in examples} == {"duckdb", "clickhouse"}
    for example in examples:
        resp = httpx.post(
            gw + "/api/v1/queries",
            headers=analyst,
            json={
                "sql": example["sql"],
                "engine": example["engine"],
                "parameters": example["parameters"],
                "wait_ms": 20000,
            },
            timeout=30,
        )
        assert resp.status_code in (200, 202), resp.text
        job = _wait_job(gw, resp.json()["id"], analyst)
        assert job["state"] == "succeeded" and job["result"]["rows"] > 0, (example["title"], job)

    job = httpx.post(
        gw + "/api/v1/queries",
        headers=analyst,
        json={"sql": "SELECT trip_id, fare FROM taxi_trips ORDER BY trip_id LIMIT 2500", "wait_ms": 20000},
        timeout=30,
    ).json()
    assert job["state"] == "succeeded", job
    first = httpx.get(f"{gw}/api/v1/jobs/{job['id']}/results", headers=analyst, params={"limit": 1000}).json()
    second = httpx.get(
        f"{gw}/api/v1/jobs/{job['id']}/results", headers=analyst, params={"page_token": first["next_page_token"]}
    ).json()
    assert [r[0] for r in first["rows"] + second["rows"]][:2000] == list(range(1, 2001))
    csv_body = httpx.get(f"{gw}/api/v1/jobs/{job['id']}/results/download", headers=analyst, params={"format": "csv"})
    assert csv_body.status_code == 200 and len(csv_body.text.splitlines()) == 2501

    long = httpx.post(
        gw + "/api/v1/queries",
        headers=analyst,
        json={"sql": "SELECT sum(a.range * b.range) FROM range(100000) a, range(100000) b"},
    ).json()
    deadline = time.monotonic() + 20
    while httpx.get(f"{gw}/api/v1/jobs/{long['id']}", headers=analyst).json()["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancelled = httpx.post(
        f"{gw}/api/v1/jobs/{long['id']}/cancel", headers=analyst, params={"wait_ms": 10000}, timeout=20
    ).json()
    assert cancelled["state"] == "cancelled", cancelled

    outsider = _sign_up(suite, "nosy@example.com", "analyst")
    assert httpx.get(f"{gw}/api/v1/jobs/{job['id']}", headers=outsider).status_code == 404
    assert httpx.get(f"{gw}/api/v1/jobs/{job['id']}/results", headers=outsider).status_code == 404
    assert httpx.get(f"{gw}/api/v1/jobs", headers=outsider).json()["items"] == []


def test_sign_in_roles_and_limits_through_the_gateway(suite: Suite) -> None:
    """Issue 3's walk-through, through the gateway only. It spends the sign-in bucket: keep it last."""
    gw = suite.gateway
    created = httpx.post(
        gw + "/api/v1/auth/users",
        headers=suite.admin_headers,
        json={
            "email": "analyst@example.com",
            "password": "analyst password 1",
            "display_name": "Ana",
            "role": "analyst",
        },
    )
    assert created.status_code == 201, created.text
    login = httpx.post(
        gw + "/api/v1/auth/token", data={"username": "analyst@example.com", "password": "analyst password 1"}
    )
    assert login.status_code == 200
    tokens = login.json()
    refreshed = httpx.post(gw + "/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert refreshed.status_code == 200
    analyst = {"Authorization": f"Bearer {refreshed.json()['access_token']}"}
    me = httpx.get(gw + "/api/v1/auth/me", headers=analyst)
    assert me.status_code == 200 and me.json()["role"] == "analyst"

    # Services verify the token themselves: reached directly, without one, they answer 401 too.
    direct = httpx.get(suite.procs["datasets"].url + "/api/v1/system/datasets/info")
    assert direct.status_code == 401
    assert httpx.get(gw + "/api/v1/auth/me").status_code == 401
    assert httpx.get(gw + "/api/v1/auth/users", headers=analyst).status_code == 403
    assert httpx.get(gw + "/api/v1/system/instances", headers=analyst).status_code == 403
    # An API key works through the gateway like a token (resolved by auth over NATS).
    key = httpx.post(gw + "/api/v1/auth/api-keys", headers=analyst, json={"name": "ci", "role": "viewer"}).json()
    as_key = httpx.get(gw + "/api/v1/auth/me", headers={"Authorization": f"Bearer {key['key']}"})
    assert as_key.status_code == 200 and as_key.json()["email"] == "analyst@example.com"
    # Guessing passwords runs into the sign-in limit.
    codes = [
        httpx.post(gw + "/api/v1/auth/token", data={"username": "analyst@example.com", "password": "guess"}).status_code
        for _ in range(12)
    ]
    assert 401 in codes and codes[-1] == 429, codes
    limited = httpx.post(gw + "/api/v1/auth/token", data={"username": "x@example.com", "password": "y"})
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
