"""Datasets: ingestion throughput and memory, and preview latency, against DuckDB measured alongside.

Starts ``nats-server``, the ``auth``, ``datasets`` and ``gateway`` services as real processes (the datasets service
storing under this run's temporary folder, ``file://``), signs in as the admin through the gateway, and generates a
taxi-trips-like table with DuckDB (deterministic: every value is a hash of the row number).

(1) **Ingestion.** The table as CSV (~1 GB; ~100 MB with ``--quick``). Baseline: DuckDB in this process,
    ``COPY (SELECT * FROM read_csv(path)) TO 'x.parquet' (FORMAT parquet, COMPRESSION zstd)`` with ``threads=2``, once
    before and once after the service's run (the ratio is against their mean). The service: the file uploaded through
    the gateway as a streamed multipart body (httpx reads it in 64 KiB pieces; nothing holds it whole), from the first
    byte until ``GET /api/v1/datasets/{id}`` says ``ready`` (polled every 100 ms), split into the upload (until the
    ``202``) and the ingestion (``202`` to ``ready``), the latter split again by the service's own progress events
    (``strata.datasets.dataset.progress``, read with a core NATS subscription). The resident memory of the datasets
    process (``VmRSS`` from /proc, its child processes included) is sampled every 50 ms: at idle before the upload,
    and its peak during each phase. The CPU time of each process is read around each phase.
(2) **Preview latency.** The same table with 1M rows, as Parquet, uploaded through the gateway; then
    ``GET /api/v1/datasets/{id}/preview?filter=fare_amount:gte:90&sort=-pickup_at&limit=50`` (about 10 % of the rows
    match, so the page is full and the service also counts the matches): 20 warm-up calls each, then 200 sequential
    calls each, through the gateway, straight to the datasets service (the baseline), and ``engine.preview`` in this
    process on the same Parquet file with a connection configured like the service's (the floor). The three are
    alternated in blocks of 50 so that noise on the machine hits them alike.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import httpx

from strata.common.procs import SERVICES, ServiceProcess, free_port, suite_env
from strata.datasets import engine

from . import BENCH_ENV, ProcessStack, percentile, table
from .gateway_overhead import _cpu_seconds

ADMIN = ("bench@example.com", "bench admin password 1")
TARGET_INGEST_PCT = 80.0
TARGET_PEAK_RSS_MB = 500.0
TARGET_PREVIEW_P99_MS = 100.0
PREVIEW_FILTER = "fare_amount:gte:90"
PREVIEW_SORT = "-pickup_at"
PREVIEW_LIMIT = 50
RSS_EVERY_S = 0.05
POLL_EVERY_S = 0.1
MB = 1e6  # sizes, throughput and memory in decimal megabytes, as the targets count
clock = time.perf_counter


def taxi_select(rows: int) -> str:
    """A taxi-trips-like table of ``rows`` rows: ints, floats, strings, timestamps, a boolean; about 105 bytes a row
    as CSV. Deterministic: every value derives from the row number (DuckDB's ``hash``)."""
    return f"""
SELECT
  i AS trip_id,
  1 + (hash(i) % 3)::INTEGER AS vendor_id,
  TIMESTAMP '2025-01-01 00:00:00' + to_seconds((i * 31536000 // {rows} + hash(i, 1) % 600)::BIGINT) AS pickup_at,
  TIMESTAMP '2025-01-01 00:00:00'
    + to_seconds((i * 31536000 // {rows} + hash(i, 1) % 600 + 120 + hash(i, 2) % 3600)::BIGINT) AS dropoff_at,
  1 + (hash(i, 3) % 6)::INTEGER AS passenger_count,
  round((hash(i, 4) % 300000) / 10000.0, 2) AS trip_distance,
  'zone_' || lpad((hash(i, 5) % 263)::VARCHAR, 3, '0') AS pickup_zone,
  'zone_' || lpad((hash(i, 6) % 263)::VARCHAR, 3, '0') AS dropoff_zone,
  ['card', 'cash', 'no_charge', 'dispute'][1 + (hash(i, 7) % 4)::INTEGER] AS payment_type,
  round(3 + (hash(i, 8) % 9700) / 100.0, 2) AS fare_amount,
  round((hash(i, 9) % 2000) / 100.0, 2) AS tip_amount,
  round(3 + (hash(i, 8) % 9700) / 100.0 + (hash(i, 9) % 2000) / 100.0 + 1.5, 2) AS total_amount,
  hash(i, 10) % 5 = 0 AS airport
FROM range({rows}) t(i)
"""


def _duck(threads: int = 2) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(
        config={"threads": threads, "autoinstall_known_extensions": False, "autoload_known_extensions": False}
    )


def _literal(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


# -- memory and CPU of processes (Linux /proc) ----------------------------------------------------------------------
def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
        for child in children:
            out += [child, *_descendants(child)]
    return out


def tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants, KiB."""
    return sum(_rss_kib(p) for p in [pid, *_descendants(pid)])


def _machine_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all cores; steal included), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class RssSampler(threading.Thread):
    """Samples the RSS (with descendants) of named processes every ``every_s`` into ``samples``: (t, {name: KiB})."""

    def __init__(self, pids: dict[str, int], every_s: float = RSS_EVERY_S) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pids = pids
        self.every_s = every_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        next_at = clock()
        while not self._stop_event.is_set():
            self.samples.append((clock(), {name: tree_rss_kib(pid) for name, pid in self.pids.items()}))
            next_at += self.every_s
            self._stop_event.wait(max(0.0, next_at - clock()))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)

    def peak_mb(self, name: str, t0: float = 0.0, t1: float = float("inf")) -> float:
        """The highest sample between ``t0`` and ``t1``, in MB (10^6 bytes, as the target counts)."""
        values = [s[name] for t, s in self.samples if t0 <= t <= t1 and name in s]
        return max(values, default=0) * 1024 / MB

    def median_mb(self, name: str, t0: float = 0.0, t1: float = float("inf")) -> float:
        values = [s[name] for t, s in self.samples if t0 <= t <= t1 and name in s]
        return statistics.median(values) * 1024 / MB if values else 0.0

    def count(self, t0: float, t1: float) -> int:
        return sum(1 for t, _ in self.samples if t0 <= t <= t1)


class CpuMeter:
    """CPU seconds each process used between ``mark`` calls."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.marks: list[dict[str, float]] = []

    def mark(self) -> dict[str, float]:
        now = {name: _cpu_seconds(pid) for name, pid in self.pids.items()}
        self.marks.append(now)
        return now

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {name: round(after[name] - before[name], 2) for name in before}


# -- the service's progress events ----------------------------------------------------------------------------------
class ProgressWatch(threading.Thread):
    """A core NATS subscription to ``strata.datasets.dataset.>`` in a thread: when each event arrived here, as
    (perf_counter, type, dataset_id, stage). Progress events go straight to the bus; the others through the outbox."""

    def __init__(self, url: str) -> None:
        super().__init__(name="progress-watch", daemon=True)
        self.url = url
        self.events: list[tuple[float, str, str, str]] = []
        self.ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported, never fatal: the split is a detail
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        import nats

        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        nc = await nats.connect(self.url, name="bench-progress")

        async def on_msg(msg: Any) -> None:
            at = clock()
            try:
                body = json.loads(msg.data)
                data = body.get("data") or {}
                self.events.append(
                    (at, str(body.get("type", msg.subject)), data.get("dataset_id", ""), data.get("stage", ""))
                )
            except ValueError:
                pass

        await nc.subscribe("strata.datasets.dataset.>", cb=on_msg)
        await nc.flush()
        self.ready.set()
        await self._done.wait()
        await nc.drain()

    def stop(self) -> None:
        if self._loop is not None and self._done is not None:
            self._loop.call_soon_threadsafe(self._done.set)
        self.join(5)

    def first(self, dataset_id: str, *, stage: str = "", type_suffix: str = ".progress") -> float | None:
        for at, type_, ds, st in self.events:
            if ds == dataset_id and type_.endswith(type_suffix) and (not stage or st == stage):
                return at
        return None


# -- the stack and the client ---------------------------------------------------------------------------------------
class _Stack(ProcessStack):
    def start(self) -> None:
        self.nats.start()
        ports = {name: free_port() for name in SERVICES}  # execution, schemas: unused ports
        extra = {
            **BENCH_ENV,
            "STRATA_ADMIN_EMAIL": ADMIN[0],
            "STRATA_ADMIN_PASSWORD": ADMIN[1],
            "STRATA_DATASETS_STORAGE_URL": (self.root / "storage").as_uri(),
            "STRATA_DATASETS_DEMO_DATA": "false",
        }
        env = suite_env(data_dir=self.root / "data", nats_url=self.nats.url, ports=ports, extra=extra)
        for name in ("auth", "datasets", "gateway"):
            proc = ServiceProcess(name, ports[name], env, log_file=self.root / "logs" / f"{name}.log").start()
            self.procs[name] = proc
            proc.wait_healthy(timeout_s=60)


def _sign_in(client: httpx.Client, gateway: str) -> str:
    """An admin's access token, from ``POST /api/v1/auth/token`` through the gateway (auth may need a moment)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            resp = client.post(
                gateway + "/api/v1/auth/token", data={"username": ADMIN[0], "password": ADMIN[1]}, timeout=10
            )
            if resp.status_code == 200:
                return str(resp.json()["access_token"])
            error = f"{resp.status_code} {resp.text[:300]}"
        except httpx.HTTPError as exc:
            error = repr(exc)
        if time.monotonic() > deadline:
            raise RuntimeError(f"sign-in through the gateway failed: {error}")
        time.sleep(0.3)


@dataclass
class UploadRun:
    dataset_id: str
    started: float  # perf_counter at the first byte
    accepted: float  # the 202
    ready: float  # the poll that saw "ready"
    body: dict[str, Any] = field(default_factory=dict)


def _upload_and_wait(
    client: httpx.Client,
    gateway: str,
    path: Path,
    *,
    fmt: str,
    name: str,
    timeout_s: float,
    on_accepted: Callable[[float], None] | None = None,
) -> UploadRun:
    """Upload ``path`` as a streamed multipart body through the gateway, then poll until it is ready."""
    url = gateway + "/api/v1/datasets"
    with path.open("rb") as fh:  # httpx streams a file object in 64 KiB reads (Content-Length from fstat)
        started = clock()
        resp = client.post(
            url,
            data={"name": name, "format": fmt},
            files={"file": (path.name, fh, "application/octet-stream")},
            timeout=httpx.Timeout(timeout_s, connect=10),
        )
        accepted = clock()
    if resp.status_code != 202:
        raise RuntimeError(f"upload answered {resp.status_code}: {resp.text[:1000]}")
    if on_accepted is not None:
        on_accepted(accepted)
    dataset_id = str(resp.json()["id"])
    deadline = time.monotonic() + timeout_s
    next_poll = clock()
    while True:
        next_poll += POLL_EVERY_S
        resp = client.get(f"{url}/{dataset_id}", timeout=30)
        body = resp.json()
        if resp.status_code != 200:
            raise RuntimeError(f"GET {dataset_id} answered {resp.status_code}: {body}")
        if body.get("status") == "ready":
            return UploadRun(dataset_id, started, accepted, clock(), body)
        if body.get("status") == "failed":
            raise RuntimeError(f"ingestion of {path.name} failed: {body.get('error')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path.name} still {body.get('status')} after {timeout_s:.0f}s")
        time.sleep(max(0.0, next_poll - clock()))


# -- the benchmark --------------------------------------------------------------------------------------------------
@dataclass
class Latencies:
    name: str
    values_ms: list[float] = field(default_factory=list)

    def stats(self) -> dict[str, float]:
        v = sorted(self.values_ms)
        return {
            "calls": len(v),
            "p50_ms": round(percentile(v, 50), 2),
            "p90_ms": round(percentile(v, 90), 2),
            "p99_ms": round(percentile(v, 99), 2),
            "max_ms": round(v[-1], 2) if v else 0.0,
            "mean_ms": round(statistics.fmean(v), 2) if v else 0.0,
        }


@contextmanager
def _timed(label: str) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    print(f"  {label} in {time.monotonic() - t0:.1f}s", flush=True)


def _wait_profile(client: httpx.Client, gateway: str, dataset_id: str, timeout_s: float = 300) -> float:
    """Seconds until the dataset's profile is there (it is computed after the version is ready)."""
    started = time.monotonic()
    while client.get(f"{gateway}/api/v1/datasets/{dataset_id}/profile", timeout=30).status_code == 409:
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"no profile for {dataset_id} after {timeout_s:.0f}s")
        time.sleep(0.2)
    return time.monotonic() - started


def _baseline(csv_path: Path, out: Path, sampler: RssSampler, cpu: CpuMeter) -> dict[str, Any]:
    """DuckDB's own CSV -> Parquet on the same file, in this process, threads=2."""
    con = _duck(threads=2)
    machine0, cpu0, procs0 = _machine_cpu_s(), time.process_time(), cpu.mark()
    try:
        t0 = clock()
        con.execute(
            f"COPY (SELECT * FROM read_csv({_literal(csv_path)})) TO {_literal(out)} (FORMAT parquet, COMPRESSION zstd)"
        )
        seconds = clock() - t0
    finally:
        con.close()
    own = time.process_time() - cpu0
    services = sum(v for name, v in CpuMeter.spent(procs0, cpu.mark()).items() if name != "bench")
    size = csv_path.stat().st_size
    result = {
        "seconds": round(seconds, 3),
        "mb_per_s": round(size / MB / seconds, 1),
        "parquet_bytes": out.stat().st_size,
        "peak_rss_mb": round(sampler.peak_mb("bench", t0, clock()), 1),
        "cpu_s": round(own, 2),
        # Anything else on the machine meanwhile (steal included): the services, and whatever is not ours.
        "services_cpu_s": round(services, 2),
        "other_cpu_s": round(_machine_cpu_s() - machine0 - own - services, 2),
    }
    out.unlink()
    return result


def run(
    *,
    csv_rows: int = 10_000_000,
    preview_rows: int = 1_000_000,
    preview_calls: int = 200,
    warmup_calls: int = 20,
    block: int = 50,
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="strata-bench-datasets-"))
    stack = _Stack(root)
    work = root / "bench"
    work.mkdir()
    summary: dict[str, Any] = {"csv_rows": csv_rows, "preview_rows": preview_rows}
    sampler: RssSampler | None = None
    watch: ProgressWatch | None = None
    client = httpx.Client()
    try:
        with _timed("started nats-server, auth, datasets, gateway"):
            stack.start()
        gateway = stack.procs["gateway"].url
        direct = stack.procs["datasets"].url
        token = _sign_in(client, gateway)
        client.headers["Authorization"] = f"Bearer {token}"
        watch = ProgressWatch(stack.nats.url)
        watch.start()
        watch.ready.wait(10)

        csv_path = work / "trips.csv"
        preview_path = work / "trips_1m.parquet"
        with _timed(f"generated {csv_rows:,} rows as CSV and {preview_rows:,} as Parquet with DuckDB"):
            con = _duck(threads=2)
            try:
                con.execute(f"COPY ({taxi_select(csv_rows)}) TO {_literal(csv_path)} (HEADER true)")
                con.execute(
                    f"COPY ({taxi_select(preview_rows)}) TO {_literal(preview_path)} (FORMAT parquet, COMPRESSION zstd)"
                )
            finally:
                con.close()
        csv_bytes = csv_path.stat().st_size
        summary["csv_bytes"] = csv_bytes
        print(f"  CSV {csv_bytes / MB:.0f} MB, preview Parquet {preview_path.stat().st_size / MB:.1f} MB", flush=True)

        pids = {
            "datasets": stack.pid("datasets"),
            "gateway": stack.pid("gateway"),
            "bench": os.getpid(),
        }
        cpu_pids = {**pids, "nats": stack.nats.process.pid if stack.nats.process else 0}
        sampler = RssSampler(pids)
        sampler.start()
        cpu = CpuMeter(cpu_pids)

        # (1) ingestion ---------------------------------------------------------------------------------------------
        before = _baseline(csv_path, work / "baseline.parquet", sampler, cpu)
        print(
            f"  baseline DuckDB read_csv -> Parquet (before): {before['seconds']:.2f}s, {before['mb_per_s']} MB/s, "
            f"CPU {before['cpu_s']}s; meanwhile, CPU of the services {before['services_cpu_s']}s, "
            f"of everything else {before['other_cpu_s']}s",
            flush=True,
        )
        time.sleep(1.0)  # idle RSS of the datasets process
        idle_t1 = clock()
        idle_rss = sampler.median_mb("datasets", idle_t1 - 1.0, idle_t1)
        marks: dict[str, float] = {}

        cpu0 = cpu.mark()
        cpu_at_202: dict[str, float] = {}

        def accepted(_: float) -> None:
            cpu_at_202.update(cpu.mark())

        run1 = _upload_and_wait(
            client, gateway, csv_path, fmt="csv", name="bench trips", timeout_s=900, on_accepted=accepted
        )
        cpu1 = cpu.mark()
        # The profile follows `ready` in the service: let it finish (not timed), or the second baseline competes.
        profiled_s = _wait_profile(client, gateway, run1.dataset_id)
        print(f"  the profile followed ready by {profiled_s:.1f}s", flush=True)
        after = _baseline(csv_path, work / "baseline.parquet", sampler, cpu)
        print(
            f"  baseline DuckDB read_csv -> Parquet (after):  {after['seconds']:.2f}s, {after['mb_per_s']} MB/s, "
            f"CPU {after['cpu_s']}s; meanwhile, CPU of the services {after['services_cpu_s']}s, "
            f"of everything else {after['other_cpu_s']}s",
            flush=True,
        )

        upload_s = run1.accepted - run1.started
        ingest_s = run1.ready - run1.accepted
        total_s = run1.ready - run1.started
        base_s = (before["seconds"] + after["seconds"]) / 2
        base_mbps = csv_bytes / MB / base_s
        total_mbps = csv_bytes / MB / total_s
        pct = total_mbps / base_mbps * 100
        rows_seen = run1.body.get("row_count")
        if rows_seen != csv_rows:
            raise RuntimeError(f"the service counted {rows_seen} rows, not {csv_rows}")
        for stage in ("reading", "profiling", "storing", "ready"):
            at = watch.first(run1.dataset_id, stage=stage)
            if at is not None:
                marks[stage] = at
        ready_event = watch.first(run1.dataset_id, type_suffix=".ready")
        if ready_event is not None:
            marks["ready event"] = ready_event
        peak_upload = sampler.peak_mb("datasets", run1.started, run1.accepted)
        peak_ingest = sampler.peak_mb("datasets", run1.accepted, run1.ready)
        peak_all = max(peak_upload, peak_ingest)
        phases: list[tuple[str, float, float | None]] = []
        points = [("202", run1.accepted)] + [(k, v) for k, v in marks.items()] + [("poll", run1.ready)]
        points = [p for p in points if run1.accepted <= p[1] <= run1.ready + 1]
        labels = {
            ("202", "reading"): "queued: 202 -> worker starts",
            ("reading", "profiling"): "convert CSV -> Parquet (+ row count)",
            ("profiling", "storing"): "schema + profile (2 scans)",
            ("storing", "ready event"): "copy Parquet to storage + commit + relay",
            ("storing", "ready"): "copy Parquet to storage + commit",
            ("ready", "ready event"): "outbox relay of dataset.ready",
            ("ready event", "poll"): "until the poll sees it",
            ("ready", "poll"): "until the poll sees it",
        }
        points.sort(key=lambda p: p[1])
        for (a, ta), (b, tb) in itertools.pairwise(points):
            peak = sampler.peak_mb("datasets", ta, tb) if sampler.count(ta, tb) else None  # None: too short to sample
            phases.append((labels.get((a, b), f"{a} -> {b}"), tb - ta, peak))

        summary["ingest"] = {
            "baseline_before": before,
            "baseline_after": after,
            "baseline_mean_s": round(base_s, 3),
            "upload_s": round(upload_s, 3),
            "ingest_s": round(ingest_s, 3),
            "total_s": round(total_s, 3),
            "total_mb_per_s": round(total_mbps, 1),
            "pct_of_duckdb": round(pct, 1),
            "ingest_only_pct_of_duckdb": round(base_s / ingest_s * 100, 1),
            "phases": [
                {"phase": label, "seconds": round(seconds, 3), "datasets_peak_rss_mb": peak and round(peak, 1)}
                for label, seconds, peak in phases
            ],
            "datasets_rss_mb": {
                "idle": round(idle_rss, 1),
                "peak_upload": round(peak_upload, 1),
                "peak_ingest": round(peak_ingest, 1),
                "peak": round(peak_all, 1),
            },
            "gateway_peak_rss_mb": round(sampler.peak_mb("gateway", run1.started, run1.ready), 1),
            "rss_samples": sampler.count(run1.started, run1.ready),
            "cpu_s_upload": CpuMeter.spent(cpu0, cpu_at_202),
            "cpu_s_ingest": CpuMeter.spent(cpu_at_202, cpu1),
            "parquet_bytes": run1.body.get("bytes"),
            "rows": rows_seen,
            "columns": [f"{c['name']} {c['type']}" for c in run1.body.get("columns") or []],
        }

        # (2) preview latency ---------------------------------------------------------------------------------------
        with _timed(f"uploaded the {preview_rows:,}-row Parquet through the gateway to ready"):
            run2 = _upload_and_wait(client, gateway, preview_path, fmt="parquet", name="bench trips 1M", timeout_s=300)
        if run2.body.get("row_count") != preview_rows:
            raise RuntimeError(f"preview dataset has {run2.body.get('row_count')} rows, not {preview_rows}")
        stored = root / "storage" / "datasets" / run2.dataset_id / "v1" / "data.parquet"
        if not stored.exists():
            found = list((root / "storage" / "datasets" / run2.dataset_id).rglob("data.parquet"))
            if not found:
                raise RuntimeError(f"no data.parquet under {root / 'storage' / 'datasets' / run2.dataset_id}")
            stored = found[0]
        params = {"filter": PREVIEW_FILTER, "sort": PREVIEW_SORT, "limit": str(PREVIEW_LIMIT)}
        path = f"/api/v1/datasets/{run2.dataset_id}/preview"
        check = client.get(gateway + path, params=params, timeout=30)
        if check.status_code != 200 or len(check.json().get("data", [])) != PREVIEW_LIMIT:
            raise RuntimeError(f"preview answered {check.status_code}: {check.text[:500]}")
        meta = check.json()["meta"]
        summary["preview_total_rows"] = meta.get("total_rows")

        # The floor: engine.preview in this process, a connection set up like the service's (threads=2, 1GB).
        duck = engine.connect(threads=2, memory_limit="1GB")
        filters = [engine.parse_filter(PREVIEW_FILTER)]
        sort = [(PREVIEW_SORT.lstrip("-"), PREVIEW_SORT.startswith("-"))]

        def in_process() -> None:
            cur = duck.cursor()
            try:
                page = engine.preview(
                    cur, stored, columns=None, filters=filters, sort=sort, limit=PREVIEW_LIMIT, offset=0
                )
            finally:
                cur.close()
            if len(page.rows) != PREVIEW_LIMIT:
                raise RuntimeError("engine.preview returned a short page")

        def over_http(base: str) -> Callable[[], None]:
            def call() -> None:
                resp = client.get(base + path, params=params, timeout=30)
                if resp.status_code != 200:
                    raise RuntimeError(f"{base}{path} answered {resp.status_code}: {resp.text[:300]}")
                resp.read()

            return call

        cases: dict[str, Callable[[], None]] = {
            "engine.preview in process (floor)": in_process,
            "straight to datasets (baseline)": over_http(direct),
            "through the gateway": over_http(gateway),
        }
        try:
            lat = {name: Latencies(name) for name in cases}
            with _timed(f"preview: {warmup_calls} warm-up + {preview_calls} calls on each of {len(cases)} paths"):
                for fn in cases.values():
                    for _ in range(warmup_calls):
                        fn()
                cpu_p0 = cpu.mark()
                preview_t0 = clock()
                done = 0
                while done < preview_calls:
                    n = min(block, preview_calls - done)
                    for name, fn in cases.items():
                        for _ in range(n):
                            t0 = clock()
                            fn()
                            lat[name].values_ms.append((clock() - t0) * 1000)
                    done += n
                cpu_p1 = cpu.mark()
                summary["preview_datasets_peak_rss_mb"] = round(sampler.peak_mb("datasets", preview_t0, clock()), 1)
        finally:
            duck.close()
        summary["preview"] = {name: item.stats() for name, item in lat.items()}
        summary["preview_cpu_s"] = CpuMeter.spent(cpu_p0, cpu_p1)
        summary["preview_query"] = f"{path}?filter={PREVIEW_FILTER}&sort={PREVIEW_SORT}&limit={PREVIEW_LIMIT}"
    except Exception:
        print(stack.log_tail())
        raise
    finally:
        if sampler is not None:
            sampler.stop()
        if watch is not None:
            watch.stop()
        client.close()
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)

    _print(summary)
    return summary


