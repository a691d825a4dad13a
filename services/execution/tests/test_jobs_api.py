"""The query-jobs API as its users see it, on a real NATS server with JetStream, SQLite and PostgreSQL, real DuckDB
and chdb: submit and wait, results pages and downloads, idempotent retries, priorities, honest cancel, deadlines,
the reaper, events in stream order, and every kind of bad input and of another user's reach.

``rpc.datasets.resolve`` is answered by a stand-in on the same NATS (the datasets service's contract), over real
Parquet files, so these tests own exactly which tables each user may read.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel, ConfigDict
from sqlalchemy import update

from strata.common.contracts.auth import Role
from strata.common.contracts.datasets import ResolvedTable, ResolveRequest, ResolveResponse
from strata.common.contracts.realtime import ReadCheck, ReadVerdict
from strata.common.db import utcnow
from strata.common.errors import RemoteError
from strata.common.events import Bus
from strata.common.rpc import RpcClient, RpcServer
from strata.common.testing import TokenFactory, app_client, eventually
from strata.execution.app import create_app
from strata.execution.config import Settings
from strata.execution.models import Job

TOKENS = TokenFactory()
ALICE_ID = "11111111-1111-1111-1111-111111111111"
BOB_ID = "22222222-2222-2222-2222-222222222222"
ALICE = TOKENS.headers(user_id=ALICE_ID, role="analyst", ttl_s=3600)
BOB = TOKENS.headers(user_id=BOB_ID, role="analyst", ttl_s=3600)
VIEWER_ID = "33333333-3333-3333-3333-333333333333"
ADMIN_ID = "44444444-4444-4444-4444-444444444444"
VIEWER = TOKENS.headers(user_id=VIEWER_ID, role="viewer", ttl_s=3600)
ADMIN = TOKENS.headers(user_id=ADMIN_ID, role="admin", ttl_s=3600)
CALLS_ID = "aaaaaaaa-0000-0000-0000-000000000001"
SECRET_ID = "bbbbbbbb-0000-0000-0000-000000000002"
# Long enough to be stopped mid-way on any machine (10^10 rows), light on memory.
LONG_SQL = "SELECT sum(a.range * b.range) AS s FROM range(100000) a, range(100000) b"


def write_calls(path: Path, rows: int = 1000) -> None:
    con = duckdb.connect()
    con.execute(
        f"""COPY (SELECT i AS call_id, 'agent_' || (i % 7) AS agent, (['eu','us','apac'])[1 + i % 3] AS region,
                   30 + i % 300 AS duration_s, CASE WHEN i % 10 = 0 THEN NULL ELSE 1 + i % 5 END AS rating,
                   TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_minutes(i) AS start_time
            FROM range({rows}) t(i)) TO '{path}' (FORMAT parquet)"""
    )
    con.close()


class Resolver:
    """The datasets service's side of ``rpc.datasets.resolve``: Alice owns ``calls``; Bob owns ``secret``."""

    def __init__(self, root: Path) -> None:
        self.calls = root / "calls.parquet"
        self.secret = root / "secret.parquet"
        write_calls(self.calls)
        write_calls(self.secret, 10)
        self.requests: list[ResolveRequest] = []

    def table(self, ref: str, dataset_id: str, name: str, owner: str, path: Path, rows: int) -> ResolvedTable:
        return ResolvedTable(
            ref=ref,
            dataset_id=dataset_id,
            name=name,
            owner_id=owner,
            version=1,
            path=str(path),
            storage_url=path.as_uri(),
            columns=[],
            rows=rows,
        )

    async def resolve(self, request: ResolveRequest) -> ResolveResponse:
        self.requests.append(request)
        tables, missing = [], []
        for ref in request.refs:
            if request.user_id == ALICE_ID and ref in ("calls", CALLS_ID, f"{ALICE_ID}.calls"):
                tables.append(self.table(ref, CALLS_ID, "calls", ALICE_ID, self.calls, 1000))
            elif request.user_id == BOB_ID and ref in ("secret", SECRET_ID):
                tables.append(self.table(ref, SECRET_ID, "secret", BOB_ID, self.secret, 10))
            else:
                missing.append(ref)
        return ResolveResponse(tables=tables, missing=missing)


