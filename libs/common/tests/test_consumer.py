"""Durable consumers on a real JetStream: redelivery with backoff, the dead-letter stream, verdicts, idempotency."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from nats.js.api import RawStreamMsg
from sqlalchemy import Integer, String, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from strata.common.consumer import (
    ConsumerSpec,
    Delivery,
    EventConsumer,
    Handler,
    MemoryDedup,
    ProcessedEventMixin,
    Reject,
    Retry,
    db_handler,
)
from strata.common.db import Database, new_metadata
from strata.common.events import DLQ_STREAM, EVENTS_STREAM, MSG_ID_HEADER, Bus, CloudEvent
from strata.common.procs import NatsServer
from strata.common.testing import eventually, stream_messages

SERVICE = "test"


class Base(DeclarativeBase):
    metadata = new_metadata()


class ProcessedEvent(ProcessedEventMixin, Base):
    pass


class Effect(Base):
    """What the handlers under test do: one row per handled event."""

    __tablename__ = "effects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64))


# -- helpers ------------------------------------------------------------------------------------------------------
@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    async with database.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield database
    await database.dispose()


def new_spec(**overrides: Any) -> ConsumerSpec:
    """A consumer of its own subjects (the session's NATS server is shared), with short timings."""
    tag = uuid.uuid4().hex[:12]
    spec = ConsumerSpec(
        name=f"test_{tag}",
        subjects=(f"strata.datasets.test{tag}.>",),
        max_deliver=3,
        backoff_s=(0.1, 0.2),
        ack_wait_s=2.0,
        batch=4,
    )
    return replace(spec, **overrides)


def subject_of(spec: ConsumerSpec, verb: str = "created") -> str:
    return spec.subjects[0].replace(">", verb)


def event_on(subject: str, **data: Any) -> CloudEvent:
    return CloudEvent(source="/strata/test", type=subject, data=data)


@dataclass
class Calls:
    """What a handler saw: the delivery count and the time of each call."""

    deliveries: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)

    def record(self, event: CloudEvent, delivery: Delivery) -> None:
        self.deliveries.append(delivery.num_delivered)
        self.times.append(time.monotonic())
        self.event_ids.append(event.id)

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


def recording(calls: Calls, then: Callable[[CloudEvent, Delivery], Awaitable[None]] | None = None) -> Handler:
    async def handler(event: CloudEvent, delivery: Delivery) -> None:
        calls.record(event, delivery)
        if then is not None:
            await then(event, delivery)

    return handler


@asynccontextmanager
async def running(bus: Bus, spec: ConsumerSpec, handler: Handler) -> AsyncIterator[EventConsumer]:
    consumer = EventConsumer(bus=bus, spec=spec, handler=handler, service=SERVICE)
    consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def dead_letters(bus: Bus, consumer: EventConsumer, n: int = 1) -> list[RawStreamMsg]:
    """Wait for ``n`` messages in the consumer's dead-letter subject and return them."""

    async def check() -> list[RawStreamMsg] | None:
        msgs = await stream_messages(bus.js, consumer.dlq_subject, DLQ_STREAM)
        return msgs if len(msgs) >= n else None

    found: list[RawStreamMsg] = await eventually(check, timeout_s=10)
    return found


def headers_of(msg: RawStreamMsg) -> dict[str, str]:
    assert msg.headers is not None
    return dict(msg.headers)


async def publish_copy(bus: Bus, event: CloudEvent, copy: int) -> None:
    """Publish ``event`` under a message id of its own, so JetStream keeps it as a separate message.
    (JetStream's duplicate window is per stream: the id must be unique across the session.)"""
    headers = {**bus.event_headers(event), MSG_ID_HEADER: f"{event.id}-copy-{copy}"}
    ack = await bus.publish_event(event, headers=headers)
    assert not ack.duplicate


async def count(db: Database, model: type[Any]) -> int:
    async with db.session() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


