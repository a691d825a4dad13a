"""The execution API: ``/api/v1/queries``, ``/api/v1/jobs`` and the block catalogue ``/api/v1/blocks``."""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi import Path as Path_
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.exc import IntegrityError

from strata.common.contracts.datasets import ResolvedTable
from strata.common.contracts.execution import FINAL_STATES, JobState
from strata.common.db import utcnow
from strata.common.deps import AnalystUser, CurrentUser, RuntimeDep, SessionDep
from strata.common.errors import BadRequest, Forbidden, NotFound
from strata.common.storage import Storage

from . import jobs, results
from .blocks import registry as block_registry
from .blocks.base import Block
from .config import Settings
from .engines.base import Analysis, Engine, QueryError, RunSpec
from .examples import EXAMPLES
from .jobs import JobFinished, JobWatcher, QueryRejected, ResultsExpired, ResultsNotAvailable
from .models import Job
from .schemas import BlockOut, BlockPage, ExampleQuery, JobEventsOut, JobOut, JobPage, QueryIn, QueryPlan, ResultPageOut

router = APIRouter(prefix="/api/v1", tags=["execution"])


@dataclasses.dataclass
class Services:
    settings: Settings
    storage: Storage
    engines: dict[str, Engine]
    watcher: JobWatcher


def get_services(request: Request) -> Services:
    services: Services = request.state.execution
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def _analyze(engine: Engine, sql: str) -> Analysis:
    try:
        return engine.analyze(sql)
    except QueryError as exc:
        raise QueryRejected(exc) from None


@router.post(
    "/queries",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut | QueryPlan,
    responses={200: {"description": "The job ended within `wait_ms` (or a dry run's plan)"}},
    summary="Run a SQL query as a job",
)
async def submit_query(body: QueryIn, identity: AnalystUser, runtime: RuntimeDep, services: ServicesDep) -> Any:
    """Queue one read-only statement over your datasets. Answers `202` with the queued job, or `200` with the ended
    job when it ends within `wait_ms`. `dry_run` answers `200` with the output columns and the engine's plan."""
    assert runtime.db is not None
    settings = services.settings
    if len(body.sql.encode()) > settings.max_sql_bytes:
        raise BadRequest(f"The statement is longer than {settings.max_sql_bytes} bytes.")
    if body.request_id:
        async with runtime.db.session() as session:
            existing = await jobs.existing_for_request(session, identity.user_id, body.request_id)
        if existing is not None:
            return await _answer(existing, body.wait_ms, runtime, services)
    engine = services.engines[body.engine]
    analysis = _analyze(engine, body.sql)
    jobs.check_parameters(analysis, body.parameters)
    tables = await jobs.resolve_tables(runtime, identity, analysis)
    if body.dry_run:
        return await _dry_run(engine, body, analysis, tables)
    job = jobs.new_job(identity, body, settings, tables, body.request_id)
    try:
        # Its own session, committed here: the commit wakes the outbox relay, which queues the job at once.
        async with runtime.db.session() as session:
            jobs.stage_new_job(runtime, session, job)
    except IntegrityError:  # the same request_id, submitted concurrently: the first one wins
        async with runtime.db.session() as session:
            existing = await jobs.existing_for_request(session, identity.user_id, body.request_id or "")
        if existing is None:
            raise
        job = existing
    return await _answer(job, body.wait_ms, runtime, services)


async def _answer(job: Job, wait_ms: int, runtime: RuntimeDep, services: Services) -> JSONResponse:
    wait_s = min(wait_ms, services.settings.max_wait_ms) / 1000
    if wait_s > 0 and job.state not in FINAL_STATES:
        job = await _wait(job.id, wait_s, runtime, services)
    code = status.HTTP_200_OK if job.state in FINAL_STATES else status.HTTP_202_ACCEPTED
    return JSONResponse(jobs.job_out(job).model_dump(mode="json"), status_code=code)


async def _wait(job_id: str, wait_s: float, runtime: RuntimeDep, services: Services) -> Job:
    """Wait for a final state (woken by this replica's worker or any replica's event; a slow poll as a backstop)."""
    assert runtime.db is not None
    deadline = time.monotonic() + wait_s
    while True:
        async with runtime.db.session() as session:
            job = await session.get(Job, job_id)
            assert job is not None
        remaining = deadline - time.monotonic()
        if job.state in FINAL_STATES or remaining <= 0:
            return job
        woken = await services.watcher.wait(job_id, min(remaining, 1.0))
        if isinstance(woken, Job) and woken.state in FINAL_STATES:
            return woken  # as this replica's worker committed it: no need to read it back


