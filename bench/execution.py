"""Execution: small-query latency, heavy-query overhead, results download and job throughput, against DuckDB (and
chdb) measured alongside in this process.

Starts ``nats-server``, the ``auth``, ``datasets`` (demo data on: ``support_calls``, 100k rows, and ``taxi_trips``,
1M rows), ``execution`` and ``gateway`` services as real processes, signs in as the admin through the gateway, and
waits for the demo datasets to be ``ready`` and profiled. Everything goes through the gateway unless said otherwise;
the direct baselines read the very Parquet files the service reads (found with ``GET /datasets/{id}/manifest``).

(1) **Small-query latency.** ``SELECT region, count(*) ... FROM support_calls GROUP BY region`` submitted with
    ``wait_ms=5000`` (must answer 200 with a succeeded job), then its first results page: sequential, after a warm-up.
    Baselines, alternated with it in blocks: the same SQL in DuckDB here on a fresh connection per query, on a new
    connection made ahead (as the engine's spares) and on one connection, and ``GET /api/v1/queries/examples``
    through the gateway and straight to the execution service (what the HTTP hops alone cost). Where the time goes,
    from the job's own timestamps and ``stats``.
(2) **Heavy-query overhead.** A GROUP BY over ``taxi_trips`` and over a generated dataset (10M rows, ~190 MB of
    Parquet, uploaded through the gateway), ``engine=duckdb`` against DuckDB here (2 threads, like the service's
    engine) and ``engine=clickhouse`` against chdb here (``max_threads=2``), alternated rounds; best and median.
(3) **Results download.** ``SELECT *`` of the generated dataset as a job, then its ``results/download`` as Parquet
    and as CSV streamed through the gateway (bytes counted, nothing kept), against DuckDB's ``COPY ... TO`` of the
    same rows here.
(4) **Job throughput.** Many small queries submitted at once (``wait_ms=0``, 32 in flight), then polled until every
    job is final; counted by state (none may be lost). With 1 worker, 2 workers, and 2 replicas of 1 worker each
    (the second replica shares the database and storage, takes jobs from the same JetStream queue, and is never
    called by the gateway). Baseline: the same queries run one after the other in DuckDB here.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import duckdb
import httpx

from strata.common.procs import SERVICES, ServiceProcess, free_port, suite_env

from . import BENCH_ENV, ProcessStack, percentile, table
from .datasets import (
    ADMIN,
    MB,
    CpuMeter,
    Latencies,
    _literal,
    _sign_in,
    _timed,
    _upload_and_wait,
    _wait_profile,
    clock,
    taxi_select,
)

TARGET_SMALL_P50_MS = 15.0
TARGET_HEAVY_RATIO = 1.2
SMALL_SQL = "SELECT region, count(*) AS calls FROM support_calls GROUP BY region"
SMALL_ROWS = 5
# The demo taxi trips (fare, tip) and the generated table (fare_amount, tip_amount) name their columns differently.
HEAVY_SQL = {
    "taxi_trips": "SELECT pickup_zone, payment_type, count(*) AS trips, avg(fare) AS avg_fare, sum(tip) AS tips "
    "FROM taxi_trips GROUP BY ALL",
    "bench_trips": "SELECT pickup_zone, payment_type, count(*) AS trips, avg(fare_amount) AS avg_fare, "
    "sum(tip_amount) AS tips FROM bench_trips GROUP BY ALL",
}
ENGINE_THREADS = 2  # the service's default (STRATA_EXECUTION_ENGINE_THREADS); the direct baselines use the same
ENGINE_MEMORY = "1GB"  # likewise STRATA_EXECUTION_ENGINE_MEMORY_LIMIT
IN_FLIGHT = 32
FRESH = "DuckDB here, fresh connection per query (baseline)"
FINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out"})


# -- the stack ------------------------------------------------------------------------------------------------------
class _Stack(ProcessStack):
    """The datasets benchmark's stack plus the execution service, which can be restarted with other settings and given
    a second replica: its own data folder (work and spill folders, as a pod of its own would have), the first one's
    database and storage."""

    ports: dict[str, int]
    env: dict[str, str]

    def start(self) -> None:
        self.nats.start()
        self.ports = {name: free_port() for name in SERVICES}  # schemas: an unused port
        storage = (self.root / "storage").as_uri()
        extra = {
            **BENCH_ENV,
            "STRATA_ADMIN_EMAIL": ADMIN[0],
            "STRATA_ADMIN_PASSWORD": ADMIN[1],
            "STRATA_DATASETS_STORAGE_URL": storage,
            "STRATA_EXECUTION_STORAGE_URL": storage,
            "STRATA_DATASETS_DEMO_DATA": "true",
        }
        self.env = suite_env(data_dir=self.root / "data", nats_url=self.nats.url, ports=self.ports, extra=extra)
        for name in ("auth", "datasets", "execution", "gateway"):
            self.procs[name] = ServiceProcess(
                name, self.ports[name], self.env, log_file=self.root / "logs" / f"{name}.log"
            ).start()
        for proc in self.procs.values():
            proc.wait_healthy(timeout_s=60)

    def restart_execution(self, *, workers: int, replicas: int, tag: str) -> list[str]:
        """Stop every execution replica, start ``replicas`` with ``workers`` each; the first on the port the gateway
        calls. Returns the replicas' names (keys of ``procs``)."""
        for name in [n for n in self.procs if n.startswith("execution")]:
            self.procs.pop(name).stop()
        names = []
        for n in range(replicas):
            name = "execution" if n == 0 else f"execution-{n + 1}"
            env = {**self.env, "STRATA_EXECUTION_WORKERS": str(workers)}
            port = self.ports["execution"]
            if n:
                env["STRATA_EXECUTION_DATA_DIR"] = str(self.root / f"data-{name}")
                env["STRATA_EXECUTION_DATABASE_URL"] = f"sqlite+aiosqlite:///{self.root / 'data' / 'execution.db'}"
                port = free_port()
            self.procs[name] = ServiceProcess(
                "execution", port, env, log_file=self.root / "logs" / f"{name}-{tag}.log"
            ).start()
            names.append(name)
        for name in names:
            self.procs[name].wait_healthy(timeout_s=60)
        return names

    def cpu_pids(self) -> dict[str, int]:
        pids = {name: self.pid(name) for name in self.procs}
        pids["nats"] = self.nats.process.pid if self.nats.process else 0
        pids["bench"] = os.getpid()
        return pids


