"""The query engines on real Parquet files: what a statement may do, what it reads, what the result file holds."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import duckdb
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

from strata.common.contracts.datasets import ResolvedTable
from strata.common.storage import Storage
from strata.execution.engines import (
    BindError,
    ColumnNotFound,
    Engine,
    EngineError,
    EngineSettings,
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
    create_engine,
)
from strata.execution.engines.clickhouse import ChdbEngine, ClickHouseServerEngine, analyze_clickhouse, verify_ast
from strata.execution.engines.duckdb import _COPY_FROM_ROWS, DuckDBEngine
from strata.execution.results import read_page

OWNER = "0b7c4a52-7d1e-4bbf-9a38-3c6f3f1f8a11"
DATASET = "5f0e8a1c-2b8d-4a6e-9a57-0d2b4e6c9f10"


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Dataset files as the datasets service writes them, and one file no query may read."""
    root = tmp_path_factory.mktemp("storage")
    paths = {
        "calls": root / "datasets" / "calls" / "v1" / "data.parquet",
        "agents": root / "datasets" / "agents" / "v1" / "data.parquet",
        "secret": root / "datasets" / "secret" / "v1" / "data.parquet",
        "broken": root / "datasets" / "broken" / "v1" / "data.parquet",
    }
    for path in paths.values():
        path.parent.mkdir(parents=True)
    con = duckdb.connect()
    con.execute(
        "COPY (SELECT range AS id, range % 7 AS agent, 'call ' || range AS note, "
        "DATE '2024-01-01' + (range % 90)::INT AS day, (range * 1.5)::DOUBLE AS seconds, "
        "TIMESTAMP '2024-01-01 08:00' + INTERVAL (range) MINUTE AS started_at "
        f"FROM range(1000)) TO '{paths['calls']}' (FORMAT parquet)"
    )
    con.execute(
        f"COPY (SELECT range AS agent, 'agent ' || range AS name FROM range(7)) TO '{paths['agents']}' (FORMAT parquet)"
    )
    con.execute(f"COPY (SELECT 'top secret' AS s) TO '{paths['secret']}' (FORMAT parquet)")
    con.close()
    paths["broken"].write_text("id,name\n1,not parquet\n")
    paths["root"] = root
    return paths


def resolved(ref: str, path: Path | str, name: str | None = None) -> ResolvedTable:
    return ResolvedTable(
        ref=ref,
        dataset_id=str(uuid.uuid4()),
        name=name or ref.rsplit(".", 1)[-1],
        owner_id=OWNER,
        version=1,
        path=str(path),
        storage_url="file:///",
        columns=[],
        rows=0,
    )


@pytest.fixture(scope="module")
def tables(data: dict[str, Path]) -> dict[str, ResolvedTable]:
    return {
        "support_calls": resolved("support_calls", data["calls"]),
        f"{OWNER}.agents": resolved(f"{OWNER}.agents", data["agents"]),
        DATASET: resolved(DATASET, data["calls"], name="support_calls"),
        "broken": resolved("broken", data["broken"]),
    }


@pytest.fixture(scope="module")
def storage(data: dict[str, Path]) -> Storage:
    return Storage.from_url(data["root"].as_uri())


@pytest.fixture(scope="module")
def duck(storage: Storage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DuckDBEngine]:
    engine = create_engine("duckdb", storage=storage, settings=EngineSettings(workdir=tmp_path_factory.mktemp("wd")))
    assert isinstance(engine, DuckDBEngine)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def ch(storage: Storage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChdbEngine]:
    engine = create_engine(
        "clickhouse", storage=storage, settings=EngineSettings(workdir=tmp_path_factory.mktemp("wd"))
    )
    assert isinstance(engine, ChdbEngine)
    yield engine
    engine.close()


@pytest.fixture(params=["duckdb", "clickhouse"])
def engine(request: pytest.FixtureRequest) -> Engine:
    found: Engine = request.getfixturevalue("duck" if request.param == "duckdb" else "ch")
    return found


def spec(
    tmp_path: Path,
    sql: str,
    tables: dict[str, ResolvedTable] | None = None,
    *,
    parameters: dict[str, Any] | None = None,
    max_rows: int = 1000,
    timeout_s: float = 60,
    dry_run: bool = False,
) -> RunSpec:
    return RunSpec(
        query_id=f"job-{uuid.uuid4().hex[:8]}",
        sql=sql,
        parameters=parameters or {},
        tables=tables or {},
        output=tmp_path / f"result-{uuid.uuid4().hex[:8]}.parquet",
        max_rows=max_rows,
        timeout_s=timeout_s,
        dry_run=dry_run,
    )


def run(engine: Engine, run_spec: RunSpec) -> tuple[RunResult, list[dict[str, Any]]]:
    result = engine.start(run_spec).run()
    rows: list[dict[str, Any]] = [] if run_spec.dry_run else pq.read_table(run_spec.output).to_pylist()
    return result, rows


def run_in_thread(engine: Engine, run_spec: RunSpec) -> tuple[Any, threading.Thread, list[Any]]:
    execution = engine.start(run_spec)
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(execution.run())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    return execution, thread, outcome


# ---------------------------------------------------------------------------------------------- both engines


