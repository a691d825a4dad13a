"""The preview engine on real Parquet files: every filter against a Python computation, paging, options, profiles."""

from __future__ import annotations

import base64
import itertools
import json
import math
import os
import random
import statistics
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from strata.common.errors import StrataError
from strata.datasets import engine
from strata.datasets.engine import (
    Filter,
    InvalidFilter,
    InvalidFilterValue,
    InvalidParameter,
    UnknownColumn,
    parse_filter,
)

N = 5000
AGENTS = ["Ana", "Ben", "ben", "Carla", "Dmitri", "Elif", "Farah", "Goran", "Hana", "Ivo"]
AGENTS += ["Jun", "Kofi", "Lena", "Mateo", "Nia", "O'Brien", "Pia", "Quinn", "Rosa", "Sven"]
REGIONS = ["North", "South", "East", "West", None]
ISSUES = ["billing", "Billing dispute", "outage", "login", "hardware", "shipping", "other"]
CHANNELS = ["phone", "chat", "email"]
NOTES = ["vip", "callback", "escalated", None]
START = datetime(2024, 3, 1, tzinfo=UTC)


def make_calls() -> list[dict[str, Any]]:
    rng = random.Random(20240501)
    ids = rng.sample(range(1, 1_000_000), N)  # not in file order, so file order is a real tie-break
    rows = []
    for i in range(N):
        start = START + timedelta(seconds=rng.randrange(60 * 86400))
        duration = None if rng.random() < 0.02 else round(rng.expovariate(1 / 300), 1)
        open_call = duration is None or rng.random() < 0.03
        end = None if open_call else (start + timedelta(seconds=duration or 0)).replace(tzinfo=None)
        rows.append(
            {
                "call_id": ids[i],
                "agent": rng.choices(AGENTS, weights=range(1, 21))[0],
                "region": rng.choices(REGIONS, weights=[30, 25, 20, 20, 5])[0],
                "issue_type": rng.choices(ISSUES, weights=[25, 10, 15, 20, 10, 15, 5])[0],
                "channel": rng.choice(CHANNELS),
                "start_time": start,
                "end_time": end,
                "duration_s": duration,
                "rating": None if rng.random() < 0.15 else rng.randint(1, 5),
                "resolved": None if rng.random() < 0.05 else rng.random() < 0.7,
                "amount": None if rng.random() < 0.1 else Decimal(rng.randint(0, 20000)).scaleb(-2),
                "call_date": start.date(),
                "wait:s": rng.randrange(600),
                'note "q"': rng.choice(NOTES),
            }
        )
    return rows


CALLS_SCHEMA = pa.schema(
    [
        pa.field("call_id", pa.int64(), nullable=False),
        pa.field("agent", pa.string(), nullable=False),
        pa.field("region", pa.string()),
        pa.field("issue_type", pa.string()),
        pa.field("channel", pa.string()),
        pa.field("start_time", pa.timestamp("us", tz="UTC")),
        pa.field("end_time", pa.timestamp("us")),
        pa.field("duration_s", pa.float64()),
        pa.field("rating", pa.int8()),
        pa.field("resolved", pa.bool_()),
        pa.field("amount", pa.decimal128(10, 2)),
        pa.field("call_date", pa.date32()),
        pa.field("wait:s", pa.int32()),
        pa.field('note "q"', pa.string()),
    ]
)


@pytest.fixture(scope="module")
def calls() -> list[dict[str, Any]]:
    return CALLS


