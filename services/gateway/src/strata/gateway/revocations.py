"""What the auth service revoked, as the gateway learns it from ``strata.auth.>``: live sockets of a revoked identity
are closed at once, and a token issued before the revocation is refused when a socket signs in with it.

Access tokens are verified locally (JWKS), so without this a deactivated user's token would keep a socket open until
it expires. The watch is an ordered push consumer that starts ``window_s`` back (the longest access-token lifetime),
so a replica that starts later knows what happened before it, and follows the stream from there. It keeps:

- users deactivated or deleted (until re-activated),
- each user's current role: a token that carries a higher role was issued before a demotion,
- sign-in sessions (refresh-token families) that ended: logout, reuse, password change,
- revoked API keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.js import api as js_api

from strata.common.contracts.auth import (
    ApiKeyRevoked,
    Identity,
    Role,
    SessionRevoked,
    UserDeactivated,
    UserDeleted,
    UserDemoted,
    UserEvent,
)
from strata.common.events import EVENTS_STREAM, Bus, CloudEvent

log = logging.getLogger(__name__)

AUTH_SUBJECTS = "strata.auth.>"
#: Called with a predicate over identities and the reason: close the sockets it selects.
Revoke = Callable[[Callable[[Identity], bool], str], None]


class Revocations:
    def __init__(self, bus: Bus, *, window_s: float, on_revoke: Revoke, max_entries: int = 200_000) -> None:
        self.bus = bus
        self.window_s = window_s
        self.on_revoke = on_revoke
        self.max_entries = max_entries
        self.inactive: set[str] = set()
        self.roles: dict[str, Role] = {}
        self.sessions: dict[str, float] = {}  # session id -> when it ended (monotonic), pruned after window_s
        self.api_keys: dict[str, float] = {}
        self._sub: Any = None
        self._started = False
        self.ready = asyncio.Event()

    # -- the watch ------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.bus.on_connect(self._subscribe)
        if self.bus.is_connected:
            await self._subscribe()

    async def _subscribe(self) -> None:
        if self._sub is not None:
            return  # an ordered consumer re-creates itself after a reconnect
        start = datetime.now(UTC) - timedelta(seconds=self.window_s)
        self._sub = await self.bus.js.subscribe(
            AUTH_SUBJECTS,
            stream=EVENTS_STREAM,
            cb=self._on_message,
            ordered_consumer=True,
            deliver_policy=js_api.DeliverPolicy.BY_START_TIME,
            config=js_api.ConsumerConfig(opt_start_time=start),
        )
        with contextlib.suppress(Exception):
            info = await self._sub.consumer_info()
            if not info.num_pending:
                self.ready.set()

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_message(self, msg: Any) -> None:
        try:
            event = CloudEvent.model_validate_json(msg.data)
            self.apply(event)
        except Exception:
            log.exception("could not apply auth event on %s", msg.subject)
        if not self.ready.is_set() and not msg.metadata.num_pending:
            self.ready.set()

    async def wait_ready(self, timeout_s: float) -> bool:
        """True once the events of the window have been read (a socket may then be checked against them)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ready.wait(), timeout_s)
        return self.ready.is_set()

    # -- state ----------------------------------------------------------------------------------------------------
    def apply(self, event: CloudEvent) -> None:
        kind = event.type
        if kind.startswith("strata.auth.user."):
            user = event.payload(UserEvent)
            uid, role = user.user_id, user.role
            self.roles[uid] = role
            if kind in (UserDeactivated.event_type, UserDeleted.event_type) or not user.is_active:
                self.inactive.add(uid)
                self.on_revoke(lambda i: i.user_id == uid, "user_deactivated")
            else:
                self.inactive.discard(uid)
            if kind == UserDemoted.event_type:
                self.on_revoke(lambda i: i.user_id == uid and i.role.rank > role.rank, "user_demoted")
            self._bound(self.roles)
        elif kind == SessionRevoked.event_type:
            revoked = event.payload(SessionRevoked)
            sid = revoked.session_id
            self.sessions[sid] = time.monotonic()
            self._prune(self.sessions)
            self.on_revoke(lambda i: i.session_id == sid, f"session_{revoked.reason}")
        elif kind == ApiKeyRevoked.event_type:
            key_id = event.payload(ApiKeyRevoked).api_key_id
            self.api_keys[key_id] = time.monotonic()
            self._prune(self.api_keys)
            self.on_revoke(lambda i: i.kind == "api_key" and i.token_id == key_id, "api_key_revoked")

    def refused(self, identity: Identity) -> str | None:
        """Why ``identity`` may not open a socket any more, or None."""
        if identity.user_id in self.inactive:
            return "The user is deactivated."
        role = self.roles.get(identity.user_id)
        if role is not None and identity.role.rank > role.rank:
            return f"The user's role changed to {role.value}: sign in again."
        if identity.session_id and identity.session_id in self.sessions:
            return "This sign-in session has ended: sign in again."
        if identity.kind == "api_key" and identity.token_id in self.api_keys:
            return "The API key was revoked."
        return None

    def _prune(self, entries: dict[str, float]) -> None:
        if len(entries) <= self.max_entries:
            return
        horizon = time.monotonic() - self.window_s
        for key in [k for k, t in entries.items() if t < horizon]:
            del entries[key]
        while len(entries) > self.max_entries:
            entries.pop(next(iter(entries)))

    def _bound(self, entries: dict[str, Any]) -> None:
        while len(entries) > self.max_entries:
            entries.pop(next(iter(entries)))