def test_create_engine_picks_by_name(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown engine"):
        create_engine("sqlite", storage=storage, settings=EngineSettings(workdir=tmp_path))
    server = create_engine(
        "clickhouse", storage=storage, settings=EngineSettings(workdir=tmp_path, clickhouse_url="http://h:8123")
    )
    assert isinstance(server, ClickHouseServerEngine)
    server.close()


@pytest.mark.parametrize(
    ("sql", "ref"),
    [
        ("SELECT * FROM support_calls", TableRef("support_calls", ("support_calls",))),
        (f'SELECT * FROM "{OWNER}".agents AS a', TableRef(f"{OWNER}.agents", (OWNER, "agents"))),
        (f'SELECT * FROM "{DATASET}"', TableRef(DATASET, (DATASET,))),
    ],
)
def test_analyze_names_the_tables_as_resolve_takes_them(engine: Engine, sql: str, ref: TableRef) -> None:
    assert engine.analyze(sql).tables == (ref,)


def test_analyze_finds_tables_everywhere_but_ctes(engine: Engine) -> None:
    sql = f"""
        WITH recent AS (SELECT * FROM support_calls WHERE id > 10),
             per_agent AS (SELECT agent, count(*) AS n FROM recent GROUP BY agent)
        SELECT p.agent, a.name, p.n
        FROM per_agent AS p JOIN "{OWNER}".agents AS a ON a.agent = p.agent
        WHERE p.agent IN (SELECT agent FROM escalations)
        UNION ALL
        SELECT 0, 'x', count(*) FROM "{DATASET}"
    """
    analysis = engine.analyze(sql)
    assert sorted(t.ref for t in analysis.tables) == sorted(
        ["support_calls", f"{OWNER}.agents", "escalations", DATASET]
    )
    assert analysis.kind == "select"


def test_analyze_lists_parameters_in_order(duck: DuckDBEngine, ch: ChdbEngine) -> None:
    assert duck.analyze("SELECT * FROM t WHERE a = $b AND c > $a AND d = $b").parameters == ("b", "a")
    assert ch.analyze("SELECT * FROM t WHERE a = {b:Int32} AND c > {a:Date} AND d = {b:Int32}").parameters == (
        "b",
        "a",
    )


def test_explain_tables_count(engine: Engine) -> None:
    analysis = engine.analyze("EXPLAIN SELECT count(*) FROM support_calls")
    assert analysis.kind == "explain"
    assert [t.ref for t in analysis.tables] == ["support_calls"]


@pytest.mark.parametrize("sql", ["SELECT 1; SELECT 2", "SELECT 1;\n\nSELECT * FROM support_calls;"])
def test_two_statements_are_refused(engine: Engine, sql: str) -> None:
    with pytest.raises(MultipleStatements):
        engine.analyze(sql)


def test_a_trailing_semicolon_and_comments_are_fine(engine: Engine, tmp_path: Path, tables: Any) -> None:
    _, rows = run(engine, spec(tmp_path, "-- top\nSELECT count(*) AS n FROM support_calls; -- done", tables))
    assert rows == [{"n": 1000}]


def test_result_is_parquet_with_columns_and_at_most_max_rows(engine: Engine, tmp_path: Path, tables: Any) -> None:
    sql = "SELECT id, note FROM support_calls WHERE id < 10 ORDER BY id"
    exact, rows = run(engine, spec(tmp_path, sql, tables, max_rows=10))
    assert (exact.rows, exact.truncated, len(rows)) == (10, False, 10)
    assert rows[0] == {"id": 0, "note": "call 0"}
    assert [c["name"] for c in exact.columns] == ["id", "note"]

    cut, rows = run(engine, spec(tmp_path, sql, tables, max_rows=9))
    assert (cut.rows, cut.truncated, len(rows)) == (9, True, 9)
    assert rows[-1]["id"] == 8

    empty = spec(tmp_path, "SELECT id, note FROM support_calls WHERE id < 0", tables)
    none, rows = run(engine, empty)
    assert (none.rows, none.truncated, rows) == (0, False, [])
    assert pq.read_schema(empty.output).names == ["id", "note"]  # an empty result still has its schema


def test_large_results_stream_into_row_groups(engine: Engine, tmp_path: Path) -> None:
    sql = (
        "SELECT number AS n FROM numbers(300001)"
        if engine.name == "clickhouse"
        else "SELECT range AS n FROM range(300001)"
    )
    run_spec = spec(tmp_path, sql, max_rows=300_000)
    result = engine.start(run_spec).run()
    assert (result.rows, result.truncated) == (300_000, True)
    meta = pq.ParquetFile(run_spec.output).metadata
    assert meta.num_rows == 300_000
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [122_880, 122_880, 54_240]
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_dataset_by_owner_and_by_id(engine: Engine, tmp_path: Path, tables: Any) -> None:
    sql = (
        f'SELECT a.name, count(*) AS n FROM "{DATASET}" AS c JOIN "{OWNER}".agents AS a ON a.agent = c.agent '
        "GROUP BY a.name ORDER BY a.name"
    )
    result, rows = run(engine, spec(tmp_path, sql, tables))
    assert rows[0] == {"name": "agent 0", "n": 143}
    assert result.rows == 7


def test_unqualified_names_keep_working_as_qualifiers(engine: Engine, tmp_path: Path, tables: Any) -> None:
    _, rows = run(
        engine, spec(tmp_path, "SELECT support_calls.id FROM support_calls WHERE support_calls.id = 3", tables)
    )
    assert rows == [{"id": 3}]


def test_a_table_not_in_the_spec_is_not_found(engine: Engine, tmp_path: Path, tables: Any) -> None:
    with pytest.raises(TableNotFound) as caught:
        engine.start(spec(tmp_path, "SELECT *\nFROM support_calls, escalations", tables)).run()
    assert caught.value.position == (2, 21)


def test_unknown_column_has_its_position(engine: Engine, tmp_path: Path, tables: Any) -> None:
    with pytest.raises(ColumnNotFound) as caught:
        engine.start(spec(tmp_path, "SELECT id,\n       duration FROM support_calls", tables)).run()
    assert caught.value.position == (2, 8)
    assert "duration" in caught.value.message


def test_dry_run_returns_columns_and_plan_without_running(engine: Engine, tmp_path: Path, tables: Any) -> None:
    run_spec = spec(tmp_path, "SELECT agent, count(*) AS n FROM support_calls GROUP BY agent", tables, dry_run=True)
    result = engine.start(run_spec).run()
    assert result.rows == 0
    assert [c["name"] for c in result.columns] == ["agent", "n"]
    assert result.plan
    assert not run_spec.output.exists()
    with pytest.raises(ColumnNotFound):
        engine.start(spec(tmp_path, "SELECT nope FROM support_calls", tables, dry_run=True)).run()


def test_explain_output_does_not_show_our_files(engine: Engine, tmp_path: Path, tables: Any, data: Any) -> None:
    sql = (
        "EXPLAIN ANALYZE SELECT * FROM support_calls"
        if engine.name == "duckdb"
        else "EXPLAIN SYNTAX SELECT * FROM support_calls"
    )
    result, rows = run(engine, spec(tmp_path, sql, tables))
    text = str(rows)
    assert result.rows >= 1
    assert "support_calls" in text
    assert str(data["root"]) not in text


def test_errors_do_not_show_our_files(engine: Engine, tmp_path: Path, tables: Any, data: Any) -> None:
    with pytest.raises(QueryError) as caught:
        engine.start(spec(tmp_path, "SELECT * FROM broken", tables)).run()
    assert str(data["root"]) not in caught.value.message
    assert "data.parquet" not in caught.value.message


def test_cancel_stops_a_long_query_within_a_second(engine: Engine, tmp_path: Path) -> None:
    sql = (
        "SELECT count() FROM numbers(100000) AS a, numbers(100000) AS b WHERE a.number + b.number = 7"
        if engine.name == "clickhouse"
        else "SELECT count(*) FROM range(100000) a, range(100000) b WHERE a.range + b.range = 7"
    )
    execution, thread, outcome = run_in_thread(engine, spec(tmp_path, sql))
    time.sleep(0.5)
    assert thread.is_alive()
    progress = execution.progress()
    assert progress is None or 0 <= progress <= 1
    cancelled = time.monotonic()
    execution.cancel()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - cancelled < 1.0
    assert isinstance(outcome[0], Interrupted)
    execution.cancel()  # idempotent, also once it ended


def test_cancel_before_run(engine: Engine, tmp_path: Path) -> None:
    execution = engine.start(spec(tmp_path, "SELECT 1"))
    execution.cancel()
    with pytest.raises(Interrupted):
        execution.run()


def test_progress_during_a_scan(engine: Engine, tmp_path: Path) -> None:
    sql = (
        "SELECT count() FROM numbers(20000000000) WHERE number % 13 = 1"
        if engine.name == "clickhouse"
        else "SELECT count(*) FROM range(20000000000) t(x) WHERE x % 13 = 1"
    )
    execution, thread, outcome = run_in_thread(engine, spec(tmp_path, sql))
    seen: list[float] = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not seen:
        value = execution.progress()
        if value is not None:
            seen.append(value)
        time.sleep(0.05)
    execution.cancel()
    thread.join(5)
    assert seen and 0 <= seen[0] <= 1
    assert isinstance(outcome[0], Interrupted)


def test_the_engine_enforces_its_own_time_limit(engine: Engine, tmp_path: Path) -> None:
    sql = (
        "SELECT count() FROM numbers(100000) AS a, numbers(100000) AS b WHERE a.number + b.number = 7"
        if engine.name == "clickhouse"
        else "SELECT count(*) FROM range(100000) a, range(100000) b WHERE a.range + b.range = 7"
    )
    started = time.monotonic()
    with pytest.raises(Interrupted, match="time limit"):
        engine.start(spec(tmp_path, sql, timeout_s=1)).run()
    assert time.monotonic() - started < 3


def test_memory_limit(tmp_path: Path, storage: Storage) -> None:
    for name in ("duckdb", "clickhouse"):
        engine = create_engine(name, storage=storage, settings=EngineSettings(workdir=tmp_path, memory_limit="64MB"))
        sql = (
            "SELECT groupArray(toString(number)) FROM numbers(30000000)"
            if name == "clickhouse"
            else "SELECT list(range::VARCHAR) FROM range(30000000)"
        )
        try:
            with pytest.raises(ResourceLimit):
                engine.start(spec(tmp_path, sql)).run()
        finally:
            engine.close()


# ------------------------------------------------------------------------------------------------------- DuckDB


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("SELECT 1", "select"),
        ("VALUES (1), (2)", "select"),
        ("FROM support_calls", "select"),
        ("SELECT 1 UNION ALL SELECT 2", "select"),
        ("EXPLAIN SELECT 1", "explain"),
        ("DESCRIBE support_calls", "describe"),
        ("SHOW TABLES", "show"),
        ("SUMMARIZE support_calls", "summarize"),
        ("PRAGMA version", "pragma"),
    ],
)
def test_duckdb_read_only_statements(duck: DuckDBEngine, sql: str, kind: str) -> None:
    assert duck.analyze(sql).kind == kind


