"""Durable pull consumers with explicit ack, bounded redelivery with backoff, a dead-letter stream, and idempotency.

A handler gets the event and a :class:`Delivery`. What it does decides the message's fate:

- returns: ack.
- raises :class:`Retry`: nak with the given delay (or the next backoff step).
- raises :class:`Reject`, or the message is not a valid event: straight to the dead-letter stream, then ``term``.
- raises anything else: logged, nak with backoff; after ``max_deliver`` attempts, dead-letter and ``term``.

While a handler runs, the message is kept alive with ``in_progress`` so a slow handler is not redelivered to another
replica. Duplicates (a redelivery after a lost ack, an event published twice) are handled once:
:func:`db_handler` records the event id in the service's ``processed_events`` table in the same transaction as the
handler's changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from nats.js import api as js_api
from nats.js.errors import BadRequestError, NotFoundError
from opentelemetry import trace
from pydantic import ValidationError
from sqlalchemy import String
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from . import tracing
from .db import Database, UTCDateTime, utcnow
from .events import DLQ_STREAM, MSG_ID_HEADER, Bus, CloudEvent

log = logging.getLogger(__name__)


class Retry(Exception):
    """Ask for a redelivery, after ``delay_s`` seconds (``None``: the consumer's backoff)."""

    def __init__(self, reason: str = "retry", *, delay_s: float | None = None) -> None:
        super().__init__(reason)
        self.delay_s = delay_s


class Reject(Exception):
    """The message can never succeed: dead-letter it now."""


@dataclass(frozen=True)
class Delivery:
    subject: str
    stream_seq: int
    num_delivered: int
    headers: dict[str, str]


Handler = Callable[[CloudEvent, Delivery], Awaitable[None]]


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable consumer. ``name`` is the durable name (unique per stream); ``service`` prefixes it."""

    name: str
    subjects: tuple[str, ...]
    stream: str = "STRATA_EVENTS"
    max_deliver: int = 5
    backoff_s: tuple[float, ...] = (1.0, 5.0, 15.0, 60.0)
    ack_wait_s: float = 30.0
    batch: int = 16
    concurrency: int = 1
    max_ack_pending: int = 1000
    deliver_new_only: bool = False
    deliver_since_s: float | None = None
    inactive_threshold_s: float | None = None
    description: str = ""

    def delay_for(self, num_delivered: int) -> float:
        return self.backoff_s[min(max(num_delivered, 1), len(self.backoff_s)) - 1]

    def config(self) -> js_api.ConsumerConfig:
        subjects = list(self.subjects)
        policy = js_api.DeliverPolicy.NEW if self.deliver_new_only else js_api.DeliverPolicy.ALL
        start_time = None
        if self.deliver_since_s is not None:
            policy = js_api.DeliverPolicy.BY_START_TIME
            start_time = utcnow() - timedelta(seconds=self.deliver_since_s)
        return js_api.ConsumerConfig(
            durable_name=self.name,
            description=self.description or None,
            deliver_policy=policy,
            opt_start_time=start_time,
            inactive_threshold=self.inactive_threshold_s,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            # One more than ours: the last attempt is ours to dead-letter, not the server's to drop silently.
            max_deliver=self.max_deliver + 1,
            max_ack_pending=self.max_ack_pending,
            filter_subject=subjects[0] if len(subjects) == 1 else None,
            filter_subjects=subjects if len(subjects) > 1 else None,
        )


# -- idempotency --------------------------------------------------------------------------------------------------
class ProcessedEventMixin:
    """The ``processed_events`` table: (consumer, event id) pairs already handled. Mix into the service's base."""

    __tablename__ = "processed_events"

    consumer: Mapped[str] = mapped_column(String(128), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    processed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


DbHandler = Callable[[CloudEvent, Delivery, AsyncSession], Awaitable[None]]


def db_handler(*, db: Database, model: type[ProcessedEventMixin], consumer: str, handler: DbHandler) -> Handler:
    """Wrap ``handler`` so it runs at most once per event id, in one transaction with the record that says so."""

    async def wrapped(event: CloudEvent, delivery: Delivery) -> None:
        try:
            async with db.session() as session:
                if await session.get(model, (consumer, event.id)) is not None:
                    log.info("event %s already handled by %s; skipping", event.id, consumer)
                    return
                record = model()
                record.consumer, record.event_id, record.processed_at = consumer, event.id, utcnow()
                session.add(record)
                await session.flush()
                await handler(event, delivery, session)
        except IntegrityError:
            # A concurrent delivery of the same event committed first, or the handler broke a constraint of its own:
            # only the first is a duplicate to skip; the second must reach the consumer (retry, dead-letter).
            async with db.session() as session:
                handled = await session.get(model, (consumer, event.id)) is not None
            if not handled:
                raise
            log.info("event %s handled concurrently by %s; skipping", event.id, consumer)

    return wrapped


class MemoryDedup:
    """An in-process LRU of handled event ids, for consumers that own no database (the gateway)."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._seen: OrderedDict[str, None] = OrderedDict()

    def wrap(self, handler: Handler) -> Handler:
        async def wrapped(event: CloudEvent, delivery: Delivery) -> None:
            if event.id in self._seen:
                return
            await handler(event, delivery)
            self._seen[event.id] = None
            if len(self._seen) > self.size:
                self._seen.popitem(last=False)

        return wrapped


# -- the consumer -------------------------------------------------------------------------------------------------
@dataclass
class ConsumerStats:
    handled: int = 0
    retried: int = 0
    dead_lettered: int = 0
    last_error: str | None = None
    outcomes: dict[str, int] = field(default_factory=dict)


class EventConsumer:
    """Runs ``spec.concurrency`` fetch loops on one durable consumer and applies the handler's verdicts."""

    def __init__(
        self,
        *,
        bus: Bus,
        spec: ConsumerSpec,
        handler: Handler,
        service: str,
        on_outcome: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.bus = bus
        self.spec = spec
        self.handler = handler
        self.service = service
        self.on_outcome = on_outcome
        self.stats = ConsumerStats()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._tracer = tracing.tracer("strata.consumer")

    @property
    def dlq_subject(self) -> str:
        return f"strata.dlq.{self.service}.{self.spec.name}"

    async def declare(self) -> None:
        """Create or update the durable consumer (idempotent)."""
        js = self.bus.js
        config = self.spec.config()
        try:
            await js.consumer_info(self.spec.stream, self.spec.name)
        except NotFoundError:
            await js.add_consumer(self.spec.stream, config)
            return
        try:
            await js.add_consumer(self.spec.stream, config)  # the same durable name: an update
        except BadRequestError as exc:  # a setting that cannot change on a live consumer (its start point)
            log.debug("consumer %s kept as it is: %s", self.spec.name, exc.description)

    def start(self) -> None:
        for i in range(self.spec.concurrency):
            self._tasks.append(asyncio.create_task(self._loop(), name=f"consumer-{self.spec.name}-{i}"))

    async def stop(self, timeout_s: float = 3.0) -> None:
        """Stop fetching. Bounded: nats-py's ``fetch`` can swallow a cancellation and wait out its own timeout, so
        a loop that does not finish in ``timeout_s`` is left to end with the connection."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout_s)
            if pending:
                log.warning("consumer %s: %d fetch loops still ending; moving on", self.spec.name, len(pending))
        self._tasks.clear()

    async def _loop(self) -> None:
        sub = None
        generation = -1
        while not self._stopping:
            try:
                if not self.bus.is_connected:
                    await self.bus.wait_connected(1.0)
                    continue
                if sub is None or generation != self.bus.generation:
                    if sub is not None:
                        await _quiet_unsubscribe(sub)
                    generation = self.bus.generation
                    await self.declare()
                    sub = await self.bus.js.pull_subscribe_bind(durable=self.spec.name, stream=self.spec.stream)
                try:
                    msgs = await sub.fetch(self.spec.batch, timeout=2.0)
                except TimeoutError:  # nothing there: fetch raises rather than returning []
                    continue
                # Messages waiting their turn in the batch are ours too: keep them alive, or they are redelivered.
                waiting = list(msgs)
                keepalive = asyncio.create_task(self._keepalive(waiting))
                try:
                    while waiting:
                        await self._handle(waiting.pop(0))
                finally:
                    keepalive.cancel()
            except asyncio.CancelledError:
                if sub is not None:
                    await _quiet_unsubscribe(sub)
                raise
            except Exception as exc:
                self.stats.last_error = str(exc) or type(exc).__name__
                log.warning("consumer %s: %s; re-subscribing", self.spec.name, self.stats.last_error)
                if sub is not None:
                    await _quiet_unsubscribe(sub)
                sub = None
                await asyncio.sleep(1.0)

    async def _handle(self, msg: Any) -> None:
        meta = msg.metadata
        headers = dict(msg.headers or {})
        delivery = Delivery(
            subject=msg.subject,
            stream_seq=meta.sequence.stream,
            num_delivered=meta.num_delivered,
            headers=headers,
        )
        start = time.perf_counter()
        outcome = "ack"
        with self._tracer.start_as_current_span(
            f"consume {msg.subject}", context=tracing.extract(headers), kind=trace.SpanKind.CONSUMER
        ) as span:
            try:
                event = CloudEvent.model_validate_json(msg.data)
            except ValidationError as exc:
                await self._dead_letter(msg, delivery, f"not a valid event: {exc.error_count()} errors")
                self._record("dead_letter", start)
                return
            span.set_attribute("messaging.message.id", event.id)
            keepalive = asyncio.create_task(self._keepalive([msg]))
            try:
                await self.handler(event, delivery)
            except Reject as exc:
                outcome = "dead_letter"
                await self._dead_letter(msg, delivery, f"rejected: {exc}")
            except Retry as exc:
                outcome = await self._retry(msg, delivery, str(exc), exc.delay_s)
            except Exception as exc:
                log.exception(
                    "consumer %s failed on event %s (attempt %d)", self.spec.name, event.id, delivery.num_delivered
                )
                outcome = await self._retry(msg, delivery, f"{type(exc).__name__}: {exc}", None)
            else:
                await msg.ack()
                self.stats.handled += 1
                log.debug("consumer %s handled %s %s", self.spec.name, event.type, event.id)
            finally:
                keepalive.cancel()
                self._record(outcome, start)

    def _record(self, outcome: str, start: float) -> None:
        self.stats.outcomes[outcome] = self.stats.outcomes.get(outcome, 0) + 1
        if self.on_outcome is not None:
            self.on_outcome(self.spec.name, outcome, time.perf_counter() - start)

    async def _keepalive(self, msgs: list[Any]) -> None:
        interval = max(self.spec.ack_wait_s / 3, 0.5)
        while True:
            await asyncio.sleep(interval)
            try:
                for msg in list(msgs):
                    await msg.in_progress()
            except Exception:  # the connection dropped; the redelivery will sort it out
                return

    async def _retry(self, msg: Any, delivery: Delivery, reason: str, delay_s: float | None) -> str:
        self.stats.last_error = reason
        if delivery.num_delivered >= self.spec.max_deliver:
            await self._dead_letter(msg, delivery, f"gave up after {delivery.num_delivered} attempts: {reason}")
            return "dead_letter"
        delay = delay_s if delay_s is not None else self.spec.delay_for(delivery.num_delivered)
        await msg.nak(delay=delay)
        self.stats.retried += 1
        return "retry"

    async def _dead_letter(self, msg: Any, delivery: Delivery, reason: str) -> None:
        headers = {
            k: v for k, v in delivery.headers.items() if k.lower() in ("traceparent", "tracestate", "x-request-id")
        }
        original_id = delivery.headers.get(MSG_ID_HEADER, f"seq-{delivery.stream_seq}")
        headers.update(
            {
                MSG_ID_HEADER: f"{self.spec.name}:{original_id}",
                "Strata-Original-Subject": delivery.subject,
                "Strata-Original-Stream": self.spec.stream,
                "Strata-Original-Seq": str(delivery.stream_seq),
                "Strata-Consumer": self.spec.name,
                "Strata-Deliveries": str(delivery.num_delivered),
                "Strata-Error": reason[:1000],
            }
        )
        try:
            await self.bus.js.publish(self.dlq_subject, msg.data, headers=headers, stream=DLQ_STREAM)
        except Exception:
            # Not dead-lettered: leave it unacked so it comes back rather than being lost.
            log.exception("could not dead-letter message %s of %s", delivery.stream_seq, self.spec.name)
            await msg.nak(delay=self.spec.backoff_s[-1])
            return
        await msg.term()
        self.stats.dead_lettered += 1
        log.error("consumer %s dead-lettered message %s: %s", self.spec.name, delivery.stream_seq, reason)


async def _quiet_unsubscribe(sub: Any) -> None:
    try:
        await sub.unsubscribe()
    except Exception:  # already gone with its connection
        log.debug("unsubscribe failed", exc_info=True)
