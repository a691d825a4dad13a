"""The common app shape: error envelope, request ids, metrics by route template, health and readiness."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import pytest
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict
from pydantic_settings import SettingsConfigDict

from strata.common.app import Runtime, create_service_app
from strata.common.errors import NotFound, StrataError
from strata.common.observability import Metrics
from strata.common.settings import ServiceSettings
from strata.common.testing import app_client


class DemoSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="STRATA_DEMO_", extra="ignore")
    service_name: ClassVar[str] = "demo"


class ThingNotFound(NotFound):
    code = "THING_NOT_FOUND"


class Thing(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    size: int


router = APIRouter()


@router.get("/api/v1/things/{thing_id}")
async def get_thing(thing_id: int) -> dict[str, int]:
    if thing_id == 404:
        raise ThingNotFound(f"Thing {thing_id} does not exist.", details=[{"thing_id": thing_id}])
    return {"id": thing_id}


@router.post("/api/v1/things")
async def create_thing(thing: Thing) -> Thing:
    return thing


@router.get("/api/v1/locked")
async def locked() -> None:
    from sqlalchemy.exc import OperationalError

    raise OperationalError("INSERT INTO jobs ...", {}, Exception("database is locked"))


@router.get("/api/v1/boom")
async def boom() -> None:
    raise RuntimeError("secret connection string postgres://admin:hunter2@db")


def make_app(tmp_path: Path, nats_url: str):  # type: ignore[no-untyped-def]
    settings = DemoSettings(data_dir=tmp_path, nats_url=nats_url, log_format="json")
    runtime = Runtime(settings, metrics=Metrics("demo"))
    return create_service_app(settings, runtime=runtime, title="demo", routers=[router])


async def test_our_error_renders_the_envelope(tmp_path: Path, nats_url: str) -> None:
    async with app_client(make_app(tmp_path, nats_url)) as client:
        resp = await client.get("/api/v1/things/404", headers={"X-Request-ID": "req-123"})
    assert resp.status_code == 404
    assert resp.headers["x-request-id"] == "req-123"
    assert resp.json() == {
        "error": {
            "code": "THING_NOT_FOUND",
            "message": "Thing 404 does not exist.",
            "details": [{"thing_id": 404}],
            "request_id": "req-123",
        }
    }


async def test_validation_error_is_422_without_echoing_input(tmp_path: Path, nats_url: str) -> None:
    async with app_client(make_app(tmp_path, nats_url)) as client:
        resp = await client.post("/api/v1/things", json={"name": "hunter2-secret", "size": "big", "extra": 1})
        garbled = await client.post(
            "/api/v1/things", content=b"{not json", headers={"Content-Type": "application/json"}
        )
    assert resp.status_code == 422
    body = resp.json()["error"]
    assert body["code"] == "VALIDATION_ERROR"
    locs = {tuple(d["loc"]) for d in body["details"]}
    assert ("body", "size") in locs and ("body", "extra") in locs
    assert "hunter2-secret" not in resp.text
    assert body["request_id"] == resp.headers["x-request-id"]
    assert garbled.status_code == 422
    assert garbled.json()["error"]["code"] == "VALIDATION_ERROR"


async def test_unexpected_error_is_500_logged_once_without_internals(
    tmp_path: Path, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with app_client(make_app(tmp_path, nats_url)) as client:
        with caplog.at_level(logging.ERROR):
            resp = await client.get("/api/v1/boom")
    assert resp.status_code == 500
    body = resp.json()["error"]
    assert body["code"] == "INTERNAL_ERROR"
    assert "hunter2" not in resp.text and "RuntimeError" not in resp.text
    assert body["request_id"] == resp.headers["x-request-id"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].exc_info is not None and "hunter2" in str(errors[0].exc_info[1])


async def test_a_busy_database_is_a_503_to_retry(tmp_path: Path, nats_url: str) -> None:
    async with app_client(make_app(tmp_path, nats_url)) as client:
        resp = await client.get("/api/v1/locked")
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["code"] == "DATABASE_BUSY" and "INSERT" not in resp.text


async def test_unknown_route_and_method(tmp_path: Path, nats_url: str) -> None:
    async with app_client(make_app(tmp_path, nats_url)) as client:
        missing = await client.get("/api/v1/nothing-here")
        wrong_method = await client.delete("/api/v1/things")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "METHOD_NOT_ALLOWED"


@pytest.mark.parametrize(
    "incoming, kept",
    [("abc-123_x.y:z", True), ("has space", False), ("x" * 200, False), ("", False), ("bad\x01ctl", False)],
)
async def test_request_id_is_kept_only_when_sane(tmp_path: Path, nats_url: str, incoming: str, kept: bool) -> None:
    async with app_client(make_app(tmp_path, nats_url)) as client:
        resp = await client.get("/api/v1/things/1", headers={"X-Request-ID": incoming})
    rid = resp.headers["x-request-id"]
    assert (rid == incoming) is kept
    assert len(rid) <= 128 and rid.isprintable() and " " not in rid


async def test_metrics_are_labelled_by_route_template(tmp_path: Path, nats_url: str) -> None:
    async with app_client(make_app(tmp_path, nats_url)) as client:
        for thing_id in (1, 2, 3, 404):
            await client.get(f"/api/v1/things/{thing_id}")
        await client.get("/api/v1/random/path/abc")
        await client.get("/healthz")
        text = (await client.get("/metrics")).text
    assert 'strata_http_requests_total{method="GET",route="/api/v1/things/{thing_id}",status="200"} 3.0' in text
    assert 'strata_http_requests_total{method="GET",route="/api/v1/things/{thing_id}",status="404"} 1.0' in text
    assert 'route="unmatched",status="404"} 1.0' in text
    assert "/api/v1/things/1" not in text and "/random/path" not in text
    assert 'route="/healthz"' not in text
    assert "strata_http_request_duration_seconds_bucket" in text
    assert "strata_http_requests_in_flight 0.0" in text


async def test_health_and_readiness(tmp_path: Path, fresh_nats) -> None:  # type: ignore[no-untyped-def]
    async with app_client(make_app(tmp_path, fresh_nats.url)) as client:
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["nats"] == "ok"
        fresh_nats.stop()
        from strata.common.testing import eventually

        async def not_ready() -> bool:
            resp = await client.get("/readyz")
            return resp.status_code == 503 and resp.json()["checks"]["nats"] != "ok"

        await eventually(not_ready, timeout_s=10)
        assert (await client.get("/healthz")).status_code == 200
        fresh_nats.start()

        async def ready_again() -> bool:
            return (await client.get("/readyz")).status_code == 200

        await eventually(ready_again, timeout_s=15)


def test_strata_error_defaults() -> None:
    err = StrataError()
    assert err.status == 500 and err.code == "INTERNAL_ERROR" and err.to_dict()["details"] == []