@pytest.mark.parametrize(
    "sql",
    [
        "COPY support_calls TO '/tmp/out.csv'",
        "ATTACH ':memory:' AS other",
        "DETACH other",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET threads = 8",
        "SET memory_limit = '100GB'",
        "RESET threads",
        "PRAGMA threads = 4",
        "PRAGMA enable_profiling",
        "PRAGMA table_info('support_calls')",
        "CREATE TABLE t AS SELECT 1",
        "CREATE MACRO m(x) AS x",
        "INSERT INTO support_calls VALUES (1)",
        "UPDATE support_calls SET id = 1",
        "DELETE FROM support_calls",
        "DROP TABLE support_calls",
        "ALTER TABLE support_calls ADD COLUMN x INT",
        "EXPORT DATABASE '/tmp/db'",
        "IMPORT DATABASE '/tmp/db'",
        "CALL pragma_version()",
        "USE memory",
        "CHECKPOINT",
        "VACUUM",
        "PREPARE p AS SELECT 1",
        "BEGIN",
        "SET VARIABLE x = 1",
        "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
        "UPDATE EXTENSIONS",
    ],
)
def test_duckdb_refuses_anything_but_one_read(duck: DuckDBEngine, sql: str) -> None:
    with pytest.raises(ForbiddenStatement):
        duck.analyze(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_parquet('{secret}')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM read_blob('/etc/hostname')",
        "SELECT * FROM glob('/*')",
        "SELECT * FROM duckdb_settings()",
        "SELECT * FROM query('SELECT 1')",
        "SELECT current_setting('allowed_paths')",
        "SELECT getenv('HOME')",
        "SELECT * FROM support_calls WHERE id IN (SELECT * FROM read_csv('/etc/passwd'))",
        "WITH x AS (SELECT * FROM glob('/*')) SELECT * FROM x",
    ],
)
def test_duckdb_refuses_files_settings_and_environment(duck: DuckDBEngine, sql: str, data: Any) -> None:
    with pytest.raises(SandboxViolation):
        duck.analyze(sql.format(secret=data["secret"]))


def test_duckdb_a_file_named_as_a_table_is_not_found(duck: DuckDBEngine, tmp_path: Path, data: Any) -> None:
    # DuckDB reads 'x.parquet' in FROM as a file ("replacement scan"): here it is a name that does not resolve
    analysis = duck.analyze(f"SELECT * FROM '{data['secret']}'")
    assert [t.ref for t in analysis.tables] == [str(data["secret"])]
    with pytest.raises(TableNotFound):
        duck.start(spec(tmp_path, f"SELECT * FROM '{data['secret']}'")).run()


@pytest.mark.parametrize(
    ("sql", "error"),
    [
        ("SELECT * FROM read_parquet('{secret}')", SandboxViolation),
        ("SELECT * FROM read_csv('/etc/passwd')", SandboxViolation),
        ("SELECT * FROM read_text('/etc/hostname')", SandboxViolation),
        ("SELECT * FROM glob('/*')", SandboxViolation),
        ("COPY (SELECT 1) TO '{out}'", SandboxViolation),
        ("INSTALL httpfs", SandboxViolation),
        ("LOAD httpfs", SandboxViolation),
        ("SET threads = 8", ForbiddenStatement),
        ("SET memory_limit = '100GB'", ForbiddenStatement),
        ("SET allowed_paths = ['/']", ForbiddenStatement),
        ("SET enable_external_access = true", ForbiddenStatement),
        ("RESET threads", ForbiddenStatement),
        ("PRAGMA enable_profiling", ForbiddenStatement),
    ],
)
def test_duckdb_sandbox_holds_without_the_analysis(
    duck: DuckDBEngine, tmp_path: Path, tables: Any, data: Any, sql: str, error: type[QueryError]
) -> None:
    """The connection itself refuses what the analysis would: the analysis is not the only wall."""
    execution = duck.start(spec(tmp_path, "SELECT count(*) FROM support_calls", tables))
    con = duck._take_connection()
    try:
        execution._sandbox(con)
        assert con.sql("SELECT count(*) FROM support_calls").fetchall() == [(1000,)]
        statement = sql.format(secret=data["secret"], out=tmp_path / "copy.csv")
        with pytest.raises(duckdb.Error) as caught:
            con.execute(statement).fetchall()
        from strata.execution.engines.duckdb import _map_error

        assert isinstance(_map_error(caught.value, statement), error)
        assert not (tmp_path / "copy.csv").exists()
    finally:
        con.close()


