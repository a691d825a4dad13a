"""The transactional outbox: events are written in the same transaction as the change they report, then published.

A service declares ``class Outbox(OutboxMixin, Base)`` and stages events with :func:`stage_event` inside its session;
:class:`OutboxRelay` publishes committed rows to JetStream with ``Nats-Msg-Id`` = event id and marks them sent only
after the server's ack. If NATS is down the rows wait; a publish whose ack was lost is retried and JetStream drops the
duplicate, so every event arrives once. The relay wakes right after a commit that staged events (low latency) and
also polls (events committed by another replica or before a crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import JSON, Index, Integer, String, Text, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, declared_attr, mapped_column

from . import tracing
from .context import request_id_var
from .db import Database, UTCDateTime, utcnow
from .events import MSG_ID_HEADER, Bus, CloudEvent

log = logging.getLogger(__name__)
_DIRTY = "strata_outbox_dirty"


class OutboxMixin:
    """Columns of the outbox table. Mix into the service's declarative base: ``class Outbox(OutboxMixin, Base)``."""

    __tablename__ = "outbox"

    @declared_attr.directive
    def __table_args__(cls) -> tuple[Any, ...]:
        # A new Index per class: an Index object can belong to one table only (each service has its own).
        return (Index("ix_outbox_pending", "published_at", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject: Mapped[str] = mapped_column(String(255))
    payload: Mapped[str] = mapped_column(Text)
    headers: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


def stage_event(session: AsyncSession, model: type[OutboxMixin], event: CloudEvent) -> None:
    """Add ``event`` to the outbox in ``session``: it is published only if the session commits."""
    headers: dict[str, str] = {MSG_ID_HEADER: event.id, "Content-Type": "application/cloudevents+json"}
    tracing.inject(headers)
    if rid := request_id_var.get():
        headers["X-Request-ID"] = rid
    row = model()
    row.id, row.subject, row.payload, row.headers = event.id, event.nats_subject, event.model_dump_json(), headers
    row.created_at, row.attempts = utcnow(), 0
    session.add(row)
    session.info[_DIRTY] = True


class OutboxRelay:
    def __init__(
        self,
        *,
        db: Database,
        bus: Bus,
        model: type[OutboxMixin],
        poll_interval_s: float = 1.0,
        batch_size: int = 200,
        retention: timedelta = timedelta(hours=24),
        on_published: Any = None,
    ) -> None:
        self.db = db
        self.bus = bus
        self.model = model
        self.poll_interval_s = poll_interval_s
        self.batch_size = batch_size
        self.retention = retention
        self.on_published = on_published
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_purge = utcnow()
        db.after_commit(self._after_commit)

    def _after_commit(self, session: AsyncSession) -> None:
        if session.info.pop(_DIRTY, False):
            self._wake.set()

    def notify(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
            self._wake.clear()
            if not self.bus.is_connected:
                continue
            try:
                while await self.publish_pending() == self.batch_size:
                    pass
                if utcnow() - self._last_purge > timedelta(minutes=10):
                    await self.purge()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox relay pass failed; retrying")
                await asyncio.sleep(self.poll_interval_s)

    async def publish_pending(self) -> int:
        """Publish one batch of unsent events; returns how many were taken."""
        m = self.model
        async with self.db.session() as session:
            query = select(m).where(m.published_at.is_(None)).order_by(m.created_at, m.id).limit(self.batch_size)
            if not self.db.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            rows = list((await session.scalars(query)).all())
            if not rows:
                return 0
            js = self.bus.js
            futures = [
                await js.publish_async(row.subject, row.payload.encode(), headers=dict(row.headers or {}))
                for row in rows
            ]
            results = await asyncio.gather(*(asyncio.wait_for(f, 10) for f in futures), return_exceptions=True)
            now = utcnow()
            sent: list[str] = []
            for row, result in zip(rows, results, strict=True):
                if isinstance(result, BaseException):
                    row.attempts += 1
                    row.last_error = (str(result) or type(result).__name__)[:500]
                else:
                    row.published_at = now
                    sent.append(row.id)
            if len(sent) < len(rows):
                log.warning("outbox: %d of %d events not acknowledged; will retry", len(rows) - len(sent), len(rows))
        if self.on_published is not None and sent:
            self.on_published(len(sent))
        return len(rows)

    async def pending_count(self) -> int:
        async with self.db.session() as session:
            count = await session.scalar(
                select(func.count()).select_from(self.model).where(self.model.published_at.is_(None))
            )
        return int(count or 0)

    async def purge(self) -> int:
        """Delete sent rows older than the retention."""
        cutoff = utcnow() - self.retention
        async with self.db.session() as session:
            result = await session.execute(
                delete(self.model).where(self.model.published_at.is_not(None), self.model.published_at < cutoff)
            )
        self._last_purge = utcnow()
        return int(getattr(result, "rowcount", 0) or 0)
