"""The built-in blocks on real data: the demo support-calls table (5,000 rows) in a Parquet file, read through
views named as the blocks read them, in a DuckDB locked down like the query sandbox. Every run also checks that
``output_columns`` names the columns (and types) the compiled statement really returns."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from strata.datasets.demo import SUPPORT_CALLS
from strata.execution.blocks import registry
from strata.execution.blocks.base import Block, BlockConfigError, Column, Problem, quote
from strata.execution.blocks.custom import custom_block, definition_problems
from strata.execution.engines.duckdb import Analyzer

EVIL = "'; DROP TABLE x; --"
SANDBOX = Analyzer()


def _connect() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    con.execute("SET TimeZone = 'UTC'")
    return con


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("blocks")
    con = _connect()
    paths = {
        "calls": root / "calls.parquet",
        "agents": root / "agents.parquet",
        "line": root / "line.parquet",
        "seasonal": root / "seasonal.parquet",
    }
    con.execute(
        f"COPY ({SUPPORT_CALLS.replace('range(100000)', 'range(5000)')}) TO '{paths['calls']}' (FORMAT parquet)"
    )
    con.execute(
        "COPY (SELECT 'agent_' || lpad(i::VARCHAR, 2, '0') AS agent, "
        "(['team_a', 'team_b'])[1 + i % 2] AS team, 1000 + i AS desk FROM range(1, 46) t(i)) "
        f"TO '{paths['agents']}' (FORMAT parquet)"
    )
    # y = 2x + 1 per day, and a column that is exactly 2x
    con.execute(
        "COPY (SELECT DATE '2026-01-01' + i::INTEGER AS day, i::DOUBLE AS x, 2.0 * i AS y, 2.0 * i + 1 AS v "
        f"FROM range(30) t(i)) TO '{paths['line']}' (FORMAT parquet)"
    )
    # a weekly pattern: 10, 20, ..., 70 repeated, per day
    con.execute(
        "COPY (SELECT TIMESTAMP '2026-01-05 00:00:00' + to_days(i::INTEGER) AS at, ((i % 7) + 1) * 10.0 AS v "
        f"FROM range(28) t(i)) TO '{paths['seasonal']}' (FORMAT parquet)"
    )
    con.close()
    return paths


@pytest.fixture
def con(files: dict[str, Path]) -> Iterator[duckdb.DuckDBPyConnection]:
    con = _connect()
    yield con
    con.close()


def columns_of(con: duckdb.DuckDBPyConnection, path: Path) -> list[Column]:
    rel = con.sql(f"SELECT * FROM read_parquet('{path}')")
    return [Column(n, str(t)) for n, t in zip(rel.columns, rel.types, strict=True)]


def run(
    files: dict[str, Path], block: Block, config: Any, tables: Mapping[str, str] | None = None
) -> tuple[list[Column], list[dict[str, Any]]]:
    """Compile and run ``block`` over ``tables`` (input name -> file key) as the sandbox would: the inputs are views,
    external access is off. Checks that output_columns matches the result. Returns (columns, rows as dicts)."""
    tables = tables or {"data": "calls"}
    con = _connect()
    try:
        inputs = {name: columns_of(con, files[key]) for name, key in tables.items()}
        assert block.check(config, inputs) == []
        for name, key in tables.items():
            con.execute(f"CREATE VIEW \"{name}\" AS SELECT * FROM read_parquet('{files[key]}')")
        con.execute("SET allowed_paths = $p", {"p": [str(files[k]) for k in tables.values()]})
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        compiled = block.compile(config, inputs)
        # the query sandbox's own analysis accepts it: one SELECT that reads only the inputs
        analysis = SANDBOX.analyze(compiled.sql).analysis()
        assert analysis.kind == "select"
        assert {t.ref for t in analysis.tables} <= set(tables)
        assert set(analysis.parameters) == set(compiled.parameters)
        rel = con.sql(compiled.sql, params=compiled.parameters or None)
        got = [Column(n, str(t)) for n, t in zip(rel.columns, rel.types, strict=True)]
        assert block.output_columns(config, inputs) == got
        rows = [dict(zip(rel.columns, row, strict=True)) for row in rel.fetchall()]
        schema = block.output_row_schema(config, inputs)
        assert list(schema["properties"]) == [c.name for c in got]
        return got, rows
    finally:
        con.close()


def query(files: dict[str, Path], sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    con = _connect()
    try:
        con.execute(f"CREATE VIEW data AS SELECT * FROM read_parquet('{files['calls']}')")
        return con.execute(sql, params or {}).fetchall()
    finally:
        con.close()


def problems(
    files: dict[str, Path], block: Block, config: Any, tables: Mapping[str, str] | None = None
) -> list[Problem]:
    tables = tables or {"data": "calls"}
    con = _connect()
    try:
        inputs = {name: columns_of(con, files[key]) for name, key in tables.items()}
    finally:
        con.close()
    found = block.check(config, inputs)
    if found:
        with pytest.raises(BlockConfigError):
            block.compile(config, inputs)
    return found


def paths(found: list[Problem]) -> list[tuple[str | int, ...]]:
    return [p.path for p in found]


# ------------------------------------------------------------------------------------------------------ registry


def test_registry_lists_and_gets_the_builtins() -> None:
    ids = [b.id for b in registry.list()]
    assert ids == sorted(
        [
            "filter",
            "select",
            "aggregate",
            "time_series",
            "top_n",
            "join",
            "pivot",
            "describe",
            "correlation",
            "outliers",
            "forecast",
            "sql",
        ]
    )
    assert [b.id for b in registry.list(category="statistics")] == ["correlation", "describe", "outliers"]
    assert registry.get("aggregate").id == "aggregate"
    assert registry.get("aggregate", 1).version == 1
    with pytest.raises(registry.UnknownBlock):
        registry.get("aggregate", 2)
    with pytest.raises(registry.UnknownBlock):
        registry.get("nope")


@pytest.mark.parametrize("block", registry.list(), ids=lambda b: b.id)
def test_every_block_describes_a_form(block: Block) -> None:
    info = block.describe()
    schema = info["config_schema"]
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert schema["properties"]
    assert info["inputs"] and info["description"]


@pytest.mark.parametrize("block", registry.list(), ids=lambda b: b.id)
def test_unknown_config_keys_and_missing_inputs_are_reported(files: dict[str, Path], block: Block) -> None:
    found = block.check({"bogus": 1}, {})
    assert ("config",) in paths(found) or any(p.path[:1] == ("config",) for p in found)
    assert any(p.code == "MISSING_INPUT" for p in found)
    assert any("bogus" in p.message for p in found)


# ------------------------------------------------------------------------------------------------------ filter


def test_filter_matches_hand_written_sql(files: dict[str, Path]) -> None:
    block = registry.get("filter")
    config = {
        "conditions": [
            {"column": "region", "op": "in", "value": ["north", "east"]},
            {"column": "rating", "op": "gte", "value": 4},
            {"column": "start_time", "op": "between", "value": ["2026-01-05T12:00:00Z", "2026-01-07"]},
            {"column": "agent", "op": "starts_with", "value": "AGENT_0"},
        ]
    }
    columns, rows = run(files, block, config)
    assert [c.name for c in columns][:3] == ["call_id", "agent", "region"]
    expected = query(
        files,
        "SELECT call_id FROM data WHERE region IN ('north', 'east') AND rating >= 4 AND start_time BETWEEN "
        "TIMESTAMPTZ '2026-01-05 12:00:00+00' AND TIMESTAMPTZ '2026-01-07 00:00:00+00' "
        "AND agent LIKE 'agent_0%' ORDER BY call_id",
    )
    assert sorted(r["call_id"] for r in rows) == [e[0] for e in expected]
    assert 0 < len(rows) < 5000


def test_filter_any_and_null_semantics(files: dict[str, Path]) -> None:
    block = registry.get("filter")
    _, rows = run(
        files,
        block,
        {
            "combine": "any",
            "conditions": [{"column": "rating", "op": "is_null"}, {"column": "rating", "op": "eq", "value": 5}],
        },
    )
    expected = query(files, "SELECT count(*) FROM data WHERE rating IS NULL OR rating = 5")[0][0]
    assert len(rows) == expected
    _, rows = run(files, block, {"conditions": [{"column": "rating", "op": "ne", "value": 5}]})
    # ne keeps nulls
    assert len(rows) == query(files, "SELECT count(*) FROM data WHERE rating IS DISTINCT FROM 5")[0][0]
    _, rows = run(files, block, {"conditions": []})
    assert len(rows) == 5000


def test_filter_binds_values(files: dict[str, Path]) -> None:
    block = registry.get("filter")
    con = _connect()
    inputs = {"data": columns_of(con, files["calls"])}
    con.close()
    compiled = block.compile({"conditions": [{"column": "region", "op": "eq", "value": EVIL}]}, inputs)
    assert EVIL not in compiled.sql and "DROP" not in compiled.sql
    assert EVIL in compiled.parameters.values()
    _, rows = run(files, block, {"conditions": [{"column": "region", "op": "eq", "value": EVIL}]})
    assert rows == []


def test_filter_problems(files: dict[str, Path]) -> None:
    block = registry.get("filter")
    found = problems(
        files,
        block,
        {
            "conditions": [
                {"column": "nope", "op": "eq", "value": 1},
                {"column": "rating", "op": "contains", "value": "1"},
                {"column": "rating", "op": "eq", "value": "high"},
                {"column": "rating", "op": "between", "value": [1]},
                {"column": "resolved", "op": "gt", "value": True},
                {"column": "start_time", "op": "gte", "value": "yesterday"},
            ]
        },
    )
    assert paths(found) == [
        ("config", "conditions", 0, "column"),
        ("config", "conditions", 1, "op"),
        ("config", "conditions", 2, "value"),
        ("config", "conditions", 3, "value"),
        ("config", "conditions", 4, "op"),
        ("config", "conditions", 5, "value"),
    ]
    assert found[0].code == "UNKNOWN_COLUMN" and found[1].code == "WRONG_COLUMN_TYPE"
    found = problems(files, block, {"conditions": [{"column": "rating", "op": "like", "value": 1}]})
    assert paths(found) == [("config", "conditions", 0, "op")]


# ------------------------------------------------------------------------------------------------------ select


def test_select_keeps_renames_and_derives(files: dict[str, Path]) -> None:
    block = registry.get("select")
    config = {
        "columns": ["call_id", "agent", "duration_s", "start_time"],
        "rename": {"agent": "Agent name"},
        "derived": [
            {"name": "minutes", "op": "div", "args": [{"column": "duration_s"}, {"value": 60}]},
            {"name": "minutes_r", "op": "round", "args": [{"column": "duration_s"}, {"value": -2}]},
            {"name": "label", "op": "concat", "args": [{"column": "agent"}, {"value": EVIL}, {"column": "call_id"}]},
            {"name": "AGENT", "op": "upper", "args": [{"column": "agent"}]},
            {"name": "day", "op": "date_trunc", "args": [{"value": "day"}, {"column": "start_time"}]},
            {"name": "score", "op": "coalesce", "args": [{"column": "rating"}, {"value": 0}]},
            {"name": "neg", "op": "abs", "args": [{"value": -3}]},
        ],
    }
    columns, rows = run(files, block, config)
    assert [c.name for c in columns] == [
        "call_id",
        "Agent name",
        "duration_s",
        "start_time",
        "minutes",
        "minutes_r",
        "label",
        "AGENT",
        "day",
        "score",
        "neg",
    ]
    first = min(rows, key=lambda r: r["call_id"])
    assert first["minutes"] == pytest.approx(first["duration_s"] / 60)
    assert first["minutes_r"] == round(first["duration_s"], -2)
    assert first["label"] == f"{first['Agent name']}{EVIL}{first['call_id']}"
    assert first["AGENT"] == first["Agent name"].upper()
    assert first["day"] == datetime(2026, 1, 5, tzinfo=UTC)
    assert {r["score"] for r in rows} == {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}
    assert first["neg"] == 3.0


def test_select_all_columns_by_default(files: dict[str, Path]) -> None:
    columns, rows = run(files, registry.get("select"), {"rename": {"call_id": "id"}})
    assert columns[0] == Column("id", "BIGINT") and len(columns) == 10 and len(rows) == 5000


def test_select_problems(files: dict[str, Path]) -> None:
    block = registry.get("select")
    found = problems(
        files,
        block,
        {
            "columns": ["agent", "nope"],
            "rename": {"region": "r"},
            "derived": [
                {"name": "a", "op": "add", "args": [{"column": "agent"}, {"value": 1}]},
                {"name": "b", "op": "lower", "args": [{"column": "missing"}]},
                {"name": "c", "op": "date_trunc", "args": [{"value": "fortnight"}, {"column": "start_time"}]},
                {"name": "d", "op": "add", "args": [{"column": "rating"}]},
                {"name": "agent", "op": "upper", "args": [{"column": "agent"}]},
                {"name": "e", "op": "sql", "args": [{"value": "1; DROP TABLE x"}]},
            ],
        },
    )
    assert ("config", "derived", 5, "op") in paths(found)  # schema: unknown op, nothing else checked
    found = problems(
        files,
        block,
        {
            "columns": ["agent", "nope"],
            "rename": {"region": "r"},
            "derived": [
                {"name": "a", "op": "add", "args": [{"column": "agent"}, {"value": 1}]},
                {"name": "b", "op": "lower", "args": [{"column": "missing"}]},
                {"name": "c", "op": "date_trunc", "args": [{"value": "fortnight"}, {"column": "start_time"}]},
                {"name": "d", "op": "add", "args": [{"column": "rating"}]},
                {"name": "agent", "op": "upper", "args": [{"column": "agent"}]},
            ],
        },
    )
    assert paths(found) == [
        ("config", "columns", 1),
        ("config", "rename", "region"),
        ("config", "derived", 0, "args", 0, "column"),
        ("config", "derived", 1, "args", 0, "column"),
        ("config", "derived", 2, "args", 0),
        ("config", "derived", 3, "args"),
        ("config", "derived", 4, "name"),
    ]
    assert found[2].code == "WRONG_COLUMN_TYPE" and found[-1].code == "DUPLICATE_COLUMN"


# ------------------------------------------------------------------------------------------------------ aggregate


def test_aggregate_matches_hand_written_sql(files: dict[str, Path]) -> None:
    block = registry.get("aggregate")
    config = {
        "group_by": ["region", "issue_type"],
        "metrics": [
            {"fn": "count"},
            {"fn": "count", "column": "rating"},
            {"fn": "count_distinct", "column": "agent"},
            {"fn": "sum", "column": "duration_s"},
            {"fn": "mean", "column": "rating", "as": "avg rating"},
            {"fn": "min", "column": "start_time"},
            {"fn": "max", "column": "duration_s"},
            {"fn": "median", "column": "duration_s"},
            {"fn": "quantile", "column": "duration_s", "q": 0.9},
            {"fn": "stddev", "column": "rating"},
        ],
    }
    columns, rows = run(files, block, config)
    assert [c.name for c in columns] == [
        "region",
        "issue_type",
        "count",
        "count_rating",
        "count_distinct_agent",
        "sum_duration_s",
        "avg rating",
        "min_start_time",
        "max_duration_s",
        "median_duration_s",
        "p90_duration_s",
        "stddev_rating",
    ]
    assert columns[5].type == "BIGINT" and columns[7].type == "TIMESTAMP WITH TIME ZONE"
    expected = query(
        files,
        "SELECT region, issue_type, count(*), count(rating), count(DISTINCT agent), sum(duration_s), avg(rating), "
        "min(start_time), max(duration_s), median(duration_s), quantile_cont(duration_s, 0.9), stddev_samp(rating) "
        "FROM data GROUP BY ALL ORDER BY 1, 2",
    )
    assert len(rows) == 25
    for row, exp in zip(rows, expected, strict=True):
        got = list(row.values())
        assert got[:6] == list(exp[:6])
        assert got[6] == pytest.approx(exp[6]) and got[7] == exp[7] and got[8] == exp[8]
        assert got[9:] == pytest.approx(list(exp[9:]))


def test_aggregate_totals_and_bound_quantile(files: dict[str, Path]) -> None:
    block = registry.get("aggregate")
    _, rows = run(files, block, {"metrics": [{"fn": "count"}, {"fn": "quantile", "column": "rating", "q": 0.25}]})
    assert rows == [
        {"count": 5000, "p25_rating": pytest.approx(query(files, "SELECT quantile_cont(rating, 0.25) FROM data")[0][0])}
    ]


def test_aggregate_problems(files: dict[str, Path]) -> None:
    block = registry.get("aggregate")
    found = problems(
        files,
        block,
        {
            "group_by": ["region", "nope"],
            "metrics": [
                {"fn": "sum", "column": "agent"},
                {"fn": "mean", "column": "start_time"},
                {"fn": "sum"},
                {"fn": "quantile", "column": "rating"},
                {"fn": "count", "as": "region"},
                {"fn": "max", "column": "ghost"},
            ],
        },
    )
    assert paths(found) == [
        ("config", "group_by", 1),
        ("config", "metrics", 0, "column"),
        ("config", "metrics", 1, "column"),
        ("config", "metrics", 2, "column"),
        ("config", "metrics", 3, "q"),
        ("config", "metrics", 5, "column"),
        ("config", "metrics", 4, "as"),
    ]
    assert found[1].code == "WRONG_COLUMN_TYPE" and found[-1].code == "DUPLICATE_COLUMN"
    assert paths(problems(files, block, {"metrics": []})) == [("config", "metrics")]
    assert paths(problems(files, block, {"metrics": [{"fn": "median", "column": "x", "q": 2}]})) == [
        ("config", "metrics", 0, "q")
    ]


# ------------------------------------------------------------------------------------------------------ time series


def test_time_series_buckets_and_deltas(files: dict[str, Path]) -> None:
    block = registry.get("time_series")
    config = {
        "time": "start_time",
        "bucket": "day",
        "metrics": [{"fn": "count", "as": "calls"}, {"fn": "mean", "column": "rating"}],
        "compare": True,
    }
    columns, rows = run(files, block, config)
    assert [c.name for c in columns] == [
        "bucket",
        "calls",
        "mean_rating",
        "calls_previous",
        "calls_delta",
        "calls_delta_pct",
        "mean_rating_previous",
        "mean_rating_delta",
        "mean_rating_delta_pct",
    ]
    assert columns[0].type == "TIMESTAMP WITH TIME ZONE"
    expected = query(
        files,
        "SELECT date_trunc('day', start_time) AS d, count(*), avg(rating) FROM data GROUP BY 1 ORDER BY 1",
    )
    assert [(r["bucket"], r["calls"]) for r in rows] == [(e[0], e[1]) for e in expected]
    assert rows[0]["calls_previous"] is None and rows[0]["calls_delta"] is None
    for prev, cur in itertools.pairwise(rows):
        assert cur["calls_previous"] == prev["calls"]
        assert cur["calls_delta"] == cur["calls"] - prev["calls"]
        assert cur["calls_delta_pct"] == pytest.approx((cur["calls"] - prev["calls"]) / prev["calls"])
        assert cur["mean_rating_delta"] == pytest.approx(cur["mean_rating"] - prev["mean_rating"])


def test_time_series_groups_and_fill(files: dict[str, Path]) -> None:
    block = registry.get("time_series")
    config = {
        "time": "start_time",
        "bucket": "hour",
        "group_by": ["channel"],
        "metrics": [{"fn": "count"}, {"fn": "sum", "column": "duration_s"}, {"fn": "max", "column": "rating"}],
        "fill": True,
        "compare": True,
    }
    _, rows = run(files, block, config)
    hours = query(files, "SELECT date_diff('hour', min(start_time), max(start_time)) FROM data")[0][0]
    # every hour from the first to the last, for each of the three channels, even those without calls
    assert len(rows) == 3 * (hours + 1)
    by_channel: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_channel.setdefault(row["channel"], []).append(row)
    for series in by_channel.values():
        assert [r["bucket"] for r in series] == sorted(r["bucket"] for r in series)
        assert all((b["bucket"] - a["bucket"]).total_seconds() == 3600 for a, b in itertools.pairwise(series))
        assert all(b["count_previous"] == a["count"] for a, b in itertools.pairwise(series))
    assert sum(r["count"] for r in rows) == 5000
    assert sum(r["sum_duration_s"] for r in rows) == query(files, "SELECT sum(duration_s) FROM data")[0][0]


def test_time_series_on_dates_by_month_and_week(files: dict[str, Path]) -> None:
    block = registry.get("time_series")
    columns, rows = run(
        files,
        block,
        {"time": "day", "bucket": "week", "metrics": [{"fn": "sum", "column": "x"}], "fill": True},
        {"data": "line"},
    )
    assert columns[0] == Column("bucket", "DATE")
    assert rows[0]["bucket"] == date(2025, 12, 29)  # the Monday
    assert sum(r["sum_x"] for r in rows) == sum(range(30))
    assert problems(files, block, {"time": "day", "bucket": "hour", "metrics": [{"fn": "count"}]}, {"data": "line"})[
        0
    ].path == (
        "config",
        "bucket",
    )


def test_time_series_problems(files: dict[str, Path]) -> None:
    block = registry.get("time_series")
    found = problems(
        files,
        block,
        {
            "time": "agent",
            "metrics": [{"fn": "min", "column": "agent"}],
            "compare": True,
            "group_by": ["region"],
            "bucket_column": "REGION",
        },
    )
    assert paths(found) == [("config", "time"), ("config", "metrics", 0), ("config", "group_by", 0)]
    assert [p.code for p in found] == ["WRONG_COLUMN_TYPE", "WRONG_COLUMN_TYPE", "DUPLICATE_COLUMN"]
    assert paths(problems(files, block, {"time": "start_time", "bucket": "year", "metrics": [{"fn": "count"}]})) == [
        ("config", "bucket")
    ]


# ------------------------------------------------------------------------------------------------------ top n


def test_top_n_agents_by_mean_rating(files: dict[str, Path]) -> None:
    block = registry.get("top_n")
    config = {
        "group_by": ["agent"],
        "metric": {"fn": "mean", "column": "rating", "as": "rating"},
        "min_count": 100,
        "n": 5,
    }
    columns, rows = run(files, block, config)
    assert [c.name for c in columns] == ["rank", "agent", "rating", "row_count", "percentile"]
    expected = query(
        files,
        "SELECT agent, avg(rating) AS r, count(*) AS n, percent_rank() OVER (ORDER BY avg(rating)) AS p "
        "FROM data GROUP BY agent HAVING count(*) >= 100 ORDER BY r DESC LIMIT 5",
    )
    assert [r["agent"] for r in rows] == [e[0] for e in expected]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["percentile"] for r in rows] == pytest.approx([e[3] for e in expected])
    assert rows[0]["percentile"] == 1.0
    assert all(r["row_count"] >= 100 for r in rows)
    ratings = [r["rating"] for r in rows]
    assert ratings == sorted(ratings, reverse=True)


def test_top_n_rows_ties_and_direction(files: dict[str, Path]) -> None:
    block = registry.get("top_n")
    # ratings take five values: with ties included, the "top 3" by rating is every 5-star call
    _, rows = run(files, block, {"order_by": "rating", "n": 3})
    fives = query(files, "SELECT count(*) FROM data WHERE rating = 5")[0][0]
    assert len(rows) == fives and {r["rank"] for r in rows} == {1}
    _, rows = run(files, block, {"order_by": "rating", "n": 3, "ties": "break"})
    assert [r["rank"] for r in rows] == [1, 2, 3]
    _, rows = run(files, block, {"order_by": "duration_s", "n": 4, "direction": "asc"})
    shortest = [r[0] for r in query(files, "SELECT duration_s FROM data ORDER BY duration_s LIMIT 4")]
    assert [r["duration_s"] for r in rows][:4] == shortest
    # the shortest calls tie: they share the best percentile (the share of the other calls they beat)
    assert rows[0]["percentile"] == max(r["percentile"] for r in rows) > 0.99


def test_top_n_problems(files: dict[str, Path]) -> None:
    block = registry.get("top_n")
    assert paths(problems(files, block, {"group_by": ["agent"]})) == [("config", "metric")]
    assert paths(problems(files, block, {"n": 3})) == [("config", "order_by")]
    assert paths(problems(files, block, {"order_by": "resolved"})) == [("config", "order_by")]
    assert paths(problems(files, block, {"group_by": ["agent"], "metric": {"fn": "sum", "column": "region"}})) == [
        ("config", "metric", "column")
    ]
    assert paths(problems(files, block, {"order_by": "rating", "n": 0})) == [("config", "n")]
    assert paths(problems(files, block, {"order_by": "rating", "min_count": 3})) == [("config", "min_count")]


# ------------------------------------------------------------------------------------------------------ join


def test_join_inner_and_left_with_suffixes(files: dict[str, Path]) -> None:
    block = registry.get("join")
    tables = {"left": "calls", "right": "agents"}
    config = {"on": [{"left": "agent", "right": "agent"}], "how": "inner"}
    columns, rows = run(files, block, config, tables)
    assert [c.name for c in columns][-3:] == ["agent_right", "team", "desk"]
    assert len(rows) == 5000  # every agent of the calls (1..40) is in the agents table (1..45)
    assert all(r["agent"] == r["agent_right"] for r in rows)
    assert all(r["desk"] == 1000 + int(r["agent"][-2:]) for r in rows)
    _, rows = run(files, block, {**config, "how": "right"}, tables)
    assert len(rows) == 5000 + 5  # agents 41..45 took no calls
    assert sum(r["call_id"] is None for r in rows) == 5
    _, rows = run(files, block, {**config, "how": "full", "suffixes": {"left": "_call", "right": "_agent"}}, tables)
    assert {"agent_call", "agent_agent"} <= set(rows[0])


def test_join_problems(files: dict[str, Path]) -> None:
    block = registry.get("join")
    tables = {"left": "calls", "right": "agents"}
    found = problems(
        files, block, {"on": [{"left": "nope", "right": "agent"}, {"left": "call_id", "right": "agent"}]}, tables
    )
    assert paths(found) == [("config", "on", 0, "left"), ("config", "on", 1, "right")]
    assert found[1].code == "WRONG_COLUMN_TYPE"
    found = problems(
        files, block, {"on": [{"left": "agent", "right": "agent"}], "suffixes": {"left": "", "right": ""}}, tables
    )
    assert paths(found) == [("config", "suffixes")]
    found = problems(files, block, {"on": [{"left": "agent", "right": "agent"}]}, {"data": "calls"})
    assert [p.code for p in found] == ["MISSING_INPUT", "MISSING_INPUT", "UNKNOWN_INPUT"]


# ------------------------------------------------------------------------------------------------------ pivot


def test_pivot_counts_and_means(files: dict[str, Path]) -> None:
    block = registry.get("pivot")
    config = {"rows": ["region"], "column": "channel", "values": ["phone", "chat", "email", EVIL]}
    columns, rows = run(files, block, config)
    assert [c.name for c in columns] == ["region", "phone", "chat", "email", EVIL]
    expected = query(
        files,
        "SELECT region, count(*) FILTER (WHERE channel = 'phone'), count(*) FILTER (WHERE channel = 'chat'), "
        "count(*) FILTER (WHERE channel = 'email') FROM data GROUP BY 1 ORDER BY 1",
    )
    assert [(r["region"], r["phone"], r["chat"], r["email"], r[EVIL]) for r in rows] == [(*e, 0) for e in expected]
    _, rows = run(
        files,
        block,
        {
            "rows": ["issue_type"],
            "column": "rating",
            "values": [1, 5],
            "value": "duration_s",
            "fn": "mean",
            "prefix": "r",
        },
    )
    exp = query(files, "SELECT avg(duration_s) FROM data WHERE issue_type = 'billing' AND rating = 5")[0][0]
    assert next(r for r in rows if r["issue_type"] == "billing")["r5"] == pytest.approx(exp)


def test_pivot_problems(files: dict[str, Path]) -> None:
    block = registry.get("pivot")
    found = problems(
        files, block, {"rows": ["nope"], "column": "rating", "values": [1, "high"], "value": "agent", "fn": "sum"}
    )
    assert paths(found) == [("config", "rows", 0), ("config", "value"), ("config", "values", 1)]
    assert paths(problems(files, block, {"column": "rating", "values": list(range(101))})) == [("config", "values")]
    found = problems(files, block, {"column": "rating", "values": [1, 2], "rows": ["call_id"], "prefix": "CALL_ID"})
    assert paths(found) == [] and found == []
    found = problems(files, block, {"column": "agent", "values": ["_id", "x"], "rows": ["call_id"], "prefix": "CALL"})
    assert paths(found) == [("config", "values", 0)] and found[0].code == "DUPLICATE_COLUMN"
    assert paths(problems(files, block, {"rows": ["region"], "column": "channel", "values": ["region"]})) == [
        ("config", "values", 0)
    ]


# ------------------------------------------------------------------------------------------------------ describe


def test_describe_equals_duckdb_aggregates(files: dict[str, Path]) -> None:
    block = registry.get("describe")
    columns, rows = run(files, block, {})
    assert [c.name for c in columns] == [
        "position",
        "column",
        "type",
        "rows",
        "count",
        "nulls",
        "distinct",
        "min",
        "max",
        "mean",
        "stddev",
        "p25",
        "p50",
        "p75",
    ]
    assert [r["column"] for r in rows] == [c.name for c in columns_of(_connect(), files["calls"])]
    rating = next(r for r in rows if r["column"] == "rating")
    exp = query(
        files,
        "SELECT count(*), count(rating), count(DISTINCT rating), min(rating), max(rating), avg(rating), "
        "stddev_samp(rating), quantile_cont(rating, 0.25), median(rating), quantile_cont(rating, 0.75) FROM data",
    )[0]
    assert (rating["rows"], rating["count"], rating["distinct"]) == exp[:3]
    assert rating["nulls"] == exp[0] - exp[1] > 0
    assert (rating["min"], rating["max"]) == (str(exp[3]), str(exp[4]))
    assert [rating["mean"], rating["stddev"], rating["p25"], rating["p50"], rating["p75"]] == pytest.approx(
        list(exp[5:])
    )
    agent = next(r for r in rows if r["column"] == "agent")
    assert agent["distinct"] == 40 and agent["mean"] is None and agent["min"] == "agent_01"
    assert agent["type"] == "VARCHAR"


def test_describe_some_columns_and_quantiles(files: dict[str, Path]) -> None:
    _, rows = run(files, registry.get("describe"), {"columns": ["duration_s"], "quantiles": [0.9]})
    assert len(rows) == 1 and rows[0]["p90"] == pytest.approx(
        query(files, "SELECT quantile_cont(duration_s, 0.9) FROM data")[0][0]
    )
    found = problems(files, registry.get("describe"), {"columns": ["nope"], "quantiles": [1.5]})
    assert paths(found) == [("config", "quantiles", 0)]
    assert paths(problems(files, registry.get("describe"), {"columns": ["nope"]})) == [("config", "columns", 0)]


# ------------------------------------------------------------------------------------------------------ correlation


def test_correlation_of_a_line_is_one(files: dict[str, Path]) -> None:
    columns, rows = run(files, registry.get("correlation"), {}, {"data": "line"})
    assert [c.name for c in columns] == ["column_a", "column_b", "r", "n"]
    assert [(r["column_a"], r["column_b"]) for r in rows] == [("x", "y"), ("x", "v"), ("y", "v")]
    assert all(r["r"] == pytest.approx(1.0) and r["n"] == 30 for r in rows)


def test_correlation_on_calls(files: dict[str, Path]) -> None:
    _, rows = run(files, registry.get("correlation"), {"columns": ["duration_s", "rating"]})
    exp = query(files, "SELECT corr(duration_s, rating), count(rating) FROM data")[0]
    assert rows == [{"column_a": "duration_s", "column_b": "rating", "r": pytest.approx(exp[0]), "n": exp[1]}]
    found = problems(files, registry.get("correlation"), {"columns": ["duration_s", "agent", "ghost"]})
    assert paths(found) == [("config", "columns", 1), ("config", "columns", 2)]
    assert paths(problems(files, registry.get("correlation"), {"columns": ["rating"]})) == [("config", "columns")]


# ------------------------------------------------------------------------------------------------------ outliers


def test_outliers_zscore_flags(files: dict[str, Path]) -> None:
    block = registry.get("outliers")
    columns, rows = run(files, block, {"column": "duration_s", "threshold": 1.5})
    assert [c.name for c in columns][-2:] == ["score", "is_outlier"]
    mean, sd = query(files, "SELECT avg(duration_s), stddev_samp(duration_s) FROM data")[0]
    for row in rows:
        z = (row["duration_s"] - mean) / sd
        assert row["score"] == pytest.approx(z)
        assert row["is_outlier"] == (abs(z) > 1.5)
    flagged = sum(r["is_outlier"] for r in rows)
    assert 0 < flagged < 5000
    _, only = run(files, block, {"column": "duration_s", "threshold": 1.5, "only_outliers": True})
    assert len(only) == flagged and all(r["is_outlier"] for r in only)


def test_outliers_iqr_by_group(files: dict[str, Path]) -> None:
    block = registry.get("outliers")
    _, rows = run(files, block, {"column": "rating", "method": "iqr", "k": 0.1, "group_by": ["channel"]})
    quartiles = {
        r[0]: (r[1], r[2])
        for r in query(
            files, "SELECT channel, quantile_cont(rating, 0.25), quantile_cont(rating, 0.75) FROM data GROUP BY 1"
        )
    }
    for row in rows:
        q1, q3 = quartiles[row["channel"]]
        if row["rating"] is None:
            assert row["is_outlier"] is False and row["score"] is None
        else:
            iqr = q3 - q1
            assert row["is_outlier"] == (row["rating"] < q1 - 0.1 * iqr or row["rating"] > q3 + 0.1 * iqr)
    assert any(r["is_outlier"] for r in rows)


def test_outliers_problems(files: dict[str, Path]) -> None:
    block = registry.get("outliers")
    assert paths(problems(files, block, {"column": "agent"})) == [("config", "column")]
    assert paths(problems(files, block, {"column": "rating", "group_by": ["x"], "threshold": 0})) == [
        ("config", "threshold")
    ]
    assert paths(problems(files, block, {"column": "rating", "group_by": ["x"]})) == [("config", "group_by", 0)]
    assert paths(problems(files, block, {"column": "rating", "method": "mad"})) == [("config", "method")]


# ------------------------------------------------------------------------------------------------------ forecast


def test_forecast_linear_on_a_line(files: dict[str, Path]) -> None:
    block = registry.get("forecast")
    config = {"time": "day", "value": "v", "bucket": "day", "horizon": 5, "method": "linear"}
    columns, rows = run(files, block, config, {"data": "line"})
    assert columns == [
        Column("bucket", "DATE"),
        Column("kind", "VARCHAR"),
        Column("value", "DOUBLE"),
        Column("lower", "DOUBLE"),
        Column("upper", "DOUBLE"),
    ]
    assert [r["kind"] for r in rows] == ["history"] * 30 + ["forecast"] * 5
    future = rows[30:]
    assert [r["bucket"] for r in future] == [date(2026, 1, 31 + i) if i < 1 else date(2026, 2, i) for i in range(5)]
    assert [r["value"] for r in future] == pytest.approx([2.0 * i + 1 for i in range(30, 35)])
    values = [r["value"] for r in rows]
    assert values == sorted(values)  # a rising line stays rising
    assert all(r["lower"] <= r["value"] <= r["upper"] for r in future)


def test_forecast_linear_on_calls_by_day(files: dict[str, Path]) -> None:
    block = registry.get("forecast")
    _, rows = run(files, block, {"time": "start_time", "agg": "count", "bucket": "hour", "horizon": 3, "z": 1.0})
    history = [r for r in rows if r["kind"] == "history"]
    future = [r for r in rows if r["kind"] == "forecast"]
    assert sum(r["value"] for r in history) == 5000 and len(future) == 3
    assert all((b["bucket"] - a["bucket"]).total_seconds() == 3600 for a, b in itertools.pairwise(future))
    assert all(r["upper"] - r["lower"] > 0 for r in future)


def test_forecast_seasonal_naive(files: dict[str, Path]) -> None:
    block = registry.get("forecast")
    config = {
        "time": "at",
        "value": "v",
        "bucket": "day",
        "horizon": 10,
        "method": "seasonal_naive",
        "season_length": 7,
    }
    columns, rows = run(files, block, config, {"data": "seasonal"})
    assert columns[0] == Column("bucket", "TIMESTAMP")
    future = [r for r in rows if r["kind"] == "forecast"]
    # the history ends on day 27 (27 % 7 = 6, value 70); the pattern continues at 10
    assert [r["value"] for r in future] == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 10.0, 20.0, 30.0]
    assert future[0]["bucket"] == datetime(2026, 2, 2)  # noqa: DTZ001 - the column is a naive TIMESTAMP
    # a perfect pattern: seasonal differences are all 0, so the interval is the value
    assert all(r["lower"] == r["value"] == r["upper"] for r in future)


def test_forecast_monthly_on_timestamptz(files: dict[str, Path]) -> None:
    _, rows = run(
        files, registry.get("forecast"), {"time": "start_time", "agg": "count", "bucket": "month", "horizon": 2}
    )
    future = [r["bucket"] for r in rows if r["kind"] == "forecast"]
    history = [r["bucket"] for r in rows if r["kind"] == "history"]
    assert history[0] == datetime(2026, 1, 1, tzinfo=UTC)
    assert [(b.month, b.day, b.hour) for b in future] == [
        ((history[-1].month % 12) + 1, 1, 0),
        ((history[-1].month + 1) % 12 + 1, 1, 0),
    ]


def test_forecast_problems(files: dict[str, Path]) -> None:
    block = registry.get("forecast")
    assert paths(problems(files, block, {"time": "agent", "value": "region"})) == [
        ("config", "time"),
        ("config", "value"),
    ]
    assert paths(problems(files, block, {"time": "start_time"})) == [("config", "value")]
    assert paths(problems(files, block, {"time": "start_time", "agg": "count", "horizon": 0})) == [
        ("config", "horizon")
    ]


# ------------------------------------------------------------------------------------------------------ sql


def test_sql_block_binds_typed_parameters(files: dict[str, Path]) -> None:
    block = registry.get("sql")
    config = {
        "template": "SELECT agent, count(*) AS calls, $label AS label FROM data "
        "WHERE rating >= $min_rating AND start_time >= $since GROUP BY agent ORDER BY agent",
        "parameters": [
            {"name": "min_rating", "type": "integer", "value": 4},
            {"name": "since", "type": "timestamp", "value": "2026-01-06T00:00:00+00:00"},
            {"name": "label", "type": "string", "value": EVIL},
        ],
    }
    columns, rows = run(files, block, config)
    assert columns == [Column("agent", "VARCHAR"), Column("calls", "BIGINT"), Column("label", "VARCHAR")]
    expected = query(
        files,
        "SELECT agent, count(*) FROM data WHERE rating >= 4 AND start_time >= TIMESTAMPTZ '2026-01-06 00:00:00+00' "
        "GROUP BY 1 ORDER BY 1",
    )
    assert [(r["agent"], r["calls"]) for r in rows] == expected
    assert all(r["label"] == EVIL for r in rows)


def test_sql_block_problems(files: dict[str, Path]) -> None:
    block = registry.get("sql")

    def check(template: str, parameters: list[dict[str, Any]] | None = None) -> list[Problem]:
        return problems(files, block, {"template": template, "parameters": parameters or []})

    assert paths(check("SELEC agent FROM data")) == [("config", "template")]
    assert [p.code for p in check("SELECT * FROM data WHERE rating > $x")] == ["UNDECLARED_PARAMETER"]
    found = check("SELECT * FROM data", [{"name": "x", "type": "integer", "value": 1}])
    assert paths(found) == [("config", "parameters", 0)] and found[0].code == "UNUSED_PARAMETER"
    assert paths(check("SELECT 1; SELECT 2")) == [("config", "template")]
    assert paths(check("DELETE FROM data")) == [("config", "template")]
    assert paths(check("SELECT * FROM read_parquet('/etc/passwd')")) == [("config", "template")]
    assert "not an input" in check("SELECT * FROM secrets")[0].message
    assert "does not run" in check("SELECT no_such_column FROM data")[0].message
    found = check("SELECT * FROM data WHERE rating > $x", [{"name": "x", "type": "integer", "value": "4"}])
    assert paths(found) == [("config", "parameters", 0, "value")]
    found = check("SELECT * FROM data WHERE start_time > $t", [{"name": "t", "type": "date", "value": "soon"}])
    assert paths(found) == [("config", "parameters", 0, "value")]
    assert paths(check("SELECT 1", [{"name": "1x", "type": "integer", "value": 1}])) == [
        ("config", "parameters", 0, "name")
    ]


# ------------------------------------------------------------------------------------------------------ custom blocks

AGENT_REPORT = {
    "id": "agent_report",
    "version": 2,
    "name": "Agent report",
    "category": "custom",
    "description": "Calls and mean rating per agent of a region.",
    "template": "SELECT agent, count(*) AS calls, avg(rating) AS rating FROM data "
    "WHERE region = $region AND resolved = $resolved GROUP BY agent HAVING count(*) >= $min_calls ORDER BY agent",
    "parameters": [
        {"name": "region", "type": "string", "description": "The region."},
        {"name": "resolved", "type": "boolean", "default": True},
        {"name": "min_calls", "type": "integer", "default": 1},
    ],
}


def test_custom_block_runs_with_config_values(files: dict[str, Path]) -> None:
    block = custom_block(AGENT_REPORT)
    info = block.describe()
    assert (info["id"], info["version"], info["custom"]) == ("agent_report", 2, True)
    assert info["config_schema"]["required"] == ["region"]
    assert info["config_schema"]["properties"]["min_calls"] == {"type": "integer", "title": "min_calls", "default": 1}
    columns, rows = run(files, block, {"region": "north", "min_calls": 10})
    assert columns == [Column("agent", "VARCHAR"), Column("calls", "BIGINT"), Column("rating", "DOUBLE")]
    expected = query(
        files,
        "SELECT agent, count(*) FROM data WHERE region = 'north' AND resolved GROUP BY 1 HAVING count(*) >= 10 "
        "ORDER BY 1",
    )
    assert [(r["agent"], r["calls"]) for r in rows] == expected
    _, rows = run(files, block, {"region": EVIL})
    assert rows == []


def test_custom_block_config_problems(files: dict[str, Path]) -> None:
    block = custom_block(AGENT_REPORT)
    assert paths(problems(files, block, {})) == [("config",)]
    assert paths(problems(files, block, {"region": 3})) == [("config", "region")]
    assert paths(problems(files, block, {"region": "x", "other": 1})) == [("config",)]
    # the input lacks a column the template reads
    found = problems(files, block, {"region": "x"}, {"data": "agents"})
    assert paths(found) == [("inputs",)] and found[0].code == "INVALID_TEMPLATE"


def test_custom_block_definitions_are_validated() -> None:
    assert definition_problems(AGENT_REPORT) == []

    def bad(**changes: Any) -> list[tuple[str | int, ...]]:
        found = definition_problems({**AGENT_REPORT, **changes})
        with pytest.raises(BlockConfigError):
            custom_block({**AGENT_REPORT, **changes})
        return paths(found)

    assert bad(template="SELECT * FROM data WHERE") == [("template",)]
    assert bad(template="SELECT * FROM data WHERE region = $region AND x = $undeclared") == [
        ("template",),
        ("parameters", 1),
        ("parameters", 2),
    ]
    assert bad(template="DROP TABLE data") == [("template",)]
    assert bad(parameters=[{"name": "region", "type": "blob"}]) == [("parameters", 0, "type")]
    assert bad(
        parameters=[
            {"name": "region", "type": "string"},
            {"name": "resolved", "type": "boolean", "default": "yes"},
            {"name": "min_calls", "type": "integer"},
        ]
    ) == [("parameters", 1, "default")]
    assert bad(id="Bad Id") == [("id",)]
    assert bad(inputs=[{"name": "calls"}]) == [("template",)]  # it reads data, which is not an input


# ------------------------------------------------------------------------------------------------------ safety


CONFIGS_WITH_VALUES: list[tuple[str, dict[str, Any]]] = [
    ("filter", {"conditions": [{"column": "agent", "op": "in", "value": [EVIL, "agent_01"]}]}),
    ("filter", {"conditions": [{"column": "agent", "op": "contains", "value": EVIL}]}),
    ("select", {"derived": [{"name": "x", "op": "concat", "args": [{"value": EVIL}]}], "columns": ["agent"]}),
    ("select", {"derived": [{"name": "x", "op": "coalesce", "args": [{"column": "agent"}, {"value": EVIL}]}]}),
    ("pivot", {"column": "agent", "values": [EVIL]}),
    ("sql", {"template": "SELECT $v AS v", "parameters": [{"name": "v", "type": "string", "value": EVIL}]}),
]


@pytest.mark.parametrize(("block_id", "config"), CONFIGS_WITH_VALUES)
def test_values_are_bound_never_spliced(files: dict[str, Path], block_id: str, config: dict[str, Any]) -> None:
    block = registry.get(block_id)
    con = _connect()
    inputs = {"data": columns_of(con, files["calls"])}
    con.close()
    compiled = block.compile(config, inputs)
    if block_id == "pivot":  # the value names the output column: a quoted identifier, and bound as the value
        assert compiled.sql.count(quote(EVIL)) == 1 and "DROP" not in compiled.sql.replace(quote(EVIL), "")
    elif block_id != "sql":
        assert EVIL not in compiled.sql and "DROP" not in compiled.sql
    assert EVIL in compiled.parameters.values()
    _, rows = run(files, block, config)
    if block_id == "select" and config["derived"][0]["op"] == "concat":
        assert {r["x"] for r in rows} == {EVIL}
    if block_id == "pivot":
        assert rows[0][EVIL] == 0
    if block_id == "sql":
        assert rows == [{"v": EVIL}]


def test_hostile_column_names_are_quoted(files: dict[str, Path], tmp_path: Path) -> None:
    weird = 'a"b; DROP TABLE x; --'
    path = tmp_path / "weird.parquet"
    con = _connect()
    con.execute(f"COPY (SELECT i AS {quote(weird)}, i % 3 AS g FROM range(10) t(i)) TO '{path}'")
    con.close()
    files = {**files, "weird": path}
    _, rows = run(
        files,
        registry.get("aggregate"),
        {"group_by": ["g"], "metrics": [{"fn": "sum", "column": weird}]},
        {"data": "weird"},
    )
    assert [r[f"sum_{weird}"] for r in rows] == [0 + 3 + 6 + 9, 1 + 4 + 7, 2 + 5 + 8]
    _, rows = run(files, registry.get("describe"), {}, {"data": "weird"})
    assert rows[0]["column"] == weird and rows[0]["mean"] == 4.5
    _, rows = run(files, registry.get("select"), {"rename": {weird: "n"}}, {"data": "weird"})
    assert math.fsum(r["n"] for r in rows) == 45
