"""The execution service's contract: job events and the work item on ``strata.work.execution.jobs.p<priority>``.

Job events are keyed: they are published on ``<type>.<owner id>.<job id>``
(``strata.execution.job.succeeded.<owner>.<job>``), so a reader follows one job with the filter
``strata.execution.job.*.*.<job>`` (``GET /jobs/{id}/events``, the WebSocket's ``job:<id>`` channel) and one user's
jobs with ``strata.execution.job.*.<owner>.*`` (the WebSocket's ``user`` channel).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from ..events import EventPayload

JobState = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled", "timed_out"]
FINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
JOB_EVENT_PREFIX = "strata.execution.job"
WORK_SUBJECT_PREFIX = "strata.work.execution.jobs"
PRIORITIES = (1, 2, 3, 4, 5)  # 1 is the most urgent


def work_subject(priority: int) -> str:
    return f"{WORK_SUBJECT_PREFIX}.p{priority}"


def job_events_filter(job_id: str) -> str:
    """The NATS subject filter of every event of one job."""
    return f"{JOB_EVENT_PREFIX}.*.*.{job_id}"


def user_job_events_filter(owner_id: str) -> str:
    """The NATS subject filter of every event of one user's jobs."""
    return f"{JOB_EVENT_PREFIX}.*.{owner_id}.*"


def state_events_filter(state: str) -> str:
    """Every job's events of one state (``strata.execution.job.cancelling.*.*``)."""
    return f"{JOB_EVENT_PREFIX}.{state}.*.*"


class JobEvent(EventPayload):
    """A state change of a job, durable (through the outbox). ``event_type`` is ``strata.execution.job.<state>``."""

    event_type: ClassVar[str] = "strata.execution.job.{state}"
    subject_keys: ClassVar[tuple[str, ...]] = ("owner_id", "job_id")
    job_id: str
    owner_id: str
    kind: str
    engine: str
    state: str
    attempt: int = 0
    rows: int | None = None
    bytes: int | None = None
    truncated: bool | None = None
    error: dict[str, Any] | None = None
    #: timed_out: which part of the deadline ran out (``queue`` or ``run``).
    timed_out_in: str | None = None
    dataset_ids: list[str] = []


class JobProgress(EventPayload):
    """The engine's progress of a running job: high rate, best effort, coalescable (not through the outbox)."""

    event_type: ClassVar[str] = "strata.execution.job.progress"
    subject_keys: ClassVar[tuple[str, ...]] = ("owner_id", "job_id")
    job_id: str
    owner_id: str
    fraction: float | None = None
    rows_read: int | None = None
    elapsed_s: float


class JobRequested(EventPayload):
    """The work item: one per job, taken by one execution replica."""

    event_type: ClassVar[str] = "strata.work.execution.jobs.{priority}"
    job_id: str
    priority: int
