"""The DuckDB engine: one fresh, locked-down in-memory database per run.

What the sandbox guarantees, and how:

- **Only the run's tables.** Each run gets its own in-memory DuckDB whose file system allow-list
  (``allowed_paths``) is exactly the resolved dataset files (and, for a query, the run's own result file, which
  our ``COPY`` writes), with ``enable_external_access=false``: every other file, directory, glob, URL and the
  extension folder is refused by DuckDB itself (``read_csv('/etc/passwd')``, ``COPY ... TO``, ``INSTALL``...).
  S3 datasets are read through the storage's fsspec filesystem; DuckDB applies the same allow-list to ``s3://``
  paths. Each table is a view named as the statement names it (``support_calls``,
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

**Writing the result.** The statement streams as Arrow record batches (``to_arrow_reader``: in order, produced in
parallel, stopped by closing the reader), capped in Python at ``max_rows`` rows; a row beyond them makes the result
``truncated``. Where the batches go:

- A query's result of more than :data:`_COPY_FROM_ROWS` rows (1.5 row groups) goes on into DuckDB's own Parquet
  writer, a ``COPY`` of the stream on a cursor of the same database: ~30 % smaller files than pyarrow's writer, and
  faster (it encodes row groups in parallel). A thread of ours reads the stream a few batches ahead of the writer:
  read from within DuckDB's scan, the query's own output phase (after a sort, say) and the writer waited for each
  other, ~10 % slower than pyarrow's writer on a sorted 10M-row result.
- Anything else is written by pyarrow (:class:`ParquetSink`): a smaller result (DuckDB's writer costs ~1 ms more to
  start, and encodes one row group more slowly), the output of EXPLAIN, DESCRIBE, SHOW, SUMMARIZE and PRAGMA,
  and a result with a column DuckDB would write otherwise than pyarrow (:func:`_duckdb_writes`).

Not ``COPY (SELECT * FROM (<user's SQL>) LIMIT n + 1)``: an order-preserving LIMIT of more than 10,000 rows runs on
one thread in DuckDB (4.8 s for 10M rows, against 2.6 s without the LIMIT), and cutting the extra row means writing
the file twice.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import queue
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import duckdb
import pyarrow as pa  # type: ignore[import-untyped]

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
#: The name the result stream is registered under on the writing cursor (a temporary view of that cursor alone, never
#: seen by the user's statement). COPY names it in full: a dataset view may have the same name, never three parts.
_RESULT_STREAM = "strata_result_stream"
#: No temporary file: it would be another path for the allow-list (``tmp_<name>``, when the output exists already).
_COPY_OPTIONS = f"FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {ROW_GROUP_SIZE}, USE_TMP_FILE false"
#: From how many rows DuckDB's writer writes a query's result (pyarrow's below). Measured on a 13-column table of
#: numbers, short strings and timestamps: pyarrow's writer is faster up to ~160k rows (by ~15 ms at 123k-140k),
#: DuckDB's from there on (10 % at 200k-245k, 20 % at 10M rows); DuckDB's files are ~30 % smaller throughout.
_COPY_FROM_ROWS = ROW_GROUP_SIZE * 3 // 2


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


class Analyzer:
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
        self._analyzer = Analyzer()
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
                # no asynchronous writes: a COPY that fails or is interrupted while they are in flight can hang for
                # good (its abort waits for a write task that waits for the abort's lock); none slower without them
                "async_threads": 0,
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


# Arrow types that DuckDB's Parquet writer, reading them back from the stream, writes as pyarrow's writer does: pyarrow
# reads the same type back, values and all. (One difference left: a time zone aware timestamp is labelled ``UTC``
# instead of the session's zone, ``Etc/UTC`` say; the instants, pages, CSV and JSON are the same.)
_DUCKDB_WRITES_FLAT: tuple[Callable[[Any], bool], ...] = (
    pa.types.is_null,
    pa.types.is_boolean,
    pa.types.is_integer,
    pa.types.is_float32,
    pa.types.is_float64,
    pa.types.is_decimal128,
    pa.types.is_string,
    pa.types.is_large_string,
    pa.types.is_binary,
    pa.types.is_large_binary,
    pa.types.is_date32,
    pa.types.is_time64,
)


def _duckdb_writes_type(type_: Any) -> bool:
    if isinstance(type_, pa.BaseExtensionType):
        return False
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return _duckdb_writes_type(type_.value_type)
    if pa.types.is_struct(type_):
        return type_.num_fields > 0 and all(_duckdb_writes_type(type_.field(i).type) for i in range(type_.num_fields))
    if pa.types.is_map(type_):
        return _duckdb_writes_type(type_.key_type) and _duckdb_writes_type(type_.item_type)
    if pa.types.is_timestamp(type_):
        return bool(type_.unit != "s")  # DuckDB writes TIMESTAMP_S in microseconds, pyarrow in milliseconds
    return any(predicate(type_) for predicate in _DUCKDB_WRITES_FLAT)


def _duckdb_writes(schema: pa.Schema) -> bool:
    """Whether DuckDB's Parquet writer may write a result of this schema.

    Not when two columns share a name but for case (DuckDB would rename the second ``a_1``), nor with a type it
    writes otherwise than pyarrow: a fixed-size ``ARRAY`` (with a NULL row, a file pyarrow cannot read), ``INTERVAL``
    (12 raw bytes pyarrow reads as a blob; pyarrow's writer refuses it), ``UNION`` (a struct; pyarrow refuses it),
    an empty struct, an ``ENUM`` (plain text; pyarrow keeps the dictionary), ``TIMESTAMP_S``, or an extension type
    (``BIGNUM``: text; pyarrow writes the bytes).
    """
    names = [name.lower() for name in schema.names]
    return len(set(names)) == len(names) and all(_duckdb_writes_type(f.type) for f in schema)


_END = object()
_FAILED = object()


class _ReadAhead:
    """Iterates ``batches`` in a thread of its own, up to ``depth`` batches ahead of the consumer.

    The consumer gets what reading raised, in order; :meth:`take_error` gives it back too, because DuckDB's writer,
    which consumes the batches in its own threads, reports a failure there as an error of its own (with the original
    only in its message). :meth:`close` stops the thread and waits for it; call it before closing what ``batches``
    reads (a reader must not be closed while another thread reads it).
    """

    _PUT_WAIT_S = 0.05

    def __init__(self, batches: Iterator[pa.RecordBatch], *, depth: int = 2) -> None:
        self._batches = batches
        self._queue: queue.Queue[object] = queue.Queue(depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._pump, name="strata-duckdb-result", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if item is _FAILED:
                raise self._error if self._error is not None else RuntimeError("reading the result failed")
            yield item

    def take_error(self) -> BaseException | None:
        """What reading the batches raised, if it did; forgotten here (the error's traceback holds this object)."""
        error, self._error = self._error, None
        return error

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=self._PUT_WAIT_S)  # make room for a put that waits
        self._thread.join()

    def _pump(self) -> None:
        try:
            for batch in self._batches:
                if not self._put(batch):
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._error = exc
            self._put(_FAILED)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=self._PUT_WAIT_S)
                return True
            except queue.Full:
                continue
        return False


