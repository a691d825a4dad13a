"""Jobs: what the API and the worker do with the ``jobs`` table, one state machine for both.

States: ``queued → running → succeeded | failed | cancelled | timed_out``, plus ``cancelling`` (asked, not yet
confirmed by the engine). Every transition is a conditional ``UPDATE ... WHERE state IN (...)``: of the API, the
worker and the reaper (in any replica) exactly one wins a race, and only the winner stages the event, in the same
transaction, through the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from nats.js import api as js_api
from sqlalchemy import Select, and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from strata.common.app import Runtime
from strata.common.contracts.auth import Identity, Role
from strata.common.contracts.datasets import ResolvedTable, ResolveRequest, ResolveResponse
from strata.common.contracts.execution import (
    FINAL_STATES,
    JOB_EVENT_PREFIX,
    JobEvent,
    JobRequested,
    job_events_filter,
    state_events_filter,
    work_subject,
)
from strata.common.contracts.realtime import ReadCheck, ReadVerdict
from strata.common.db import utcnow
from strata.common.errors import BadRequest, Conflict, NotFound, StrataError
from strata.common.events import EVENTS_STREAM, CloudEvent, source_of
from strata.common.pagination import decode_cursor, encode_cursor

from .config import Settings
from .engines.base import Analysis, ParameterError, QueryError, TableNotFound
from .models import Job
from .schemas import JobError, JobEventOut, JobEventsOut, JobOut, QueryIn, ResultInfo

SOURCE = source_of("execution")
log = logging.getLogger(__name__)
IDEMPOTENCY_WINDOW = timedelta(days=1)


class JobNotFound(NotFound):
    code, default_message = "JOB_NOT_FOUND", "No such job."


class JobFinished(Conflict):
    code, default_message = "JOB_FINISHED", "The job has already ended."


class ResultsNotAvailable(Conflict):
    code, default_message = "RESULTS_NOT_AVAILABLE", "The job has no results."


class ResultsExpired(StrataError):
    status, code, default_message = 410, "RESULTS_EXPIRED", "The results were deleted when their retention ended."


class QueryRejected(StrataError):
    """A :class:`QueryError` found at submit time, as an HTTP error with the same code, status and position."""

    def __init__(self, error: QueryError) -> None:
        self.status = error.status  # type: ignore[misc]  # per instance: the engine error decides
        self.code = error.code  # type: ignore[misc]
        detail = {k: v for k, v in error.to_dict().items() if k not in {"code", "message", "status"}}
        super().__init__(error.message, details=[detail] if detail else None)


# -- reading -----------------------------------------------------------------------------------------------------
def can_read(identity: Identity, job: Job) -> bool:
    return job.owner_id == identity.user_id or identity.role == Role.admin


async def read_verdict(session: AsyncSession, check: ReadCheck) -> ReadVerdict:
    """``rpc.execution.can_read_job``: the rule of :func:`get_job`, as a verdict (an unknown or malformed id, or
    another user's job, is simply not readable)."""
    identity = Identity(user_id=check.user_id, role=check.role)
    try:
        job = await get_job(session, identity, check.resource_id)
    except JobNotFound:
        return ReadVerdict(readable=False)
    return ReadVerdict(readable=True, owner_id=job.owner_id)


async def get_job(session: AsyncSession, identity: Identity, job_id: str) -> Job:
    """The job if the caller may read it; another user's job is "not found" (its existence is not revealed)."""
    try:
        uuid.UUID(job_id)
    except ValueError:
        raise JobNotFound() from None
    job = await session.get(Job, job_id)
    if job is None or not can_read(identity, job):
        raise JobNotFound()
    return job


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None:
        return None
    return round(((end or utcnow()) - start).total_seconds(), 4)


def job_out(job: Job) -> JobOut:
    result = None
    if job.state == "succeeded" and job.result_rows is not None:
        result = ResultInfo(
            rows=job.result_rows,
            bytes=job.result_bytes or 0,
            columns=job.result_columns or [],
            truncated=job.truncated,
            expires_at=job.results_expire_at,
            deleted_at=job.results_deleted_at,
        )
    datasets = [
        {k: t.get(k) for k in ("ref", "dataset_id", "name", "owner_id", "version", "rows")}
        for t in (job.tables or {}).values()
    ]
    return JobOut(
        id=job.id,
        kind=job.kind,
        engine=job.engine,
        state=job.state,
        owner_id=job.owner_id,
        priority=job.priority,
        sql=job.sql,
        parameters=job.parameters or {},
        label=job.label,
        datasets=datasets,
        request_id=job.request_id,
        timeout_s=job.timeout_s,
        max_rows=job.max_rows,
        progress=job.progress,
        attempts=job.attempts,
        created_at=job.created_at,
        deadline_at=job.deadline_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        queued_s=_seconds(job.created_at, job.started_at or job.finished_at),
        run_s=_seconds(job.started_at, job.finished_at),
        result=result,
        error=JobError.model_validate(job.error) if job.error else None,
        timed_out_in=job.timed_out_in,
        stats=job.stats or {},
    )


def list_query(
    identity: Identity,
    *,
    scope: str,
    states: Sequence[str],
    kind: str | None,
    engine: str | None,
    created_after: datetime | None,
    created_before: datetime | None,
    cursor: str | None,
    limit: int,
) -> Select[Job]:
    """Newest first, keyset-paged on (created_at, id)."""
    query = select(Job)
    if scope != "all" or identity.role != Role.admin:
        query = query.where(Job.owner_id == identity.user_id)
    if states:
        query = query.where(Job.state.in_(states))
    if kind:
        query = query.where(Job.kind == kind)
    if engine:
        query = query.where(Job.engine == engine)
    if created_after:
        query = query.where(Job.created_at >= created_after)
    if created_before:
        query = query.where(Job.created_at < created_before)
    if cursor:
        at, last_id = decode_cursor(cursor)
        try:
            when = datetime.fromisoformat(at)
        except ValueError:
            raise BadRequest("The cursor is not valid.", details=[{"loc": ["query", "cursor"]}]) from None
        query = query.where(or_(Job.created_at < when, and_(Job.created_at == when, Job.id < last_id)))
    return query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)