@dataclass
class Ctx:
    client: httpx.AsyncClient
    app: Any
    settings: Settings
    resolver: Resolver

    async def submit(self, headers: dict[str, str] = ALICE, **body: Any) -> httpx.Response:
        return await self.client.post("/api/v1/queries", json=body, headers=headers)

    async def run(self, sql: str, headers: dict[str, str] = ALICE, **body: Any) -> dict[str, Any]:
        resp = await self.submit(headers, sql=sql, wait_ms=20_000, **body)
        assert resp.status_code == 200, resp.text
        job: dict[str, Any] = resp.json()
        return job

    async def job(self, job_id: str, headers: dict[str, str] = ALICE) -> dict[str, Any]:
        resp = await self.client.get(f"/api/v1/jobs/{job_id}", headers=headers)
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    async def wait_state(self, job_id: str, *states: str, timeout_s: float = 20) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            job = await self.job(job_id)
            return job if job["state"] in states else None

        result: dict[str, Any] = await eventually(check, timeout_s=timeout_s, interval_s=0.05)
        return result

    async def db_update(self, job_id: str, **values: Any) -> None:
        db = self.app.state.runtime.db
        async with db.session() as session:
            await session.execute(update(Job).where(Job.id == job_id).values(**values))


@asynccontextmanager
async def make_ctx(tmp_path: Path, nats_url: str, database_url: str, **overrides: Any) -> AsyncIterator[Ctx]:
    resolver = Resolver(tmp_path)
    bus = Bus(nats_url, name="datasets-stand-in")
    await bus.start()
    rpc = RpcServer(bus, service="datasets")
    rpc.register("resolve", ResolveRequest, resolver.resolve)
    await rpc.start()
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "nats_url": nats_url,
        "database_url": database_url,
        "workers": 2,
        "progress_interval_s": 0.1,
        "reaper_interval_s": 0.2,
        "ack_wait_s": 2.0,
        **overrides,
    }
    settings = Settings(**values)
    app = create_app(settings)
    TOKENS.install(app)
    try:
        async with app_client(app, timeout=60) as client:
            yield Ctx(client, app, settings, resolver)
    finally:
        await rpc.stop()
        await bus.close()


@pytest.fixture
async def ctx(tmp_path: Path, nats_url: str) -> AsyncIterator[Ctx]:
    async with make_ctx(tmp_path, nats_url, f"sqlite+aiosqlite:///{tmp_path}/execution.db") as c:
        yield c


@pytest.fixture
async def dbctx(tmp_path: Path, nats_url: str, database_url: str) -> AsyncIterator[Ctx]:
    """On SQLite and on PostgreSQL: for the tests where the database's locking and types matter."""
    async with make_ctx(tmp_path, nats_url, database_url) as c:
        yield c


@pytest.fixture
async def idle(tmp_path: Path, nats_url: str) -> AsyncIterator[Ctx]:
    """A replica that takes no jobs (``workers=0``): what it queues stays queued."""
    async with make_ctx(tmp_path, nats_url, f"sqlite+aiosqlite:///{tmp_path}/idle.db", workers=0) as c:
        yield c


# -- the happy path ------------------------------------------------------------------------------------------------
async def test_query_runs_and_its_results_page_and_download(dbctx: Ctx) -> None:
    job = await dbctx.run(
        "SELECT region, count(*) AS calls, avg(rating) AS rating FROM calls WHERE duration_s >= $min "
        "GROUP BY region ORDER BY region",
        parameters={"min": 100},
    )
    assert job["state"] == "succeeded", job
    assert job["result"]["rows"] == 3 and job["result"]["bytes"] > 0 and not job["result"]["truncated"]
    assert [c["name"] for c in job["result"]["columns"]] == ["region", "calls", "rating"]
    assert job["datasets"] == [
        {"ref": "calls", "dataset_id": CALLS_ID, "name": "calls", "owner_id": ALICE_ID, "version": 1, "rows": 1000}
    ]
    assert job["started_at"] and job["finished_at"] and job["queued_s"] is not None and job["run_s"] is not None
    assert job["attempts"] == 1 and job["error"] is None

    page = (await dbctx.client.get(f"/api/v1/jobs/{job['id']}/results", headers=ALICE)).json()
    assert [r[0] for r in page["rows"]] == ["apac", "eu", "us"]
    assert page["total_rows"] == 3 and page["next_page_token"] is None

    base = f"/api/v1/jobs/{job['id']}/results/download"
    as_csv = await dbctx.client.get(base, params={"format": "csv"}, headers=ALICE)
    assert as_csv.status_code == 200
    parsed = list(csv.reader(io.StringIO(as_csv.text)))
    assert parsed[0] == ["region", "calls", "rating"] and [r[0] for r in parsed[1:]] == ["apac", "eu", "us"]
    assert [int(r[1]) for r in parsed[1:]] == [r[1] for r in page["rows"]]
    assert "attachment" in as_csv.headers["content-disposition"]
    parquet = await dbctx.client.get(base, params={"format": "parquet"}, headers=ALICE)
    assert pq.read_table(io.BytesIO(parquet.content)).num_rows == 3
    arrow = await dbctx.client.get(base, params={"format": "arrow"}, headers=ALICE)
    assert ipc.open_stream(io.BytesIO(arrow.content)).read_all().num_rows == 3
    as_json = json.loads((await dbctx.client.get(base, params={"format": "json"}, headers=ALICE)).content)
    assert [r["region"] for r in as_json] == ["apac", "eu", "us"]


