"""Blocks that reshape a table: ``filter``, ``select`` and ``join``."""

# ruff: noqa: S608 - SQL here is built from quote()d names of real input columns and bound parameters only

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Final

from strata.common.columns import FILTER_OPS, LIST_OPS, MAX_IN_VALUES, NULL_OPS, OPS_BY_KIND, column_kind

from ._common import (
    KIND_TYPES,
    NUMERIC,
    TEMPORAL,
    Path,
    Plan,
    PlannedBlock,
    ValueProblem,
    cfg,
    clashes,
    convert,
    convert_or_problem,
    resolve,
    string_list,
)
from .base import Column, Columns, InputSpec, Params, Problem, find_column, quote

# --- filter --------------------------------------------------------------------------------------------------------

#: The datasets service's filter operators and the column kinds each applies to (strata.common.columns).
OPS: Final = FILTER_OPS
_LIST_OPS: Final = LIST_OPS
_NULL_OPS: Final = NULL_OPS
_SCALAR_SQL: Final[Mapping[str, str]] = {
    "eq": "{c} = {v}",
    "ne": "{c} IS DISTINCT FROM {v}",
    "lt": "{c} < {v}",
    "lte": "{c} <= {v}",
    "gt": "{c} > {v}",
    "gte": "{c} >= {v}",
    "contains": "contains(lower({c}), lower({v}))",
    "starts_with": "starts_with(lower({c}), lower({v}))",
}
_SCALAR: Final[dict[str, Any]] = {"type": ["string", "number", "boolean"]}


class FilterBlock(PlannedBlock):
    id: ClassVar[str] = "filter"
    name: ClassVar[str] = "Filter rows"
    category: ClassVar[str] = "transform"
    description: ClassVar[str] = (
        "Keep the rows that match conditions (all of them, or any), with the datasets filter language: "
        "ne and not_in keep nulls, contains and starts_with ignore case, between is inclusive, naive "
        "timestamps are UTC."
    )
    config_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "title": "Filter",
        "properties": {
            "conditions": {
                "type": "array",
                "title": "Conditions",
                "maxItems": 100,
                "default": [],
                "items": {
                    "type": "object",
                    "title": "Condition",
                    "properties": {
                        "column": {"type": "string", "minLength": 1, "title": "Column"},
                        "op": {"type": "string", "enum": list(OPS), "title": "Operator"},
                        "value": {
                            "title": "Value",
                            "description": "A single value; a list for in/not_in (1 to 1000) and between (low, high); "
                            "none for is_null/not_null. Dates and timestamps as ISO text.",
                            "anyOf": [_SCALAR, {"type": "array", "items": _SCALAR, "maxItems": MAX_IN_VALUES}],
                        },
                    },
                    "required": ["column", "op"],
                    "additionalProperties": False,
                },
            },
            "combine": {
                "type": "string",
                "enum": ["all", "any"],
                "default": "all",
                "title": "Combine",
                "description": "all: every condition must hold (AND); any: at least one (OR).",
            },
        },
        "additionalProperties": False,
    }
    output_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "description": "The input's rows that match, with the input's columns.",
    }

    def plan(self, config: Any, inputs: Mapping[str, Columns], problems: list[Problem]) -> Plan | None:
        columns = inputs["data"]
        conditions: list[tuple[Column, str, Any]] = []
        for i, cond in enumerate(config.get("conditions", [])):
            path = cfg("conditions", i)
            column = resolve(columns, cond["column"], (*path, "column"), problems)
            if column is None:
                continue
            op = cond["op"]
            allowed = OPS_BY_KIND[column_kind(column.type)]
            if op not in allowed:
                problems.append(
                    Problem(
                        (*path, "op"),
                        f"Operator {op!r} does not apply to {column.name!r} ({column.type}); "
                        f"it takes {', '.join(sorted(allowed))}.",
                        "WRONG_COLUMN_TYPE",
                    )
                )
                continue
            value = _condition_value(column, op, cond, (*path, "value"), problems)
            conditions.append((column, op, value))
        combine = " AND " if config.get("combine", "all") == "all" else " OR "

        def render(params: Params) -> str:
            clauses = [_condition_sql(column, op, value, params) for column, op, value in conditions]
            where = f" WHERE {combine.join(f'({c})' for c in clauses)}" if clauses else ""
            return f'SELECT * FROM "data"{where}'

        return Plan(list(columns), render)


