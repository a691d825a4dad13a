"""Gateway overhead: the same small GET straight on the datasets service and through the gateway.

Starts ``nats-server``, the ``datasets`` service and the ``gateway`` as real processes (uvicorn, uvloop, httptools, as
``python -m strata.<service>`` runs them), then loads ``GET /api/v1/system/datasets/info`` on both with the same client
and the same concurrency, alternating direct and gateway rounds so that noise on the machine hits both alike. The best
round of each is reported (highest throughput), with the ratio gateway/direct and the latency the hop adds. A second
pass with one connection shows the latency of the hop itself, without queueing.

The client is ``wrk`` (one thread, ``--latency`` percentiles read from its Lua ``done`` hook) when it is installed,
else a cheap asyncio HTTP/1.1 keep-alive client (no pipelining) in this process. Either way it shares the machine's
cores with the processes it measures; the CPU each service process used per request is reported too (from /proc).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from strata.common.procs import SERVICES, ServiceProcess, free_port, suite_env

from . import BENCH_ENV, ProcessStack, percentile, run_loop, table

PATH = "/api/v1/system/datasets/info"
ADMIN = ("bench@example.com", "bench admin password 1")
TARGET_THROUGHPUT_PCT = 60.0
TARGET_ADDED_P50_MS = 1.0

WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,' ..
    '"max_us":%.1f,"mean_us":%.1f}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass
class LoadResult:
    target: str
    connections: int
    duration_s: float
    requests: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    cpu_us_per_req: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


# -- clients --------------------------------------------------------------------------------------------------------
def _wrk(
    url: str, *, connections: int, duration_s: float, script: Path, headers: Sequence[tuple[str, str]] = ()
) -> dict[str, float]:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s:g}s", "--timeout", "10s", "--latency", "-s", str(script)]
    for name, value in headers:
        args += ["-H", f"{name}: {value}"]
    proc = subprocess.run([*args, url], capture_output=True, text=True, timeout=duration_s + 60, check=True)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            raw = json.loads(line.removeprefix("BENCH_JSON "))
            return {
                "requests": raw["requests"],
                "duration_s": raw["duration_us"] / 1e6,
                "errors": raw["errors"],
                "p50_ms": raw["p50_us"] / 1000,
                "p90_ms": raw["p90_us"] / 1000,
                "p99_ms": raw["p99_us"] / 1000,
                "max_ms": raw["max_us"] / 1000,
            }
    raise RuntimeError(f"wrk printed no result:\n{proc.stdout}\n{proc.stderr}")


async def _python_load(
    host: str, port: int, path: str, connections: int, duration_s: float, headers: Sequence[tuple[str, str]] = ()
) -> dict[str, float]:
    """Closed-loop load on ``connections`` keep-alive connections: one request in flight on each, no pipelining."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: application/json\r\n{extra}\r\n".encode()
    latencies: list[float] = []
    errors = 0
    clock = time.perf_counter
    deadline = clock() + duration_s

    async def one_connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while clock() < deadline:
                t0 = clock()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                lower = head.lower()
                at = lower.find(b"\r\ncontent-length:")
                if at >= 0:
                    end = lower.index(b"\r\n", at + 2)
                    await reader.readexactly(int(lower[at + 17 : end]))
                else:  # chunked
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                        await reader.readexactly(size + 2)
                        if size == 0:
                            break
                latencies.append(clock() - t0)
                if status >= 400:
                    errors += 1
        finally:
            writer.close()

    started = clock()
    await asyncio.gather(*(one_connection() for _ in range(connections)))
    elapsed = clock() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "duration_s": elapsed,
        "errors": errors,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p90_ms": percentile(latencies, 90) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": latencies[-1] * 1000 if latencies else 0.0,
    }