async def test_results_are_paged_with_tokens_over_the_file(ctx: Ctx) -> None:
    job = await ctx.run("SELECT call_id FROM calls ORDER BY call_id")
    seen: list[int] = []
    token = None
    while True:
        params: dict[str, Any] = {"limit": 300}
        if token:
            params["page_token"] = token
        page = (await ctx.client.get(f"/api/v1/jobs/{job['id']}/results", params=params, headers=ALICE)).json()
        seen += [r[0] for r in page["rows"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert seen == list(range(1000))


async def test_both_engines_and_a_shared_name_forms(ctx: Ctx) -> None:
    by_id = await ctx.run(f'SELECT count(*) AS n FROM "{CALLS_ID}"')
    qualified = await ctx.run(f'SELECT count(*) AS n FROM "{ALICE_ID}".calls')
    on_clickhouse = await ctx.run(
        "SELECT region, count() AS n FROM calls WHERE duration_s >= {min:UInt32} GROUP BY region ORDER BY region",
        engine="clickhouse",
        parameters={"min": 100},
    )
    for job in (by_id, qualified, on_clickhouse):
        assert job["state"] == "succeeded", job
    assert on_clickhouse["engine"] == "clickhouse" and on_clickhouse["result"]["rows"] == 3


async def test_dry_run_plans_without_running(ctx: Ctx) -> None:
    resp = await ctx.submit(sql="SELECT agent, count(*) AS n FROM calls GROUP BY agent", dry_run=True)
    assert resp.status_code == 200, resp.text
    plan = resp.json()
    assert [c["name"] for c in plan["columns"]] == ["agent", "n"] and plan["plan"]
    assert plan["datasets"][0]["dataset_id"] == CALLS_ID
    jobs = (await ctx.client.get("/api/v1/jobs", headers=ALICE)).json()["items"]
    assert jobs == []  # nothing was queued


async def test_max_rows_truncates_and_says_so(ctx: Ctx) -> None:
    job = await ctx.run("SELECT * FROM calls", max_rows=10)
    assert job["result"]["rows"] == 10 and job["result"]["truncated"] is True
    page = (await ctx.client.get(f"/api/v1/jobs/{job['id']}/results", headers=ALICE)).json()
    assert len(page["rows"]) == 10 and page["truncated"] is True


async def test_same_request_id_returns_the_same_job(dbctx: Ctx) -> None:
    first = await dbctx.run("SELECT 1 AS x", request_id="retry-1")
    again = await dbctx.run("SELECT 1 AS x", request_id="retry-1")
    assert again["id"] == first["id"]
    bobs = await dbctx.run("SELECT 1 AS x", request_id="retry-1", headers=BOB)
    assert bobs["id"] != first["id"]  # the key is per user
    concurrent = await asyncio.gather(*(dbctx.submit(sql="SELECT 2 AS y", request_id="race") for _ in range(5)))
    assert len({r.json()["id"] for r in concurrent}) == 1


async def test_job_events_in_stream_order(ctx: Ctx) -> None:
    job = await ctx.run("SELECT count(*) FROM calls")

    async def events() -> list[dict[str, Any]] | None:
        body = (await ctx.client.get(f"/api/v1/jobs/{job['id']}/events", headers=ALICE)).json()
        found: list[dict[str, Any]] = body["events"]
        return found if any(e["type"].endswith(".succeeded") for e in found) else None

    found = await eventually(events)
    states = [e["type"].rsplit(".", 1)[-1] for e in found if not e["type"].endswith(".progress")]
    assert states == ["queued", "running", "succeeded"]
    seqs = [e["seq"] for e in found]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    rest = (await ctx.client.get(f"/api/v1/jobs/{job['id']}/events", params={"after": seqs[0]}, headers=ALICE)).json()
    assert [e["seq"] for e in rest["events"]] == seqs[1:] and rest["recovered"] is True
    assert found[-1]["event"]["data"]["rows"] == 1


async def test_examples_run_on_their_engine(ctx: Ctx) -> None:
    examples = (await ctx.client.get("/api/v1/queries/examples", headers=VIEWER)).json()
    assert {e["engine"] for e in examples} == {"duckdb", "clickhouse"}
    for example in examples:  # they name the demo datasets, which this stand-in does not have
        resp = await ctx.submit(sql=example["sql"], engine=example["engine"], parameters=example["parameters"])
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "TABLE_NOT_FOUND", resp.text


async def test_list_filters_and_pages(dbctx: Ctx) -> None:
    ids = [(await dbctx.run(f"SELECT {i} AS x"))["id"] for i in range(5)]
    failed = await dbctx.run("SELECT nope FROM calls")
    await dbctx.run("SELECT 1 AS x", headers=BOB)
    page1 = (await dbctx.client.get("/api/v1/jobs", params={"limit": 4}, headers=ALICE)).json()
    page2 = (
        await dbctx.client.get("/api/v1/jobs", params={"limit": 4, "cursor": page1["next_cursor"]}, headers=ALICE)
    ).json()
    listed = [j["id"] for j in page1["items"] + page2["items"]]
    assert listed == [failed["id"], *reversed(ids)] and page2["next_cursor"] is None
    only_failed = (await dbctx.client.get("/api/v1/jobs", params={"state": "failed"}, headers=ALICE)).json()
    assert [j["id"] for j in only_failed["items"]] == [failed["id"]]
    assert (await dbctx.client.get("/api/v1/jobs", params={"engine": "clickhouse"}, headers=ALICE)).json()[
        "items"
    ] == []
    everyone = (await dbctx.client.get("/api/v1/jobs", params={"scope": "all"}, headers=ADMIN)).json()
    assert len(everyone["items"]) == 7
    assert (await dbctx.client.get("/api/v1/jobs", params={"scope": "all"}, headers=ALICE)).status_code == 403
    assert (await dbctx.client.get("/api/v1/jobs", params={"cursor": "garbage"}, headers=ALICE)).status_code == 400
    naive = await dbctx.client.get("/api/v1/jobs", params={"created_after": "2026-01-01T00:00:00"}, headers=ALICE)
    assert naive.status_code == 400


# -- cancel, deadlines, priorities ---------------------------------------------------------------------------------
async def test_cancel_stops_the_engine(dbctx: Ctx) -> None:
    resp = await dbctx.submit(sql=LONG_SQL)
    assert resp.status_code == 202
    job_id = resp.json()["id"]
    await dbctx.wait_state(job_id, "running")
    await asyncio.sleep(0.3)
    worker = dbctx.app.state.worker
    assert job_id in worker.running
    started = time.monotonic()
    cancel = await dbctx.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=ALICE)
    assert cancel.status_code == 202 and cancel.json()["state"] == "cancelling"
    done = await dbctx.wait_state(job_id, "cancelled", timeout_s=10)
    assert time.monotonic() - started < 5
    assert job_id not in worker.running  # the engine's thread returned: it stopped, not just the label
    again = await dbctx.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=ALICE)
    assert again.status_code == 200 and again.json()["state"] == "cancelled"  # idempotent
    assert done["result"] is None
    results = await dbctx.client.get(f"/api/v1/jobs/{job_id}/results", headers=ALICE)
    assert results.status_code == 409 and results.json()["error"]["code"] == "RESULTS_NOT_AVAILABLE"


