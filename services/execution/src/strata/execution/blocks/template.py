"""SQL templates: the ``sql`` block, and what custom blocks (custom.py) share with it.

A template is one SELECT over the block's inputs (by name: ``SELECT ... FROM data``) with named parameters
(``$min_rating``). It is checked with the query sandbox's own analysis (DuckDB's parser: one read-only statement,
the allowed table functions only, no settings functions): it must be a SELECT, read only the block's inputs, and use
exactly the declared parameters. Values are bound, never spliced. Its output columns are found by binding it, with
the values, against empty tables with the inputs' columns on a private in-memory DuckDB that can read nothing else.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from typing import Any, ClassVar, Final

import duckdb

from ..engines.base import QueryError
from ..engines.duckdb import Analyzer
from ._common import Path, ValueProblem
from .base import Block, BlockConfigError, Column, Columns, Compiled, InputSpec, Problem, quote

PARAMETER_TYPES: Final = ("integer", "number", "string", "boolean", "date", "timestamp")
PARAMETER_NAME: Final = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
MAX_TEMPLATE_CHARS: Final = 100_000

_lock = threading.Lock()
_analyzer: Analyzer | None = None


def _analyze(template: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(kind, table names read, parameter names used) of a template; raises :class:`QueryError`."""
    global _analyzer
    with _lock:
        if _analyzer is None:
            _analyzer = Analyzer()
        analyzer = _analyzer
    analysis = analyzer.analyze(template).analysis()
    return analysis.kind, tuple(t.ref for t in analysis.tables), analysis.parameters


def template_problems(
    template: str, declared: Sequence[str], input_names: Sequence[str], path: Path, parameters_path: Path
) -> list[Problem]:
    """What is wrong with a template: it does not parse, is not one SELECT, reads a table that is not an input, or
    uses a parameter that is not declared (or does not use one that is)."""
    try:
        kind, tables, used = _analyze(template)
    except QueryError as exc:
        position = getattr(exc, "position", None)
        where = f" (line {position[0]}, column {position[1]})" if position else ""
        return [Problem(path, f"{exc}{where}", "INVALID_TEMPLATE")]
    problems = []
    if kind != "select":
        problems.append(Problem(path, "The template must be one SELECT statement.", "INVALID_TEMPLATE"))
    names = {n.lower() for n in input_names}
    for table in tables:
        if table.lower() not in names:
            problems.append(
                Problem(
                    path,
                    f"The template reads {table!r}, which is not an input (inputs: {', '.join(input_names)}).",
                    "INVALID_TEMPLATE",
                )
            )
    for name in used:
        if name not in declared:
            problems.append(Problem(path, f"Parameter ${name} is used but not declared.", "UNDECLARED_PARAMETER"))
    for i, name in enumerate(declared):
        if name not in used:
            problems.append(
                Problem((*parameters_path, i), f"Parameter ${name} is declared but not used.", "UNUSED_PARAMETER")
            )
    return problems


def parameter_value(type_: str, value: Any) -> Any:
    """A JSON value as the Python value bound for a parameter of ``type_``; raises :class:`ValueProblem`."""
    if value is None:
        return None
    if type_ == "integer" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if type_ == "number" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if type_ == "string" and isinstance(value, str):
        return value
    if type_ == "boolean" and isinstance(value, bool):
        return value
    if type_ == "date" and isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError:
            raise ValueProblem("not an ISO date (YYYY-MM-DD)") from None
    if type_ == "timestamp" and isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            raise ValueProblem("not an ISO timestamp") from None
    raise ValueProblem(f"expected a value of type {type_}")


def parameter_schema(type_: str) -> dict[str, Any]:
    return {
        "integer": {"type": "integer"},
        "number": {"type": "number"},
        "string": {"type": "string"},
        "boolean": {"type": "boolean"},
        "date": {"type": "string", "format": "date"},
        "timestamp": {"type": "string", "format": "date-time"},
    }[type_]


def bind_columns(
    template: str, parameters: Mapping[str, Any], inputs: Mapping[str, Columns], path: Path
) -> tuple[list[Column], list[Problem]]:
    """The columns the template produces over tables with the inputs' columns (and no rows)."""
    con = duckdb.connect(
        config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "enable_external_access": False,
            "threads": 1,
        }
    )
    try:
        for name, columns in inputs.items():
            try:
                # canonical type names, as DuckDB spells them, checked by DuckDB's own type parser
                defs = ", ".join(f"{quote(c.name)} {duckdb.sqltype(c.type)}" for c in columns) or '"_" INTEGER'
            except duckdb.Error:
                bad = next(c for c in columns if not _is_type(c.type))
                return [], [Problem(("inputs", name), f"Column {bad.name!r} has an unknown type {bad.type!r}.")]
            con.execute(f"CREATE TABLE {quote(name)} ({defs})")
        con.execute("SET lock_configuration = true")
        try:
            rel = con.sql(template, params=dict(parameters) or None)
        except duckdb.Error as exc:
            return [], [Problem(path, f"The template does not run on its inputs: {exc}", "INVALID_TEMPLATE")]
        return [Column(str(n), str(t)) for n, t in zip(rel.columns, rel.types, strict=True)], []
    finally:
        con.close()