def _run_python_load(
    url_port: int,
    connections: int,
    duration_s: float,
    *,
    path: str = PATH,
    headers: Sequence[tuple[str, str]] = (),
) -> dict[str, float]:
    return run_loop(_python_load("127.0.0.1", url_port, path, connections, duration_s, headers))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sign_in(auth_url: str) -> str:
    """An admin's access token, from the auth service's password flow (it may need a moment after start)."""
    form = urllib.parse.urlencode({"username": ADMIN[0], "password": ADMIN[1]}).encode()
    deadline = time.monotonic() + 30
    while True:
        try:
            request = urllib.request.Request(auth_url + "/api/v1/auth/token", data=form, method="POST")
            with urllib.request.urlopen(request, timeout=5) as resp:
                return str(json.loads(resp.read())["access_token"])
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _get_json(url: str, headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")


# -- the benchmark --------------------------------------------------------------------------------------------------
class _Stack(ProcessStack):
    def start(self) -> None:
        self.nats.start()
        ports = {name: free_port() for name in SERVICES}  # execution, schemas: unused ports
        extra = {**BENCH_ENV, "STRATA_ADMIN_EMAIL": ADMIN[0], "STRATA_ADMIN_PASSWORD": ADMIN[1]}
        env = suite_env(data_dir=self.root / "data", nats_url=self.nats.url, ports=ports, extra=extra)
        # auth too: the route needs an admin's token, verified by the gateway and again by the service.
        for name in ("auth", "datasets", "gateway"):
            proc = ServiceProcess(name, ports[name], env, log_file=self.root / "logs" / f"{name}.log").start()
            self.procs[name] = proc
            proc.wait_healthy(timeout_s=60)


def run(
    *,
    duration_s: float = 10.0,
    connections: int = 32,
    rounds: int = 2,
    warmup_s: float = 3.0,
    single_duration_s: float = 5.0,
    client: str = "auto",
) -> dict[str, Any]:
    use_wrk = client == "wrk" or (client == "auto" and shutil.which("wrk") is not None)
    if client == "wrk" and shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    root = Path(tempfile.mkdtemp(prefix="strata-bench-gateway-"))
    stack = _Stack(root)
    script = root / "report.lua"
    script.write_text(WRK_SCRIPT)
    try:
        t_start = time.monotonic()
        stack.start()
        token = _sign_in(stack.procs["auth"].url)
        headers = [("Authorization", f"Bearer {token}")]
        urls = {"direct": stack.procs["datasets"].url + PATH, "gateway": stack.procs["gateway"].url + PATH}
        for name, url in urls.items():
            status, body = _get_json(url, dict(headers))
            if status != 200 or not isinstance(body, dict) or body.get("service") != "datasets":
                raise RuntimeError(f"{name} {url} answered {status}: {body}")
        print(
            f"  started nats-server, datasets, gateway in {time.monotonic() - t_start:.1f}s; "
            f"client: {'wrk -t1' if use_wrk else 'python asyncio keep-alive'}",
            flush=True,
        )

        def load(target: str, conns: int, seconds: float) -> LoadResult:
            pids = {"datasets": stack.pid("datasets"), "gateway": stack.pid("gateway")}
            cpu0 = {n: _cpu_seconds(p) for n, p in pids.items()}
            if use_wrk:
                raw = _wrk(urls[target], connections=conns, duration_s=seconds, script=script, headers=headers)
            else:
                port = stack.procs["datasets" if target == "direct" else "gateway"].port
                raw = _run_python_load(port, conns, seconds, headers=headers)
            result = LoadResult(target=target, connections=conns, **raw)  # type: ignore[arg-type]
            if result.requests:
                result.cpu_us_per_req = {
                    n: round((_cpu_seconds(p) - cpu0[n]) / result.requests * 1e6, 1) for n, p in pids.items()
                }
            print(
                f"    {target:<8} c={conns:<3} {result.rps:9.1f} req/s  p50 {result.p50_ms:7.2f} ms  "
                f"p99 {result.p99_ms:7.2f} ms  errors {result.errors}  cpu/req {result.cpu_us_per_req}",
                flush=True,
            )
            return result

        print(f"  warm-up {warmup_s:g}s each", flush=True)
        load("direct", connections, warmup_s)
        load("gateway", connections, warmup_s)
        print(f"  {rounds} rounds each at {connections} connections, {duration_s:g}s", flush=True)
        loaded = [load(t, connections, duration_s) for _ in range(rounds) for t in ("direct", "gateway")]
        print(f"  {rounds} rounds each at 1 connection, {single_duration_s:g}s", flush=True)
        single = [load(t, 1, single_duration_s) for _ in range(rounds) for t in ("direct", "gateway")]
    except Exception:
        print(stack.log_tail())
        raise
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)

    def best(results: list[LoadResult], target: str) -> LoadResult:
        return max((r for r in results if r.target == target), key=lambda r: r.rps)

    summary: dict[str, Any] = {"path": PATH, "client": "wrk" if use_wrk else "python", "rounds": rounds}
    lines = []
    for label, results in ((f"{connections} connections", loaded), ("1 connection", single)):
        d, g = best(results, "direct"), best(results, "gateway")
        pct = g.rps / d.rps * 100 if d.rps else 0.0
        added_p50 = g.p50_ms - d.p50_ms
        added_p99 = g.p99_ms - d.p99_ms
        summary[label] = {
            "direct": asdict(d) | {"rps": round(d.rps, 1)},
            "gateway": asdict(g) | {"rps": round(g.rps, 1)},
            "throughput_pct": round(pct, 1),
            "added_p50_ms": round(added_p50, 3),
            "added_p99_ms": round(added_p99, 3),
        }
        ok_tp = "met" if pct >= TARGET_THROUGHPUT_PCT else "MISSED"
        ok_lat = "met" if added_p50 <= TARGET_ADDED_P50_MS else "MISSED"
        lines.append(f"\n{label} (best of {rounds} rounds of each, by throughput)")
        lines.append(
            table(
                ["", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "CPU µs/req gateway", "CPU µs/req datasets"],
                [
                    [
                        f"direct: datasets :{stack.procs['datasets'].port} (baseline)",
                        f"{d.rps:.0f}",
                        f"{d.p50_ms:.2f}",
                        f"{d.p90_ms:.2f}",
                        f"{d.p99_ms:.2f}",
                        d.errors,
                        f"{d.cpu_us_per_req.get('gateway', 0):.0f}",
                        f"{d.cpu_us_per_req.get('datasets', 0):.0f}",
                    ],
                    [
                        "via gateway",
                        f"{g.rps:.0f}",
                        f"{g.p50_ms:.2f}",
                        f"{g.p90_ms:.2f}",
                        f"{g.p99_ms:.2f}",
                        g.errors,
                        f"{g.cpu_us_per_req.get('gateway', 0):.0f}",
                        f"{g.cpu_us_per_req.get('datasets', 0):.0f}",
                    ],
                    [
                        "gateway vs direct",
                        f"{pct:.1f} %",
                        f"{added_p50:+.2f}",
                        f"{g.p90_ms - d.p90_ms:+.2f}",
                        f"{added_p99:+.2f}",
                        "",
                        "",
                        "",
                    ],
                ],
            )
        )
        lines.append(
            f"targets: throughput >= {TARGET_THROUGHPUT_PCT:.0f} % of direct: {pct:.1f} % ({ok_tp}); "
            f"added p50 <= {TARGET_ADDED_P50_MS:g} ms: {added_p50:+.2f} ms ({ok_lat})"
        )
    print(f"\nGateway overhead: GET {PATH}, same client, direct vs gateway alternated", "\n".join(lines), sep="")
    return summary
