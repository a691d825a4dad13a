"""The query engine behind dataset previews: schema, filtered and sorted pages, filter options and profiles.

Every function works on ONE Parquet file that DuckDB can read (a local path, or ``s3://...`` once an fsspec filesystem
is registered on the connection) and is synchronous: the caller runs it in a worker thread with its own cursor
(``connection.cursor()``; a DuckDB connection is not thread-safe). Nothing here keeps state between calls.

Safety: identifiers come only from the file's schema and are always quoted; every value (the path included) is bound as
a parameter after being converted in Python to the column's type, so text such as ``'; DROP TABLE x; --`` is only ever
a value that matches nothing.

Filters in query strings are ``<column>:<op>:<value>`` (see :func:`parse_filter`). Semantics worth knowing:

- ``ne`` and ``not_in`` keep rows where the column is null (``IS DISTINCT FROM``): "not billing" includes rows with no
  issue type. The other comparisons never match null; use ``is_null``/``not_null`` for those.
- ``contains`` and ``starts_with`` are case-insensitive (text columns only); ``eq`` is exact.
- ``between`` is inclusive at both ends.
- Naive timestamps are read as UTC: a value with an offset compared with a naive ``TIMESTAMP`` column is converted to
  UTC first, and a naive value compared with a ``TIMESTAMP WITH TIME ZONE`` column is taken as UTC.
- Floats follow DuckDB: ``NaN`` equals itself and sorts above every number.
- Sorting puts nulls last in both directions; ties are broken by the row's position in the file, so paging with
  ``offset`` never repeats or skips a row.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from os import PathLike
from typing import Any, Final
from urllib.parse import unquote

import duckdb

from strata.common.columns import (
    DECIMAL_TYPE,
    FILTER_OPS,
    INT_RANGES,
    LIST_OPS,
    MAX_IN_VALUES,
    NULL_OPS,
    NUMERIC_KINDS,
    OPS_BY_KIND,
    TEMPORAL_KINDS,
    Kind,
    column_kind,
)
from strata.common.errors import Unprocessable
from strata.common.jsonvalues import json_value

__all__ = [
    "MAX_IN_VALUES",
    "MAX_LIMIT",
    "MAX_OPTIONS",
    "OPS",
    "TOTAL_ROWS_CAP",
    "Column",
    "Filter",
    "InvalidFilter",
    "InvalidFilterValue",
    "InvalidParameter",
    "Page",
    "UnknownColumn",
    "column_kind",
    "connect",
    "options",
    "parse_filter",
    "preview",
    "profile",
    "schema",
]

#: The largest page ``preview`` returns.
MAX_LIMIT: Final = 1000
#: The most distinct values ``options`` returns.
MAX_OPTIONS: Final = 1000
#: ``preview`` counts matching rows up to this many; beyond it ``total_rows`` is ``None`` (unknown, at least this many).
TOTAL_ROWS_CAP: Final = 1_000_000

OPS: Final = frozenset(FILTER_OPS)
_LIST_OPS: Final = LIST_OPS
_NULL_OPS: Final = NULL_OPS
_NUMERIC: Final = NUMERIC_KINDS
_TEMPORAL: Final = TEMPORAL_KINDS
_ORDERED: Final = _NUMERIC | _TEMPORAL | {"string", "time", "uuid"}
_OPS_BY_KIND: Final = OPS_BY_KIND
_INT_RANGES: Final = INT_RANGES
_DECIMAL_TYPE: Final = DECIMAL_TYPE
_INTEGER_TEXT: Final = re.compile(r"[+-]?\d+")
_TRUE: Final = frozenset({"true", "t", "1", "yes", "y"})
_FALSE: Final = frozenset({"false", "f", "0", "no", "n"})


# --- errors ------------------------------------------------------------------------------------------------------


class UnknownColumn(Unprocessable):
    """A filter, sort, selection or options request names a column the dataset does not have."""

    status, code, default_message = 422, "UNKNOWN_COLUMN", "The dataset has no such column."


class InvalidFilter(Unprocessable):
    """A filter that cannot be understood, or whose operator does not apply to the column's type."""

    status, code, default_message = 422, "INVALID_FILTER", "The filter is not valid."


class InvalidFilterValue(InvalidFilter):
    """A filter value that cannot be converted to the column's type."""

    status, code, default_message = 422, "INVALID_FILTER_VALUE", "The filter value does not fit the column's type."


class InvalidParameter(Unprocessable):
    """A limit, offset, column selection or search text out of bounds."""

    status, code, default_message = 422, "INVALID_PARAMETER", "A parameter is out of bounds."