# -- helpers --------------------------------------------------------------------------------------------------------
def _connect(threads: int = ENGINE_THREADS) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection set up like the service's engine: its threads and memory limit, no extension loading."""
    return duckdb.connect(
        config={
            "threads": threads,
            "memory_limit": ENGINE_MEMORY,
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        }
    )


def _on_file(sql: str, table_name: str, path: Path, *, clickhouse: bool = False) -> str:
    """``sql`` reading ``path`` where it names the dataset."""
    source = f"file({_literal(path)}, Parquet)" if clickhouse else f"read_parquet({_literal(path)})"
    return sql.replace(f"FROM {table_name}", f"FROM {source}")


def _instant(text: str) -> float:
    """An API timestamp (ISO 8601) as seconds since the epoch, comparable with ``time.time()`` on this machine."""
    return datetime.fromisoformat(text).timestamp()


def _ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 2) if values else float("nan")


def _dataset_file(client: httpx.Client, gateway: str, dataset_id: str) -> Path:
    """The dataset's current Parquet file, from its manifest (a ``file://`` URL in this stack)."""
    resp = client.get(f"{gateway}/api/v1/datasets/{dataset_id}/manifest", timeout=30)
    resp.raise_for_status()
    url = urlsplit(str(resp.json()["storage_url"]))
    if url.scheme != "file":
        raise RuntimeError(f"expected a file:// dataset, got {resp.json()['storage_url']}")
    path = Path(unquote(url.path))
    if not path.exists():
        raise RuntimeError(f"the manifest names {path}, which does not exist")
    return path


def _wait_demo(client: httpx.Client, gateway: str, timeout_s: float = 180) -> dict[str, str]:
    """The demo datasets' ids once both are ``ready``."""
    deadline = time.monotonic() + timeout_s
    while True:
        resp = client.get(f"{gateway}/api/v1/datasets", params={"limit": 200}, timeout=30)
        resp.raise_for_status()
        found = {d["name"]: d for d in resp.json()["data"] if d["name"] in ("support_calls", "taxi_trips")}
        if len(found) == 2 and all(d["status"] == "ready" for d in found.values()):
            return {name: str(d["id"]) for name, d in found.items()}
        failed = [d["name"] for d in found.values() if d["status"] == "failed"]
        if failed:
            raise RuntimeError(f"demo dataset(s) failed to load: {failed}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo datasets not ready after {timeout_s:.0f}s: {found}")
        time.sleep(0.2)


def _submit(
    client: httpx.Client, base: str, sql: str, *, engine: str = "duckdb", wait_ms: int = 30_000, **extra: Any
) -> tuple[httpx.Response, dict[str, Any]]:
    resp = client.post(
        base + "/api/v1/queries",
        json={"sql": sql, "engine": engine, "wait_ms": wait_ms, **extra},
        timeout=wait_ms / 1000 + 30,
    )
    body: dict[str, Any] = resp.json()
    if resp.status_code not in (200, 202):
        raise RuntimeError(f"POST /queries answered {resp.status_code}: {str(body)[:500]}")
    return resp, body


