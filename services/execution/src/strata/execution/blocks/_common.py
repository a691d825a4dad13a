"""What the built-in blocks share: column kinds, value conversion, metrics, time buckets and problem helpers.

Column kinds and the filter operators that apply to each follow the datasets service's filter language
(``strata.datasets.engine``), so a condition that works in a dataset preview works in a ``filter`` block.
"""

from __future__ import annotations

import uuid
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from strata.common.columns import DECIMAL_TYPE, NUMERIC_KINDS, TEMPORAL_KINDS, column_kind

from .base import Block, BlockConfigError, Column, Columns, Compiled, Params, Problem, find_column, quote

Path = tuple[str | int, ...]

NUMERIC: Final = NUMERIC_KINDS
TEMPORAL: Final = TEMPORAL_KINDS
ORDERED: Final = NUMERIC | TEMPORAL | {"string", "time", "uuid", "boolean"}
_DECIMAL_TYPE: Final = DECIMAL_TYPE

#: The type a value of a kind is cast to where a block makes a value of that kind (coalesce, literals).
KIND_TYPES: Final[Mapping[str, str]] = {
    "integer": "BIGINT",
    "float": "DOUBLE",
    "decimal": "DOUBLE",
    "string": "VARCHAR",
    "boolean": "BOOLEAN",
    "date": "DATE",
    "timestamp": "TIMESTAMP",
    "timestamptz": "TIMESTAMP WITH TIME ZONE",
}

KIND_WORDS: Final[Mapping[str, str]] = {
    "numeric": "a number",
    "temporal": "a date or timestamp",
    "ordered": "a column whose values can be ordered",
    "string": "text",
}


def decimal_scale(duckdb_type: str) -> int | None:
    match = _DECIMAL_TYPE.fullmatch(duckdb_type)
    return int(match.group(2)) if match else None


# --- problems ------------------------------------------------------------------------------------------------------


def cfg(*path: str | int) -> Path:
    return ("config", *path)


def unknown_column(path: Path, name: str, columns: Columns, input_name: str = "data") -> Problem:
    names = [c.name for c in columns]
    shown = ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
    return Problem(path, f"The {input_name!r} input has no column {name!r} (it has {shown}).", "UNKNOWN_COLUMN")


def resolve(
    columns: Columns,
    name: str,
    path: Path,
    problems: list[Problem],
    *,
    kinds: frozenset[str] | None = None,
    expected: str = "",
    input_name: str = "data",
) -> Column | None:
    """The input's column ``name``; else a problem is added (missing, or not of one of ``kinds``)."""
    column = find_column(columns, name)
    if column is None:
        problems.append(unknown_column(path, name, columns, input_name))
        return None
    if kinds is not None and column_kind(column.type) not in kinds:
        problems.append(
            Problem(
                path,
                f"Column {name!r} is {column.type}; this needs {KIND_WORDS.get(expected, expected)}.",
                "WRONG_COLUMN_TYPE",
            )
        )
        return None
    return column


def clashes(names: Sequence[tuple[str, Path]], problems: list[Problem], *, taken: Iterable[str] = ()) -> None:
    """A problem for each output name that repeats an earlier one (DuckDB names are case-insensitive)."""
    seen = {n.lower() for n in taken}
    for name, path in names:
        if name.lower() in seen:
            problems.append(
                Problem(path, f"The output would have two columns named {name!r}: rename one.", "DUPLICATE_COLUMN")
            )
        seen.add(name.lower())


# --- values --------------------------------------------------------------------------------------------------------


class ValueProblem(ValueError):
    pass


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueProblem("a boolean is not a number")
    if isinstance(value, int):
        return value
    number = _to_decimal(value)
    if number != number.to_integral_value():
        raise ValueProblem("not a whole number")
    return int(number)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueProblem("a boolean is not a number")
    if isinstance(value, int | float | Decimal):
        return float(value)
    if isinstance(value, str) and value.strip():
        try:
            return float(value.strip())
        except ValueError:
            raise ValueProblem("not a number") from None
    raise ValueProblem("not a number")


