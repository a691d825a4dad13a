"""The gateway's live event feed: NATS subscriptions for what this replica's sockets need, and replays from JetStream.

``STRATA_EVENTS`` republishes every stored event on ``live.<subject>`` with its stream sequence (``Nats-Sequence``), so
a core subscription gives each event's ``seq`` without a JetStream consumer per socket. The :class:`Hub` keeps one
subscription per subject filter that some socket needs (reference-counted across sockets), parses each event once and
hands it to every interested :class:`Sink` in stream order:

- Messages of different subscriptions reach nats-py's per-subscription tasks out of order when they come in one read;
  the hub collects what arrives and routes it sorted by ``seq`` on the next turn of the loop, so each sink sees
  increasing sequences (sinks also drop anything at or below what they last took: a message that matched two of a
  sink's filters arrives twice).
- After the NATS connection comes back (messages published meanwhile were not delivered), the hub reads what it missed
  from JetStream, from the last sequence it routed, and routes it the same way; if that is too much, its sinks are told
  to resynchronise (the sockets are closed with a "reconnect and resume" code).

:func:`replay` reads one channel's events after a sequence from JetStream (an ephemeral consumer filtered on the
channel's subjects), for ``subscribe`` with ``since``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from nats import errors as nats_errors
from nats.js import api as js_api
from nats.js import errors as js_errors

from strata.common.events import EVENTS_STREAM, LIVE_PREFIX, Bus

log = logging.getLogger(__name__)

LIVE_HEAD = LIVE_PREFIX + "."
#: A replay consumer the client has not read from for this long is removed by the server (a replay waits for a
#: slow client's queue to drain between batches).
REPLAY_IDLE_S = 300.0
#: The subjects a hub's catch-up after a reconnect reads (every channel's events live under them).
CATCH_UP_SUBJECTS = ("strata.execution.job.>", "strata.datasets.dataset.>")


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` is one token, a final ``>`` one or more."""
    want, have = pattern.split("."), subject.split(".")
    for i, part in enumerate(want):
        if part == ">":
            return len(have) > i
        if i >= len(have) or (part != "*" and part != have[i]):
            return False
    return len(want) == len(have)