@pytest.fixture(scope="module")
def calls_path(calls: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("engine") / "calls.parquet"
    table = pa.Table.from_pylist(calls, schema=CALLS_SCHEMA)
    pq.write_table(table, path, row_group_size=1024)  # several row groups, so file order spans them
    return str(path)


@pytest.fixture(scope="module")
def con() -> Iterator[duckdb.DuckDBPyConnection]:
    connection = engine.connect(threads=2, memory_limit="512MB")
    yield connection
    connection.close()


@pytest.fixture
def cur(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    cursor = con.cursor()
    yield cursor
    cursor.close()


def page_through(
    cur: duckdb.DuckDBPyConnection,
    path: str,
    filters: Sequence[Filter] = (),
    sort: Sequence[tuple[str, bool]] = (),
    *,
    limit: int = 1000,
    column: str = "call_id",
) -> list[Any]:
    """Every matching value of ``column``, page after page, checking each page's bookkeeping on the way."""
    out: list[Any] = []
    offset = 0
    totals = set()
    while True:
        page = engine.preview(
            cur, path, columns=[column], filters=list(filters), sort=list(sort), limit=limit, offset=offset
        )
        assert len(page.rows) <= limit
        out += [row[0] for row in page.rows]
        totals.add(page.total_rows)
        if page.next_offset is None:
            break
        assert page.next_offset == offset + limit
        assert len(page.rows) == limit
        offset = page.next_offset
    assert totals == {len(out)}
    return out


def expected_ids(calls: list[dict[str, Any]], keep: Callable[[dict[str, Any]], bool]) -> list[int]:
    return [r["call_id"] for r in calls if keep(r)]


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def lower_has(value: str | None, part: str) -> bool:
    return value is not None and part.lower() in value.lower()


# --- connection and schema ---------------------------------------------------------------------------------------


def test_connect_sets_limits_and_turns_extension_autoloading_off(con: duckdb.DuckDBPyConnection) -> None:
    cursor = con.cursor()  # settings are global, so every cursor of the connection sees them
    settings = dict(
        cursor.execute(
            "SELECT name, value FROM duckdb_settings() WHERE name IN ('autoinstall_known_extensions', "
            "'autoload_known_extensions', 'threads', 'memory_limit', 'TimeZone', 'parquet_metadata_cache', "
            "'preserve_insertion_order')"
        ).fetchall()
    )
    assert settings["autoinstall_known_extensions"] == "false"
    assert settings["autoload_known_extensions"] == "false"
    assert settings["threads"] == "2"
    assert settings["memory_limit"] == "488.2 MiB"  # 512 MB, shown in MiB
    assert settings["TimeZone"] == "UTC"
    assert settings["parquet_metadata_cache"] == "true"
    assert settings["preserve_insertion_order"] == "true"


def test_schema_reports_types_and_required_columns(cur: duckdb.DuckDBPyConnection, calls_path: str) -> None:
    columns = engine.schema(cur, calls_path)
    assert [(c.name, c.type, c.nullable) for c in columns] == [
        ("call_id", "BIGINT", False),
        ("agent", "VARCHAR", False),
        ("region", "VARCHAR", True),
        ("issue_type", "VARCHAR", True),
        ("channel", "VARCHAR", True),
        ("start_time", "TIMESTAMP WITH TIME ZONE", True),
        ("end_time", "TIMESTAMP", True),
        ("duration_s", "DOUBLE", True),
        ("rating", "TINYINT", True),
        ("resolved", "BOOLEAN", True),
        ("amount", "DECIMAL(10,2)", True),
        ("call_date", "DATE", True),
        ("wait:s", "INTEGER", True),
        ('note "q"', "VARCHAR", True),
    ]
    assert [c.kind for c in columns][5:12] == [
        "timestamptz",
        "timestamp",
        "float",
        "integer",
        "boolean",
        "decimal",
        "date",
    ]


def test_schema_of_nested_columns_keeps_top_level_nullability(cur: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    table = pa.table(
        {"tags": [["a"], None], "point": [{"x": 1, "y": 2}, None], "id": [1, 2]},
        schema=pa.schema(
            [
                pa.field("tags", pa.list_(pa.string())),
                pa.field("point", pa.struct([pa.field("x", pa.int32(), nullable=False), pa.field("y", pa.int32())])),
                pa.field("id", pa.int32(), nullable=False),
            ]
        ),
    )
    pq.write_table(table, tmp_path / "nested.parquet")
    columns = engine.schema(cur, tmp_path / "nested.parquet")
    assert [(c.name, c.type, c.nullable, c.kind) for c in columns] == [
        ("tags", "VARCHAR[]", True, "other"),
        ("point", "STRUCT(x INTEGER, y INTEGER)", True, "other"),
        ("id", "INTEGER", False, "integer"),
    ]


# --- filters: every operator on every type it applies to ----------------------------------------------------------

CALLS = make_calls()
DURATION = next(r["duration_s"] for r in CALLS if r["duration_s"] is not None and r["duration_s"] > 100)
AMOUNT = next(r["amount"] for r in CALLS if r["amount"] is not None)
START_EXACT = CALLS[17]["start_time"]
END_EXACT = next(r["end_time"] for r in CALLS if r["end_time"] is not None)
DAY = date(2024, 3, 15)

# (query-string filter, the rows it must keep); each case keeps some rows but not all (checked in the test).
OP_CASES: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
    # text
    ("agent:eq:Ben", lambda r: r["agent"] == "Ben"),
    ("agent:eq:O'Brien", lambda r: r["agent"] == "O'Brien"),
    ("agent:ne:Ben", lambda r: r["agent"] != "Ben"),
    ("agent:lt:Carla", lambda r: r["agent"] < "Carla"),
    ("agent:lte:Carla", lambda r: r["agent"] <= "Carla"),
    ("agent:gt:Pia", lambda r: r["agent"] > "Pia"),
    ("agent:gte:Pia", lambda r: r["agent"] >= "Pia"),
    ("agent:in:Ana,Ben,Nobody", lambda r: r["agent"] in {"Ana", "Ben"}),
    ('agent:in:["Ana", "O\'Brien"]', lambda r: r["agent"] in {"Ana", "O'Brien"}),
    ("agent:not_in:Ana,Ben", lambda r: r["agent"] not in {"Ana", "Ben"}),
    ("agent:contains:EN", lambda r: lower_has(r["agent"], "en")),
    ("agent:starts_with:b", lambda r: r["agent"].lower().startswith("b")),
    ("agent:between:B,D", lambda r: "B" <= r["agent"] <= "D"),
    ("region:eq:North", lambda r: r["region"] == "North"),
    ("region:ne:North", lambda r: r["region"] != "North"),  # keeps rows without a region
    ("region:not_in:North,South", lambda r: r["region"] not in {"North", "South"}),
    ("region:is_null", lambda r: r["region"] is None),
    ("region:not_null", lambda r: r["region"] is not None),
    ("region:contains:th", lambda r: lower_has(r["region"], "th")),
    ("issue_type:starts_with:BILL", lambda r: (r["issue_type"] or "").lower().startswith("bill")),
    # integer (nullable TINYINT)
    ("rating:eq:5", lambda r: r["rating"] == 5),
    ("rating:ne:5", lambda r: r["rating"] != 5),
    ("rating:lt:3", lambda r: r["rating"] is not None and r["rating"] < 3),
    ("rating:lte:3", lambda r: r["rating"] is not None and r["rating"] <= 3),
    ("rating:gt:3", lambda r: r["rating"] is not None and r["rating"] > 3),
    ("rating:gte:3", lambda r: r["rating"] is not None and r["rating"] >= 3),
    ("rating:gte:-1000", lambda r: r["rating"] is not None),  # beyond TINYINT: DuckDB widens the comparison
    ("rating:in:[1, 5]", lambda r: r["rating"] in {1, 5}),
    ("rating:not_in:1,5", lambda r: r["rating"] not in {1, 5}),
    ("rating:between:2,4", lambda r: r["rating"] is not None and 2 <= r["rating"] <= 4),
    ("rating:is_null", lambda r: r["rating"] is None),
    ("rating:not_null", lambda r: r["rating"] is not None),
    ("rating:eq:4.0", lambda r: r["rating"] == 4),
    ("wait%3As:gte:300", lambda r: r["wait:s"] >= 300),
    ("call_id:in:" + ",".join(str(r["call_id"]) for r in CALLS[:50:7]), lambda r: r in CALLS[:50:7]),
    # float
    (f"duration_s:eq:{DURATION}", lambda r: r["duration_s"] == DURATION),
    (f"duration_s:ne:{DURATION}", lambda r: r["duration_s"] != DURATION),
    ("duration_s:lt:60", lambda r: r["duration_s"] is not None and r["duration_s"] < 60),
    ("duration_s:lte:60.5", lambda r: r["duration_s"] is not None and r["duration_s"] <= 60.5),
    ("duration_s:gt:1e3", lambda r: r["duration_s"] is not None and r["duration_s"] > 1000),
    ("duration_s:gte:300", lambda r: r["duration_s"] is not None and r["duration_s"] >= 300),
    ("duration_s:between:100.5,200", lambda r: r["duration_s"] is not None and 100.5 <= r["duration_s"] <= 200),
    (f"duration_s:in:[{DURATION}, 1.5]", lambda r: r["duration_s"] in {DURATION, 1.5}),
    (f"duration_s:not_in:{DURATION}", lambda r: r["duration_s"] != DURATION),
    ("duration_s:is_null", lambda r: r["duration_s"] is None),
    ("duration_s:not_null", lambda r: r["duration_s"] is not None),
    # decimal
    (f"amount:eq:{AMOUNT}", lambda r: r["amount"] == AMOUNT),
    (f"amount:eq:{AMOUNT}0", lambda r: r["amount"] == AMOUNT),  # trailing zero, same number
    (f"amount:eq:{AMOUNT}1", lambda r: False),  # more places than the column: compared exactly, no rounding
    ("amount:gt:150.005", lambda r: r["amount"] is not None and r["amount"] > Decimal("150.005")),
    ("amount:lt:20", lambda r: r["amount"] is not None and r["amount"] < 20),
    ("amount:lte:20.50", lambda r: r["amount"] is not None and r["amount"] <= Decimal("20.50")),
    ("amount:gte:100", lambda r: r["amount"] is not None and r["amount"] >= 100),
    (
        "amount:between:[10.10, 20.2]",
        lambda r: r["amount"] is not None and Decimal("10.10") <= r["amount"] <= Decimal("20.2"),
    ),
    (f"amount:in:{AMOUNT},0.01", lambda r: r["amount"] in {AMOUNT, Decimal("0.01")}),
    (f"amount:ne:{AMOUNT}", lambda r: r["amount"] != AMOUNT),
    (f"amount:not_in:[{AMOUNT}, 10]", lambda r: r["amount"] not in {AMOUNT, 10}),
    ("amount:not_null", lambda r: r["amount"] is not None),
    ("amount:is_null", lambda r: r["amount"] is None),
    # date
    ("call_date:eq:2024-03-15", lambda r: r["call_date"] == DAY),
    ("call_date:ne:2024-03-15", lambda r: r["call_date"] != DAY),
    ("call_date:lt:2024-03-15", lambda r: r["call_date"] < DAY),
    ("call_date:lte:2024-03-15", lambda r: r["call_date"] <= DAY),
    ("call_date:gt:2024-04-15", lambda r: r["call_date"] > date(2024, 4, 15)),
    ("call_date:gte:2024-04-15", lambda r: r["call_date"] >= date(2024, 4, 15)),
    ("call_date:between:2024-03-10,2024-03-12", lambda r: date(2024, 3, 10) <= r["call_date"] <= date(2024, 3, 12)),
    ('call_date:in:["2024-03-01", "2024-04-01"]', lambda r: r["call_date"] in {date(2024, 3, 1), date(2024, 4, 1)}),
    ("call_date:not_in:2024-03-01", lambda r: r["call_date"] != date(2024, 3, 1)),
    ("call_date:not_null", lambda r: True),
    # timestamp with time zone (values with or without an offset; naive means UTC)
    (f"start_time:eq:{START_EXACT.isoformat()}", lambda r: r["start_time"] == START_EXACT),
    (f"start_time:ne:{START_EXACT.isoformat()}", lambda r: r["start_time"] != START_EXACT),
    ("start_time:gte:2024-04-01T00:00:00Z", lambda r: r["start_time"] >= utc(2024, 4, 1)),
    ("start_time:gt:2024-04-01T02:00:00+02:00", lambda r: r["start_time"] > utc(2024, 4, 1)),
    ("start_time:lt:2024-03-10 12:30:00", lambda r: r["start_time"] < utc(2024, 3, 10, 12, 30)),
    ("start_time:lte:2024-03-10", lambda r: r["start_time"] <= utc(2024, 3, 10)),
    (
        "start_time:between:2024-03-05T08:00:00-05:00,2024-03-06",
        lambda r: utc(2024, 3, 5, 13) <= r["start_time"] <= utc(2024, 3, 6),
    ),
    (f'start_time:in:["{START_EXACT.isoformat()}"]', lambda r: r["start_time"] == START_EXACT),
    (f"start_time:not_in:{START_EXACT.isoformat()}", lambda r: r["start_time"] != START_EXACT),
    # timestamp without time zone (a value with an offset is converted to UTC)
    (f"end_time:eq:{END_EXACT.isoformat()}", lambda r: r["end_time"] == END_EXACT),
    ("end_time:gt:2024-04-01T03:00:00+03:00", lambda r: r["end_time"] is not None and r["end_time"] > _naive(4, 1)),
    ("end_time:lt:2024-03-20", lambda r: r["end_time"] is not None and r["end_time"] < _naive(3, 20)),
    ("end_time:is_null", lambda r: r["end_time"] is None),
    ("end_time:not_null", lambda r: r["end_time"] is not None),
    # boolean
    ("resolved:eq:true", lambda r: r["resolved"] is True),
    ("resolved:eq:no", lambda r: r["resolved"] is False),
    ("resolved:ne:true", lambda r: r["resolved"] is not True),  # keeps unknowns
    ("resolved:in:[false]", lambda r: r["resolved"] is False),
    ("resolved:not_in:0", lambda r: r["resolved"] is not False),
    ("resolved:is_null", lambda r: r["resolved"] is None),
    ("resolved:not_null", lambda r: r["resolved"] is not None),
]


def _naive(month: int, day: int) -> datetime:
    return datetime(2024, month, day)  # noqa: DTZ001


@pytest.mark.parametrize(("text", "keep"), OP_CASES, ids=[text[:60] for text, _ in OP_CASES])
def test_filter_matches_python(
    cur: duckdb.DuckDBPyConnection,
    calls_path: str,
    calls: list[dict[str, Any]],
    text: str,
    keep: Callable[[dict[str, Any]], bool],
) -> None:
    expected = expected_ids(calls, keep)
    if text not in {f"amount:eq:{AMOUNT}1", "call_date:not_null"}:
        assert 0 < len(expected) < N, "the case must tell matching rows from the rest"
    assert page_through(cur, calls_path, [parse_filter(text)]) == expected


def test_every_operator_is_exercised_on_every_type_it_applies_to() -> None:
    seen: dict[str, set[str]] = {}
    kinds = {c.name: c.kind for c in _calls_columns()}
    for text, _ in OP_CASES:
        f = parse_filter(text)
        seen.setdefault(kinds[f.column], set()).add(f.op)
    assert seen["string"] == engine.OPS
    comparisons = engine.OPS - {"contains", "starts_with"}
    for kind in ("integer", "float", "decimal"):
        assert seen[kind] == comparisons, kind
    # start_time has no nulls, so the null operators on timestamps are tried on end_time
    assert seen["timestamptz"] == comparisons - {"is_null", "not_null"}
    assert seen["timestamp"] == {"eq", "gt", "lt", "is_null", "not_null"}
    assert seen["date"] == comparisons - {"is_null"}
    assert seen["boolean"] == {"eq", "ne", "in", "not_in", "is_null", "not_null"}


def _calls_columns() -> list[engine.Column]:
    return [
        engine.Column(f.name, _duck_type(f.type), f.nullable)
        for f in CALLS_SCHEMA  # the same types the schema test pins down
    ]


def _duck_type(t: pa.DataType) -> str:
    names = {
        "int64": "BIGINT",
        "string": "VARCHAR",
        "timestamp[us, tz=UTC]": "TIMESTAMP WITH TIME ZONE",
        "timestamp[us]": "TIMESTAMP",
        "double": "DOUBLE",
        "int8": "TINYINT",
        "bool": "BOOLEAN",
        "decimal128(10, 2)": "DECIMAL(10,2)",
        "date32[day]": "DATE",
        "int32": "INTEGER",
    }
    return names[str(t)]


def test_filters_are_anded(cur: duckdb.DuckDBPyConnection, calls_path: str, calls: list[dict[str, Any]]) -> None:
    filters = [
        parse_filter("region:in:North,East"),
        parse_filter("rating:gte:4"),
        parse_filter("resolved:eq:true"),
        parse_filter("start_time:gte:2024-03-20T00:00:00Z"),
        parse_filter("issue_type:contains:bill"),
    ]
    expected = expected_ids(
        calls,
        lambda r: (
            r["region"] in {"North", "East"}
            and r["rating"] is not None
            and r["rating"] >= 4
            and r["resolved"] is True
            and r["start_time"] >= utc(2024, 3, 20)
            and lower_has(r["issue_type"], "bill")
        ),
    )
    assert 0 < len(expected) < 200
    assert page_through(cur, calls_path, filters, limit=7) == expected


def test_filters_take_python_values(
    cur: duckdb.DuckDBPyConnection, calls_path: str, calls: list[dict[str, Any]]
) -> None:
    filters = [
        Filter("call_date", "between", [date(2024, 3, 10), date(2024, 3, 20)]),
        Filter("start_time", "lt", datetime(2024, 3, 15, 14, 0, tzinfo=timezone(timedelta(hours=2)))),
        Filter("amount", "gte", Decimal("50.00")),
        Filter("rating", "in", (2, 3)),
        Filter("resolved", "eq", False),
    ]
    expected = expected_ids(
        calls,
        lambda r: (
            date(2024, 3, 10) <= r["call_date"] <= date(2024, 3, 20)
            and r["start_time"] < utc(2024, 3, 15, 12)
            and r["amount"] is not None
            and r["amount"] >= 50
            and r["rating"] in {2, 3}
            and r["resolved"] is False
        ),
    )
    assert expected
    assert page_through(cur, calls_path, filters) == expected


# --- parsing -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("agent:eq:Ben", Filter("agent", "eq", "Ben")),
        ("agent:eq:", Filter("agent", "eq", "")),
        ("start_time:gte:2024-05-01T09:30:00+02:00", Filter("start_time", "gte", "2024-05-01T09:30:00+02:00")),
        ("wait%3As:lt:10", Filter("wait:s", "lt", "10")),
        ("100%25%20sure:eq:yes", Filter("100% sure", "eq", "yes")),
        ("rating:is_null", Filter("rating", "is_null", None)),
        ("rating:not_null:", Filter("rating", "not_null", None)),
        ("rating:in: 1, 2 ,3", Filter("rating", "in", ["1", "2", "3"])),
        ('region:in:["North, East", "South"]', Filter("region", "in", ["North, East", "South"])),
        ("amount:between:[0.10, 2]", Filter("amount", "between", [Decimal("0.10"), 2])),
        ("agent:contains:a:b", Filter("agent", "contains", "a:b")),
    ],
)
def test_parse_filter(text: str, expected: Filter) -> None:
    assert parse_filter(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "rating",
        "rating:",
        "rating:eq",
        ":eq:3",
        "rating:like:3",
        "rating:EQ:3",
        "rating:is_null:3",
        "rating:in:[1,",
        "rating:in:[[1]]",
    ],
)
def test_parse_filter_rejects_malformed_text(text: str) -> None:
    with pytest.raises(InvalidFilter) as caught:
        parse_filter(text)
    assert type(caught.value) is InvalidFilter
    assert (caught.value.status, caught.value.code) == (422, "INVALID_FILTER")


