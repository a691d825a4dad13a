"""The event bus: the NATS connection, the CloudEvents envelope, and the JetStream streams.

- :class:`CloudEvent` is the envelope of every event (CloudEvents 1.0, structured JSON mode). Its ``type`` is also the
  NATS subject (``strata.<service>.<entity>.<verb>``); ``data`` is a typed payload from :mod:`strata.common.contracts`.
- :class:`Bus` holds the connection. It connects in the background and keeps reconnecting forever, logs every state
  change, re-declares the streams after each reconnect (a NATS server that lost its store gets them back) and bumps
  ``generation`` so pull consumers re-create their subscriptions (nats.py #504).
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError, NotFoundError
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, PrivateAttr

from . import tracing
from .context import request_id_var
from .db import redact_url, utcnow

log = logging.getLogger(__name__)

EVENTS_STREAM = "STRATA_EVENTS"
WORK_STREAM = "STRATA_WORK"
DLQ_STREAM = "STRATA_DLQ"
SERVICES = ("auth", "datasets", "execution", "schemas", "gateway")
MSG_ID_HEADER = "Nats-Msg-Id"
#: ``STRATA_EVENTS`` republishes each stored event on ``live.<subject>`` with its stream sequence (``Nats-Sequence``).
LIVE_PREFIX = "live"


async def _process_pong(self: NATS) -> None:
    """nats-py 2.16's ``_process_pong`` with one change: a PONG whose ``flush()`` timed out or was cancelled is consumed
    without ``set_result`` on its cancelled future. Upstream raises ``InvalidStateError`` there, which ends the read
    loop: the connection then looks connected but receives nothing (no events, no RPC replies) until the ping timer
    notices, minutes later. A WebSocket closing while its subscription's flush is in flight was enough."""
    if self._pongs:
        future = self._pongs.pop(0)
        if not future.done():
            future.set_result(True)
        self._pongs_received += 1
        self._pings_outstanding = 0


NATS._process_pong = _process_pong  # type: ignore[method-assign]


class EventPayload(BaseModel):
    """Base of every event payload. Subclasses set ``event_type`` (the subject) and ``schema_version``.

    Consumers ignore fields they do not know, so producers may add fields without a new version.
    """

    model_config = ConfigDict(extra="ignore")
    event_type: ClassVar[str] = ""
    schema_version: ClassVar[int] = 1
    #: Fields whose values are appended to the subject, in order: ``("owner_id", "job_id")`` publishes on
    #: ``strata.execution.job.succeeded.<owner>.<job>``, so one entity's events (``strata.execution.job.*.*.<job>``) or
    #: one user's (``strata.execution.job.*.<owner>.*``) are a subject filter, for JetStream and for the WebSocket,
    #: instead of a scan of the stream.
    subject_keys: ClassVar[tuple[str, ...]] = ()

    def subject_tokens(self) -> list[str]:
        tokens = [str(getattr(self, key)) for key in self.subject_keys]
        for token in tokens:
            if not token or any(c in token for c in ".*> \t\r\n"):
                raise ValueError(f"{self.__class__.__name__}: {token!r} cannot be a subject token")
        return tokens


P = TypeVar("P", bound=EventPayload)


class CloudEvent(BaseModel):
    """A CloudEvents 1.0 envelope. ``dataversion`` (an extension attribute) is the payload's contract version."""

    model_config = ConfigDict(extra="ignore")

    specversion: str = "1.0"
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    source: str
    type: str
    subject: str | None = None
    time: AwareDatetime = Field(default_factory=utcnow)
    datacontenttype: str = "application/json"
    dataversion: int = 1
    data: dict[str, Any] = Field(default_factory=dict)
    _key: str = PrivateAttr(default="")

    @classmethod
    def of(
        cls, payload: EventPayload, *, source: str, subject: str | None = None, type: str | None = None
    ) -> CloudEvent:
        event_type = type or payload.event_type
        if not event_type or "{" in event_type:
            raise ValueError(f"{payload.__class__.__name__} needs a concrete event type")
        event = cls(
            source=source,
            type=event_type,
            subject=subject,
            dataversion=payload.schema_version,
            data=payload.model_dump(mode="json"),
        )
        event._key = ".".join(payload.subject_tokens())
        return event

    def payload(self, model: builtins.type[P]) -> P:
        """The data as ``model`` (unknown fields ignored)."""
        return model.model_validate(self.data)

    @property
    def nats_subject(self) -> str:
        return f"{self.type}.{self._key}" if self._key else self.type