# -- redelivery and the dead-letter stream -------------------------------------------------------------------------
async def test_a_failing_handler_is_retried_with_backoff_then_dead_lettered(bus: Bus) -> None:
    spec = new_spec(max_deliver=3, backoff_s=(0.2, 0.4), ack_wait_s=1.0)
    calls = Calls()

    async def fail(event: CloudEvent, delivery: Delivery) -> None:
        raise ValueError("the database said no")

    event = event_on(subject_of(spec))
    async with running(bus, spec, recording(calls, fail)) as consumer:
        await bus.publish_event(event)
        [dead] = await dead_letters(bus, consumer)

        assert calls.deliveries == [1, 2, 3]
        assert calls.event_ids == [event.id] * 3
        gap1, gap2 = calls.gaps()
        assert gap1 >= 0.2
        assert gap2 >= 0.4

        headers = headers_of(dead)
        assert headers["Strata-Deliveries"] == "3"
        assert "gave up after 3 attempts" in headers["Strata-Error"]
        assert "ValueError: the database said no" in headers["Strata-Error"]
        assert headers["Strata-Original-Subject"] == event.type
        assert headers["Strata-Original-Stream"] == EVENTS_STREAM
        assert headers["Strata-Consumer"] == spec.name
        assert headers[MSG_ID_HEADER] == f"{spec.name}:{event.id}"
        assert dead.subject == f"strata.dlq.{SERVICE}.{spec.name}"
        assert CloudEvent.model_validate_json(dead.data or b"") == event

        # Terminated: the server holds nothing for redelivery, and nothing comes back after the ack wait.
        info = await bus.js.consumer_info(spec.stream, spec.name)
        assert info.num_ack_pending == 0
        assert info.num_pending == 0
        await asyncio.sleep(spec.ack_wait_s + 0.5)
        assert calls.deliveries == [1, 2, 3]
        info = await bus.js.consumer_info(spec.stream, spec.name)
        assert info.delivered is not None
        assert info.delivered.consumer_seq == 3
        assert consumer.stats.retried == 2
        assert consumer.stats.dead_lettered == 1
        assert consumer.stats.handled == 0
        assert len(await stream_messages(bus.js, consumer.dlq_subject, DLQ_STREAM)) == 1


async def test_reject_dead_letters_at_once(bus: Bus) -> None:
    spec = new_spec(max_deliver=5)
    calls = Calls()

    async def reject(event: CloudEvent, delivery: Delivery) -> None:
        raise Reject("dataset 42 does not exist")

    event = event_on(subject_of(spec))
    async with running(bus, spec, recording(calls, reject)) as consumer:
        await bus.publish_event(event)
        [dead] = await dead_letters(bus, consumer)
        headers = headers_of(dead)
        assert headers["Strata-Deliveries"] == "1"
        assert headers["Strata-Error"] == "rejected: dataset 42 does not exist"
        assert headers["Strata-Original-Subject"] == event.type
        assert calls.deliveries == [1]
        info = await bus.js.consumer_info(spec.stream, spec.name)
        assert info.num_ack_pending == 0
        assert consumer.stats.dead_lettered == 1
        assert consumer.stats.retried == 0


async def test_retry_with_a_delay_is_honoured(bus: Bus) -> None:
    spec = new_spec(backoff_s=(0.05,))
    calls = Calls()

    async def not_yet(event: CloudEvent, delivery: Delivery) -> None:
        if delivery.num_delivered == 1:
            raise Retry("the dataset is still uploading", delay_s=0.8)

    async with running(bus, spec, recording(calls, not_yet)) as consumer:
        await bus.publish_event(event_on(subject_of(spec)))
        await eventually(lambda: consumer.stats.handled == 1)
        assert calls.deliveries == [1, 2]
        [gap] = calls.gaps()
        assert gap >= 0.8  # the handler's delay, not the consumer's 0.05 s backoff
        assert consumer.stats.retried == 1
        assert consumer.stats.dead_lettered == 0
        assert await stream_messages(bus.js, consumer.dlq_subject, DLQ_STREAM) == []


async def test_retry_counts_towards_max_deliver(bus: Bus) -> None:
    spec = new_spec(max_deliver=2, backoff_s=(0.05,))
    calls = Calls()

    async def never_ready(event: CloudEvent, delivery: Delivery) -> None:
        raise Retry("still not ready", delay_s=0.05)

    async with running(bus, spec, recording(calls, never_ready)) as consumer:
        await bus.publish_event(event_on(subject_of(spec)))
        [dead] = await dead_letters(bus, consumer)
        assert calls.deliveries == [1, 2]
        assert headers_of(dead)["Strata-Deliveries"] == "2"
        assert "still not ready" in headers_of(dead)["Strata-Error"]


async def test_a_message_that_is_not_a_cloudevent_is_dead_lettered(bus: Bus) -> None:
    spec = new_spec()
    calls = Calls()
    outcomes: list[tuple[str, str]] = []
    consumer = EventConsumer(
        bus=bus,
        spec=spec,
        handler=recording(calls),
        service=SERVICE,
        on_outcome=lambda name, outcome, _s: outcomes.append((name, outcome)),
    )
    consumer.start()
    try:
        subject = subject_of(spec)
        await bus.js.publish(subject, b"{this is not json")
        await bus.js.publish(subject, b'{"specversion": "1.0", "data": {}}')  # JSON, but no source nor type
        good = event_on(subject)
        await bus.publish_event(good)

        dead = await dead_letters(bus, consumer, n=2)
        await eventually(lambda: consumer.stats.handled == 1)
        assert [m.data for m in dead] == [b"{this is not json", b'{"specversion": "1.0", "data": {}}']
        for msg in dead:
            headers = headers_of(msg)
            assert headers["Strata-Error"].startswith("not a valid event")
            assert headers["Strata-Deliveries"] == "1"
            assert headers["Strata-Original-Subject"] == subject
        assert calls.event_ids == [good.id]  # the handler never saw the invalid ones
        assert consumer.stats.dead_lettered == 2
        # Every message is counted in the metrics, invalid ones included.
        assert sorted(outcomes) == [(spec.name, "ack"), (spec.name, "dead_letter"), (spec.name, "dead_letter")]
    finally:
        await consumer.stop()


