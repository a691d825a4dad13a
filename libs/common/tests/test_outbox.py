"""The transactional outbox against real JetStream, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import DeclarativeBase

from strata.common import tracing
from strata.common.consumer import ProcessedEventMixin
from strata.common.db import Database, new_metadata
from strata.common.events import EVENTS_STREAM, MSG_ID_HEADER, Bus, CloudEvent
from strata.common.outbox import OutboxMixin, OutboxRelay, stage_event
from strata.common.procs import NatsServer
from strata.common.testing import eventually, stream_messages


class Base(DeclarativeBase):
    metadata = new_metadata()


class Outbox(OutboxMixin, Base):
    pass


class ProcessedEvent(ProcessedEventMixin, Base):
    pass


@pytest.fixture(scope="module", autouse=True)
def _tracing() -> None:
    tracing.setup_tracing(service_name="test", mode="local")


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    async with database.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield database
    await database.dispose()


def unique_subject(verb: str = "created") -> str:
    """A subject of the events stream that no other test uses (the session's NATS server is shared)."""
    return f"strata.datasets.test{uuid.uuid4().hex[:12]}.{verb}"


def event_on(subject: str, **data: Any) -> CloudEvent:
    return CloudEvent(source="/strata/test", type=subject, data=data)


async def rows(db: Database) -> list[Outbox]:
    async with db.session() as session:
        return list((await session.scalars(select(Outbox).order_by(Outbox.created_at))).all())


def all_published(db: Database) -> Callable[[], Any]:
    async def check() -> bool:
        found = await rows(db)
        return bool(found) and all(r.published_at is not None for r in found)

    return check


async def relay_passes(relay: OutboxRelay, n: int) -> None:
    """Let the relay's loop go round ``n`` times (it wakes at least every poll interval). Only for checking that
    something does *not* happen, where there is nothing to wait for."""
    for _ in range(n):
        relay.notify()
        await asyncio.sleep(relay.poll_interval_s)


async def test_committed_events_are_published_once_and_rolled_back_ones_never(db: Database, bus: Bus) -> None:
    relay = OutboxRelay(db=db, bus=bus, model=Outbox, poll_interval_s=0.2)
    relay.start()
    try:
        subject = unique_subject()
        committed = event_on(subject, n=1)
        with tracing.tracer("test").start_as_current_span("produce"):
            trace_id, _ = tracing.current_ids()
            async with db.session() as session:
                stage_event(session, Outbox, committed)
        assert trace_id is not None

        rolled_back = event_on(subject, n=2)
        with pytest.raises(RuntimeError, match="the change failed"):
            async with db.session() as session:
                stage_event(session, Outbox, rolled_back)
                await session.flush()
                raise RuntimeError("the change failed")

        # A later committed event is a barrier: once it is out, an earlier staged one would be out too.
        barrier = event_on(subject, n=3)
        async with db.session() as session:
            stage_event(session, Outbox, barrier)

        await eventually(all_published(db), timeout_s=10)
        assert {r.id for r in await rows(db)} == {committed.id, barrier.id}

        messages = await stream_messages(bus.js, subject)
        assert [m.headers[MSG_ID_HEADER] for m in messages if m.headers] == [committed.id, barrier.id]
        first = messages[0]
        assert first.headers is not None
        assert CloudEvent.model_validate_json(first.data or b"") == committed
        traceparent = first.headers.get("traceparent")
        assert traceparent is not None, first.headers
        assert traceparent.split("-")[1] == trace_id
        # Nothing left to send: a further pass publishes nothing and the stream still holds one copy of each.
        assert await relay.publish_pending() == 0
        assert len(await stream_messages(bus.js, subject)) == 2
    finally:
        await relay.stop()


async def test_outbox_keeps_events_through_a_nats_outage(db: Database, fresh_nats: NatsServer) -> None:
    bus = Bus(fresh_nats.url, name="test-outbox-outage", connect_timeout_s=1.0)
    await bus.start()
    relay = OutboxRelay(db=db, bus=bus, model=Outbox, poll_interval_s=0.1)
    relay.start()
    try:
        assert bus.is_connected
        subject = unique_subject()
        before = event_on(subject, n=0)
        async with db.session() as session:
            stage_event(session, Outbox, before)
        await eventually(all_published(db))

        fresh_nats.stop()
        await eventually(lambda: not bus.is_connected, timeout_s=5)

        events = [event_on(subject, n=i) for i in range(1, 11)]
        for event in events[:5]:
            async with db.session() as session:
                stage_event(session, Outbox, event)
        async with db.session() as session:  # several in one transaction too
            for event in events[5:]:
                stage_event(session, Outbox, event)

        # While NATS is down the relay keeps polling but sends nothing and marks nothing.
        await relay_passes(relay, 3)
        assert await relay.pending_count() == len(events)
        unsent = [r for r in await rows(db) if r.id != before.id]
        assert len(unsent) == len(events)
        assert all(r.published_at is None for r in unsent)

        fresh_nats.start()
        await eventually(lambda: bus.is_connected, timeout_s=10)
        await eventually(all_published(db), timeout_s=10)
        assert await relay.pending_count() == 0

        info = await bus.js.stream_info(EVENTS_STREAM)
        assert info.state.messages == len(events) + 1
        messages = await stream_messages(bus.js, subject)
        ids = [m.headers[MSG_ID_HEADER] for m in messages if m.headers]
        assert len(ids) == len(set(ids)) == len(events) + 1
        assert set(ids) == {before.id, *(e.id for e in events)}
        assert [CloudEvent.model_validate_json(m.data or b"").id for m in messages] == ids
    finally:
        await relay.stop()
        await bus.close()


async def test_a_publish_whose_ack_was_lost_is_deduplicated_by_jetstream(db: Database, bus: Bus) -> None:
    relay = OutboxRelay(db=db, bus=bus, model=Outbox)  # not started: the test drives it
    subject = unique_subject()
    event = event_on(subject, n=1)
    async with db.session() as session:
        stage_event(session, Outbox, event)

    assert await relay.publish_pending() == 1
    assert await relay.pending_count() == 0
    [sent] = await rows(db)
    assert sent.published_at is not None

    # The server stored the message but the relay never saw the ack: the row is still pending and is sent again.
    async with db.session() as session:
        await session.execute(update(Outbox).where(Outbox.id == event.id).values(published_at=None))
    assert await relay.pending_count() == 1
    assert await relay.publish_pending() == 1
    assert await relay.pending_count() == 0

    messages = await stream_messages(bus.js, subject)
    assert len(messages) == 1
    assert messages[0].headers is not None
    assert messages[0].headers[MSG_ID_HEADER] == event.id