def test_filter_rejects_unknown_operator() -> None:
    with pytest.raises(InvalidFilter, match="Unknown filter operator 'like'"):
        Filter("agent", "like", "x")


# --- bad input -----------------------------------------------------------------------------------------------------


def test_unknown_column_names_it_and_suggests_close_matches(cur: duckdb.DuckDBPyConnection, calls_path: str) -> None:
    attempts: list[Callable[[], Any]] = [
        lambda: engine.preview(
            cur, calls_path, columns=None, filters=[parse_filter("agnet:eq:x")], sort=[], limit=10, offset=0
        ),
        lambda: engine.preview(cur, calls_path, columns=None, filters=[], sort=[("agnet", False)], limit=10, offset=0),
        lambda: engine.preview(cur, calls_path, columns=["call_id", "agnet"], filters=[], sort=[], limit=10, offset=0),
        lambda: engine.options(cur, calls_path, "agnet", filters=[], q=None, limit=10),
        lambda: engine.options(cur, calls_path, "region", filters=[parse_filter("agnet:eq:x")], q=None, limit=10),
    ]
    for attempt in attempts:
        with pytest.raises(UnknownColumn) as caught:
            attempt()
        error = caught.value
        assert (error.status, error.code) == (422, "UNKNOWN_COLUMN")
        assert "'agnet'" in error.message and "'agent'" in error.message
        assert error.details == [{"column": "agnet", "suggestions": ["agent"]}]

    with pytest.raises(UnknownColumn) as caught:
        engine.preview(cur, calls_path, columns=None, filters=[parse_filter("zzz:eq:1")], sort=[], limit=1, offset=0)
    assert "Columns: 'call_id', 'agent'" in caught.value.message  # nothing close: list what there is
    with pytest.raises(UnknownColumn, match="Did you mean 'agent'"):  # names are matched exactly, case included
        engine.preview(cur, calls_path, columns=None, filters=[parse_filter("AGENT:eq:x")], sort=[], limit=1, offset=0)


