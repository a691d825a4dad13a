"""The one interface every query engine implements (DuckDB, ClickHouse through chdb or clickhouse-connect).

A query goes through two steps:

1. :meth:`Engine.analyze` (static, fast, no data): the SQL is one read-only statement; which tables it names (as
   dataset references for ``rpc.datasets.resolve``) and which named parameters it uses. Runs at submit time, so a
   syntax error or a forbidden statement is a 4xx before anything is queued.
2. :meth:`Engine.start` returns an :class:`Execution` for one run: ``run()`` blocks (call it in a thread) and writes
   the result as Parquet to ``spec.output``; ``cancel()`` (thread-safe) interrupts the engine itself; ``progress()``
   reports the engine's own progress. The engine sees exactly the tables in ``spec.tables``, nothing else: no files,
   network, extensions, settings or environment.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from strata.common.contracts.datasets import ResolvedTable


class QueryError(Exception):
    """What the user did wrong (or what the engine refused): rendered as a 4xx at submit, or as the job's error.

    ``code`` is stable (clients switch on it); ``status`` is the HTTP status it maps to; ``position`` is the 1-based
    (line, column) in the user's SQL where the engine says so.
    """

    code: ClassVar[str] = "QUERY_ERROR"
    status: ClassVar[int] = 400

    def __init__(self, message: str, *, position: tuple[int, int] | None = None, **detail: Any) -> None:
        super().__init__(message)
        self.message = message
        self.position = position
        self.detail = detail

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message, "status": self.status}
        if self.position is not None:
            out["line"], out["column"] = self.position
        out.update(self.detail)
        return out


class SqlSyntaxError(QueryError):
    code, status = "SQL_SYNTAX_ERROR", 400


class MultipleStatements(QueryError):
    code, status = "MULTIPLE_STATEMENTS", 400


class ForbiddenStatement(QueryError):
    """Not a single read-only statement (COPY, ATTACH, INSTALL, SET, state-changing PRAGMA, DDL, DML...)."""

    code, status = "FORBIDDEN_STATEMENT", 400


class SandboxViolation(QueryError):
    """The statement tried to reach outside its tables: files, network, environment, settings, extensions."""

    code, status = "SANDBOX_VIOLATION", 403


class TableNotFound(QueryError):
    code, status = "TABLE_NOT_FOUND", 404


class ColumnNotFound(QueryError):
    code, status = "COLUMN_NOT_FOUND", 400


class BindError(QueryError):
    """Types, functions and names that do not fit together (other than an unknown column)."""

    code, status = "BINDER_ERROR", 400


class ParameterError(QueryError):
    """A named parameter missing, not used by the SQL, or of a type the engine cannot bind."""

    code, status = "PARAMETER_ERROR", 422


class ResourceLimit(QueryError):
    """Memory or bytes-to-read limit of the sandbox reached."""

    code, status = "RESOURCE_LIMIT", 422


class EngineError(QueryError):
    """Any other error the engine reports about the query (division by zero, a bad cast at run time...)."""

    code, status = "QUERY_FAILED", 400


class Interrupted(Exception):
    """The run was interrupted through :meth:`Execution.cancel` (by the user or by the deadline)."""


@dataclass(frozen=True)
class TableRef:
    """A table as the statement names it. ``ref`` is what ``rpc.datasets.resolve`` takes: ``name``,
    ``<owner id>.<name>`` or a dataset id. ``parts`` are the identifier parts as written (unquoted)."""

    ref: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class Analysis:
    kind: str  # select | explain | describe | show | summarize | pragma
    tables: tuple[TableRef, ...]
    parameters: tuple[str, ...]  # named parameters the statement uses, in order of first use


@dataclass(frozen=True)
class RunSpec:
    query_id: str  # the job id: ClickHouse's query_id, the name in logs
    sql: str
    parameters: dict[str, Any]
    tables: dict[str, ResolvedTable]  # by TableRef.ref: what the statement may read, at the resolved version
    output: Path  # a local Parquet file to write (its directory exists)
    max_rows: int
    timeout_s: float  # the engine's own limit (max_execution_time); the runner also interrupts at the deadline
    dry_run: bool = False


@dataclass
class RunResult:
    rows: int
    columns: list[dict[str, Any]]  # [{"name", "type", "nullable"}] in the engine's type names
    truncated: bool = False  # more rows than max_rows existed: the file holds the first max_rows
    plan: str | None = None  # dry run: the engine's plan
    stats: dict[str, Any] = field(default_factory=dict)  # engine figures: rows/bytes read, elapsed


class Execution(ABC):
    @abstractmethod
    def run(self) -> RunResult:
        """Run to the end (blocking). Raises :class:`QueryError` or :class:`Interrupted`."""

    @abstractmethod
    def cancel(self) -> None:
        """Interrupt the running statement in the engine (idempotent, from any thread)."""

    def progress(self) -> float | None:
        """The engine's progress in [0, 1], when it knows."""
        return None


class Engine(ABC):
    name: ClassVar[str]  # "duckdb" | "clickhouse"

    @abstractmethod
    def analyze(self, sql: str) -> Analysis: ...

    @abstractmethod
    def start(self, spec: RunSpec) -> Execution: ...

    def close(self) -> None:  # noqa: B027 - engines without resources have nothing to close
        """Release what the engine holds (processes, connections)."""
