"""The DuckDB engine: one fresh, locked-down in-memory database per run.

What the sandbox guarantees, and how:

- **Only the run's tables.** Each run gets its own in-memory DuckDB whose file system allow-list
  (``allowed_paths``) is exactly the resolved dataset files, with ``enable_external_access=false``: every other
  file, directory, glob, URL and the extension folder is refused by DuckDB itself (``read_csv('/etc/passwd')``,
  ``COPY ... TO``, ``INSTALL``...). S3 datasets are read through the storage's fsspec filesystem; DuckDB applies the
  same allow-list to ``s3://`` paths. Each table is a view named as the statement names it (``support_calls``,
  ``"<owner id>".support_calls``, ``"<dataset id>"``), so the user's SQL runs unchanged.
- **No settings, extensions or state.** Extension autoload/autoinstall are off, and ``lock_configuration=true``
  is set last, so ``SET``/``RESET``/``PRAGMA x=y`` fail in the engine even if they got past the analysis.
- **One read-only statement.** :meth:`DuckDBEngine.analyze` uses DuckDB's own parser (``extract_statements`` and
  ``json_serialize_sql``): one SELECT/VALUES/set operation, EXPLAIN of one, DESCRIBE/SHOW/SUMMARIZE, or a read-only
  PRAGMA. Table functions come from a short allow-list (``range``, ``unnest``... never the ``read_*`` family,
  ``query()`` or the ``duckdb_*`` catalog functions); ``current_setting()`` and ``getvariable()`` are refused
  (settings name our folders). The same check runs again when the run starts.
- **Our folders stay ours.** Error messages and EXPLAIN ANALYZE output name tables, not files.

Connecting costs ~12 ms (building the database instance), more than a small query: a background thread keeps two
fresh, never-used connections ready (made after a run ends, not while one runs: connecting holds the GIL in bursts),
and closes used ones, so a run pays only the sandbox setup (~1 ms).
Cancel is ``interrupt()``; progress is ``query_progress()``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import duckdb

from strata.common.storage import FileStorage, Storage

from .base import (
    Analysis,
    BindError,
    ColumnNotFound,
    Engine,
    EngineError,
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
from .common import (
    ROW_GROUP_SIZE,
    CancellableExecution,
    Deadline,
    ParquetSink,
    Scrubber,
    char_index,
    line_col,
    replace_in_strings,
)
from .settings import EngineSettings

if TYPE_CHECKING:
    import pyarrow as pa  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

#: Table functions a statement may call: they make rows, they do not read anything.
TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest", "json_each", "json_tree", "repeat", "repeat_row"})
#: Scalar functions refused: settings and variables (``allowed_paths`` and ``temp_directory`` name our folders),
#: and anything that runs SQL given as a string (it would escape the analysis).
DENIED_FUNCTIONS = frozenset(
    {"current_setting", "getvariable", "getenv", "write_log", "json_execute_serialized_sql", "query", "query_table"}
)
#: PRAGMAs that only read (the others change settings and are refused, and locked anyway).
READ_PRAGMAS = frozenset({"show_tables", "show_tables_expanded", "version", "platform"})
_EXPLAIN_COLUMNS = [
    {"name": "explain_key", "type": "VARCHAR", "nullable": True},
    {"name": "explain_value", "type": "VARCHAR", "nullable": True},
]
_NO_LOCATION = 2**64 - 1
_JSON_ERROR = re.compile(r"^\s*(?P<label>[A-Za-z ]+?) Error: (?P<json>\{.*\})\s*$", re.DOTALL)
_SPARES = 2


# ----------------------------------------------------------------------------------------------------- analysis


@dataclass
class _Statement:
    """A statement that passed the analysis, with what running it needs."""

    kind: str
    tables: list[TableRef] = field(default_factory=list)
    table_locations: dict[str, int] = field(default_factory=dict)  # ref -> char index of its first use
    parameters: list[str] = field(default_factory=list)
    parameter_locations: dict[int, str] = field(default_factory=dict)  # byte offset in the SQL -> name
    # char index of the first use of each column and function name (lower case): errors raised when a relation is
    # bound come without a position
    name_locations: dict[str, int] = field(default_factory=dict)
    plan_offset: int = 0  # EXPLAIN: char index where the explained statement starts

    def analysis(self) -> Analysis:
        return Analysis(kind=self.kind, tables=tuple(self.tables), parameters=tuple(self.parameters))


class _Analyzer:
    """DuckDB's own parser, on a private connection that has nothing to read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._con = duckdb.connect(
            config={
                "autoinstall_known_extensions": False,
                "autoload_known_extensions": False,
                "enable_external_access": False,
                "errors_as_json": True,
                "threads": 1,
            }
        )

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def analyze(self, sql: str) -> _Statement:
        with self._lock:
            return self._analyze(sql)

    def _analyze(self, sql: str) -> _Statement:
        try:
            statements = self._con.extract_statements(sql)
        except duckdb.Error as exc:
            raise _map_error(exc, sql) from None
        if not statements:
            raise SqlSyntaxError("The query is empty.")
        if len(statements) > 1:
            raise MultipleStatements(f"Only one statement may run; this query has {len(statements)}.")
        try:
            kind = statements[0].type
        except ValueError:
            # a statement type the Python client has no name for (UPDATE EXTENSIONS, ...)
            raise ForbiddenStatement("Only one read-only statement (SELECT, EXPLAIN, DESCRIBE...) may run.") from None
        if kind == duckdb.StatementType.SELECT:
            return self._select(sql, offset=0, stmt=_Statement(kind="select"))
        if kind == duckdb.StatementType.EXPLAIN:
            return self._explain(sql)
        if kind == duckdb.StatementType.PRAGMA:
            return self._pragma(sql)
        name = kind.name.replace("_", " ")
        raise ForbiddenStatement(
            f"{name} statements are not allowed: a query is one read-only statement (SELECT, WITH, VALUES, "
            "EXPLAIN, DESCRIBE, SHOW, SUMMARIZE)."
        )

    def _serialize(self, sql: str) -> dict[str, Any]:
        rows = self._con.execute("SELECT json_serialize_sql($sql::VARCHAR)", {"sql": sql}).fetchall()
        tree: dict[str, Any] = json.loads(rows[0][0])
        if tree.get("error"):
            position = tree.get("position")
            where = line_col(sql, char_index(sql, int(position))) if position is not None else None
            message = str(tree.get("error_message", "cannot parse the statement"))
            if tree.get("error_type") == "parser":
                raise SqlSyntaxError(f"Syntax error: {message}", position=where)
            raise ForbiddenStatement(f"This statement is not supported: {message}", position=where)
        return tree

    def _select(self, sql: str, *, offset: int, stmt: _Statement) -> _Statement:
        """``sql`` is the user's SQL from char ``offset`` on (the whole of it but for EXPLAIN)."""
        text = sql[offset:]
        tree = self._serialize(text)
        statements = tree.get("statements") or []
        if len(statements) != 1:
            raise MultipleStatements("Only one statement may run.")
        base = len(sql[:offset].encode())
        walker = _Walker(sql=sql, byte_base=base, stmt=stmt)
        node = statements[0]["node"]
        walker.walk(node, frozenset())
        if stmt.kind == "select":
            stmt.kind = _show_kind(node)
        return stmt

    def _explain(self, sql: str) -> _Statement:
        tokens = _tokens(sql)
        # EXPLAIN [ANALYZE] [(options)] statement
        i = 1
        if i < len(tokens) and tokens[i][1].upper() in ("ANALYZE", "ANALYSE"):
            i += 1
        if i < len(tokens) and tokens[i][1] == "(":
            depth = 0
            while i < len(tokens):
                depth += {"(": 1, ")": -1}.get(tokens[i][1], 0)
                i += 1
                if depth == 0:
                    break
        if i >= len(tokens):
            raise SqlSyntaxError("EXPLAIN needs a statement to explain.")
        start = tokens[i][0]
        try:
            inner = self._con.extract_statements(sql[start:])
        except duckdb.Error as exc:
            raise _map_error(exc, sql, byte_base=len(sql[:start].encode())) from None
        if len(inner) != 1 or inner[0].type != duckdb.StatementType.SELECT:
            raise ForbiddenStatement("EXPLAIN may only explain a SELECT (or another read-only query).")
        stmt = _Statement(kind="explain", plan_offset=start)
        return self._select(sql, offset=start, stmt=stmt)

    def _pragma(self, sql: str) -> _Statement:
        tokens = _tokens(sql)
        name = tokens[1][1].lower() if len(tokens) > 1 else ""
        rest = [t for _, t in tokens[2:] if t != ";"]
        if name in ("table_info", "show"):
            raise ForbiddenStatement(f"PRAGMA {name} is not available: use DESCRIBE <table>.")
        if name not in READ_PRAGMAS or rest:
            raise ForbiddenStatement(
                f"PRAGMA {name or ''} is not allowed: only {', '.join(sorted(READ_PRAGMAS))} (they only read)."
            )
        return _Statement(kind="pragma")