def _condition_value(column: Column, op: str, cond: Mapping[str, Any], path: Path, problems: list[Problem]) -> Any:
    value = cond.get("value")
    if op in _NULL_OPS:
        if value is not None:
            problems.append(Problem(path, f"Operator {op!r} takes no value.", "INVALID_VALUE"))
        return None
    if op in _LIST_OPS:
        if not isinstance(value, list):
            problems.append(Problem(path, f"Operator {op!r} takes a list of values.", "INVALID_VALUE"))
            return None
        if op == "between" and len(value) != 2:
            problems.append(Problem(path, "between takes exactly two values (low, high).", "INVALID_VALUE"))
            return None
        if not value:
            problems.append(Problem(path, f"Operator {op!r} takes 1 to {MAX_IN_VALUES} values.", "INVALID_VALUE"))
            return None
        return [convert_or_problem(column, v, (*path, j), problems) for j, v in enumerate(value)]
    if value is None or isinstance(value, list):
        problems.append(Problem(path, f"Operator {op!r} takes a single value.", "INVALID_VALUE"))
        return None
    return convert_or_problem(column, value, path, problems)


def _condition_sql(column: Column, op: str, value: Any, params: Params) -> str:
    ident = quote(column.name)
    if op in _NULL_OPS:
        return f"{ident} IS {'NOT ' if op == 'not_null' else ''}NULL"
    if op == "between":
        return f"{ident} BETWEEN {params.add(value[0])} AND {params.add(value[1])}"
    if op in ("in", "not_in"):
        marks = ", ".join(params.add(v) for v in value)
        return f"{ident} IN ({marks})" if op == "in" else f"({ident} IS NULL OR {ident} NOT IN ({marks}))"
    return _SCALAR_SQL[op].format(c=ident, v=params.add(value))


# --- select --------------------------------------------------------------------------------------------------------

DERIVED_OPS: Final = (
    "add",
    "sub",
    "mul",
    "div",
    "round",
    "abs",
    "lower",
    "upper",
    "concat",
    "date_trunc",
    "coalesce",
)
_ARITY: Final[Mapping[str, tuple[int, int]]] = {
    "add": (2, 2),
    "sub": (2, 2),
    "mul": (2, 2),
    "div": (2, 2),
    "round": (1, 2),
    "abs": (1, 1),
    "lower": (1, 1),
    "upper": (1, 1),
    "concat": (1, 10),
    "date_trunc": (2, 2),
    "coalesce": (1, 10),
}
TRUNC_UNITS: Final = ("minute", "hour", "day", "week", "month", "quarter", "year")