@pytest.mark.parametrize(
    ("text", "column", "type_"),
    [
        ("rating:eq:abc", "rating", "TINYINT"),
        ("rating:eq:2.5", "rating", "TINYINT"),
        ("rating:eq:", "rating", "TINYINT"),
        ("rating:eq:true", "rating", "TINYINT"),
        ("rating:lt:1e40", "rating", "TINYINT"),
        ('rating:in:[1, "x"]', "rating", "TINYINT"),
        ("rating:in:[1, null]", "rating", "TINYINT"),
        ("rating:between:1,b", "rating", "TINYINT"),
        ("duration_s:lt:fast", "duration_s", "DOUBLE"),
        ("amount:eq:ten", "amount", "DECIMAL(10,2)"),
        ("amount:eq:NaN", "amount", "DECIMAL(10,2)"),
        ("amount:gt:1" + "0" * 40, "amount", "DECIMAL(10,2)"),
        ("call_date:eq:2024-13-01", "call_date", "DATE"),
        ("call_date:eq:2024-03-01T10:00:00", "call_date", "DATE"),
        ("start_time:gt:yesterday", "start_time", "TIMESTAMP WITH TIME ZONE"),
        ("end_time:lt:2024-02-30", "end_time", "TIMESTAMP"),
        ("resolved:eq:maybe", "resolved", "BOOLEAN"),
        ("resolved:in:[true, 2]", "resolved", "BOOLEAN"),
        ("agent:in:[true]", "agent", "VARCHAR"),
    ],
)
def test_value_that_does_not_fit_the_type(
    cur: duckdb.DuckDBPyConnection, calls_path: str, text: str, column: str, type_: str
) -> None:
    with pytest.raises(InvalidFilterValue) as caught:
        engine.preview(cur, calls_path, columns=None, filters=[parse_filter(text)], sort=[], limit=10, offset=0)
    error = caught.value
    assert (error.status, error.code) == (422, "INVALID_FILTER_VALUE")
    assert repr(column) in error.message and type_ in error.message
    (detail,) = error.details
    assert detail["column"] == column and detail["type"] == type_ and "value" in detail
    json.dumps(error.to_dict())  # the envelope can carry it