def _tokens(sql: str) -> list[tuple[int, str]]:
    """(char index, text) of each token but comments."""
    data = sql.encode()
    raw = duckdb.tokenize(sql)
    out: list[tuple[int, str]] = []
    for n, (offset, kind) in enumerate(raw):
        end = raw[n + 1][0] if n + 1 < len(raw) else len(data)
        if kind == duckdb.token_type.comment:
            continue
        text = data[offset:end].decode(errors="ignore").strip()
        out.append((char_index(sql, offset), text))
    return out


def _show_kind(node: dict[str, Any]) -> str:
    """``DESCRIBE x`` and friends parse as ``SELECT * FROM <show ref>``."""
    table = node.get("from_table") or {}
    if node.get("type") == "SELECT_NODE" and table.get("type") == "SHOW_REF":
        return {"DESCRIBE": "describe", "SUMMARY": "summarize"}.get(str(table.get("show_type")), "show")
    return "select"


@dataclass
class _Walker:
    sql: str
    byte_base: int
    stmt: _Statement

    def position(self, node: dict[str, Any]) -> tuple[int, int] | None:
        location = node.get("query_location")
        if not isinstance(location, int) or location == _NO_LOCATION:
            return None
        return line_col(self.sql, char_index(self.sql, self.byte_base + location))

    def walk(self, node: Any, ctes: frozenset[str]) -> None:
        if isinstance(node, list):
            for item in node:
                self.walk(item, ctes)
            return
        if not isinstance(node, dict):
            return
        cte_map = node.get("cte_map")
        if isinstance(cte_map, dict) and cte_map.get("map"):
            ctes = ctes | {str(entry["key"]).lower() for entry in cte_map["map"]}
        kind = node.get("type")
        if kind == "BASE_TABLE":
            self.table(node, ctes)
        elif kind == "SHOW_REF" and node.get("show_type") == "SHOW" and not node.get("query"):
            # SHOW <name> describes a table
            self.table(node, ctes)
        elif kind == "TABLE_FUNCTION":
            function = node.get("function") or {}
            name = str(function.get("function_name", "")).lower()
            if name not in TABLE_FUNCTIONS or function.get("schema") or function.get("catalog"):
                raise SandboxViolation(
                    f"Table function {name}() is not available: queries read their datasets by name "
                    f"(allowed table functions: {', '.join(sorted(TABLE_FUNCTIONS))}).",
                    position=self.position(node),
                )
        cls = node.get("class")
        if cls == "FUNCTION":
            name = str(node.get("function_name", "")).lower()
            if name in DENIED_FUNCTIONS:
                raise SandboxViolation(f"Function {name}() is not available.", position=self.position(node))
            self.name(name, node)
        elif cls == "COLUMN_REF" and node.get("column_names"):
            self.name(str(node["column_names"][-1]).lower(), node)
        elif cls == "PARAMETER":
            self.parameter(node)
        for value in node.values():
            if isinstance(value, dict | list):
                self.walk(value, ctes)

    def table(self, node: dict[str, Any], ctes: frozenset[str]) -> None:
        parts = tuple(str(p) for p in (node.get("catalog_name"), node.get("schema_name"), node.get("table_name")) if p)
        if not parts or (len(parts) == 1 and parts[0].lower() in ctes):
            return
        ref = ".".join(parts)
        if ref not in self.stmt.table_locations:
            self.stmt.tables.append(TableRef(ref=ref, parts=parts))
            location = node.get("query_location")
            index = (
                char_index(self.sql, self.byte_base + location)
                if isinstance(location, int) and location != _NO_LOCATION
                else -1
            )
            self.stmt.table_locations[ref] = index

    def name(self, name: str, node: dict[str, Any]) -> None:
        location = node.get("query_location")
        if name not in self.stmt.name_locations and isinstance(location, int) and location != _NO_LOCATION:
            self.stmt.name_locations[name] = char_index(self.sql, self.byte_base + location)

    def parameter(self, node: dict[str, Any]) -> None:
        name = str(node.get("identifier", ""))
        if not name or name.isdigit():
            raise ParameterError(
                "Positional parameters (? or $1) are not supported: name them ($name) and pass them by name.",
                position=self.position(node),
            )
        if name not in self.stmt.parameters:
            self.stmt.parameters.append(name)
        location = node.get("query_location")
        if isinstance(location, int) and location != _NO_LOCATION:
            self.stmt.parameter_locations[self.byte_base + location] = name


