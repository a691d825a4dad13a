"""Workflows as a pure library: the spec's shape, validation against fake blocks and datasets, the plan and a run's
state machine (with a fake clock)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from pydantic import ValidationError

from strata.execution.blocks.base import Block, Column, Columns, Compiled, InputSpec, Problem, find_column
from strata.execution.workflows import (
    Outcome,
    PlanError,
    RunState,
    StepState,
    TransitionError,
    WorkflowSpec,
    build_plan,
    validate,
)

# --- fake blocks --------------------------------------------------------------------------------------------------


class Keep(Block):
    """Needs one column of its input; outputs its input unchanged."""

    id = "keep"
    name = "Keep"
    category = "transform"
    description = "Rows whose column is not null."
    config_schema = {
        "type": "object",
        "properties": {"column": {"type": "string"}},
        "required": ["column"],
        "additionalProperties": False,
    }
    output_schema = {"type": "object"}

    def check_columns(self, config: Any, inputs: Mapping[str, Columns]) -> list[Problem]:
        if find_column(inputs["data"], config["column"]) is None:
            return [Problem(("config", "column"), f"The input has no column {config['column']!r}.", "UNKNOWN_COLUMN")]
        return []

    def output_columns(self, config: Any, inputs: Mapping[str, Columns]) -> list[Column]:
        return list(inputs["data"])

    def compile(self, config: Any, inputs: Mapping[str, Columns]) -> Compiled:
        raise NotImplementedError


class KeepV2(Keep):
    version = 2


class Count(Block):
    """Groups by columns named in its config: outputs them and ``n``."""

    id = "count"
    name = "Count"
    category = "aggregate"
    description = "Rows per group."
    config_schema = {
        "type": "object",
        "properties": {"by": {"type": "array", "items": {"type": "string"}}},
        "required": ["by"],
    }
    output_schema = {"type": "object"}

    def check_columns(self, config: Any, inputs: Mapping[str, Columns]) -> list[Problem]:
        return [
            Problem(("config", "by", i), f"The input has no column {name!r}.", "UNKNOWN_COLUMN")
            for i, name in enumerate(config["by"])
            if find_column(inputs["data"], name) is None
        ]

    def output_columns(self, config: Any, inputs: Mapping[str, Columns]) -> list[Column]:
        by = [find_column(inputs["data"], name) for name in config["by"]]
        return [c for c in by if c is not None] + [Column("n", "BIGINT")]

    def compile(self, config: Any, inputs: Mapping[str, Columns]) -> Compiled:
        raise NotImplementedError


class Join(Block):
    id = "join"
    name = "Join"
    category = "transform"
    description = "Joins two tables on one column."
    inputs = (InputSpec("left", "One table."), InputSpec("right", "The other."))
    config_schema = {"type": "object", "properties": {"on": {"type": "string"}}, "required": ["on"]}
    output_schema = {"type": "object"}

    def check_columns(self, config: Any, inputs: Mapping[str, Columns]) -> list[Problem]:
        return [
            Problem(("inputs", side), f"The {side} input has no column {config['on']!r}.", "UNKNOWN_COLUMN")
            for side in ("left", "right")
            if find_column(inputs[side], config["on"]) is None
        ]

    def output_columns(self, config: Any, inputs: Mapping[str, Columns]) -> list[Column]:
        names = {c.name for c in inputs["left"]}
        return [*inputs["left"], *(c for c in inputs["right"] if c.name not in names)]

    def compile(self, config: Any, inputs: Mapping[str, Columns]) -> Compiled:
        raise NotImplementedError


BLOCKS: dict[tuple[str, int], Block] = {(b.id, b.version): b for b in (Keep(), KeepV2(), Count(), Join())}


def registry(block_id: str, version: int | None) -> Block | None:
    if version is None:
        versions = [b for (i, _), b in BLOCKS.items() if i == block_id]
        return max(versions, key=lambda b: b.version) if versions else None
    return BLOCKS.get((block_id, version))


CALLS = [Column("agent", "VARCHAR"), Column("region", "VARCHAR"), Column("rating", "DOUBLE")]
AGENTS = [Column("agent", "VARCHAR"), Column("team", "VARCHAR")]
DATASETS: dict[str, Columns | None] = {"calls": CALLS, "agents": AGENTS, "broken": None, "other": AGENTS}


def workflow(*steps: dict[str, Any], **extra: Any) -> WorkflowSpec:
    return WorkflowSpec.model_validate({"name": "test", "steps": list(steps), **extra})


def step(step_id: str, block: str, config: dict[str, Any] | None = None, **inputs: str) -> dict[str, Any]:
    """``data="ds:calls"`` reads a dataset, ``data="a"`` reads step a."""
    refs = {
        name: {"dataset": ref.removeprefix("ds:")} if ref.startswith("ds:") else {"step": ref}
        for name, ref in inputs.items()
    }
    return {"id": step_id, "block": {"id": block}, "config": config or {}, "inputs": refs}


def found(problems: list[Problem]) -> list[tuple[tuple[str | int, ...], str]]:
    return [(p.path, p.code) for p in problems]


def diamond(**extra: Any) -> WorkflowSpec:
    return workflow(
        step("source", "keep", {"column": "agent"}, data="ds:calls"),
        step("by_agent", "count", {"by": ["agent"]}, data="source"),
        step("by_region", "count", {"by": ["region"]}, data="source"),
        step("joined", "join", {"on": "n"}, left="by_agent", right="by_region"),
        **extra,
    )


# --- spec ---------------------------------------------------------------------------------------------------------


def test_spec_reads_a_full_definition_with_defaults() -> None:
    spec = WorkflowSpec.model_validate(
        {
            "name": "  KPIs  ",
            "steps": [
                {
                    "id": "totals",
                    "block": {"id": "aggregate", "version": 2},
                    "config": {"metrics": []},
                    "inputs": {"data": {"dataset": "calls"}},
                    "retry": {"max_attempts": 3, "backoff_s": 0.5},
                    "timeout_s": 30,
                },
                {"id": "top", "block": {"id": "top_n"}, "inputs": {"data": {"step": "totals"}}},
            ],
        }
    )
    assert spec.name == "KPIs"
    assert spec.max_parallel == 2
    assert spec.steps[0].block.version == 2
    assert spec.steps[0].retry.max_attempts == 3
    assert [spec.steps[0].retry.delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    top = spec.steps[1]
    assert (top.block.version, top.retry.max_attempts, top.timeout_s, top.config) == (None, 1, None, {})
    assert top.upstream() == ["totals"]
    assert spec.dataset_refs() == ["calls"]


def errors(payload: dict[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    with pytest.raises(ValidationError) as info:
        WorkflowSpec.model_validate(payload)
    return [(tuple(e["loc"]), e["type"]) for e in info.value.errors()]


def test_spec_rejects_duplicate_step_ids() -> None:
    payload = {"name": "w", "steps": [step("a", "keep"), step("b", "keep"), step("a", "count")]}
    with pytest.raises(ValidationError) as info:
        WorkflowSpec.model_validate(payload)
    [error] = info.value.errors()
    assert (error["loc"], error["type"]) == (("steps",), "duplicate_step_id")
    assert error["msg"] == "Step ids must be unique: 'a' is used by steps 0 and 2."


@pytest.mark.parametrize("bad", ["Totals", "1st", "_a", "a-b", "a" * 64, ""])
def test_spec_rejects_step_ids_that_are_not_slugs(bad: str) -> None:
    assert errors({"name": "w", "steps": [step(bad, "keep")]}) == [(("steps", 0, "id"), "string_pattern_mismatch")]


def test_spec_accepts_the_longest_slug() -> None:
    assert workflow(step("a" + "_9" * 31, "keep")).steps[0].id == "a" + "_9" * 31


def test_spec_limits_steps_parallelism_and_retries() -> None:
    assert errors({"name": "w", "steps": [step(f"s{i}", "keep") for i in range(51)]}) == [(("steps",), "too_long")]
    assert len(workflow(*[step(f"s{i}", "keep") for i in range(50)]).steps) == 50
    assert errors({"name": "w", "steps": []}) == [(("steps",), "too_short")]
    assert errors({"name": "w", "steps": [step("a", "keep")], "max_parallel": 9}) == [
        (("max_parallel",), "less_than_equal")
    ]
    assert errors({"name": "w", "steps": [{**step("a", "keep"), "retry": {"max_attempts": 6}}]}) == [
        (("steps", 0, "retry", "max_attempts"), "less_than_equal")
    ]
    assert errors({"name": " ", "steps": [step("a", "keep")], "extra": 1}) == [
        (("name",), "string_too_short"),
        (("extra",), "extra_forbidden"),
    ]


def test_spec_inputs_are_a_dataset_or_a_step() -> None:
    base = step("a", "keep")
    assert errors({"name": "w", "steps": [{**base, "inputs": {"data": {}}}]}) == [
        (("steps", 0, "inputs", "data"), "invalid_input")
    ]
    assert errors({"name": "w", "steps": [{**base, "inputs": {"data": {"dataset": "x", "step": "y"}}}]}) == [
        (("steps", 0, "inputs", "data", "dataset", "step"), "extra_forbidden")
    ]
    assert errors({"name": "w", "steps": [{**base, "inputs": {"data": {"step": "Bad"}}}]}) == [
        (("steps", 0, "inputs", "data", "step", "step"), "string_pattern_mismatch")
    ]


def test_with_datasets_replaces_dataset_inputs_only() -> None:
    spec = workflow(
        step("a", "keep", data="ds:calls"),
        step("b", "join", left="a", right="ds:agents"),
        step("c", "keep", data="ds:calls"),
    )
    moved = spec.with_datasets({"calls": "calls_2025"})
    assert moved.dataset_refs() == ["calls_2025", "agents"]
    assert moved.steps[1].upstream() == ["a"]
    assert spec.dataset_refs() == ["calls", "agents"]  # the original is untouched


# --- validate -----------------------------------------------------------------------------------------------------


def test_a_valid_diamond_has_no_problems() -> None:
    assert validate(diamond(), registry, DATASETS) == []


def test_a_step_reading_itself_is_a_cycle() -> None:
    problems = validate(workflow(step("a", "keep", {"column": "agent"}, data="a")), registry, DATASETS)
    assert found(problems) == [(("steps", 0, "inputs", "data", "step"), "CYCLE")]
    assert problems[0].message == "Step 'a' reads its own result."


def test_two_and_three_step_cycles_name_their_steps() -> None:
    spec = workflow(
        step("ok", "keep", {"column": "agent"}, data="ds:calls"),
        step("a", "keep", {"column": "agent"}, data="b"),
        step("b", "keep", {"column": "agent"}, data="a"),
        step("x", "join", {"on": "agent"}, left="ok", right="z"),
        step("y", "keep", {"column": "agent"}, data="x"),
        step("z", "keep", {"column": "agent"}, data="y"),
        step("after", "keep", {"column": "agent"}, data="z"),
    )
    problems = validate(spec, registry, DATASETS)
    assert found(problems) == [
        (("steps", 1, "inputs", "data", "step"), "CYCLE"),
        (("steps", 3, "inputs", "right", "step"), "CYCLE"),
    ]
    assert problems[0].message == "Steps form a cycle: 'a' reads 'b', 'b' reads 'a'."
    assert problems[1].message == "Steps form a cycle: 'x' reads 'z', 'z' reads 'y', 'y' reads 'x'."
    with pytest.raises(PlanError):
        build_plan(spec)


def test_unknown_step_block_version_and_dataset() -> None:
    spec = workflow(
        step("a", "keep", {"column": "agent"}, data="ds:nowhere"),
        step("b", "keep", {"column": "agent"}, data="ds:broken"),
        step("c", "nope", {}, data="a"),
        {**step("d", "keep", {"column": "agent"}, data="ds:calls"), "block": {"id": "keep", "version": 7}},
        step("e", "keep", {"column": "agent"}, data="ghost"),
    )
    problems = validate(spec, registry, DATASETS)
    assert found(problems) == [
        (("steps", 0, "inputs", "data", "dataset"), "UNKNOWN_DATASET"),
        (("steps", 1, "inputs", "data", "dataset"), "UNKNOWN_DATASET"),
        (("steps", 2, "block", "id"), "UNKNOWN_BLOCK"),
        (("steps", 3, "block", "version"), "UNKNOWN_BLOCK_VERSION"),
        (("steps", 4, "inputs", "data", "step"), "UNKNOWN_STEP"),
    ]
    assert [p.message for p in problems] == [
        "Dataset 'nowhere' is unknown or cannot be read.",
        "Dataset 'broken' is unknown or cannot be read.",
        "There is no block 'nope'.",
        "Block 'keep' has no version 7.",
        "There is no step 'ghost'.",
    ]


def test_missing_and_unknown_input_names() -> None:
    spec = workflow(
        step("a", "keep", {"column": "agent"}, data="ds:calls"),
        step("b", "join", {"on": "agent"}, left="a", middle="ds:agents"),
    )
    problems = validate(spec, registry, DATASETS)
    assert found(problems) == [
        (("steps", 1, "inputs", "middle"), "UNKNOWN_INPUT"),
        (("steps", 1, "inputs", "right"), "MISSING_INPUT"),
    ]
    assert problems[0].message == "join has no input 'middle' (it has 'left', 'right')."


def test_a_column_missing_at_step_three_because_step_two_does_not_output_it() -> None:
    spec = workflow(
        step("calls", "keep", {"column": "rating"}, data="ds:calls"),
        step("per_region", "count", {"by": ["region"]}, data="calls"),
        step("good_agents", "keep", {"column": "agent"}, data="per_region"),
    )
    problems = validate(spec, registry, DATASETS)
    assert problems == [Problem(("steps", 2, "config", "column"), "The input has no column 'agent'.", "UNKNOWN_COLUMN")]


def test_columns_are_not_checked_downstream_of_a_step_with_problems() -> None:
    spec = workflow(
        step("a", "keep", {"column": "missing"}, data="ds:calls"),  # a column problem
        step("b", "keep", {"column": "also_missing"}, data="a"),  # would be one, but a is broken
        step("c", "keep", {"column": 5}, data="b"),  # its config is still checked against the schema
        step("d", "keep", {"column": "agent"}, data="ds:broken"),  # its own structure is wrong
        step("e", "count", {"by": ["nothing"]}, data="d"),
    )
    assert found(validate(spec, registry, DATASETS)) == [
        (("steps", 0, "config", "column"), "UNKNOWN_COLUMN"),
        (("steps", 2, "config", "column"), "INVALID_CONFIG"),
        (("steps", 3, "inputs", "data", "dataset"), "UNKNOWN_DATASET"),
    ]


def test_problems_come_out_by_step_in_a_fixed_order() -> None:
    # "late" comes first in the workflow but runs last; its problems still come first.
    spec = workflow(
        step("late", "count", {"by": ["agent", "team", "nope"]}, data="early"),
        {**step("cyc", "keep", {}, data="cyc", extra="ds:nowhere"), "block": {"id": "keep", "version": 9}},
        step("early", "join", {"on": "agent"}, left="ds:calls", right="ds:agents"),
        step("bad", "keep", {"column": 1, "x": 2}, left="ds:calls", data="missing"),
    )
    first = validate(spec, registry, DATASETS)
    assert found(first) == [
        (("steps", 0, "config", "by", 2), "UNKNOWN_COLUMN"),
        (("steps", 1, "block", "version"), "UNKNOWN_BLOCK_VERSION"),
        (("steps", 1, "inputs", "extra", "dataset"), "UNKNOWN_DATASET"),
        (("steps", 1, "inputs", "data", "step"), "CYCLE"),
        (("steps", 3, "inputs", "left"), "UNKNOWN_INPUT"),
        (("steps", 3, "inputs", "data", "step"), "UNKNOWN_STEP"),
        (("steps", 3, "config"), "INVALID_CONFIG"),
        (("steps", 3, "config", "column"), "INVALID_CONFIG"),
    ]
    assert validate(spec, registry, DATASETS) == first
    assert validate(WorkflowSpec.model_validate(spec.model_dump()), registry, DATASETS) == first


def test_dataset_overrides_are_validated_against_the_new_dataset() -> None:
    spec = workflow(
        step("a", "keep", {"column": "region"}, data="ds:calls"),
        step("b", "join", {"on": "agent"}, left="a", right="ds:agents"),
    )
    assert validate(spec, registry, DATASETS) == []
    problems = validate(spec, registry, DATASETS, datasets={"calls": "other", "typo": "calls"})
    assert problems == [
        Problem(("datasets", "typo"), "The workflow reads no dataset 'typo'.", "UNKNOWN_OVERRIDE"),
        Problem(("steps", 0, "config", "column"), "The input has no column 'region'.", "UNKNOWN_COLUMN"),
    ]
    [gone] = validate(spec, registry, DATASETS, datasets={"agents": "deleted"})
    assert gone.path == ("steps", 1, "inputs", "right", "dataset")
    assert gone.message == "Dataset 'deleted' (in place of 'agents') is unknown or cannot be read."


def test_problems_render_as_the_api_error_envelope_items() -> None:
    [problem] = validate(workflow(step("a", "keep", {"column": "agent"}, data="b")), registry, DATASETS)
    assert problem.to_dict() == {
        "loc": ["steps", 0, "inputs", "data", "step"],
        "msg": "There is no step 'b'.",
        "type": "UNKNOWN_STEP",
    }


# --- plan ---------------------------------------------------------------------------------------------------------


def test_plan_of_a_diamond() -> None:
    plan = build_plan(diamond())
    assert plan.order == ("source", "by_agent", "by_region", "joined")
    assert plan.levels == (("source",), ("by_agent", "by_region"), ("joined",))
    assert plan.upstream["joined"] == ("by_agent", "by_region")
    assert plan.dependants == {
        "source": ("by_agent", "by_region", "joined"),
        "by_agent": ("joined",),
        "by_region": ("joined",),
        "joined": (),
    }


def test_plan_order_follows_dependencies_not_the_listing() -> None:
    spec = workflow(
        step("report", "join", {"on": "agent"}, left="left_side", right="right_side"),
        step("right_side", "keep", {"column": "agent"}, data="ds:agents"),
        step("left_side", "keep", {"column": "agent"}, data="base"),
        step("base", "keep", {"column": "agent"}, data="ds:calls"),
    )
    plan = build_plan(spec)
    assert plan.order == ("right_side", "base", "left_side", "report")
    assert plan.levels == (("right_side", "base"), ("left_side",), ("report",))


def test_plan_refuses_an_unknown_step() -> None:
    with pytest.raises(PlanError, match="unknown step 'ghost'"):
        build_plan(workflow(step("a", "keep", data="ghost")))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def wide(max_parallel: int) -> WorkflowSpec:
    return workflow(
        *[step(f"s{i}", "keep", {"column": "agent"}, data="ds:calls") for i in range(5)],
        step("total", "count", {"by": []}, data="s4"),
        max_parallel=max_parallel,
    )


def test_ready_respects_max_parallel_and_dependencies() -> None:
    run = RunState(build_plan(wide(2)))
    assert run.plan.levels == (("s0", "s1", "s2", "s3", "s4"), ("total",))
    assert run.ready() == ["s0", "s1"]
    assert [run.start(s) for s in run.ready()] == [1, 1]
    assert run.ready() == []
    with pytest.raises(TransitionError):
        run.start("s2")
    run.succeed("s0")
    assert run.ready() == ["s2"]
    run.start("s2")
    for s in ("s1", "s2"):
        run.succeed(s)
    assert run.ready() == ["s3", "s4"]
    run.start("s3")
    run.start("s4")
    run.succeed("s4")
    assert run.ready() == ["total"]
    run.start("total")
    assert run.running == ["s3", "total"]
    assert not run.done and run.outcome is None
    run.succeed("s3")
    run.succeed("total")
    assert run.done and run.outcome is Outcome.SUCCEEDED


def test_max_parallel_one_runs_steps_one_at_a_time_in_plan_order() -> None:
    run = RunState(build_plan(wide(1)))
    started = []
    while not run.done:
        [next_step] = run.ready()
        run.start(next_step)
        started.append(next_step)
        run.succeed(next_step)
    assert started == ["s0", "s1", "s2", "s3", "s4", "total"]


def test_a_failure_skips_only_its_dependants() -> None:
    spec = workflow(
        step("a", "keep", {"column": "agent"}, data="ds:calls"),
        step("b", "keep", {"column": "agent"}, data="a"),
        step("c", "keep", {"column": "agent"}, data="b"),
        step("d", "join", {"on": "agent"}, left="a", right="c"),
        step("e", "keep", {"column": "agent"}, data="a"),
        step("f", "keep", {"column": "agent"}, data="ds:agents"),
        max_parallel=8,
    )
    run = RunState(build_plan(spec))
    for s in run.ready():
        run.start(s)
    run.succeed("a")
    assert run.ready() == ["b", "e"]
    run.start("b")
    run.start("e")
    assert run.fail("b", retryable=False) is None
    assert run.states == {
        "a": StepState.SUCCEEDED,
        "f": StepState.RUNNING,
        "b": StepState.FAILED,
        "e": StepState.RUNNING,
        "c": StepState.SKIPPED,
        "d": StepState.SKIPPED,
    }
    assert not run.done and run.ready() == []
    run.succeed("e")
    run.succeed("f")
    assert run.done and run.outcome is Outcome.FAILED
    assert run.snapshot()[:3] == [
        {"step": "a", "state": "succeeded", "attempts": 1},
        {"step": "f", "state": "succeeded", "attempts": 1},
        {"step": "b", "state": "failed", "attempts": 1},
    ]


def test_retries_with_doubling_backoff_then_fails() -> None:
    spec = workflow(
        {**step("flaky", "keep", {"column": "agent"}, data="ds:calls"), "retry": {"max_attempts": 3, "backoff_s": 2}},
        step("after", "keep", {"column": "agent"}, data="flaky"),
    )
    clock = Clock()
    run = RunState(build_plan(spec), clock=clock)
    assert run.retry_wait() is None
    assert run.start("flaky") == 1
    assert run.fail("flaky", retryable=True) == 2.0
    assert run.state("flaky") is StepState.PENDING
    assert run.ready() == []
    assert run.retry_wait() == 2.0
    clock.now += 1.5
    assert run.ready() == [] and run.retry_wait() == 0.5
    clock.now += 0.5
    assert run.ready() == ["flaky"]
    assert run.start("flaky") == 2
    assert run.retry_wait() is None
    assert run.fail("flaky", retryable=True) == 4.0
    clock.now += 4
    assert run.start("flaky") == 3
    assert run.fail("flaky", retryable=True) is None  # attempts used up
    assert run.states == {"flaky": StepState.FAILED, "after": StepState.SKIPPED}
    assert run.outcome is Outcome.FAILED


def test_a_failure_that_is_not_retryable_does_not_retry() -> None:
    spec = workflow({**step("a", "keep", data="ds:calls"), "retry": {"max_attempts": 5}})
    run = RunState(build_plan(spec))
    run.start("a")
    assert run.fail("a", retryable=False) is None
    assert run.outcome is Outcome.FAILED


def test_cancel_mid_run() -> None:
    run = RunState(build_plan(diamond(max_parallel=1)))
    run.start("source")
    run.succeed("source")
    run.start("by_agent")
    assert run.cancel() == ["by_agent"]
    assert run.states == {
        "source": StepState.SUCCEEDED,
        "by_agent": StepState.CANCELLED,
        "by_region": StepState.SKIPPED,
        "joined": StepState.SKIPPED,
    }
    assert run.ready() == [] and run.retry_wait() is None
    assert run.done and run.outcome is Outcome.CANCELLED
    run.succeed("by_agent")  # the step's own report, racing the cancel: ignored
    assert run.fail("by_agent", retryable=True) is None
    assert run.state("by_agent") is StepState.CANCELLED
    with pytest.raises(TransitionError):
        run.succeed("joined")


def test_cancel_while_a_step_waits_to_retry_skips_it() -> None:
    spec = workflow({**step("a", "keep", data="ds:calls"), "retry": {"max_attempts": 2}})
    run = RunState(build_plan(spec), clock=Clock())
    run.start("a")
    assert run.fail("a", retryable=True) == 1.0
    assert run.cancel() == []
    assert run.states == {"a": StepState.SKIPPED}
    assert run.outcome is Outcome.CANCELLED


def test_reporting_a_step_that_is_not_running_is_a_bug() -> None:
    run = RunState(build_plan(diamond()))
    with pytest.raises(TransitionError, match="'source' is pending, not running"):
        run.succeed("source")
    run.start("source")
    run.succeed("source")
    with pytest.raises(TransitionError):
        run.fail("source", retryable=True)