# -- duplicates ---------------------------------------------------------------------------------------------------
def effect_handler(calls: Calls) -> Callable[[CloudEvent, Delivery, AsyncSession], Awaitable[None]]:
    async def handle(event: CloudEvent, delivery: Delivery, session: AsyncSession) -> None:
        calls.record(event, delivery)
        session.add(Effect(event_id=event.id))

    return handle


async def test_an_event_published_twice_is_handled_once(bus: Bus, db: Database) -> None:
    spec = new_spec()
    calls = Calls()
    handler = db_handler(db=db, model=ProcessedEvent, consumer=spec.name, handler=effect_handler(calls))
    event = event_on(subject_of(spec))
    async with running(bus, spec, handler) as consumer:
        await publish_copy(bus, event, 1)
        await publish_copy(bus, event, 2)
        await eventually(lambda: consumer.stats.handled == 2)  # both copies acknowledged
    assert calls.event_ids == [event.id]
    assert await count(db, Effect) == 1
    async with db.session() as session:
        processed = list((await session.scalars(select(ProcessedEvent))).all())
    assert [(p.consumer, p.event_id) for p in processed] == [(spec.name, event.id)]


async def test_a_redelivery_after_a_lost_ack_is_handled_once(bus: Bus, db: Database) -> None:
    spec = new_spec()
    calls = Calls()
    inner = db_handler(db=db, model=ProcessedEvent, consumer=spec.name, handler=effect_handler(calls))
    deliveries: list[int] = []

    async def ack_lost(event: CloudEvent, delivery: Delivery) -> None:
        deliveries.append(delivery.num_delivered)
        await inner(event, delivery)
        if delivery.num_delivered == 1:
            raise ConnectionError("the ack never reached the server")  # committed, but redelivered

    async with running(bus, spec, ack_lost) as consumer:
        await bus.publish_event(event_on(subject_of(spec)))
        await eventually(lambda: consumer.stats.handled == 1)
    assert deliveries == [1, 2]
    assert len(calls.event_ids) == 1
    assert await count(db, Effect) == 1


async def test_concurrent_duplicates_are_handled_once(db: Database) -> None:
    calls = Calls()

    async def slow_effect(event: CloudEvent, delivery: Delivery, session: AsyncSession) -> None:
        calls.record(event, delivery)
        session.add(Effect(event_id=event.id))
        await session.flush()
        await asyncio.sleep(0.3)  # hold the transaction open while the other copy arrives

    handler = db_handler(db=db, model=ProcessedEvent, consumer="concurrent", handler=slow_effect)
    event = event_on("strata.datasets.test.created")
    delivery = Delivery(subject=event.type, stream_seq=1, num_delivered=1, headers={})
    await asyncio.gather(handler(event, delivery), handler(event, replace(delivery, stream_seq=2)))
    assert await count(db, Effect) == 1
    assert await count(db, ProcessedEvent) == 1


async def test_a_handler_that_breaks_a_constraint_is_not_taken_for_a_duplicate(db: Database) -> None:
    async with db.session() as session:
        session.add(Effect(id=1, event_id="earlier"))

    async def clashing(event: CloudEvent, delivery: Delivery, session: AsyncSession) -> None:
        session.add(Effect(id=1, event_id=event.id))  # the handler's own bug or conflict
        await session.flush()

    handler = db_handler(db=db, model=ProcessedEvent, consumer="clash", handler=clashing)
    event = event_on("strata.datasets.test.created")
    delivery = Delivery(subject=event.type, stream_seq=1, num_delivered=1, headers={})
    # The error must reach the consumer (retry, then dead-letter), not be acknowledged as "handled".
    with pytest.raises(IntegrityError):
        await handler(event, delivery)
    assert await count(db, ProcessedEvent) == 0