# ------------------------------------------------------------------------------------------------------- errors

_DUCKDB_PATHS = re.compile(r'\s*in file "[^"]*"|\s*file = \S+')
_PREFIX = re.compile(r"^[A-Za-z ]+? Error: ")
_COLUMN = re.compile(r'(?:Referenced column|does not have a column named) "([^"]+)"')
_QUOTED = re.compile(r'"([^"]+)"')
_NAMED = re.compile(r'(?:column|[Ff]unction with name) "?([^"\s!]+)"?')


def _map_error(
    exc: BaseException,
    sql: str,
    *,
    byte_base: int = 0,
    parameters: dict[int, str] | None = None,
    names: dict[str, int] | None = None,
    scrub: Scrubber | None = None,
) -> QueryError | Interrupted:
    """A DuckDB error (``errors_as_json`` on) as a :class:`QueryError`. ``sql`` is the user's SQL; ``byte_base`` the
    byte offset of the text DuckDB ran within it."""
    message = str(exc)
    match = _JSON_ERROR.match(message)
    info: dict[str, Any] = {}
    if match:
        with contextlib.suppress(ValueError):
            info = json.loads(match.group("json"))
    kind = str(info.get("exception_type") or type(exc).__name__.removesuffix("Exception"))
    text = str(info.get("exception_message") or _PREFIX.sub("", message, count=1))
    text = scrub(text) if scrub is not None else text
    text = _DUCKDB_PATHS.sub("", text).strip()
    position: tuple[int, int] | None = None
    offset: int | None = None
    if info.get("position") is not None:
        with contextlib.suppress(ValueError):
            offset = byte_base + int(info["position"])
            position = line_col(sql, char_index(sql, offset))
    elif names:
        # errors raised when a relation is bound carry no position (and no JSON): find the name in the statement
        named = _NAMED.search(text)
        index = names.get(named.group(1).lower()) if named else None
        position = line_col(sql, index) if index is not None else None
    parameter = (parameters or {}).get(offset) if offset is not None else None
    lowered = kind.lower()
    if lowered == "parser":
        return SqlSyntaxError(f"Syntax error: {text}", position=position)
    if lowered == "interrupt":
        return Interrupted("the query was interrupted")
    if lowered == "binder":
        column = _COLUMN.search(text)
        if info.get("error_subtype") == "COLUMN_NOT_FOUND" or column:
            return ColumnNotFound(text, position=position, column_name=info.get("name") or (column and column.group(1)))
        if parameter is not None:
            return ParameterError(f"Parameter ${parameter}: {text}", position=position, parameter=parameter)
        return BindError(text, position=position)
    if lowered == "catalog":
        first_line = text.split("\n", 1)[0]
        if info.get("type") == "Table" or first_line.startswith("Table with name"):
            return TableNotFound(first_line, position=position, table=info.get("name"))
        return BindError(text, position=position)
    if lowered == "permission":
        # name what was refused only if the user wrote it (INSTALL names our extension folder)
        refused = _QUOTED.search(text)
        what = refused.group(1) if refused and refused.group(1) in sql else None
        return SandboxViolation(
            f"The query may only read its own tables: access to {what or 'that resource'} was refused.",
            position=position,
        )
    if lowered == "out of memory":
        return ResourceLimit(f"The query needs more memory than it may use. {text.split(chr(10), 1)[0]}")
    if lowered == "invalid input":
        if "parameter" in text.lower():
            return ParameterError(text, position=position)
        if "configuration has been locked" in text or "Cannot change" in text:
            return ForbiddenStatement(f"Settings cannot be changed: {text}", position=position)
        return EngineError(text, position=position)
    if lowered == "conversion" and parameter is not None:
        return ParameterError(f"Parameter ${parameter}: {text}", position=position, parameter=parameter)
    return EngineError(text, position=position)