class SelectBlock(PlannedBlock):
    id: ClassVar[str] = "select"
    name: ClassVar[str] = "Select columns"
    category: ClassVar[str] = "transform"
    description: ClassVar[str] = (
        "Keep columns in a chosen order, rename them, and add derived columns from a small expression language "
        "(arithmetic, rounding, text case, concatenation, date truncation, coalesce)."
    )
    config_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "title": "Select",
        "properties": {
            "columns": string_list(
                "Columns",
                "The columns to keep, in order (leave out to keep every column in the input's order).",
                max_items=1000,
            ),
            "rename": {
                "type": "object",
                "title": "Renames",
                "description": "New names of kept columns: {old name: new name}.",
                "additionalProperties": {"type": "string", "minLength": 1, "maxLength": 128},
                "default": {},
            },
            "derived": {
                "type": "array",
                "title": "Derived columns",
                "description": "New columns, added after the kept ones.",
                "maxItems": 50,
                "default": [],
                "items": {
                    "type": "object",
                    "title": "Derived column",
                    "properties": {
                        "name": {"type": "string", "minLength": 1, "maxLength": 128, "title": "Name"},
                        "op": {
                            "type": "string",
                            "enum": list(DERIVED_OPS),
                            "title": "Operation",
                            "description": "add, sub, mul, div (numbers, result DOUBLE; div by 0 is null); "
                            "round (number, optional digits value); abs; lower, upper (text); concat (any, as text); "
                            "date_trunc (unit value, then a date/timestamp; time zone aware ones in UTC); "
                            "coalesce (the first non-null of arguments of one kind).",
                        },
                        "args": {
                            "type": "array",
                            "title": "Arguments",
                            "minItems": 1,
                            "maxItems": 10,
                            "items": {
                                "oneOf": [
                                    {
                                        "type": "object",
                                        "title": "Column",
                                        "properties": {"column": {"type": "string", "minLength": 1}},
                                        "required": ["column"],
                                        "additionalProperties": False,
                                    },
                                    {
                                        "type": "object",
                                        "title": "Value",
                                        "properties": {"value": {"type": ["string", "number", "boolean"]}},
                                        "required": ["value"],
                                        "additionalProperties": False,
                                    },
                                ]
                            },
                        },
                    },
                    "required": ["name", "op", "args"],
                    "additionalProperties": False,
                },
            },
        },
        "additionalProperties": False,
    }
    output_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "description": "The kept columns (renamed), then the derived ones.",
    }

    def plan(self, config: Any, inputs: Mapping[str, Columns], problems: list[Problem]) -> Plan | None:
        columns = inputs["data"]
        names = config.get("columns")
        kept: list[Column] = []
        if names is None:
            kept = list(columns)
        else:
            for i, name in enumerate(names):
                column = resolve(columns, name, cfg("columns", i), problems)
                if column is not None:
                    kept.append(column)
        rename: dict[str, str] = config.get("rename", {})
        kept_names = {c.name for c in kept}
        for old in rename:
            if old not in kept_names:
                if find_column(columns, old) is None:
                    problems.append(
                        Problem(cfg("rename", old), f"The 'data' input has no column {old!r}.", "UNKNOWN_COLUMN")
                    )
                else:
                    problems.append(Problem(cfg("rename", old), f"Column {old!r} is not kept.", "INVALID_CONFIG"))
        out: list[Column] = []
        items: list[str] = []
        named: list[tuple[str, Path]] = []
        for column in kept:
            new = rename.get(column.name, column.name)
            out.append(Column(new, column.type))
            items.append(f"{quote(column.name)} AS {quote(new)}")
            named.append((new, cfg("rename", column.name) if column.name in rename else cfg("columns")))
        derived: list[tuple[str, _Expr]] = []
        for i, spec in enumerate(config.get("derived", [])):
            expr = _derive(spec, columns, cfg("derived", i), problems)
            named.append((spec["name"], cfg("derived", i, "name")))
            if expr is not None:
                derived.append((spec["name"], expr))
                out.append(Column(spec["name"], expr.type))
        clashes(named, problems)

        def render(params: Params) -> str:
            parts = items + [f"{expr.render(params)} AS {quote(name)}" for name, expr in derived]
            return f'SELECT {", ".join(parts) or "NULL AS _"} FROM "data"'

        if not out:
            problems.append(Problem(cfg("columns"), "Keep or derive at least one column.", "INVALID_CONFIG"))
        return Plan(out, render)


class _Expr:
    """A derived column: its type and how to render it."""

    def __init__(self, type_: str, render: Any) -> None:
        self.type = type_
        self.render = render


class _Arg:
    def __init__(self, column: Column | None, value: Any, kind: str) -> None:
        self.column = column
        self.value = value
        self.kind = kind  # of the column, or of the literal: number | string | boolean

    def sql(self, params: Params, cast: str | None = None) -> str:
        if self.column is not None:
            text = quote(self.column.name)
            return f"CAST({text} AS {cast})" if cast else text
        mark = params.add(self.value)
        return f"CAST({mark} AS {cast})" if cast else mark


