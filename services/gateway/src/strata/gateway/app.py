"""``create_app(settings)``: the gateway. Its own routes first, then the proxy for everything else under /api/v1."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from fastapi import FastAPI

from strata.common.app import Runtime, create_service_app
from strata.common.consumer import MemoryDedup
from strata.common.observability import Metrics

from .config import Settings
from .instances import InstanceRegistry, consumer_spec
from .proxy import Proxy


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    runtime = Runtime(settings, metrics=Metrics(settings.service_name))
    registry = InstanceRegistry(stale_after_s=settings.instance_stale_after_s)
    runtime.consume(consumer_spec(settings.instance_id), MemoryDedup(10_000).wrap(registry.handle))
    upstreams = settings.upstream_urls()
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(settings.upstream_timeout_s, connect=settings.connect_timeout_s),
        limits=httpx.Limits(
            max_connections=settings.max_connections, max_keepalive_connections=settings.max_connections
        ),
        follow_redirects=False,
        trust_env=False,
    )

    async def readiness() -> dict[str, Any]:
        """NATS and every upstream's own /readyz, asked at once."""

        async def upstream(name: str, url: str) -> dict[str, Any]:
            try:
                resp = await client.get(url + "/readyz", timeout=settings.readiness_timeout_s)
            except httpx.HTTPError as exc:
                return {"status": "unreachable", "error": type(exc).__name__}
            try:
                body = resp.json()
            except ValueError:
                body = {}
            return {"status": "ok" if resp.status_code == 200 else "not_ready", "checks": body.get("checks", {})}

        results = await asyncio.gather(*(upstream(n, u) for n, u in upstreams.items()))
        checks: dict[str, Any] = {"nats": "ok" if runtime.bus.is_connected else "not connected"}
        checks.update(zip(upstreams, results, strict=True))
        return checks

    async def on_stopping(_: Runtime) -> None:
        await client.aclose()

    app = create_service_app(
        settings,
        runtime=runtime,
        title="Strata API",
        description="The Strata API: datasets, queries, jobs, blocks, workflows and schemas, behind one gateway.",
        readiness=readiness,
        on_stopping=on_stopping,
    )

    @app.get("/api/v1/system/instances", tags=["system"], summary="Running service instances, from their heartbeats")
    async def instances() -> dict[str, Any]:
        data = registry.list()
        return {"data": data, "meta": {"next_cursor": None, "limit": len(data)}}

    app.mount("/api/v1", Proxy(upstreams=upstreams, client=client), name="proxy")
    return app
