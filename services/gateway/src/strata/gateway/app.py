"""``create_app(settings)``: the gateway. Its own routes first, then the proxy for everything else under /api/v1.

Middleware, outermost first: CORS (so every answer, errors included, carries the CORS headers it should), security
headers, the request middleware (request id, metrics, the last-resort 500), then the edge (authentication and rate
limits), then the routes and the proxy.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.middleware import Middleware

from strata.common import __version__
from strata.common.app import Runtime, create_service_app
from strata.common.consumer import MemoryDedup
from strata.common.contracts.realtime import WS_PATH
from strata.common.deps import AdminUser
from strata.common.observability import Metrics

from .config import Settings
from .edge import EdgeMiddleware, SecurityHeadersMiddleware
from .instances import InstanceRegistry, consumer_spec
from .openapi import OpenApiAggregator, install_docs
from .proxy import Policy, Proxy, upstream_session
from .ratelimit import RateLimiter, create_rate_limiter
from .sockets import Realtime, RealtimeMiddleware


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    runtime = Runtime(settings, metrics=Metrics(settings.service_name))
    registry = InstanceRegistry(stale_after_s=settings.instance_stale_after_s)
    runtime.consume(consumer_spec(settings.instance_id), MemoryDedup(10_000).wrap(registry.handle))
    upstreams = settings.upstream_urls()
    policy = Policy.build(
        max_body_bytes=settings.max_body_bytes,
        max_upload_bytes=settings.max_upload_bytes,
        upload_routes=settings.upload_routes,
        default_timeout_s=settings.upstream_timeout_s,
        route_timeouts_s=settings.route_timeouts_s,
    )
    proxy = Proxy(upstreams=upstreams, session=None, policy=policy)
    # Made in the lifespan: aiohttp sessions and Redis clients belong to the event loop that creates them.
    sessions: list[aiohttp.ClientSession] = []
    limiters: list[RateLimiter] = []

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

    def limiter() -> RateLimiter:
        if not limiters:
            limiters.append(create_rate_limiter(settings.rate_limit_redis_url or None))
        return limiters[0]

    realtime = Realtime(
        bus=runtime.bus,
        rpc=runtime.rpc_client,
        verifier=lambda: runtime.verifier,
        limiter=limiter,
        metrics=runtime.metrics,
        settings=settings,
    )

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

    async def on_started(rt: Runtime) -> None:
        proxy.session = session()
        limiter()
        await rt.verifier.refresh_keys()  # the JWKS now, if auth is up; else on the first token
        await realtime.start()

    async def on_stopping(_: Runtime) -> None:
        await realtime.stop()
        if sessions:
            await sessions.pop().close()
        if limiters:
            await limiters.pop().close()

    app = create_service_app(
        settings,
        runtime=runtime,
        title="Strata API",
        description="The Strata API: datasets, queries, jobs, blocks, workflows and schemas, behind one gateway.",
        readiness=readiness,
        on_started=on_started,
        on_stopping=on_stopping,
        openapi_url=None,  # the gateway serves the services' specs merged, below
    )
    # Innermost, inside the request middleware, so a 401 or 429 has a request id and is counted.
    app.user_middleware.append(
        Middleware(EdgeMiddleware, verifier=lambda: runtime.verifier, limiter=limiter, limits=settings.limits())
    )
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_credentials=True,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "X-Request-ID", "traceparent", "tracestate"],
        expose_headers=["X-Request-ID", "Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining"],
        max_age=600,
    )

    @app.get("/.well-known/jwks.json", include_in_schema=False)
    async def jwks() -> dict[str, Any]:
        if not runtime.verifier.jwks.get("keys"):
            await runtime.verifier.refresh_keys()
        return runtime.verifier.jwks

    @app.get("/api/v1/system/instances", tags=["system"], summary="Running service instances, from their heartbeats")
    async def instances(_: AdminUser) -> dict[str, Any]:
        data = registry.list()
        return {"data": data, "meta": {"next_cursor": None, "limit": len(data)}}

    app.state.realtime = realtime
    # Outermost: live events (docs/realtime.md) skip the HTTP middleware, which passes WebSockets through anyway.
    app.add_middleware(RealtimeMiddleware, realtime=realtime, path=WS_PATH)

    aggregator = OpenApiAggregator(
        upstreams=upstreams,
        session=session,
        title="Strata API",
        version=__version__,
        ttl_s=settings.openapi_cache_ttl_s,
    )
    # Swagger UI keeps the whole sign-in (password included) in the browser's storage when asked to persist it.
    install_docs(app, aggregator, swagger_ui_parameters={"persistAuthorization": settings.environment != "production"})
    app.mount("/api/v1", proxy, name="proxy")
    return app