class _Capped:
    """The first ``max_rows`` rows of a record batch stream, as an iterator of batches.

    ``truncated`` once a row beyond them arrived (reading stops there); ``check`` runs before each batch (cancel).
    """

    def __init__(self, reader: pa.RecordBatchReader, *, max_rows: int, check: Callable[[], None]) -> None:
        self._reader = reader
        self._room = max(0, max_rows)
        self._check = check
        self.rows = 0
        self.truncated = False

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        for batch in self._reader:
            self._check()
            if batch.num_rows == 0:
                continue
            if batch.num_rows > self._room:
                self.truncated = True
                if self._room:
                    self.rows += self._room
                    yield batch.slice(0, self._room)
                return
            self._room -= batch.num_rows
            self.rows += batch.num_rows
            yield batch


class DuckDBExecution(CancellableExecution):
    def __init__(self, engine: DuckDBEngine, spec: RunSpec, statement: _Statement) -> None:
        super().__init__()
        self._engine = engine
        self._spec = spec
        self._statement = statement
        self._con: duckdb.DuckDBPyConnection | None = None
        self._cursor: duckdb.DuckDBPyConnection | None = None  # the one writing the result with COPY
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
            if self._cursor is not None:
                self._cursor.interrupt()

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
        try:
            reader = rel.to_arrow_reader(ROW_GROUP_SIZE)
            try:
                rows, truncated = self._write(con, reader)
            finally:
                reader.close()
        except OSError as exc:
            # errors raised while the Arrow stream is read arrive as OSError carrying DuckDB's message
            spec.output.unlink(missing_ok=True)
            if _JSON_ERROR.match(str(exc)):
                raise self._error(exc) from None
            raise
        except BaseException:
            spec.output.unlink(missing_ok=True)
            raise
        elapsed = (time.perf_counter() - started) * 1000
        return RunResult(
            rows=rows,
            columns=columns,
            truncated=truncated,
            stats={"elapsed_ms": round(elapsed, 2), "setup_ms": round(setup_ms, 2)},
        )

    def _write(self, con: duckdb.DuckDBPyConnection, reader: pa.RecordBatchReader) -> tuple[int, bool]:
        """Write the first ``max_rows`` rows of ``reader`` to the output: (rows written, whether there were more).

        A query's result of more than :data:`_COPY_FROM_ROWS` rows goes to DuckDB's writer, anything else to
        pyarrow's (see the module's docstring): batches are read ahead until there are more rows, or the end.
        """
        spec, stmt = self._spec, self._statement
        capped = _Capped(reader, max_rows=spec.max_rows, check=self._check_cancelled)
        batches = iter(capped)
        head: list[pa.RecordBatch] = []
        if stmt.kind == "select":
            held = 0
            for batch in batches:
                head.append(batch)
                held += batch.num_rows
                if held > _COPY_FROM_ROWS:
                    if not _duckdb_writes(reader.schema):
                        break
                    written = self._copy(con, reader.schema, itertools.chain(head, batches))
                    return written, capped.truncated
        transform = None
        if stmt.kind == "explain":
            replacements = self._replacements

            def transform(batch: pa.RecordBatch) -> pa.RecordBatch:
                return replace_in_strings(batch, replacements)

        sink = ParquetSink(spec.output, max_rows=spec.max_rows, transform=transform)
        try:
            for batch in itertools.chain(head, batches):
                sink.add(batch)
            sink.finish(reader.schema)
        except BaseException:
            sink.abort()
            raise
        return sink.rows, capped.truncated

    def _copy(self, con: duckdb.DuckDBPyConnection, schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> int:
        """Write ``batches`` with DuckDB's ``COPY``, on a cursor (the connection itself is busy streaming them).

        The statement is ours alone: the user's SQL ran on the connection and arrives here as Arrow batches.
        """
        cursor = con.cursor()
        with self._lock:
            self._cursor = cursor
        ahead: _ReadAhead | None = None
        written: list[tuple[Any, ...]] | None = None
        try:
            self._check_cancelled()  # a cancel that came before the cursor could be interrupted
            ahead = _ReadAhead(batches)
            cursor.register(_RESULT_STREAM, pa.RecordBatchReader.from_batches(schema, iter(ahead)))
            target = _literal(str(self._spec.output))
            written = cursor.execute(f"COPY temp.main.{_RESULT_STREAM} TO {target} ({_COPY_OPTIONS})").fetchall()
        except duckdb.Error:
            error = ahead.take_error() if ahead is not None else None
            if error is None:
                raise
            # the stream failed (the query's own error, or a cancel): that is the error, not the writer's report
            try:
                raise error from None
            finally:
                error = None  # the traceback holds this frame: no cycle through it
        finally:
            with self._lock:
                self._cursor = None
            if ahead is not None:
                if written is None:
                    con.interrupt()  # the writer failed: do not wait for the query's next batch
                ahead.close()
            cursor.close()
        return int(written[0][0])

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
        paths = {path for _, path in tables.values()}
        if stmt.kind == "select" and not spec.dry_run:
            paths.add(str(spec.output))  # DuckDB's own writer may write the result (see _write)
        # allowed_paths is refused at connect ("before the database is started") and after external access is off
        con.execute("SET allowed_paths = $paths", {"paths": sorted(paths)})
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