def _until_final(client: httpx.Client, base: str, job: dict[str, Any], timeout_s: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while job["state"] not in FINAL:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job['id']} still {job['state']} after {timeout_s:.0f}s")
        time.sleep(0.05)
        job = client.get(f"{base}/api/v1/jobs/{job['id']}", timeout=30).json()
    return job


def _succeeded(job: dict[str, Any], what: str) -> dict[str, Any]:
    if job.get("state") != "succeeded":
        raise RuntimeError(f"{what}: the job {job.get('id')} ended {job.get('state')}: {job.get('error')}")
    return job


# -- (1) small-query latency ----------------------------------------------------------------------------------------
def small_latency(
    client: httpx.Client, gateway: str, direct: str, support_calls: Path, *, calls: int, warmup: int, block: int
) -> dict[str, Any]:
    sql_here = _on_file(SMALL_SQL, "support_calls", support_calls)
    one = _connect()
    parts: dict[str, list[float]] = {
        k: [] for k in ("before", "queued", "run", "after", "engine", "setup", "queued_s", "run_s")
    }
    submit = Latencies("API: submit (wait_ms=5000) -> 200 succeeded")
    total = Latencies("API: submit + first results page")

    def api(record: bool) -> None:
        wall, t0 = time.time(), clock()
        resp, job = _submit(client, gateway, SMALL_SQL, wait_ms=5000)
        t1 = clock()
        if resp.status_code != 200:
            raise RuntimeError(f"a small query did not end within wait_ms: {job['state']}")
        _succeeded(job, "small query")
        page = client.get(f"{gateway}/api/v1/jobs/{job['id']}/results", params={"limit": 1000}, timeout=30)
        t2 = clock()
        if page.status_code != 200 or len(page.json()["rows"]) != SMALL_ROWS:
            raise RuntimeError(f"results page answered {page.status_code}: {page.text[:300]}")
        if not record:
            return
        submit.values_ms.append((t1 - t0) * 1000)
        total.values_ms.append((t2 - t0) * 1000)
        created, started, finished = (_instant(job[k]) for k in ("created_at", "started_at", "finished_at"))
        parts["before"].append(created - wall)
        parts["queued"].append(started - created)
        parts["run"].append(finished - started)
        parts["after"].append(wall + (t1 - t0) - finished)
        parts["engine"].append(job["stats"]["elapsed_ms"] / 1000)
        parts["setup"].append(job["stats"]["setup_ms"] / 1000)
        parts["queued_s"].append(job["queued_s"])
        parts["run_s"].append(job["run_s"])

    def fresh() -> None:
        con = _connect()
        try:
            if len(con.execute(sql_here).fetchall()) != SMALL_ROWS:
                raise RuntimeError("DuckDB returned the wrong rows")
        finally:
            con.close()

    def reused() -> None:
        if len(one.execute(sql_here).fetchall()) != SMALL_ROWS:
            raise RuntimeError("DuckDB returned the wrong rows")

    ahead = [_connect()]  # the next connection, made (and the last one closed) outside the timing

    def made_ahead() -> None:
        if len(ahead[0].execute(sql_here).fetchall()) != SMALL_ROWS:
            raise RuntimeError("DuckDB returned the wrong rows")

    def next_connection() -> None:
        ahead[0].close()
        ahead[0] = _connect()

    def examples(base: str) -> Callable[[], None]:
        def call() -> None:
            resp = client.get(base + "/api/v1/queries/examples", timeout=30)
            if resp.status_code != 200:
                raise RuntimeError(f"{base}/api/v1/queries/examples answered {resp.status_code}")
            resp.read()

        return call

    def nothing() -> None:
        pass

    # name -> (what is timed, what follows it untimed)
    timed: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
        "DuckDB here, one connection": (reused, nothing),
        "DuckDB here, a new connection made ahead (as the service's spares)": (made_ahead, next_connection),
        FRESH: (fresh, nothing),
        "GET /queries/examples, straight to execution": (examples(direct), nothing),
        "GET /queries/examples, through the gateway": (examples(gateway), nothing),
    }
    lat = {name: Latencies(name) for name in timed}
    try:
        for _ in range(warmup):
            api(False)
            for fn, after in timed.values():
                fn()
                after()
        done = 0
        while done < calls:
            n = min(block, calls - done)
            for _ in range(n):
                api(True)
            for name, (fn, after) in timed.items():
                for _ in range(n):
                    t0 = clock()
                    fn()
                    lat[name].values_ms.append((clock() - t0) * 1000)
                    after()
            done += n
    finally:
        one.close()
        ahead[0].close()
    return {
        "sql": SMALL_SQL,
        "latency": {item.name: item.stats() for item in [*lat.values(), submit, total]},
        "breakdown_ms": {k: _ms(v) for k, v in parts.items()},
    }


