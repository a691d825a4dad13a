"""The job worker: takes jobs from the JetStream work queue by priority, runs them in an engine, heartbeats, reports
progress, honours cancel and deadlines, and writes results once to storage. Plus the reaper that closes what a
vanished worker left behind, and deletes results past their retention.

Priority: one durable consumer per priority (``execution-jobs-p1`` .. ``-p5`` on ``strata.work.execution.jobs.p<n>``).
A free slot asks the consumers in order with a no-wait pull (one round trip each, answered at once), so it takes the
oldest job of the most urgent priority there is. When every queue is empty the slot sleeps until a doorbell (a core
subscription to the work subjects: JetStream messages are ordinary NATS messages too) or a one-second poll, which
also picks up redeliveries.

Durability: a taken job's message stays unacknowledged while it runs and is kept alive with ``in_progress``. If the
replica dies, JetStream hands the message to another replica after ``ack_wait_s``; the job is claimed again (one more
attempt) or failed once ``max_attempts`` are used up. The reaper closes running jobs whose heartbeat is older than
``stale_after_s`` (their message is gone too), and queued jobs past their deadline. No job stays running forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import select, update

from strata.common.app import Runtime
from strata.common.contracts.datasets import ResolvedTable
from strata.common.contracts.execution import (
    PRIORITIES,
    WORK_SUBJECT_PREFIX,
    JobProgress,
    JobRequested,
    state_events_filter,
    work_subject,
)
from strata.common.db import utcnow
from strata.common.events import WORK_STREAM, CloudEvent
from strata.common.observability import LATENCY_BUCKETS, Metrics
from strata.common.storage import Storage

from .config import Settings
from .engines.base import Engine, Execution, Interrupted, QueryError, RunResult, RunSpec
from .jobs import SOURCE, JobWatcher, transition
from .models import Job

log = logging.getLogger(__name__)
CONSUMER = "execution-jobs"
ACTIVE = ("running", "cancelling")
NO_WAIT_PULL = b'{"batch":1,"no_wait":true}'


def consumer_name(priority: int) -> str:
    return f"{CONSUMER}-p{priority}"


def result_key(job_id: str) -> str:
    return f"results/{job_id}/result.parquet"


class WorkerMetrics:
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.jobs = Counter(
            "strata_jobs_finished_total",
            "Jobs that ended, by kind, engine and state.",
            ["kind", "engine", "state"],
            registry=r,
        )
        self.run_seconds = Histogram(
            "strata_job_run_seconds",
            "Time from a job's start to its end on this replica, by kind and engine.",
            ["kind", "engine"],
            buckets=(*LATENCY_BUCKETS, 30.0, 60.0, 300.0, 900.0, 3600.0),
            registry=r,
        )
        self.queue_seconds = Histogram(
            "strata_job_queue_seconds",
            "Time a job waited in the queue before a worker took it.",
            ["priority"],
            buckets=(*LATENCY_BUCKETS, 30.0, 60.0, 300.0),
            registry=r,
        )
        self.running = Gauge("strata_jobs_running", "Jobs running on this replica.", registry=r)
        self.slots = Gauge("strata_job_slots", "Jobs this replica runs at once.", registry=r)
        self.reaped = Counter(
            "strata_jobs_reaped_total", "Jobs closed by the reaper, by reason.", ["reason"], registry=r
        )


@dataclass
class RunningJob:
    job_id: str
    execution: Execution | None = None
    stop_reason: str | None = None  # cancel | timeout | shutdown
    started: float = field(default_factory=time.monotonic)

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.execution is not None:
            self.execution.cancel()


class Worker:
    def __init__(
        self,
        *,
        runtime: Runtime,
        settings: Settings,
        storage: Storage,
        engines: dict[str, Engine],
        watcher: JobWatcher,
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.storage = storage
        self.engines = engines
        self.watcher = watcher
        self.metrics = WorkerMetrics(runtime.metrics)
        self.running: dict[str, RunningJob] = {}
        self._doorbell = asyncio.Event()
        self._idle = asyncio.Event()  # set while no job runs here
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[Any] = []
        self._inboxes: dict[int, tuple[str, Any]] = {}
        self._declared = False
        self._stopping = False
        self.workdir = settings.service_dir / "work"

    @property
    def db(self) -> Any:
        assert self.runtime.db is not None
        return self.runtime.db

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(shutil.rmtree, self.workdir, True)  # what a previous process left
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.runtime.bus.on_connect(self._on_connect)
        if self.runtime.bus.is_connected:
            await self._on_connect()
        self.metrics.slots.set(self.settings.workers)
        for n in range(self.settings.workers):
            self._tasks.append(asyncio.create_task(self._slot(n), name=f"job-slot-{n}"))
        self._tasks.append(asyncio.create_task(self._reaper(), name="job-reaper"))
        self._tasks.append(asyncio.create_task(self._gauges(), name="job-gauges"))

    async def _on_connect(self) -> None:
        """After every (re)connect: declare the consumers, ring the doorbell on new work, listen for cancels."""
        js = self.runtime.bus.js
        for priority in PRIORITIES:
            await declare_consumer(js, priority, self.settings)
        self._declared = True
        nc = self.runtime.bus.nc
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs = [
            await nc.subscribe(f"{WORK_SUBJECT_PREFIX}.>", cb=self._ring),
            await nc.subscribe(state_events_filter("cancelling"), cb=self._on_cancelling),
        ]
        self._doorbell.set()

    async def stop(self) -> None:
        """Stop taking jobs; interrupt running ones and hand them back to the queue for another replica."""
        self._stopping = True
        for running in list(self.running.values()):
            running.stop("shutdown")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 5.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _ring(self, _msg: Any) -> None:
        self._doorbell.set()

    async def _on_cancelling(self, msg: Any) -> None:
        job_id = msg.subject.rsplit(".", 1)[-1]
        running = self.running.get(job_id)
        if running is not None:
            log.info("cancelling job %s on request", job_id)
            running.stop("cancel")

    # -- taking jobs -------------------------------------------------------------------------------------------------
    async def _slot(self, n: int) -> None:
        while not self._stopping:
            try:
                msg = await self._take(n)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the bus is down or busy: wait, then ask again
                log.debug("slot %d could not take a job: %s", n, exc)
                msg = None
                await asyncio.sleep(1.0)
            if msg is not None and self._stopping:  # taken while stopping: straight back to the queue
                with contextlib.suppress(Exception):
                    await msg.nak(delay=0)
                break
            if msg is None:
                self._doorbell.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._doorbell.wait(), 1.0)
                continue
            try:
                await self._handle(msg)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("slot %d: handling a job failed; the queue will redeliver it", n)

    async def _take(self, n: int) -> Any | None:
        """The next job message, most urgent priority first; None when every queue is empty.

        A no-wait pull per priority, answered on the slot's own inbox: JetStream delivers a message with its original
        subject, so nats-py's ``request()`` (which routes replies by subject) would never see it.
        """
        if not self.runtime.bus.is_connected or not self._declared:
            return None
        nc = self.runtime.bus.nc
        inbox = self._inboxes.get(n)
        if inbox is None:
            subject = nc.new_inbox()
            inbox = self._inboxes[n] = (subject, await nc.subscribe(subject))
        reply, sub = inbox
        for priority in PRIORITIES:
            await nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{WORK_STREAM}.{consumer_name(priority)}", NO_WAIT_PULL, reply=reply
            )
            while True:
                msg = await sub.next_msg(timeout=2.0)
                status = JetStreamContext.is_status_msg(msg)
                if status is None:
                    return msg
                if status in ("404", "408", "409"):  # no messages (or a stale answer to an earlier pull)
                    break
                raise RuntimeError(f"pull from {consumer_name(priority)} answered {status}")
        return None

    async def _handle(self, msg: Any) -> None:
        try:
            item = CloudEvent.model_validate_json(msg.data).payload(JobRequested)
        except Exception:
            log.error("dropping a work item that is not a job request: %r", msg.data[:200])
            await msg.term()
            return
        delivered = msg.metadata.num_delivered
        job = await self._claim(item.job_id, delivered)
        if job is None:
            await msg.ack_sync()
            return
        if job == "busy":
            await msg.nak(delay=self.settings.ack_wait_s)
            return
        assert isinstance(job, Job)
        self.metrics.queue_seconds.labels(str(job.priority)).observe((utcnow() - job.created_at).total_seconds())
        outcome = await self._run(job, msg)
        if outcome == "requeue":
            await msg.nak(delay=0)
        else:
            await msg.ack_sync()

    async def _claim(self, job_id: str, delivered: int) -> Job | str | None:
        """Mark the job running on this replica; None when there is nothing to run (and the message is done)."""
        async with self.db.session() as session:
            job: Job | None = await session.get(Job, job_id)
            if job is None or job.state not in ("queued", "running", "cancelling"):
                return None
            now = utcnow()
            if job.state == "cancelling":
                await transition(self.runtime, session, job, from_states=["cancelling"], to_state="cancelled")
                return None
            if now >= job.deadline_at:
                await self._time_out(session, job, part="queue" if job.started_at is None else "run")
                return None
            if job.id in self.running:
                return "busy"  # running here: a redelivery after a stall of this process
            if job.state == "running":
                fresh = job.heartbeat_at is not None and now - job.heartbeat_at < timedelta(
                    seconds=self.settings.ack_wait_s
                )
                if fresh and job.worker_id != self.settings.instance_id:
                    return "busy"  # its worker is alive: a duplicate delivery
            if job.attempts >= self.settings.max_attempts:
                job.error = {
                    "code": "WORKER_LOST",
                    "message": f"The job was started {job.attempts} times and its worker stopped each time "
                    "(a crash, or the engine running out of memory). Narrow the query or raise the limits.",
                    "status": 500,
                }
                await transition(
                    self.runtime, session, job, from_states=[job.state], to_state="failed", error=job.error
                )
                return None
            won = await transition(
                self.runtime,
                session,
                job,
                from_states=[job.state],
                to_state="running",
                attempts=job.attempts + 1,
                worker_id=self.settings.instance_id,
                started_at=job.started_at or now,
                heartbeat_at=now,
            )
            if not won:
                return None
            log.info(
                "job %s taken (attempt %d of %d, delivery %d)",
                job.id,
                job.attempts,
                self.settings.max_attempts,
                delivered,
            )
            return job

    # -- running -----------------------------------------------------------------------------------------------------
    async def _run(self, job: Job, msg: Any) -> str:
        """Run the job to a final state; ``requeue`` when this replica is stopping and another should run it."""
        running = RunningJob(job.id)
        self.running[job.id] = running
        self._idle.clear()
        self.metrics.running.set(len(self.running))
        workdir = self.workdir / job.id
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            remaining = (job.deadline_at - utcnow()).total_seconds()
            spec = RunSpec(
                query_id=job.id,
                sql=job.sql,
                parameters=dict(job.parameters or {}),
                tables={ref: ResolvedTable.model_validate(t) for ref, t in (job.tables or {}).items()},
                output=workdir / "result.parquet",
                max_rows=job.max_rows,
                timeout_s=max(remaining, 0.001),
            )
            engine = self.engines[job.engine]
            running.execution = await asyncio.to_thread(engine.start, spec)
            if running.stop_reason is not None:  # cancelled while the engine was starting
                running.execution.cancel()
            task = asyncio.create_task(asyncio.to_thread(running.execution.run))
            await self._supervise(job, running, task, msg)
            try:
                result = task.result()
            except Interrupted:
                return await self._interrupted(job, running)
            except QueryError as exc:
                await self._finish(job, "failed", error=exc.to_dict())
                return "done"
            except Exception as exc:
                log.exception("job %s: the engine failed", job.id)
                return await self._internal_error(job, exc)
            if running.stop_reason is not None and running.stop_reason != "cancel":
                # It finished as it was being stopped: the result is good, keep it.
                log.info("job %s finished while being stopped (%s)", job.id, running.stop_reason)
            await self._succeed(job, spec.output, result)
            return "done"
        except Exception as exc:  # storage or database trouble around the run
            log.exception("job %s failed around its run", job.id)
            return await self._internal_error(job, exc)
        finally:
            self.running.pop(job.id, None)
            if not self.running:
                self._idle.set()
            self.metrics.running.set(len(self.running))
            self.metrics.run_seconds.labels(job.kind, job.engine).observe(time.monotonic() - started)
            await asyncio.to_thread(shutil.rmtree, workdir, True)
            self.watcher.notify(job.id)

    async def _supervise(self, job: Job, running: RunningJob, task: asyncio.Task[RunResult], msg: Any) -> None:
        """While the engine runs: the deadline, heartbeats to the queue and the table, progress events, cancel."""
        interval = self.settings.progress_interval_s
        keepalive_every = max(self.settings.ack_wait_s / 3, interval)
        beat_every = max(min(2.0, self.settings.stale_after_s / 4), interval)
        last_keepalive = last_beat = time.monotonic()
        last_progress: float | None = None
        assert running.execution is not None
        while not task.done():
            remaining = (job.deadline_at - utcnow()).total_seconds()
            await asyncio.wait({task}, timeout=max(min(interval, remaining), 0.0))
            if task.done():
                break
            now = time.monotonic()
            if (job.deadline_at - utcnow()).total_seconds() <= 0:
                running.stop("timeout")
            if now - last_keepalive >= keepalive_every:
                last_keepalive = now
                with contextlib.suppress(Exception):
                    await msg.in_progress()
            fraction = running.execution.progress()
            if fraction is not None and fraction != last_progress:
                last_progress = fraction
                await self._publish_progress(job, fraction, now - running.started)
            if now - last_beat >= beat_every:
                last_beat = now
                state = await self._beat(job.id, fraction)
                if state == "cancelling":
                    running.stop("cancel")
                elif state is None or state not in ("running", "cancelling"):
                    running.stop("cancel")  # closed by someone else (the reaper): stop spending on it

    async def _beat(self, job_id: str, fraction: float | None) -> str | None:
        try:
            async with self.db.session() as session:
                await session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state.in_(ACTIVE))
                    .values(heartbeat_at=utcnow(), progress=fraction)
                    .execution_options(synchronize_session=False)
                )
                state: str | None = await session.scalar(select(Job.state).where(Job.id == job_id))
                return state
        except Exception as exc:  # the database is busy: the next beat tries again
            log.warning("job %s heartbeat not written: %s", job_id, exc)
            return "running"

    async def _publish_progress(self, job: Job, fraction: float, elapsed: float) -> None:
        if not self.runtime.bus.is_connected:
            return
        event = CloudEvent.of(
            JobProgress(job_id=job.id, owner_id=job.owner_id, fraction=round(fraction, 4), elapsed_s=round(elapsed, 3)),
            source=SOURCE,
            subject=job.id,
        )
        try:
            await self.runtime.bus.publish_event(event, timeout_s=2)
        except Exception as exc:  # progress is best effort; state changes are the durable events
            log.debug("progress of job %s not sent: %s", job.id, exc)

    # -- endings -------------------------------------------------------------------------------------------------------
    async def _succeed(self, job: Job, output: Path, result: RunResult) -> None:
        key = result_key(job.id)
        size = await self.storage.put_file(output, key)
        now = utcnow()
        finished = await self._finish(
            job,
            "succeeded",
            from_states=ACTIVE,
            result_key=key,
            result_rows=result.rows,
            result_bytes=size,
            result_columns=result.columns,
            truncated=result.truncated,
            results_expire_at=now + timedelta(seconds=self.settings.results_ttl_s),
            stats={**result.stats, "attempts": job.attempts},
            progress=1.0,
        )
        if not finished:  # closed meanwhile (the reaper, after a long stall): the file is nobody's
            await self.storage.delete_prefix(f"results/{job.id}/")

    async def _interrupted(self, job: Job, running: RunningJob) -> str:
        reason = running.stop_reason
        if reason is None and (job.deadline_at - utcnow()).total_seconds() < 1.0:
            reason = "timeout"  # the engine's own time limit (max_execution_time) fired first
        if reason == "timeout":
            async with self.db.session() as session:
                await self._time_out(session, job, part="run")
            self.metrics.jobs.labels(job.kind, job.engine, "timed_out").inc()
            return "done"
        if reason == "shutdown":
            async with self.db.session() as session:
                # Handed back without counting the attempt: this replica stopped, the job did nothing wrong.
                await transition(
                    self.runtime,
                    session,
                    job,
                    from_states=["running"],
                    to_state="queued",
                    attempts=max(job.attempts - 1, 0),
                    worker_id=None,
                    heartbeat_at=None,
                    progress=None,
                )
            return "requeue"
        await self._finish(job, "cancelled", from_states=ACTIVE)
        return "done"

    async def _internal_error(self, job: Job, exc: Exception) -> str:
        if job.attempts >= self.settings.max_attempts:
            await self._finish(
                job,
                "failed",
                from_states=ACTIVE,
                error={
                    "code": "INTERNAL_ERROR",
                    "message": f"The job failed {job.attempts} times on an internal error ({type(exc).__name__}).",
                    "status": 500,
                },
            )
            return "done"
        async with self.db.session() as session:
            await transition(
                self.runtime, session, job, from_states=ACTIVE, to_state="queued", worker_id=None, heartbeat_at=None
            )
        return "requeue"

    async def _finish(self, job: Job, state: str, *, from_states: tuple[str, ...] = ACTIVE, **values: Any) -> bool:
        async with self.db.session() as session:
            won = await transition(self.runtime, session, job, from_states=from_states, to_state=state, **values)
        if won:
            self.watcher.notify(job.id, job)
            self.metrics.jobs.labels(job.kind, job.engine, state).inc()
            log.info("job %s %s", job.id, state)
        return won

    async def _time_out(self, session: Any, job: Job, *, part: str) -> bool:
        spent = "waiting in the queue" if part == "queue" else "running"
        error = {
            "code": "TIMED_OUT",
            "message": f"The job ran out of its {job.timeout_s:g} s deadline while {spent}.",
            "status": 408,
            "part": part,
        }
        return await transition(
            self.runtime,
            session,
            job,
            from_states=["queued", "running", "cancelling"],
            to_state="timed_out",
            timed_out_in=part,
            error=error,
        )

    # -- the reaper ----------------------------------------------------------------------------------------------------
    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reaper_interval_s)
            try:
                await self.reap()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reaper pass failed; trying again later")

    async def reap(self) -> dict[str, int]:
        """One pass: queued past deadline, running without a heartbeat, results past retention, old request ids."""
        counts = {"queue_timeout": 0, "worker_lost": 0, "results_deleted": 0}
        now = utcnow()
        stale = now - timedelta(seconds=self.settings.stale_after_s)
        async with self.db.session() as session:
            overdue = (
                await session.scalars(select(Job).where(Job.state == "queued", Job.deadline_at <= now).limit(200))
            ).all()
            for job in overdue:
                if await self._time_out(session, job, part="queue"):
                    counts["queue_timeout"] += 1
            lost = (
                await session.scalars(select(Job).where(Job.state.in_(ACTIVE), Job.heartbeat_at < stale).limit(200))
            ).all()
            for job in lost:
                if job.id in self.running:
                    continue
                if job.state == "cancelling":
                    won = await transition(self.runtime, session, job, from_states=["cancelling"], to_state="cancelled")
                elif job.deadline_at <= now:
                    won = await self._time_out(session, job, part="run")
                else:
                    job.error = {
                        "code": "WORKER_LOST",
                        "message": "The worker running this job stopped and no replica took it over in time.",
                        "status": 500,
                    }
                    won = await transition(
                        self.runtime, session, job, from_states=["running"], to_state="failed", error=job.error
                    )
                if won:
                    counts["worker_lost"] += 1
            await session.execute(
                update(Job)
                .where(Job.request_id.is_not(None), Job.created_at < now - timedelta(days=1))
                .values(request_id=None)
                .execution_options(synchronize_session=False)
            )
            expired = (
                await session.scalars(
                    select(Job)
                    .where(Job.results_expire_at <= now, Job.results_deleted_at.is_(None), Job.result_key.is_not(None))
                    .limit(200)
                )
            ).all()
        for job in expired:
            await self.storage.delete_prefix(f"results/{job.id}/")
            async with self.db.session() as session:
                await session.execute(
                    update(Job)
                    .where(Job.id == job.id)
                    .values(results_deleted_at=utcnow())
                    .execution_options(synchronize_session=False)
                )
            counts["results_deleted"] += 1
        for reason in ("queue_timeout", "worker_lost"):
            if counts[reason]:
                self.metrics.reaped.labels(reason).inc(counts[reason])
                log.info("reaper closed %d job(s): %s", counts[reason], reason)
        return counts

    # -- gauges --------------------------------------------------------------------------------------------------------
    async def _gauges(self) -> None:
        """The queue's backlog as ``strata_consumer_pending_messages{consumer="execution-jobs"}`` (what the HPA scales
        on), and per priority."""
        gauge = self.runtime.runtime_metrics.consumer_pending
        while True:
            await asyncio.sleep(5.0)
            if not self.runtime.bus.is_connected:
                continue
            total = 0
            try:
                for priority in PRIORITIES:
                    info = await self.runtime.bus.js.consumer_info(WORK_STREAM, consumer_name(priority))
                    pending = int(info.num_pending or 0)
                    gauge.labels(consumer_name(priority)).set(pending)
                    total += pending
                gauge.labels(CONSUMER).set(total)
            except Exception as exc:  # the next pass tries again
                log.debug("queue gauges: %s", exc)


async def declare_consumer(js: JetStreamContext, priority: int, settings: Settings) -> None:
    config = js_api.ConsumerConfig(
        durable_name=consumer_name(priority),
        description=f"Execution jobs of priority {priority} (1 is the most urgent)",
        filter_subject=work_subject(priority),
        deliver_policy=js_api.DeliverPolicy.ALL,
        ack_policy=js_api.AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        # One more than ours: the claim fails the job on its last attempt, the server never drops it silently.
        max_deliver=settings.max_attempts + 2,
        max_ack_pending=10_000,
    )
    try:
        await js.add_consumer(WORK_STREAM, config)  # the same durable name again: an update
    except BadRequestError as exc:  # a setting that cannot change on a live consumer
        log.debug("consumer %s kept as it is: %s", config.durable_name, exc.description)