@pytest.mark.parametrize(
    "text",
    [
        "rating:contains:1",
        "rating:starts_with:1",
        "duration_s:contains:1",
        "amount:starts_with:1",
        "start_time:contains:2024",
        "call_date:starts_with:2024",
        "resolved:lt:true",
        "resolved:between:false,true",
        "resolved:contains:t",
    ],
)
def test_operator_that_does_not_apply_to_the_type(cur: duckdb.DuckDBPyConnection, calls_path: str, text: str) -> None:
    with pytest.raises(InvalidFilter) as caught:
        engine.preview(cur, calls_path, columns=None, filters=[parse_filter(text)], sort=[], limit=10, offset=0)
    error = caught.value
    assert type(error) is InvalidFilter
    assert (error.status, error.code) == (422, "INVALID_FILTER")
    assert "does not apply to column" in error.message


@pytest.mark.parametrize(
    "bad",
    [
        Filter("rating", "between", ["1"]),
        Filter("rating", "between", ["1", "2", "3"]),
        Filter("rating", "in", []),
        Filter("rating", "in", list(range(1001))),
        Filter("rating", "in", 5),
        Filter("rating", "eq", [1, 2]),
        Filter("rating", "is_null", "x"),
    ],
)
def test_malformed_filter_objects(cur: duckdb.DuckDBPyConnection, calls_path: str, bad: Filter) -> None:
    with pytest.raises(InvalidFilter) as caught:
        engine.preview(cur, calls_path, columns=None, filters=[bad], sort=[], limit=10, offset=0)
    assert caught.value.code == "INVALID_FILTER"


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"offset": -1}, "offset"),
        ({"columns": []}, "columns"),
    ],
)
def test_preview_bounds(
    cur: duckdb.DuckDBPyConnection, calls_path: str, kwargs: dict[str, Any], parameter: str
) -> None:
    args: dict[str, Any] = {"columns": None, "filters": [], "sort": [], "limit": 10, "offset": 0} | kwargs
    with pytest.raises(InvalidParameter) as caught:
        engine.preview(cur, calls_path, **args)
    assert (caught.value.status, caught.value.code) == (422, "INVALID_PARAMETER")
    assert caught.value.details[0]["parameter"] == parameter


def test_sql_in_a_value_is_only_a_value(
    cur: duckdb.DuckDBPyConnection, calls_path: str, calls: list[dict[str, Any]]
) -> None:
    cur.execute("CREATE OR REPLACE TABLE x AS SELECT 42 AS answer")
    for text in [
        "agent:eq:'; DROP TABLE x; --",
        "agent:contains:' OR 1=1 --",
        "agent:in:x'); DROP TABLE x; --,Ben\"",
        'agent:gt:zzz" OR "1"="1',
        "region:starts_with:%",
        "region:contains:_",
    ]:
        page = engine.preview(cur, calls_path, columns=None, filters=[parse_filter(text)], sort=[], limit=10, offset=0)
        assert (page.rows, page.total_rows, page.next_offset) == ([], 0, None), text
    assert cur.execute("SELECT answer FROM x").fetchall() == [(42,)]
    # quotes are ordinary characters of a value, and LIKE wildcards are not wildcards
    expected = expected_ids(calls, lambda r: r["agent"] == "O'Brien")
    assert page_through(cur, calls_path, [parse_filter("agent:eq:O'Brien")]) == expected
    assert engine.options(cur, calls_path, "agent", filters=[], q="%", limit=10) == []


# --- sorting and paging --------------------------------------------------------------------------------------------


def sorted_rows(calls: list[dict[str, Any]], keys: Sequence[tuple[str, bool]]) -> list[int]:
    """Rows in the engine's order: by each key (nulls last either way), ties in file order."""
    rows = list(calls)
    for name, descending in reversed(keys):
        present = [r for r in rows if r[name] is not None]
        missing = [r for r in rows if r[name] is None]
        rows = sorted(present, key=lambda r: r[name], reverse=descending) + missing  # stable, reverse too
    return [r["call_id"] for r in rows]


