"""The datasets service's contract: events, the ingestion work item, and ``rpc.datasets.resolve``.

Dataset events are keyed like job events: ``strata.datasets.dataset.<verb>.<owner id>.<dataset id>``, so one dataset's
events are ``strata.datasets.dataset.*.*.<id>`` and one owner's ``strata.datasets.dataset.*.<owner>.*``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field

from ..events import EventPayload
from .auth import Role

DATASET_EVENT_PREFIX = "strata.datasets.dataset"


def dataset_events_filter(dataset_id: str) -> str:
    """The NATS subject filter of every event of one dataset."""
    return f"{DATASET_EVENT_PREFIX}.*.*.{dataset_id}"


def owner_dataset_events_filter(owner_id: str) -> str:
    """The NATS subject filter of every event of one user's own datasets."""
    return f"{DATASET_EVENT_PREFIX}.*.{owner_id}.*"


class DatasetEvent(EventPayload):
    subject_keys: ClassVar[tuple[str, ...]] = ("owner_id", "dataset_id")
    dataset_id: str
    owner_id: str
    version: int
    name: str


class DatasetUploaded(DatasetEvent):
    event_type: ClassVar[str] = "strata.datasets.dataset.uploaded"
    format: str
    bytes: int
    sha256: str


class DatasetReady(DatasetEvent):
    event_type: ClassVar[str] = "strata.datasets.dataset.ready"
    rows: int
    bytes: int
    columns: list[dict[str, Any]]


class DatasetProfiled(DatasetEvent):
    """The ready version's statistics are computed (they follow ``ready``: data is queryable first)."""

    event_type: ClassVar[str] = "strata.datasets.dataset.profiled"


class DatasetFailed(DatasetEvent):
    event_type: ClassVar[str] = "strata.datasets.dataset.failed"
    error: dict[str, Any]


class DatasetDeleted(DatasetEvent):
    """Other services drop what they hold of the dataset (cached tables, results that name it)."""

    event_type: ClassVar[str] = "strata.datasets.dataset.deleted"


class DatasetUpdated(DatasetEvent):
    event_type: ClassVar[str] = "strata.datasets.dataset.updated"
    changes: list[str]


class DatasetShared(DatasetEvent):
    event_type: ClassVar[str] = "strata.datasets.dataset.shared"
    grantee_type: str
    grantee: str
    permission: str | None  # None: the share was removed


class IngestProgress(EventPayload):
    """High-rate, coalescable: not through the outbox."""

    event_type: ClassVar[str] = "strata.datasets.dataset.progress"
    subject_keys: ClassVar[tuple[str, ...]] = ("owner_id", "dataset_id")
    dataset_id: str
    owner_id: str
    version: int
    stage: str  # reading, storing, ready, profiling, profiled
    fraction: float | None = None
    bytes: int | None = None  # of the upload being read
    rows: int | None = None  # converted so far (known once conversion ends)


class IngestRequested(EventPayload):
    """The work item on ``strata.work.datasets.ingest``, taken by one datasets replica."""

    event_type: ClassVar[str] = "strata.work.datasets.ingest"
    dataset_id: str
    version: int


# -- rpc.datasets.resolve --------------------------------------------------------------------------------------------
class ResolveRequest(BaseModel):
    """Dataset references as a query names them: a name of the user's own, ``owner_email_or_id.name``, or an id."""

    user_id: str
    role: Role
    refs: list[str] = Field(min_length=1, max_length=50)


class ResolvedTable(BaseModel):
    ref: str
    dataset_id: str
    name: str
    owner_id: str
    version: int
    path: str  # what DuckDB reads: a local path or s3://...
    storage_url: str
    columns: list[dict[str, Any]]
    rows: int


class ResolveResponse(BaseModel):
    tables: list[ResolvedTable]
    missing: list[str]  # not found, not readable by the user, or not ready: the caller says "not found"