def source_of(service: str) -> str:
    return f"/strata/{service}"


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    retention: js_api.RetentionPolicy = js_api.RetentionPolicy.LIMITS
    max_age_s: float = 7 * 24 * 3600
    max_bytes: int = 1 << 30
    duplicate_window_s: float = 120.0
    description: str = ""
    #: Republish every stored message on ``<prefix>.<subject>`` with its stream sequence (the WebSocket's live feed).
    republish_prefix: str | None = None

    def config(self) -> js_api.StreamConfig:
        return js_api.StreamConfig(
            name=self.name,
            description=self.description or None,
            subjects=list(self.subjects),
            retention=self.retention,
            storage=js_api.StorageType.FILE,
            discard=js_api.DiscardPolicy.OLD,
            max_age=self.max_age_s,
            max_bytes=self.max_bytes,
            duplicate_window=self.duplicate_window_s,
            republish=js_api.RePublish(src=">", dest=f"{self.republish_prefix}.>") if self.republish_prefix else None,
        )


def default_streams(
    *, events_max_age_s: float = 7 * 24 * 3600, events_max_bytes: int = 1 << 30
) -> tuple[StreamSpec, ...]:
    """The three streams of the design. A subject belongs to exactly one of them."""
    return (
        StreamSpec(
            EVENTS_STREAM,
            tuple(f"strata.{s}.>" for s in SERVICES),
            max_age_s=events_max_age_s,
            max_bytes=events_max_bytes,
            description="Domain events of every Strata service",
            republish_prefix=LIVE_PREFIX,
        ),
        StreamSpec(
            WORK_STREAM,
            ("strata.work.>",),
            retention=js_api.RetentionPolicy.WORK_QUEUE,
            description="Work queues: each message is taken by one worker",
        ),
        StreamSpec(
            DLQ_STREAM,
            ("strata.dlq.>",),
            max_age_s=30 * 24 * 3600,
            description="Messages that failed every delivery, kept for inspection and replay",
        ),
    )


OnConnect = Callable[[], Awaitable[None]]


@dataclass
class BusState:
    connected: bool = False
    generation: int = 0
    last_error: str | None = None
    on_connect: list[OnConnect] = field(default_factory=list)
    on_disconnect: list[Callable[[], None]] = field(default_factory=list)