async def test_cancel_on_clickhouse_stops_the_engine(ctx: Ctx) -> None:
    resp = await ctx.submit(
        sql="SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) % 7 = 1", engine="clickhouse"
    )
    job_id = resp.json()["id"]
    await ctx.wait_state(job_id, "running")
    await asyncio.sleep(0.5)
    started = time.monotonic()
    resp = await ctx.client.post(f"/api/v1/jobs/{job_id}/cancel", params={"wait_ms": 5000}, headers=ALICE)
    assert resp.json()["state"] == "cancelled", resp.text
    assert time.monotonic() - started < 5


async def test_cancel_of_a_queued_job_removes_it(idle: Ctx) -> None:
    job_id = (await idle.submit(sql="SELECT 1 AS x")).json()["id"]
    resp = await idle.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=ALICE)
    assert resp.status_code == 200 and resp.json()["state"] == "cancelled"
    assert resp.json()["started_at"] is None


async def test_cancel_of_a_finished_job_is_a_conflict(ctx: Ctx) -> None:
    job = await ctx.run("SELECT 1 AS x")
    resp = await ctx.client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=ALICE)
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "JOB_FINISHED"


async def test_a_query_past_its_timeout_is_timed_out_in_the_run(ctx: Ctx) -> None:
    resp = await ctx.submit(sql=LONG_SQL, timeout_s=1, wait_ms=10_000)
    job = resp.json()
    assert job["state"] == "timed_out", job
    assert job["timed_out_in"] == "run" and job["error"]["code"] == "TIMED_OUT"
    assert job["run_s"] < 4