# ------------------------------------------------------------------------------------------------------- engine


class DuckDBEngine(Engine):
    name: ClassVar[str] = "duckdb"

    def __init__(self, *, storage: Storage, settings: EngineSettings, spares: int = _SPARES) -> None:
        self.storage = storage
        self.settings = settings
        self._tmp_root = settings.workdir / "duckdb-tmp"
        self._tmp_root.mkdir(parents=True, exist_ok=True)
        self._analyzer = _Analyzer()
        self._spare_count = spares
        self._lock = threading.Lock()
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="strata-duckdb-spares")
        self._spares: deque[Future[duckdb.DuckDBPyConnection]] = deque(
            self._pool.submit(self._connect) for _ in range(spares)
        )
        scrub: dict[str, str] = {str(settings.workdir): "<workdir>"}
        if isinstance(storage, FileStorage):
            scrub[str(storage.root)] = "<storage>"
        self._scrub_roots = scrub

    def analyze(self, sql: str) -> Analysis:
        return self._analyzer.analyze(sql).analysis()

    def start(self, spec: RunSpec) -> DuckDBExecution:
        statement = self._analyzer.analyze(spec.sql)
        return DuckDBExecution(self, spec, statement)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            spares, self._spares = list(self._spares), deque()
        for spare in spares:
            with contextlib.suppress(Exception):
                spare.result().close()
        self._pool.shutdown(wait=True)
        self._analyzer.close()

    # connections

    def _connect(self) -> duckdb.DuckDBPyConnection:
        """A fresh database: limits that must be given at connect, and the session settings of the sandbox."""
        con = duckdb.connect(
            ":memory:",
            config={
                "autoinstall_known_extensions": False,
                "autoload_known_extensions": False,
                "threads": self.settings.threads,
                "memory_limit": self.settings.memory_limit,
                "errors_as_json": True,
                # its own spill folder: DuckDB names its temporary files per process, not per database
                "temp_directory": str(self._tmp_root / uuid.uuid4().hex),
            },
        )
        con.execute("SET enable_progress_bar = true")
        con.execute("SET enable_progress_bar_print = false")
        return con

    def _take_connection(self) -> duckdb.DuckDBPyConnection:
        with self._lock:
            spare = self._spares.popleft() if self._spares else None
        return spare.result() if spare is not None else self._connect()

    def _retire(self, con: duckdb.DuckDBPyConnection) -> None:
        """Close a used connection and make the next spare, off the caller's path and after its run: connecting holds
        the GIL in bursts of several milliseconds, which would stall a query running meanwhile."""
        with self._lock:
            if not self._closed:
                self._pool.submit(con.close)
                if len(self._spares) < self._spare_count:
                    self._spares.append(self._pool.submit(self._connect))
                return
        con.close()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _check_parameters(statement: _Statement, values: dict[str, Any]) -> None:
    missing = [p for p in statement.parameters if p not in values]
    if missing:
        raise ParameterError(f"Missing value for parameter ${missing[0]}.", parameter=missing[0], missing=missing)
    extra = [p for p in values if p not in statement.parameters]
    if extra:
        raise ParameterError(f"Parameter ${extra[0]} is not used by the query.", parameter=extra[0], unused=extra)
    for name, value in values.items():
        if not _is_json_value(value):
            raise ParameterError(
                f"Parameter ${name} has a value of type {type(value).__name__}: use a string, number, boolean, "
                "null, or a list or object of those.",
                parameter=name,
            )


