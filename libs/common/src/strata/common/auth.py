"""Verifying who is calling, the same way in the gateway and in every service.

Access tokens are JWTs signed by the auth service (EdDSA, with a ``kid``); services verify them locally against the
auth service's JWKS, fetched over NATS (``rpc.auth.jwks``) and refreshed when an unknown ``kid`` appears, at most
once per ``min_refresh_interval_s``. Only EdDSA is accepted: ``alg: none`` and HS256-signed-with-the-public-key are
refused before any key is used. API keys (``strata_<id>_<secret>``) are resolved by the auth service
(``rpc.auth.resolve_api_key``) and cached briefly, so a revoked key stops working within that time.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import jwt
from jwt import PyJWK

from .contracts.auth import Identity, Role
from .errors import StrataError, Unauthorized

log = logging.getLogger(__name__)

API_KEY_PREFIX = "strata_"
ALGORITHM = "EdDSA"
REQUIRED_CLAIMS = ["exp", "iat", "sub", "jti", "iss", "aud"]

JwksSource = Callable[[], Awaitable[dict[str, Any]]]
ApiKeySource = Callable[[str], Awaitable[Identity]]


#: After a failed or empty JWKS fetch, the next may come this soon (the auth service may be starting).
FAILED_FETCH_RETRY_S = 0.25
#: How long a request waits for the first keys before it is refused (a service that starts with the auth service).
STARTUP_KEY_WAIT_S = 3.0


class InvalidToken(Unauthorized):
    code = "INVALID_TOKEN"
    default_message = "The access token is not valid."


class TokenExpired(Unauthorized):
    code = "TOKEN_EXPIRED"
    default_message = "The access token has expired."


class MissingToken(Unauthorized):
    code = "UNAUTHORIZED"
    default_message = "Authentication is required: send 'Authorization: Bearer <token>'."


class InsufficientRole(StrataError):
    status, code, default_message = 403, "FORBIDDEN", "Your role does not allow this."


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header; a clear 401 for anything else."""
    if not authorization:
        raise MissingToken()
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise InvalidToken("The Authorization header must be 'Bearer <token>'.")
    return token


