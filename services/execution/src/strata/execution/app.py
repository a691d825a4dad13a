"""``create_app(settings)``: the execution service's FastAPI app: the API, the job worker and the reaper."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from strata.common.app import Runtime, create_service_app
from strata.common.contracts.realtime import ReadCheck, ReadVerdict
from strata.common.observability import Metrics
from strata.common.storage import Storage

from . import jobs, results
from .api import Services, router
from .config import Settings
from .engines import EngineSettings, create_engine
from .engines.base import Engine
from .jobs import JobWatcher
from .models import Outbox, ProcessedEvent
from .worker import Worker

MIGRATIONS = Path(__file__).parent / "migrations"


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
    engine_settings = EngineSettings(
        threads=settings.engine_threads,
        memory_limit=settings.engine_memory_limit,
        clickhouse_url=settings.clickhouse_url,
        max_bytes_to_read=settings.max_bytes_to_read,
        workdir=settings.service_dir / "engines",
    )
    engines: dict[str, Engine] = {
        name: create_engine(name, storage=storage, settings=engine_settings) for name in ("duckdb", "clickhouse")
    }
    watcher = JobWatcher(runtime)
    worker = Worker(runtime=runtime, settings=settings, storage=storage, engines=engines, watcher=watcher)

    async def can_read_job(check: ReadCheck) -> ReadVerdict:
        """The WebSocket's ``job:<id>`` channel: the same rule as ``GET /jobs/{id}``."""
        assert runtime.db is not None
        async with runtime.db.session() as session:
            return await jobs.read_verdict(session, check)

    runtime.rpc.register("can_read_job", ReadCheck, can_read_job)

    async def on_started(_: Runtime) -> dict[str, Any]:
        await asyncio.to_thread(results.warm_up)
        await watcher.start()
        await worker.start()
        return {"execution": Services(settings=settings, storage=storage, engines=engines, watcher=watcher)}

    async def on_stopping(_: Runtime) -> None:
        await worker.stop()
        await watcher.stop()
        for engine in engines.values():
            await asyncio.to_thread(engine.close)
        await storage.close()

    app = create_service_app(
        settings,
        runtime=runtime,
        title="Strata execution",
        description="SQL queries on DuckDB and ClickHouse, run as jobs on a durable queue, with results in Parquet.",
        routers=[router],
        on_started=on_started,
        on_stopping=on_stopping,
    )
    app.state.worker = worker
    return app