async def _dry_run(engine: Engine, body: QueryIn, analysis: Analysis, tables: dict[str, ResolvedTable]) -> JSONResponse:
    with tempfile.TemporaryDirectory(prefix="strata-dry-") as tmp:
        spec = RunSpec(
            query_id="dry-run",
            sql=body.sql,
            parameters=dict(body.parameters),
            tables=tables,
            output=Path(tmp) / "none.parquet",
            max_rows=1,
            timeout_s=30.0,
            dry_run=True,
        )

        def plan() -> Any:
            return engine.start(spec).run()

        try:
            result = await asyncio.to_thread(plan)
        except QueryError as exc:
            raise QueryRejected(exc) from None
    out = QueryPlan(
        engine=body.engine,
        kind=analysis.kind,
        columns=result.columns,
        plan=result.plan,
        datasets=[
            {"ref": t.ref, "dataset_id": t.dataset_id, "name": t.name, "version": t.version} for t in tables.values()
        ],
        parameters=list(analysis.parameters),
    )
    return JSONResponse(out.model_dump(mode="json"), status_code=status.HTTP_200_OK)


@router.get("/queries/examples", response_model=list[ExampleQuery], summary="Queries that run on the demo datasets")
async def query_examples(_: CurrentUser) -> list[ExampleQuery]:
    return list(EXAMPLES)


class BlockNotFound(NotFound):
    code = "BLOCK_NOT_FOUND"


def _block_out(block: Block) -> BlockOut:
    return BlockOut.model_validate(block.describe())


@router.get("/blocks", response_model=BlockPage, summary="Analysis blocks: the latest version of each")
async def list_blocks(
    _: CurrentUser,
    category: Annotated[str | None, Query(max_length=64, description="Only this category")] = None,
    version: Annotated[int | None, Query(ge=1, description="Only blocks that have this version")] = None,
) -> BlockPage:
    blocks = block_registry.list(category)
    if version is not None:
        blocks = [b for b in (_version_of(b.id, version) for b in blocks) if b is not None]
    data = [_block_out(b) for b in blocks]
    return BlockPage(
        data=data, meta={"next_cursor": None, "limit": len(data), "categories": block_registry.categories()}
    )


def _version_of(block_id: str, version: int) -> Block | None:
    try:
        return block_registry.get(block_id, version)
    except block_registry.UnknownBlock:
        return None


@router.get("/blocks/{block_id}", response_model=BlockOut, summary="One block: its inputs and JSON Schemas")
async def get_block(
    block_id: Annotated[str, Path_(max_length=100)],
    _: CurrentUser,
    version: Annotated[int | None, Query(ge=1, description="A version; the latest when left out")] = None,
) -> BlockOut:
    try:
        return _block_out(block_registry.get(block_id, version))
    except block_registry.UnknownBlock as exc:
        raise BlockNotFound(str(exc)) from None