class TokenVerifier:
    def __init__(
        self,
        *,
        jwks_source: JwksSource,
        api_key_source: ApiKeySource | None,
        issuer: str,
        audience: str,
        leeway_s: float = 10.0,
        min_refresh_interval_s: float = 10.0,
        jwks_max_age_s: float = 300.0,
        api_key_cache_ttl_s: float = 30.0,
        api_key_cache_size: int = 10_000,
        token_cache_size: int = 50_000,
    ) -> None:
        self.jwks_source = jwks_source
        self.api_key_source = api_key_source
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s
        self.min_refresh_interval_s = min_refresh_interval_s
        self.jwks_max_age_s = jwks_max_age_s
        self._stale = True
        self.api_key_cache_ttl_s = api_key_cache_ttl_s
        self.api_key_cache_size = api_key_cache_size
        self._keys: dict[str, Any] = {}
        self._jwks: dict[str, Any] = {"keys": []}
        self._last_refresh = float("-inf")
        self._next_attempt = float("-inf")
        self._refresh_lock = asyncio.Lock()
        self._api_keys: OrderedDict[str, tuple[float, Identity | StrataError]] = OrderedDict()
        # Verified access tokens until they expire: a client sends the same token on every request, and checking
        # an Ed25519 signature costs ~100 µs, more than the rest of the gateway's work on a request. Only tokens
        # that passed the full check are kept; any change of keys empties it.
        self.token_cache_size = token_cache_size
        self._tokens: OrderedDict[str, tuple[float, Identity]] = OrderedDict()

    # -- JWKS -----------------------------------------------------------------------------------------------------
    @property
    def jwks(self) -> dict[str, Any]:
        return self._jwks

    async def refresh_keys(self, *, force: bool = False) -> bool:
        """Fetch the JWKS, at most once per ``min_refresh_interval_s`` after a good answer and every
        ``FAILED_FETCH_RETRY_S`` after a failed or empty one (the auth service may still be starting). True if keys
        were loaded."""
        async with self._refresh_lock:
            now = time.monotonic()
            if not force and now < self._next_attempt:
                return False
            self._next_attempt = now + FAILED_FETCH_RETRY_S
            try:
                jwks = await self.jwks_source()
            except StrataError as exc:
                log.warning("could not fetch the JWKS: %s", exc.message)
                return False
            keys = {}
            for entry in jwks.get("keys", []):
                try:
                    keys[entry["kid"]] = PyJWK(entry).key
                except (KeyError, jwt.PyJWKError) as exc:
                    log.warning("skipping a JWKS entry: %s", exc)
            if not keys:
                log.warning("the JWKS has no usable keys yet")
                return False
            self._keys, self._jwks, self._stale = keys, jwks, False
            self._tokens.clear()
            self._last_refresh = now
            self._next_attempt = now + self.min_refresh_interval_s
            log.info("JWKS loaded: %s", ", ".join(sorted(keys)))
            return True

    def forget_keys(self) -> None:
        """Make the next verification fetch the JWKS again (after a rotation), so retired keys stop verifying."""
        self._next_attempt = float("-inf")
        self._stale = True
        self._tokens.clear()

    # -- verification ---------------------------------------------------------------------------------------------
    async def verify_header(self, authorization: str | None) -> Identity:
        return await self.verify(bearer_token(authorization))

    async def verify(self, token: str) -> Identity:
        if token.startswith(API_KEY_PREFIX):
            return await self.resolve_api_key(token)
        return await self.verify_jwt(token)

    async def verify_jwt(self, token: str) -> Identity:
        cached = self._tokens.get(token)
        if cached is not None:
            if (
                time.time() < cached[0]
                and not self._stale
                and (time.monotonic() - self._last_refresh <= self.jwks_max_age_s)
            ):
                return cached[1]
            self._tokens.pop(token, None)
        header = _unverified_header(token)
        if header.get("alg") != ALGORITHM:
            raise InvalidToken("The access token is not signed with an accepted algorithm.")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise InvalidToken("The access token names no signing key.")
        if self._stale or time.monotonic() - self._last_refresh > self.jwks_max_age_s:
            # Retired keys leave the JWKS: a cache older than its max age is refreshed before it is trusted.
            await self.refresh_keys()  # bounded by min_refresh_interval_s, even while the auth service is down
        key = self._keys.get(kid)
        if key is None and await self.refresh_keys():
            key = self._keys.get(kid)
        if key is None and not self._keys:
            # No keys yet: the auth service may still be starting (its first answer was "no responders" a moment
            # ago). Wait for it briefly rather than refuse the first requests that race it.
            deadline = time.monotonic() + STARTUP_KEY_WAIT_S
            while key is None and time.monotonic() < deadline:
                await asyncio.sleep(max(self._next_attempt - time.monotonic(), 0.05))
                if await self.refresh_keys():
                    key = self._keys.get(kid)
        if key is None:
            raise InvalidToken("The access token was signed by an unknown key.")
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpired() from None
        except jwt.InvalidTokenError:
            raise InvalidToken() from None
        try:
            identity = Identity(
                user_id=str(claims["sub"]),
                role=Role(claims["role"]),
                kind="user",
                session_id=claims.get("sid"),
                token_id=str(claims["jti"]),
                expires_at=datetime.fromtimestamp(int(claims["exp"]), UTC),
            )
        except (KeyError, ValueError):
            raise InvalidToken("The access token lacks a valid role.") from None
        self._tokens[token] = (float(claims["exp"]), identity)
        if len(self._tokens) > self.token_cache_size:
            self._tokens.popitem(last=False)
        return identity

    async def resolve_api_key(self, key: str) -> Identity:
        if self.api_key_source is None:
            raise InvalidToken("API keys are not accepted here.")
        digest = hashlib.sha256(key.encode()).hexdigest()
        now = time.monotonic()
        cached = self._api_keys.get(digest)
        if cached is not None and cached[0] > now:
            self._api_keys.move_to_end(digest)
            if isinstance(cached[1], StrataError):
                raise cached[1]
            return cached[1]
        try:
            result: Identity | StrataError = await self.api_key_source(key)
        except StrataError as exc:
            if exc.status != 401:
                raise  # the auth service is unwell: say so, do not cache
            result = InvalidToken(exc.message or "The API key is not valid.")
        self._api_keys[digest] = (now + self.api_key_cache_ttl_s, result)
        self._api_keys.move_to_end(digest)
        while len(self._api_keys) > self.api_key_cache_size:
            self._api_keys.popitem(last=False)
        if isinstance(result, StrataError):
            raise result
        return result

    def forget_api_key(self, key_id: str | None = None) -> None:
        """Drop cached API keys (all of them: the cache is keyed by secret, not id) after a revocation event."""
        self._api_keys.clear()


def _unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header, read with plain base64 and JSON (PyJWT's reader costs ~20 µs); nothing in it is trusted
    before the signature is checked."""
    head, dot, _ = token.partition(".")
    if not dot or not head or len(head) > 2048:
        raise InvalidToken()
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, TypeError):
        raise InvalidToken() from None
    if not isinstance(header, dict):
        raise InvalidToken()
    return header


def check_role(identity: Identity, minimum: Role) -> Identity:
    if not identity.role.at_least(minimum):
        raise InsufficientRole(f"This needs the {minimum.value} role; you are {identity.role.value}.")
    return identity
