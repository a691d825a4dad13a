"""How a valid workflow runs: its plan (dependency order, levels, dependants) and the state of one run.

:class:`RunState` is the whole scheduling policy as a pure state machine; the runner around it does the I/O::

    run = RunState(build_plan(spec))
    while not run.done:
        for step in run.ready():
            run.start(step)          # then launch it
        # wait for a step to end, or for run.retry_wait() seconds when something waits out its backoff
        run.succeed(step) | run.fail(step, retryable=...) | run.cancel()
    run.outcome                      # succeeded | failed | cancelled

Time comes from an injected clock (``time.monotonic`` by default), so backoff is testable without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from strata.execution.workflows.graph import cycles, topological_order, transitive_downstream
from strata.execution.workflows.spec import StepSpec, WorkflowSpec


class StepState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"  # never ran: an upstream step failed, or the run was cancelled first
    CANCELLED = "cancelled"  # was running when the run was cancelled


FINAL_STEP_STATES = frozenset({StepState.SUCCEEDED, StepState.FAILED, StepState.SKIPPED, StepState.CANCELLED})


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class PlanError(ValueError):
    """The workflow cannot be planned (a cycle or a reference to an unknown step): validate it first."""


class TransitionError(Exception):
    """A step was moved in a way its state does not allow (a runner bug, not a user error)."""


@dataclass(frozen=True)
class Plan:
    spec: WorkflowSpec
    #: Every step, each after the steps it reads: level by level, each level in workflow order.
    order: tuple[str, ...]
    #: Groups that can run together: a step's level is one more than its deepest upstream step's.
    levels: tuple[tuple[str, ...], ...]
    #: The steps each step reads directly.
    upstream: Mapping[str, tuple[str, ...]]
    #: Every step that reads a step's result, directly or through others, in plan order: what a failure skips.
    dependants: Mapping[str, tuple[str, ...]]

    def step(self, step_id: str) -> StepSpec:
        for step in self.spec.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)


def build_plan(spec: WorkflowSpec) -> Plan:
    ids = [step.id for step in spec.steps]
    upstream = {step.id: tuple(step.upstream()) for step in spec.steps}
    for step_id, ups in upstream.items():
        unknown = [u for u in ups if u not in upstream]
        if unknown:
            raise PlanError(f"Step {step_id!r} reads unknown step {unknown[0]!r}.")
    found = cycles(ids, upstream)
    if found:
        raise PlanError(f"Steps {', '.join(found[0])} form a cycle.")
    level: dict[str, int] = {}
    for step in topological_order(ids, upstream)[0]:
        level[step] = 1 + max((level[u] for u in upstream[step]), default=-1)
    levels: list[list[str]] = [[] for _ in range(max(level.values()) + 1)]
    for step in ids:
        levels[level[step]].append(step)
    # Level by level: the shallow steps first, which opens up the most parallel work soonest.
    order = [step for group in levels for step in group]
    position = {step: i for i, step in enumerate(order)}

    downstream: dict[str, list[str]] = {step: [] for step in ids}
    for step in ids:
        for u in upstream[step]:
            downstream[u].append(step)
    dependants = {
        step: tuple(sorted(transitive_downstream(step, downstream), key=position.__getitem__)) for step in ids
    }
    return Plan(
        spec=spec,
        order=tuple(order),
        levels=tuple(tuple(group) for group in levels),
        upstream=upstream,
        dependants=dependants,
    )


class RunState:
    """The state of one run of a plan: which steps may start, and what a success, failure or cancel changes."""

    def __init__(self, plan: Plan, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.plan = plan
        self._clock = clock
        self._states = dict.fromkeys(plan.order, StepState.PENDING)
        self._attempts = dict.fromkeys(plan.order, 0)
        self._not_before: dict[str, float] = {}
        self._cancelled = False

    # --- reading -----------------------------------------------------------------------------------------------

    def state(self, step: str) -> StepState:
        return self._states[step]

    def attempts(self, step: str) -> int:
        """How many times the step has started."""
        return self._attempts[step]

    @property
    def states(self) -> dict[str, StepState]:
        return dict(self._states)

    @property
    def running(self) -> list[str]:
        return [step for step in self.plan.order if self._states[step] is StepState.RUNNING]

    def ready(self) -> list[str]:
        """The steps to start now, in plan order: pending, every input succeeded, any backoff over, and no more
        than ``max_parallel`` running in all."""
        if self._cancelled:
            return []
        slots = self.plan.spec.max_parallel - len(self.running)
        if slots <= 0:
            return []
        now = self._clock()
        ready = [step for step in self.plan.order if self._can_start(step, now)]
        return ready[:slots]

    def retry_wait(self) -> float | None:
        """Seconds until the first step waiting out its backoff may start (0 if one already may), or None when no
        step is waiting: how long a runner with nothing running should sleep."""
        if self._cancelled:
            return None
        waits = [
            at
            for step, at in self._not_before.items()
            if self._states[step] is StepState.PENDING and self._inputs_succeeded(step)
        ]
        return max(0.0, min(waits) - self._clock()) if waits else None

    @property
    def done(self) -> bool:
        return all(state in FINAL_STEP_STATES for state in self._states.values())

    @property
    def outcome(self) -> Outcome | None:
        """None while the run is not done; then cancelled if it was, failed if any step failed, else succeeded."""
        if not self.done:
            return None
        if self._cancelled:
            return Outcome.CANCELLED
        if StepState.FAILED in self._states.values():
            return Outcome.FAILED
        return Outcome.SUCCEEDED

    def snapshot(self) -> list[dict[str, Any]]:
        """Every step's state and attempts, in plan order (for progress events and the job endpoints)."""
        return [
            {"step": step, "state": self._states[step].value, "attempts": self._attempts[step]}
            for step in self.plan.order
        ]

    # --- moving ------------------------------------------------------------------------------------------------

    def start(self, step: str) -> int:
        """Mark a ready step running; returns its attempt number (1 for the first run)."""
        if step not in self.ready():
            raise TransitionError(f"{step!r} is not ready to start (it is {self._states[step].value}).")
        self._states[step] = StepState.RUNNING
        self._attempts[step] += 1
        self._not_before.pop(step, None)
        return self._attempts[step]

    def succeed(self, step: str) -> None:
        if self._late(step):
            return
        self._states[step] = StepState.SUCCEEDED

    def fail(self, step: str, *, retryable: bool) -> float | None:
        """A run of ``step`` failed. If it may be retried and has attempts left, it goes back to pending and this
        returns the backoff (seconds) before it is ready again; otherwise it fails, every step depending on it is
        skipped (the rest of the run goes on), and this returns None."""
        if self._late(step):
            return None
        retry = self.plan.step(step).retry
        if retryable and self._attempts[step] < retry.max_attempts:
            delay = retry.delay(self._attempts[step])
            self._states[step] = StepState.PENDING
            self._not_before[step] = self._clock() + delay
            return delay
        self._states[step] = StepState.FAILED
        for dependant in self.plan.dependants[step]:
            if self._states[dependant] is StepState.PENDING:
                self._states[dependant] = StepState.SKIPPED
        return None

    def cancel(self) -> list[str]:
        """Cancel the run: running steps become cancelled (returned, to be stopped), pending ones skipped."""
        stopped = self.running
        self._cancelled = True
        for step, state in self._states.items():
            if state is StepState.RUNNING:
                self._states[step] = StepState.CANCELLED
            elif state is StepState.PENDING:
                self._states[step] = StepState.SKIPPED
        return stopped

    # --- internals ---------------------------------------------------------------------------------------------

    def _late(self, step: str) -> bool:
        """True for the report of a step cancelled while it ran (it races the cancel: ignore it); raises for a step
        that is not running."""
        state = self._states[step]
        if state is StepState.CANCELLED:
            return True
        if state is not StepState.RUNNING:
            raise TransitionError(f"{step!r} is {state.value}, not running.")
        return False

    def _inputs_succeeded(self, step: str) -> bool:
        return all(self._states[u] is StepState.SUCCEEDED for u in self.plan.upstream[step])

    def _can_start(self, step: str, now: float) -> bool:
        return (
            self._states[step] is StepState.PENDING
            and self._inputs_succeeded(step)
            and self._not_before.get(step, now) <= now
        )


__all__ = [
    "FINAL_STEP_STATES",
    "Outcome",
    "Plan",
    "PlanError",
    "RunState",
    "StepState",
    "TransitionError",
    "build_plan",
]
