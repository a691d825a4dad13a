"""``WS /api/v1/ws``: the gateway's WebSocket. The protocol is docs/realtime.md; this module is its server.

- :class:`Realtime` is what the app holds: the live-event :class:`~.live.Hub`, the :class:`~.revocations.Revocations`,
  the open connections per user, the cache of channel authorizations, the metrics.
- :class:`Connection` is one socket: a reader (the client's messages), a sender task that drains the socket's own
  queue (so a slow client never slows the others), expiry timers, and its channels.
- :class:`Channel` is one subscription of one socket, a sink of the hub: it buffers live events while its replay from
  JetStream runs, then delivers in ``seq`` order, dropping anything it already sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from fastapi import WebSocket
from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketState

from strata.common.auth import TokenVerifier
from strata.common.contracts.auth import Identity, Role
from strata.common.contracts.datasets import DATASET_EVENT_PREFIX, dataset_events_filter, owner_dataset_events_filter
from strata.common.contracts.execution import job_events_filter, user_job_events_filter
from strata.common.contracts.realtime import ACCESS_COOKIE, ReadCheck, ReadVerdict, SharedWith, SharedWithRequest
from strata.common.errors import StrataError
from strata.common.events import Bus
from strata.common.observability import Metrics
from strata.common.rpc import RpcClient

from .config import Settings
from .live import Hub, LiveEvent, ReplayTooLong, replay, stream_bounds
from .ratelimit import Limit, RateLimiter
from .revocations import Revocations

log = logging.getLogger(__name__)

# Close codes (docs/realtime.md): 44xx need the client to change something; 45xx mean "reconnect and resume".
GOING_AWAY = 1001
INTERNAL_ERROR = 1011
UNAUTHENTICATED = 4401
SESSION_REVOKED = 4403
AUTH_TIMEOUT = 4408
TOO_MANY_CONNECTIONS = 4429
SLOW_CONSUMER = 4500
RESYNC = 4503

SHARE_FEED = f"{DATASET_EVENT_PREFIX}.shared.*.*"
_DATASET_HEAD = DATASET_EVENT_PREFIX + "."
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CLOSE_REASON_BYTES = 120


class WsMetrics:
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.connections = Gauge("strata_ws_connections", "Open WebSocket connections.", registry=r)
        self.subscriptions = Gauge(
            "strata_ws_subscriptions", "Channel subscriptions of open sockets, by channel kind.", ["kind"], registry=r
        )
        self.messages = Counter(
            "strata_ws_messages_sent_total",
            "Frames sent to sockets, by kind (event, progress, replay, control).",
            ["kind"],
            registry=r,
        )
        self.bytes = Counter("strata_ws_bytes_sent_total", "Bytes of frames sent to sockets.", registry=r)
        self.dropped = Counter(
            "strata_ws_dropped_total",
            "Events not sent to a socket, by reason (coalesced: a newer progress event replaced it).",
            ["reason"],
            registry=r,
        )
        self.disconnects = Counter("strata_ws_disconnects_total", "Sockets closed, by reason.", ["reason"], registry=r)
        self.latency = Histogram(
            "strata_ws_fanout_latency_seconds",
            "From an event's time to its frame handed to a socket (live events).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.replayed = Counter(
            "strata_ws_replayed_total", "Events replayed from JetStream to resuming sockets.", registry=r
        )
        self.refused = Counter(
            "strata_ws_subscribe_refused_total", "Subscriptions refused, by reason.", ["reason"], registry=r
        )
        self.nats_subscriptions = Gauge(
            "strata_ws_nats_subscriptions", "NATS subscriptions this replica holds for its sockets.", registry=r
        )
        # Bound children: the fan-out path increments these per frame.
        self.sent = {kind: self.messages.labels(kind) for kind in ("event", "progress", "replay", "control")}
        self.coalesced = self.dropped.labels("coalesced")


class ChannelError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _reason(text: str) -> str:
    """A close reason fits a control frame (123 bytes)."""
    data = text.encode()
    return text if len(data) <= _CLOSE_REASON_BYTES else data[:_CLOSE_REASON_BYTES].decode(errors="ignore")


class Realtime:
    def __init__(
        self,
        *,
        bus: Bus,
        rpc: RpcClient,
        verifier: Callable[[], TokenVerifier],
        limiter: Callable[[], RateLimiter],
        metrics: Metrics,
        settings: Settings,
    ) -> None:
        self.bus = bus
        self.rpc = rpc
        self.verifier = verifier
        self.limiter = limiter
        self.settings = settings
        self.subscribe_limit = Limit.parse(settings.rate_limit_ws_subscribe)
        self.metrics = WsMetrics(metrics)
        self.hub = Hub(bus, max_catch_up=settings.ws_max_replay)
        self.metrics.nats_subscriptions.set_function(lambda: self.hub.subscriptions)
        self.revocations = Revocations(bus, window_s=settings.ws_revocation_window_s, on_revoke=self.revoke)
        self.by_user: dict[str, set[Connection]] = {}
        self._access: OrderedDict[tuple[str, str, str, str], tuple[float, ReadVerdict]] = OrderedDict()
        self.accepting = True

    async def start(self) -> None:
        await self.revocations.start()

    async def stop(self) -> None:
        self.accepting = False
        conns = [c for group in self.by_user.values() for c in group]
        for conn in conns:
            conn.close(GOING_AWAY, "The gateway is shutting down: reconnect and resume.", "shutdown")
        if conns:
            await asyncio.wait([c.done for c in conns], timeout=5)
        await self.revocations.stop()

    # -- connections ----------------------------------------------------------------------------------------------
    def origin_allowed(self, websocket: WebSocket) -> bool:
        origin = websocket.headers.get("origin")
        if origin is None:
            return True  # not a browser: cross-site hijacking needs one
        if origin in self.settings.cors_origins:  # listed exactly: "*" does not open the socket to every site
            return True
        host = websocket.headers.get("host", "")
        return bool(host) and urlsplit(origin).netloc == host  # the gateway's own origin

    def register(self, conn: Connection) -> bool:
        group = self.by_user.setdefault(conn.identity.user_id, set())
        if len(group) >= self.settings.ws_max_connections_per_user:
            return False
        group.add(conn)
        self.metrics.connections.inc()
        return True

    def unregister(self, conn: Connection) -> None:
        group = self.by_user.get(conn.identity.user_id)
        if group is not None and conn in group:
            group.discard(conn)
            self.metrics.connections.dec()
            if not group:
                del self.by_user[conn.identity.user_id]

    def revoke(self, selects: Callable[[Identity], bool], reason: str) -> None:
        for group in list(self.by_user.values()):
            for conn in list(group):
                if selects(conn.identity):
                    conn.close(SESSION_REVOKED, f"Session revoked: {reason.replace('_', ' ')}.", reason)

    # -- authorization --------------------------------------------------------------------------------------------
    async def can_read(self, identity: Identity, kind: str, resource_id: str, *, fresh: bool = False) -> ReadVerdict:
        key = (kind, identity.user_id, identity.role.value, resource_id)
        now = time.monotonic()
        cached = self._access.get(key)
        if cached is not None and cached[0] > now and not fresh:
            return cached[1]
        service, verb = ("execution", "can_read_job") if kind == "job" else ("datasets", "can_read")
        verdict = await self.rpc.call(
            service,
            verb,
            ReadCheck(user_id=identity.user_id, role=identity.role, resource_id=resource_id),
            ReadVerdict,
        )
        # Only a job's reader cannot change (its owner, or an admin: a demotion closes the socket anyway). A dataset's
        # can, at any moment (a share made or removed on another replica), so it is asked every time; so is a refusal.
        if verdict.readable and kind == "job":
            self._access[key] = (now + self.settings.ws_access_cache_s, verdict)
            self._access.move_to_end(key)
            while len(self._access) > 100_000:
                self._access.popitem(last=False)
        else:
            self._access.pop(key, None)
        return verdict

    async def shared_with(self, identity: Identity) -> list[str]:
        reply = await self.rpc.call(
            "datasets", "shared_with", SharedWithRequest(user_id=identity.user_id, role=identity.role), SharedWith
        )
        return reply.dataset_ids

    # -- the endpoint ---------------------------------------------------------------------------------------------
    async def serve(self, websocket: WebSocket, raw_send: Send) -> None:
        if not self.origin_allowed(websocket):
            self.metrics.disconnects.labels("origin_refused").inc()
            await websocket.close(code=1008)  # before accept: the handshake is answered 403
            return
        if not self.accepting:
            await websocket.close(code=1013)
            return
        await websocket.accept()
        identity = await self._authenticate(websocket)
        if identity is None:
            return
        conn = Connection(self, websocket, identity, raw_send)
        if not self.register(conn):
            self.metrics.disconnects.labels("too_many_connections").inc()
            await _close(
                websocket,
                TOO_MANY_CONNECTIONS,
                f"At most {self.settings.ws_max_connections_per_user} sockets per user: close another one.",
            )
            return
        try:
            await conn.run()
        finally:
            self.unregister(conn)

    async def _authenticate(self, websocket: WebSocket) -> Identity | None:
        """The cookie's identity, else the first message's; the socket is closed (and None returned) otherwise."""
        if not await self.revocations.wait_ready(3.0):
            # Without the recent revocations a revoked token would be let in: not before they are read.
            self.metrics.disconnects.labels("starting").inc()
            await _close(websocket, RESYNC, "The gateway is starting: reconnect in a moment.")
            return None
        cookie = websocket.cookies.get(ACCESS_COOKIE)
        if cookie:
            with contextlib.suppress(StrataError):
                identity = await self.verifier().verify(cookie)
                if self.revocations.refused(identity) is None:
                    return identity
        try:
            message = await asyncio.wait_for(websocket.receive(), self.settings.ws_auth_timeout_s)
        except TimeoutError:
            self.metrics.disconnects.labels("auth_timeout").inc()
            await _close(
                websocket,
                AUTH_TIMEOUT,
                f'Send {{"type": "auth", "token": ...}} within {self.settings.ws_auth_timeout_s:g} s.',
            )
            return None
        if message["type"] == "websocket.disconnect":
            return None
        token = _auth_token(message.get("text"))
        if token is None:
            self.metrics.disconnects.labels("unauthenticated").inc()
            await _close(websocket, UNAUTHENTICATED, 'The first message must be {"type": "auth", "token": ...}.')
            return None
        try:
            identity = await self.verifier().verify(token)
        except StrataError as exc:
            self.metrics.disconnects.labels("unauthenticated").inc()
            await _close(websocket, UNAUTHENTICATED, exc.message)
            return None
        refused = self.revocations.refused(identity)
        if refused is not None:
            self.metrics.disconnects.labels("revoked").inc()
            await _close(websocket, SESSION_REVOKED, refused)
            return None
        return identity


class RealtimeMiddleware:
    """Serves ``WS /api/v1/ws`` ahead of the app's routing and middleware: the hot path (one ``send`` per frame per
    socket) goes straight to the server, without the wrappers a routed endpoint's ``send`` passes through."""

    def __init__(self, app: ASGIApp, *, realtime: Realtime, path: str) -> None:
        self.app = app
        self.realtime = realtime
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        websocket = WebSocket(scope, receive=receive, send=send)
        try:
            await self.realtime.serve(websocket, send)
        except Exception:
            log.exception("the WebSocket session failed")
            self.realtime.metrics.disconnects.labels("server_error").inc()
            await _close(websocket, INTERNAL_ERROR, "Internal error: reconnect and resume.")