def _to_decimal(value: Any) -> Decimal:
    if isinstance(value, bool):
        raise ValueProblem("a boolean is not a number")
    try:
        number = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueProblem("not a number") from None
    if not isinstance(value, int | float | str | Decimal) or not number.is_finite():
        raise ValueProblem("not a finite number")
    return number


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ValueProblem(f"a {type(value).__name__} is not text")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueProblem("expected true or false")


def _to_date(value: Any) -> date:
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            raise ValueProblem("not an ISO date (YYYY-MM-DD)") from None
    raise ValueProblem("expected an ISO date (YYYY-MM-DD)")


def _to_datetime(value: Any) -> datetime:
    if isinstance(value, str) and value.strip():
        try:
            return datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueProblem("not an ISO timestamp") from None
    raise ValueProblem("expected an ISO timestamp")


def _to_timestamp(value: Any) -> datetime:
    moment = _to_datetime(value)
    # naive timestamps are UTC, as in the datasets filter language
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo is not None else moment


def _to_timestamptz(value: Any) -> datetime:
    moment = _to_datetime(value)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _to_time(value: Any) -> time:
    if isinstance(value, str):
        try:
            parsed = time.fromisoformat(value.strip())
        except ValueError:
            raise ValueProblem("not an ISO time of day") from None
        if parsed.tzinfo is None:
            return parsed
    raise ValueProblem("expected a time of day without a time zone")


def _to_uuid(value: Any) -> uuid.UUID:
    if isinstance(value, str):
        try:
            return uuid.UUID(value.strip())
        except ValueError:
            raise ValueProblem("not a UUID") from None
    raise ValueProblem("expected a UUID")


def _no_value(value: Any) -> Any:
    raise ValueProblem("columns of this type take is_null/not_null only")