def test_duckdb_statements_that_only_read(duck: DuckDBEngine, tmp_path: Path, tables: Any) -> None:
    for sql, first in [
        ("DESCRIBE support_calls", {"column_name": "id", "column_type": "BIGINT"}),
        ("SHOW support_calls", {"column_name": "id", "column_type": "BIGINT"}),
        ("SUMMARIZE support_calls", {"column_name": "id", "column_type": "BIGINT"}),
        ("PRAGMA version", None),
        ("FROM support_calls SELECT max(id) AS m", {"m": 999}),
    ]:
        result, rows = run(duck, spec(tmp_path, sql, tables))
        assert result.rows == len(rows) > 0
        if first is not None:
            assert first.items() <= rows[0].items()


def test_duckdb_parameters(duck: DuckDBEngine, tmp_path: Path, tables: Any) -> None:
    sql = "SELECT count(*) AS n FROM support_calls WHERE agent = $agent AND day >= $since"
    _, rows = run(duck, spec(tmp_path, sql, tables, parameters={"agent": 3, "since": "2024-02-01"}))
    assert rows == [{"n": 94}]
    with pytest.raises(ParameterError, match=r"\$since") as missing:
        duck.start(spec(tmp_path, sql, tables, parameters={"agent": 3})).run()
    assert missing.value.detail["parameter"] == "since"
    with pytest.raises(ParameterError, match=r"\$extra"):
        duck.start(spec(tmp_path, sql, tables, parameters={"agent": 3, "since": "2024-01-01", "extra": 1})).run()
    with pytest.raises(ParameterError, match=r"\$agent") as mistyped:
        duck.start(spec(tmp_path, sql, tables, parameters={"agent": "three", "since": "2024-01-01"})).run()
    assert mistyped.value.detail["parameter"] == "agent"
    with pytest.raises(ParameterError):
        duck.analyze("SELECT * FROM support_calls WHERE id = ?")


def test_duckdb_syntax_error_has_line_and_column(duck: DuckDBEngine) -> None:
    with pytest.raises(SqlSyntaxError) as caught:
        duck.analyze("SELECT id\nFROM support_calls\nWHER id = 1")
    assert caught.value.position == (3, 6)
    with pytest.raises(SqlSyntaxError) as caught:
        duck.analyze("SELECT 'é',\n  FROM x ORDER")
    assert caught.value.position is not None and caught.value.position[0] == 2


def test_duckdb_bind_errors(duck: DuckDBEngine, tmp_path: Path, tables: Any) -> None:
    with pytest.raises(BindError):
        duck.start(spec(tmp_path, "SELECT sum(note) FROM support_calls", tables)).run()
    with pytest.raises(BindError):
        duck.start(spec(tmp_path, "SELECT no_such_function(1)", tables)).run()
    with pytest.raises(EngineError, match="Could not convert"):
        duck.start(spec(tmp_path, "SELECT note::INT FROM support_calls", tables)).run()


def test_duckdb_connections_are_ready_before_the_run(duck: DuckDBEngine, tmp_path: Path, tables: Any) -> None:
    setups = []
    for _ in range(5):
        time.sleep(0.05)  # a spare is made after each run, off its path
        result, _ = run(duck, spec(tmp_path, "SELECT count(*) FROM support_calls", tables))
        setups.append(result.stats["setup_ms"])
    assert min(setups) < 8  # a fresh database alone takes ~12 ms


def test_duckdb_reads_datasets_from_s3(s3_server: str, tmp_path: Path, data: Any) -> None:
    bucket = f"strata-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client(
        "s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    )
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(data["calls"]), bucket, "strata/datasets/1/v1/data.parquet")
    s3.upload_file(str(data["secret"]), bucket, "strata/datasets/2/v1/data.parquet")
    s3.close()
    storage = Storage.from_url(
        f"s3://{bucket}/strata", s3_endpoint_url=s3_server, s3_region="us-east-1", s3_key="test", s3_secret="test"
    )
    engine = DuckDBEngine(storage=storage, settings=EngineSettings(workdir=tmp_path))
    try:
        calls = {"calls": resolved("calls", storage.engine_path("datasets/1/v1/data.parquet"))}
        _, rows = run(engine, spec(tmp_path, "SELECT count(*) AS n, max(id) AS m FROM calls", calls))
        assert rows == [{"n": 1000, "m": 999}]
        # the fsspec filesystem is registered, but the allow-list still holds for other objects
        con = engine._take_connection()
        try:
            engine.start(spec(tmp_path, "SELECT * FROM calls", calls))._sandbox(con)
            with pytest.raises(duckdb.PermissionException):
                con.sql(f"SELECT * FROM read_parquet('{storage.engine_path('datasets/2/v1/data.parquet')}')")
        finally:
            con.close()
    finally:
        engine.close()
        asyncio.run(storage.close())


# ------------------------------------------------------------------------------------------- DuckDB: result writer


def writer(path: Path) -> str:
    """Which Parquet writer made a file: ``DuckDB`` or ``parquet-cpp-arrow`` (pyarrow)."""
    return str(pq.read_metadata(path).created_by).split(" ", 1)[0]


def test_duckdb_writes_large_results_itself_small_ones_with_pyarrow(duck: DuckDBEngine, tmp_path: Path) -> None:
    """The rule: a query's result of more than _COPY_FROM_ROWS rows is written by DuckDB's COPY, anything less by
    pyarrow, and so are statements that are not queries, whatever their size."""
    for rows, expected in [
        (1000, "parquet-cpp-arrow"),
        (_COPY_FROM_ROWS, "parquet-cpp-arrow"),
        (_COPY_FROM_ROWS + 1, "DuckDB"),
    ]:
        run_spec = spec(tmp_path, f"SELECT range AS n FROM range({rows})", max_rows=1_000_000)
        result = duck.start(run_spec).run()
        assert (result.rows, result.truncated, writer(run_spec.output)) == (rows, False, expected)
    # truncated to at most _COPY_FROM_ROWS rows: pyarrow, even though the query has more
    run_spec = spec(tmp_path, "SELECT range AS n FROM range(1000000)", max_rows=1000)
    result = duck.start(run_spec).run()
    assert (result.rows, result.truncated, writer(run_spec.output)) == (1000, True, "parquet-cpp-arrow")
    run_spec = spec(tmp_path, "EXPLAIN ANALYZE SELECT count(*) FROM range(10)", max_rows=1_000_000)
    duck.start(run_spec).run()
    assert writer(run_spec.output) == "parquet-cpp-arrow"


