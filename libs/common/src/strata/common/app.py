"""The shape every service shares: ``create_service_app(settings, ...)`` around a :class:`Runtime`.

The runtime holds what a service connects to (database, NATS, outbox relay, consumers, RPC server) and is started and
stopped by the app's lifespan, which yields it as typed state. Every app gets ``/healthz`` (the process answers),
``/readyz`` (its database and NATS answer; 503 otherwise), ``/metrics``, the request middleware and the error envelope.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypedDict

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter, Gauge, Histogram

from . import __version__, tracing
from .auth import TokenVerifier
from .consumer import ConsumerSpec, EventConsumer, Handler, ProcessedEventMixin, db_handler
from .contracts.auth import ApiKeyLookup, Identity, Jwks, JwksRequest
from .contracts.system import InstanceHeartbeat, InstanceInfo, InstanceStarted, InstanceStopped, instance_subject
from .db import Database, migrate_async, redact_url, utcnow
from .deps import AdminUser
from .errors import install_error_handlers
from .events import Bus, CloudEvent, source_of
from .observability import LATENCY_BUCKETS, Metrics, RequestContextMiddleware, setup_logging
from .outbox import OutboxMixin, OutboxRelay, stage_event
from .rpc import RpcClient, RpcServer
from .settings import ServiceSettings

log = logging.getLogger(__name__)


class RuntimeMetrics:
    """Event, RPC and bus metrics, in the app's registry."""

    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.events_published = Counter(
            "strata_events_published_total", "Events published from the outbox.", registry=r
        )
        self.outbox_pending = Gauge(
            "strata_outbox_pending", "Outbox events not yet acknowledged by JetStream.", registry=r
        )
        self.consumed = Counter(
            "strata_events_consumed_total",
            "Messages handled by consumers, by consumer and outcome (ack, retry, dead_letter).",
            ["consumer", "outcome"],
            registry=r,
        )
        self.handle_seconds = Histogram(
            "strata_event_handle_duration_seconds",
            "Time to handle one message.",
            ["consumer"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.consumer_pending = Gauge(
            "strata_consumer_pending_messages", "Messages waiting for a consumer (its lag).", ["consumer"], registry=r
        )
        self.consumer_ack_pending = Gauge(
            "strata_consumer_ack_pending_messages",
            "Messages delivered but not yet acknowledged.",
            ["consumer"],
            registry=r,
        )
        self.rpc_requests = Counter(
            "strata_rpc_requests_total", "RPC requests answered, by verb and outcome.", ["verb", "outcome"], registry=r
        )
        self.rpc_seconds = Histogram(
            "strata_rpc_duration_seconds",
            "Time to answer an RPC request.",
            ["verb"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.nats_connected = Gauge("strata_nats_connected", "1 while the NATS connection is up.", registry=r)


class Runtime:
    """What one service instance holds while it runs. Build it in ``create_app``; the lifespan starts and stops it."""

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        metrics: Metrics,
        migrations: Path | None = None,
        outbox_model: type[OutboxMixin] | None = None,
        processed_model: type[ProcessedEventMixin] | None = None,
        heartbeat_interval_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.service = settings.service_name
        self.metrics = metrics
        self.runtime_metrics = RuntimeMetrics(metrics)
        self.migrations = migrations
        self.outbox_model = outbox_model
        self.processed_model = processed_model
        self.heartbeat_interval_s = heartbeat_interval_s
        self.started_at: datetime = utcnow()
        self.source = source_of(self.service)
        self.db: Database | None = Database(settings.database_url, echo=settings.database_echo) if migrations else None
        self.bus = Bus(
            settings.nats_url,
            name=f"strata-{self.service}-{settings.instance_id}",
            connect_timeout_s=settings.nats_connect_timeout_s,
        )
        self.rpc = RpcServer(self.bus, service=self.service)
        self.rpc.on_request = self._on_rpc
        self.rpc_client = RpcClient(self.bus)
        self.verifier = TokenVerifier(
            jwks_source=self._jwks_from_auth,
            api_key_source=self._api_key_from_auth,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            api_key_cache_ttl_s=settings.api_key_cache_ttl_s,
        )
        self.relay: OutboxRelay | None = None
        if self.db is not None and outbox_model is not None:
            self.relay = OutboxRelay(
                db=self.db,
                bus=self.bus,
                model=outbox_model,
                poll_interval_s=settings.outbox_poll_interval_s,
                on_published=self.runtime_metrics.events_published.inc,
            )
        self.consumers: list[EventConsumer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._rpc_started = False

    async def _jwks_from_auth(self) -> dict[str, Any]:
        jwks = await self.rpc_client.call("auth", "jwks", JwksRequest(), Jwks)
        return jwks.model_dump()

    async def _api_key_from_auth(self, key: str) -> Identity:
        return await self.rpc_client.call("auth", "resolve_api_key", ApiKeyLookup(key=key), Identity)

    # -- wiring -------------------------------------------------------------------------------------------------
    def consume(self, spec: ConsumerSpec, handler: Handler) -> EventConsumer:
        consumer = EventConsumer(
            bus=self.bus, spec=spec, handler=handler, service=self.service, on_outcome=self._on_outcome
        )
        self.consumers.append(consumer)
        return consumer

    def consume_in_db(self, spec: ConsumerSpec, handler: Callable[..., Awaitable[None]]) -> EventConsumer:
        """A consumer whose handler gets a session and runs once per event id (see ``db_handler``)."""
        if self.db is None or self.processed_model is None:
            raise RuntimeError(f"{self.service} has no database for idempotent consumers")
        wrapped = db_handler(db=self.db, model=self.processed_model, consumer=spec.name, handler=handler)
        return self.consume(spec, wrapped)

    def stage(self, session: Any, event: CloudEvent) -> None:
        """Stage ``event`` in the outbox within ``session``."""
        if self.outbox_model is None:
            raise RuntimeError(f"{self.service} has no outbox")
        stage_event(session, self.outbox_model, event)

    def _on_outcome(self, consumer: str, outcome: str, seconds: float) -> None:
        self.runtime_metrics.consumed.labels(consumer, outcome).inc()
        self.runtime_metrics.handle_seconds.labels(consumer).observe(seconds)

    def _on_rpc(self, verb: str, outcome: str, seconds: float) -> None:
        self.runtime_metrics.rpc_requests.labels(verb, outcome).inc()
        self.runtime_metrics.rpc_seconds.labels(verb).observe(seconds)

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def instance_info(self, kind: type[InstanceInfo] = InstanceInfo, **extra: Any) -> InstanceInfo:
        return kind(
            service=self.service,
            instance_id=self.settings.instance_id,
            version=__version__,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=self.started_at,
            **extra,
        )

    async def start(self) -> None:
        with tracing.tracer("strata.runtime").start_as_current_span(f"start {self.service}"):
            if self.db is not None and self.migrations is not None and self.settings.auto_migrate:
                await migrate_async(database_url=self.settings.database_url, script_location=self.migrations)
            self.bus.on_connect(self._on_bus_connect)
            await self.bus.start()
            if self.db is not None and self.outbox_model is not None:
                started = CloudEvent.of(
                    self.instance_info(InstanceStarted),
                    source=self.source,
                    subject=self.settings.instance_id,
                    type=instance_subject(InstanceStarted, self.service),
                )
                async with self.db.session() as session:
                    self.stage(session, started)
                log.info("staged %s event %s", started.type, started.id)
        if self.relay is not None:
            self.relay.start()
        for consumer in self.consumers:
            consumer.start()
        self._tasks.append(asyncio.create_task(self._heartbeat(), name="instance-heartbeat"))
        log.info("%s started", self.service, extra={"settings": self.settings.describe()})

    async def _on_bus_connect(self) -> None:
        if not self._rpc_started:
            await self.rpc.start()
            self._rpc_started = True
        if self.relay is not None:
            self.relay.notify()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for consumer in self.consumers:
            await consumer.stop()
        await self.rpc.stop()
        if self.relay is not None and self.db is not None and self.outbox_model is not None:
            await self.relay.stop()
            try:
                async with self.db.session() as session:
                    self.stage(
                        session,
                        CloudEvent.of(
                            self.instance_info(InstanceStopped, stopped_at=utcnow()),
                            source=self.source,
                            subject=self.settings.instance_id,
                            type=instance_subject(InstanceStopped, self.service),
                        ),
                    )
                if self.bus.is_connected:
                    await asyncio.wait_for(self.relay.publish_pending(), 3)
            except Exception:  # shutting down: what is not sent now is sent by the next start
                log.warning("could not flush the outbox on shutdown", exc_info=True)
        await self.bus.close()
        if self.db is not None:
            await self.db.dispose()

    async def _heartbeat(self) -> None:
        subject = instance_subject(InstanceHeartbeat, self.service)
        while True:
            self.runtime_metrics.nats_connected.set(1 if self.bus.is_connected else 0)
            if self.bus.is_connected:
                try:
                    event = CloudEvent.of(
                        self.instance_info(InstanceHeartbeat),
                        source=self.source,
                        subject=self.settings.instance_id,
                        type=subject,
                    )
                    await self.bus.publish_event(event, timeout_s=2)
                    await self._refresh_gauges()
                except Exception as exc:  # the bus is down or busy: the next beat will tell
                    log.debug("heartbeat failed: %s", exc)
            await asyncio.sleep(self.heartbeat_interval_s)

    async def _refresh_gauges(self) -> None:
        if self.relay is not None:
            self.runtime_metrics.outbox_pending.set(await self.relay.pending_count())
        for consumer in self.consumers:
            try:
                info = await self.bus.js.consumer_info(consumer.spec.stream, consumer.spec.name)
            except Exception as exc:  # not declared yet, or the bus is busy: the next beat retries
                log.debug("consumer_info %s: %s", consumer.spec.name, exc)
                continue
            self.runtime_metrics.consumer_pending.labels(consumer.spec.name).set(info.num_pending or 0)
            self.runtime_metrics.consumer_ack_pending.labels(consumer.spec.name).set(info.num_ack_pending or 0)

    async def readiness(self) -> dict[str, Any]:
        """What ``/readyz`` reports: each dependency ``ok`` or the reason it is not."""
        checks: dict[str, Any] = {
            "nats": "ok" if self.bus.is_connected else f"not connected ({self.bus.state.last_error or 'connecting'})"
        }
        if self.db is not None:
            try:
                await asyncio.wait_for(self.db.ping(), 2)
                checks["database"] = "ok"
            except Exception as exc:  # report, do not raise: this is a health check
                checks["database"] = f"unreachable ({type(exc).__name__})"
        return checks

    def describe(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "version": __version__,
            "instance_id": self.settings.instance_id,
            "started_at": self.started_at.isoformat(),
            "uptime_s": round((utcnow() - self.started_at).total_seconds(), 1),
            "nats": {"url": redact_url(self.settings.nats_url), "connected": self.bus.is_connected},
            "database": redact_url(self.settings.database_url) if self.db is not None else None,
            "consumers": [
                {
                    "name": c.spec.name,
                    "stream": c.spec.stream,
                    "subjects": list(c.spec.subjects),
                    "handled": c.stats.handled,
                    "retried": c.stats.retried,
                    "dead_lettered": c.stats.dead_lettered,
                }
                for c in self.consumers
            ],
            "rpc_verbs": sorted(self.rpc._routes),
        }


class ServiceState(TypedDict):
    runtime: Runtime
    settings: ServiceSettings


def create_service_app(
    settings: ServiceSettings,
    *,
    runtime: Runtime,
    title: str,
    description: str = "",
    routers: Sequence[APIRouter] = (),
    readiness: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    on_started: Callable[[Runtime], Awaitable[dict[str, Any] | None]] | None = None,
    on_stopping: Callable[[Runtime], Awaitable[None]] | None = None,
    openapi_url: str | None = "/openapi.json",
) -> FastAPI:
    """A FastAPI app with the common shape. Nothing connects until the lifespan runs."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[ServiceState]:
        setup_logging(
            service=settings.service_name,
            instance=settings.instance_id,
            level=settings.log_level,
            fmt=settings.log_format,
        )
        tracing.setup_tracing(
            service_name=settings.service_name,
            mode=settings.tracing,
            otlp_endpoint=settings.otlp_endpoint,
            instance_id=settings.instance_id,
        )
        await runtime.start()
        extra = (await on_started(runtime) if on_started is not None else None) or {}
        # Everything made so far (modules, the app, its routes and models) lives as long as the process: move it out
        # of the collector's reach, so a full collection walks only what requests create (pauses of 100+ ms otherwise).
        # And collect the young generation only after a real net growth of live objects: at the default (700) a burst
        # of short-lived objects (one WebSocket frame per socket) triggers collections that promote them, and the old
        # generation then fills with them until a full collection walks every connection's objects.
        gc.freeze()
        gc.set_threshold(settings.gc_young_threshold, *gc.get_threshold()[1:])
        try:
            # What on_started returns joins the state: routes find it on request.state.
            yield {"runtime": runtime, "settings": settings, **extra}  # type: ignore[typeddict-item]
        finally:
            if on_stopping is not None:
                await on_stopping(runtime)
            await runtime.stop()
            log.info("%s stopped", settings.service_name)

    # FastAPI's native telemetry makes the HTTP server spans (traceparent in, route templates, mounts); our
    # middleware keeps request ids, Prometheus metrics and logs, so FastAPI's own metrics and logs stay off.
    app = FastAPI(
        title=title,
        description=description,
        version=__version__,
        lifespan=lifespan,
        # A WebSocket lives for hours: a span that long tells nothing and holds its objects all along.
        telemetry={"tracing": True, "metrics": False, "logs": False, "exclude": _is_websocket},
        openapi_url=openapi_url,
    )
    install_error_handlers(app)
    app.state.runtime = runtime  # for tests and tools; routes get it from the lifespan state
    app.add_middleware(
        RequestContextMiddleware,
        metrics=runtime.metrics,
        request_id_header=settings.request_id_header,
        access_log=settings.access_log,
    )
    check = readiness or runtime.readiness

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": settings.service_name}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        checks = await check()
        ready = all(_is_ok(v) for v in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503
        )

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        body, content_type = runtime.metrics.render()
        return Response(body, media_type=content_type)

    @app.get(
        f"/api/v1/system/{settings.service_name}/info",
        tags=["system"],
        summary=f"This {settings.service_name} instance: version, uptime, NATS, consumers",
    )
    async def service_info(_: AdminUser) -> dict[str, Any]:
        return runtime.describe()

    for router in routers:
        app.include_router(router)
    return app


def _is_websocket(scope: Any) -> bool:
    return bool(scope["type"] == "websocket")


def _is_ok(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(value.get("status") in ("ok", "ready"))
    return bool(value == "ok")