def _derive(spec: Mapping[str, Any], columns: Columns, path: Path, problems: list[Problem]) -> _Expr | None:
    op: str = spec["op"]
    raw: Sequence[Mapping[str, Any]] = spec["args"]
    low, high = _ARITY[op]
    if not low <= len(raw) <= high:
        count = str(low) if low == high else f"{low} to {high}"
        problems.append(Problem((*path, "args"), f"{op} takes {count} arguments.", "INVALID_CONFIG"))
        return None
    before = len(problems)
    args: list[_Arg] = []
    for j, item in enumerate(raw):
        if "column" in item:
            column = resolve(columns, item["column"], (*path, "args", j, "column"), problems)
            args.append(_Arg(column, None, column_kind(column.type) if column else "other"))
        else:
            value = item["value"]
            kind = "boolean" if isinstance(value, bool) else "number" if isinstance(value, int | float) else "string"
            args.append(_Arg(None, value, kind))
    if len(problems) > before:
        return None

    def need(j: int, kinds: frozenset[str], words: str) -> bool:
        if args[j].kind in kinds:
            return True
        column = args[j].column
        what = f"column {column.name!r} ({column.type})" if column else f"{args[j].value!r}"
        where = (*path, "args", j, "column" if column else "value")
        problems.append(Problem(where, f"{op} needs {words}; {what} is not.", "WRONG_COLUMN_TYPE"))
        return False

    numbers = NUMERIC | {"number"}
    if op in ("add", "sub", "mul", "div"):
        if not (need(0, numbers, "numbers") & need(1, numbers, "numbers")):
            return None
        sym = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[op]
        return _Expr("DOUBLE", lambda p: f"({args[0].sql(p, 'DOUBLE')} {sym} {args[1].sql(p, 'DOUBLE')})")
    if op == "round":
        if not need(0, numbers, "a number"):
            return None
        if len(args) == 2:
            digits = args[1]
            if digits.column is not None or isinstance(digits.value, bool) or not isinstance(digits.value, int):
                problems.append(
                    Problem((*path, "args", 1), "round's digits are a whole number value.", "INVALID_VALUE")
                )
                return None
            return _Expr("DOUBLE", lambda p: f"round({args[0].sql(p, 'DOUBLE')}, {args[1].sql(p, 'INTEGER')})")
        return _Expr("DOUBLE", lambda p: f"round({args[0].sql(p, 'DOUBLE')})")
    if op == "abs":
        if not need(0, numbers, "a number"):
            return None
        return _Expr("DOUBLE", lambda p: f"abs({args[0].sql(p, 'DOUBLE')})")
    if op in ("lower", "upper"):
        if not need(0, frozenset({"string"}), "text"):
            return None
        return _Expr("VARCHAR", lambda p: f"{op}({args[0].sql(p, 'VARCHAR')})")
    if op == "concat":
        return _Expr("VARCHAR", lambda p: f"concat({', '.join(a.sql(p, 'VARCHAR') for a in args)})")
    if op == "date_trunc":
        unit = args[0]
        if unit.column is not None or unit.value not in TRUNC_UNITS:
            problems.append(
                Problem((*path, "args", 0), f"date_trunc's first argument is a unit value: {', '.join(TRUNC_UNITS)}.")
            )
            return None
        if args[1].column is None or not need(1, TEMPORAL, "a date or timestamp column"):
            if args[1].column is None:
                problems.append(Problem((*path, "args", 1), "date_trunc truncates a column.", "INVALID_CONFIG"))
            return None
        column = args[1].column
        kind = column_kind(column.type)
        ident = quote(column.name)
        literal = f"'{unit.value}'"  # one of TRUNC_UNITS
        if kind == "timestamptz":
            return _Expr(
                "TIMESTAMP WITH TIME ZONE",
                lambda p: f"timezone('UTC', date_trunc({literal}, timezone('UTC', {ident})))",
            )
        type_ = "DATE" if kind == "date" and unit.value not in ("minute", "hour") else "TIMESTAMP"
        return _Expr(type_, lambda p: f"CAST(date_trunc({literal}, {ident}) AS {type_})")
    # coalesce: arguments of one kind; literal values converted to it
    family = {"integer": "number", "float": "number", "decimal": "number", "number": "number"}
    kinds = {family.get(a.kind, a.kind) for a in args if a.column is not None} or {
        family.get(a.kind, a.kind) for a in args
    }
    target = next(iter(kinds))
    if len(kinds) > 1 or target not in ("number", "string", "boolean", *TEMPORAL):
        problems.append(Problem((*path, "args"), "coalesce needs arguments of one kind.", "WRONG_COLUMN_TYPE"))
        return None
    type_ = "DOUBLE" if target == "number" else KIND_TYPES[target]
    for j, arg in enumerate(args):
        if arg.column is None:
            try:
                arg.value = convert("float" if target == "number" else target, arg.value)
            except ValueProblem as exc:
                problems.append(Problem((*path, "args", j, "value"), f"Not a {type_} value: {exc}.", "INVALID_VALUE"))
                return None
    return _Expr(type_, lambda p: f"coalesce({', '.join(a.sql(p, type_) for a in args)})")


