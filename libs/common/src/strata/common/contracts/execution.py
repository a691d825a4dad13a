"""The execution service's contract: job events and the work item on ``strata.work.execution.jobs.p<priority>``.

Job events are keyed: they are published on ``<type>.<job id>`` (``strata.execution.job.succeeded.<id>``), so a
reader follows one job with the filter ``strata.execution.job.*.<id>`` (``GET /jobs/{id}/events``, the WebSocket).
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
    return f"{JOB_EVENT_PREFIX}.*.{job_id}"


class JobEvent(EventPayload):
    """A state change of a job, durable (through the outbox). ``event_type`` is ``strata.execution.job.<state>``."""

    event_type: ClassVar[str] = "strata.execution.job.{state}"
    keyed: ClassVar[bool] = True
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
    keyed: ClassVar[bool] = True
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