def _auth_token(text: str | None) -> str | None:
    if not text or len(text) > 16_384:
        return None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("type") != "auth":
        return None
    token = message.get("token")
    return token if isinstance(token, str) and token else None


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state == WebSocketState.DISCONNECTED:
        return
    with contextlib.suppress(Exception):  # the client is gone, or will not read: the transport closes anyway
        await asyncio.wait_for(websocket.close(code=code, reason=_reason(reason)), 5)


class _Frame:
    __slots__ = ("key", "kind", "text", "time")

    def __init__(self, text: str, kind: str, key: str | None, when: float | None) -> None:
        self.text: str | None = text
        self.kind = kind
        self.key = key
        self.time = when


class Connection:
    def __init__(self, realtime: Realtime, websocket: WebSocket, identity: Identity, raw_send: Send) -> None:
        self.rt = realtime
        self.ws = websocket
        self.raw_send = raw_send
        self.identity = identity
        self.channels: dict[str, Channel] = {}
        self._opening: dict[str, asyncio.Future[None]] = {}  # subscribes being authorized and started
        self._abandoned: set[str] = set()  # ... and unsubscribed meanwhile
        self._queue: deque[_Frame] = deque()
        self._queued = 0  # frames in the queue that will be sent (coalesced ones are not)
        self._progress: dict[str, _Frame] = {}
        self._waiter: asyncio.Future[None] | None = None  # the idle sender waits on it
        self._room = asyncio.Event()
        self._room.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None  # the token's expiry: a warning, then the deadline
        self._closing: tuple[int, str] | None = None
        self._runner: asyncio.Task[Any] | None = None
        self._reading = False
        self._sender: asyncio.Task[None] | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- lifecycle ------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Read the client's messages in this task; a sender task drains the queue. :meth:`close` cancels this
        task's read, which is how a close from elsewhere (revocation, overflow, expiry) ends the session."""
        self._runner = asyncio.current_task()
        self._sender = asyncio.create_task(self._send_loop(), name="ws-sender")
        self._sender.add_done_callback(self._sender_ended)
        try:
            self._welcome()
            self._reading = True
            code = await self._read_loop()
            if self._closing is None:
                self.rt.metrics.disconnects.labels(_client_reason(code)).inc()
        except asyncio.CancelledError:
            if self._closing is None:
                raise  # not ours: the server is stopping this task
        finally:
            self._reading = False
            self._sender.cancel()
            for task in list(self._tasks):
                task.cancel()
            if self._timer is not None:
                self._timer.cancel()
            for channel in list(self.channels.values()):
                channel.detach()
            self.channels.clear()
            if self._closing is not None:
                self._queue.clear()
                await _close(self.ws, *self._closing)
            if not self.done.done():
                self.done.set_result(None)

    def _sender_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and self._closing is None:
            self.close(INTERNAL_ERROR, "Sending failed: reconnect and resume.", "send_failed")

    def close(self, code: int, reason: str, metric: str) -> None:
        """Close the socket soon (from any task or callback): what is queued is dropped, the close frame goes out."""
        if self._closing is not None:
            return
        self._closing = (code, reason)
        self.rt.metrics.disconnects.labels(metric).inc()
        if self._runner is not None:
            # From the runner itself too (a reply that overflowed the queue): it is cancelled at its next await.
            asyncio.get_running_loop().call_soon(self._stop_reading)

    def _stop_reading(self) -> None:
        if self._reading and self._runner is not None:
            self._runner.cancel()

    def _welcome(self) -> None:
        identity = self.identity
        self.control(
            {
                "type": "welcome",
                "user_id": identity.user_id,
                "role": identity.role.value,
                "expires_at": identity.expires_at.isoformat() if identity.expires_at else None,
                "heartbeat_s": self.rt.settings.ws_ping_interval_s,
                "limits": {
                    "max_subscriptions": self.rt.settings.ws_max_subscriptions,
                    "max_queue": self.rt.settings.ws_max_queue,
                    "max_replay": self.rt.settings.ws_max_replay,
                },
            }
        )
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if identity.expires_at is not None:
            # One timer at a time: the warning, which then sets the deadline.
            loop = asyncio.get_running_loop()
            expires = identity.expires_at.timestamp()
            expires_at = identity.expires_at.isoformat()

            def expire() -> None:
                self._timer = None
                self.close(UNAUTHENTICATED, "The access token expired: send a new one before it does.", "token_expired")

            def warn() -> None:
                self.control({"type": "token_expiring", "expires_at": expires_at})
                self._timer = loop.call_later(max(expires - time.time(), 0), expire)

            self._timer = loop.call_later(max(expires - time.time() - self.rt.settings.ws_token_expiring_s, 0), warn)

    # -- the queue ------------------------------------------------------------------------------------------------
    def push(self, text: str, kind: str, *, key: str | None = None, when: float | None = None) -> None:
        """Queue a frame. ``key`` (the channel) makes it a progress frame: a newer one replaces it while unsent."""
        if self._closing is not None:
            return
        if key is not None:
            older = self._progress.get(key)
            if older is not None and older.text is not None:
                older.text = None  # coalesced: the newer one goes to the end, so seq order holds
                self._queued -= 1
                self.rt.metrics.coalesced.inc()
        frame = _Frame(text, kind, key, when)
        self._queue.append(frame)
        self._queued += 1
        if key is not None:
            self._progress[key] = frame
        if self._queued > self.rt.settings.ws_max_queue:
            self.close(SLOW_CONSUMER, "Too slow: the queue overflowed. Reconnect, resume with since.", "slow_consumer")
            return
        if self._queued > self.rt.settings.ws_max_queue // 2:
            self._room.clear()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def control(self, message: dict[str, Any]) -> None:
        self.push(json.dumps(message, separators=(",", ":")), "control")

    async def room(self) -> None:
        """Wait while the queue is more than half full (replays go at the client's pace)."""
        await self._room.wait()

    async def _send_loop(self) -> None:
        """Drain the queue into the socket. Counters are added up per batch (a wake-up), not per frame."""
        metrics = self.rt.metrics
        send = self.raw_send  # the server's own ASGI send: no wrapper between the queue and the socket
        queue = self._queue
        low = self.rt.settings.ws_max_queue // 4
        loop = asyncio.get_running_loop()
        observe = metrics.latency.observe
        clock = time.time
        while True:
            sent = {"event": 0, "progress": 0, "replay": 0, "control": 0}
            size = 0
            while queue:
                frame = queue.popleft()
                text = frame.text
                if text is None:
                    continue
                if frame.key is not None and self._progress.get(frame.key) is frame:
                    del self._progress[frame.key]
                self._queued -= 1
                if self._queued <= low:
                    self._room.set()
                await send({"type": "websocket.send", "text": text})
                sent[frame.kind] += 1
                size += len(text)
                if frame.time is not None:
                    observe(max(clock() - frame.time, 0.0))
            if size:
                for kind, count in sent.items():
                    if count:
                        metrics.sent[kind].inc(count)
                metrics.bytes.inc(size)
            self._room.set()
            self._waiter = loop.create_future()
            await self._waiter
            self._waiter = None

    # -- the client's messages ------------------------------------------------------------------------------------
    async def _read_loop(self) -> int | None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                code = message.get("code")
                return int(code) if code is not None else None
            text = message.get("text")
            if text is None:
                self.error(None, None, "BAD_MESSAGE", "Send JSON text frames.")
                continue
            try:
                request = json.loads(text)
            except ValueError:
                self.error(None, None, "BAD_MESSAGE", "The message is not JSON.")
                continue
            if not isinstance(request, dict):
                self.error(None, None, "BAD_MESSAGE", "The message must be a JSON object.")
                continue
            request_id = request.get("id")
            kind = request.get("type")
            if kind == "ping":
                self.control({"type": "pong", "id": request_id})
            elif kind == "subscribe":
                self._spawn(self._subscribe(request))
            elif kind == "unsubscribe":
                # A task too, started after the subscribes sent before it (tasks start in order), so that it sees them.
                self._spawn(self._unsubscribe(request))
            elif kind == "auth":
                await self._reauthenticate(request)
                if self._closing is not None:  # closed by what it found (this task is not cancelled for it)
                    return None
            else:
                self.error(request_id, None, "BAD_MESSAGE", "Unknown type: use subscribe, unsubscribe, auth or ping.")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("a WebSocket task failed: %r", exc, exc_info=exc)
            self.close(INTERNAL_ERROR, "Internal error: reconnect and resume.", "server_error")

    def error(self, request_id: Any, channel: str | None, code: str, message: str, **extra: Any) -> None:
        body: dict[str, Any] = {"type": "error", "id": request_id, "error": {"code": code, "message": message, **extra}}
        if channel is not None:
            body["channel"] = channel
        self.control(body)

    async def _reauthenticate(self, request: dict[str, Any]) -> None:
        token = request.get("token")
        if not isinstance(token, str) or not token:
            self.error(request.get("id"), None, "BAD_MESSAGE", "auth needs a token.")
            return
        try:
            identity = await self.rt.verifier().verify(token)
        except StrataError as exc:
            self.error(request.get("id"), None, exc.code, exc.message)
            return
        if identity.user_id != self.identity.user_id:
            self.close(UNAUTHENTICATED, "Re-authentication must be as the same user.", "unauthenticated")
            return
        refused = self.rt.revocations.refused(identity)
        if refused is not None:
            self.close(SESSION_REVOKED, refused, "revoked")
            return
        self.identity = identity
        self._welcome()

    async def _unsubscribe(self, request: dict[str, Any]) -> None:
        name = request.get("channel")
        channel = self.channels.pop(name, None) if isinstance(name, str) else None
        if channel is not None:
            channel.detach()
        elif isinstance(name, str) and name in self._opening:
            self._abandoned.add(name)
        self.control({"type": "unsubscribed", "channel": name, "id": request.get("id")})

    async def _subscribe(self, request: dict[str, Any]) -> None:
        request_id = request.get("id")
        name = request.get("channel")
        since = request.get("since")
        if not isinstance(name, str):
            self.error(request_id, None, "INVALID_CHANNEL", 'channel must be "job:<id>", "dataset:<id>" or "user".')
            return
        if since is not None and (isinstance(since, bool) or not isinstance(since, int) or since < 0):
            self.error(request_id, name, "INVALID_SINCE", "since must be a stream sequence (an integer >= 0).")
            return
        while name in self._opening:  # the same channel asked again (say subscribe, unsubscribe, subscribe): in turn
            await asyncio.shield(self._opening[name])
        current = self.channels.get(name)
        if current is not None:
            self.control(
                {
                    "type": "subscribed",
                    "channel": name,
                    "id": request_id,
                    "recovered": True,
                    "seq": current.last_seq,
                    "already": True,
                }
            )
            return
        if len(self.channels) + len(self._opening) >= self.rt.settings.ws_max_subscriptions:
            self.rt.metrics.refused.labels("too_many").inc()
            self.error(
                request_id,
                name,
                "TOO_MANY_SUBSCRIPTIONS",
                f"At most {self.rt.settings.ws_max_subscriptions} channels per socket.",
            )
            return
        done = self._opening[name] = asyncio.get_running_loop().create_future()
        try:
            await self._subscribe_now(name, since, request_id)
        except Exception as exc:  # the rate limiter's store, a malformed identity...: answer, keep the socket
            log.exception("subscribing %s failed", name)
            self.error(request_id, name, "SERVICE_UNAVAILABLE", f"Could not subscribe: {type(exc).__name__}.")
        finally:
            del self._opening[name]
            self._abandoned.discard(name)
            done.set_result(None)

    async def _subscribe_now(self, name: str, since: int | None, request_id: Any) -> None:
        decision = await self.rt.limiter().hit(f"user:{self.identity.user_id}", self.rt.subscribe_limit)
        if not decision.allowed:
            self.rt.metrics.refused.labels("rate_limited").inc()
            self.error(
                request_id, name, "RATE_LIMITED", "Too many requests.", retry_after_s=round(decision.retry_after_s, 3)
            )
            return
        try:
            channel = await self._open(name)
        except ChannelError as exc:
            self.rt.metrics.refused.labels(exc.code.lower()).inc()
            self.error(request_id, name, exc.code, exc.message)
            return
        except StrataError as exc:  # the owning service did not answer
            self.rt.metrics.refused.labels("unavailable").inc()
            self.error(request_id, name, "SERVICE_UNAVAILABLE", exc.message)
            return
        if name in self._abandoned or self._closing is not None:  # unsubscribed meanwhile, or closing
            self._abandoned.discard(name)
            channel.detach()
            return
        self.channels[name] = channel
        try:
            await channel.start(since, request_id)
        except ChannelError as exc:  # no longer readable when checked again
            if self.channels.get(name) is channel:
                del self.channels[name]
            channel.detach()
            self.rt.metrics.refused.labels(exc.code.lower()).inc()
            self.error(request_id, name, exc.code, exc.message)
        except StrataError as exc:
            if self.channels.get(name) is channel:
                del self.channels[name]
            channel.detach()
            self.rt.metrics.refused.labels("unavailable").inc()
            self.error(request_id, name, "SERVICE_UNAVAILABLE", exc.message)
        except Exception as exc:
            log.exception("subscribing %s failed", name)
            if self.channels.get(name) is channel:
                del self.channels[name]
            channel.detach()
            self.error(request_id, name, "SERVICE_UNAVAILABLE", f"Could not subscribe: {type(exc).__name__}.")

    async def _open(self, name: str) -> Channel:
        kind, _, resource = name.partition(":")
        identity = self.identity
        if kind == "user" and not resource:
            shared = set(await self.rt.shared_with(identity))
            return Channel(self, name, "user", None, shared=shared)
        if kind not in ("job", "dataset") or not _ID.match(resource):
            raise ChannelError("INVALID_CHANNEL", 'channel must be "job:<id>", "dataset:<id>" or "user".')
        verdict = await self.rt.can_read(identity, kind, resource)
        if not verdict.readable:
            raise ChannelError("CHANNEL_NOT_FOUND", f"No {kind} {resource} that you can read.")
        return Channel(self, name, kind, resource)