def _is_type(text: str) -> bool:
    try:
        duckdb.sqltype(text)
    except duckdb.Error:
        return False
    return True


class TemplateBlock(Block):
    """A block that runs a SQL template: the ``sql`` block (template in the config) and custom blocks (template in
    the definition, parameter values in the config)."""

    def template_and_values(self, config: Any, problems: list[Problem]) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    def check_columns(self, config: Any, inputs: Mapping[str, Columns]) -> list[Problem]:
        problems: list[Problem] = []
        self._bound(config, inputs, problems)
        return problems

    def _bound(
        self, config: Any, inputs: Mapping[str, Columns], problems: list[Problem]
    ) -> tuple[str, dict[str, Any], list[Column]]:
        template, values = self.template_and_values(config, problems)
        if problems:
            return template, values, []
        columns, bind_problems = bind_columns(template, values, inputs, self.template_path)
        problems.extend(bind_problems)
        return template, values, columns

    template_path: ClassVar[Path] = ("config", "template")

    def _valid(self, config: Any, inputs: Mapping[str, Columns]) -> tuple[str, dict[str, Any], list[Column]]:
        problems = self.check(config, inputs)
        if problems:
            raise BlockConfigError(problems)
        template, values, columns = self._bound(config, inputs, problems)
        if problems:
            raise BlockConfigError(problems)
        return template, values, columns

    def output_columns(self, config: Any, inputs: Mapping[str, Columns]) -> list[Column]:
        return self._valid(config, inputs)[2]

    def compile(self, config: Any, inputs: Mapping[str, Columns]) -> Compiled:
        template, values, _ = self._valid(config, inputs)
        return Compiled(sql=template, parameters=values)


class SqlBlock(TemplateBlock):
    id: ClassVar[str] = "sql"
    name: ClassVar[str] = "SQL"
    category: ClassVar[str] = "sql"
    description: ClassVar[str] = (
        "One SELECT over the inputs (FROM data, and other if given) with declared, typed parameters ($name) whose "
        "values are bound, never spliced into the SQL. It runs in the query sandbox: no files, no settings."
    )
    inputs: ClassVar[tuple[InputSpec, ...]] = (
        InputSpec("data", "The table the template reads as data."),
        InputSpec("other", "A second table the template may read as other.", required=False),
    )
    config_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "title": "SQL",
        "properties": {
            "template": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_TEMPLATE_CHARS,
                "title": "SQL",
                "description": "One SELECT; read the inputs by name, use parameters as $name.",
                "x-format": "sql",
            },
            "parameters": {
                "type": "array",
                "title": "Parameters",
                "maxItems": 50,
                "default": [],
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "pattern": PARAMETER_NAME, "title": "Name"},
                        "type": {"type": "string", "enum": list(PARAMETER_TYPES), "title": "Type"},
                        "value": {
                            "type": ["string", "number", "integer", "boolean", "null"],
                            "title": "Value",
                            "description": "Dates and timestamps as ISO text.",
                        },
                    },
                    "required": ["name", "type", "value"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["template"],
        "additionalProperties": False,
    }
    output_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "description": "Whatever the template selects (known once it is bound to its inputs).",
    }

    def template_and_values(self, config: Any, problems: list[Problem]) -> tuple[str, dict[str, Any]]:
        template: str = config["template"]
        declared = [p["name"] for p in config.get("parameters", [])]
        seen: set[str] = set()
        values: dict[str, Any] = {}
        for i, param in enumerate(config.get("parameters", [])):
            if param["name"] in seen:
                problems.append(Problem(("config", "parameters", i, "name"), "Declared twice.", "INVALID_CONFIG"))
            seen.add(param["name"])
            try:
                values[param["name"]] = parameter_value(param["type"], param["value"])
            except ValueProblem as exc:
                problems.append(Problem(("config", "parameters", i, "value"), f"{exc}.", "INVALID_VALUE"))
        problems.extend(
            template_problems(
                template, declared, [i.name for i in self.inputs], ("config", "template"), ("config", "parameters")
            )
        )
        return template, values
