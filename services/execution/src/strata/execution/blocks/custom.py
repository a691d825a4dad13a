"""Custom blocks: an admin's SQL template with declared, typed parameters (``POST /blocks``).

The definition (``{id, version, name, category, description, template, parameters, inputs}``) is the block; a run's
config holds only the parameter values (the config schema is made from the declarations, with their defaults and
descriptions). :func:`definition_problems` validates a definition before it is stored: its shape, the template (it
parses, is one SELECT, reads only the declared inputs), and that every parameter it uses is declared and every
declared one used; defaults must fit their types. Versions are immutable: a new version is a new definition.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final

from ._common import ValueProblem
from .base import Block, BlockConfigError, InputSpec, Problem, schema_problems
from .template import (
    MAX_TEMPLATE_CHARS,
    PARAMETER_NAME,
    PARAMETER_TYPES,
    TemplateBlock,
    parameter_schema,
    parameter_value,
    template_problems,
)

DEFINITION_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "title": "Custom block",
    "properties": {
        "id": {"type": "string", "pattern": r"^[a-z][a-z0-9_-]{1,62}$", "title": "Id"},
        "version": {"type": "integer", "minimum": 1, "default": 1, "title": "Version"},
        "name": {"type": "string", "minLength": 1, "maxLength": 200, "title": "Name"},
        "category": {"type": "string", "minLength": 1, "maxLength": 64, "default": "custom", "title": "Category"},
        "description": {"type": "string", "maxLength": 5000, "default": "", "title": "Description"},
        "template": {"type": "string", "minLength": 1, "maxLength": MAX_TEMPLATE_CHARS, "title": "SQL template"},
        "parameters": {
            "type": "array",
            "maxItems": 50,
            "default": [],
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "pattern": PARAMETER_NAME},
                    "type": {"type": "string", "enum": list(PARAMETER_TYPES)},
                    "default": {"type": ["string", "number", "integer", "boolean"]},
                    "description": {"type": "string", "maxLength": 1000},
                    "title": {"type": "string", "maxLength": 200},
                },
                "required": ["name", "type"],
                "additionalProperties": False,
            },
        },
        "inputs": {
            "type": "array",
            "minItems": 1,
            "maxItems": 10,
            "default": [{"name": "data", "description": "The table to work on.", "required": True}],
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "pattern": r"^[a-z][a-z0-9_]{0,62}$"},
                    "description": {"type": "string", "maxLength": 1000, "default": ""},
                    "required": {"type": "boolean", "default": True},
                },
                "required": ["name"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["id", "name", "template"],
    "additionalProperties": False,
}


def definition_problems(definition: Any) -> list[Problem]:
    """Everything wrong with a custom block definition, with paths from the definition's root."""
    problems = schema_problems(DEFINITION_SCHEMA, definition, root=())
    if problems:
        return problems
    params = definition.get("parameters", [])
    seen: set[str] = set()
    for i, param in enumerate(params):
        if param["name"] in seen:
            problems.append(Problem(("parameters", i, "name"), f"Parameter {param['name']!r} is declared twice."))
        seen.add(param["name"])
        if "default" in param:
            try:
                parameter_value(param["type"], param["default"])
            except ValueProblem as exc:
                problems.append(Problem(("parameters", i, "default"), f"{exc}.", "INVALID_VALUE"))
    inputs = [i["name"] for i in definition.get("inputs", DEFINITION_SCHEMA["properties"]["inputs"]["default"])]
    if len(set(inputs)) != len(inputs):
        problems.append(Problem(("inputs",), "Input names must differ."))
    problems += template_problems(
        definition["template"], [p["name"] for p in params], inputs, ("template",), ("parameters",)
    )
    return problems


class CustomBlock(TemplateBlock):
    """The base of custom block classes; make one with :func:`custom_block`."""

    definition: ClassVar[dict[str, Any]]
    template_path = ("inputs",)  # a template that does not bind to its inputs: they lack a column it needs

    def template_and_values(self, config: Any, problems: list[Problem]) -> tuple[str, dict[str, Any]]:
        values: dict[str, Any] = {}
        for param in self.definition.get("parameters", []):
            name = param["name"]
            raw = config.get(name, param.get("default"))
            try:
                values[name] = parameter_value(param["type"], raw)
            except ValueProblem as exc:
                problems.append(Problem(("config", name), f"{exc}.", "INVALID_VALUE"))
        return str(self.definition["template"]), values

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "custom": True, "template": self.definition["template"]}


def custom_block(definition: Mapping[str, Any]) -> Block:
    """The block a (valid) definition describes; raises :class:`BlockConfigError` with the definition's problems."""
    problems = definition_problems(definition)
    if problems:
        raise BlockConfigError(problems)
    data = dict(definition)
    params = data.get("parameters", [])
    properties: dict[str, Any] = {}
    for param in params:
        prop = {**parameter_schema(param["type"]), "title": param.get("title", param["name"])}
        if "description" in param:
            prop["description"] = param["description"]
        if "default" in param:
            prop["default"] = param["default"]
        properties[param["name"]] = prop
    config_schema = {
        "type": "object",
        "title": data["name"],
        "properties": properties,
        "required": [p["name"] for p in params if "default" not in p],
        "additionalProperties": False,
    }
    raw_inputs = data.get("inputs", DEFINITION_SCHEMA["properties"]["inputs"]["default"])
    inputs = tuple(InputSpec(i["name"], i.get("description", ""), i.get("required", True)) for i in raw_inputs)
    attrs = {
        "id": data["id"],
        "version": int(data.get("version", 1)),
        "name": data["name"],
        "category": data.get("category", "custom"),
        "description": data.get("description", ""),
        "inputs": inputs,
        "config_schema": config_schema,
        "output_schema": {"type": "object", "description": "Whatever the template selects."},
        "definition": data,
    }
    cls = type(f"CustomBlock_{data['id']}_v{attrs['version']}", (CustomBlock,), attrs)
    block: Block = cls()
    return block