async def test_memory_dedup_handles_an_event_once_and_only_after_success(bus: Bus) -> None:
    spec = new_spec(backoff_s=(0.1,))
    calls = Calls()
    succeeded: list[str] = []

    async def flaky(event: CloudEvent, delivery: Delivery) -> None:
        if len(calls.deliveries) == 1:
            raise ConnectionError("first attempt fails")
        succeeded.append(event.id)

    event = event_on(subject_of(spec))
    async with running(bus, spec, MemoryDedup().wrap(recording(calls, flaky))) as consumer:
        await publish_copy(bus, event, 1)
        await publish_copy(bus, event, 2)
        # Two copies, one failed attempt: three acknowledgements-or-naks, two of them acks.
        await eventually(lambda: consumer.stats.handled == 2)
    assert succeeded == [event.id]
    assert len(calls.deliveries) == 2  # the failed attempt, then the success; the other copy was skipped


async def test_memory_dedup_forgets_the_oldest_beyond_its_size() -> None:
    dedup = MemoryDedup(size=2)
    seen: list[str] = []

    async def handler(event: CloudEvent, delivery: Delivery) -> None:
        seen.append(event.id)

    wrapped = dedup.wrap(handler)
    events = [event_on("strata.datasets.test.created") for _ in range(3)]
    delivery = Delivery(subject="s", stream_seq=1, num_delivered=1, headers={})
    for e in [*events, events[2], events[0]]:
        await wrapped(e, delivery)
    # events[2] is remembered; events[0] was pushed out by events[1] and events[2], so it runs again.
    assert seen == [events[0].id, events[1].id, events[2].id, events[0].id]


# -- slow handlers ------------------------------------------------------------------------------------------------
async def test_a_slow_handler_is_kept_alive_and_not_redelivered(bus: Bus) -> None:
    # Two fetch loops: were the message not kept alive, the idle loop would get its redelivery after the ack wait.
    spec = new_spec(ack_wait_s=1.0, concurrency=2)
    calls = Calls()

    async def slow(event: CloudEvent, delivery: Delivery) -> None:
        await asyncio.sleep(3 * spec.ack_wait_s)

    async with running(bus, spec, recording(calls, slow)) as consumer:
        await bus.publish_event(event_on(subject_of(spec)))
        await eventually(lambda: consumer.stats.handled == 1, timeout_s=10)
        assert calls.deliveries == [1]
        info = await bus.js.consumer_info(spec.stream, spec.name)
        assert info.delivered is not None
        assert info.delivered.consumer_seq == 1  # delivered once in all
        assert info.num_ack_pending == 0
        assert info.num_redelivered == 0
        assert consumer.stats.retried == 0


async def test_messages_waiting_in_a_batch_behind_slow_handlers_are_not_redelivered(bus: Bus) -> None:
    # One fetch takes all three; each handler is within the ack wait, but the third waits longer than it. The second
    # fetch loop is there to take a redelivery at once, were there one.
    spec = new_spec(ack_wait_s=1.0, batch=4, concurrency=2)
    calls = Calls()

    async def slowish(event: CloudEvent, delivery: Delivery) -> None:
        await asyncio.sleep(0.7 * spec.ack_wait_s)

    events = [event_on(subject_of(spec), n=i) for i in range(3)]
    for event in events:
        await bus.publish_event(event)
    async with running(bus, spec, recording(calls, slowish)) as consumer:
        await eventually(lambda: consumer.stats.handled >= 3, timeout_s=10)
        await asyncio.sleep(spec.ack_wait_s)  # a redelivery, were there one, would be back by now
        assert sorted(calls.event_ids) == sorted(e.id for e in events)  # each once
        assert calls.deliveries == [1, 1, 1]
        info = await bus.js.consumer_info(spec.stream, spec.name)
        assert info.delivered is not None
        assert info.delivered.consumer_seq == 3
        assert info.num_ack_pending == 0


# -- NATS restarts ------------------------------------------------------------------------------------------------
async def test_a_consumer_keeps_consuming_after_nats_restarts(fresh_nats: NatsServer) -> None:
    bus = Bus(fresh_nats.url, name="test-consumer-restart", connect_timeout_s=1.0)
    await bus.start()
    spec = new_spec()
    calls = Calls()
    try:
        async with running(bus, spec, recording(calls)) as consumer:
            first = event_on(subject_of(spec))
            await bus.publish_event(first)
            await eventually(lambda: consumer.stats.handled == 1)

            fresh_nats.stop()
            await eventually(lambda: not bus.is_connected, timeout_s=5)
            fresh_nats.start()
            await eventually(lambda: bus.is_connected, timeout_s=10)

            second = event_on(subject_of(spec))
            await bus.publish_event(second)
            await eventually(lambda: consumer.stats.handled == 2, timeout_s=10)
            assert calls.event_ids == [first.id, second.id]
    finally:
        await bus.close()