@pytest.mark.parametrize(
    ("max_rows", "rows", "truncated"),
    [(2_000_000, 400_000, False), (400_000, 400_000, False), (399_999, 399_999, True), (250_000, 250_000, True)],
)
def test_duckdb_copy_writes_exactly_max_rows_in_order(
    duck: DuckDBEngine, tmp_path: Path, max_rows: int, rows: int, truncated: bool
) -> None:
    sql = "SELECT range AS n, 'row ' || range AS note\nFROM range(400000)\nORDER BY n DESC -- newest first"
    run_spec = spec(tmp_path, sql, max_rows=max_rows)
    result = duck.start(run_spec).run()
    assert (result.rows, result.truncated) == (rows, truncated)
    assert result.columns == [
        {"name": "n", "type": "BIGINT", "nullable": True},
        {"name": "note", "type": "VARCHAR", "nullable": True},
    ]
    assert writer(run_spec.output) == "DuckDB"
    table = pq.read_table(run_spec.output)
    assert table.column("n").to_pylist() == list(range(399_999, 399_999 - rows, -1))
    assert table.column("note")[rows - 1].as_py() == f"row {400_000 - rows}"
    meta = pq.ParquetFile(run_spec.output).metadata
    assert meta.row_group(0).num_rows == 122_880
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_duckdb_copy_keeps_insertion_order_of_a_dataset(duck: DuckDBEngine, tmp_path: Path, tables: Any) -> None:
    sql = "SELECT c.id, x.range AS k FROM support_calls AS c, range(300) AS x"  # 300,000 rows, no ORDER BY
    run_spec = spec(tmp_path, sql, tables, max_rows=1_000_000)
    con = duckdb.connect()
    try:
        direct = sql.replace("support_calls", f"read_parquet('{tables['support_calls'].path}')")
        expected = con.execute(direct).fetchall()
    finally:
        con.close()
    result = duck.start(run_spec).run()
    assert (result.rows, writer(run_spec.output)) == (300_000, "DuckDB")
    table = pq.read_table(run_spec.output)
    assert list(zip(table.column("id").to_pylist(), table.column("k").to_pylist(), strict=True)) == expected


def test_duckdb_copy_binds_parameters(duck: DuckDBEngine, tmp_path: Path) -> None:
    sql = "SELECT range AS n, $label AS label FROM range(1000000) WHERE range >= $low"
    run_spec = spec(tmp_path, sql, parameters={"label": "it's", "low": 700_000}, max_rows=1_000_000)
    result = duck.start(run_spec).run()
    assert (result.rows, result.truncated, writer(run_spec.output)) == (300_000, False, "DuckDB")
    table = pq.read_table(run_spec.output)
    assert table.column("n")[0].as_py() == 700_000
    assert set(table.column("label").to_pylist()) == {"it's"}


async def test_duckdb_copy_and_pyarrow_give_the_same_pages(duck: DuckDBEngine, tmp_path: Path) -> None:
    """The results service reads the file with pyarrow: the same query, written by each writer, reads back alike."""
    storage = Storage.from_url(tmp_path.as_uri())
    select = """
        SELECT TIMESTAMPTZ '2024-03-01 12:34:56.789+02' + to_seconds(i) AS tstz, TIMESTAMP '2024-03-01 12:00' AS ts,
               '2024-03-01 12:34:56.123456789'::TIMESTAMP_NS AS ts_ns, DATE '2024-03-01' + (i % 9)::INT AS d,
               TIME '12:34:56.5' AS t, (i * 0.5)::DECIMAL(12,2) AS dec,
               '0b7c4a52-7d1e-4bbf-9a38-3c6f3f1f8a11'::UUID AS id, [i, NULL] AS list, {'a': i, 'b': 'x'} AS struct,
               MAP {'k': i} AS map, (INTERVAL '1 month 2 days')::VARCHAR AS iv,
               170141183460469231731687303715884105727::HUGEINT AS huge, 18446744073709551615::UBIGINT AS ubig,
               '\\xAA\\x00'::BLOB AS blob, 'nan'::DOUBLE AS nan, 'é' AS text, i % 2 = 0 AS flag, NULL AS nothing,
               [{'a': [i], 'm': MAP {1: 'x'}}] AS nested
        FROM range(200000) t(i)
    """
    seen: dict[str, tuple[Any, ...]] = {}
    for name, sql, offset in [
        ("DuckDB", select, 199_990),  # 200,000 rows: DuckDB's writer
        ("parquet-cpp-arrow", f"SELECT * FROM ({select}) OFFSET 199990", 0),  # the same last 10 rows: pyarrow's
    ]:
        run_spec = spec(tmp_path, sql, max_rows=1_000_000)
        result = await asyncio.to_thread(duck.start(run_spec).run)
        assert writer(run_spec.output) == name
        page = await read_page(storage, run_spec.output.name, offset=offset, limit=10)
        seen[name] = (result.columns, page.columns, page.rows)
    assert seen["DuckDB"] == seen["parquet-cpp-arrow"]
    assert len(seen["DuckDB"][2]) == 10


@pytest.mark.parametrize(
    ("select", "names"),
    [
        ("[1, 2, 3]::INTEGER[3] AS a", ["a"]),  # DuckDB writes a fixed-size list with a NULL row pyarrow cannot read
        ("('x' || (range % 2))::ENUM('x0', 'x1') AS e", ["e"]),
        ("'2024-01-01 10:00:00'::TIMESTAMP_S AS s", ["s"]),
        ("1 AS a, 2 AS A", ["a", "A"]),  # DuckDB's writer would rename the second a_1
    ],
)
def test_duckdb_columns_its_writer_would_change_go_to_pyarrow(
    duck: DuckDBEngine, tmp_path: Path, select: str, names: list[str]
) -> None:
    run_spec = spec(tmp_path, f"SELECT {select} FROM range(300000)", max_rows=1_000_000)
    result = duck.start(run_spec).run()
    assert (result.rows, writer(run_spec.output)) == (300_000, "parquet-cpp-arrow")
    table = pq.read_table(run_spec.output)
    assert table.schema.names == names == [c["name"] for c in result.columns]
    assert table.num_rows == 300_000


