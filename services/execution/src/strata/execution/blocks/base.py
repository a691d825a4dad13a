"""What a block is, for the registry, the API, workflows and the runner.

A block is a named, versioned analysis step. It declares its **inputs** (tables: a dataset or an earlier step's
result, each with the columns it needs), a JSON Schema for its **config**, and a JSON Schema for its **output** (one
row of the table it produces). A block runs as one DuckDB statement inside the query sandbox: :meth:`Block.compile`
turns a config and the input tables' columns into SQL that reads each input by its quoted input name
(``"data"``, ``"left"``, ``"right"``) and binds every value as a named parameter (``$p0``, ``$p1``...); identifiers
(column names) are only ever taken from the input's real columns and quoted, never spliced from user text.

:meth:`Block.check` validates a config against the schema and the inputs' columns and returns every problem with its
path (``["config", "metrics", 0, "column"]``), so the API answers 422 with all of them before anything is queued, and
a workflow reports each step's problems. :meth:`Block.output_columns` says what the block produces for a config and
its inputs' columns (a workflow checks that a later step's columns exist).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from jsonschema.validators import Draft202012Validator

#: A column of an input or an output: its name and DuckDB type (``VARCHAR``, ``BIGINT``, ``DOUBLE``,
#: ``TIMESTAMP WITH TIME ZONE``...).
Columns = Sequence["Column"]


@dataclass(frozen=True)
class Column:
    name: str
    type: str


@dataclass(frozen=True)
class Problem:
    """One thing wrong, where: ``path`` from the request's root (``["config", "group_by", 1]``)."""

    path: tuple[str | int, ...]
    message: str
    code: str = "INVALID_CONFIG"

    def to_dict(self) -> dict[str, Any]:
        return {"loc": list(self.path), "msg": self.message, "type": self.code}


@dataclass(frozen=True)
class InputSpec:
    name: str  # the input's name, and the table name its SQL reads ("data")
    description: str
    required: bool = True


@dataclass(frozen=True)
class Compiled:
    sql: str
    parameters: dict[str, Any] = field(default_factory=dict)


class BlockConfigError(Exception):
    """The config does not fit the block (raised by :meth:`Block.compile` for what :meth:`Block.check` reports)."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(f"{'.'.join(map(str, p.path))}: {p.message}" for p in self.problems))


class Params:
    """Named parameters for one statement: ``params.add(value)`` returns the placeholder (``$p0``)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def add(self, value: Any) -> str:
        name = f"p{len(self.values)}"
        self.values[name] = value
        return f"${name}"


def quote(identifier: str) -> str:
    """A DuckDB identifier, quoted (only ever applied to names checked against an input's real columns)."""
    return '"' + identifier.replace('"', '""') + '"'


def schema_problems(schema: Mapping[str, Any], config: Any, root: tuple[str | int, ...] = ("config",)) -> list[Problem]:
    """Every violation of ``schema`` by ``config`` (JSON Schema 2020-12), each with its path."""
    validator = Draft202012Validator(schema)
    problems = []
    for error in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        problems.append(Problem((*root, *error.absolute_path), error.message, "INVALID_CONFIG"))
    return problems


class Block(ABC):
    """A built-in block (a subclass) or a custom one (a SQL template, see custom.py)."""

    id: ClassVar[str]  # stable, URL-safe: "aggregate"
    version: ClassVar[int] = 1
    name: ClassVar[str]
    category: ClassVar[str]  # "transform" | "aggregate" | "statistics" | "time" | "ranking" | "sql"
    description: ClassVar[str]
    inputs: ClassVar[tuple[InputSpec, ...]] = (InputSpec("data", "The table to work on."),)
    config_schema: ClassVar[dict[str, Any]]
    output_schema: ClassVar[dict[str, Any]]

    def check(self, config: Any, inputs: Mapping[str, Columns]) -> list[Problem]:
        """The config's problems against the schema, then against the inputs' columns (empty: it will compile)."""
        problems = schema_problems(self.config_schema, config)
        for spec in self.inputs:
            if spec.required and spec.name not in inputs:
                problems.append(
                    Problem(("inputs", spec.name), f"The {spec.name!r} input is required.", "MISSING_INPUT")
                )
        for name in inputs:
            if name not in {spec.name for spec in self.inputs}:
                problems.append(Problem(("inputs", name), f"{self.id} has no input {name!r}.", "UNKNOWN_INPUT"))
        if problems:
            return problems
        return self.check_columns(config, inputs)

    @abstractmethod
    def check_columns(self, config: Any, inputs: Mapping[str, Columns]) -> list[Problem]:
        """Problems of a schema-valid config against the inputs' columns (a column that is missing, of a wrong type)."""

    @abstractmethod
    def output_columns(self, config: Any, inputs: Mapping[str, Columns]) -> list[Column]:
        """The columns the block produces for a valid config."""

    @abstractmethod
    def compile(self, config: Any, inputs: Mapping[str, Columns]) -> Compiled:
        """One SELECT over the inputs (by their quoted names); raises :class:`BlockConfigError` if ``check`` would
        report problems."""

    def output_row_schema(self, config: Any, inputs: Mapping[str, Columns]) -> dict[str, Any]:
        """A JSON Schema for one row of the output for this config and these inputs (precise where
        :attr:`output_schema` can only describe the shape); raises :class:`BlockConfigError` for an invalid config."""
        from ._common import columns_schema  # the kinds live with the blocks

        return columns_schema(self.output_columns(config, inputs))

    def describe(self) -> dict[str, Any]:
        """What ``GET /blocks/{id}`` shows: enough for a frontend to render a form."""
        return {
            "id": self.id,
            "version": self.version,
            "name": self.name,
            "category": self.category,
            "description": self.description,
            "inputs": [{"name": i.name, "description": i.description, "required": i.required} for i in self.inputs],
            "config_schema": self.config_schema,
            "output_schema": self.output_schema,
        }


def find_column(columns: Columns, name: str) -> Column | None:
    for column in columns:
        if column.name == name:
            return column
    return None


__all__ = [
    "Block",
    "BlockConfigError",
    "Column",
    "Columns",
    "Compiled",
    "InputSpec",
    "Params",
    "Problem",
    "find_column",
    "quote",
    "schema_problems",
]
