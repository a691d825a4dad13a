"""The gateway's edge: who is calling, how often, and what every response carries.

- :class:`EdgeMiddleware` verifies the access token (or API key) on every ``/api/v1`` route but the public ones,
  applies the rate limits (per user; per IP for anonymous calls, tighter on sign-in), strips identity headers a
  client may have sent, and forwards the verified identity in ``X-Strata-*`` headers. Services verify the token
  again themselves: the headers are for logs and convenience, never trusted alone.
- :class:`SecurityHeadersMiddleware` adds the browser security headers to every response.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from strata.common.auth import TokenVerifier
from strata.common.contracts.auth import Identity
from strata.common.deps import TOKEN_URL
from strata.common.errors import StrataError, envelope

from .ratelimit import Limit, RateLimiter

IDENTITY_HEADERS = (b"x-strata-user-id", b"x-strata-user-role", b"x-strata-auth-kind", b"x-strata-session-id")
TOKEN_PATH = TOKEN_URL
PUBLIC_PATHS = frozenset(
    {TOKEN_PATH, "/api/v1/auth/refresh", "/api/v1/auth/logout", "/api/v1/auth/.well-known/jwks.json"}
)


@dataclass(frozen=True)
class EdgeLimits:
    user: Limit
    anonymous: Limit
    token: Limit


async def _send_json(send: Send, status: int, body: dict[str, object], headers: list[tuple[bytes, bytes]]) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": data})


class EdgeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        verifier: Callable[[], TokenVerifier],
        limiter: Callable[[], RateLimiter],
        limits: EdgeLimits,
    ) -> None:
        self.app = app
        self.verifier = verifier
        self.limiter = limiter
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Nobody outside may claim an identity: these headers only ever come from us.
        headers = [(k, v) for k, v in scope["headers"] if k not in IDENTITY_HEADERS]
        scope["headers"] = headers
        path: str = scope["path"]
        if not path.startswith("/api/v1/") or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        identity: Identity | None = None
        try:
            if path not in PUBLIC_PATHS:
                authorization = next((v.decode("latin-1") for k, v in headers if k == b"authorization"), None)
                identity = await self.verifier().verify_header(authorization)
        except StrataError as exc:
            # Failed sign-ins and bad tokens count against the caller's address, so guessing is throttled too.
            if await self._limited(scope, send, None):
                return
            await _send_json(
                send,
                exc.status,
                envelope(exc.code, exc.message, exc.details),
                [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()],
            )
            return
        if await self._limited(scope, send, identity):
            return
        if identity is not None:
            scope["headers"] = [
                *headers,
                (b"x-strata-user-id", identity.user_id.encode()),
                (b"x-strata-user-role", identity.role.value.encode()),
                (b"x-strata-auth-kind", identity.kind.encode()),
            ]
            if identity.session_id:
                scope["headers"].append((b"x-strata-session-id", identity.session_id.encode()))
            scope.setdefault("state", {})["identity"] = identity
        await self.app(scope, receive, send)

    async def _limited(self, scope: Scope, send: Send, identity: Identity | None) -> bool:
        """Spend a token of the caller's bucket; answer 429 and return True when there is none."""
        if identity is not None:
            key, limit = f"user:{identity.user_id}", self.limits.user
        else:
            client = scope.get("client")
            address = client[0] if client else "unknown"
            if scope["path"] == TOKEN_PATH:
                key, limit = f"token:{address}", self.limits.token
            else:
                key, limit = f"ip:{address}", self.limits.anonymous
        decision = await self.limiter().hit(key, limit)
        if decision.allowed:
            return False
        retry = max(1, math.ceil(decision.retry_after_s))
        await _send_json(
            send,
            429,
            envelope(
                "RATE_LIMITED",
                f"Too many requests. Try again in {retry} s.",
                [{"limit": f"{limit.rate_per_s:g}/s", "burst": limit.burst}],
            ),
            [
                (b"retry-after", str(retry).encode()),
                (b"x-ratelimit-limit", str(limit.burst).encode()),
                (b"x-ratelimit-remaining", b"0"),
            ],
        )
        return True


DOCS_PATHS = ("/docs",)
API_CSP = b"default-src 'none'; frame-ancestors 'none'"
DOCS_CSP = (
    b"default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    b"img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"
)


class SecurityHeadersMiddleware:
    """``nosniff``, no framing, no referrer, a strict CSP (looser for the docs page), HSTS over HTTPS."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        csp = DOCS_CSP if path.startswith(DOCS_PATHS) else API_CSP
        https = scope.get("scheme") == "https" or any(
            k == b"x-forwarded-proto" and v == b"https" for k, v in scope["headers"]
        )

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {k.lower() for k, _ in headers}
                extra = [
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cross-origin-opener-policy", b"same-origin"),
                    (b"content-security-policy", csp),
                ]
                if https:
                    extra.append((b"strict-transport-security", b"max-age=31536000; includeSubDomains"))
                headers.extend((k, v) for k, v in extra if k not in present)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