def next_cursor(rows: list[Job], limit: int) -> str | None:
    if len(rows) <= limit:
        return None
    last = rows[limit - 1]
    return encode_cursor([last.created_at.isoformat(), last.id])


# -- events --------------------------------------------------------------------------------------------------------
def job_event(job: Job, state: str, **extra: Any) -> CloudEvent:
    payload = JobEvent(
        job_id=job.id,
        owner_id=job.owner_id,
        kind=job.kind,
        engine=job.engine,
        state=state,
        attempt=job.attempts,
        dataset_ids=list(job.dataset_ids or []),
        **extra,
    )
    return CloudEvent.of(payload, source=SOURCE, subject=job.id, type=f"{JOB_EVENT_PREFIX}.{state}")


def work_item(job: Job) -> CloudEvent:
    event = CloudEvent.of(
        JobRequested(job_id=job.id, priority=job.priority),
        source=SOURCE,
        subject=job.id,
        type=work_subject(job.priority),
    )
    event.id = f"job-{job.id}"  # Nats-Msg-Id: a re-staged item within the dedup window is dropped
    return event


async def transition(
    runtime: Runtime,
    session: AsyncSession,
    job: Job,
    *,
    from_states: Iterable[str],
    to_state: str,
    event_extra: dict[str, Any] | None = None,
    **values: Any,
) -> bool:
    """Move ``job`` to ``to_state`` if it is still in one of ``from_states``; stage the event if this call won."""
    values = {"state": to_state, **values}
    if to_state in FINAL_STATES:
        values.setdefault("finished_at", utcnow())
    result = await session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state.in_(list(from_states)))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        return False
    for key, value in values.items():
        setattr(job, key, value)
    extra = dict(event_extra or {})
    if to_state == "succeeded":
        extra.update(rows=job.result_rows, bytes=job.result_bytes, truncated=job.truncated)
    if job.error and to_state in {"failed", "timed_out"}:
        extra.setdefault("error", job.error)
    if job.timed_out_in and to_state == "timed_out":
        extra.setdefault("timed_out_in", job.timed_out_in)
    runtime.stage(session, job_event(job, to_state, **extra))
    return True


# -- submit ----------------------------------------------------------------------------------------------------------
async def resolve_tables(runtime: Runtime, identity: Identity, analysis: Analysis) -> dict[str, ResolvedTable]:
    refs = list(dict.fromkeys(t.ref for t in analysis.tables))
    if not refs:
        return {}
    response = await runtime.rpc_client.call(
        "datasets",
        "resolve",
        ResolveRequest(user_id=identity.user_id, role=identity.role, refs=refs),
        ResolveResponse,
        timeout_s=5.0,
    )
    if response.missing:
        names = ", ".join(response.missing)
        raise QueryRejected(
            TableNotFound(
                f'Table not found: {names}. Tables are your datasets by name, "<owner id>".name, or a dataset id.',
                tables=response.missing,
            )
        )
    return {t.ref: t for t in response.tables}


def check_parameters(analysis: Analysis, given: dict[str, Any]) -> None:
    missing = [p for p in analysis.parameters if p not in given]
    unused = [p for p in given if p not in analysis.parameters]
    if missing:
        raise QueryRejected(ParameterError(f"Missing parameter(s): {', '.join(missing)}.", parameters=missing))
    if unused:
        raise QueryRejected(
            ParameterError(f"Parameter(s) not used by the statement: {', '.join(unused)}.", parameters=unused)
        )