# -- (2) heavy queries ----------------------------------------------------------------------------------------------
def heavy(
    client: httpx.Client, gateway: str, table_name: str, path: Path, *, engine: str, rounds: int
) -> dict[str, Any]:
    sql = HEAVY_SQL[table_name]
    clickhouse = engine == "clickhouse"
    here_sql = _on_file(sql, table_name, path, clickhouse=clickhouse)
    if clickhouse:
        import chdb
        import pyarrow as pa  # type: ignore[import-untyped]

        here_sql += f" SETTINGS max_threads = {ENGINE_THREADS}"

    def here(con: duckdb.DuckDBPyConnection) -> int:
        if clickhouse:
            data = chdb.query(here_sql, "Arrow").bytes()  # type: ignore[no-untyped-call]
            return int(pa.ipc.open_file(pa.py_buffer(data)).read_all().num_rows)
        return len(con.execute(here_sql).fetchall())

    api_s: list[float] = []
    here_s: list[float] = []
    run_s: list[float] = []
    engine_s: list[float] = []
    rows = {"api": 0, "here": 0, "in": 0}

    def api(record: bool) -> None:
        t0 = clock()
        _, job = _submit(client, gateway, sql, engine=engine)
        job = _succeeded(_until_final(client, gateway, job), f"{engine} on {table_name}")
        seconds = clock() - t0
        rows["api"] = job["result"]["rows"]
        rows["in"] = job["datasets"][0]["rows"]
        if record:
            api_s.append(seconds)
            run_s.append(job["run_s"])
            engine_s.append(job["stats"]["elapsed_ms"] / 1000)

    def direct(record: bool) -> None:
        con = _connect()  # a new database each time, as the service's runs get, made outside the timing
        try:
            t0 = clock()
            rows["here"] = here(con)
            seconds = clock() - t0
        finally:
            con.close()
        if record:
            here_s.append(seconds)

    api(False)  # warm-up: the file in the page cache, the engine's first use
    direct(False)
    for n in range(rounds):  # alternated, and which goes first too
        first, second = (api, direct) if n % 2 == 0 else (direct, api)
        first(True)
        second(True)
    if rows["api"] != rows["here"]:
        raise RuntimeError(f"{engine} on {table_name}: the job gave {rows['api']} rows, directly {rows['here']}")
    return {
        "table": table_name,
        "engine": engine,
        "sql": sql,
        "rows_in": rows["in"],
        "rows_out": rows["api"],
        "api_s": [round(v, 4) for v in api_s],
        "here_s": [round(v, 4) for v in here_s],
        "api_best_s": round(min(api_s), 4),
        "api_median_s": round(statistics.median(api_s), 4),
        "here_best_s": round(min(here_s), 4),
        "here_median_s": round(statistics.median(here_s), 4),
        "ratio_median": round(statistics.median(api_s) / statistics.median(here_s), 2),
        "ratio_best": round(min(api_s) / min(here_s), 2),
        "job_run_median_s": round(statistics.median(run_s), 4),
        "job_engine_median_s": round(statistics.median(engine_s), 4),
    }


# -- (3) results download -------------------------------------------------------------------------------------------
def _download(client: httpx.Client, base: str, job_id: str, fmt: str, cpu: CpuMeter) -> dict[str, Any]:
    url = f"{base}/api/v1/jobs/{job_id}/results/download"
    size = 0
    c0 = cpu.mark()
    t0 = clock()
    with client.stream("GET", url, params={"format": fmt}, timeout=httpx.Timeout(120, connect=10)) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"download as {fmt} answered {resp.status_code}: {resp.read()[:300]!r}")
        for chunk in resp.iter_raw():
            size += len(chunk)
    seconds = clock() - t0
    return {"seconds": round(seconds, 3), "bytes": size, "cpu_s": CpuMeter.spent(c0, cpu.mark())}


def _copy_here(path: Path, out: Path, options: str, cpu: CpuMeter) -> dict[str, Any]:
    con = _connect()
    c0 = cpu.mark()
    try:
        t0 = clock()
        con.execute(f"COPY (SELECT * FROM read_parquet({_literal(path)})) TO {_literal(out)} ({options})")
        seconds = clock() - t0
    finally:
        con.close()
    size = out.stat().st_size
    out.unlink()
    return {"seconds": round(seconds, 3), "bytes": size, "cpu_s": CpuMeter.spent(c0, cpu.mark())}