# --- join ----------------------------------------------------------------------------------------------------------

_KEY_FAMILY: Final[Mapping[str, str]] = {
    "integer": "number",
    "float": "number",
    "decimal": "number",
    "date": "time",
    "timestamp": "time",
    "timestamptz": "timestamptz",
}


class JoinBlock(PlannedBlock):
    id: ClassVar[str] = "join"
    name: ClassVar[str] = "Join"
    category: ClassVar[str] = "transform"
    description: ClassVar[str] = (
        "Join two tables on pairs of equal columns (nulls never match). The output has the left input's columns, "
        "then the right's; a name both sides have gets the side's suffix."
    )
    inputs: ClassVar[tuple[InputSpec, ...]] = (
        InputSpec("left", "The left table."),
        InputSpec("right", "The right table."),
    )
    config_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "title": "Join",
        "properties": {
            "on": {
                "type": "array",
                "title": "Join on",
                "description": "Pairs of columns that must be equal.",
                "minItems": 1,
                "maxItems": 10,
                "items": {
                    "type": "object",
                    "properties": {
                        "left": {"type": "string", "minLength": 1, "title": "Left column"},
                        "right": {"type": "string", "minLength": 1, "title": "Right column"},
                    },
                    "required": ["left", "right"],
                    "additionalProperties": False,
                },
            },
            "how": {
                "type": "string",
                "enum": ["inner", "left", "right", "full"],
                "default": "inner",
                "title": "Join type",
            },
            "suffixes": {
                "type": "object",
                "title": "Suffixes",
                "description": "Added to a column name both inputs have.",
                "properties": {
                    "left": {"type": "string", "maxLength": 32, "default": ""},
                    "right": {"type": "string", "maxLength": 32, "default": "_right"},
                },
                "additionalProperties": False,
                "default": {"left": "", "right": "_right"},
            },
        },
        "required": ["on"],
        "additionalProperties": False,
    }
    output_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "description": "The left input's columns, then the right's (clashing names suffixed).",
    }

    def plan(self, config: Any, inputs: Mapping[str, Columns], problems: list[Problem]) -> Plan | None:
        left, right = inputs["left"], inputs["right"]
        keys: list[tuple[Column, Column]] = []
        for i, pair in enumerate(config["on"]):
            a = resolve(left, pair["left"], cfg("on", i, "left"), problems, input_name="left")
            b = resolve(right, pair["right"], cfg("on", i, "right"), problems, input_name="right")
            if a is None or b is None:
                continue
            ka, kb = column_kind(a.type), column_kind(b.type)
            if _KEY_FAMILY.get(ka, ka) != _KEY_FAMILY.get(kb, kb) or ka == "other":
                problems.append(
                    Problem(
                        cfg("on", i, "right"),
                        f"Cannot join {a.name!r} ({a.type}) with {b.name!r} ({b.type}): the types differ.",
                        "WRONG_COLUMN_TYPE",
                    )
                )
                continue
            keys.append((a, b))
        suffixes = config.get("suffixes", {})
        left_suffix, right_suffix = suffixes.get("left", ""), suffixes.get("right", "_right")
        if left_suffix.lower() == right_suffix.lower():
            problems.append(Problem(cfg("suffixes"), "The two suffixes must differ.", "INVALID_CONFIG"))
            return None
        both = {c.name.lower() for c in left} & {c.name.lower() for c in right}
        items: list[str] = []
        out: list[Column] = []
        for alias, side, suffix in (("l", left, left_suffix), ("r", right, right_suffix)):
            for column in side:
                new = column.name + suffix if column.name.lower() in both else column.name
                items.append(f"{alias}.{quote(column.name)} AS {quote(new)}")
                out.append(Column(new, column.type))
        clashes([(c.name, cfg("suffixes")) for c in out], problems)
        how = {"inner": "INNER", "left": "LEFT", "right": "RIGHT", "full": "FULL"}[config.get("how", "inner")]

        def render(params: Params) -> str:
            on = " AND ".join(f"l.{quote(a.name)} = r.{quote(b.name)}" for a, b in keys)
            return f'SELECT {", ".join(items)} FROM "left" AS l {how} JOIN "right" AS r ON {on}'

        return Plan(out, render)
