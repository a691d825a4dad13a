"""Tables of the datasets service. Only this service reads or writes them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from strata.common.consumer import ProcessedEventMixin
from strata.common.db import UTCDateTime, new_metadata, utcnow
from strata.common.outbox import OutboxMixin


class Base(DeclarativeBase):
    metadata = new_metadata()


class Outbox(OutboxMixin, Base):
    """Events (and ingestion work items) waiting to be published, written with the change they report."""


class ProcessedEvent(ProcessedEventMixin, Base):
    """Events and work items this service's consumers have handled, so a redelivery is handled once."""


class Dataset(Base):
    """A named table a user uploaded. Its data lives in versions; ``current_version`` is the one readers get."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_owner_name", "owner_id", "name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(36), index=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(16), index=True)  # processing | ready | failed
    format: Mapped[str] = mapped_column(String(16))
    current_version: Mapped[int] = mapped_column(Integer, default=1)
    #: The current version's column names, space-separated, so a search can match them.
    column_names: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class DatasetVersion(Base):
    """One upload of a dataset and what ingestion made of it."""

    __tablename__ = "dataset_versions"
    __table_args__ = (UniqueConstraint("dataset_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))  # processing | ready | failed
    format: Mapped[str] = mapped_column(String(16))
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    original_filename: Mapped[str] = mapped_column(String(255))
    original_key: Mapped[str] = mapped_column(String(512))
    original_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    data_key: Mapped[str | None] = mapped_column(String(512), nullable=True)
    data_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    row_count: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    columns: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    profile: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class DatasetShare(Base):
    """Read or write access to a dataset for a user or for everyone with a role."""

    __tablename__ = "dataset_shares"
    __table_args__ = (UniqueConstraint("dataset_id", "grantee_type", "grantee"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    grantee_type: Mapped[str] = mapped_column(String(8))  # user | role
    grantee: Mapped[str] = mapped_column(String(36), index=True)
    permission: Mapped[str] = mapped_column(String(8))  # read | write
    created_by: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