# --- schema --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    #: The DuckDB type, e.g. ``BIGINT``, ``DECIMAL(12,2)``, ``TIMESTAMP WITH TIME ZONE``, ``VARCHAR[]``.
    type: str
    nullable: bool

    @property
    def kind(self) -> Kind:
        return column_kind(self.type)


def connect(*, threads: int = 2, memory_limit: str = "1GB") -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection for the engine; give each thread its own ``.cursor()`` of it.

    Extensions are never installed or loaded on demand (DuckDB would try the network and hang). Sessions are in UTC,
    Parquet footers are cached (dataset files are immutable once written), and insertion order is preserved, which is
    what lets an unsorted page come out in file order without a sort.
    """
    if threads < 1:
        raise ValueError("threads must be at least 1")
    con = duckdb.connect(
        ":memory:",
        config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "threads": threads,
            "memory_limit": memory_limit,
            "preserve_insertion_order": True,
        },
    )
    # Settings of built-in extensions (icu, parquet) are refused in ``config=`` by DuckDB 2.0; set them afterwards.
    con.execute("SET GLOBAL TimeZone = 'UTC'")
    con.execute("SET GLOBAL parquet_metadata_cache = true")
    # Late materialisation (read only the filter and sort columns first) stops above 50 rows by default; a page
    # asks for limit + 1, so without this every 50-row page decompresses every column of every matching row.
    con.execute("SET GLOBAL late_materialization_max_rows = 1001")
    return con


def schema(cur: duckdb.DuckDBPyConnection, path: str | PathLike[str]) -> list[Column]:
    """The file's columns in order, with DuckDB types and whether Parquet allows nulls in them."""
    source = str(path)
    described = cur.execute("DESCRIBE SELECT * FROM read_parquet(?)", [source]).fetchall()
    # DESCRIBE says every Parquet column is nullable; the file's schema knows which are REQUIRED.
    elements = cur.execute(
        "SELECT name, repetition_type, num_children FROM parquet_schema(?) ORDER BY column_id", [source]
    ).fetchall()
    required = _top_level_required(elements)
    if len(required) != len(described) or [n for n, _ in required] != [row[0] for row in described]:
        required = [(str(row[0]), False) for row in described]
    return [
        Column(name=str(row[0]), type=str(row[1]), nullable=not req)
        for row, (_, req) in zip(described, required, strict=True)
    ]


def _top_level_required(elements: Sequence[tuple[Any, ...]]) -> list[tuple[str, bool]]:
    """``(name, required)`` of the root's children in a flattened (pre-order) Parquet schema."""
    if not elements:
        return []
    out: list[tuple[str, bool]] = []
    index = 1
    for _ in range(int(elements[0][2] or 0)):
        if index >= len(elements):
            break
        name, repetition, _children = elements[index]
        out.append((str(name), repetition == "REQUIRED"))
        index = _skip_subtree(elements, index)
    return out


def _skip_subtree(elements: Sequence[tuple[Any, ...]], index: int) -> int:
    children = int(elements[index][2] or 0)
    index += 1
    for _ in range(children):
        if index >= len(elements):
            break
        index = _skip_subtree(elements, index)
    return index


def _file_info(cur: duckdb.DuckDBPyConnection, source: str) -> tuple[int, int, bool]:
    """Rows and bytes from the footer, and whether this connection keeps file order without ORDER BY."""
    row = cur.execute(
        "SELECT sum(num_rows)::BIGINT, sum(file_size_bytes)::BIGINT, "
        "any_value(current_setting('preserve_insertion_order')) FROM parquet_file_metadata(?)",
        [source],
    ).fetchall()[0]
    return int(row[0] or 0), int(row[1] or 0), bool(row[2])


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lookup(columns: Mapping[str, Column], name: str) -> Column:
    column = columns.get(name)
    if column is not None:
        return column
    names = list(columns)
    close = [n for n in names if n.lower() == name.lower()]
    close += [n for n in difflib.get_close_matches(name, names, n=3, cutoff=0.6) if n not in close]
    close = close[:3]
    if close:
        hint = " Did you mean " + ", ".join(repr(n) for n in close) + "?"
    else:
        shown = names[:20]
        hint = " Columns: " + ", ".join(repr(n) for n in shown) + (", ..." if len(names) > len(shown) else "") + "."
    raise UnknownColumn(
        f"Unknown column {name!r}.{hint}",
        details=[{"column": name, "suggestions": close}],
    )


# --- filters -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Filter:
    """One condition; filters given together are AND-ed.

    ``value`` is ``None`` for ``is_null``/``not_null``, a sequence for ``in``/``not_in`` (1 to ``MAX_IN_VALUES``
    items) and ``between`` (exactly two: low, high), and a single value otherwise. Values may be text (as parsed
    from a query string) or Python values (``int``, ``Decimal``, ``date``, ``datetime`` ...); either way they are
    converted to the column's type when the filter is applied.
    """

    column: str
    op: str
    value: Any = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise InvalidFilter(
                f"Unknown filter operator {self.op!r}; expected one of {', '.join(sorted(OPS))}.",
                details=[{"column": self.column, "op": self.op}],
            )


