"""Tables of the execution service. Only this service reads or writes them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from strata.common.consumer import ProcessedEventMixin
from strata.common.db import UTCDateTime, new_metadata, utcnow
from strata.common.outbox import OutboxMixin


class Base(DeclarativeBase):
    metadata = new_metadata()


class Outbox(OutboxMixin, Base):
    """Job events and work items waiting to be published, written with the change they report."""


class ProcessedEvent(ProcessedEventMixin, Base):
    """Events this service's consumers have handled, so a redelivery is handled once."""


class Job(Base):
    """One unit of work (a SQL query now; block and workflow runs later) and everything a client sees of it.

    Every state change is a conditional update (``WHERE state IN (...)``) so that the API, the worker and the reaper,
    in any replica, never overwrite each other: the one whose update matched publishes the event.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        # A retried submit with the same request_id returns the first job; the reaper clears it after a day.
        UniqueConstraint("owner_id", "request_id"),
        Index("ix_jobs_owner_created", "owner_id", "created_at"),
        Index("ix_jobs_state_deadline", "state", "deadline_at"),
        Index("ix_jobs_state_heartbeat", "state", "heartbeat_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(36))
    kind: Mapped[str] = mapped_column(String(16))  # query
    engine: Mapped[str] = mapped_column(String(16))  # duckdb | clickhouse
    state: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer, default=3)
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    sql: Mapped[str] = mapped_column(Text)
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: The datasets the statement reads, resolved at submit time: {ref: ResolvedTable as JSON}.
    tables: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    dataset_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    timeout_s: Mapped[float] = mapped_column(Float)
    max_rows: Mapped[int] = mapped_column(BigInteger)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    deadline_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    progress: Mapped[float | None] = mapped_column(Float, nullable=True)

    result_key: Mapped[str | None] = mapped_column(String(512), nullable=True)
    result_rows: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    result_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    result_columns: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Keys the HMAC of this job's page tokens (a token from another job, or edited, is refused).
    result_secret: Mapped[str] = mapped_column(String(64))
    results_expire_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    results_deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    timed_out_in: Mapped[str | None] = mapped_column(String(8), nullable=True)  # queue | run
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: Free text a client may attach (the SQL editor's tab name...).
    label: Mapped[str] = mapped_column(Text, default="")
