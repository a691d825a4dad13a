"""``create_app(settings)``: the gateway. Its own routes first, then the proxy for everything else under /api/v1."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from fastapi import FastAPI

from strata.common.app import Runtime, create_service_app
from strata.common.consumer import MemoryDedup
from strata.common.observability import Metrics

from .config import Settings
from .instances import InstanceRegistry, consumer_spec
from .proxy import Proxy, upstream_session


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    runtime = Runtime(settings, metrics=Metrics(settings.service_name))
    registry = InstanceRegistry(stale_after_s=settings.instance_stale_after_s)
    runtime.consume(consumer_spec(settings.instance_id), MemoryDedup(10_000).wrap(registry.handle))
    upstreams = settings.upstream_urls()
    proxy = Proxy(upstreams=upstreams, session=None)
    # Made in the lifespan: an aiohttp session belongs to the event loop that creates it.
    sessions: list[aiohttp.ClientSession] = []

    def session() -> aiohttp.ClientSession:
        if not sessions:
            sessions.append(
                upstream_session(
                    connect_timeout_s=settings.connect_timeout_s,
                    read_timeout_s=settings.upstream_timeout_s,
                    max_connections=settings.max_connections,
                )
            )
        return sessions[0]

    async def readiness() -> dict[str, Any]:
        """NATS and every upstream's own /readyz, asked at once."""

        timeout = aiohttp.ClientTimeout(total=settings.readiness_timeout_s)

        async def upstream(name: str, url: str) -> dict[str, Any]:
            try:
                async with session().get(url + "/readyz", timeout=timeout) as resp:
                    status = resp.status
                    try:
                        body = await resp.json(content_type=None)
                    except ValueError:
                        body = {}
            except (aiohttp.ClientError, TimeoutError) as exc:
                return {"status": "unreachable", "error": type(exc).__name__}
            checks = body.get("checks", {}) if isinstance(body, dict) else {}
            return {"status": "ok" if status == 200 else "not_ready", "checks": checks}

        results = await asyncio.gather(*(upstream(n, u) for n, u in upstreams.items()))
        checks: dict[str, Any] = {"nats": "ok" if runtime.bus.is_connected else "not connected"}
        checks.update(zip(upstreams, results, strict=True))
        return checks

    async def on_started(_: Runtime) -> None:
        proxy.session = session()

    async def on_stopping(_: Runtime) -> None:
        if sessions:
            await sessions.pop().close()

    app = create_service_app(
        settings,
        runtime=runtime,
        title="Strata API",
        description="The Strata API: datasets, queries, jobs, blocks, workflows and schemas, behind one gateway.",
        readiness=readiness,
        on_started=on_started,
        on_stopping=on_stopping,
    )

    @app.get("/api/v1/system/instances", tags=["system"], summary="Running service instances, from their heartbeats")
    async def instances() -> dict[str, Any]:
        data = registry.list()
        return {"data": data, "meta": {"next_cursor": None, "limit": len(data)}}

    app.mount("/api/v1", proxy, name="proxy")
    return app
