"""Logs, metrics and the request middleware, in one module.

- JSON logs (or readable text for ``make run``) that carry ``service``, ``request_id`` and ``trace_id``.
- Prometheus metrics per app (its own registry, so several apps can live in one test process), labelled by the route
  template, never the raw path; health and metrics paths are left out.
- :class:`RequestContextMiddleware`, a pure ASGI middleware (no ``BaseHTTPMiddleware``: it would buffer streams)
  that sets
  the request id, measures the request and turns an unexpected exception into one logged 500. The HTTP server span
  (with ``traceparent`` extracted) is FastAPI's own native telemetry, which runs outside this middleware.
"""

from __future__ import annotations

import gc
import logging
import re
import sys
import time
import uuid
import weakref

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)
from pythonjsonlogger.json import JsonFormatter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import tracing
from .context import request_id_var
from .errors import envelope

log = logging.getLogger("strata.http")

UNTRACKED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series double every counter's cardinality for nothing we use
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ContextFilter(logging.Filter):
    """Adds ``service``, ``instance``, ``request_id``, ``trace_id`` and ``span_id`` to every record."""

    def __init__(self, service: str, instance: str) -> None:
        super().__init__()
        self.service = service
        self.instance = instance

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        record.instance = self.instance
        record.request_id = request_id_var.get()
        record.trace_id, record.span_id = tracing.current_ids()
        return True


class TextFormatter(logging.Formatter):
    """One readable line; context fields follow the message only when set."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.name}: {record.getMessage()}"
        extras = [f"{key}={value}" for key in ("request_id", "trace_id") if (value := getattr(record, key, None))]
        if extras:
            line += "  " + " ".join(extras)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(*, service: str, instance: str, level: str = "INFO", fmt: str = "json") -> None:
    """Configure the root logger once per process: one handler on stderr, our context on every record."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_strata", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._strata = True  # type: ignore[attr-defined]
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}{service}{instance}{request_id}{trace_id}{span_id}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                datefmt="%Y-%m-%dT%H:%M:%S%z",
            )
        )
    else:
        handler.setFormatter(TextFormatter())
    handler.addFilter(ContextFilter(service, instance))
    root.addHandler(handler)
    root.setLevel(level)
    # uvicorn's own loggers go through ours; its access log is replaced by our middleware's.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs every request at INFO: the gateway's proxied requests are already in our access log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


GC_PAUSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_gc_pauses: weakref.WeakSet[Histogram] = weakref.WeakSet()
_gc_started = [0.0]


def _on_gc(phase: str, info: dict[str, int]) -> None:
    """Time each collection: a full one stops the event loop for as long as it walks every live object."""
    if phase == "start":
        _gc_started[0] = time.perf_counter()
        return
    seconds = time.perf_counter() - _gc_started[0]
    for histogram in list(_gc_pauses):
        histogram.labels(str(info["generation"])).observe(seconds)


gc.callbacks.append(_on_gc)


class Metrics:
    """The Prometheus registry of one app and the HTTP RED metrics in it. Services add their own to ``registry``."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        process_collector.ProcessCollector(registry=self.registry)
        platform_collector.PlatformCollector(registry=self.registry)
        gc_collector.GCCollector(registry=self.registry)
        self.gc_pause = Histogram(
            "strata_gc_pause_seconds",
            "Time the cyclic garbage collector stopped the process, by generation (2: a full collection).",
            ["generation"],
            buckets=GC_PAUSE_BUCKETS,
            registry=self.registry,
        )
        _gc_pauses.add(self.gc_pause)
        self.requests = Counter(
            "strata_http_requests_total",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "strata_http_request_duration_seconds",
            "Time to answer an HTTP request (to the last byte), by method and route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "strata_http_requests_in_flight",
            "HTTP requests being answered now.",
            registry=self.registry,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def route_template(scope: Scope) -> str:
    """The template of the route that answered (``/api/v1/datasets/{id}``), or ``unmatched``: never the raw path.

    A mounted app (the gateway's proxy) is labelled by its mount point (``/api/v1/{path}``): FastAPI's router does not
    put a mount in ``scope["route"]``, but it does move the mount's prefix into ``root_path``.
    """
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    root = scope.get("root_path") or ""
    if root:
        return root + "/{path}"
    return "unmatched"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def clean_request_id(value: str | None) -> str:
    """The incoming request id if it is sane (short, no spaces or control characters), else a new one."""
    if value and _REQUEST_ID_RE.match(value):
        return value
    return uuid.uuid4().hex


class RequestContextMiddleware:
    """Request id, server span, RED metrics, access log and the last-resort 500, in one pass."""

    def __init__(
        self, app: ASGIApp, *, metrics: Metrics, request_id_header: str = "X-Request-ID", access_log: bool = True
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.header = request_id_header
        self.header_bytes = request_id_header.lower().encode("latin-1")
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = clean_request_id(_header(scope, self.header_bytes))
        scope.setdefault("state", {})["request_id"] = request_id
        rid_token = request_id_var.set(request_id)
        path: str = scope["path"]
        tracked = path not in UNTRACKED_PATHS
        method: str = scope["method"]
        status = 500
        started = False
        start = time.perf_counter()
        header_value = request_id.encode("latin-1")

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                # Set, not append: a proxied response already carries the upstream's copy of the same id.
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != self.header_bytes]
                headers.append((self.header_bytes, header_value))
                message["headers"] = headers
            await send(message)

        if tracked:
            self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            log.exception("unhandled error in %s %s", method, path)
            if not started:
                await _send_500(send, self.header_bytes, header_value)
            status = 500
        finally:
            route = route_template(scope)
            elapsed = time.perf_counter() - start
            if tracked:
                self.metrics.in_flight.dec()
                self.metrics.requests.labels(method, route, str(status)).inc()
                self.metrics.latency.labels(method, route).observe(elapsed)
                if self.access_log:
                    log.info(
                        "%s %s %d %.1fms",
                        method,
                        path,
                        status,
                        elapsed * 1000,
                        extra={
                            "http_method": method,
                            "http_route": route,
                            "http_status": status,
                            "duration_ms": round(elapsed * 1000, 2),
                        },
                    )
            request_id_var.reset(rid_token)


async def _send_500(send: Send, header: bytes, request_id: bytes) -> None:
    import json

    body = json.dumps(envelope("INTERNAL_ERROR", "Internal error. Quote the request id when reporting it.")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 500,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (header, request_id),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


__all__ = [
    "UNTRACKED_PATHS",
    "Metrics",
    "RequestContextMiddleware",
    "clean_request_id",
    "route_template",
    "setup_logging",
]