def test_duckdb_copy_replaces_an_existing_output(duck: DuckDBEngine, tmp_path: Path) -> None:
    run_spec = spec(tmp_path, "SELECT range AS n FROM range(300000)", max_rows=1_000_000)
    run_spec.output.write_bytes(b"an earlier attempt")
    result = duck.start(run_spec).run()
    assert (result.rows, writer(run_spec.output)) == (300_000, "DuckDB")
    assert not list(tmp_path.glob("tmp_*"))


def test_duckdb_copy_reads_the_result_not_a_table_of_the_same_name(
    duck: DuckDBEngine, tmp_path: Path, data: Any
) -> None:
    tables = {"strata_result_stream": resolved("strata_result_stream", data["agents"])}
    sql = "SELECT s.name, x.range AS k FROM strata_result_stream AS s, range(30000) AS x ORDER BY k, s.agent"
    run_spec = spec(tmp_path, sql, tables, max_rows=1_000_000)
    result = duck.start(run_spec).run()
    assert (result.rows, writer(run_spec.output)) == (210_000, "DuckDB")
    assert pq.read_table(run_spec.output).slice(0, 2).to_pylist() == [
        {"name": "agent 0", "k": 0},
        {"name": "agent 1", "k": 0},
    ]


def test_duckdb_errors_while_copying_are_the_querys(duck: DuckDBEngine, tmp_path: Path) -> None:
    sql = (
        "SELECT CASE WHEN range = 3000000 THEN error('boom at three million') ELSE range END AS n\nFROM range(4000000)"
    )
    run_spec = spec(tmp_path, sql, max_rows=10_000_000)
    with pytest.raises(EngineError, match="boom at three million") as caught:
        duck.start(run_spec).run()
    assert "strata_result_stream" not in caught.value.message
    assert not run_spec.output.exists()
    with pytest.raises(ColumnNotFound) as missing:
        duck.start(spec(tmp_path, "SELECT range AS n,\n       nope\nFROM range(4000000)", max_rows=10_000_000)).run()
    assert missing.value.position == (2, 8)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_duckdb_cancel_and_deadline_stop_the_copy(duck: DuckDBEngine, tmp_path: Path, how: str) -> None:
    sql = "SELECT a.range AS a, b.range AS b, md5(a.range::VARCHAR) AS h FROM range(100000) a, range(100000) b"
    timeout_s = 3.0 if how == "deadline" else 60
    run_spec = spec(tmp_path, sql, max_rows=10_000_000_000, timeout_s=timeout_s)
    started = time.monotonic()
    execution, thread, outcome = run_in_thread(duck, run_spec)
    while time.monotonic() < started + 2.5 and getattr(execution, "_cursor", None) is None:
        time.sleep(0.01)
    assert execution._cursor is not None  # DuckDB's writer is at work
    progress = execution.progress()
    assert progress is None or 0 <= progress <= 1
    if how == "cancel":
        cancelled = time.monotonic()
        execution.cancel()
        thread.join(5)
        assert time.monotonic() - cancelled < 1.0
    else:
        thread.join(timeout_s + 5)
        assert time.monotonic() - started < timeout_s + 1.0
    assert not thread.is_alive()
    assert isinstance(outcome[0], Interrupted)
    assert str(outcome[0]) == (
        "the query was cancelled" if how == "cancel" else "the query ran longer than its time limit"
    )
    assert not run_spec.output.exists()


def test_duckdb_a_copy_that_fails_midway_never_hangs(duck: DuckDBEngine, tmp_path: Path) -> None:
    """DuckDB 2.0's COPY can hang for good when it fails or is interrupted with asynchronous writes in flight (about
    one run in fifteen here); the engine's databases have none (``async_threads=0``)."""
    con = duck._take_connection()
    try:
        assert con.execute("SELECT current_setting('async_threads')").fetchall() == [(0,)]
    finally:
        con.close()
    for attempt in range(8):
        failing = attempt % 2 == 0
        sql = (
            "SELECT CASE WHEN range = 3000000 THEN error('boom') ELSE range END AS n FROM range(4000000)"
            if failing
            else "SELECT a.range AS a, b.range AS b FROM range(10000) a, range(10000) b"
        )
        run_spec = spec(tmp_path, sql, max_rows=10_000_000_000)
        execution, thread, outcome = run_in_thread(duck, run_spec)
        if not failing:
            time.sleep(0.1 + 0.1 * attempt)
            execution.cancel()
        thread.join(20)
        assert not thread.is_alive(), f"attempt {attempt} hangs"
        assert isinstance(outcome[0], EngineError if failing else Interrupted)
        assert not run_spec.output.exists()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1) TO '{target}' (FORMAT csv); --",
        "SELECT 1 AS x) TO '{target}' (FORMAT csv) --",
        "SELECT 1\n) TO '{target}' (FORMAT csv)\n--",
        "SELECT * FROM (SELECT 1)) TO '{target}' (FORMAT csv); SELECT (1",
    ],
)
def test_duckdb_a_query_cannot_steer_our_copy(duck: DuckDBEngine, tmp_path: Path, sql: str) -> None:
    """Our COPY never holds the user's text (it reads the result as Arrow batches); a statement made to close a
    wrapping parenthesis early is refused by the analysis anyway, and refused when run."""
    target = tmp_path / "stolen.csv"
    statement = sql.format(target=target)
    with pytest.raises((SqlSyntaxError, MultipleStatements)):
        duck.analyze(statement)
    with pytest.raises((SqlSyntaxError, MultipleStatements)):
        duck.start(spec(tmp_path, statement)).run()
    assert not target.exists()


def test_duckdb_copy_text_in_a_query_is_only_text(duck: DuckDBEngine, tmp_path: Path) -> None:
    target = tmp_path / "stolen.csv"
    sql = (
        f"SELECT range AS n, ') TO ''{target}'' (FORMAT csv); --' AS s\n"
        f"FROM range(300000) -- ) TO '{target}' (FORMAT csv)\n"
        f"/* ) TO '{target}' (FORMAT csv) */"
    )
    run_spec = spec(tmp_path, sql, max_rows=1_000_000)
    result = duck.start(run_spec).run()
    assert (result.rows, writer(run_spec.output)) == (300_000, "DuckDB")
    assert pq.read_table(run_spec.output).slice(0, 1).to_pylist() == [
        {"n": 0, "s": f") TO '{target}' (FORMAT csv); --"}
    ]
    assert not target.exists()


