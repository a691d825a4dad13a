"""A workflow definition, as the API accepts it: a named DAG of steps, each a block with a config and inputs.

The models check the shape only (types, limits, unique step ids). What needs the world (that referenced steps,
blocks and datasets exist, that there is no cycle, that each step's columns are there) is :func:`validate.validate`,
which reports every problem with its path instead of stopping at the first.

Dataset inputs can be swapped at execute time with a ``datasets`` map ``{ref in the workflow: ref to run on}``
(:meth:`WorkflowSpec.with_datasets`), so a saved workflow runs as a template on another dataset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag, field_validator
from pydantic_core import PydanticCustomError

MAX_STEPS = 50
MAX_PARALLEL = 8
MAX_ATTEMPTS = 5
STEP_ID_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"

StepId = Annotated[str, StringConstraints(pattern=STEP_ID_PATTERN)]
#: A dataset as a query names it: its id, its name, or ``"<owner id>".name``; resolved by whoever supplies columns.
DatasetRef = Annotated[str, StringConstraints(min_length=1, max_length=200)]
InputName = Annotated[str, StringConstraints(min_length=1, max_length=63)]
#: What ``POST /workflows/{id}/execute`` may carry as ``datasets``: ``{ref in the workflow: ref to read instead}``.
DatasetMap = Annotated[dict[DatasetRef, DatasetRef], Field(max_length=MAX_STEPS)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BlockRef(_Model):
    id: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    version: int | None = Field(default=None, ge=1, description="A block version; the latest when left out.")


class DatasetInput(_Model):
    dataset: DatasetRef


class StepOutputInput(_Model):
    step: StepId = Field(description="The id of an earlier step whose result this input reads.")


def _input_kind(value: Any) -> str | None:
    if isinstance(value, Mapping):
        if "dataset" in value:
            return "dataset"
        if "step" in value:
            return "step"
        return None
    if isinstance(value, DatasetInput):
        return "dataset"
    if isinstance(value, StepOutputInput):
        return "step"
    return None


#: ``{"dataset": ref}`` or ``{"step": id}``; tagged so an error names the one kind it was read as.
InputRef = Annotated[
    Annotated[DatasetInput, Tag("dataset")] | Annotated[StepOutputInput, Tag("step")],
    Discriminator(
        _input_kind,
        custom_error_type="invalid_input",
        custom_error_message='An input is {"dataset": "<dataset>"} or {"step": "<step id>"}.',
    ),
]


class RetryPolicy(_Model):
    max_attempts: int = Field(default=1, ge=1, le=MAX_ATTEMPTS, description="Runs of the step in all; 1: no retry.")
    backoff_s: float = Field(
        default=1.0, ge=0, le=60, description="The wait before the first retry; it doubles before each next one."
    )

    def delay(self, attempts: int) -> float:
        """The wait before the next run after ``attempts`` runs have failed."""
        return float(self.backoff_s * 2 ** (attempts - 1))


class StepSpec(_Model):
    id: StepId
    block: BlockRef
    config: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[InputName, InputRef] = Field(default_factory=dict, description="By the block's input names.")
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout_s: float | None = Field(default=None, gt=0, description="One run's deadline (default from settings).")

    def upstream(self) -> list[str]:
        """The steps this one reads, in input order, once each."""
        return list(dict.fromkeys(ref.step for ref in self.inputs.values() if isinstance(ref, StepOutputInput)))


class WorkflowSpec(_Model):
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    description: Annotated[str, StringConstraints(max_length=2000)] = ""
    steps: list[StepSpec] = Field(min_length=1, max_length=MAX_STEPS)
    max_parallel: int = Field(default=2, ge=1, le=MAX_PARALLEL, description="Steps that may run at once.")

    @field_validator("steps")
    @classmethod
    def _unique_ids(cls, steps: list[StepSpec]) -> list[StepSpec]:
        first: dict[str, int] = {}
        for index, step in enumerate(steps):
            if step.id in first:
                raise PydanticCustomError(
                    "duplicate_step_id",
                    "Step ids must be unique: '{id}' is used by steps {first} and {second}.",
                    {"id": step.id, "first": first[step.id], "second": index},
                )
            first[step.id] = index
        return steps

    def dataset_refs(self) -> list[str]:
        """Every dataset the workflow reads, once each, in order of first use (what to look columns up for)."""
        refs: dict[str, None] = {}
        for step in self.steps:
            for ref in step.inputs.values():
                if isinstance(ref, DatasetInput):
                    refs[ref.dataset] = None
        return list(refs)

    def with_datasets(self, datasets: Mapping[str, str]) -> WorkflowSpec:
        """This workflow with every dataset input whose ref is a key of ``datasets`` reading the value instead."""
        steps = [
            step.model_copy(
                update={
                    "inputs": {
                        name: DatasetInput(dataset=datasets[ref.dataset])
                        if isinstance(ref, DatasetInput) and ref.dataset in datasets
                        else ref
                        for name, ref in step.inputs.items()
                    }
                }
            )
            for step in self.steps
        ]
        return self.model_copy(update={"steps": steps})


__all__ = [
    "MAX_ATTEMPTS",
    "MAX_PARALLEL",
    "MAX_STEPS",
    "STEP_ID_PATTERN",
    "BlockRef",
    "DatasetInput",
    "DatasetMap",
    "DatasetRef",
    "InputRef",
    "RetryPolicy",
    "StepId",
    "StepOutputInput",
    "StepSpec",
    "WorkflowSpec",
]
