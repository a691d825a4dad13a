"""The streaming reverse proxy for ``/api/v1/<prefix>/...``: a plain ASGI app, so nothing is buffered whole.

Request bodies are streamed upstream as they arrive and responses streamed back chunk by chunk, bytes untouched (no
decompression). Hop-by-hop headers are dropped; ``X-Request-ID``, ``traceparent`` and ``X-Forwarded-*`` are set. An
upstream that cannot be reached is a 502, one that does not answer in time a 504, both in the error envelope.

The upstream client is aiohttp, not httpx: under load httpx's connection pool cost the gateway 1-3 ms of CPU per
request (see bench/README.md); aiohttp's costs about a tenth of that. It keeps no cookies: one shared jar would hand
one user's upstream cookies to the next.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict
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
SERVICES = frozenset(ROUTES.values())


class ClientDisconnected(Exception):
    pass


class BodyTooLarge(Exception):
    pass


@dataclass(frozen=True)
class Policy:
    """What a request may do upstream: its body size and how long to wait for the answer."""

    max_body_bytes: int
    max_upload_bytes: int
    upload_routes: tuple[re.Pattern[str], ...]
    default_timeout_s: float
    route_timeouts_s: tuple[tuple[str, float], ...]  # longest prefix first

    @classmethod
    def build(
        cls,
        *,
        max_body_bytes: int,
        max_upload_bytes: int,
        upload_routes: list[str],
        default_timeout_s: float,
        route_timeouts_s: dict[str, float],
    ) -> Policy:
        return cls(
            max_body_bytes,
            max_upload_bytes,
            tuple(re.compile(p) for p in upload_routes),
            default_timeout_s,
            tuple(sorted(route_timeouts_s.items(), key=lambda kv: -len(kv[0]))),
        )

    def body_limit(self, method: str, path: str) -> int:
        if method in ("POST", "PUT") and any(p.match(path) for p in self.upload_routes):
            return self.max_upload_bytes
        return self.max_body_bytes

    def timeout(self, path: str) -> float:
        return next((t for prefix, t in self.route_timeouts_s if path.startswith(prefix)), self.default_timeout_s)


def service_for(path: str) -> str | None:
    """The service owning ``/api/v1/<prefix>/...``; ``/api/v1/system/<service>/...`` goes to that service."""
    parts = path.split("/", 5)  # ['', 'api', 'v1', prefix, rest...]
    if len(parts) < 4:
        return None
    prefix = parts[3]
    if prefix == "system" and len(parts) > 4:
        return parts[4] if parts[4] in SERVICES else None
    return ROUTES.get(prefix)


def upstream_session(*, connect_timeout_s: float, read_timeout_s: float, max_connections: int) -> aiohttp.ClientSession:
    """The gateway's one client for every upstream: pooled keep-alive connections, no cookies, bytes as they are."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, ttl_dns_cache=60),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        trust_env=False,
    )


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
    def __init__(self, *, upstreams: dict[str, str], session: aiohttp.ClientSession | None, policy: Policy) -> None:
        self.upstreams = upstreams
        self._session = session
        self.policy = policy

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the proxy is used before the gateway's lifespan started")
        return self._session

    @session.setter
    def session(self, value: aiohttp.ClientSession) -> None:
        self._session = value

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # the one WebSocket route is the gateway's own (/api/v1/ws)
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        service = service_for(path)
        if service is None or service not in self.upstreams:
            await _send_error(send, 404, "NOT_FOUND", f"No API at {path}.")
            return
        method: str = scope["method"]
        headers = self._forward_headers(scope)
        has_body = method not in BODYLESS or "content-length" in headers or "transfer-encoding" in headers
        limit = self.policy.body_limit(method, path)
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_error(send, 400, "BAD_REQUEST", "Content-Length is not a number.")
                return
            if int(declared) > limit:
                await _send_error(send, 413, "PAYLOAD_TOO_LARGE", f"The body may be at most {limit} bytes.")
                return
        url = self.upstreams[service] + scope.get("raw_path", path.encode()).decode("latin-1")
        query = scope.get("query_string", b"")
        if query:
            url += "?" + query.decode("latin-1")

        async def body() -> AsyncIterator[bytes]:
            seen = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnected
                chunk = message.get("body", b"")
                if chunk:
                    seen += len(chunk)
                    if seen > limit:  # a chunked body can only be counted: stop it here, upstream sees it cut
                        raise BodyTooLarge
                    yield chunk
                if not message.get("more_body", False):
                    return

        try:
            response = await self.session.request(
                method,
                url,
                headers=headers,
                data=body() if has_body else None,
                allow_redirects=False,
                skip_auto_headers=("Content-Type",),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self.session.timeout.sock_connect, sock_read=self.policy.timeout(path)
                ),
            )
        except ClientDisconnected:
            return
        except BodyTooLarge:
            await _send_error(send, 413, "PAYLOAD_TOO_LARGE", f"The body may be at most {limit} bytes.")
            return
        except (TimeoutError, aiohttp.ServerTimeoutError):
            log.warning("%s did not answer %s %s in time", service, method, path)
            await _send_error(send, 504, "UPSTREAM_TIMEOUT", f"The {service} service did not answer in time.")
            return
        except aiohttp.ClientError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ClientDisconnected):
                return
            if isinstance(cause, BodyTooLarge):
                await _send_error(send, 413, "PAYLOAD_TOO_LARGE", f"The body may be at most {limit} bytes.")
                return
            log.warning("%s unreachable for %s %s: %s", service, method, path, type(exc).__name__)
            await _send_error(send, 502, "BAD_GATEWAY", f"The {service} service is not reachable.")
            return
        try:
            out_headers = [(k, v) for k, v in response.raw_headers if k.lower() not in RESPONSE_DROP]
            await send({"type": "http.response.start", "status": response.status, "headers": out_headers})
            try:
                async for chunk in response.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (TimeoutError, aiohttp.ClientError) as exc:  # the upstream broke off mid-response
                log.warning("%s broke off %s %s: %s", service, method, path, type(exc).__name__)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            response.release()

    def _forward_headers(self, scope: Scope) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict(
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in HOP_BY_HOP
        )
        rid = request_id_var.get()
        if rid:
            headers["X-Request-ID"] = rid
        trace_headers = tracing.inject({})
        if trace_headers:
            headers.update(trace_headers)
        else:  # tracing is off here: pass the caller's trace context through untouched
            for k, v in scope["headers"]:
                if k in (b"traceparent", b"tracestate"):
                    headers[k.decode("latin-1")] = v.decode("latin-1")
        client = scope.get("client")
        if client:
            headers["X-Forwarded-For"] = str(client[0])
        headers["X-Forwarded-Proto"] = str(scope.get("scheme", "http"))
        for k, v in scope["headers"]:
            if k == b"host":
                headers["X-Forwarded-Host"] = v.decode("latin-1")
                break
        return headers