async def test_the_deadline_covers_the_queue_wait(idle: Ctx) -> None:
    job_id = (await idle.submit(sql="SELECT 1 AS x", timeout_s=0.3)).json()["id"]
    job = await idle.wait_state(job_id, "timed_out", timeout_s=10)
    assert job["timed_out_in"] == "queue" and job["started_at"] is None
    assert "queue" in job["error"]["message"]


async def test_the_most_urgent_job_goes_first(tmp_path: Path, nats_url: str) -> None:
    async with make_ctx(tmp_path, nats_url, f"sqlite+aiosqlite:///{tmp_path}/prio.db", workers=1) as c:
        blocker = (await c.submit(sql=LONG_SQL)).json()["id"]
        await c.wait_state(blocker, "running")
        low = (await c.submit(sql="SELECT 5 AS p", priority=5)).json()["id"]
        high = (await c.submit(sql="SELECT 1 AS p", priority=1)).json()["id"]
        await c.client.post(f"/api/v1/jobs/{blocker}/cancel", headers=ALICE)
        low_job = await c.wait_state(low, "succeeded")
        high_job = await c.wait_state(high, "succeeded")
        assert high_job["started_at"] < low_job["started_at"]


# -- crashes and the reaper ----------------------------------------------------------------------------------------
async def test_reaper_fails_a_job_whose_worker_vanished(idle: Ctx) -> None:
    job_id = (await idle.submit(sql="SELECT 1 AS x")).json()["id"]
    stale = utcnow() - timedelta(seconds=idle.settings.stale_after_s + 5)
    await idle.db_update(job_id, state="running", heartbeat_at=stale, started_at=stale, attempts=1, worker_id="gone")
    job = await idle.wait_state(job_id, "failed", timeout_s=10)
    assert job["error"]["code"] == "WORKER_LOST"


async def test_a_redelivered_job_past_its_attempts_is_failed_with_a_reason(ctx: Ctx) -> None:
    worker = ctx.app.state.worker
    job_id = (await ctx.submit(sql="SELECT 1 AS x")).json()["id"]
    await ctx.wait_state(job_id, "succeeded")
    # A job some crashed replica held for its last attempt: the claim refuses to run it again.
    other = (await ctx.submit(sql="SELECT 2 AS x", priority=2)).json()["id"]
    await ctx.wait_state(other, "succeeded")
    await ctx.db_update(other, state="running", attempts=ctx.settings.max_attempts, heartbeat_at=None)
    claimed = await worker._claim(other, ctx.settings.max_attempts + 1)
    assert claimed is None
    job = await ctx.job(other)
    assert job["state"] == "failed" and job["error"]["code"] == "WORKER_LOST"


async def test_results_are_deleted_after_their_retention(tmp_path: Path, nats_url: str) -> None:
    async with make_ctx(tmp_path, nats_url, f"sqlite+aiosqlite:///{tmp_path}/ttl.db", results_ttl_s=0.5) as c:
        job = await c.run("SELECT 1 AS x")
        files = tmp_path / "data" / "storage" / "results" / job["id"]

        async def gone() -> bool:
            resp = await c.client.get(f"/api/v1/jobs/{job['id']}/results", headers=ALICE)
            return resp.status_code == 410 and resp.json()["error"]["code"] == "RESULTS_EXPIRED"

        await eventually(gone, timeout_s=10)
        assert not files.exists()
        assert (await c.job(job["id"]))["result"]["deleted_at"] is not None


# -- bad input ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sql, status, code",
    [
        ("SELEC * FROM calls", 400, "SQL_SYNTAX_ERROR"),
        ("SELECT * FROM nowhere", 404, "TABLE_NOT_FOUND"),
        ("SELECT * FROM secret", 404, "TABLE_NOT_FOUND"),  # Bob's: not readable is not found
        ("SELECT 1; SELECT 2", 400, "MULTIPLE_STATEMENTS"),
        ("DELETE FROM calls", 400, "FORBIDDEN_STATEMENT"),
        ("COPY calls TO '/tmp/out.csv'", 400, "FORBIDDEN_STATEMENT"),
        ("ATTACH '/tmp/x.db'", 400, "FORBIDDEN_STATEMENT"),
        ("INSTALL httpfs", 400, "FORBIDDEN_STATEMENT"),
        ("SET threads = 64", 400, "FORBIDDEN_STATEMENT"),
        ("SELECT $x + 1", 422, "PARAMETER_ERROR"),
    ],
)
async def test_bad_statements_are_refused_at_submit(ctx: Ctx, sql: str, status: int, code: str) -> None:
    resp = await ctx.submit(sql=sql)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code
    assert (await ctx.client.get("/api/v1/jobs", headers=ALICE)).json()["items"] == []


