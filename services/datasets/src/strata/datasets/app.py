"""``create_app(settings)``: the datasets service's FastAPI app."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

from strata.common.app import Runtime, create_service_app
from strata.common.consumer import ConsumerSpec, Delivery
from strata.common.contracts.auth import Identity
from strata.common.contracts.datasets import DatasetDeleted, ResolvedTable, ResolveRequest, ResolveResponse
from strata.common.contracts.realtime import ReadCheck, ReadVerdict, SharedWith, SharedWithRequest
from strata.common.events import CloudEvent
from strata.common.observability import Metrics
from strata.common.storage import Storage

from . import engine, service
from .api import Services, router
from .config import Settings
from .demo import load_demo_data
from .ingest import Ingestor, consumer_spec
from .models import Outbox, ProcessedEvent

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    runtime = Runtime(
        settings,
        metrics=Metrics(settings.service_name),
        migrations=MIGRATIONS,
        outbox_model=Outbox,
        processed_model=ProcessedEvent,
    )
    storage = Storage.from_url(
        settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url, s3_region=settings.s3_region
    )
    ingestor = Ingestor(runtime=runtime, storage=storage, settings=settings)
    runtime.consume(consumer_spec(settings), ingestor.handle)
    held: dict[str, Any] = {}

    async def drop_files(event: CloudEvent, delivery: Delivery, session: AsyncSession) -> None:
        """The service's own ``dataset.deleted`` event removes the files: durable, retried, once."""
        deleted = event.payload(DatasetDeleted)
        await storage.delete_prefix(f"datasets/{deleted.dataset_id}/")
        log.info("removed the files of dataset %s", deleted.dataset_id)

    runtime.consume_in_db(
        ConsumerSpec(
            name="datasets-cleanup",
            subjects=(f"{DatasetDeleted.event_type}.>",),
            max_deliver=10,
            backoff_s=(1.0, 10.0, 60.0),
            description="Remove the files of deleted datasets",
        ),
        drop_files,
    )

    async def resolve(request: ResolveRequest) -> ResolveResponse:
        identity = Identity(user_id=request.user_id, role=request.role)
        assert runtime.db is not None
        tables, missing = [], []
        async with runtime.db.session() as session:
            for ref in request.refs:
                dataset = await service.resolve_ref(session, identity, ref)
                if dataset is None:
                    missing.append(ref)
                    continue
                row = await service.ready_version(session, dataset)
                assert row.data_key is not None
                tables.append(
                    ResolvedTable(
                        ref=ref,
                        dataset_id=dataset.id,
                        name=dataset.name,
                        owner_id=dataset.owner_id,
                        version=row.version,
                        path=storage.engine_path(row.data_key),
                        storage_url=storage.display_url(row.data_key),
                        columns=row.columns or [],
                        rows=row.row_count or 0,
                    )
                )
        return ResolveResponse(tables=tables, missing=missing)

    runtime.rpc.register("resolve", ResolveRequest, resolve)

    async def can_read(check: ReadCheck) -> ReadVerdict:
        """The WebSocket's ``dataset:<id>`` channel: the same rule as ``GET /datasets/{id}``."""
        assert runtime.db is not None
        async with runtime.db.session() as session:
            return await service.read_verdict(session, check)

    async def shared_with(request: SharedWithRequest) -> SharedWith:
        """The WebSocket's ``user`` channel follows the datasets shared with the user too."""
        assert runtime.db is not None
        async with runtime.db.session() as session:
            return await service.shared_with(session, request)

    runtime.rpc.register("can_read", ReadCheck, can_read)
    runtime.rpc.register("shared_with", SharedWithRequest, shared_with)

    async def on_started(_: Runtime) -> dict[str, Any]:
        duck = engine.connect(threads=settings.ingest_threads, memory_limit=settings.ingest_memory_limit)
        storage.register_with_duckdb(duck)
        held["duck"] = duck
        if settings.demo_data:
            held["demo"] = asyncio.create_task(_demo(), name="demo-data")
        return {"datasets": Services(storage=storage, settings=settings, duck=duck)}

    async def _demo() -> None:
        try:
            await load_demo_data(runtime=runtime, storage=storage, workdir=settings.service_dir / "demo")
        except Exception:  # the service works without its demo data; say why it is missing
            log.exception("loading the demo datasets failed")

    async def on_stopping(_: Runtime) -> None:
        if "demo" in held:
            held.pop("demo").cancel()
        if "duck" in held:
            held.pop("duck").close()
        await storage.close()

    return create_service_app(
        settings,
        runtime=runtime,
        title="Strata datasets",
        description="Uploads streamed to storage, ingested to Parquet, profiled, previewed, versioned and shared.",
        routers=[router],
        on_started=on_started,
        on_stopping=on_stopping,
    )