def _client_reason(code: int | None) -> str:
    if code == 1012:
        return "shutdown"  # uvicorn closes every socket with 1012 ("service restart") when it stops
    if code in (1000, 1001):
        return "client_closed"
    return "connection_lost"  # 1006 (no close frame), 1011 (the heartbeat went unanswered), ...


class Channel:
    """One socket's subscription: a sink of the hub (see :mod:`.live`).

    While ``buffer`` is a list, live events wait in it (a replay runs: at the start with ``since``, or for a dataset
    shared with the user a moment ago); then everything is delivered merged in ``seq`` order, each seq once."""

    def __init__(
        self, conn: Connection, name: str, kind: str, resource: str | None, *, shared: set[str] | None = None
    ) -> None:
        self.conn = conn
        self.name = name
        self.kind = kind
        self.resource = resource
        self.shared = shared if shared is not None else set()
        self.last_seq = 0
        self.buffer: list[LiveEvent] | None = []
        self.filters: set[str] = set()
        self.detached = False
        self.counted = False
        self.starting = True
        self._following = 0  # datasets granted live whose missed events are being read
        self._missed: list[LiveEvent] = []
        user = conn.identity.user_id
        if kind == "job":
            assert resource is not None
            self.base_filters = [job_events_filter(resource)]
        elif kind == "dataset":
            assert resource is not None
            self.base_filters = [dataset_events_filter(resource)]
        else:
            self.base_filters = [user_job_events_filter(user), owner_dataset_events_filter(user), SHARE_FEED]

    def all_filters(self) -> list[str]:
        return [*self.base_filters, *(dataset_events_filter(d) for d in sorted(self.shared))]

    async def start(self, since: int | None, request_id: Any) -> None:
        rt = self.conn.rt
        identity = self.conn.identity
        for subject_filter in self.all_filters():
            await self._listen(subject_filter)
        bounds = await stream_bounds(rt.bus)
        rt.hub.note_stream_end(bounds.last_seq)
        # Asked again now that the live feed is on: a share removed before here is seen by this answer, one removed
        # after arrives live (its seq is above the bounds) and is acted on.
        if self.kind == "dataset":
            assert self.resource is not None
            if not (await rt.can_read(identity, "dataset", self.resource, fresh=True)).readable:
                raise ChannelError("CHANNEL_NOT_FOUND", f"No dataset {self.resource} that you can read.")
        elif self.kind == "user":
            now_shared = set(await rt.shared_with(identity))
            for dataset in self.shared - now_shared:
                self.shared.discard(dataset)
                self._forget(dataset_events_filter(dataset))
        if self.detached:
            return
        rt.metrics.subscriptions.labels(self.kind).inc()
        self.counted = True
        recovered = True
        replayed = 0
        if since is None:
            self.last_seq = bounds.last_seq
        elif since > 0 and since + 1 < bounds.first_seq:
            recovered, self.last_seq = False, bounds.last_seq
        else:
            self.last_seq = since
        if since is not None and recovered and bounds.last_seq > since:
            try:
                first = True
                async for event in replay(rt.bus, self.all_filters(), after=since, limit=rt.settings.ws_max_replay):
                    if self.detached:
                        return
                    if first:
                        self._subscribed(request_id, True, since)
                        first = False
                    if event.seq <= self.last_seq or not self._accepts(event):
                        continue
                    self.last_seq = event.seq
                    self.conn.push(event.frame(self.name), "replay")
                    self._react(event)
                    replayed += 1
                    await self.conn.room()
                if first:
                    self._subscribed(request_id, True, since)
            except ReplayTooLong:
                recovered, self.last_seq = False, bounds.last_seq
                self._subscribed(request_id, False, self.last_seq)
            rt.metrics.replayed.inc(replayed)
        else:
            self._subscribed(request_id, recovered, self.last_seq)
        if self.detached:
            return
        self.starting = False
        self._release()

    def _release(self) -> None:
        """Deliver what waited (the buffer and any missed events read meanwhile), in seq order, and go live."""
        waiting = sorted([*self._missed, *(self.buffer or [])], key=lambda e: e.seq)
        self.buffer, self._missed = None, []
        for event in waiting:
            self.offer(event, "")

    def _subscribed(self, request_id: Any, recovered: bool, seq: int) -> None:
        self.conn.control(
            {"type": "subscribed", "channel": self.name, "id": request_id, "recovered": recovered, "seq": seq}
        )

    async def _listen(self, subject_filter: str) -> None:
        if subject_filter in self.filters or self.detached:
            return
        self.filters.add(subject_filter)
        try:
            await self.conn.rt.hub.add(subject_filter, self)
        except BaseException:
            self.filters.discard(subject_filter)
            raise
        if self.detached:  # unsubscribed meanwhile
            self._forget(subject_filter)

    def _forget(self, subject_filter: str) -> None:
        if subject_filter in self.filters:
            self.filters.discard(subject_filter)
            self.conn.rt.hub.remove(subject_filter, self)

    def detach(self) -> None:
        if self.detached:
            return
        self.detached = True
        for subject_filter in list(self.filters):
            self._forget(subject_filter)
        if self.counted:
            self.conn.rt.metrics.subscriptions.labels(self.kind).dec()

    # -- the hub's side -------------------------------------------------------------------------------------------
    def offer(self, event: LiveEvent, via: str) -> None:
        if self.detached or event.seq <= self.last_seq:
            return
        if self.buffer is not None:
            self.buffer.append(event)
            if len(self.buffer) > self.conn.rt.settings.ws_max_queue * 10:
                self.conn.close(
                    SLOW_CONSUMER, "Too many events while catching up: reconnect, resume with since.", "slow_consumer"
                )
            return
        if not self._accepts(event):
            return
        self.last_seq = event.seq
        if event.progress:
            self.conn.push(event.frame(self.name), "progress", key=self.name, when=event.time)
        else:
            self.conn.push(event.frame(self.name), "event", when=event.time)
        self._react(event)

    def resync(self) -> None:
        self.conn.close(RESYNC, "The gateway missed events: reconnect and resume with since.", "resync")

    def _accepts(self, event: LiveEvent) -> bool:
        """The user channel follows the share feed for grants to this user only; other channels take all."""
        if self.kind != "user" or not event.subject.startswith(_DATASET_HEAD):
            return True
        tokens = event.subject.split(".")
        if len(tokens) != 6:
            return False
        owner, dataset = tokens[4], tokens[5]
        if owner == self.conn.identity.user_id or dataset in self.shared:
            return True
        return tokens[3] == "shared" and _grants(event.data, self.conn.identity)

    def _react(self, event: LiveEvent) -> None:
        """Follow what a share or a deletion changes about what this channel may read."""
        if not event.subject.startswith(_DATASET_HEAD):
            return
        verb = event.subject.split(".")[3]
        dataset = str(event.data.get("dataset_id", ""))
        if not dataset:
            return
        if verb == "shared":
            if self.kind == "user" and event.data.get("permission") and _grants(event.data, self.conn.identity):
                if dataset not in self.shared and event.data.get("owner_id") != self.conn.identity.user_id:
                    self.shared.add(dataset)
                    self._follow(dataset, event.seq)
            elif event.data.get("permission") is None:
                self.conn._spawn(self._recheck(dataset))
        elif verb == "deleted" and self.kind == "user" and dataset in self.shared:
            self.shared.discard(dataset)
            self._forget(dataset_events_filter(dataset))

    def _follow(self, dataset: str, granted_at: int) -> None:
        """A dataset was just shared with the user: hold the channel's live events, subscribe to the dataset, read its
        events stored since the grant, then deliver both merged. (While the channel is starting, its replay's filters
        are fixed: the dataset is only subscribed.)"""
        subject_filter = dataset_events_filter(dataset)
        if self.starting:
            self.conn._spawn(self._listen(subject_filter))
            return
        if self.buffer is None:
            self.buffer = []
        self._following += 1
        self.conn._spawn(self._catch_up(subject_filter, granted_at))

    async def _catch_up(self, subject_filter: str, after: int) -> None:
        rt = self.conn.rt
        try:
            await self._listen(subject_filter)
            async for event in replay(rt.bus, [subject_filter], after=after, limit=rt.settings.ws_max_replay):
                self._missed.append(event)
        except Exception as exc:
            log.warning("following a newly shared dataset failed (%s): the socket resumes", exc)
            self.conn.close(RESYNC, "The gateway missed events: reconnect and resume with since.", "resync")
            return
        finally:
            self._following -= 1
        if self._following == 0 and not self.detached:
            self._release()

    async def _recheck(self, dataset: str) -> None:
        """A share was removed: does this subscriber still read the dataset (another share, their role)?"""
        identity = self.conn.identity
        if self.kind == "user" and dataset not in self.shared:
            return
        try:
            verdict = await self.conn.rt.can_read(identity, "dataset", dataset, fresh=True)
        except StrataError:
            return  # keep what we have; the next change asks again
        if verdict.readable or self.detached:
            return
        if self.kind == "user":
            self.shared.discard(dataset)
            self._forget(dataset_events_filter(dataset))
        elif self.conn.channels.get(self.name) is self:
            del self.conn.channels[self.name]
            self.detach()
            self.conn.control({"type": "unsubscribed", "channel": self.name, "reason": "access_revoked"})


def _grants(data: dict[str, Any], identity: Identity) -> bool:
    grantee_type, grantee = data.get("grantee_type"), data.get("grantee")
    if grantee_type == "user":
        return grantee == identity.user_id
    if grantee_type == "role":
        try:
            return identity.role.at_least(Role(str(grantee)))
        except ValueError:
            return False
    return False
