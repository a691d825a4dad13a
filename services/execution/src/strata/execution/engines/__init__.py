"""Query engines behind one interface (:mod:`.base`): DuckDB, and ClickHouse through chdb or a server.

engine = create_engine("duckdb", storage=storage, settings=EngineSettings(workdir=data_dir / "engines"))
analysis = engine.analyze(sql)            # at submit: one read-only statement, its tables and parameters
execution = engine.start(spec)            # in the worker: spec.tables are the resolved analysis.tables
result = await asyncio.to_thread(execution.run)   # execution.cancel() / .progress() from the event loop
engine.close()
"""

from __future__ import annotations

from strata.common.storage import Storage

from .base import (
    Analysis,
    BindError,
    ColumnNotFound,
    Engine,
    EngineError,
    Execution,
    ForbiddenStatement,
    Interrupted,
    MultipleStatements,
    ParameterError,
    QueryError,
    ResourceLimit,
    RunResult,
    RunSpec,
    SandboxViolation,
    SqlSyntaxError,
    TableNotFound,
    TableRef,
)
from .settings import EngineSettings

__all__ = [
    "ENGINES",
    "Analysis",
    "BindError",
    "ColumnNotFound",
    "Engine",
    "EngineError",
    "EngineSettings",
    "Execution",
    "ForbiddenStatement",
    "Interrupted",
    "MultipleStatements",
    "ParameterError",
    "QueryError",
    "ResourceLimit",
    "RunResult",
    "RunSpec",
    "SandboxViolation",
    "SqlSyntaxError",
    "TableNotFound",
    "TableRef",
    "create_engine",
]

#: The engine names ``create_engine`` knows.
ENGINES = ("duckdb", "clickhouse")


def create_engine(name: str, *, storage: Storage, settings: EngineSettings) -> Engine:
    """The engine called ``name``: ``duckdb``, or ``clickhouse`` (a server when ``settings.clickhouse_url`` is set,
    embedded chdb otherwise). Engines are imported here, when asked for: chdb alone weighs ~0.5 s and 500 MB."""
    if name == "duckdb":
        from .duckdb import DuckDBEngine

        return DuckDBEngine(storage=storage, settings=settings)
    if name == "clickhouse":
        if settings.clickhouse_url:
            from .clickhouse import ClickHouseServerEngine

            return ClickHouseServerEngine(storage=storage, settings=settings)
        from .clickhouse import ChdbEngine

        return ChdbEngine(storage=storage, settings=settings)
    raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
