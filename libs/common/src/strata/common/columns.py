"""Column kinds of DuckDB types and the filter operators each admits: one definition for the datasets service's
preview filters (``filter=column:op:value``) and the execution service's ``filter`` block, so that they agree."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, Literal

Kind = Literal[
    "integer", "float", "decimal", "string", "boolean", "date", "timestamp", "timestamptz", "time", "uuid", "other"
]
NUMERIC_KINDS: Final = frozenset({"integer", "float", "decimal"})
TEMPORAL_KINDS: Final = frozenset({"date", "timestamp", "timestamptz"})

#: DuckDB's integer types and the values they hold.
INT_RANGES: Final[Mapping[str, tuple[int, int]]] = {
    "TINYINT": (-(2**7), 2**7 - 1),
    "SMALLINT": (-(2**15), 2**15 - 1),
    "INTEGER": (-(2**31), 2**31 - 1),
    "BIGINT": (-(2**63), 2**63 - 1),
    "HUGEINT": (-(2**127), 2**127 - 1),
    "UTINYINT": (0, 2**8 - 1),
    "USMALLINT": (0, 2**16 - 1),
    "UINTEGER": (0, 2**32 - 1),
    "UBIGINT": (0, 2**64 - 1),
    "UHUGEINT": (0, 2**128 - 1),
}
SIMPLE_KINDS: Final[Mapping[str, Kind]] = {
    "FLOAT": "float",
    "DOUBLE": "float",
    "VARCHAR": "string",
    "BOOLEAN": "boolean",
    "DATE": "date",
    "TIMESTAMP": "timestamp",
    "TIMESTAMP_S": "timestamp",
    "TIMESTAMP_MS": "timestamp",
    "TIMESTAMP_NS": "timestamp",
    "TIMESTAMP WITH TIME ZONE": "timestamptz",
    "TIME": "time",
    "UUID": "uuid",
}
DECIMAL_TYPE: Final = re.compile(r"DECIMAL\((\d+),\s*(\d+)\)")


def column_kind(duckdb_type: str) -> Kind:
    """The family of a DuckDB type, which decides the filter operators and statistics that apply to it."""
    if duckdb_type in INT_RANGES:
        return "integer"
    if DECIMAL_TYPE.fullmatch(duckdb_type):
        return "decimal"
    return SIMPLE_KINDS.get(duckdb_type, "other")


#: The filter operators, in the order they are documented.
FILTER_OPS: Final = (
    "eq",
    "ne",
    "lt",
    "lte",
    "gt",
    "gte",
    "in",
    "not_in",
    "contains",
    "starts_with",
    "is_null",
    "not_null",
    "between",
)
LIST_OPS: Final = frozenset({"in", "not_in", "between"})
NULL_OPS: Final = frozenset({"is_null", "not_null"})
_COMPARISON_OPS: Final = frozenset({"eq", "ne", "lt", "lte", "gt", "gte", "in", "not_in", "between"}) | NULL_OPS
_EQUALITY_OPS: Final = frozenset({"eq", "ne", "in", "not_in"}) | NULL_OPS
OPS_BY_KIND: Final[Mapping[str, frozenset[str]]] = {
    "integer": _COMPARISON_OPS,
    "float": _COMPARISON_OPS,
    "decimal": _COMPARISON_OPS,
    "date": _COMPARISON_OPS,
    "timestamp": _COMPARISON_OPS,
    "timestamptz": _COMPARISON_OPS,
    "time": _COMPARISON_OPS,
    "string": _COMPARISON_OPS | {"contains", "starts_with"},
    "boolean": _EQUALITY_OPS,
    "uuid": _EQUALITY_OPS,
    "other": NULL_OPS,
}
#: The most values an ``in``/``not_in`` filter may list.
MAX_IN_VALUES: Final = 1000
