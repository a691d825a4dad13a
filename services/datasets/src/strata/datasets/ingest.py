"""The ingestion worker: takes ``strata.work.datasets.ingest`` items from the work queue (any replica may take one),
turns the upload into Parquet, profiles it and moves the version to ``ready`` or ``failed``.

Idempotent by the version's status: a redelivered item for a version that is no longer ``processing`` is done. A
replica that dies mid-way leaves the item unacknowledged, so another takes it; after ``ingest_max_attempts`` the
version is failed with a reason, so nothing stays ``processing``.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select

from strata.common.app import Runtime
from strata.common.consumer import ConsumerSpec, Delivery
from strata.common.contracts.datasets import (
    DatasetFailed,
    DatasetProfiled,
    DatasetReady,
    IngestProgress,
    IngestRequested,
)
from strata.common.db import utcnow
from strata.common.events import WORK_STREAM, CloudEvent
from strata.common.storage import Storage

from . import engine
from .config import Settings
from .convert import IngestFailed, convert
from .models import Dataset, DatasetVersion
from .service import SOURCE, data_key, dataset_event, event

log = logging.getLogger(__name__)
CHUNK = 4 * 1024 * 1024


def consumer_spec(settings: Settings) -> ConsumerSpec:
    return ConsumerSpec(
        name="datasets-ingest",
        subjects=(IngestRequested.event_type,),
        stream=WORK_STREAM,
        max_deliver=settings.ingest_max_attempts,
        backoff_s=(5.0, 30.0),
        ack_wait_s=settings.ingest_ack_wait_s,
        batch=1,
        description="Uploads to convert to Parquet and profile",
    )


class Ingestor:
    def __init__(self, *, runtime: Runtime, storage: Storage, settings: Settings) -> None:
        self.runtime = runtime
        self.storage = storage
        self.settings = settings

    @property
    def db(self) -> Any:
        assert self.runtime.db is not None
        return self.runtime.db

    async def handle(self, event_in: CloudEvent, delivery: Delivery) -> None:
        item = event_in.payload(IngestRequested)
        try:
            await self.run(item.dataset_id, item.version)
        except Exception:
            if delivery.num_delivered >= self.settings.ingest_max_attempts:
                await self._fail(
                    item.dataset_id,
                    item.version,
                    IngestFailed(
                        f"Ingestion failed {delivery.num_delivered} times on an internal error; upload it again."
                    ),
                )
            raise

    async def run(self, dataset_id: str, version: int) -> None:
        async with self.db.session() as session:
            row = await session.scalar(
                select(DatasetVersion).where(DatasetVersion.dataset_id == dataset_id, DatasetVersion.version == version)
            )
            dataset = await session.get(Dataset, dataset_id)
            if row is None or dataset is None or row.status != "processing":
                return  # done already, or gone
            if dataset.deleted_at is not None:
                row.status, row.error = "failed", {"message": "The dataset was deleted."}
                return
            row.attempts += 1
            fmt, options, original, owner = row.format, dict(row.options or {}), row.original_key, dataset.owner_id
            size = row.original_bytes
        workdir = self.settings.service_dir / "ingest" / f"{dataset_id}-v{version}-{uuid.uuid4().hex[:8]}"
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            await self._progress(dataset_id, owner, version, "reading", 0.0, size=size)
            src = self.storage.local_path(original) or await self._download(original, workdir / f"original.{fmt}")
            out = workdir / "data.parquet"
            try:
                rows = await asyncio.to_thread(
                    convert,
                    fmt,
                    src,
                    out,
                    options,
                    threads=self.settings.ingest_threads,
                    memory_limit=self.settings.ingest_memory_limit,
                )
                columns = await asyncio.to_thread(self._columns, out)
            except IngestFailed as exc:
                await self._fail(dataset_id, version, exc)
                return
            await self._progress(dataset_id, owner, version, "storing", 0.8, size=size, rows=rows)
            key = data_key(dataset_id, version)
            await self._upload(out, key)
            # Queryable now: the profile (a few full scans) follows, instead of keeping the data from its users.
            await self._ready(dataset_id, version, key, out.stat().st_size, columns, rows)
            await self._progress(dataset_id, owner, version, "ready", 1.0, size=size, rows=rows)
            await self._profile(dataset_id, owner, version, out)
        finally:
            await asyncio.to_thread(shutil.rmtree, workdir, True)

    def _columns(self, parquet: Path) -> list[dict[str, Any]]:
        con = engine.connect(threads=self.settings.ingest_threads, memory_limit=self.settings.ingest_memory_limit)
        try:
            cur = con.cursor()
            return [{"name": c.name, "type": c.type, "nullable": c.nullable} for c in engine.schema(cur, str(parquet))]
        finally:
            con.close()

    def _profile_file(self, parquet: Path) -> dict[str, Any]:
        con = engine.connect(threads=self.settings.ingest_threads, memory_limit=self.settings.ingest_memory_limit)
        try:
            return engine.profile(con.cursor(), str(parquet))
        finally:
            con.close()

    async def _profile(self, dataset_id: str, owner: str, version: int, parquet: Path) -> None:
        """Profile the ready version from the local copy; a failure here leaves the data ready and says why."""
        await self._progress(dataset_id, owner, version, "profiling", None)
        try:
            profile = await asyncio.to_thread(self._profile_file, parquet)
        except Exception as exc:  # the data is fine and queryable; only its statistics are missing
            log.exception("profiling dataset %s v%d failed", dataset_id, version)
            profile = {"status": "failed", "message": f"Profiling failed: {type(exc).__name__}"}
        async with self.db.session() as session:
            row = await session.scalar(
                select(DatasetVersion).where(DatasetVersion.dataset_id == dataset_id, DatasetVersion.version == version)
            )
            if row is None:
                return
            row.profile = profile
            dataset = await session.get(Dataset, dataset_id)
            if dataset is not None:
                self.runtime.stage(
                    session,
                    event(
                        dataset_event(DatasetProfiled, dataset, version),
                        dataset_id,
                    ),
                )
        await self._progress(dataset_id, owner, version, "profiled", 1.0)

    async def _download(self, key: str, target: Path) -> Path:
        file = await asyncio.to_thread(target.open, "wb")
        try:
            async for chunk in self.storage.read_chunks(key, CHUNK):
                await asyncio.to_thread(file.write, chunk)
        finally:
            await asyncio.to_thread(file.close)
        return target

    async def _upload(self, path: Path, key: str) -> None:
        file = await asyncio.to_thread(path.open, "rb")
        try:
            async with self.storage.writer(key) as writer:
                while chunk := await asyncio.to_thread(file.read, CHUNK):
                    await writer.write(chunk)
        finally:
            await asyncio.to_thread(file.close)

    async def _ready(
        self, dataset_id: str, version: int, key: str, size: int, columns: list[dict[str, Any]], rows: int
    ) -> None:
        async with self.db.session() as session:
            row = await session.scalar(
                select(DatasetVersion).where(DatasetVersion.dataset_id == dataset_id, DatasetVersion.version == version)
            )
            dataset = await session.get(Dataset, dataset_id)
            if row is None or dataset is None:
                return
            now = utcnow()
            row.status, row.data_key, row.data_bytes, row.row_count = "ready", key, size, rows
            row.columns, row.profile, row.error, row.ready_at = columns, None, None, now
            if version >= dataset.current_version or dataset.status != "ready":
                dataset.current_version = version
                dataset.column_names = " ".join(c["name"] for c in columns)
            dataset.status, dataset.updated_at = "ready", now
            self.runtime.stage(
                session,
                event(
                    dataset_event(DatasetReady, dataset, version, rows=rows, bytes=size, columns=columns),
                    dataset_id,
                ),
            )
        log.info("dataset %s v%d ready: %d rows, %d bytes", dataset_id, version, rows, size)

    async def _fail(self, dataset_id: str, version: int, exc: IngestFailed) -> None:
        async with self.db.session() as session:
            row = await session.scalar(
                select(DatasetVersion).where(DatasetVersion.dataset_id == dataset_id, DatasetVersion.version == version)
            )
            dataset = await session.get(Dataset, dataset_id)
            if row is None or dataset is None or row.status != "processing":
                return
            row.status, row.error = "failed", exc.to_dict()
            if dataset.status != "ready":  # a failed new version leaves an older ready one readable
                dataset.status = "failed"
            dataset.updated_at = utcnow()
            self.runtime.stage(
                session,
                event(
                    dataset_event(DatasetFailed, dataset, version, error=exc.to_dict()),
                    dataset_id,
                ),
            )
        log.info("dataset %s v%d failed: %s", dataset_id, version, exc.message)

    async def _progress(
        self,
        dataset_id: str,
        owner_id: str,
        version: int,
        stage: str,
        fraction: float | None,
        *,
        size: int | None = None,
        rows: int | None = None,
    ) -> None:
        """Progress goes straight to the bus (it may be coalesced, and is not worth an outbox row)."""
        if not self.runtime.bus.is_connected:
            return
        payload = IngestProgress(
            dataset_id=dataset_id,
            owner_id=owner_id,
            version=version,
            stage=stage,
            fraction=fraction,
            bytes=size,
            rows=rows,
        )
        try:
            await self.runtime.bus.publish_event(CloudEvent.of(payload, source=SOURCE, subject=dataset_id), timeout_s=2)
        except Exception as exc:  # progress is best effort: the state change events are the durable ones
            log.debug("progress event not sent: %s", exc)
