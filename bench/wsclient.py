"""A reference client of the gateway's WebSocket, ``WS /api/v1/ws`` (docs/realtime.md), used by tests and benchmarks.

It signs in with the first message (or the ``strata_access`` cookie), matches answers to requests by the ``id`` it sets,
and yields the event messages (``{"channel", "seq", "type", "event"}``) of the channels it follows, each once and in
order: an event whose ``seq`` is not above the last one seen on its channel is dropped and counted. When the connection
is lost (close codes 1001, 1006, 1011, 1012, 45xx, or a connection error) it reconnects with backoff, signs in again and
resubscribes every channel with ``since`` = the last ``seq`` seen there. Any other close code ends the session: the
iterator raises :class:`SessionClosed` (4401, 4403, 4408 and 4429 need the caller to change something).

    async with WsClient(url, token=get_access_token) as client:
        await client.subscribe(f"job:{job_id}")
        async for message in client:
            print(message["seq"], message["type"])
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Self

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Origin

Message = dict[str, Any]
#: An access token or API key, or an async callable that fetches a fresh one (called at every sign-in).
TokenSource = str | Callable[[], Awaitable[str]]
ACCESS_COOKIE = "strata_access"


def resumable(code: int) -> bool:
    """Close codes that mean "reconnect and resume": going away, abnormal closure, internal error, restart, 45xx."""
    return code in (1001, 1006, 1011, 1012) or 4500 <= code <= 4599


class WsError(Exception):
    """Base of this client's errors."""