def _print(s: dict[str, Any]) -> None:
    ing = s["ingest"]
    size_mb = s["csv_bytes"] / MB
    b0, b1 = ing["baseline_before"], ing["baseline_after"]
    rss = ing["datasets_rss_mb"]
    up_cpu, in_cpu = ing["cpu_s_upload"], ing["cpu_s_ingest"]
    print(f"\nIngestion: {s['csv_rows']:,}-row CSV, {size_mb:.0f} MB, to Parquet (zstd)")
    print(
        table(
            ["", "seconds", "MB/s", "vs DuckDB", "datasets peak RSS MB", "CPU s datasets / gateway / client"],
            [
                [
                    "DuckDB read_csv -> Parquet, threads=2, before",
                    f"{b0['seconds']:.2f}",
                    f"{b0['mb_per_s']:.0f}",
                    "",
                    f"(this process: {b0['peak_rss_mb']:.0f})",
                    "",
                ],
                [
                    "DuckDB read_csv -> Parquet, threads=2, after",
                    f"{b1['seconds']:.2f}",
                    f"{b1['mb_per_s']:.0f}",
                    "",
                    f"(this process: {b1['peak_rss_mb']:.0f})",
                    "",
                ],
                [
                    "DuckDB, mean (baseline)",
                    f"{ing['baseline_mean_s']:.2f}",
                    f"{size_mb / ing['baseline_mean_s']:.0f}",
                    "100 %",
                    "",
                    "",
                ],
                [
                    "service: upload through the gateway (to 202)",
                    f"{ing['upload_s']:.2f}",
                    f"{size_mb / ing['upload_s']:.0f}",
                    "",
                    f"{rss['peak_upload']:.0f}",
                    f"{up_cpu['datasets']:.1f} / {up_cpu['gateway']:.1f} / {up_cpu['bench']:.1f}",
                ],
                [
                    "service: ingestion (202 to ready)",
                    f"{ing['ingest_s']:.2f}",
                    f"{size_mb / ing['ingest_s']:.0f}",
                    f"{ing['ingest_only_pct_of_duckdb']:.1f} %",
                    f"{rss['peak_ingest']:.0f}",
                    f"{in_cpu['datasets']:.1f} / {in_cpu['gateway']:.1f} / {in_cpu['bench']:.1f}",
                ],
                [
                    "service: upload start to ready",
                    f"{ing['total_s']:.2f}",
                    f"{ing['total_mb_per_s']:.0f}",
                    f"{ing['pct_of_duckdb']:.1f} %",
                    f"{rss['peak']:.0f}",
                    "",
                ],
            ],
        )
    )
    print("\nIngestion, 202 to ready, by the service's progress events (arrival here)")
    print(
        table(
            ["phase", "seconds", "datasets peak RSS MB"],
            [
                [
                    p["phase"],
                    f"{p['seconds']:.2f}",
                    f"{p['datasets_peak_rss_mb']:.0f}" if p["datasets_peak_rss_mb"] else "-",
                ]
                for p in ing["phases"]
            ],
        )
    )
    print(
        f"datasets RSS: idle {rss['idle']:.0f} MB, peak {rss['peak']:.0f} MB "
        f"({ing['rss_samples']} samples every {RSS_EVERY_S * 1000:.0f} ms); "
        f"gateway peak {ing['gateway_peak_rss_mb']:.0f} MB"
    )
    ok_tp = "met" if ing["pct_of_duckdb"] >= TARGET_INGEST_PCT else "MISSED"
    ok_rss = "met" if rss["peak"] < TARGET_PEAK_RSS_MB else "MISSED"
    print(
        f"targets: throughput >= {TARGET_INGEST_PCT:.0f} % of DuckDB's: {ing['pct_of_duckdb']:.1f} % ({ok_tp}); "
        f"peak RSS < {TARGET_PEAK_RSS_MB:.0f} MB: {rss['peak']:.0f} MB ({ok_rss})"
    )

    pv = s["preview"]
    names = list(pv)
    floor, base, gw = (pv[n] for n in names)
    print(
        f"\nPreview latency: {s['preview_rows']:,} rows, {s['preview_query'].split('?')[1]} "
        f"(total_rows {s['preview_total_rows']}), sequential, one keep-alive connection"
    )
    rows = []
    for name in names:
        st = pv[name]
        rows.append(
            [
                name,
                st["calls"],
                f"{st['p50_ms']:.2f}",
                f"{st['p90_ms']:.2f}",
                f"{st['p99_ms']:.2f}",
                f"{st['max_ms']:.2f}",
            ]
        )
    rows.append(
        [
            "gateway vs direct",
            "",
            f"{gw['p50_ms'] - base['p50_ms']:+.2f}",
            f"{gw['p90_ms'] - base['p90_ms']:+.2f}",
            f"{gw['p99_ms'] - base['p99_ms']:+.2f}",
            "",
        ]
    )
    rows.append(
        [
            "direct vs in process",
            "",
            f"{base['p50_ms'] - floor['p50_ms']:+.2f}",
            f"{base['p90_ms'] - floor['p90_ms']:+.2f}",
            f"{base['p99_ms'] - floor['p99_ms']:+.2f}",
            "",
        ]
    )
    print(table(["", "calls", "p50 ms", "p90 ms", "p99 ms", "max ms"], rows))
    cpu = s["preview_cpu_s"]
    print(f"CPU s during the timed calls: {cpu}; datasets peak RSS {s['preview_datasets_peak_rss_mb']:.0f} MB")
    ok_p99 = "met" if gw["p99_ms"] < TARGET_PREVIEW_P99_MS else "MISSED"
    print(f"target: p99 through the gateway < {TARGET_PREVIEW_P99_MS:.0f} ms: {gw['p99_ms']:.1f} ms ({ok_p99})")
