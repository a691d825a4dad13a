"""Two demo datasets for a first look, generated deterministically (no downloads): support calls (100k rows) and
taxi trips (1M rows). They belong to a system owner and are shared read-only with every role, so every user sees
them and may query them by name. They go through the normal path: stored as Parquet uploads, then ingested."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from pathlib import Path

from sqlalchemy import select

from strata.common.app import Runtime
from strata.common.contracts.auth import Identity, Role
from strata.common.storage import Storage

from . import service
from .convert import connect
from .models import Dataset
from .schemas import ShareIn
from .upload import ReceivedUpload

log = logging.getLogger(__name__)
SYSTEM_OWNER = "00000000-0000-0000-0000-000000000000"

SUPPORT_CALLS = """
SELECT
    i + 1 AS call_id,
    'agent_' || lpad(((hash(i, 1) % 40) + 1)::VARCHAR, 2, '0') AS agent,
    (['north', 'south', 'east', 'west', 'central'])[1 + (hash(i, 2) % 5)::INTEGER] AS region,
    (['billing', 'technical', 'account', 'shipping', 'other'])[1 + (hash(i, 3) % 5)::INTEGER] AS issue_type,
    (['phone', 'chat', 'email'])[1 + (hash(i, 4) % 3)::INTEGER] AS channel,
    TIMESTAMPTZ '2026-01-05 07:00:00+00' + to_seconds((i * 97 + hash(i, 5) % 60)::BIGINT) AS start_time,
    TIMESTAMPTZ '2026-01-05 07:00:00+00' + to_seconds((i * 97 + hash(i, 5) % 60 + 60 + hash(i, 6) % 1800)::BIGINT)
        AS end_time,
    (60 + hash(i, 6) % 1800)::INTEGER AS duration_s,
    CASE WHEN hash(i, 7) % 10 = 0 THEN NULL ELSE (1 + hash(i, 8) % 5)::INTEGER END AS rating,
    hash(i, 9) % 10 < 8 AS resolved
FROM range(100000) t(i)
"""

TAXI_TRIPS = """
SELECT
    i + 1 AS trip_id,
    TIMESTAMP '2026-03-01 00:00:00' + to_seconds((i * 2 + hash(i, 1) % 120)::BIGINT) AS pickup_at,
    TIMESTAMP '2026-03-01 00:00:00' + to_seconds((i * 2 + hash(i, 1) % 120 + 180 + hash(i, 2) % 3000)::BIGINT)
        AS dropoff_at,
    (1 + hash(i, 3) % 4)::INTEGER AS passengers,
    round(0.5 + (hash(i, 4) % 25000) / 1000.0, 2) AS distance_km,
    round(3.0 + (hash(i, 4) % 25000) / 1000.0 * 1.8, 2) AS fare,
    round(CASE WHEN hash(i, 5) % 3 = 0 THEN 0 ELSE (hash(i, 6) % 800) / 100.0 END, 2) AS tip,
    (['card', 'cash', 'app'])[1 + (hash(i, 7) % 3)::INTEGER] AS payment_type,
    'zone_' || lpad(((hash(i, 8) % 60) + 1)::VARCHAR, 2, '0') AS pickup_zone,
    'zone_' || lpad(((hash(i, 9) % 60) + 1)::VARCHAR, 2, '0') AS dropoff_zone
FROM range(1000000) t(i)
"""

DEMOS = (
    (
        "support_calls",
        "Support calls: agent, region, issue type, channel, times, duration, rating (demo data)",
        SUPPORT_CALLS,
    ),
    (
        "taxi_trips",
        "Taxi trips: pickup and dropoff times and zones, distance, fare, tip, payment (demo data)",
        TAXI_TRIPS,
    ),
)


def _generate(sql: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    con = connect()
    try:
        con.execute(f"COPY ({sql}) TO '{target}' (FORMAT parquet, COMPRESSION zstd)")
    finally:
        con.close()


async def load_demo_data(*, runtime: Runtime, storage: Storage, workdir: Path) -> None:
    """Create the demo datasets that do not exist yet. Safe to run on every start and on several replicas (a
    replica that loses the race finds them there)."""
    assert runtime.db is not None
    system = Identity(user_id=SYSTEM_OWNER, role=Role.admin)
    for name, description, sql in DEMOS:
        async with runtime.db.session() as session:
            exists = await session.scalar(
                select(Dataset.id).where(Dataset.owner_id == SYSTEM_OWNER, Dataset.name == name)
            )
        if exists:
            continue
        target = workdir / f"{name}.parquet"
        await asyncio.to_thread(_generate, sql, target)
        dataset_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"strata-demo:{name}"))
        key = service.original_key(dataset_id, 1, "parquet")
        digest, size = hashlib.sha256(), 0
        file = await asyncio.to_thread(target.open, "rb")
        try:
            async with storage.writer(key) as writer:
                while chunk := await asyncio.to_thread(file.read, 4 << 20):
                    digest.update(chunk)
                    size += len(chunk)
                    await writer.write(chunk)
        finally:
            await asyncio.to_thread(file.close)
            await asyncio.to_thread(target.unlink)
        upload = ReceivedUpload({}, f"{name}.parquet", "parquet", key, size, digest.hexdigest())
        async with runtime.db.session() as session:
            if await session.get(Dataset, dataset_id) is not None:
                continue
            dataset = await service.create_dataset(
                session=session,
                stage=runtime.stage,
                owner=system,
                dataset_id=dataset_id,
                upload=upload,
                name=name,
                description=description,
                options={},
            )
            await service.share(
                session=session,
                stage=runtime.stage,
                actor=system,
                dataset=dataset,
                spec=ShareIn(role=Role.viewer, permission="read"),
            )
        log.info("demo dataset %s queued for ingestion (%d bytes)", name, upload.size)
