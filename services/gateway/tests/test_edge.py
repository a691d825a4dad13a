"""The gateway's edge: authentication, identity headers, rate limits, CORS, security headers and body limits."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from strata.common.procs import free_port
from strata.common.testing import TokenFactory, app_client, serve_app
from strata.gateway.app import create_app
from strata.gateway.config import Settings

TOKENS = TokenFactory()


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """An upstream that answers with what reached it (headers and body size)."""
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    if message["type"] == "http.disconnect":
        return
    body = json.dumps(
        {"path": scope["path"], "size": size, "headers": {k.decode(): v.decode() for k, v in scope["headers"]}}
    ).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async with serve_app(echo, lifespan="off") as url:
        yield url


def gateway(tmp_path: Path, nats_url: str, upstream: str, **kw: Any):  # type: ignore[no-untyped-def]
    app = create_app(
        Settings(
            data_dir=tmp_path,
            nats_url=nats_url,
            auth_url=upstream,
            datasets_url=upstream,
            execution_url=upstream,
            schemas_url=upstream,
            **kw,
        )
    )
    TOKENS.install(app)
    return app


def assert_error(resp: Any, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code
    assert resp.json()["error"]["request_id"] == resp.headers["x-request-id"]


async def test_api_needs_a_valid_token_except_public_routes(tmp_path: Path, nats_url: str, upstream: str) -> None:
    async with app_client(gateway(tmp_path, nats_url, upstream)) as client:
        assert_error(await client.get("/api/v1/datasets"), 401, "UNAUTHORIZED")
        assert_error(
            await client.get("/api/v1/datasets", headers={"Authorization": "Bearer junk"}), 401, "INVALID_TOKEN"
        )
        expired = TOKENS.headers(ttl_s=-120)
        assert_error(await client.get("/api/v1/datasets", headers=expired), 401, "TOKEN_EXPIRED")
        other = TokenFactory().headers()  # signed by a key the gateway does not know
        assert_error(await client.get("/api/v1/datasets", headers=other), 401, "INVALID_TOKEN")
        assert (await client.get("/api/v1/datasets", headers=TOKENS.headers())).status_code == 200
        for path in ("/api/v1/auth/token", "/api/v1/auth/refresh", "/api/v1/auth/logout"):
            assert (await client.post(path)).status_code == 200, path  # reaches the (echo) auth service
        assert (await client.get("/api/v1/auth/.well-known/jwks.json")).status_code == 200
        for path in ("/healthz", "/metrics"):
            assert (await client.get(path)).status_code == 200
        jwks = (await client.get("/.well-known/jwks.json")).json()
        assert jwks == TOKENS.jwks()


async def test_identity_headers_cannot_be_forged(tmp_path: Path, nats_url: str, upstream: str) -> None:
    forged = {"X-Strata-User-Id": "admin", "X-Strata-User-Role": "admin", "X-Strata-Auth-Kind": "user"}
    async with app_client(gateway(tmp_path, nats_url, upstream)) as client:
        seen = (
            await client.get("/api/v1/datasets", headers={**forged, **TOKENS.headers(user_id="u-7", role="viewer")})
        ).json()["headers"]
        anonymous = (await client.post("/api/v1/auth/token", headers=forged)).json()["headers"]
    assert seen["x-strata-user-id"] == "u-7" and seen["x-strata-user-role"] == "viewer"
    assert not any(k.startswith("x-strata-") for k in anonymous)


async def test_admin_only_gateway_route(tmp_path: Path, nats_url: str, upstream: str) -> None:
    async with app_client(gateway(tmp_path, nats_url, upstream)) as client:
        assert_error(
            await client.get("/api/v1/system/instances", headers=TOKENS.headers(role="viewer")), 403, "FORBIDDEN"
        )
        assert (await client.get("/api/v1/system/instances", headers=TOKENS.headers(role="admin"))).status_code == 200


async def test_rate_limits(tmp_path: Path, nats_url: str, upstream: str) -> None:
    app = gateway(
        tmp_path,
        nats_url,
        upstream,
        rate_limit_user="1/min;burst=3",
        rate_limit_anonymous="1/min;burst=2",
        rate_limit_signin="1/min;burst=1",
    )
    alice, bob = TOKENS.headers(user_id="alice"), TOKENS.headers(user_id="bob")
    async with app_client(app) as client:
        codes = [(await client.get("/api/v1/datasets", headers=alice)).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        limited = await client.get("/api/v1/datasets", headers=alice)
        assert_error(limited, 429, "RATE_LIMITED")
        assert int(limited.headers["retry-after"]) >= 1
        assert (await client.get("/api/v1/datasets", headers=bob)).status_code == 200  # a bucket per user
        # Sign-in is tighter than the rest, and failed authentication spends the address's tokens too.
        assert (await client.post("/api/v1/auth/token")).status_code == 200
        assert_error(await client.post("/api/v1/auth/token"), 429, "RATE_LIMITED")
        bad = {"Authorization": "Bearer junk"}
        assert [(await client.get("/api/v1/datasets", headers=bad)).status_code for _ in range(3)] == [401, 401, 429]


async def test_cors(tmp_path: Path, nats_url: str, upstream: str) -> None:
    allowed, evil = "http://localhost:5173", "https://evil.example"
    async with app_client(gateway(tmp_path, nats_url, upstream)) as client:
        preflight = await client.options(
            "/api/v1/datasets",
            headers={
                "Origin": allowed,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == allowed
        assert preflight.headers["access-control-allow-credentials"] == "true"
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        refused = await client.options(
            "/api/v1/datasets", headers={"Origin": evil, "Access-Control-Request-Method": "POST"}
        )
        assert "access-control-allow-origin" not in refused.headers
        unauthorized = await client.get("/api/v1/datasets", headers={"Origin": allowed})
        assert unauthorized.status_code == 401 and unauthorized.headers["access-control-allow-origin"] == allowed
        assert "x-request-id" in unauthorized.headers["access-control-expose-headers"].lower()
        plain = await client.get("/api/v1/datasets", headers={"Origin": evil, **TOKENS.headers()})
        assert "access-control-allow-origin" not in plain.headers


async def test_security_headers(tmp_path: Path, nats_url: str, upstream: str) -> None:
    async with app_client(gateway(tmp_path, nats_url, upstream)) as client:
        resp = await client.get("/api/v1/datasets", headers=TOKENS.headers())
        https = await client.get("/healthz", headers={"X-Forwarded-Proto": "https"})
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["x-frame-options"] == "DENY"
    assert resp.headers["referrer-policy"] == "no-referrer"
    assert "default-src 'none'" in resp.headers["content-security-policy"]
    assert "strict-transport-security" not in resp.headers
    assert https.headers["strict-transport-security"].startswith("max-age=")


async def test_body_limits(tmp_path: Path, nats_url: str, upstream: str) -> None:
    app = gateway(tmp_path, nats_url, upstream, max_body_bytes=4096, max_upload_bytes=64 * 1024)
    auth = TOKENS.headers()

    async def chunks(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield b"x" * 1024

    async with app_client(app) as client:
        assert (await client.post("/api/v1/queries", content=b"x" * 4096, headers=auth)).json()["size"] == 4096
        assert_error(await client.post("/api/v1/queries", content=b"x" * 4097, headers=auth), 413, "PAYLOAD_TOO_LARGE")
        assert_error(await client.post("/api/v1/queries", content=chunks(8), headers=auth), 413, "PAYLOAD_TOO_LARGE")
        # Uploads may be larger, up to their own limit.
        assert (await client.post("/api/v1/datasets", content=b"x" * 32768, headers=auth)).json()["size"] == 32768
        assert_error(await client.post("/api/v1/datasets", content=chunks(65), headers=auth), 413, "PAYLOAD_TOO_LARGE")
        resp = await client.post("/api/v1/queries", content=b"{}", headers={**auth, "Content-Length": "abc"})
        assert resp.status_code in (400, 422)


async def test_unknown_upstream_port_is_502_for_a_signed_in_user(tmp_path: Path, nats_url: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with app_client(gateway(tmp_path, nats_url, dead)) as client:
        assert_error(await client.get("/api/v1/datasets", headers=TOKENS.headers()), 502, "BAD_GATEWAY")