async def test_a_syntax_error_says_where(ctx: Ctx) -> None:
    resp = await ctx.submit(sql="SELECT region,\n  count(* AS n\nFROM calls")
    assert resp.status_code == 400
    detail = resp.json()["error"]["details"][0]
    assert detail["line"] >= 2 and detail["column"] >= 1


@pytest.mark.parametrize(
    "sql, code",
    [
        ("SELECT nope FROM calls", "COLUMN_NOT_FOUND"),
        ("SELECT * FROM read_csv('/etc/passwd')", "SANDBOX_VIOLATION"),
        ("SELECT getenv('HOME') AS home", "SANDBOX_VIOLATION"),
    ],
)
async def test_errors_at_run_time_fail_the_job_with_a_code(ctx: Ctx, sql: str, code: str) -> None:
    resp = await ctx.submit(sql=sql, wait_ms=20_000)
    if resp.status_code != 200:  # refused before it was queued is as good
        assert resp.json()["error"]["code"] == code, resp.text
        return
    job = resp.json()
    assert job["state"] == "failed" and job["error"]["code"] == code, job
    results = await ctx.client.get(f"/api/v1/jobs/{job['id']}/results", headers=ALICE)
    assert results.status_code == 409


async def test_parameters_missing_unused_or_mistyped(ctx: Ctx) -> None:
    missing = await ctx.submit(sql="SELECT * FROM calls WHERE duration_s > $min")
    assert missing.status_code == 422 and "min" in missing.json()["error"]["message"]
    unused = await ctx.submit(sql="SELECT 1 AS x", parameters={"extra": 1})
    assert unused.status_code == 422 and "extra" in unused.json()["error"]["message"]
    mistyped = await ctx.submit(
        sql="SELECT * FROM calls WHERE duration_s > $min::INTEGER", parameters={"min": "ten"}, wait_ms=20_000
    )
    body = mistyped.json()
    code = body["error"]["code"]  # refused at submit, or the job failed: either names the parameter problem
    assert code in ("PARAMETER_ERROR", "QUERY_FAILED", "BINDER_ERROR"), body