async def existing_for_request(session: AsyncSession, owner_id: str, request_id: str) -> Job | None:
    job = await session.scalar(select(Job).where(Job.owner_id == owner_id, Job.request_id == request_id))
    if job is not None and utcnow() - job.created_at <= IDEMPOTENCY_WINDOW:
        return job
    return None


def new_job(
    identity: Identity, body: QueryIn, settings: Settings, tables: dict[str, ResolvedTable], request_id: str | None
) -> Job:
    now = utcnow()
    timeout_s = min(body.timeout_s or settings.default_timeout_s, settings.max_timeout_s)
    job = Job(
        id=str(uuid.uuid4()),
        owner_id=identity.user_id,
        kind="query",
        engine=body.engine,
        state="queued",
        priority=body.priority,
        request_id=request_id,
        sql=body.sql,
        parameters=dict(body.parameters),
        tables={ref: t.model_dump(mode="json") for ref, t in tables.items()},
        dataset_ids=sorted({t.dataset_id for t in tables.values()}),
        timeout_s=timeout_s,
        max_rows=min(body.max_rows or settings.default_max_rows, settings.max_rows_limit),
        created_at=now,
        deadline_at=now + timedelta(seconds=timeout_s),
        attempts=0,
        truncated=False,
        result_secret=secrets.token_hex(16),
        stats={},
        label=body.label,
    )
    return job


def stage_new_job(runtime: Runtime, session: AsyncSession, job: Job) -> None:
    session.add(job)
    runtime.stage(session, job_event(job, "queued"))
    runtime.stage(session, work_item(job))


# -- waiting for a job -----------------------------------------------------------------------------------------------
class JobWatcher:
    """Wakes waiters (``wait_ms``) when a job reaches a final state: told directly by this replica's worker, and by
    the job events of every replica (a core subscription; the events come through the outbox)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._waiters: dict[str, set[_Waiter]] = defaultdict(set)
        self._subs: list[Any] = []

    async def start(self) -> None:
        self.runtime.bus.on_connect(self._subscribe)
        if self.runtime.bus.is_connected:
            await self._subscribe()

    async def _subscribe(self) -> None:
        if not self._subs:  # core subscriptions survive reconnects on their own; progress events are not wanted
            nc = self.runtime.bus.nc
            self._subs = [await nc.subscribe(state_events_filter(s), cb=self._on_event) for s in FINAL_STATES]

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_event(self, msg: Any) -> None:
        self.notify(msg.subject.rsplit(".", 1)[-1])

    def notify(self, job_id: str, job: Job | None = None) -> None:
        """Wake the waiters of ``job_id``; ``job`` is the ended job as this replica's worker left it (saves a read)."""
        for waiter in self._waiters.get(job_id, ()):
            waiter.job = job
            waiter.set()

    async def wait(self, job_id: str, timeout_s: float) -> Job | bool:
        """The ended job when this replica's worker says so, True when woken otherwise (re-read the job), False
        after ``timeout_s``."""
        waiter = _Waiter()
        self._waiters[job_id].add(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                await waiter.wait()
            return waiter.job if waiter.job is not None else True
        except TimeoutError:
            return False
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[job_id]


class _Waiter(asyncio.Event):
    job: Job | None = None


# -- the job's events, from JetStream --------------------------------------------------------------------------------
async def read_events(runtime: Runtime, job_id: str, *, after: int, limit: int) -> JobEventsOut:
    """The job's events after stream sequence ``after``, in order: an ephemeral consumer filtered on the job's
    subjects, so the server reads only this job's messages."""
    js = runtime.bus.js
    info = await js.stream_info(EVENTS_STREAM)
    first_seq, last_seq = info.state.first_seq, info.state.last_seq
    recovered = after + 1 >= first_seq or after == 0
    events: list[JobEventOut] = []
    if last_seq > after:
        config = js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(after + 1, first_seq),
            ack_policy=js_api.AckPolicy.NONE,
            inactive_threshold=10.0,
            mem_storage=True,
            num_replicas=1,
        )
        sub = await js.pull_subscribe(job_events_filter(job_id), stream=EVENTS_STREAM, config=config)
        try:
            pending = limit
            while pending > 0:
                try:
                    msgs = await sub.fetch(min(pending, 256), timeout=0.25)
                except TimeoutError:
                    break
                for msg in msgs:
                    body = json.loads(msg.data)
                    events.append(
                        JobEventOut(
                            seq=msg.metadata.sequence.stream,
                            type=body.get("type", ""),
                            time=body.get("time"),
                            event=body,
                        )
                    )
                pending -= len(msgs)
                if msgs and msgs[-1].metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    return JobEventsOut(
        job_id=job_id,
        events=events,
        last_seq=events[-1].seq if events else max(after, 0),
        recovered=recovered,
    )