def parse_filter(text: str) -> Filter:
    """Parse the query-string form ``<column>:<op>:<value>``.

    The text is split at its first two colons: everything after the second one is the value, so values may contain
    colons (``start_time:gte:2024-05-01T09:30:00+02:00``). The column part is percent-decoded once more, so a column
    whose name contains ``:`` (or ``%``) is written with ``%3A`` (``%25``) there; in a URL, where the query string is
    decoded once already, that is ``%253A``. For example ``ratio%3Aa:gt:2`` filters the column ``ratio:a``.

    ``is_null`` and ``not_null`` take no value (``rating:is_null``). ``in``, ``not_in`` and ``between`` take a JSON
    array (``region:in:["North, East","South"]``) or comma-separated items, each stripped of surrounding spaces
    (``rating:between:2,4``). Anything else takes the rest of the text as is (``agent:eq:`` is the empty string).
    """
    column_part, sep, rest = text.partition(":")
    if not sep:
        raise InvalidFilter(f"Filter {text!r} is not of the form <column>:<op>:<value>.", details=[{"filter": text}])
    op, has_value, raw = rest.partition(":")
    column = unquote(column_part)
    if not column:
        raise InvalidFilter(f"Filter {text!r} names no column.", details=[{"filter": text}])
    if op not in OPS:
        raise InvalidFilter(
            f"Unknown filter operator {op!r} in {text!r}; expected one of {', '.join(sorted(OPS))}.",
            details=[{"filter": text, "column": column, "op": op}],
        )
    if op in _NULL_OPS:
        if raw:
            raise InvalidFilter(
                f"Operator {op!r} takes no value (got {raw!r}).", details=[{"filter": text, "column": column, "op": op}]
            )
        return Filter(column, op, None)
    if not has_value:
        raise InvalidFilter(f"Filter {text!r} has no value.", details=[{"filter": text, "column": column, "op": op}])
    if op in _LIST_OPS:
        return Filter(column, op, _parse_list(raw, column=column, op=op))
    return Filter(column, op, raw)


def _parse_list(raw: str, *, column: str, op: str) -> list[Any]:
    if raw.lstrip().startswith("["):
        try:
            # Decimal keeps "0.10" exact for DECIMAL columns; it converts to float or text as the column needs.
            parsed = json.loads(raw, parse_float=Decimal)
        except json.JSONDecodeError as exc:
            raise InvalidFilter(
                f"The value of {op!r} on {column!r} is not a valid JSON array: {exc.msg}.",
                details=[{"column": column, "op": op, "value": raw}],
            ) from None
        if not isinstance(parsed, list) or any(isinstance(v, list | dict) for v in parsed):
            raise InvalidFilter(
                f"The value of {op!r} on {column!r} must be a JSON array of scalars.",
                details=[{"column": column, "op": op, "value": raw}],
            )
        return parsed
    return [item.strip() for item in raw.split(",")] if raw.strip() else []


def _compile_filters(columns: Mapping[str, Column], filters: Iterable[Filter]) -> tuple[list[str], list[Any]]:
    """SQL conditions (to AND together) and their parameters, in order."""
    clauses: list[str] = []
    params: list[Any] = []
    for f in filters:
        column = _lookup(columns, f.column)
        kind = column.kind
        if f.op not in _OPS_BY_KIND[kind]:
            allowed = ", ".join(sorted(_OPS_BY_KIND[kind]))
            raise InvalidFilter(
                f"Operator {f.op!r} does not apply to column {column.name!r} of type {column.type}; "
                f"it takes {allowed}.",
                details=[{"column": column.name, "type": column.type, "op": f.op}],
            )
        ident = _quote(column.name)
        if f.op in _NULL_OPS:
            if f.value is not None and f.value != "":
                raise InvalidFilter(f"Operator {f.op!r} takes no value.", details=[{"column": column.name, "op": f.op}])
            clauses.append(f"{ident} IS {'NOT ' if f.op == 'not_null' else ''}NULL")
            continue
        if f.op in _LIST_OPS:
            values = _list_value(f, column)
            converted = [_convert(column, kind, v, f.op) for v in values]
            params.extend(converted)
            if f.op == "between":
                clauses.append(f"{ident} BETWEEN ? AND ?")
            else:
                marks = ", ".join("?" * len(converted))
                clauses.append(
                    f"{ident} IN ({marks})" if f.op == "in" else f"({ident} IS NULL OR {ident} NOT IN ({marks}))"
                )
            continue
        if isinstance(f.value, list | tuple | set | dict):
            raise InvalidFilter(
                f"Operator {f.op!r} takes a single value.", details=[{"column": column.name, "op": f.op}]
            )
        params.append(_convert(column, kind, f.value, f.op))
        clauses.append(_SCALAR_SQL[f.op].format(c=ident))
    return clauses, params