def download(
    client: httpx.Client, gateway: str, direct: str, path: Path, rows: int, work: Path, cpu: CpuMeter
) -> dict[str, Any]:
    c0 = cpu.mark()
    t0 = clock()
    _, job = _submit(client, gateway, "SELECT * FROM bench_trips", max_rows=2 * rows)
    job = _succeeded(_until_final(client, gateway, job), "SELECT * FROM bench_trips")
    produced = {
        "seconds": round(clock() - t0, 3),
        "bytes": job["result"]["bytes"],
        "cpu_s": CpuMeter.spent(c0, cpu.mark()),
    }
    if job["result"]["rows"] != rows or job["result"]["truncated"]:
        raise RuntimeError(f"the result has {job['result']['rows']} rows (truncated: {job['result']['truncated']})")
    out: dict[str, Any] = {
        "rows": rows,
        "job_id": job["id"],
        "job": {**produced, "run_s": job["run_s"], "queued_s": job["queued_s"], "stats": job["stats"]},
        "here_parquet": _copy_here(path, work / "copy.parquet", "FORMAT parquet, COMPRESSION zstd", cpu),
        "parquet_gateway": _download(client, gateway, job["id"], "parquet", cpu),
        "parquet_direct": _download(client, direct, job["id"], "parquet", cpu),
        "here_csv": _copy_here(path, work / "copy.csv", "HEADER true", cpu),
        "csv_gateway": _download(client, gateway, job["id"], "csv", cpu),
    }
    if out["parquet_gateway"]["bytes"] != job["result"]["bytes"]:
        raise RuntimeError(
            f"downloaded {out['parquet_gateway']['bytes']} bytes of Parquet, the job says {job['result']['bytes']}"
        )
    return out


# -- (4) job throughput ---------------------------------------------------------------------------------------------
async def _submit_all(gateway: str, headers: dict[str, str], count: int) -> tuple[list[str], list[str], float]:
    """Submit ``count`` small queries, ``IN_FLIGHT`` at a time: the accepted jobs' ids, the refusals (status and
    error code), and the seconds it took."""
    ids: list[str] = []
    refused: list[str] = []
    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=60) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(count):
            queue.put_nowait(n)

        async def sender() -> None:
            while not queue.empty():
                queue.get_nowait()
                resp = await client.post(gateway + "/api/v1/queries", json={"sql": SMALL_SQL, "wait_ms": 0})
                if resp.status_code in (200, 202):
                    ids.append(str(resp.json()["id"]))
                else:
                    try:
                        code = str(resp.json()["error"]["code"])
                    except (ValueError, KeyError, TypeError):
                        code = resp.text[:100]
                    refused.append(f"{resp.status_code} {code}")

        t0 = clock()
        await asyncio.gather(*(sender() for _ in range(IN_FLIGHT)))
        return ids, refused, clock() - t0


def _all_jobs_since(client: httpx.Client, gateway: str, since: datetime) -> dict[str, dict[str, Any]]:
    jobs: dict[str, dict[str, Any]] = {}
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"created_after": since.isoformat(), "limit": 200}
        if cursor:
            params["cursor"] = cursor
        resp = client.get(gateway + "/api/v1/jobs", params=params, timeout=60)
        resp.raise_for_status()
        page = resp.json()
        jobs.update({j["id"]: j for j in page["items"]})
        cursor = page["next_cursor"]
        if not cursor:
            return jobs


def throughput(
    stack: _Stack, client: httpx.Client, gateway: str, *, workers: int, replicas: int, count: int, tag: str
) -> dict[str, Any]:
    names = stack.restart_execution(workers=workers, replicas=replicas, tag=tag)
    headers = {"Authorization": str(client.headers["Authorization"])}
    cpu = CpuMeter(stack.cpu_pids())
    since = datetime.now(UTC)
    time.sleep(0.01)
    c0 = cpu.mark()
    wall0 = time.time()
    ids, refused, submit_s = asyncio.run(_submit_all(gateway, headers, count))
    deadline = time.monotonic() + 600
    active = ["queued", "running", "cancelling"]
    while True:  # the cheapest question: is any job of this run not final yet?
        resp = client.get(
            gateway + "/api/v1/jobs", params={"state": active, "created_after": since.isoformat(), "limit": 1}
        )
        resp.raise_for_status()
        if not resp.json()["items"]:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs still not final after 600s ({tag})")
        time.sleep(0.25)
    spent = CpuMeter.spent(c0, cpu.mark())
    jobs = _all_jobs_since(client, gateway, since)
    states = Counter(j["state"] for j in jobs.values())
    lost = [i for i in ids if i not in jobs]
    mine = [jobs[i] for i in ids if i in jobs]
    done = [j for j in mine if j["finished_at"]]
    last = max((_instant(j["finished_at"]) for j in done), default=wall0)
    seconds = last - wall0
    taken = {}
    for name in names:  # which replica ran how many (their "job ... taken" log lines)
        log_file = stack.procs[name].log_file
        text = log_file.read_text(errors="replace") if log_file is not None else ""
        taken[name] = text.count("taken (attempt")
    queued = sorted(j["queued_s"] for j in done if j["queued_s"] is not None)
    run = sorted(j["run_s"] for j in done if j["run_s"] is not None)
    return {
        "label": f"{replicas} replica{'s' if replicas > 1 else ''} x {workers} worker{'s' if workers > 1 else ''}",
        "workers": workers,
        "replicas": replicas,
        "submitted": count,
        "accepted": len(ids),
        "refused": dict(Counter(refused)),
        "states": dict(states),
        "succeeded": states.get("succeeded", 0),
        "lost": len(lost),
        "all_succeeded": not lost and states.get("succeeded", 0) == len(ids) == len(jobs) == count,
        "submit_s": round(submit_s, 3),
        "seconds": round(seconds, 3),
        "jobs_per_s": round(len(done) / seconds, 1),
        "queued_p50_s": round(percentile(queued, 50), 3),
        "queued_max_s": round(queued[-1], 3) if queued else None,
        "run_p50_ms": round(percentile(run, 50) * 1000, 1),
        "taken_by_replica": taken,
        "cpu_s": spent,
    }