def test_duckdb_sandbox_allows_writing_the_output_only(
    duck: DuckDBEngine, tmp_path: Path, tables: Any, data: Any
) -> None:
    """A query's sandbox may write its own output (our COPY does) and nothing next to it; other statements and dry
    runs may not write at all."""
    for sql, dry_run, output_allowed in [
        ("SELECT * FROM support_calls", False, True),
        ("SELECT * FROM support_calls", True, False),
        ("DESCRIBE support_calls", False, False),
    ]:
        run_spec = spec(tmp_path, sql, tables, dry_run=dry_run)
        execution = duck.start(run_spec)
        con = duck._take_connection()
        try:
            execution._sandbox(con)
            copy = f"COPY (SELECT 1 AS x) TO '{run_spec.output}' (FORMAT parquet, USE_TMP_FILE false)"
            if output_allowed:
                con.execute(copy).fetchall()
                assert pq.read_table(run_spec.output).to_pylist() == [{"x": 1}]
            else:
                with pytest.raises(duckdb.PermissionException):
                    con.execute(copy).fetchall()
            for statement in [
                f"COPY (SELECT 1) TO '{tmp_path / 'next-to-it.parquet'}' (FORMAT parquet)",
                f"COPY (SELECT 1) TO '{run_spec.output}.csv' (FORMAT csv)",
                f"SELECT * FROM read_parquet('{data['secret']}')",
            ]:
                with pytest.raises(duckdb.PermissionException):
                    con.execute(statement).fetchall()
        finally:
            con.close()
    assert not (tmp_path / "next-to-it.parquet").exists()


# --------------------------------------------------------------------------------------------------- ClickHouse


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("SELECT 1", "select"),
        ("WITH 1 AS x SELECT x", "select"),
        ("SELECT 1 UNION ALL SELECT 2", "select"),
        ("(SELECT 1)", "select"),
        ("EXPLAIN SELECT 1", "explain"),
        ("EXPLAIN PIPELINE header = 1 SELECT 1", "explain"),
        ("EXPLAIN QUERY TREE SELECT 1", "explain"),
        ("DESCRIBE TABLE support_calls", "describe"),
        ("DESC (SELECT 1)", "describe"),
    ],
)
def test_clickhouse_read_only_statements(ch: ChdbEngine, sql: str, kind: str) -> None:
    assert ch.analyze(sql).kind == kind


@pytest.mark.parametrize(
    ("sql", "error"),
    [
        ("INSERT INTO FUNCTION file('/tmp/x.csv', 'CSV') SELECT 1", ForbiddenStatement),
        ("INSERT INTO support_calls VALUES (1)", ForbiddenStatement),
        ("SELECT 1 INTO OUTFILE '/tmp/x.csv'", ForbiddenStatement),
        ("SELECT 1 FORMAT CSV", ForbiddenStatement),
        ("SELECT count() FROM support_calls SETTINGS max_execution_time = 0", ForbiddenStatement),
        ("SELECT * FROM (SELECT 1 SETTINGS readonly = 0)", ForbiddenStatement),
        ("ATTACH TABLE t FROM '/tmp/t' (x Int32)", ForbiddenStatement),
        ("SET readonly = 0", ForbiddenStatement),
        ("SET max_memory_usage = 0", ForbiddenStatement),
        ("KILL QUERY WHERE 1", ForbiddenStatement),
        ("SYSTEM DROP DNS CACHE", ForbiddenStatement),
        ("OPTIMIZE TABLE support_calls", ForbiddenStatement),
        ("CREATE TABLE t (x Int32) ENGINE = Memory", ForbiddenStatement),
        ("SHOW PROCESSLIST", ForbiddenStatement),
        ("USE system", ForbiddenStatement),
        ("EXPLAIN PLAN max_threads = 64 SELECT 1", ForbiddenStatement),
        ("EXPLAIN INSERT INTO t VALUES (1)", ForbiddenStatement),
        ("SELECT file('/etc/passwd')", SandboxViolation),
        ("SELECT FILE('/etc/passwd')", SandboxViolation),
        ("SELECT * FROM file('/etc/passwd', 'CSV')", SandboxViolation),
        ("SELECT * FROM url('http://169.254.169.254/', 'CSV')", SandboxViolation),
        ("SELECT * FROM s3('http://bucket/key', 'Parquet')", SandboxViolation),
        ("SELECT * FROM remote('127.0.0.1', system.one)", SandboxViolation),
        ("SELECT * FROM executable('id', 'CSV', 'x String')", SandboxViolation),
        ("SELECT * FROM input('x String')", SandboxViolation),
        ("SELECT * FROM merge('system', '.*')", SandboxViolation),
        ("SELECT * FROM python(secrets)", SandboxViolation),
        ("SELECT getSetting('max_memory_usage')", SandboxViolation),
        ("SELECT hostName(), uptime()", SandboxViolation),
        ("SELECT dictGet('d', 'a', 1)", SandboxViolation),
        ("SELECT joinGet('j', 'v', 1)", SandboxViolation),
        ("SELECT 1 WHERE 'x' IN system.processes", TableNotFound),
        ("SELECT {t:Identifier}", ParameterError),
        ("SELECT * FROM support_calls WHERE id = ?", ParameterError),
        ("SELECT 1 AS `a\nFunction file`", ForbiddenStatement),
        ("SELECT 1; SELECT 2", MultipleStatements),
        ("EXPLAIN SELECT 1; SELECT 2", MultipleStatements),
        ("EXPLAIN SELECT * FROM file('/etc/passwd')", SandboxViolation),
        ("EXPLAIN SELECT 1 INTO OUTFILE '/tmp/x'", ForbiddenStatement),
        ("SELEC 1", SqlSyntaxError),
    ],
)
def test_clickhouse_refuses(ch: ChdbEngine, sql: str, error: type[QueryError]) -> None:
    with pytest.raises(error):
        ch.analyze(sql)


@pytest.mark.parametrize("table", ["system.processes", "system.settings", "information_schema.tables", "default.t"])
def test_clickhouse_other_databases_are_not_found(ch: ChdbEngine, tmp_path: Path, tables: Any, table: str) -> None:
    assert [t.ref for t in ch.analyze(f"SELECT * FROM {table}").tables] == [table]  # the resolver will not know it
    with pytest.raises(TableNotFound):
        ch.start(spec(tmp_path, f"SELECT * FROM {table}", tables)).run()