_SCALAR_SQL: Final[Mapping[str, str]] = {
    "eq": "{c} = ?",
    "ne": "{c} IS DISTINCT FROM ?",
    "lt": "{c} < ?",
    "lte": "{c} <= ?",
    "gt": "{c} > ?",
    "gte": "{c} >= ?",
    "contains": "contains(lower({c}), lower(?))",
    "starts_with": "starts_with(lower({c}), lower(?))",
}


def _list_value(f: Filter, column: Column) -> list[Any]:
    value = f.value
    if isinstance(value, str):
        value = _parse_list(value, column=column.name, op=f.op)
    if not isinstance(value, list | tuple):
        raise InvalidFilter(f"Operator {f.op!r} takes a list of values.", details=[{"column": column.name, "op": f.op}])
    if f.op == "between" and len(value) != 2:
        raise InvalidFilter(
            f"Operator 'between' takes exactly two values (low, high); got {len(value)}.",
            details=[{"column": column.name, "op": f.op}],
        )
    if not 1 <= len(value) <= MAX_IN_VALUES:
        raise InvalidFilter(
            f"Operator {f.op!r} takes 1 to {MAX_IN_VALUES} values; got {len(value)}.",
            details=[{"column": column.name, "op": f.op}],
        )
    return list(value)


def _convert(column: Column, kind: Kind, value: Any, op: str) -> Any:
    try:
        if value is None:
            raise ValueError("a value is required (use is_null/not_null for nulls)")
        return _CONVERTERS[kind](value, column.type)
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise InvalidFilterValue(
            f"Filter value {value!r} for column {column.name!r} is not a valid {column.type}: {exc}.",
            details=[{"column": column.name, "type": column.type, "op": op, "value": _detail_value(value)}],
        ) from None


def _detail_value(value: Any) -> Any:
    return value if value is None or isinstance(value, str | int | float | bool) else str(value)


def _to_int(value: Any, type_: str) -> int:
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and _INTEGER_TEXT.fullmatch(value.strip()):
        number = int(value.strip())
    else:
        exact = _to_decimal_any(value)
        if exact != exact.to_integral_value():
            raise ValueError("not a whole number")
        number = int(exact)
    # DuckDB widens the comparison as needed, so "tinyint_col < 1000" is fine; only what no DuckDB integer holds fails.
    low, high = _INT_RANGES[type_]
    if not min(low, -(2**127)) <= number <= max(high, 2**127 - 1):
        raise ValueError("out of range")
    return number


def _to_float(value: Any, _type: str) -> float:
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    if isinstance(value, int | float | Decimal):
        return float(value)
    if isinstance(value, str) and value.strip():
        return float(value.strip())
    raise ValueError("not a number")


def _to_decimal_any(value: Any) -> Decimal:
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    if isinstance(value, Decimal):
        number = value
    elif isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, float):
        number = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            number = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError("not a number") from None
    else:
        raise TypeError(f"a {type(value).__name__} is not a number")
    if not number.is_finite():
        raise ValueError("not a finite number")
    return number


def _to_decimal(value: Any, _type: str) -> Decimal:
    # DuckDB compares a wider decimal exactly (1.234 = DECIMAL(10,2) 1.23 is false), so extra digits need no rounding;
    # it has no decimal wider than 38 digits.
    number = _to_decimal_any(value)
    if len(number.as_tuple().digits) > 38:
        raise ValueError("more than 38 significant digits")
    return number


def _to_str(value: Any, _type: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | Decimal | float) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"a {type(value).__name__} is not text")


def _to_bool(value: Any, _type: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError("expected true or false")


def _to_date(value: Any, _type: str) -> date:
    if isinstance(value, datetime):
        raise TypeError("a timestamp is not a date")
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        return date.fromisoformat(value.strip())
    raise TypeError(f"a {type(value).__name__} is not a date")


def _to_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day)  # noqa: DTZ001 - naive on purpose, UTC is applied below
    if isinstance(value, str) and value.strip():
        return datetime.fromisoformat(value.strip())
    raise TypeError(f"a {type(value).__name__} is not a timestamp")


def _to_timestamp(value: Any, _type: str) -> datetime:
    moment = _to_datetime(value)
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo is not None else moment