CONVERTERS: Final[Mapping[str, Callable[[Any], Any]]] = {
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


def convert(kind: str, value: Any) -> Any:
    """``value`` (JSON) as a Python value of the kind; raises :class:`ValueProblem`."""
    if value is None:
        raise ValueProblem("a value is required")
    return CONVERTERS[kind](value)


def convert_or_problem(column: Column, value: Any, path: Path, problems: list[Problem]) -> Any:
    try:
        return convert(column_kind(column.type), value)
    except ValueProblem as exc:
        problems.append(
            Problem(
                path, f"{value!r} is not a valid value for {column.name!r} ({column.type}): {exc}.", "INVALID_VALUE"
            )
        )
        return None


# --- metrics -------------------------------------------------------------------------------------------------------

METRIC_FNS: Final = ("count", "count_distinct", "sum", "mean", "min", "max", "median", "quantile", "stddev")
_NUMERIC_FNS: Final = frozenset({"sum", "mean", "median", "quantile", "stddev"})

METRIC_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "title": "Metric",
    "description": "One aggregate: a function of a column (count may leave the column out: it counts rows).",
    "properties": {
        "column": {"type": "string", "minLength": 1, "title": "Column", "description": "The column to aggregate."},
        "fn": {
            "type": "string",
            "enum": list(METRIC_FNS),
            "title": "Function",
            "description": "count (rows, or non-null values of the column), count_distinct, sum, mean, min, max, "
            "median, quantile (set q), stddev (sample standard deviation).",
        },
        "q": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "title": "Quantile",
            "description": "For fn=quantile: which quantile, 0 to 1 (0.9 is the 90th percentile; interpolated).",
        },
        "as": {
            "type": "string",
            "minLength": 1,
            "maxLength": 128,
            "title": "Output name",
            "description": "The output column's name (default: <fn>_<column>, or count for a row count).",
        },
    },
    "required": ["fn"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Metric:
    fn: str
    column: Column | None
    name: str
    q: float | None
    type: str

    @property
    def numeric(self) -> bool:
        return column_kind(self.type) in NUMERIC

    def sql(self, params: Params, *, where: str | None = None) -> str:
        """The aggregate expression (with an optional FILTER), cast to :attr:`type`."""
        arg = quote(self.column.name) if self.column is not None else ""
        filt = f" FILTER (WHERE {where})" if where else ""
        if self.fn == "count":
            return f"count({arg or '*'}){filt}"
        if self.fn == "count_distinct":
            return f"count(DISTINCT {arg}){filt}"
        if self.fn in ("min", "max"):
            return f"{self.fn}({arg}){filt}"
        if self.fn == "sum":
            return f"CAST(sum({arg}){filt} AS {self.type})"
        if self.fn == "quantile":
            return f"CAST(quantile_cont({arg}, {params.add(self.q)}){filt} AS DOUBLE)"
        fn = {"mean": "avg", "median": "median", "stddev": "stddev_samp"}[self.fn]
        return f"CAST({fn}({arg}){filt} AS DOUBLE)"


def metric_name(spec: Mapping[str, Any]) -> str:
    if "as" in spec:
        return str(spec["as"])
    fn, column = str(spec["fn"]), spec.get("column")
    if column is None:
        return fn
    if fn == "quantile":
        q = float(spec.get("q", 0.5)) * 100
        return f"p{q:g}_{column}".replace(".", "_")
    return f"{fn}_{column}"


def resolve_metric(
    spec: Mapping[str, Any],
    columns: Columns,
    path: Path,
    problems: list[Problem],
    input_name: str = "data",
    column_key: str = "column",
) -> Metric | None:
    fn = str(spec["fn"])
    name = metric_name(spec)
    column_name = spec.get("column")
    if fn == "quantile" and "q" not in spec:
        problems.append(Problem((*path, "q"), "A quantile needs q (0 to 1).", "INVALID_CONFIG"))
        return None
    if fn != "quantile" and "q" in spec:
        problems.append(Problem((*path, "q"), "q applies to fn=quantile only.", "INVALID_CONFIG"))
        return None
    if column_name is None:
        if fn != "count":
            problems.append(Problem((*path, column_key), f"{fn} needs a column.", "INVALID_CONFIG"))
            return None
        return Metric(fn, None, name, None, "BIGINT")
    if fn in _NUMERIC_FNS:
        column = resolve(
            columns,
            column_name,
            (*path, column_key),
            problems,
            kinds=NUMERIC,
            expected="numeric",
            input_name=input_name,
        )
    elif fn in ("min", "max"):
        column = resolve(
            columns,
            column_name,
            (*path, column_key),
            problems,
            kinds=ORDERED,
            expected="ordered",
            input_name=input_name,
        )
    else:
        column = resolve(columns, column_name, (*path, column_key), problems, input_name=input_name)
    if column is None:
        return None
    kind = column_kind(column.type)
    if fn in ("count", "count_distinct"):
        type_ = "BIGINT"
    elif fn in ("min", "max"):
        type_ = column.type
    elif fn == "sum":
        scale = decimal_scale(column.type)
        type_ = "BIGINT" if kind == "integer" else f"DECIMAL(38,{scale})" if scale is not None else "DOUBLE"
    else:
        type_ = "DOUBLE"
    q = float(spec["q"]) if fn == "quantile" else None
    return Metric(fn, column, name, q, type_)


# --- time buckets --------------------------------------------------------------------------------------------------

BUCKETS: Final = ("minute", "hour", "day", "week", "month")
_STEP_FN: Final[Mapping[str, str]] = {
    "minute": "to_minutes",
    "hour": "to_hours",
    "day": "to_days",
    "week": "to_weeks",
    "month": "to_months",
}


def bucket_type(column: Column, bucket: str) -> str:
    kind = column_kind(column.type)
    if kind == "timestamptz":
        return "TIMESTAMP WITH TIME ZONE"
    if kind == "date" and bucket in ("day", "week", "month"):
        return "DATE"
    return "TIMESTAMP"


def check_bucket(column: Column, bucket: str, path: Path, problems: list[Problem]) -> None:
    if column_kind(column.type) == "date" and bucket in ("minute", "hour"):
        problems.append(
            Problem(path, f"Column {column.name!r} holds dates: bucket by day, week or month.", "INVALID_CONFIG")
        )


def bucket_sql(column: Column, bucket: str) -> str:
    """The start of the bucket a value falls in. Time zone aware timestamps are bucketed in UTC (not the session's
    time zone), so a result does not depend on where it runs."""
    ident = quote(column.name)
    unit = f"'{bucket}'"  # from the BUCKETS enum, never user text
    kind = column_kind(column.type)
    if kind == "timestamptz":
        return f"timezone('UTC', date_trunc({unit}, timezone('UTC', {ident})))"
    if kind == "date":
        if bucket in ("day", "week", "month"):
            return f"CAST(date_trunc({unit}, {ident}) AS DATE)"
        return f"CAST(date_trunc({unit}, {ident}) AS TIMESTAMP)"
    return f"CAST(date_trunc({unit}, {ident}) AS TIMESTAMP)"


def step_sql(bucket: str, steps: str) -> str:
    """An interval of ``steps`` (SQL, an integer) buckets."""
    return f"{_STEP_FN[bucket]}(CAST({steps} AS INTEGER))"


def shift_sql(start: str, bucket: str, steps: str, type_: str) -> str:
    """``start`` moved on by ``steps`` buckets, as ``type_``. Month arithmetic on time zone aware timestamps is done
    in UTC, as the buckets are."""
    if type_ == "TIMESTAMP WITH TIME ZONE":
        return f"timezone('UTC', timezone('UTC', {start}) + {step_sql(bucket, steps)})"
    return f"CAST({start} + {step_sql(bucket, steps)} AS {type_})"


# --- output row schemas --------------------------------------------------------------------------------------------


def json_type(duckdb_type: str) -> dict[str, Any]:
    kind = column_kind(duckdb_type)
    schema: dict[str, Any]
    if kind == "integer":
        schema = {"type": ["integer", "null"]}
    elif kind in ("float", "decimal"):
        schema = {"type": ["number", "null"]}
    elif kind == "boolean":
        schema = {"type": ["boolean", "null"]}
    elif kind == "date":
        schema = {"type": ["string", "null"], "format": "date"}
    elif kind in ("timestamp", "timestamptz"):
        schema = {"type": ["string", "null"], "format": "date-time"}
    elif kind in ("string", "uuid", "time"):
        schema = {"type": ["string", "null"]}
    else:
        schema = {}
    return {**schema, "x-duckdb-type": duckdb_type}


def columns_schema(columns: Columns) -> dict[str, Any]:
    """A JSON Schema for one row with these columns."""
    return {
        "type": "object",
        "properties": {c.name: json_type(c.type) for c in columns},
        "required": [c.name for c in columns],
        "additionalProperties": False,
    }


def string_list(title: str, description: str, *, min_items: int = 0, max_items: int = 100) -> dict[str, Any]:
    return {
        "type": "array",
        "title": title,
        "description": description,
        "items": {"type": "string", "minLength": 1},
        "minItems": min_items,
        "maxItems": max_items,
        "uniqueItems": True,
    }


def group_columns(
    config: Mapping[str, Any], columns: Columns, problems: list[Problem], key: str = "group_by"
) -> list[Column]:
    out = []
    for i, name in enumerate(config.get(key, [])):
        column = resolve(columns, name, cfg(key, i), problems)
        if column is not None:
            out.append(column)
    return out


def select_list(items: Iterable[str]) -> str:
    return ", ".join(items)


# --- the shape of a built-in block ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a valid config makes: the output columns, and the SELECT (``render`` binds values through ``params``)."""

    columns: list[Column]
    render: Callable[[Params], str]


class PlannedBlock(Block):
    """A block whose check, output columns and SQL come from one :meth:`plan` of the config, so they cannot disagree."""

    @abstractmethod
    def plan(self, config: Any, inputs: Mapping[str, Columns], problems: list[Problem]) -> Plan | None:
        """The plan of a schema-valid config; adds a problem for each thing wrong with it (then the plan is unused)."""

    def check_columns(self, config: Any, inputs: Mapping[str, Columns]) -> list[Problem]:
        problems: list[Problem] = []
        self.plan(config, inputs, problems)
        return problems

    def valid_plan(self, config: Any, inputs: Mapping[str, Columns]) -> Plan:
        problems = self.check(config, inputs)
        plan = None if problems else self.plan(config, inputs, problems)
        if problems or plan is None:
            raise BlockConfigError(problems or [Problem(("config",), "The config is not valid.")])
        return plan

    def output_columns(self, config: Any, inputs: Mapping[str, Columns]) -> list[Column]:
        return list(self.valid_plan(config, inputs).columns)

    def compile(self, config: Any, inputs: Mapping[str, Columns]) -> Compiled:
        plan = self.valid_plan(config, inputs)
        params = Params()
        sql = plan.render(params)
        return Compiled(sql=sql, parameters=params.values)