@router.get("/jobs", response_model=JobPage, summary="Your jobs, newest first")
async def list_jobs(
    identity: CurrentUser,
    session: SessionDep,
    state: Annotated[list[JobState] | None, Query(description="Any of these states")] = None,
    kind: Literal["query"] | None = None,
    engine: Literal["duckdb", "clickhouse"] | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    scope: Annotated[Literal["mine", "all"], Query(description="`all`: every user's jobs (admins only)")] = "mine",
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobPage:
    if scope == "all" and identity.role.value != "admin":
        raise Forbidden("Only admins list every user's jobs.")
    for name, value in (("created_after", created_after), ("created_before", created_before)):
        if value is not None and value.tzinfo is None:
            raise BadRequest(
                f"{name} needs a time zone (e.g. 2026-11-22T10:00:00Z).", details=[{"loc": ["query", name]}]
            )
    query = jobs.list_query(
        identity,
        scope=scope,
        states=state or [],
        kind=kind,
        engine=engine,
        created_after=created_after,
        created_before=created_before,
        cursor=cursor,
        limit=limit,
    )
    rows = list((await session.scalars(query)).all())
    return JobPage(items=[jobs.job_out(j) for j in rows[:limit]], next_cursor=jobs.next_cursor(rows, limit))


@router.get("/jobs/{job_id}", response_model=JobOut, summary="A job: state, progress, timings, result, error")
async def get_job(job_id: str, identity: CurrentUser, session: SessionDep) -> JobOut:
    return jobs.job_out(await jobs.get_job(session, identity, job_id))


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel a job",
    responses={200: {"description": "Cancelled"}, 202: {"description": "Cancelling: the engine is being stopped"}},
)
async def cancel_job(
    job_id: str,
    identity: CurrentUser,
    runtime: RuntimeDep,
    services: ServicesDep,
    wait_ms: Annotated[int, Query(ge=0, description="Wait up to this long for the engine to confirm")] = 0,
) -> JSONResponse:
    """A queued job is cancelled at once (it never runs); a running one goes to `cancelling` while its engine is
    interrupted, then `cancelled`. Cancelling again is harmless; cancelling a job that ended otherwise is a 409."""
    assert runtime.db is not None
    async with runtime.db.session() as session:
        job = await jobs.get_job(session, identity, job_id)
        for _ in range(3):  # a race with the worker (it took or ended the job meanwhile): look again
            target = {"queued": "cancelled", "running": "cancelling"}.get(job.state)
            if target is None or await jobs.transition(
                runtime, session, job, from_states=[job.state], to_state=target, cancel_requested_at=utcnow()
            ):
                break
            await session.refresh(job)
        if job.state in FINAL_STATES and job.state != "cancelled":
            raise JobFinished(f"The job has already ended: it {job.state.replace('_', ' ')}.")
    services.watcher.notify(job.id)
    return await _answer(job, wait_ms, runtime, services)


def _readable_result(job: Job) -> str:
    if job.state != "succeeded":
        state = job.state.replace("_", " ")
        raise ResultsNotAvailable(
            f"The job has no results: it {'is ' if job.state not in FINAL_STATES else ''}{state}."
        )
    if job.results_deleted_at is not None or job.result_key is None:
        raise ResultsExpired()
    return job.result_key


@router.get("/jobs/{job_id}/results", response_model=ResultPageOut, summary="A page of the job's result rows")
async def job_results(
    job_id: str,
    identity: CurrentUser,
    session: SessionDep,
    services: ServicesDep,
    page_token: str | None = None,
    limit: Annotated[int, Query(ge=1)] = 1000,
) -> ResultPageOut:
    job = await jobs.get_job(session, identity, job_id)
    key = _readable_result(job)
    offset = results.read_page_token(page_token, job.id, job.result_secret) if page_token else 0
    page = await results.read_page(
        services.storage, key, offset=offset, limit=min(limit, services.settings.results_page_max)
    )
    token = (
        results.make_page_token(job.id, job.result_secret, page.next_offset) if page.next_offset is not None else None
    )
    return ResultPageOut(
        job_id=job.id,
        columns=page.columns,
        rows=page.rows,
        offset=page.offset,
        total_rows=page.total_rows,
        truncated=job.truncated,
        next_page_token=token,
    )


@router.get(
    "/jobs/{job_id}/results/download",
    summary="The whole result as a file",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}, "application/vnd.apache.parquet": {}, "application/json": {}}}},
)
async def download_results(
    job_id: str,
    identity: CurrentUser,
    session: SessionDep,
    services: ServicesDep,
    format: Annotated[str, Query(description="csv, parquet, arrow, json or ndjson")] = "csv",
) -> StreamingResponse:
    job = await jobs.get_job(session, identity, job_id)
    key = _readable_result(job)
    if not await services.storage.exists(key):  # decided before the response starts: a 410, not a cut stream
        raise ResultsExpired("The result file is gone.")
    download = results.download(services.storage, key, format, filename_stem=f"job-{job.id[:8]}")
    return StreamingResponse(
        download.body,
        media_type=download.media_type,
        headers={"Content-Disposition": f'attachment; filename="{download.filename}"'},
    )


@router.get("/jobs/{job_id}/events", response_model=JobEventsOut, summary="The job's events, in stream order")
async def job_events(
    job_id: str,
    identity: CurrentUser,
    session: SessionDep,
    runtime: RuntimeDep,
    after: Annotated[int, Query(ge=0, description="A stream sequence: events after it")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> JobEventsOut:
    job = await jobs.get_job(session, identity, job_id)
    return await jobs.read_events(runtime, job.id, after=after, limit=limit)