@pytest.mark.parametrize(
    ("sort", "limit"),
    [
        ([("region", False)], 97),
        ([("region", True)], 250),
        ([("rating", True), ("agent", False)], 333),
        ([("resolved", False), ("duration_s", True)], 1000),
        ([("call_date", True)], 64),
        ([("amount", False)], 500),
        ([("channel", False), ("channel", True)], 400),  # a repeated column counts once
        ([('note "q"', True)], 999),
    ],
)
def test_sorted_pages_have_no_gaps_or_duplicates(
    cur: duckdb.DuckDBPyConnection,
    calls_path: str,
    calls: list[dict[str, Any]],
    sort: list[tuple[str, bool]],
    limit: int,
) -> None:
    got = page_through(cur, calls_path, sort=sort, limit=limit)
    assert len(got) == N and len(set(got)) == N
    assert got == sorted_rows(calls, sort[:1] if sort[0][0] == "channel" else sort)


def test_sorted_and_filtered_pages(
    cur: duckdb.DuckDBPyConnection, calls_path: str, calls: list[dict[str, Any]]
) -> None:
    subset = [r for r in calls if r["region"] == "South"]
    got = page_through(cur, calls_path, [parse_filter("region:eq:South")], [("rating", False)], limit=41)
    assert got == sorted_rows(subset, [("rating", False)])


def test_unsorted_pages_follow_file_order(
    cur: duckdb.DuckDBPyConnection, calls_path: str, calls: list[dict[str, Any]]
) -> None:
    assert page_through(cur, calls_path, limit=333) == [r["call_id"] for r in calls]
    deep = engine.preview(cur, calls_path, columns=["call_id"], filters=[], sort=[], limit=5, offset=4000)
    assert [row[0] for row in deep.rows] == [r["call_id"] for r in calls[4000:4005]]


def test_column_selection(cur: duckdb.DuckDBPyConnection, calls_path: str, calls: list[dict[str, Any]]) -> None:
    page = engine.preview(
        cur,
        calls_path,
        columns=["rating", 'note "q"', "wait:s", "rating", "start_time"],
        filters=[],
        sort=[("call_id", False)],
        limit=3,
        offset=0,
    )
    assert [c.name for c in page.columns] == ["rating", 'note "q"', "wait:s", "start_time"]
    assert [c.type for c in page.columns] == ["TINYINT", "VARCHAR", "INTEGER", "TIMESTAMP WITH TIME ZONE"]
    first = sorted(calls, key=lambda r: r["call_id"])[:3]
    assert page.rows == [[r["rating"], r['note "q"'], r["wait:s"], r["start_time"].isoformat()] for r in first]


def test_total_rows_and_next_offset(
    cur: duckdb.DuckDBPyConnection, calls_path: str, calls: list[dict[str, Any]]
) -> None:
    def page(filters: list[str], limit: int, offset: int) -> engine.Page:
        return engine.preview(
            cur,
            calls_path,
            columns=["call_id"],
            filters=[parse_filter(f) for f in filters],
            sort=[],
            limit=limit,
            offset=offset,
        )

    north = sum(r["region"] == "North" for r in calls)
    assert (page([], 10, 0).total_rows, page([], 10, 0).next_offset) == (N, 10)  # from the footer
    assert (page(["region:eq:North"], 10, 0).total_rows, page(["region:eq:North"], 10, 0).next_offset) == (north, 10)
    last = page(["region:eq:North"], 10, north - 3)  # the last page counts itself
    assert (len(last.rows), last.total_rows, last.next_offset) == (3, north, None)
    beyond = page(["region:eq:North"], 10, north + 50)
    assert (beyond.rows, beyond.total_rows, beyond.next_offset) == ([], north, None)
    exact = page([], 10, N - 10)
    assert (exact.total_rows, exact.next_offset) == (N, None)
    nothing = page(["agent:eq:nobody"], 10, 0)
    assert (nothing.rows, nothing.total_rows, nothing.next_offset) == ([], 0, None)