def sequential_here(path: Path, count: int) -> dict[str, Any]:
    """The throughput baselines: ``count`` small queries one after another in DuckDB here."""
    sql = _on_file(SMALL_SQL, "support_calls", path)
    t0 = clock()
    for _ in range(count):
        con = _connect()
        try:
            con.execute(sql).fetchall()
        finally:
            con.close()
    fresh = clock() - t0
    con = _connect()
    try:
        t0 = clock()
        for _ in range(count):
            con.execute(sql).fetchall()
        reused = clock() - t0
    finally:
        con.close()
    return {
        "fresh_s": round(fresh, 3),
        "fresh_per_s": round(count / fresh, 1),
        "one_s": round(reused, 3),
        "one_per_s": round(count / reused, 1),
    }


# -- the benchmark --------------------------------------------------------------------------------------------------
def run(
    *,
    small_calls: int = 300,
    warmup_calls: int = 20,
    block: int = 50,
    big_rows: int = 10_000_000,
    heavy_rounds: int = 5,
    jobs: int = 1000,
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="strata-bench-execution-"))
    stack = _Stack(root)
    work = root / "bench"
    work.mkdir()
    summary: dict[str, Any] = {"engine_threads": ENGINE_THREADS, "big_rows": big_rows}
    client = httpx.Client()
    try:
        with _timed("started nats-server, auth, datasets (demo data), execution, gateway"):
            stack.start()
        gateway = stack.procs["gateway"].url
        direct = stack.procs["execution"].url
        client.headers["Authorization"] = f"Bearer {_sign_in(client, gateway)}"
        with _timed("the demo datasets are ready and profiled"):
            demo = _wait_demo(client, gateway)
            for dataset_id in demo.values():  # the profile runs after `ready`: let it finish, it takes both cores
                _wait_profile(client, gateway, dataset_id)
        files = {name: _dataset_file(client, gateway, dataset_id) for name, dataset_id in demo.items()}

        # (1) -----------------------------------------------------------------------------------------------------
        with _timed(f"small queries: {warmup_calls} warm-up + {small_calls} calls on each of 6 paths"):
            summary["small"] = small_latency(
                client,
                gateway,
                direct,
                files["support_calls"],
                calls=small_calls,
                warmup=warmup_calls,
                block=block,
            )

        # (2) -----------------------------------------------------------------------------------------------------
        big_path = work / "bench_trips.parquet"
        with _timed(f"generated {big_rows:,} rows as Parquet with DuckDB"):
            con = _connect()
            try:
                con.execute(
                    f"COPY ({taxi_select(big_rows)}) TO {_literal(big_path)} (FORMAT parquet, COMPRESSION zstd)"
                )
            finally:
                con.close()
        summary["big_upload_bytes"] = big_path.stat().st_size
        with _timed(f"uploaded it ({big_path.stat().st_size / MB:.0f} MB) through the gateway, ready and profiled"):
            up = _upload_and_wait(client, gateway, big_path, fmt="parquet", name="bench_trips", timeout_s=600)
            _wait_profile(client, gateway, up.dataset_id)
        big_path.unlink()
        if up.body.get("row_count") != big_rows:
            raise RuntimeError(f"bench_trips has {up.body.get('row_count')} rows, not {big_rows}")
        files["bench_trips"] = _dataset_file(client, gateway, up.dataset_id)
        summary["big_parquet_bytes"] = files["bench_trips"].stat().st_size
        heavy_out = []
        with _timed(f"heavy queries: {heavy_rounds} alternated rounds of 4 cases"):
            for table_name in ("taxi_trips", "bench_trips"):
                for engine in ("duckdb", "clickhouse"):
                    heavy_out.append(
                        heavy(client, gateway, table_name, files[table_name], engine=engine, rounds=heavy_rounds)
                    )
        summary["heavy"] = heavy_out

        # (3) -----------------------------------------------------------------------------------------------------
        cpu = CpuMeter(stack.cpu_pids())
        with _timed(f"results download: SELECT * of {big_rows:,} rows as Parquet and CSV"):
            summary["download"] = download(client, gateway, direct, files["bench_trips"], big_rows, work, cpu)

        # (4) -----------------------------------------------------------------------------------------------------
        configs = [(1, 1), (2, 1), (1, 2)]
        runs = []
        with _timed(f"throughput: {jobs} jobs in each of {len(configs)} configurations, and in DuckDB here"):
            summary["throughput_here"] = sequential_here(files["support_calls"], jobs)
            for workers, replicas in configs:
                last = throughput(
                    stack, client, gateway, workers=workers, replicas=replicas, count=jobs, tag=f"{replicas}x{workers}"
                )
                runs.append(last)
                print(
                    f"    {last['label']}: {last['jobs_per_s']} jobs/s, states {last['states']}, "
                    f"refused at submit {last['refused'] or 'none'}, lost {last['lost']}",
                    flush=True,
                )
        summary["throughput"] = runs
    except Exception:
        print(stack.log_tail())
        raise
    finally:
        client.close()
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)

    _print(summary)
    return summary


