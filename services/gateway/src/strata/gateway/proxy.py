"""The streaming reverse proxy for ``/api/v1/<prefix>/...``: a plain ASGI app, so nothing is buffered whole.

Request bodies are streamed upstream as they arrive and responses streamed back chunk by chunk. Hop-by-hop headers are
dropped; ``X-Request-ID``, ``traceparent`` and ``X-Forwarded-*`` are set. An upstream that cannot be reached is a 502,
one that does not answer in time a 504, both in the error envelope.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import httpx
from starlette.types import Receive, Scope, Send

from strata.common import tracing
from strata.common.context import request_id_var
from strata.common.errors import envelope

from .config import ROUTES

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"x-request-id",
        b"traceparent",
        b"tracestate",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    }
)
RESPONSE_DROP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"trailer", b"upgrade", b"server"})
BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


class ClientDisconnected(Exception):
    pass


def service_for(path: str) -> str | None:
    """The service owning ``/api/v1/<prefix>/...``; ``/api/v1/system/<service>/...`` goes to that service."""
    parts = path.split("/", 5)  # ['', 'api', 'v1', prefix, rest...]
    if len(parts) < 4:
        return None
    prefix = parts[3]
    if prefix == "system" and len(parts) > 4:
        name = parts[4]
        return name if name in set(ROUTES.values()) else None
    return ROUTES.get(prefix)


async def _send_error(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps(envelope(code, message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Proxy:
    def __init__(self, *, upstreams: dict[str, str], client: httpx.AsyncClient) -> None:
        self.upstreams = upstreams
        self.client = client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        service = service_for(path)
        if service is None or service not in self.upstreams:
            await _send_error(send, 404, "NOT_FOUND", f"No API at {path}.")
            return
        method: str = scope["method"]
        headers = self._forward_headers(scope)
        has_body = method not in BODYLESS or any(
            k in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"]
        )
        url = self.upstreams[service] + path
        query = scope.get("query_string", b"")
        if query:
            url += "?" + query.decode("latin-1")

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnected
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return

        request = self.client.build_request(method, url, headers=headers, content=body() if has_body else None)
        try:
            response = await self.client.send(request, stream=True)
        except ClientDisconnected:
            return
        except httpx.TimeoutException:
            log.warning("%s did not answer %s %s in time", service, method, path)
            await _send_error(send, 504, "UPSTREAM_TIMEOUT", f"The {service} service did not answer in time.")
            return
        except httpx.TransportError as exc:
            log.warning("%s unreachable for %s %s: %s", service, method, path, type(exc).__name__)
            await _send_error(send, 502, "BAD_GATEWAY", f"The {service} service is not reachable.")
            return
        try:
            out_headers = [(k, v) for k, v in response.headers.raw if k.lower() not in RESPONSE_DROP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out_headers})
            try:
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.TransportError as exc:  # the upstream broke mid-response: nothing more we can say
                log.warning("%s broke off %s %s: %s", service, method, path, type(exc).__name__)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    def _forward_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        headers = [(k, v) for k, v in scope["headers"] if k not in HOP_BY_HOP]
        rid = request_id_var.get()
        if rid:
            headers.append((b"x-request-id", rid.encode("latin-1")))
        trace_headers = tracing.inject({})
        if trace_headers:
            headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in trace_headers.items())
        else:  # tracing is off here: pass the caller's trace context through untouched
            headers.extend((k, v) for k, v in scope["headers"] if k in (b"traceparent", b"tracestate"))
        client = scope.get("client")
        if client:
            headers.append((b"x-forwarded-for", str(client[0]).encode("latin-1")))
        headers.append((b"x-forwarded-proto", str(scope.get("scheme", "http")).encode("latin-1")))
        for k, v in scope["headers"]:
            if k == b"host":
                headers.append((b"x-forwarded-host", v))
                break
        return headers