def _is_json_value(value: Any) -> bool:
    if value is None or isinstance(value, str | bool | int | float):
        return True
    if isinstance(value, list):
        return all(_is_json_value(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json_value(v) for k, v in value.items())
    return False


class DuckDBExecution(CancellableExecution):
    def __init__(self, engine: DuckDBEngine, spec: RunSpec, statement: _Statement) -> None:
        super().__init__()
        self._engine = engine
        self._spec = spec
        self._statement = statement
        self._con: duckdb.DuckDBPyConnection | None = None
        replacements = dict(engine._scrub_roots)
        for ref in reversed([t.ref for t in statement.tables if t.ref in spec.tables]):
            replacements[spec.tables[ref].path] = ref  # the first name the statement gives a file wins
        self._replacements = {k: v for k, v in replacements.items() if k}
        self._scrub = Scrubber(self._replacements)

    # thread-safe controls

    def _interrupt(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.interrupt()

    def progress(self) -> float | None:
        with self._lock:
            if self._con is None:
                return None
            value = self._con.query_progress()
        return None if value < 0 else min(1.0, value / 100)

    # the run

    def run(self) -> RunResult:
        started = time.perf_counter()
        deadline = Deadline(self._spec.timeout_s, self._on_deadline)
        try:
            return self._run(started)
        except duckdb.Error as exc:
            raise self._error(exc) from None
        finally:
            deadline.cancel()
            self._finished.set()
            with self._lock:
                con, self._con = self._con, None
            if con is not None:
                self._engine._retire(con)

    def _error(self, exc: BaseException) -> QueryError | Interrupted:
        stmt = self._statement
        error = _map_error(
            exc, self._spec.sql, parameters=stmt.parameter_locations, names=stmt.name_locations, scrub=self._scrub
        )
        if isinstance(error, Interrupted):
            return self._interrupted()
        return error

    def _run(self, started: float) -> RunResult:
        spec, stmt = self._spec, self._statement
        self._check_cancelled()
        _check_parameters(stmt, spec.parameters)
        missing = [t for t in stmt.tables if t.ref not in spec.tables]
        if missing:
            where = stmt.table_locations.get(missing[0].ref, -1)
            raise TableNotFound(
                f"Table {missing[0].ref} does not exist (or is not shared with you).",
                position=line_col(spec.sql, where) if where >= 0 else None,
                table=missing[0].ref,
            )
        con = self._engine._take_connection()
        with self._lock:
            self._con = con
        self._sandbox(con)
        setup_ms = (time.perf_counter() - started) * 1000
        self._check_cancelled()
        params = spec.parameters or None
        if spec.dry_run:
            return self._dry_run(con, params, setup_ms, started)
        rel = con.sql(spec.sql, params=params)
        columns = [{"name": n, "type": str(t), "nullable": True} for n, t in zip(rel.columns, rel.types, strict=True)]
        transform = None
        if stmt.kind == "explain":
            replacements = self._replacements

            def transform(batch: pa.RecordBatch) -> pa.RecordBatch:
                return replace_in_strings(batch, replacements)

        sink = ParquetSink(spec.output, max_rows=spec.max_rows, transform=transform)
        try:
            reader = rel.to_arrow_reader(ROW_GROUP_SIZE)
            try:
                self._stream(reader, sink)
            finally:
                reader.close()
            sink.finish(reader.schema)
        except OSError as exc:
            # errors raised while the Arrow stream is read arrive as OSError carrying DuckDB's message
            sink.abort()
            if _JSON_ERROR.match(str(exc)):
                raise self._error(exc) from None
            raise
        except BaseException:
            sink.abort()
            raise
        elapsed = (time.perf_counter() - started) * 1000
        return RunResult(
            rows=sink.rows,
            columns=columns,
            truncated=sink.truncated,
            stats={"elapsed_ms": round(elapsed, 2), "setup_ms": round(setup_ms, 2)},
        )

    def _stream(self, reader: pa.RecordBatchReader, sink: ParquetSink) -> None:
        for batch in reader:
            if not sink.add(batch):
                return
            self._check_cancelled()

    def _dry_run(
        self, con: duckdb.DuckDBPyConnection, params: dict[str, Any] | None, setup_ms: float, started: float
    ) -> RunResult:
        spec, stmt = self._spec, self._statement
        # EXPLAIN ANALYZE would run when bound: bind the explained statement instead
        plan_sql = spec.sql[stmt.plan_offset :]
        try:
            rel = con.sql(plan_sql, params=params)
        except duckdb.Error as exc:
            error = _map_error(
                exc,
                spec.sql,
                byte_base=len(spec.sql[: stmt.plan_offset].encode()),
                parameters=stmt.parameter_locations,
                names=stmt.name_locations,
                scrub=self._scrub,
            )
            raise (self._interrupted() if isinstance(error, Interrupted) else error) from None
        if stmt.kind == "explain":
            columns = list(_EXPLAIN_COLUMNS)
        else:
            columns = [
                {"name": n, "type": str(t), "nullable": True} for n, t in zip(rel.columns, rel.types, strict=True)
            ]
        plan = self._scrub(rel.explain())
        elapsed = (time.perf_counter() - started) * 1000
        return RunResult(
            rows=0,
            columns=columns,
            plan=plan,
            stats={"elapsed_ms": round(elapsed, 2), "setup_ms": round(setup_ms, 2)},
        )

    def _sandbox(self, con: duckdb.DuckDBPyConnection) -> None:
        """Allow exactly the tables' files, turn external access off, name the tables, lock the configuration."""
        spec, stmt = self._spec, self._statement
        tables = {t.ref: (t.parts, spec.tables[t.ref].path) for t in stmt.tables}
        if any(path.startswith("s3://") for _, path in tables.values()):
            self._engine.storage.register_with_duckdb(con)
        # allowed_paths is refused at connect ("before the database is started") and after external access is off
        con.execute("SET allowed_paths = $paths", {"paths": sorted({path for _, path in tables.values()})})
        con.execute("SET enable_external_access = false")
        created: dict[tuple[str, ...], str] = {}
        for parts, path in tables.values():
            folded = tuple(p.lower() for p in parts)  # DuckDB names are case-insensitive
            if folded in created:
                if created[folded] != path:
                    raise BindError(f"Tables {'.'.join(parts)!r} and another differ only in case: rename one.")
                continue
            created[folded] = path
            if len(parts) > 2:
                raise TableNotFound(f"Table {'.'.join(parts)} does not exist.", table=".".join(parts))
            if len(parts) == 2:
                con.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote(parts[0])}")
            name = ".".join(_quote(p) for p in parts)
            try:
                # our names and paths, quoted (a view cannot take parameters)
                con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet({_literal(path)})")  # noqa: S608
            except duckdb.Error as exc:
                log.warning("cannot expose %s: %s", ".".join(parts), self._scrub(str(exc)))
                raise EngineError(f"Table {'.'.join(parts)} cannot be read right now.") from None
        con.execute("SET lock_configuration = true")