# -- the tables -----------------------------------------------------------------------------------------------------
def _plus(job: dict[str, Any], download: dict[str, Any]) -> dict[str, Any]:
    """The job and then the download: the time and CPU of both, the bytes of the download."""
    cpu = {k: job["cpu_s"].get(k, 0.0) + v for k, v in download["cpu_s"].items()}
    return {"seconds": job["seconds"] + download["seconds"], "bytes": download["bytes"], "cpu_s": cpu}


def _print(s: dict[str, Any]) -> None:
    small = s["small"]
    lat = small["latency"]
    names = list(lat)
    base = lat[FRESH]
    print(f"\n(1) Small-query latency: {small['sql']} (5 rows); sequential, one keep-alive connection")
    rows = []
    for name in names:
        st = lat[name]
        rows.append(
            [
                name,
                st["calls"],
                f"{st['p50_ms']:.2f}",
                f"{st['p90_ms']:.2f}",
                f"{st['p99_ms']:.2f}",
                f"x{st['p50_ms'] / base['p50_ms']:.2f}",
            ]
        )
    print(table(["", "calls", "p50 ms", "p90 ms", "p99 ms", "p50 vs fresh DuckDB"], rows))
    b = small["breakdown_ms"]
    print("\nWhere a small query's time goes (medians, from the job's created_at, started_at, finished_at and stats)")
    print(
        table(
            ["", "ms"],
            [
                ["submit -> job created (gateway, token, analyze, resolve tables over NATS)", f"{b['before']:.2f}"],
                ["created -> started (commit, outbox relay, JetStream, a slot pulls, claim)", f"{b['queued']:.2f}"],
                ["started -> finished (run_s: engine, result to storage, finish)", f"{b['run']:.2f}"],
                ["  of which the engine (stats.elapsed_ms)", f"{b['engine']:.2f}"],
                ["  of which its setup (stats.setup_ms: connection, sandbox, views)", f"{b['setup']:.2f}"],
                ["finished -> 200 at the client (commit, wake-up, re-read, answer, gateway)", f"{b['after']:.2f}"],
                ["sum of the medians", f"{b['before'] + b['queued'] + b['run'] + b['after']:.2f}"],
                ["job's queued_s / run_s (medians)", f"{b['queued_s']:.2f} / {b['run_s']:.2f}"],
            ],
        )
    )
    p50 = lat["API: submit (wait_ms=5000) -> 200 succeeded"]["p50_ms"]
    ok = "met" if p50 < TARGET_SMALL_P50_MS else "MISSED"
    print(f"target: p50 submit -> 200 under {TARGET_SMALL_P50_MS:.0f} ms: {p50:.2f} ms ({ok})")

    print(
        f"\n(2) Heavy queries: GROUP BY pickup_zone, payment_type (count, avg, sum); {ENGINE_THREADS} engine threads; "
        f"API = submit (wait_ms) to the succeeded job"
    )
    rows = []
    for h in s["heavy"]:
        here = "DuckDB here" if h["engine"] == "duckdb" else "chdb here"
        rows.append(
            [
                f"{h['table']} ({h['rows_in'] / 1e6:g}M rows): engine={h['engine']} vs {here}",
                f"{h['here_best_s'] * 1000:.0f} / {h['here_median_s'] * 1000:.0f}",
                f"{h['api_best_s'] * 1000:.0f} / {h['api_median_s'] * 1000:.0f}",
                f"x{h['ratio_best']:.2f} / x{h['ratio_median']:.2f}",
                f"{h['job_run_median_s'] * 1000:.0f} / {h['job_engine_median_s'] * 1000:.0f}",
            ]
        )
    print(
        table(
            ["", "direct ms best / median", "API ms best / median", "API / direct", "job run_s / engine ms"],
            rows,
        )
    )
    duck = [h for h in s["heavy"] if h["engine"] == "duckdb"]
    verdicts = ", ".join(
        f"{h['table']} x{h['ratio_median']:.2f} ({'met' if h['ratio_median'] <= TARGET_HEAVY_RATIO else 'MISSED'})"
        for h in duck
    )
    print(
        f"{s['big_rows']:,}-row bench_trips: {s['big_parquet_bytes'] / MB:.0f} MB of Parquet. "
        f"target: API <= x{TARGET_HEAVY_RATIO} direct DuckDB (median): {verdicts}"
    )

    d = s["download"]
    n = d["rows"]

    def line(label: str, item: dict[str, Any], baseline: dict[str, Any] | None) -> list[str]:
        seconds = item["seconds"]
        cpu = item["cpu_s"]
        vs = f"{baseline['seconds'] / seconds * 100:.0f} %" if baseline else "100 %"
        return [
            label,
            f"{seconds:.2f}",
            f"{item['bytes'] / MB:.0f}",
            f"{item['bytes'] / MB / seconds:.0f}",
            f"{n / seconds / 1e6:.2f}",
            vs,
            f"{cpu.get('execution', 0):.1f} / {cpu.get('gateway', 0):.1f} / {cpu.get('bench', 0):.1f}",
        ]

    print(f"\n(3) Results download: SELECT * FROM bench_trips, {n:,} rows; streamed to nowhere (httpx, bytes counted)")
    print(
        table(
            ["", "seconds", "MB", "MB/s", "M rows/s", "speed vs DuckDB", "CPU s execution / gateway / client"],
            [
                line("DuckDB here: COPY -> Parquet (baseline)", d["here_parquet"], None),
                line("job: submit -> result stored (Parquet)", d["job"], d["here_parquet"]),
                line("download Parquet, through the gateway", d["parquet_gateway"], d["here_parquet"]),
                line("download Parquet, straight to execution", d["parquet_direct"], d["here_parquet"]),
                line("job + Parquet download, end to end", _plus(d["job"], d["parquet_gateway"]), d["here_parquet"]),
                line("DuckDB here: COPY -> CSV (baseline)", d["here_csv"], None),
                line("download CSV, through the gateway", d["csv_gateway"], d["here_csv"]),
                line("job + CSV download, end to end", _plus(d["job"], d["csv_gateway"]), d["here_csv"]),
            ],
        )
    )
    job = d["job"]
    print(
        f"the job: queued {job['queued_s']:.3f} s, run {job['run_s']:.2f} s "
        f"(engine {job['stats'].get('elapsed_ms', 0) / 1000:.2f} s) for {job['bytes'] / MB:.0f} MB of Parquet"
    )

    here = s["throughput_here"]
    runs = s["throughput"]
    count = runs[0]["submitted"] if runs else 0
    print(f"\n(4) Job throughput: {count:,} small queries submitted at once ({IN_FLIGHT} in flight, wait_ms=0)")
    rows = [
        [
            "DuckDB here, sequential, fresh connection (baseline)",
            "",
            "",
            f"{here['fresh_s']:.2f}",
            f"{here['fresh_per_s']:.0f}",
            "100 %",
            "",
            "",
        ],
        [
            "DuckDB here, sequential, one connection",
            "",
            "",
            f"{here['one_s']:.2f}",
            f"{here['one_per_s']:.0f}",
            f"{here['one_per_s'] / here['fresh_per_s'] * 100:.0f} %",
            "",
            "",
        ],
    ]
    for r in runs:
        cpu = r["cpu_s"]
        exec_cpu = sum(v for k, v in cpu.items() if k.startswith("execution"))
        per_job = [
            exec_cpu,
            cpu.get("gateway", 0.0),
            cpu.get("datasets", 0.0),
            cpu.get("nats", 0.0),
            cpu.get("bench", 0.0),
        ]
        ok = "all" if r["all_succeeded"] else f"NO: {r['states']}, lost {r['lost']}, refused {r['refused']}"
        rows.append(
            [
                r["label"]
                + (
                    f" (taken: {'/'.join(str(v) for v in r['taken_by_replica'].values())})" if r["replicas"] > 1 else ""
                ),
                ok,
                f"{r['submit_s']:.2f}",
                f"{r['seconds']:.2f}",
                f"{r['jobs_per_s']:.0f}",
                f"{r['jobs_per_s'] / here['fresh_per_s'] * 100:.0f} %",
                f"{r['queued_p50_s']:.2f} / {r['run_p50_ms']:.0f}",
                " / ".join(f"{v / max(r['submitted'], 1) * 1000:.1f}" for v in per_job),
            ]
        )
    print(
        table(
            [
                "",
                "succeeded",
                "submit s",
                "to last end s",
                "jobs/s",
                "vs DuckDB",
                "queued p50 s / run p50 ms",
                "CPU ms/job exec / gw / datasets / nats / client",
            ],
            rows,
        )
    )
