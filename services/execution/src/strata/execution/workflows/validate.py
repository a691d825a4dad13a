"""Everything wrong with a workflow, before anything runs, each problem with its step and path.

Structure first, for every step (its block, each input's reference, the block's required inputs, cycles), then the
columns: walking the DAG in dependency order, each step's :meth:`Block.check` runs against its inputs' columns (a
dataset's own, or what the upstream step's block says it outputs). A step whose own structure is wrong, or which reads
a step with problems, only has its config checked against the block's schema: its columns are not known, and saying
that each is missing would bury the one problem upstream.

Problems come out in a fixed order: those of the ``datasets`` overrides, then by step in workflow order; within a
step, block, inputs (in the workflow's order), missing inputs, cycle, then what the block reports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from strata.execution.blocks.base import Block, Column, Columns, Problem, schema_problems
from strata.execution.workflows.graph import cycles, topological_order
from strata.execution.workflows.spec import DatasetInput, StepOutputInput, StepSpec, WorkflowSpec

#: Finds a block by id and version (None: the latest); None when there is no such block or version.
BlockLookup = Callable[[str, int | None], Block | None]


def validate(
    spec: WorkflowSpec,
    registry: BlockLookup,
    dataset_columns: Mapping[str, Columns | None],
    *,
    datasets: Mapping[str, str] | None = None,
) -> list[Problem]:
    """Every problem of ``spec`` (empty: it can run).

    ``dataset_columns`` maps each dataset ref the workflow reads (see :meth:`WorkflowSpec.dataset_refs`, after the
    overrides) to its columns, or to None when it is unknown or cannot be read; a ref left out counts as unknown.
    ``datasets`` are the execute-time overrides ``{ref in the workflow: ref to read instead}``.
    """
    top: list[Problem] = []
    original = spec
    if datasets:
        used = set(spec.dataset_refs())
        for old in datasets:
            if old not in used:
                top.append(Problem(("datasets", old), f"The workflow reads no dataset {old!r}.", "UNKNOWN_OVERRIDE"))
        spec = spec.with_datasets(datasets)

    ids = [step.id for step in spec.steps]
    index = {step_id: i for i, step_id in enumerate(ids)}
    upstream = {step.id: step.upstream() for step in spec.steps}
    blocks = [_resolve_block(step, i, registry) for i, step in enumerate(spec.steps)]
    per_step: list[list[Problem]] = [list(problems) for _, problems in blocks]

    for i, step in enumerate(spec.steps):
        block = blocks[i][0]
        per_step[i].extend(_input_problems(step, i, block, index, dataset_columns, original.steps[i]))

    for cycle in cycles(ids, upstream):
        start = spec.steps[index[cycle[0]]]
        reads = cycle[1] if len(cycle) > 1 else cycle[0]
        name = next(n for n, ref in start.inputs.items() if isinstance(ref, StepOutputInput) and ref.step == reads)
        if len(cycle) == 1:
            message = f"Step {start.id!r} reads its own result."
        else:
            chain = ", ".join(f"{a!r} reads {b!r}" for a, b in zip(cycle, [*cycle[1:], cycle[0]], strict=True))
            message = f"Steps form a cycle: {chain}."
        per_step[index[start.id]].append(Problem(("steps", index[start.id], "inputs", name, "step"), message, "CYCLE"))

    # Steps on or after a cycle never come free in the order; they still get their config checked (below).
    ordered, left = topological_order(ids, upstream)
    outputs: dict[str, list[Column]] = {}
    for step_id in [*ordered, *left]:
        i = index[step_id]
        step, block = spec.steps[i], blocks[i][0]
        if block is None:
            continue
        columns = _input_columns(step, dataset_columns, outputs)
        if per_step[i] or columns is None:
            per_step[i].extend(schema_problems(block.config_schema, step.config, ("steps", i, "config")))
            continue
        problems = [Problem(("steps", i, *p.path), p.message, p.code) for p in block.check(step.config, columns)]
        if problems:
            per_step[i].extend(problems)
        else:
            outputs[step_id] = block.output_columns(step.config, columns)

    return [*top, *(problem for problems in per_step for problem in problems)]


def _resolve_block(step: StepSpec, i: int, registry: BlockLookup) -> tuple[Block | None, list[Problem]]:
    ref = step.block
    block = registry(ref.id, ref.version)
    if block is not None:
        return block, []
    if ref.version is not None and registry(ref.id, None) is not None:
        problem = Problem(
            ("steps", i, "block", "version"), f"Block {ref.id!r} has no version {ref.version}.", "UNKNOWN_BLOCK_VERSION"
        )
    else:
        problem = Problem(("steps", i, "block", "id"), f"There is no block {ref.id!r}.", "UNKNOWN_BLOCK")
    return None, [problem]


def _input_problems(
    step: StepSpec,
    i: int,
    block: Block | None,
    index: Mapping[str, int],
    dataset_columns: Mapping[str, Columns | None],
    before_overrides: StepSpec,
) -> list[Problem]:
    problems: list[Problem] = []
    for name, ref in step.inputs.items():
        path: tuple[str | int, ...] = ("steps", i, "inputs", name)
        if block is not None and name not in {spec.name for spec in block.inputs}:
            expected = ", ".join(repr(spec.name) for spec in block.inputs)
            problems.append(Problem(path, f"{block.id} has no input {name!r} (it has {expected}).", "UNKNOWN_INPUT"))
        if isinstance(ref, StepOutputInput):
            if ref.step not in index:
                problems.append(Problem((*path, "step"), f"There is no step {ref.step!r}.", "UNKNOWN_STEP"))
        elif dataset_columns.get(ref.dataset) is None:
            was = before_overrides.inputs[name]
            instead = f" (in place of {was.dataset!r})" if isinstance(was, DatasetInput) and was != ref else ""
            problems.append(
                Problem(
                    (*path, "dataset"),
                    f"Dataset {ref.dataset!r}{instead} is unknown or cannot be read.",
                    "UNKNOWN_DATASET",
                )
            )
    if block is not None:
        for spec in block.inputs:
            if spec.required and spec.name not in step.inputs:
                problems.append(
                    Problem(
                        ("steps", i, "inputs", spec.name),
                        f"{block.id} needs the {spec.name!r} input.",
                        "MISSING_INPUT",
                    )
                )
    return problems


def _input_columns(
    step: StepSpec, dataset_columns: Mapping[str, Columns | None], outputs: Mapping[str, list[Column]]
) -> dict[str, Columns] | None:
    """Each input's columns, or None when one of them is not known (an unknown dataset, an upstream step with
    problems)."""
    columns: dict[str, Columns] = {}
    for name, ref in step.inputs.items():
        found = dataset_columns.get(ref.dataset) if isinstance(ref, DatasetInput) else outputs.get(ref.step)
        if found is None:
            return None
        columns[name] = found
    return columns


__all__ = ["BlockLookup", "validate"]