class Bus:
    """One NATS connection per process, shared by the outbox relay, consumers and RPC."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        connect_timeout_s: float = 2.0,
        streams: tuple[StreamSpec, ...] | None = None,
    ) -> None:
        self.url = url
        self.name = name
        self.connect_timeout_s = connect_timeout_s
        self.streams = streams if streams is not None else default_streams()
        self.state = BusState()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # -- connection ---------------------------------------------------------------------------------------------
    @property
    def nc(self) -> NATS:
        if self._nc is None or not self._nc.is_connected:
            from .errors import ServiceUnavailable

            raise ServiceUnavailable("The message bus is not connected.")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        self.nc  # noqa: B018  (raises when disconnected)
        assert self._js is not None
        return self._js

    @property
    def is_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def generation(self) -> int:
        return self.state.generation

    def on_disconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (synchronously) when the connection drops."""
        self.state.on_disconnect.append(callback)

    def on_connect(self, callback: OnConnect) -> None:
        """Run ``callback`` after the first connection and after every reconnection."""
        self.state.on_connect.append(callback)

    async def start(self, *, wait_s: float | None = None) -> None:
        """Connect in the background; wait up to ``wait_s`` (default: the connect timeout) for the first connection."""
        self._task = asyncio.create_task(self._connect_forever(), name=f"bus-connect-{self.name}")
        try:
            await asyncio.wait_for(self._connected.wait(), wait_s if wait_s is not None else self.connect_timeout_s + 1)
        except TimeoutError:
            log.warning("NATS at %s not reachable yet; still trying in the background", redact_url(self.url))

    async def wait_connected(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _connect_forever(self) -> None:
        delay = 0.1
        while not self._closing:
            try:
                nc = await nats.connect(
                    servers=[self.url],
                    name=self.name,
                    connect_timeout=max(1, int(self.connect_timeout_s)),
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                )
            except Exception as exc:  # nats raises OSError, NoServersError, TimeoutError...: retry them all
                self.state.last_error = str(exc) or type(exc).__name__
                log.info("NATS connect failed (%s); retrying in %.1fs", self.state.last_error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._nc = nc
            self._js = nc.jetstream()
            log.info("connected to NATS at %s", redact_url(self.url))
            await self._connected_now()
            return

    async def _connected_now(self) -> None:
        self.state.connected = True
        self.state.generation += 1
        try:
            await self.ensure_streams()
        except Exception:
            log.exception("declaring JetStream streams failed")
        for callback in list(self.state.on_connect):
            try:
                await callback()
            except Exception:
                log.exception("on-connect callback %s failed", getattr(callback, "__qualname__", callback))
        self._connected.set()

    async def _on_error(self, exc: Exception) -> None:
        self.state.last_error = str(exc) or type(exc).__name__
        log.warning("NATS error: %s", self.state.last_error)

    async def _on_disconnected(self) -> None:
        if self.state.connected and not self._closing:
            log.warning("disconnected from NATS; reconnecting")
        self.state.connected = False
        for callback in list(self.state.on_disconnect):
            try:
                callback()
            except Exception:
                log.exception("on-disconnect callback failed")
        self._connected.clear()

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS")
        await self._connected_now()

    async def _on_closed(self) -> None:
        self.state.connected = False
        self._connected.clear()
        if not self._closing:
            log.error("NATS connection closed")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._nc is not None and not self._nc.is_closed:
            try:
                await asyncio.wait_for(self._nc.drain(), 5)
            except Exception:  # draining a broken connection: close it instead
                await self._nc.close()

    # -- streams ------------------------------------------------------------------------------------------------
    async def ensure_streams(self) -> None:
        """Declare our streams, idempotently: create what is missing, update what differs."""
        assert self._js is not None
        for spec in self.streams:
            await ensure_stream(self._js, spec)

    # -- publishing ---------------------------------------------------------------------------------------------
    def event_headers(self, event: CloudEvent, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {MSG_ID_HEADER: event.id, "Content-Type": "application/cloudevents+json"}
        tracing.inject(headers)
        rid = request_id_var.get()
        if rid:
            headers["X-Request-ID"] = rid
        if extra:
            headers.update(extra)
        return headers

    async def publish_event(
        self, event: CloudEvent, *, headers: Mapping[str, str] | None = None, timeout_s: float = 5.0
    ) -> js_api.PubAck:
        """Publish to JetStream and wait for the ack; ``Nats-Msg-Id`` makes a retry within the window a no-op."""
        hdrs = dict(headers) if headers else self.event_headers(event)
        return await self.js.publish(
            event.nats_subject, event.model_dump_json().encode(), timeout=timeout_s, headers=hdrs
        )


async def ensure_stream(js: JetStreamContext, spec: StreamSpec) -> None:
    config = spec.config()
    try:
        await js.stream_info(spec.name)
    except NotFoundError:
        try:
            await js.add_stream(config)
            log.info("created stream %s", spec.name)
        except BadRequestError:  # another replica created it first
            await js.update_stream(config)
        return
    try:
        await js.update_stream(config)
    except BadRequestError as exc:  # e.g. retention cannot change on a live stream: keep it, say so
        log.warning("stream %s kept as it is: %s", spec.name, exc.description)
