"""The database layer on SQLite and PostgreSQL: migrations, aware timestamps, one place that commits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Integer, String, inspect, select
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from strata.common.db import Database, UTCDateTime, migrate_async, new_metadata, redact_url


class Base(DeclarativeBase):
    metadata = new_metadata()


class Note(Base):
    __tablename__ = "note"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(String(100), unique=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)


@pytest.fixture
async def db(database_url: str):  # type: ignore[no-untyped-def]
    database = Database(database_url)
    async with database.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield database
    await database.dispose()


async def test_timestamps_come_back_aware_in_utc(db: Database) -> None:
    local = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    async with db.session() as session:
        session.add(Note(id=1, text="a", at=local))
    async with db.session() as session:
        note = await session.get(Note, 1)
    assert note is not None
    assert note.at.tzinfo is not None and note.at.utcoffset() == timedelta(0)
    assert note.at == local.astimezone(UTC)


async def test_naive_timestamps_are_refused(db: Database) -> None:
    with pytest.raises(StatementError):
        async with db.session() as session:
            session.add(Note(id=2, text="b", at=datetime(2026, 1, 1)))  # noqa: DTZ001 (the point of the test)


async def test_session_commits_on_success_and_rolls_back_on_error(db: Database) -> None:
    async with db.session() as session:
        session.add(Note(id=3, text="kept", at=datetime.now(UTC)))
    with pytest.raises(RuntimeError):
        async with db.session() as session:
            session.add(Note(id=4, text="lost", at=datetime.now(UTC)))
            await session.flush()
            raise RuntimeError("handler failed")
    async with db.session() as session:
        texts = set((await session.scalars(select(Note.text))).all())
    assert texts == {"kept"}


async def test_constraint_names_follow_the_convention(db: Database) -> None:
    async with db.engine.connect() as conn:
        uniques = await conn.run_sync(lambda c: inspect(c).get_unique_constraints("note"))
    assert [u["name"] for u in uniques] == ["uq_note_text"]


@pytest.mark.parametrize("service", ["auth", "datasets", "execution", "schemas"])
async def test_service_migrations_run_and_are_idempotent(database_url: str, service: str) -> None:
    import importlib

    migrations = Path(importlib.import_module(f"strata.{service}.app").__file__).parent / "migrations"  # type: ignore[arg-type]
    await migrate_async(database_url=database_url, script_location=migrations)
    await migrate_async(database_url=database_url, script_location=migrations)  # a second start: nothing to do
    database = Database(database_url)
    try:
        async with database.engine.connect() as conn:
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await database.dispose()
    assert {"outbox", "processed_events", "alembic_version"} <= tables


def test_redact_url() -> None:
    assert "hunter2" not in redact_url("postgresql+asyncpg://u:hunter2@h/db")
    assert redact_url("sqlite+aiosqlite:////tmp/x.db") == "sqlite+aiosqlite:////tmp/x.db"
    assert "pw" not in redact_url("nats://user:pw@host:4222")
