"""Workflows: named DAGs of blocks. A pure library: the definition (spec.py), its validation against the blocks and
the datasets' columns (validate.py), and the plan and run state machine a runner drives (plan.py)."""

from strata.execution.workflows.plan import (
    Outcome,
    Plan,
    PlanError,
    RunState,
    StepState,
    TransitionError,
    build_plan,
)
from strata.execution.workflows.spec import (
    BlockRef,
    DatasetInput,
    DatasetMap,
    RetryPolicy,
    StepOutputInput,
    StepSpec,
    WorkflowSpec,
)
from strata.execution.workflows.validate import BlockLookup, validate

__all__ = [
    "BlockLookup",
    "BlockRef",
    "DatasetInput",
    "DatasetMap",
    "Outcome",
    "Plan",
    "PlanError",
    "RetryPolicy",
    "RunState",
    "StepOutputInput",
    "StepSpec",
    "StepState",
    "TransitionError",
    "WorkflowSpec",
    "build_plan",
    "validate",
]