@pytest.mark.parametrize(
    "final",
    [
        "SELECT * FROM file('{path}', 'Parquet') AS t, file('/etc/passwd', 'CSV') AS x",
        "SELECT file('/etc/passwd')",
        "SELECT * FROM system.one",
        "SELECT 1 SETTINGS readonly = 0",
        "SELECT 1 INTO OUTFILE '/tmp/x'",
        "SELECT 1 FORMAT TSV",
        "SELECT * FROM file('{path}', 'CSV')",
        "SELECT * FROM url('http://localhost/', 'CSV', 'x String')",
        "SELECT 1 WHERE 1 IN system.one",
    ],
)
def test_clickhouse_verification_by_its_own_parser(ch: ChdbEngine, data: Any, final: str) -> None:
    """Step 3: whatever reaches ClickHouse is parsed by ClickHouse and checked again."""
    path = str(data["calls"])
    stmt = analyze_clickhouse("SELECT * FROM t")
    source = ch.source(path)
    conn = ch.connect()
    try:
        ours = conn.query(f"EXPLAIN AST SELECT * FROM {source.sql()} AS t", "TSVRaw").bytes().decode()
        verify_ast(ours, stmt, [source])
        ast = conn.query("EXPLAIN AST " + final.format(path=path), "TSVRaw").bytes().decode()
        with pytest.raises(QueryError):
            verify_ast(ast, stmt, [source])
    finally:
        conn.close()


def test_clickhouse_runs_the_users_sql_as_written(ch: ChdbEngine, tmp_path: Path, tables: Any) -> None:
    sql = """
        SELECT toStartOfHour(started_at) AS hour, toTypeName(hour) AS type, count() AS n
        FROM support_calls GROUP BY hour ORDER BY hour DESC LIMIT 2
    """
    result, rows = run(ch, spec(tmp_path, sql, tables))
    # regenerated by sqlglot this would be dateTrunc('HOUR', started_at): DateTime64(0) on a DateTime64 column
    assert rows[0]["type"] == "Nullable(DateTime('UTC'))"
    assert result.columns[0] == {"name": "hour", "type": "Nullable(DateTime('UTC'))", "nullable": True}
    assert [r["n"] for r in rows] == [40, 60]


def test_clickhouse_types_and_parameters(ch: ChdbEngine, tmp_path: Path, tables: Any) -> None:
    sql = (
        "SELECT count() AS n, {label:String} AS label FROM support_calls "
        "WHERE agent = {agent:UInt8} AND day >= {since:Date}"
    )
    result, rows = run(
        ch, spec(tmp_path, sql, tables, parameters={"agent": 3, "since": "2024-02-01", "label": "it's \\ ok"})
    )
    assert rows == [{"n": 94, "label": "it's \\ ok"}]
    assert result.columns == [
        {"name": "n", "type": "UInt64", "nullable": False},
        {"name": "label", "type": "String", "nullable": False},
    ]
    for params, name in [
        ({"agent": 3, "since": "2024-02-01"}, "label"),
        ({"agent": 300, "since": "2024-02-01", "label": ""}, "agent"),
        ({"agent": 3, "since": "not a date", "label": ""}, "since"),
        ({"agent": 3, "since": "2024-02-01", "label": "", "other": 1}, "other"),
    ]:
        with pytest.raises(ParameterError) as caught:
            ch.start(spec(tmp_path, sql, tables, parameters=params)).run()
        assert caught.value.detail.get("parameter") == name


def test_clickhouse_syntax_error_position(ch: ChdbEngine) -> None:
    with pytest.raises(SqlSyntaxError) as caught:
        ch.analyze("SELECT id\nFROM support_calls\nWHERE id = = 1")
    assert caught.value.position is not None and caught.value.position[0] == 3


def test_clickhouse_describe_and_explain_results(ch: ChdbEngine, tmp_path: Path, tables: Any) -> None:
    result, rows = run(ch, spec(tmp_path, "DESCRIBE TABLE support_calls", tables))
    assert [r["name"] for r in rows] == ["id", "agent", "note", "day", "seconds", "started_at"]
    assert result.columns[0]["name"] == "name"
    result, rows = run(ch, spec(tmp_path, "EXPLAIN SELECT agent, count() FROM support_calls GROUP BY agent", tables))
    assert result.rows == len(rows) > 0
    assert result.columns == [{"name": "explain", "type": "String", "nullable": False}]


def test_clickhouse_server_needs_s3_storage(storage: Storage, tmp_path: Path, tables: Any) -> None:
    engine = ClickHouseServerEngine(
        storage=storage, settings=EngineSettings(workdir=tmp_path, clickhouse_url="http://nowhere.invalid:8123")
    )
    try:
        with pytest.raises(EngineError, match="local folder"):
            engine.start(spec(tmp_path, "SELECT * FROM support_calls", tables)).run()
    finally:
        engine.close()


def test_clickhouse_reads_datasets_from_s3(s3_server: str, tmp_path: Path, data: Any) -> None:
    bucket = f"strata-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client(
        "s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    )
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(data["calls"]), bucket, "strata/datasets/1/v1/data.parquet")
    s3.close()
    storage = Storage.from_url(
        f"s3://{bucket}/strata",
        s3_endpoint_url=s3_server,
        s3_region="us-east-1",
        s3_key="strata-key-id",
        s3_secret="strata-secret-key",
    )
    engine = ChdbEngine(storage=storage, settings=EngineSettings(workdir=tmp_path))
    try:
        calls = {"calls": resolved("calls", storage.engine_path("datasets/1/v1/data.parquet"))}
        _, rows = run(engine, spec(tmp_path, "SELECT count() AS n, max(id) AS m FROM calls", calls))
        assert rows == [{"n": 1000, "m": 999}]
        _, rows = run(engine, spec(tmp_path, "EXPLAIN SYNTAX SELECT * FROM calls", calls))
        assert "strata-secret-key" not in str(rows)
        with pytest.raises(ColumnNotFound) as caught:
            engine.start(spec(tmp_path, "SELECT nope FROM calls", calls)).run()
        assert "strata-secret-key" not in caught.value.message and bucket not in caught.value.message
    finally:
        engine.close()
        asyncio.run(storage.close())


@pytest.mark.skipif(not os.environ.get("CLICKHOUSE_URL"), reason="needs a ClickHouse server (CLICKHOUSE_URL)")
def test_clickhouse_server(storage: Storage, tmp_path: Path) -> None:
    engine = create_engine(
        "clickhouse",
        storage=storage,
        settings=EngineSettings(workdir=tmp_path, clickhouse_url=os.environ["CLICKHOUSE_URL"]),
    )
    try:
        result, rows = run(
            engine, spec(tmp_path, "SELECT number AS n FROM numbers(10) WHERE n > {lo:UInt8}", parameters={"lo": 7})
        )
        assert rows == [{"n": 8}, {"n": 9}]
        assert result.columns == [{"name": "n", "type": "UInt64", "nullable": False}]
        execution, thread, outcome = run_in_thread(
            engine,
            spec(
                tmp_path, "SELECT count() FROM numbers(100000) AS a, numbers(100000) AS b WHERE a.number + b.number = 7"
            ),
        )
        time.sleep(0.5)
        execution.cancel()
        thread.join(5)
        assert isinstance(outcome[0], Interrupted)
    finally:
        engine.close()