def _to_timestamptz(value: Any, _type: str) -> datetime:
    moment = _to_datetime(value)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _to_time(value: Any, _type: str) -> time:
    if isinstance(value, time):
        parsed = value
    elif isinstance(value, str):
        parsed = time.fromisoformat(value.strip())
    else:
        raise TypeError(f"a {type(value).__name__} is not a time of day")
    if parsed.tzinfo is not None:
        raise ValueError("the column holds times without a time zone")
    return parsed


def _to_uuid(value: Any, _type: str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        return uuid.UUID(value.strip())
    raise TypeError(f"a {type(value).__name__} is not a UUID")


def _no_value(value: Any, type_: str) -> Any:
    raise TypeError(f"columns of type {type_} take is_null/not_null only")


_CONVERTERS: Final[Mapping[str, Callable[[Any, str], Any]]] = {
    "integer": _to_int,
    "float": _to_float,
    "decimal": _to_decimal,
    "string": _to_str,
    "boolean": _to_bool,
    "date": _to_date,
    "timestamp": _to_timestamp,
    "timestamptz": _to_timestamptz,
    "time": _to_time,
    "uuid": _to_uuid,
    "other": _no_value,
}


# --- preview ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Page:
    columns: list[Column]
    #: Rows as lists in ``columns`` order, every value JSON-safe (see :func:`strata.common.jsonvalues.json_value`).
    rows: list[list[Any]]
    #: Rows matching the filters. Exact from the Parquet footer without filters, and from the page itself when it is
    #: the last one; otherwise counted by a second query that stops at ``TOTAL_ROWS_CAP`` matches (``None`` beyond).
    total_rows: int | None
    #: The offset of the next page, or ``None`` when this page is the last.
    next_offset: int | None


def preview(
    cur: duckdb.DuckDBPyConnection,
    path: str | PathLike[str],
    *,
    columns: Sequence[str] | None,
    filters: Sequence[Filter],
    sort: Sequence[tuple[str, bool]],
    limit: int,
    offset: int,
) -> Page:
    """A page of rows matching every filter, in ``sort`` order (``(column, descending)`` pairs), else in file order.

    Ties are broken by the row's position in the file, so paging by offset is deterministic. ``columns`` picks and
    orders the columns (``None``: all); ``limit`` is 1..``MAX_LIMIT``.
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidParameter(
            f"limit must be between 1 and {MAX_LIMIT}; got {limit}.", details=[{"parameter": "limit", "value": limit}]
        )
    if offset < 0:
        raise InvalidParameter(
            f"offset must not be negative; got {offset}.", details=[{"parameter": "offset", "value": offset}]
        )
    source = str(path)
    all_columns = schema(cur, source)
    by_name = {c.name: c for c in all_columns}
    if columns is None:
        selected = all_columns
    else:
        if not columns:
            raise InvalidParameter("Select at least one column.", details=[{"parameter": "columns"}])
        selected = [_lookup(by_name, name) for name in dict.fromkeys(columns)]
    where, params = _compile_filters(by_name, filters)

    order: list[str] = []
    seen: set[str] = set()
    for name, descending in sort:
        column = _lookup(by_name, name)
        if column.name not in seen:
            seen.add(column.name)
            order.append(f"{_quote(column.name)} {'DESC' if descending else 'ASC'} NULLS LAST")
    file_rows, _, keeps_order = _file_info(cur, source)
    if order or not keeps_order:
        order += _tiebreak(all_columns)

    # Identifiers are quoted names from the file's schema, every value a bound parameter (likewise below).
    sql = f"SELECT {', '.join(_quote(c.name) for c in selected)} FROM read_parquet(?)"  # noqa: S608
    if where:
        sql += " WHERE " + " AND ".join(where)
    if order:
        sql += " ORDER BY " + ", ".join(order)
    sql += " LIMIT ? OFFSET ?"
    fetched = cur.execute(sql, [source, *params, limit + 1, offset]).fetchall()
    has_more = len(fetched) > limit
    rows = [[json_value(v) for v in row] for row in fetched[:limit]]

    total: int | None
    if not where:
        total = file_rows
    elif not has_more and (rows or offset == 0):
        total = offset + len(rows)
    else:
        total = _count(cur, source, where, params)
    return Page(columns=list(selected), rows=rows, total_rows=total, next_offset=offset + limit if has_more else None)


def _tiebreak(all_columns: Sequence[Column]) -> list[str]:
    # ``file_row_number`` is a virtual column of read_parquet; a real column of that name hides it. Then every column
    # breaks ties: rows equal in all of them are interchangeable, so pages still neither repeat nor skip anything.
    if any(c.name.lower() == "file_row_number" for c in all_columns):
        return [f"{_quote(c.name)} ASC NULLS LAST" for c in all_columns]
    return ["file_row_number"]


def _count(cur: duckdb.DuckDBPyConnection, source: str, where: Sequence[str], params: Sequence[Any]) -> int | None:
    # The LIMIT lets the scan stop once the cap is passed, so a filter matching most of a huge file costs a bounded
    # amount; a filter matching little scans the file once, as the page query did.
    sql = f"SELECT count(*) FROM (SELECT 1 FROM read_parquet(?) WHERE {' AND '.join(where)} LIMIT ?)"  # noqa: S608
    count = int(cur.execute(sql, [source, *params, TOTAL_ROWS_CAP + 1]).fetchall()[0][0])
    return count if count <= TOTAL_ROWS_CAP else None


# --- options ---------------------------------------------------------------------------------------------------------


def options(
    cur: duckdb.DuckDBPyConnection,
    path: str | PathLike[str],
    column: str,
    *,
    filters: Sequence[Filter],
    q: str | None,
    limit: int,
) -> list[tuple[Any, int]]:
    """Distinct values of ``column`` among rows matching ``filters``, with their counts, most frequent first.

    Ties are ordered by value. ``q`` keeps values whose text contains it, ignoring case (null is then left out; without
    ``q`` null is one of the values). ``limit`` is 1..``MAX_OPTIONS``. For a faceted widget, leave the column's own
    filter out of ``filters``. Values are JSON-safe, as in :func:`preview`.
    """
    if not 1 <= limit <= MAX_OPTIONS:
        raise InvalidParameter(
            f"limit must be between 1 and {MAX_OPTIONS}; got {limit}.",
            details=[{"parameter": "limit", "value": limit}],
        )
    if q is not None and len(q) > 1000:
        raise InvalidParameter("q must be at most 1000 characters.", details=[{"parameter": "q"}])
    source = str(path)
    by_name = {c.name: c for c in schema(cur, source)}
    target = _lookup(by_name, column)
    where, params = _compile_filters(by_name, filters)
    ident = _quote(target.name)
    if q:
        where.append(f"contains(lower(CAST({ident} AS VARCHAR)), lower(?))")
        params.append(q)
    sql = f"SELECT {ident}, count(*) AS n FROM read_parquet(?)"  # noqa: S608
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" GROUP BY {ident} ORDER BY n DESC, {ident} ASC NULLS LAST LIMIT ?"
    rows = cur.execute(sql, [source, *params, limit]).fetchall()
    return [(json_value(value), int(n)) for value, n in rows]


# --- profile ---------------------------------------------------------------------------------------------------------

_QUANTILES: Final = (("p05", 0.05), ("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("p95", 0.95))
_HISTOGRAM_BINS: Final = 20
_TOP_VALUES: Final = 10
_MAX_TIME_BUCKETS: Final = 100
# date_trunc units, smallest first, with their (average) length in seconds.
_TIME_UNITS: Final = (
    ("minute", 60),
    ("hour", 3_600),
    ("day", 86_400),
    ("week", 604_800),
    ("month", 2_629_746),
    ("year", 31_556_952),
    ("decade", 315_569_520),
    ("century", 3_155_695_200),
    ("millennium", 31_556_952_000),
)
_UNIT_YEARS: Final[Mapping[str, int]] = {"year": 1, "decade": 10, "century": 100, "millennium": 1000}
_UNIT_DELTAS: Final[Mapping[str, timedelta]] = {
    "minute": timedelta(minutes=1),
    "hour": timedelta(hours=1),
    "day": timedelta(days=1),
    "week": timedelta(weeks=1),
}


class _Select:
    """Aggregates collected into one SELECT, so one scan of the file answers them all."""

    def __init__(self) -> None:
        self.exprs: list[str] = []
        self.params: list[Any] = []

    def add(self, expr: str, *params: Any) -> int:
        self.exprs.append(expr)
        self.params.extend(params)
        return len(self.exprs) - 1

    def run(self, cur: duckdb.DuckDBPyConnection, source: str) -> tuple[Any, ...]:
        if not self.exprs:
            return ()
        sql = f"SELECT {', '.join(self.exprs)} FROM read_parquet(?)"  # noqa: S608
        return cur.execute(sql, [*self.params, source]).fetchall()[0]


def profile(cur: duckdb.DuckDBPyConnection, path: str | PathLike[str]) -> dict[str, Any]:
    """Statistics of the whole file, in two scans of its data (plus footer reads).

    The first scan gets counts, nulls, distinct counts, min/max, mean, standard deviation (sample), quantiles, text
    lengths, boolean counts and candidate top values; the second, which needs the first's min/max, the histograms and
    the exact counts of the top values. ``distinct`` is approximate (HyperLogLog, ``approx_count_distinct``);
    quantiles are approximate (t-digest, ``approx_quantile``), both in bounded memory; top values are the
    ``approx_top_k`` candidates counted exactly. Numbers get at most 20 equal-width bins, right-closed
    (``(edge[i], edge[i+1]]``, the first also holding the minimum); integers spanning fewer than 20 values get one
    bin per value, with edges at half-integers. Float figures leave out NaN and infinities (counted as
    ``non_finite``). Dates and timestamps get counts per calendar unit (minute ... millennium, the smallest giving at
    most 100 buckets, empty buckets included), in UTC for ``TIMESTAMP WITH TIME ZONE``. Min/max are JSON-safe
    values of the column's type (decimals as text); the statistics are floats.

    Returns ``{"rows", "columns", "bytes", "column_stats": [{"name", "type", "kind", "nullable", "nulls",
    "null_fraction", "distinct", "min", "max", ...per kind}]}``.
    """
    source = str(path)
    cols = schema(cur, source)
    _, file_bytes, _ = _file_info(cur, source)

    first = _Select()
    total_index = first.add("count(*)")
    plans: list[dict[str, int]] = []
    for column in cols:
        c, kind = _quote(column.name), column.kind
        plan = {"non_null": first.add(f"count({c})")}
        if kind != "other":
            plan["distinct"] = first.add(f"approx_count_distinct({c})")
        finite = f" FILTER (WHERE isfinite({c}))" if kind == "float" else ""
        if kind in _ORDERED:
            plan["min"] = first.add(f"min({c}){finite}")
            plan["max"] = first.add(f"max({c}){finite}")
        if kind in _NUMERIC:
            x = f"CAST({c} AS DOUBLE)"
            plan["mean"] = first.add(f"avg({x}){finite}")
            plan["stddev"] = first.add(f"stddev_samp({x}){finite}")
            qs = ", ".join(str(q) for _, q in _QUANTILES)
            plan["quantiles"] = first.add(f"approx_quantile({x}, [{qs}]){finite}")
        if kind == "float":
            plan["non_finite"] = first.add(f"count_if(NOT isfinite({c}))")
        if kind == "string":
            plan["min_length"] = first.add(f"min(length({c}))")
            plan["max_length"] = first.add(f"max(length({c}))")
            plan["mean_length"] = first.add(f"avg(length({c}))")
            plan["top"] = first.add(f"approx_top_k({c}, {_TOP_VALUES})")
        if kind == "boolean":
            plan["true"] = first.add(f"count_if({c})")
            plan["false"] = first.add(f"count_if(NOT {c})")
        plans.append(plan)
    row = first.run(cur, source)
    rows = int(row[total_index])

    second = _Select()
    stats: list[dict[str, Any]] = []
    pending: list[Callable[[tuple[Any, ...]], None]] = []
    for column, plan in zip(cols, plans, strict=True):
        kind = column.kind
        nulls = rows - int(row[plan["non_null"]])
        entry: dict[str, Any] = {
            "name": column.name,
            "type": column.type,
            "kind": kind,
            "nullable": column.nullable,
            "nulls": nulls,
            "null_fraction": nulls / rows if rows else 0.0,
            # HyperLogLog may overshoot a little; never report more distinct values than non-null ones.
            "distinct": min(int(row[plan["distinct"]]), rows - nulls) if "distinct" in plan else None,
        }
        low = row[plan["min"]] if "min" in plan else None
        high = row[plan["max"]] if "max" in plan else None
        if "min" in plan:
            entry["min"], entry["max"] = json_value(low), json_value(high)
        if kind in _NUMERIC:
            entry["mean"] = _float_or_none(row[plan["mean"]])
            entry["stddev"] = _float_or_none(row[plan["stddev"]])
            quantiles = row[plan["quantiles"]]
            entry["quantiles"] = {
                key: _float_or_none(quantiles[i]) if quantiles is not None else None
                for i, (key, _) in enumerate(_QUANTILES)
            }
            if kind == "float":
                entry["non_finite"] = int(row[plan["non_finite"]])
            counted = int(row[plan["non_null"]]) - entry.get("non_finite", 0)
            pending.append(_plan_number_histogram(second, column, entry, low, high, counted))
        elif kind in _TEMPORAL:
            pending.append(_plan_time_histogram(second, column, entry, low, high))
        elif kind == "string":
            entry["min_length"] = row[plan["min_length"]]
            entry["max_length"] = row[plan["max_length"]]
            entry["mean_length"] = _float_or_none(row[plan["mean_length"]])
            pending.append(_plan_top_values(second, column, entry, row[plan["top"]]))
        elif kind == "boolean":
            entry["true"] = int(row[plan["true"]])
            entry["false"] = int(row[plan["false"]])
        stats.append(entry)

    answers = second.run(cur, source)
    for finish in pending:
        finish(answers)
    return {"rows": rows, "columns": len(cols), "bytes": file_bytes, "column_stats": stats}


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _plan_number_histogram(
    select: _Select, column: Column, entry: dict[str, Any], low: Any, high: Any, counted: int
) -> Callable[[tuple[Any, ...]], None]:
    if low is None or high is None:
        entry["histogram"] = {"edges": [], "counts": []}
        return lambda _answers: None
    lo, hi = float(low), float(high)
    if column.kind == "integer" and int(high) - int(low) + 1 <= _HISTOGRAM_BINS:
        edges = [lo - 0.5 + i for i in range(int(high) - int(low) + 2)]
    elif lo == hi:
        entry["histogram"] = {"edges": [lo, hi], "counts": [counted]}
        return lambda _answers: None
    else:
        width = hi / _HISTOGRAM_BINS - lo / _HISTOGRAM_BINS
        edges = [lo + i * width for i in range(_HISTOGRAM_BINS)] + [hi]
    finite = f" FILTER (WHERE isfinite({_quote(column.name)}))" if column.kind == "float" else ""
    # histogram(x, boundaries) counts x into the first boundary >= x: right-closed bins over the upper edges.
    index = select.add(f"histogram(CAST({_quote(column.name)} AS DOUBLE), ?::DOUBLE[]){finite}", edges[1:])

    def finish(answers: tuple[Any, ...]) -> None:
        counts_by_edge: Mapping[float, int] = answers[index] or {}
        entry["histogram"] = {"edges": edges, "counts": [int(counts_by_edge.get(e, 0)) for e in edges[1:]]}

    return finish


def _plan_time_histogram(
    select: _Select, column: Column, entry: dict[str, Any], low: Any, high: Any
) -> Callable[[tuple[Any, ...]], None]:
    if low is None or high is None:
        entry["histogram"] = {"unit": None, "buckets": [], "counts": []}
        return lambda _answers: None
    span = (_as_naive_utc(high) - _as_naive_utc(low)).total_seconds()
    unit = next((u for u, seconds in _TIME_UNITS if span / seconds <= _MAX_TIME_BUCKETS), "millennium")
    c = _quote(column.name)
    # epoch_us -> naive UTC: buckets in UTC whatever the session time zone, and much faster than ICU's date_trunc.
    moment = f"make_timestamp(epoch_us({c}))" if column.kind == "timestamptz" else f"CAST({c} AS TIMESTAMP)"
    # The unit comes from _TIME_UNITS, never from the request.
    index = select.add(f"histogram(CAST(date_trunc('{unit}', {moment}) AS TIMESTAMP))")

    def finish(answers: tuple[Any, ...]) -> None:
        counts: Mapping[datetime, int] = answers[index] or {}
        buckets: list[str] = []
        values: list[int] = []
        if counts:
            stop = max(counts)
            bucket: datetime | None = min(counts)
            while bucket is not None and bucket <= stop:
                buckets.append(_bucket_label(bucket, column.kind))
                values.append(int(counts.get(bucket, 0)))
                bucket = _next_bucket(bucket, unit)
        entry["histogram"] = {"unit": unit, "buckets": buckets, "counts": values}

    return finish


def _as_naive_utc(value: Any) -> datetime:
    moment = _to_datetime(value)
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo is not None else moment


def _bucket_label(start: datetime, kind: str) -> str:
    if kind == "date":
        return start.date().isoformat()
    if kind == "timestamptz":
        return start.replace(tzinfo=UTC).isoformat()
    return start.isoformat()


def _next_bucket(start: datetime, unit: str) -> datetime | None:
    """The start of the bucket after ``start``, or ``None`` past the last year Python can hold."""
    try:
        if unit in _UNIT_DELTAS:
            return start + _UNIT_DELTAS[unit]
        if unit == "month":
            return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
        return start.replace(year=start.year + _UNIT_YEARS[unit])
    except (OverflowError, ValueError):
        return None


def _plan_top_values(
    select: _Select, column: Column, entry: dict[str, Any], candidates: Sequence[Any] | None
) -> Callable[[tuple[Any, ...]], None]:
    values = [v for v in candidates or () if v is not None]
    if not values:
        entry["top_values"] = []
        return lambda _answers: None
    c = _quote(column.name)
    marks = ", ".join("?" * len(values))
    index = select.add(f"histogram({c}) FILTER (WHERE {c} IN ({marks}))", *values)

    def finish(answers: tuple[Any, ...]) -> None:
        counts: Mapping[str, int] = answers[index] or {}
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:_TOP_VALUES]
        entry["top_values"] = [{"value": value, "count": int(n)} for value, n in ranked]

    return finish