@dataclass(slots=True)
class LiveEvent:
    """One stored event, parsed once for every socket it goes to."""

    seq: int
    subject: str
    type: str
    raw: str  # the CloudEvent JSON, spliced as it is into every frame
    data: dict[str, Any]
    time: float | None  # the CloudEvent's time (epoch seconds): fan-out latency is measured from it
    progress: bool
    frames: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, seq: int, subject: str, payload: bytes) -> LiveEvent | None:
        try:
            raw = payload.decode()
            body = json.loads(raw)
            event_type = str(body["type"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            log.warning("skipping event %s on %s: not a CloudEvent", seq, subject)
            return None
        try:
            when: float | None = datetime.fromisoformat(body["time"]).timestamp()
        except (KeyError, TypeError, ValueError):
            when = None
        data = body.get("data")
        return cls(
            seq=seq,
            subject=subject,
            type=event_type,
            raw=raw,
            data=data if isinstance(data, dict) else {},
            time=when,
            progress=event_type.endswith(".progress"),
        )

    def frame(self, channel: str) -> str:
        """``{"channel", "seq", "type", "event"}`` as text, made once per channel however many sockets get it."""
        text = self.frames.get(channel)
        if text is None:
            text = (
                f'{{"channel":{json.dumps(channel)},"seq":{self.seq},"type":{json.dumps(self.type)},'
                f'"event":{self.raw}}}'
            )
            self.frames[channel] = text
        return text


class Sink(Protocol):
    def offer(self, event: LiveEvent, via: str) -> None:
        """Take ``event``, which arrived through the subscription to ``via``. Must not block."""

    def resync(self) -> None:
        """Events may have been missed and cannot be recovered here: make the client resume."""


class _Interest:
    __slots__ = ("sinks", "sub", "task")

    def __init__(self) -> None:
        self.sinks: set[Sink] = set()
        self.sub: Any = None
        self.task: asyncio.Task[None] | None = None  # subscribing; shared by every sink that waits for it


class Hub:
    def __init__(self, bus: Bus, *, max_catch_up: int = 100_000) -> None:
        self.bus = bus
        self.max_catch_up = max_catch_up
        self._interests: dict[str, _Interest] = {}
        self._pending: list[tuple[int, str, bytes, str]] = []
        self._flush_scheduled = False
        self.last_seq = 0  # the highest sequence routed, where a catch-up starts
        self._holding = False  # from a disconnect until the catch-up has run: live messages wait in _pending
        self._catch_up_task: asyncio.Task[None] | None = None
        bus.on_disconnect(self._on_disconnect)
        bus.on_connect(self._on_connect)

    # -- interests ------------------------------------------------------------------------------------------------
    @property
    def subscriptions(self) -> int:
        return len(self._interests)

    def note_stream_end(self, seq: int) -> None:
        """Before anything was routed, a catch-up would start at the stream's beginning: start it here instead."""
        if self.last_seq == 0:
            self.last_seq = seq

    async def add(self, subject_filter: str, sink: Sink) -> None:
        """Route the events matching ``subject_filter`` to ``sink`` from now on. When this returns, the NATS server has
        the subscription: anything stored afterwards will arrive. The subscribing itself runs in a task of its own that
        a cancelled caller does not cancel (nats-py's flush must never be cut short: see events._process_pong)."""
        interest = self._interests.get(subject_filter)
        if interest is None:
            interest = self._interests[subject_filter] = _Interest()
            interest.task = asyncio.get_running_loop().create_task(self._subscribe(subject_filter, interest))
        interest.sinks.add(sink)
        assert interest.task is not None
        try:
            await asyncio.shield(interest.task)
        except BaseException:
            interest.sinks.discard(sink)
            raise

    async def _subscribe(self, subject_filter: str, interest: _Interest) -> None:
        pending = self._pending
        schedule = self._schedule_flush

        async def on_message(msg: Any) -> None:
            headers = msg.headers or {}
            try:
                seq = int(headers["Nats-Sequence"])
            except (KeyError, ValueError):
                return  # not a republished message
            pending.append(
                (seq, headers.get("Nats-Subject") or msg.subject[len(LIVE_HEAD) :], msg.data, subject_filter)
            )
            schedule()

        try:
            nc = self.bus.nc
            interest.sub = await nc.subscribe(
                LIVE_HEAD + subject_filter,
                cb=on_message,
                pending_msgs_limit=1_000_000,
                pending_bytes_limit=512 * 1024 * 1024,
            )
            await nc.flush(timeout=30)  # the server has processed the SUB
        except BaseException:
            if self._interests.get(subject_filter) is interest:
                del self._interests[subject_filter]
            if interest.sub is not None:
                await self._unsubscribe(interest.sub)
            raise
        if not interest.sinks:  # everyone left while it was being made
            self._drop(subject_filter, interest)

    def remove(self, subject_filter: str, sink: Sink) -> None:
        interest = self._interests.get(subject_filter)
        if interest is None:
            return
        interest.sinks.discard(sink)
        if not interest.sinks and interest.task is not None and interest.task.done():
            self._drop(subject_filter, interest)

    def _drop(self, subject_filter: str, interest: _Interest) -> None:
        if self._interests.get(subject_filter) is interest:
            del self._interests[subject_filter]
        if interest.sub is not None:
            task = asyncio.get_running_loop().create_task(self._unsubscribe(interest.sub))
            task.add_done_callback(_log_failure)
            interest.sub = None

    @staticmethod
    async def _unsubscribe(sub: Any) -> None:
        with contextlib.suppress(Exception):  # the connection is gone: so is the subscription
            await sub.unsubscribe()

    # -- routing --------------------------------------------------------------------------------------------------
    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and not self._holding:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Route what arrived since the last turn, in stream order (see the module's docstring)."""
        self._flush_scheduled = False
        if self._holding:
            return
        pending = sorted(self._pending, key=lambda item: item[0])
        self._pending.clear()
        parsed: dict[int, LiveEvent | None] = {}
        for seq, subject, payload, via in pending:
            interest = self._interests.get(via)
            if interest is None:
                continue
            if seq not in parsed:
                parsed[seq] = LiveEvent.parse(seq, subject, payload)
            event = parsed[seq]
            if event is None:
                continue
            self._offer(interest, event, via)

    def _offer(self, interest: _Interest, event: LiveEvent, via: str) -> None:
        for sink in list(interest.sinks):
            try:
                sink.offer(event, via)
            except Exception:
                log.exception("a live-event sink failed")
        if event.seq > self.last_seq:
            self.last_seq = event.seq

    # -- reconnects -----------------------------------------------------------------------------------------------
    def _on_disconnect(self) -> None:
        if self._interests:
            self._holding = True  # nats-py re-subscribes before on_connect runs: hold what comes until caught up

    async def _on_connect(self) -> None:
        if not self._holding:
            return  # the first connection, or nobody was listening: nothing can have been missed
        if self._catch_up_task is None or self._catch_up_task.done():
            self._catch_up_task = asyncio.get_running_loop().create_task(self.catch_up(), name="live-catch-up")

    async def catch_up(self) -> None:
        """Route what was stored after ``last_seq`` while the connection was down (core subscriptions lose it), then
        what came live meanwhile; the sinks drop what they already have."""
        self._holding = True
        start = self.last_seq + 1
        routed = 0
        try:
            async for event in replay(self.bus, CATCH_UP_SUBJECTS, after=self.last_seq, limit=self.max_catch_up):
                for subject_filter, interest in list(self._interests.items()):
                    if subject_matches(subject_filter, event.subject):
                        self._offer(interest, event, subject_filter)
                routed += 1
            log.info("caught up %s events from %s after a NATS reconnect", routed, start)
        except ReplayTooLong:
            log.warning("too many events missed since %s: every socket resumes by itself", start)
            self._resync_all()
        except Exception:
            log.exception("catching up from %s failed: every socket resumes by itself", start)
            self._resync_all()
        finally:
            self._holding = False
            self._flush()

    def _resync_all(self) -> None:
        sinks = {sink for interest in self._interests.values() for sink in interest.sinks}
        for sink in sinks:
            sink.resync()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("live feed task failed: %s", task.exception())


class ReplayTooLong(Exception):
    """More events than allowed wait to be replayed."""


@dataclass(frozen=True)
class StreamBounds:
    first_seq: int
    last_seq: int


async def stream_bounds(bus: Bus) -> StreamBounds:
    info = await bus.js.stream_info(EVENTS_STREAM)
    return StreamBounds(first_seq=info.state.first_seq, last_seq=info.state.last_seq)


async def replay(
    bus: Bus, subject_filters: Sequence[str], *, after: int, limit: int, batch: int = 1000
) -> AsyncIterator[LiveEvent]:
    """The stored events matching any of ``subject_filters`` with a sequence above ``after``, in order, read through
    an ephemeral consumer (in memory, no acks) that the server removes when it goes idle. Raises
    :class:`ReplayTooLong` before yielding anything when more than ``limit`` match.

    A consumer that vanished (a client slower than its inactivity threshold, a server restart) is made again from the
    last sequence yielded; a read that keeps timing out raises rather than end the replay short."""
    last = after
    checked = False
    failures = 0
    while True:
        js = bus.js
        config = js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=last + 1,
            ack_policy=js_api.AckPolicy.NONE,
            filter_subjects=list(subject_filters),
            inactive_threshold=REPLAY_IDLE_S,
            mem_storage=True,
            num_replicas=1,
        )
        sub = await js.pull_subscribe("", stream=EVENTS_STREAM, config=config)
        try:
            info = await sub.consumer_info()
            remaining = info.num_pending or 0
            if not checked and remaining > limit:
                raise ReplayTooLong(remaining)
            checked = True
            while remaining > 0:
                try:
                    msgs = await sub.fetch(min(batch, remaining), timeout=2.0)
                except TimeoutError:
                    failures += 1
                    if failures >= 3:
                        raise
                    continue
                for msg in msgs:
                    event = LiveEvent.parse(msg.metadata.sequence.stream, msg.subject, msg.data)
                    last = msg.metadata.sequence.stream
                    if event is not None:
                        yield event
                remaining = msgs[-1].metadata.num_pending if msgs else 0
            return
        except (js_errors.NotFoundError, js_errors.ServiceUnavailableError, nats_errors.NoRespondersError):
            failures += 1
            if failures >= 3:
                raise
            log.info("replay consumer gone after seq %s; making it again", last)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await js.delete_consumer(EVENTS_STREAM, config.name or "")