@pytest.mark.parametrize(
    "body",
    [
        {"sql": ""},
        {"sql": "SELECT 1", "engine": "postgres"},
        {"sql": "SELECT 1", "priority": 0},
        {"sql": "SELECT 1", "priority": 6},
        {"sql": "SELECT 1", "timeout_s": -1},
        {"sql": "SELECT 1", "max_rows": 0},
        {"sql": "SELECT 1", "wait_ms": -5},
        {"sql": "SELECT 1", "parameters": {"x": {"nested": 1}}},
        {"sql": "SELECT 1", "surprise": True},
    ],
)
async def test_invalid_bodies_are_422(ctx: Ctx, body: dict[str, Any]) -> None:
    resp = await ctx.submit(**body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["code"] == "VALIDATION_ERROR"


async def test_an_oversized_statement_is_refused(ctx: Ctx) -> None:
    resp = await ctx.submit(sql="SELECT 1" + " " * ctx.settings.max_sql_bytes)
    assert resp.status_code == 400


async def test_page_tokens_from_another_job_or_tampered_are_refused(ctx: Ctx) -> None:
    one = await ctx.run("SELECT * FROM range(50)")
    two = await ctx.run("SELECT * FROM range(50)")
    page = (await ctx.client.get(f"/api/v1/jobs/{one['id']}/results", params={"limit": 10}, headers=ALICE)).json()
    token = page["next_page_token"]
    assert token
    other = await ctx.client.get(f"/api/v1/jobs/{two['id']}/results", params={"page_token": token}, headers=ALICE)
    assert other.status_code == 400 and other.json()["error"]["code"] == "INVALID_PAGE_TOKEN"
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    resp = await ctx.client.get(f"/api/v1/jobs/{one['id']}/results", params={"page_token": tampered}, headers=ALICE)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "INVALID_PAGE_TOKEN"
    resp = await ctx.client.get(f"/api/v1/jobs/{one['id']}/results", params={"page_token": "x"}, headers=ALICE)
    assert resp.status_code == 400
    resp = await ctx.client.get(f"/api/v1/jobs/{one['id']}/results/download", params={"format": "xls"}, headers=ALICE)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "UNSUPPORTED_FORMAT"


async def test_results_of_a_failed_job(ctx: Ctx) -> None:
    job = await ctx.run("SELECT nope FROM calls")
    for path in ("results", "results/download"):
        resp = await ctx.client.get(f"/api/v1/jobs/{job['id']}/{path}", headers=ALICE)
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "RESULTS_NOT_AVAILABLE"


# -- who may do what ---------------------------------------------------------------------------------------------------
async def test_viewers_do_not_run_queries(ctx: Ctx) -> None:
    resp = await ctx.submit(VIEWER, sql="SELECT 1 AS x")
    assert resp.status_code == 403
    assert (await ctx.client.post("/api/v1/queries", json={"sql": "SELECT 1"})).status_code == 401


async def test_nobody_reads_another_users_job(ctx: Ctx) -> None:
    job = await ctx.run("SELECT count(*) FROM calls")
    for method, path in (
        ("GET", ""),
        ("GET", "/results"),
        ("GET", "/results/download"),
        ("GET", "/events"),
        ("POST", "/cancel"),
    ):
        for who in (BOB, VIEWER):
            resp = await ctx.client.request(method, f"/api/v1/jobs/{job['id']}{path}", headers=who)
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "JOB_NOT_FOUND", (path, resp.text)
    assert (await ctx.client.get("/api/v1/jobs", headers=BOB)).json()["items"] == []
    assert (await ctx.client.get(f"/api/v1/jobs/{job['id']}", headers=ADMIN)).status_code == 200
    assert (await ctx.client.get("/api/v1/jobs/not-a-uuid", headers=ALICE)).status_code == 404
    assert (await ctx.client.get(f"/api/v1/jobs/{uuid.uuid4()}", headers=ALICE)).status_code == 404


class RawRequest(BaseModel):
    """Any JSON object, to send what the real request models would refuse to build."""

    model_config = ConfigDict(extra="allow")


async def test_can_read_job_over_nats_agrees_with_the_api(idle: Ctx, bus: Bus) -> None:
    """``rpc.execution.can_read_job`` (the WebSocket's ``job:<id>`` channel) answers as ``GET /jobs/{id}`` does."""
    resp = await idle.submit(sql="SELECT count(*) FROM calls")
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    client = RpcClient(bus)

    async def verdict(user_id: str, role: Role, resource_id: str = job_id) -> ReadVerdict:
        check = ReadCheck(user_id=user_id, role=role, resource_id=resource_id)
        return await client.call("execution", "can_read_job", check, ReadVerdict, timeout_s=5)

    assert await verdict(ALICE_ID, Role.analyst) == ReadVerdict(readable=True, owner_id=ALICE_ID)
    assert await verdict(ADMIN_ID, Role.admin) == ReadVerdict(readable=True, owner_id=ALICE_ID)
    for user_id, role, headers in ((BOB_ID, Role.analyst, BOB), (VIEWER_ID, Role.viewer, VIEWER)):
        assert await verdict(user_id, role) == ReadVerdict(readable=False)
        assert (await idle.client.get(f"/api/v1/jobs/{job_id}", headers=headers)).status_code == 404
    for unknown in ("not-a-uuid", str(uuid.uuid4()), "x" * 64):
        assert await verdict(ALICE_ID, Role.analyst, unknown) == ReadVerdict(readable=False)
        assert await verdict(ADMIN_ID, Role.admin, unknown) == ReadVerdict(readable=False)

    # A viewer cannot submit but may own a job (demoted since): the API lets them read it, and so does the RPC.
    await idle.db_update(job_id, owner_id=VIEWER_ID)
    assert (await idle.client.get(f"/api/v1/jobs/{job_id}", headers=VIEWER)).status_code == 200
    assert await verdict(VIEWER_ID, Role.viewer) == ReadVerdict(readable=True, owner_id=VIEWER_ID)
    assert await verdict(ALICE_ID, Role.analyst) == ReadVerdict(readable=False)

    for bad in (
        RawRequest(user_id=ALICE_ID, resource_id=job_id),
        RawRequest(user_id=ALICE_ID, role="superuser", resource_id=job_id),
        RawRequest(user_id=ALICE_ID, role="analyst", resource_id=""),
    ):
        with pytest.raises(RemoteError) as caught:
            await client.call("execution", "can_read_job", bad, ReadVerdict, timeout_s=5)
        assert caught.value.status == 422 and caught.value.code == "VALIDATION_ERROR", caught.value


async def test_metrics_count_jobs(ctx: Ctx) -> None:
    await ctx.run("SELECT 1 AS x")
    text = (await ctx.client.get("/metrics")).text
    assert 'strata_jobs_finished_total{engine="duckdb",kind="query",state="succeeded"}' in text
    assert "strata_job_queue_seconds_bucket" in text


async def test_bad_query_parameters_are_422(ctx: Ctx) -> None:
    job = await ctx.run("SELECT 1 AS x")
    base = f"/api/v1/jobs/{job['id']}"
    for path, params in (
        (base + "/events", {"after": -1}),
        (base + "/events", {"limit": 0}),
        (base + "/events", {"limit": 5000}),
        (base + "/results", {"limit": 0}),
        (base + "/cancel", {"wait_ms": -1}),
        ("/api/v1/jobs", {"state": "exploded"}),
        ("/api/v1/jobs", {"limit": 0}),
        ("/api/v1/jobs", {"engine": "oracle"}),
        ("/api/v1/jobs", {"created_after": "yesterday"}),
    ):
        method = "POST" if path.endswith("/cancel") else "GET"
        resp = await ctx.client.request(method, path, params=params, headers=ALICE)
        assert resp.status_code == 422, (path, params, resp.text)
        assert resp.json()["error"]["code"] == "VALIDATION_ERROR"
    huge = await ctx.client.get(base + "/results", params={"limit": 10**6}, headers=ALICE)
    assert huge.status_code == 200 and len(huge.json()["rows"]) == 1  # bounded by the server's page maximum


@pytest.mark.parametrize(
    "engine, sql",
    [
        ("duckdb", "SELECT count(*) AS n FROM range(3000000000) t WHERE t.range % 7 = 1"),
        ("clickhouse", "SELECT count() AS n FROM numbers(20000000000) WHERE sipHash64(number) % 7 = 1"),
    ],
)
async def test_a_running_job_reports_the_engines_progress(ctx: Ctx, engine: str, sql: str) -> None:
    job_id = (await ctx.submit(sql=sql, engine=engine, timeout_s=60)).json()["id"]
    await ctx.wait_state(job_id, "running")

    async def progressed() -> list[dict[str, Any]] | None:
        body = (await ctx.client.get(f"/api/v1/jobs/{job_id}/events", headers=ALICE)).json()
        found = [e for e in body["events"] if e["type"] == "strata.execution.job.progress"]
        return found if len(found) >= 3 else None

    progress = await eventually(progressed, timeout_s=20)
    fractions = [e["event"]["data"]["fraction"] for e in progress]
    assert fractions == sorted(fractions) and 0 < fractions[-1] < 1, fractions
    assert all(e["event"]["subject"] == job_id for e in progress)

    async def on_the_job() -> float | None:  # the heartbeat writes it on the job too, every two seconds
        value: float | None = (await ctx.job(job_id))["progress"]
        return value

    assert 0 < await eventually(on_the_job, timeout_s=10) < 1
    await ctx.client.post(f"/api/v1/jobs/{job_id}/cancel", params={"wait_ms": 5000}, headers=ALICE)


# -- the block catalogue ---------------------------------------------------------------------------------------------
async def test_block_catalogue_lists_and_describes_blocks(idle: Ctx) -> None:
    client = idle.client
    listed = await client.get("/api/v1/blocks", headers=VIEWER)  # any signed-in user reads the catalogue
    assert listed.status_code == 200, listed.text
    body = listed.json()
    ids = {b["id"] for b in body["data"]}
    assert {"filter", "select", "aggregate", "time_series", "top_n", "join", "pivot", "describe"} <= ids
    assert {"correlation", "outliers", "forecast", "sql"} <= ids
    assert body["meta"]["limit"] == len(body["data"]) and "statistics" in body["meta"]["categories"]
    stats = (await client.get("/api/v1/blocks?category=statistics", headers=VIEWER)).json()["data"]
    assert stats and all(b["category"] == "statistics" for b in stats)
    assert (await client.get("/api/v1/blocks?category=nope", headers=VIEWER)).json()["data"] == []
    assert len((await client.get("/api/v1/blocks?version=1", headers=VIEWER)).json()["data"]) == len(ids)
    assert (await client.get("/api/v1/blocks?version=99", headers=VIEWER)).json()["data"] == []

    aggregate = await client.get("/api/v1/blocks/aggregate", headers=VIEWER)
    assert aggregate.status_code == 200
    described = aggregate.json()
    assert described["version"] == 1 and described["inputs"][0]["name"] == "data"
    assert described["config_schema"]["type"] == "object" and "metrics" in described["config_schema"]["properties"]
    assert described["output_schema"]["type"] == "object"
    join = (await client.get("/api/v1/blocks/join?version=1", headers=VIEWER)).json()
    assert [i["name"] for i in join["inputs"]] == ["left", "right"]

    for path, code in (
        ("/api/v1/blocks/nope", "BLOCK_NOT_FOUND"),
        ("/api/v1/blocks/aggregate?version=99", "BLOCK_NOT_FOUND"),
        ("/api/v1/blocks/aggregate?version=0", "VALIDATION_ERROR"),
        ("/api/v1/blocks?version=abc", "VALIDATION_ERROR"),
    ):
        resp = await client.get(path, headers=VIEWER)
        assert resp.status_code in (404, 422) and resp.json()["error"]["code"] == code, (path, resp.text)
    assert (await client.get("/api/v1/blocks")).status_code == 401