def test_rows_are_json_safe(cur: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    table = pa.table(
        {
            "f": pa.array([1.5, math.nan, math.inf, -math.inf, None]),
            "d": pa.array(
                [Decimal("0.00"), Decimal("-1.50"), Decimal("12345678.90"), None, None], pa.decimal128(10, 2)
            ),
            "b": pa.array([b"\x00\xff", b"", None, None, None], pa.binary()),
            "ts": pa.array(
                [datetime(2024, 5, 1, 12, 30, 15, 250000, tzinfo=UTC)] + [None] * 4, pa.timestamp("ms", tz="UTC")
            ),
            "naive": pa.array([datetime(2024, 5, 1, 12, 30)] + [None] * 4, pa.timestamp("ns")),  # noqa: DTZ001
            "day": pa.array([date(2024, 5, 1)] + [None] * 4),
            "t": pa.array([time(9, 15)] + [None] * 4),
            "u": pa.array([ident.bytes] + [None] * 4, pa.uuid()),
            "l": pa.array([[1, 2], [], None, None, None], pa.list_(pa.int32())),
            "s": pa.array([{"x": 1.5, "y": "a"}, None, None, None, None]),
            "m": pa.array([[(1, "one")], None, None, None, None], pa.map_(pa.int32(), pa.string())),
        }
    )
    path = tmp_path / "types.parquet"
    pq.write_table(table, path)
    page = engine.preview(cur, path, columns=None, filters=[], sort=[], limit=10, offset=0)
    json.dumps(page.rows, allow_nan=False)
    assert [row[0] for row in page.rows] == [1.5, None, None, None, None]
    assert [row[1] for row in page.rows] == ["0.00", "-1.50", "12345678.90", None, None]
    assert [row[2] for row in page.rows][:2] == [base64.b64encode(b"\x00\xff").decode(), ""]
    assert page.rows[0][3:] == [
        "2024-05-01T12:30:15.250000+00:00",
        "2024-05-01T12:30:00",
        "2024-05-01",
        "09:15:00",
        str(ident),
        [1, 2],
        {"x": 1.5, "y": "a"},
        {"1": "one"},
    ]
    # NaN equals itself and sorts above every number, as in DuckDB; nulls still come last
    desc = engine.preview(cur, path, columns=["f"], filters=[], sort=[("f", True)], limit=10, offset=0)
    assert desc.rows == [[None], [None], [1.5], [None], [None]]  # NaN, inf, 1.5, -inf, null
    nan = engine.preview(cur, path, columns=["f"], filters=[parse_filter("f:eq:nan")], sort=[], limit=10, offset=0)
    assert nan.total_rows == 1

    # filters on types without operators of their own
    def matching(text: str) -> int | None:
        return engine.preview(
            cur, path, columns=None, filters=[parse_filter(text)], sort=[], limit=10, offset=0
        ).total_rows

    assert matching(f"u:eq:{ident}") == 1
    assert matching("l:not_null") == 2
    with pytest.raises(InvalidFilter, match="takes is_null, not_null"):
        engine.preview(cur, path, columns=None, filters=[parse_filter("l:eq:1")], sort=[], limit=10, offset=0)
    with pytest.raises(InvalidFilterValue):
        engine.preview(cur, path, columns=None, filters=[parse_filter("u:eq:not-a-uuid")], sort=[], limit=10, offset=0)


def test_a_real_file_row_number_column_still_pages_deterministically(
    cur: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    # read_parquet's virtual file_row_number is hidden by a real column of that name
    rows = [{"file_row_number": 100 - i, "group": i % 3, "v": i // 2} for i in range(100)]
    path = tmp_path / "frn.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    got: list[list[Any]] = []
    for offset in range(0, 100, 7):
        page = engine.preview(cur, path, columns=None, filters=[], sort=[("group", False)], limit=7, offset=offset)
        got += page.rows
    assert sorted(map(tuple, got)) == sorted((r["file_row_number"], r["group"], r["v"]) for r in rows)
    assert [r[1] for r in got] == sorted(r["group"] for r in rows)


def test_cursors_in_threads(con: duckdb.DuckDBPyConnection, calls_path: str, calls: list[dict[str, Any]]) -> None:
    expected = sorted_rows([r for r in calls if r["channel"] == "chat"], [("duration_s", True)])
    results: list[list[Any]] = []
    errors: list[BaseException] = []

    def work() -> None:
        cursor = con.cursor()
        try:
            for _ in range(3):
                got = page_through(cursor, calls_path, [parse_filter("channel:eq:chat")], [("duration_s", True)])
                results.append(got)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            cursor.close()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 12 and all(r == expected for r in results)


# --- options -------------------------------------------------------------------------------------------------------


def ranked(values: Sequence[Any]) -> list[tuple[Any, int]]:
    counts = Counter(values)
    present = sorted(((v, n) for v, n in counts.items() if v is not None), key=lambda vn: (-vn[1], vn[0]))
    # null sorts after every value among equal counts
    out = present + ([(None, counts[None])] if None in counts else [])
    return sorted(out, key=lambda vn: -vn[1])


def test_options(cur: duckdb.DuckDBPyConnection, calls_path: str, calls: list[dict[str, Any]]) -> None:
    got = engine.options(cur, calls_path, "issue_type", filters=[], q=None, limit=100)
    assert got == ranked([r["issue_type"] for r in calls])

    got = engine.options(cur, calls_path, "region", filters=[], q=None, limit=100)
    assert got == ranked([r["region"] for r in calls]) and (None, sum(r["region"] is None for r in calls)) in got

    got = engine.options(cur, calls_path, "issue_type", filters=[], q="BILL", limit=100)
    assert got == ranked([r["issue_type"] for r in calls if lower_has(r["issue_type"], "bill")])
    assert {v for v, _ in got} == {"billing", "Billing dispute"}

    filters = [parse_filter("region:eq:West"), parse_filter("resolved:eq:true")]
    got = engine.options(cur, calls_path, "agent", filters=filters, q="n", limit=5)
    keep = [r["agent"] for r in calls if r["region"] == "West" and r["resolved"] is True and lower_has(r["agent"], "n")]
    assert got == ranked(keep)[:5] and len(got) == 5

    got = engine.options(cur, calls_path, "rating", filters=[], q="4", limit=10)
    assert got == [(4, sum(r["rating"] == 4 for r in calls))]
    got = engine.options(cur, calls_path, "call_date", filters=[], q=None, limit=3)
    assert got == [(d.isoformat(), n) for d, n in ranked([r["call_date"] for r in calls])[:3]]

    for limit in (0, 1001):
        with pytest.raises(InvalidParameter):
            engine.options(cur, calls_path, "agent", filters=[], q=None, limit=limit)
    with pytest.raises(InvalidFilterValue):
        engine.options(cur, calls_path, "agent", filters=[parse_filter("rating:eq:x")], q=None, limit=10)


# --- profile -------------------------------------------------------------------------------------------------------


def exact_quantiles(values: list[float]) -> list[float]:
    cuts = statistics.quantiles(values, n=20, method="inclusive")  # 5%, 10%, ... 95%
    return [cuts[0], cuts[4], cuts[9], cuts[14], cuts[18]]


def bin_counts(values: list[float], edges: list[float]) -> list[int]:
    counts = [0] * (len(edges) - 1)
    for v in values:
        counts[next(i for i in range(len(counts)) if v <= edges[i + 1])] += 1
    return counts


def test_profile(cur: duckdb.DuckDBPyConnection, calls_path: str, calls: list[dict[str, Any]]) -> None:
    result = engine.profile(cur, calls_path)
    json.dumps(result, allow_nan=False)
    assert (result["rows"], result["columns"], result["bytes"]) == (N, 14, os.path.getsize(calls_path))
    stats = {s["name"]: s for s in result["column_stats"]}
    table = pq.read_table(calls_path)
    for name, s in stats.items():
        column = [r[name] for r in calls]
        assert s["nulls"] == table.column(name).null_count == column.count(None), name
        assert s["null_fraction"] == pytest.approx(s["nulls"] / N)
        exact_distinct = len({v for v in column if v is not None})
        assert abs(s["distinct"] - exact_distinct) <= max(2, 0.05 * exact_distinct), name  # HyperLogLog

    # numbers
    for name in ("duration_s", "rating", "amount", "wait:s"):
        s = stats[name]
        values = [float(r[name]) for r in calls if r[name] is not None]
        low, high = min(values), max(values)
        assert float(s["min"]) == low and float(s["max"]) == high
        assert s["mean"] == pytest.approx(statistics.fmean(values), rel=1e-9)
        assert s["stddev"] == pytest.approx(statistics.stdev(values), rel=1e-9)
        for (key, got), want in zip(s["quantiles"].items(), exact_quantiles(values), strict=True):
            assert got == pytest.approx(want, abs=0.02 * (high - low)), (name, key)  # t-digest
        edges, counts = s["histogram"]["edges"], s["histogram"]["counts"]
        assert edges[0] <= low and edges[-1] >= high and sum(counts) == len(values)
        assert counts == bin_counts(values, edges), name
        widths = {round(b - a, 9) for a, b in itertools.pairwise(edges)}
        assert len(widths) == 1, name  # equal width
    assert stats["amount"]["min"] == str(min(r["amount"] for r in calls if r["amount"] is not None))
    assert len(stats["duration_s"]["histogram"]["counts"]) == 20 and stats["duration_s"]["non_finite"] == 0
    assert stats["rating"]["histogram"] == {  # a small integer range: one bin per value
        "edges": [0.5, 1.5, 2.5, 3.5, 4.5, 5.5],
        "counts": [sum(r["rating"] == v for r in calls) for v in range(1, 6)],
    }

    # text
    for name in ("agent", "issue_type", "region"):
        s = stats[name]
        values = [r[name] for r in calls if r[name] is not None]
        assert (s["min"], s["max"]) == (min(values), max(values))
        assert (s["min_length"], s["max_length"]) == (min(map(len, values)), max(map(len, values)))
        assert s["mean_length"] == pytest.approx(statistics.fmean(map(len, values)))
        top = sorted(Counter(values).items(), key=lambda vn: (-vn[1], vn[0]))[:10]
        assert [(t["value"], t["count"]) for t in s["top_values"]] == top, name

    # booleans
    assert stats["resolved"]["true"] == sum(r["resolved"] is True for r in calls)
    assert stats["resolved"]["false"] == sum(r["resolved"] is False for r in calls)

    # dates and timestamps: counts per calendar bucket, empty buckets included
    start = stats["start_time"]
    assert start["min"] == min(r["start_time"] for r in calls).isoformat()
    assert start["histogram"]["unit"] == "day"  # 60 days
    per_day = Counter(r["start_time"].date() for r in calls)
    days = [date(2024, 3, 1) + timedelta(days=i) for i in range(60)]
    assert start["histogram"]["buckets"] == [datetime(d.year, d.month, d.day, tzinfo=UTC).isoformat() for d in days]
    assert start["histogram"]["counts"] == [per_day[d] for d in days]
    assert stats["call_date"]["histogram"]["buckets"] == [d.isoformat() for d in days]
    assert stats["call_date"]["histogram"]["counts"] == [per_day[d] for d in days]
    assert stats["end_time"]["histogram"]["unit"] == "day"
    assert sum(stats["end_time"]["histogram"]["counts"]) == N - stats["end_time"]["nulls"]


def test_profile_of_small_and_odd_files(cur: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    table = pa.table(
        {
            "f": pa.array([1.0, math.nan, math.inf, 3.0, None]),
            "same": pa.array([7.5] * 5),
            "ts": pa.array(
                [datetime(2024, 1, 1, 0, 0, 5, tzinfo=UTC), datetime(2024, 1, 1, 0, 42, tzinfo=UTC)] + [None] * 3,
                pa.timestamp("us", tz="UTC"),
            ),
            "years": pa.array([date(1990, 6, 1), date(2024, 2, 1), None, None, None]),
            "empty": pa.array([None] * 5, pa.string()),
            "tags": pa.array([["a"], None, None, None, None]),
        }
    )
    path = tmp_path / "odd.parquet"
    pq.write_table(table, path)
    stats = {s["name"]: s for s in engine.profile(cur, path)["column_stats"]}
    assert stats["f"]["non_finite"] == 2 and (stats["f"]["min"], stats["f"]["max"]) == (1.0, 3.0)
    assert stats["f"]["mean"] == 2.0 and sum(stats["f"]["histogram"]["counts"]) == 2
    assert stats["same"]["histogram"] == {"edges": [7.5, 7.5], "counts": [5]}
    assert stats["same"]["stddev"] == 0.0
    assert stats["ts"]["histogram"]["unit"] == "minute" and len(stats["ts"]["histogram"]["buckets"]) == 43
    assert stats["years"]["histogram"]["unit"] == "year" and stats["years"]["histogram"]["buckets"][0] == "1990-01-01"
    assert sum(stats["years"]["histogram"]["counts"]) == 2 and len(stats["years"]["histogram"]["counts"]) == 35
    assert stats["empty"]["top_values"] == [] and stats["empty"]["min"] is None and stats["empty"]["nulls"] == 5
    assert stats["tags"]["kind"] == "other" and stats["tags"]["nulls"] == 4 and stats["tags"]["distinct"] is None


class CountingCursor:
    """A cursor that records the statements it runs."""

    def __init__(self, cursor: duckdb.DuckDBPyConnection) -> None:
        self.cursor = cursor
        self.statements: list[str] = []

    def execute(self, sql: str, params: object = None) -> duckdb.DuckDBPyConnection:
        self.statements.append(sql)
        return self.cursor.execute(sql, params)


def test_profile_reads_the_data_twice(cur: duckdb.DuckDBPyConnection, calls_path: str) -> None:
    counting = CountingCursor(cur)
    engine.profile(counting, calls_path)  # type: ignore[arg-type]
    scans = [s for s in counting.statements if "FROM read_parquet(" in s and not s.startswith("DESCRIBE")]
    assert len(scans) == 2  # the rest read the footer only (DESCRIBE, parquet_schema, parquet_file_metadata)
    assert len(counting.statements) == 5


def test_preview_statements(cur: duckdb.DuckDBPyConnection, calls_path: str) -> None:
    counting = CountingCursor(cur)
    engine.preview(counting, calls_path, columns=None, filters=[], sort=[], limit=10, offset=0)  # type: ignore[arg-type]
    assert len(counting.statements) == 4  # DESCRIBE, parquet_schema, footer, page: no count without filters
    assert "ORDER BY" not in counting.statements[-1]  # file order without a sort, so LIMIT stops the scan early


def test_errors_are_strata_errors() -> None:
    for cls in (UnknownColumn, InvalidFilter, InvalidFilterValue, InvalidParameter):
        assert issubclass(cls, StrataError) and cls.status == 422


def test_reads_through_a_registered_fsspec_filesystem(calls_path: str, calls: list[dict[str, Any]]) -> None:
    # how the service reads s3:// (DuckDB 2.0 has no httpfs here): the same code over fsspec's memory filesystem
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    key = f"/engine-test-{uuid.uuid4().hex}/calls.parquet"
    memory.pipe(key, Path(calls_path).read_bytes())
    connection = engine.connect(threads=1, memory_limit="256MB")
    try:
        connection.register_filesystem(memory)
        cursor = connection.cursor()
        path = f"memory://{key}"
        assert [c.name for c in engine.schema(cursor, path)] == [f.name for f in CALLS_SCHEMA]
        got = page_through(cursor, path, [parse_filter("channel:eq:email")], [("rating", True)], limit=400)
        assert got == sorted_rows([r for r in calls if r["channel"] == "email"], [("rating", True)])
        assert engine.profile(cursor, path)["bytes"] == os.path.getsize(calls_path)
    finally:
        connection.close()
        memory.rm(key)