class SessionClosed(WsError):
    """The session ended for good: the server's close ``code`` (an HTTP status when the handshake was refused)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"closed with {code}: {reason}" if reason else f"closed with {code}")
        self.code = code
        self.reason = reason


class RequestError(WsError):
    """The server answered a request with ``error``; ``code`` is its error code (``CHANNEL_NOT_FOUND``, ...)."""

    def __init__(self, code: str, message: str, reply: Message) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reply = reply


class ClientClosed(WsError):
    """:meth:`WsClient.close` was called (the iterator ends quietly on it)."""


class _Lost(Exception):
    """The connection went away under a request (internal: the request is retried on the next connection)."""


class WsClient:
    def __init__(
        self,
        url: str,
        *,
        token: TokenSource | None = None,
        cookie: str | None = None,
        origin: str | None = None,
        reconnect: bool = True,
        backoff_s: tuple[float, float] = (0.05, 5.0),
        request_timeout_s: float = 10.0,
        **connect_kwargs: Any,
    ) -> None:
        """``token`` is sent as the first message; ``cookie`` (an access token) as the ``strata_access`` cookie.
        ``connect_kwargs`` go to :func:`websockets.asyncio.client.connect` (``compression``, ``ping_interval``, ...)."""
        if token is None and cookie is None:
            raise ValueError("a token or a cookie is needed to sign in")
        self.url = url
        self.token = token
        self.reconnect = reconnect
        self.backoff_s = backoff_s
        self.request_timeout_s = request_timeout_s
        headers = {"Cookie": f"{ACCESS_COOKIE}={cookie}"} if cookie else None
        self._connect_kwargs: dict[str, Any] = {
            "origin": Origin(origin) if origin else None,
            "additional_headers": headers,
            "proxy": None,  # loopback and test servers: never through a proxy from the environment
            **connect_kwargs,
        }
        self.welcome: Message | None = None  # the last ``welcome``
        self.last_seq: dict[str, int] = {}  # per channel: the last seq seen (or the ``since`` asked for)
        self.recovered: dict[str, bool] = {}  # per channel: what the last ``subscribed`` said
        self.revoked: set[str] = set()  # channels the server unsubscribed (``access_revoked``)
        self.reconnects = 0
        self.duplicates = 0  # events dropped because their seq was not above the channel's last one
        self.closed: WsError | None = None  # why the session ended for good, once it has
        self._channels: dict[str, int | None] = {}  # followed channel -> ``subscribed.seq`` (resume point if no event)
        self._events: asyncio.Queue[Message | WsError] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._welcomed: asyncio.Future[Message] | None = None
        self._ids = itertools.count(1)
        self._ws: ClientConnection | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    # -- the session ----------------------------------------------------------------------------------------------
    async def connect(self) -> Message:
        """Open the socket and sign in; returns the ``welcome``. Raises :class:`SessionClosed` if refused (the first
        connection is not retried), or the connection error."""
        ws = await connect(self.url, **self._connect_kwargs)
        first: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(ws, first), name="wsclient")
        return await first

    async def _run(self, ws: ClientConnection, first: asyncio.Future[Message]) -> None:
        attempt = 0
        try:
            while True:
                code, reason, was_ready = await self._session(ws, first)
                if self._closing:
                    return
                if first.done() and was_ready:
                    attempt = 0
                if not first.done() or not self.reconnect or not resumable(code):
                    raise SessionClosed(code, reason)
                ws = await self._reopen(attempt)
                attempt += 1
                self.reconnects += 1
        except WsError as exc:
            self._finish(exc, first)
        except Exception as exc:  # the token source failed, say: end the session rather than hang the iterator
            error = WsError(f"the session failed: {exc!r}")
            error.__cause__ = exc
            self._finish(error, first)

    async def _reopen(self, attempt: int) -> ClientConnection:
        while True:
            base, cap = self.backoff_s
            await asyncio.sleep(min(cap, base * 2**attempt) * random.uniform(0.5, 1.0))
            attempt += 1
            try:
                return await connect(self.url, **self._connect_kwargs)
            except InvalidStatus as exc:
                status = exc.response.status_code
                if 400 <= status < 500 and status != 429:  # refused (origin, ...): trying again will not help
                    raise SessionClosed(status, "handshake refused") from exc
            except (OSError, TimeoutError, InvalidHandshake):
                pass

    async def _session(self, ws: ClientConnection, first: asyncio.Future[Message]) -> tuple[int, str, bool]:
        """Sign in, resubscribe, serve until the connection ends: its close code and reason, and whether it got
        ready."""
        self._ws = ws
        self._welcomed = asyncio.get_running_loop().create_future()
        reader = asyncio.create_task(self._read(ws))
        ready = False
        try:
            if self.token is not None:
                await ws.send(json.dumps({"type": "auth", "token": await self._token()}))
            welcome = await asyncio.wait_for(asyncio.shield(self._welcomed), self.request_timeout_s)
            for channel, resume_at in list(self._channels.items()):
                try:
                    await self._ask(ws, self._subscription(channel, self.last_seq.get(channel, resume_at)))
                except RequestError:  # no longer readable: it will not come back
                    self._channels.pop(channel, None)
                    self.revoked.add(channel)
            ready = True
            self._ready.set()
            if not first.done():
                first.set_result(welcome)
        except (_Lost, ConnectionClosed, TimeoutError):
            await ws.close(1011)  # no-op when the server closed it: its code is the one that counts
        except BaseException:
            await ws.close(1011)
            reader.cancel()
            raise
        code, reason = await reader
        self._ready.clear()
        self._ws = None
        return code, reason, ready

    async def _token(self) -> str:
        assert self.token is not None
        return self.token if isinstance(self.token, str) else await self.token()

    async def _read(self, ws: ClientConnection) -> tuple[int, str]:
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                self._dispatch(ws, json.loads(raw))
        await ws.wait_closed()
        self._ready.clear()  # before the waiting requests wake up, so that they wait for the next connection
        code, reason = ws.close_code or 1006, ws.close_reason or ""
        for future in [*self._pending.values(), self._welcomed]:
            if future is not None and not future.done():
                future.set_exception(_Lost(code))
        return code, reason

    def _dispatch(self, ws: ClientConnection, message: Message) -> None:
        if "event" in message and "seq" in message:
            channel, seq = str(message["channel"]), int(message["seq"])
            if channel not in self._channels:
                return  # in flight when we unsubscribed
            if seq <= self.last_seq.get(channel, -1):
                self.duplicates += 1
                return
            self.last_seq[channel] = seq
            self._events.put_nowait(message)
            return
        kind = message.get("type")
        if kind == "welcome":
            self.welcome = message
            if self._welcomed is not None and not self._welcomed.done():
                self._welcomed.set_result(message)
        elif kind == "token_expiring" and not isinstance(self.token, str):
            task = asyncio.create_task(self._reauthenticate(ws))
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)
        elif kind == "subscribed":  # bookkeeping here, before the events that follow it are dispatched
            channel = str(message["channel"])
            self._channels[channel] = message.get("seq")
            self.recovered[channel] = bool(message.get("recovered", True))
            self.revoked.discard(channel)
        elif kind == "unsubscribed":
            self._channels.pop(str(message.get("channel")), None)
            if message.get("reason") == "access_revoked":
                self.revoked.add(str(message.get("channel")))
        future = self._pending.get(message["id"]) if isinstance(message.get("id"), int) else None
        if future is not None and not future.done():
            if kind == "error":
                body = message.get("error")
                error: Message = body if isinstance(body, dict) else message
                future.set_exception(RequestError(str(error.get("code")), str(error.get("message", "")), message))
            else:
                future.set_result(message)

    async def _reauthenticate(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):  # lost meanwhile: the next connection signs in anew
            await ws.send(json.dumps({"type": "auth", "token": await self._token()}))

    def _finish(self, error: WsError, first: asyncio.Future[Message]) -> None:
        self.closed = error
        self._ready.set()  # wake waiting requests: they see ``closed``
        self._events.put_nowait(error)
        if not first.done():
            first.set_exception(error)

    # -- requests -------------------------------------------------------------------------------------------------
    @staticmethod
    def _subscription(channel: str, since: int | None) -> Message:
        message: Message = {"type": "subscribe", "channel": channel}
        if since is not None:
            message["since"] = since
        return message

    async def _ask(self, ws: ClientConnection, message: Message) -> Message:
        request_id = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            try:
                await ws.send(json.dumps({**message, "id": request_id}))
            except ConnectionClosed:
                raise _Lost() from None
            return await asyncio.wait_for(future, self.request_timeout_s)
        finally:
            self._pending.pop(request_id, None)

    async def request(self, message: Message) -> Message:
        """Send ``message`` with a fresh ``id`` and return the answer; raises :class:`RequestError` on ``error``. A
        request cut off by a lost connection is sent again on the next one."""
        while True:
            if self.closed is not None:
                raise self.closed
            await asyncio.wait_for(self._ready.wait(), self.request_timeout_s)
            if self._ws is not None and self.closed is None:
                with contextlib.suppress(_Lost):
                    return await self._ask(self._ws, message)
            await asyncio.sleep(0)

    async def subscribe(self, channel: str, since: int | None = None) -> Message:
        """Follow ``channel``; with ``since``, the events after that seq are replayed first. Returns ``subscribed``."""
        if since is not None:
            self.last_seq[channel] = since
        return await self.request(self._subscription(channel, since))

    async def unsubscribe(self, channel: str) -> Message:
        return await self.request({"type": "unsubscribe", "channel": channel})

    async def ping(self) -> Message:
        return await self.request({"type": "ping"})

    # -- events ---------------------------------------------------------------------------------------------------
    async def receive(self, timeout_s: float | None = None) -> Message:
        """The next event message. Raises :class:`SessionClosed` (or :class:`WsError`) when the session ended,
        :class:`ClientClosed` after :meth:`close`, ``TimeoutError`` after ``timeout_s``."""
        item = await asyncio.wait_for(self._events.get(), timeout_s)
        if isinstance(item, WsError):
            self._events.put_nowait(item)  # every later call ends the same way
            raise item
        return item

    async def __aiter__(self) -> AsyncIterator[Message]:
        """The event messages until the session ends (:class:`SessionClosed` is raised) or :meth:`close`."""
        while True:
            try:
                yield await self.receive()
            except ClientClosed:
                return

    def drop_connection(self) -> None:
        """Abort the TCP connection without a closing handshake, as a network failure would (for tests)."""
        if self._ws is not None:
            self._ws.transport.abort()

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task}, timeout=self.request_timeout_s)
            self._task.cancel()  # still waiting to reconnect, say
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._side_tasks):
            task.cancel()
        if self.closed is None:
            self.closed = ClientClosed("closed by the client")
            self._events.put_nowait(self.closed)

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
