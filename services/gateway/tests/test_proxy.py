"""The gateway's proxy against a real upstream HTTP server: streaming both ways, errors, headers."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from strata.common.procs import free_port
from strata.common.testing import TokenFactory, app_client, serve_app
from strata.gateway.app import create_app
from strata.gateway.config import Settings
from strata.gateway.proxy import service_for


class Echo:
    """An upstream that reports what reached it, and can stream slowly or stall on request."""

    def __init__(self) -> None:
        self.first_chunk = asyncio.Event()
        self.client_got_first = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if path.endswith("/slow"):
            await asyncio.sleep(5)
        if path.endswith("/readyz"):
            await self._json(send, 200, {"status": "ready", "checks": {"nats": "ok"}})
            return
        if path.endswith("/stream"):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
            await asyncio.wait_for(self.client_got_first.wait(), 10)
            await send({"type": "http.response.body", "body": b"second\n", "more_body": False})
            return
        digest, size = hashlib.sha256(), 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            if chunk:
                digest.update(chunk)
                size += len(chunk)
                self.first_chunk.set()
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        await self._json(
            send,
            200,
            {
                "method": scope["method"],
                "path": path,
                "query": scope["query_string"].decode(),
                "headers": headers,
                "size": size,
                "sha256": digest.hexdigest(),
            },
            extra=[(b"connection", b"keep-alive"), (b"x-upstream", b"echo")],
        )

    async def _json(self, send: Send, status: int, body: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
        await send({"type": "http.response.body", "body": data})


@pytest.fixture
async def echo() -> AsyncIterator[tuple[Echo, str]]:
    app = Echo()
    async with serve_app(app, lifespan="off") as url:
        yield app, url


TOKENS = TokenFactory()
AUTH = TOKENS.headers(user_id="u-1", role="analyst", ttl_s=3600)


def gateway(tmp_path: Path, nats_url: str, upstream: str, **kw: Any):  # type: ignore[no-untyped-def]
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    app = create_app(
        Settings(
            data_dir=tmp_path,
            nats_url=nats_url,
            auth_url=dead,
            datasets_url=upstream,
            execution_url=dead,
            schemas_url=upstream,
            **kw,
        )
    )
    TOKENS.install(app)
    return app


def test_routing_table() -> None:
    assert service_for("/api/v1/datasets/abc/preview") == "datasets"
    assert service_for("/api/v1/queries") == "execution"
    assert service_for("/api/v1/jobs/1/results") == "execution"
    assert service_for("/api/v1/registry/subjects") == "schemas"
    assert service_for("/api/v1/system/auth/info") == "auth"
    assert service_for("/api/v1/system/nope/info") is None
    assert service_for("/api/v1/unknown") is None
    assert service_for("/api/v1") is None


async def test_forwards_path_query_and_headers(tmp_path: Path, nats_url: str, echo: tuple[Echo, str]) -> None:
    _, url = echo
    async with app_client(gateway(tmp_path, nats_url, url)) as client:
        resp = await client.get(
            "/api/v1/datasets/abc/preview?limit=5&sort=-x",
            headers={
                "X-Request-ID": "rid-1",
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "Connection": "keep-alive, X-Secret-Hop",
                "X-Forwarded-For": "6.6.6.6",
                **AUTH,
            },
        )
    assert resp.status_code == 200
    body = resp.json()
    assert body["path"] == "/api/v1/datasets/abc/preview" and body["query"] == "limit=5&sort=-x"
    seen = body["headers"]
    assert seen["x-request-id"] == "rid-1"
    assert seen["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"  # same trace, gateway's span
    assert seen["x-forwarded-for"] != "6.6.6.6"  # the gateway says who the client is, not the client
    assert seen["authorization"] == AUTH["Authorization"]
    assert seen["x-strata-user-id"] == "u-1" and seen["x-strata-user-role"] == "analyst"
    assert resp.headers["x-upstream"] == "echo" and "connection" not in resp.headers
    assert resp.headers["x-request-id"] == "rid-1"


async def test_request_body_is_streamed_not_buffered(tmp_path: Path, nats_url: str, echo: tuple[Echo, str]) -> None:
    app, url = echo
    chunk = b"x" * (1 << 20)
    expected = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        expected.update(chunk)
        yield chunk
        # A buffering proxy would not send anything upstream before the body ends: this wait would time out.
        await asyncio.wait_for(app.first_chunk.wait(), 10)
        for _ in range(31):
            expected.update(chunk)
            yield chunk

    async with app_client(gateway(tmp_path, nats_url, url)) as client:
        resp = await client.post("/api/v1/datasets", content=body(), timeout=30, headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert resp.json()["size"] == 32 << 20 and resp.json()["sha256"] == expected.hexdigest()


async def test_response_is_streamed(tmp_path: Path, nats_url: str, echo: tuple[Echo, str]) -> None:
    app, url = echo
    # Over a real socket: the in-process transport would buffer the response and hide what is tested.
    async with (
        serve_app(gateway(tmp_path, nats_url, url)) as base,
        httpx.AsyncClient(base_url=base) as client,
        client.stream("GET", "/api/v1/datasets/x/stream", headers=AUTH) as resp,
    ):
        chunks = resp.aiter_raw()
        first = await asyncio.wait_for(chunks.__anext__(), 10)
        assert first == b"first\n"
        app.client_got_first.set()
        rest = b"".join([c async for c in chunks])
    assert rest == b"second\n"


async def test_unreachable_upstream_is_502(tmp_path: Path, nats_url: str, echo: tuple[Echo, str]) -> None:
    _, url = echo
    async with app_client(gateway(tmp_path, nats_url, url)) as client:
        resp = await client.get("/api/v1/auth/me", headers=AUTH)
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "BAD_GATEWAY"
    assert resp.json()["error"]["request_id"] == resp.headers["x-request-id"]


async def test_slow_upstream_is_504(tmp_path: Path, nats_url: str, echo: tuple[Echo, str]) -> None:
    _, url = echo
    async with app_client(gateway(tmp_path, nats_url, url, upstream_timeout_s=0.3, route_timeouts_s={})) as client:
        resp = await client.get("/api/v1/datasets/slow", headers=AUTH)
    assert resp.status_code == 504 and resp.json()["error"]["code"] == "UPSTREAM_TIMEOUT"


async def test_unknown_api_is_404_envelope(tmp_path: Path, nats_url: str, echo: tuple[Echo, str]) -> None:
    _, url = echo
    async with app_client(gateway(tmp_path, nats_url, url)) as client:
        for path in ("/api/v1/nothing", "/api/v1/system/nope/info", "/api/v1/"):
            resp = await client.get(path, headers=AUTH)
            assert resp.status_code == 404, path
            assert resp.json()["error"]["code"] == "NOT_FOUND"


async def test_readyz_names_what_is_not_ready(tmp_path: Path, nats_url: str, echo: tuple[Echo, str]) -> None:
    _, url = echo
    async with app_client(gateway(tmp_path, nats_url, url)) as client:
        resp = await client.get("/readyz")
    assert resp.status_code == 503
    checks = resp.json()["checks"]
    assert checks["nats"] == "ok"
    assert checks["datasets"]["status"] == "ok" and checks["schemas"]["status"] == "ok"
    assert checks["auth"]["status"] == "unreachable" and checks["execution"]["status"] == "unreachable"


async def test_proxy_metrics_use_the_mount_not_the_path(tmp_path: Path, nats_url: str, echo: tuple[Echo, str]) -> None:
    _, url = echo
    async with app_client(gateway(tmp_path, nats_url, url)) as client:
        await client.get("/api/v1/datasets/123", headers=AUTH)
        await client.get("/api/v1/datasets/456", headers=AUTH)
        text = (await client.get("/metrics")).text
    assert 'route="/api/v1/{path}",status="200"} 2.0' in text
    assert "/api/v1/datasets/123" not in text
