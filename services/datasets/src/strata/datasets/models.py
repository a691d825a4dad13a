"""Tables of the datasets service. Only this service reads or writes them."""

from __future__ import annotations

from sqlalchemy.orm import DeclarativeBase

from strata.common.consumer import ProcessedEventMixin
from strata.common.db import new_metadata
from strata.common.outbox import OutboxMixin


class Base(DeclarativeBase):
    metadata = new_metadata()


class Outbox(OutboxMixin, Base):
    """Events waiting to be published (written in the same transaction as the change they report)."""


class ProcessedEvent(ProcessedEventMixin, Base):
    """Events this service's consumers have handled, so a redelivery is handled once."""
