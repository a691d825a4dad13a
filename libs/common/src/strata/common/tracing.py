"""OpenTelemetry set-up and W3C trace-context propagation over HTTP and NATS headers.

Modes (``STRATA_TRACING``): ``off`` (no SDK; incoming trace context still propagates), ``local`` (the SDK makes
trace and
span ids, so logs and events correlate, but nothing is exported), ``console`` and ``otlp`` (exported).
nats-py has no instrumentation of its own, so :func:`inject` and :func:`extract` carry ``traceparent`` by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

log = logging.getLogger(__name__)
_configured_mode: str | None = None


def setup_tracing(*, service_name: str, mode: str, otlp_endpoint: str = "", instance_id: str = "") -> None:
    """Install the process-wide tracer provider once; later calls with another mode are ignored with a warning."""
    global _configured_mode
    if _configured_mode is not None:
        if _configured_mode != mode:
            log.warning("tracing already configured as %s; ignoring %s", _configured_mode, mode)
        return
    _configured_mode = mode
    if mode == "off":
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create({"service.name": f"strata-{service_name}", "service.instance.id": instance_id})
    provider = TracerProvider(resource=resource)
    if mode == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif mode == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    trace.set_tracer_provider(provider)


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if callable(shutdown):
        shutdown()


def tracer(name: str = "strata") -> trace.Tracer:
    return trace.get_tracer(name)


def inject(headers: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Write the current trace context (``traceparent``, ``tracestate``) into ``headers`` and return them."""
    carrier: MutableMapping[str, str] = headers if headers is not None else {}
    propagate.inject(carrier)
    return carrier


def extract(headers: Mapping[str, Any] | None) -> otel_context.Context:
    """The trace context carried by ``headers`` (HTTP or NATS), or an empty one."""
    if not headers:
        return otel_context.Context()
    return propagate.extract({k.lower(): v for k, v in headers.items() if isinstance(v, str)})


def current_ids() -> tuple[str | None, str | None]:
    """``(trace_id, span_id)`` of the current span as hex, or ``(None, None)``."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
