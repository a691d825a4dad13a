"""Auth overhead: what verifying the caller's token costs the gateway, per call and in throughput.

1. **Microbenchmark**, in this process on a uvloop event loop: ``TokenVerifier.verify_header`` for a valid EdDSA
   access token (keys cached) and for an API key served from its cache, timed in batches against an ``async`` no-op in
   the same loop; the median per call over many batches. For reading the figure: the bare Ed25519 signature check
   (``cryptography``), one hit of the in-memory rate limiter, and the whole ``EdgeMiddleware`` around a no-op app.
2. **Throughput**: one upstream that verifies nothing (``bench._upstream``, a tiny ASGI echo app in its own uvicorn
   process) behind two gateway processes (``bench._gateway_variant``) built from the same settings: auth **on** (the
   gateway as it ships, trusting the JWKS of this run's ``TokenFactory``) and auth **off** (the same app with
   ``EdgeMiddleware`` removed). The same request, carrying the same valid token, is loaded on both with the same
   client and concurrency, in alternating rounds (off, on, off, on, ...); the median round of each is reported, with
   the ratio on/off and the CPU each gateway process used per request.

Rate limits are set high enough never to refuse (``1000000/s``), so the "on" gateway still pays for a hit per request,
as in production, without ever answering 429.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from strata.common.auth import TokenVerifier
from strata.common.contracts.auth import Identity, Role
from strata.common.procs import ServiceProcess, free_port, suite_env
from strata.common.testing import TokenFactory
from strata.gateway.edge import EdgeLimits, EdgeMiddleware
from strata.gateway.ratelimit import Limit, MemoryRateLimiter

from . import BENCH_ENV, ProcessStack, run_loop, table
from ._gateway_variant import AUTH_ENV, JWKS_FILE_ENV
from .gateway_overhead import WRK_SCRIPT, LoadResult, _cpu_seconds, _run_python_load, _wrk

PATH = "/api/v1/datasets/bench/echo"  # proxied to the "datasets" upstream, which is the echo app here
TARGET_THROUGHPUT_PCT = 95.0  # auth may cost at most 5 % of the gateway's throughput
NO_LIMIT = "1000000/s;burst=1000000"
API_KEY = "strata_benchkey_" + "s" * 43  # the shape of an API key: strata_<id>_<secret>


# -- 1. microbenchmark ----------------------------------------------------------------------------------------------
@dataclass
class MicroResult:
    label: str
    median_us: float
    p10_us: float
    p90_us: float
    calls: int
    baseline: str = ""  # the row this one is compared with
    net_us: float | None = None


async def _timed(fn: Callable[[Any], Awaitable[object]], arg: Any, n: int) -> float:
    """Seconds per call of ``await fn(arg)`` over ``n`` calls in a row."""
    clock = time.perf_counter
    t0 = clock()
    for _ in range(n):
        await fn(arg)
    return (clock() - t0) / n


async def _micro(batches: int, batch_size: int) -> list[MicroResult]:
    factory = TokenFactory()
    api_key_lookups = 0
    key_identity = Identity(user_id="user-2", role=Role.analyst, kind="api_key", token_id="benchkey")

    async def jwks_source() -> dict[str, Any]:
        return factory.jwks()

    async def api_key_source(key: str) -> Identity:
        nonlocal api_key_lookups
        api_key_lookups += 1
        return key_identity

    verifier = TokenVerifier(
        jwks_source=jwks_source,
        api_key_source=api_key_source,
        issuer=factory.issuer,
        audience=factory.audience,
        api_key_cache_ttl_s=3600,  # every timed call is a cache hit
    )
    if not await verifier.refresh_keys():
        raise RuntimeError("the verifier did not load the token factory's JWKS")
    token = factory.token(ttl_s=3600)
    jwt_header, key_header = f"Bearer {token}", f"Bearer {API_KEY}"
    for header in (jwt_header, key_header):  # valid, and the API key now cached
        await verifier.verify_header(header)

    signing_input, _, signature_b64 = token.rpartition(".")
    signature = base64.urlsafe_b64decode(signature_b64 + "=" * (-len(signature_b64) % 4))
    public_key = factory.key.public_key()

    async def noop(arg: object) -> object:
        return arg

    async def ed25519_only(message: bytes) -> None:
        public_key.verify(signature, message)

    limiter = MemoryRateLimiter()
    limit = Limit.parse(NO_LIMIT)

    async def rate_limit_hit(key: str) -> object:
        return await limiter.hit(key, limit)

    async def inner_app(scope: Any, receive: Any, send: Any) -> None:
        return None

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        return None

    edge = EdgeMiddleware(
        inner_app,
        verifier=lambda: verifier,
        limiter=lambda: limiter,
        limits=EdgeLimits(user=limit, anonymous=limit, token=limit),
    )
    request_headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"user-agent", b"bench"),
        (b"accept", b"application/json"),
        (b"authorization", jwt_header.encode()),
    ]

    def scope() -> dict[str, Any]:
        return {
            "type": "http",
            "method": "GET",
            "path": PATH,
            "headers": list(request_headers),
            "client": ("127.0.0.1", 40000),
        }

    async def app_alone(_: object) -> None:
        await inner_app(scope(), receive, send)

    async def app_behind_edge(_: object) -> None:
        await edge(scope(), receive, send)

    noop_label = "no-op: an async function returning at once (baseline)"
    app_label = "no-op ASGI app, same scope (baseline of the row below)"
    cases: list[tuple[str, Callable[[Any], Awaitable[object]], Any, str]] = [
        (noop_label, noop, jwt_header, ""),
        ("verify_header: EdDSA access token, keys cached", verifier.verify_header, jwt_header, noop_label),
        ("verify_header: API key, from its cache", verifier.verify_header, key_header, noop_label),
        (
            "  for reading: the Ed25519 signature check alone",
            ed25519_only,
            signing_input.encode(),
            noop_label,
        ),
        ("  for reading: MemoryRateLimiter.hit", rate_limit_hit, "user:user-1", noop_label),
        (app_label, app_alone, None, ""),
        ("EdgeMiddleware (token, rate limit, headers) around it", app_behind_edge, None, app_label),
    ]
    for _, fn, arg, _ in cases:  # warm-up
        await _timed(fn, arg, batch_size * 5)
    samples: dict[str, list[float]] = {label: [] for label, *_ in cases}
    for _ in range(batches):  # interleaved, so drift on the machine hits every case alike
        for label, fn, arg, _ in cases:
            samples[label].append(await _timed(fn, arg, batch_size) * 1e6)
    if api_key_lookups != 1:
        raise RuntimeError(f"the API key was looked up {api_key_lookups} times, not once: the cache was missed")

    results = []
    for label, _, _, baseline in cases:
        values = sorted(samples[label])
        results.append(
            MicroResult(
                label=label,
                median_us=statistics.median(values),
                p10_us=values[len(values) // 10],
                p90_us=values[len(values) * 9 // 10],
                calls=batches * batch_size,
                baseline=baseline,
            )
        )
    by_label = {r.label: r for r in results}
    for r in results:
        if r.baseline:
            r.net_us = r.median_us - by_label[r.baseline].median_us
    return results


def _run_micro(batches: int, batch_size: int) -> list[MicroResult]:
    return run_loop(_micro(batches, batch_size))


# -- 2. throughput --------------------------------------------------------------------------------------------------
@dataclass
class _ModuleProcess(ServiceProcess):
    """``python -m <module>`` (a bench helper, not a Strata service), with ServiceProcess's health wait and stop."""

    module: str = ""
    port_env: str = ""

    def start(self, *, pipe: bool = False) -> _ModuleProcess:
        env = {**os.environ, **self.env, self.port_env: str(self.port)}
        assert self.log_file is not None
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        out: IO[bytes] = self.log_file.open("ab")
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        finally:
            out.close()  # the child has its own copy
        return self


def _get(url: str, headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers=headers)  # our own loopback URL
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return int(resp.status), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read() or b"null")


class _Stack(ProcessStack):
    """nats-server, the echo upstream, and the gateway twice: auth off and auth on."""

    VARIANTS = ("off", "on")

    def __init__(self, root: Path, jwks_file: Path) -> None:
        super().__init__(root)
        self.jwks_file = jwks_file

    def start(self) -> None:
        self.nats.start()
        # Only "datasets" is used (PATH): it is the echo app. The other upstreams point at ports nobody listens on.
        ports = {"auth": free_port(), "datasets": free_port(), "execution": free_port(), "schemas": free_port()}
        bench_dir = str(Path(__file__).resolve().parent.parent)
        env = suite_env(
            data_dir=self.root / "data",
            nats_url=self.nats.url,
            ports=ports,
            extra={
                **BENCH_ENV,
                "STRATA_GATEWAY_RATE_LIMIT_USER": NO_LIMIT,
                "STRATA_GATEWAY_RATE_LIMIT_ANONYMOUS": NO_LIMIT,
                JWKS_FILE_ENV: str(self.jwks_file),
                "PYTHONPATH": os.pathsep.join(p for p in (bench_dir, os.environ.get("PYTHONPATH", "")) if p),
            },
        )
        self.procs["upstream"] = _ModuleProcess(
            "upstream",
            ports["datasets"],
            env,
            log_file=self.root / "logs" / "upstream.log",
            module="bench._upstream",
            port_env="STRATA_BENCH_PORT",
        ).start()
        for variant in self.VARIANTS:
            self.procs[variant] = _ModuleProcess(
                f"gateway-auth-{variant}",
                free_port(),
                {**env, AUTH_ENV: variant},
                log_file=self.root / "logs" / f"gateway-auth-{variant}.log",
                module="bench._gateway_variant",
                port_env="STRATA_GATEWAY_PORT",
            ).start()
        for proc in self.procs.values():
            proc.wait_healthy(timeout_s=60)


def _check(stack: _Stack, token_headers: dict[str, str]) -> None:
    """Both gateways proxy to the echo app; only the "on" one asks for a token."""
    expected = {"method": "GET", "path": PATH}
    checks = [("on", token_headers, 200), ("on", {}, 401), ("off", token_headers, 200), ("off", {}, 200)]
    for variant, headers, want in checks:
        url = stack.procs[variant].url + PATH
        status, body = _get(url, headers)
        if status != want or (want == 200 and body != expected):
            token = "with" if headers else "without"
            raise RuntimeError(f"gateway auth {variant}, {token} a token: {status} {body} (expected {want})")


@dataclass
class _Round:
    variant: str
    result: LoadResult
    cpu: dict[str, float] = field(default_factory=dict)


@dataclass
class _Pass:
    """One pass (a concurrency): its rounds, alternated off/on, and the figures reported."""

    connections: int
    rounds: list[_Round]

    def median_round(self, variant: str) -> LoadResult:
        ordered = sorted((r.result for r in self.rounds if r.variant == variant), key=lambda r: r.rps)
        return ordered[(len(ordered) - 1) // 2]

    def median_cpu(self, variant: str, process: str) -> float:
        return statistics.median(r.cpu.get(process, 0.0) for r in self.rounds if r.variant == variant)

    def pair_pcts(self) -> list[float]:
        offs, ons = self.rounds[::2], self.rounds[1::2]
        return [b.result.rps / a.result.rps * 100 for a, b in zip(offs, ons, strict=True) if a.result.rps]

    def summary(self) -> dict[str, Any]:
        off, on = self.median_round("off"), self.median_round("on")
        return {
            "off": asdict(off) | {"rps": round(off.rps, 1)},
            "on": asdict(on) | {"rps": round(on.rps, 1)},
            "throughput_pct": round(on.rps / off.rps * 100 if off.rps else 0.0, 1),
            "added_p50_ms": round(on.p50_ms - off.p50_ms, 3),
            "pair_pcts": [round(p, 1) for p in self.pair_pcts()],
            "gateway_cpu_us_per_req": {v: round(self.median_cpu(v, "gateway"), 1) for v in ("off", "on")},
            "upstream_cpu_us_per_req": {v: round(self.median_cpu(v, "upstream"), 1) for v in ("off", "on")},
            "rounds": [asdict(r.result) | {"variant": r.variant, "rps": round(r.result.rps, 1)} for r in self.rounds],
        }

    def table(self) -> str:
        off, on = self.median_round("off"), self.median_round("on")
        cpu = {v: (self.median_cpu(v, "gateway"), self.median_cpu(v, "upstream")) for v in ("off", "on")}

        def row(label: str, r: LoadResult, variant: str) -> list[object]:
            gw, up = cpu[variant]
            figures = [f"{r.rps:.0f}", f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}", r.errors]
            return [label, *figures, f"{gw:.0f}", f"{up:.0f}"]

        return table(
            ["", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "CPU µs/req gateway", "CPU µs/req upstream"],
            [
                row("gateway, auth off (baseline)", off, "off"),
                row("gateway, auth on", on, "on"),
                [
                    "auth on vs off",
                    f"{on.rps / off.rps * 100 if off.rps else 0.0:.1f} %",
                    f"{on.p50_ms - off.p50_ms:+.2f}",
                    f"{on.p90_ms - off.p90_ms:+.2f}",
                    f"{on.p99_ms - off.p99_ms:+.2f}",
                    "",
                    f"{cpu['on'][0] - cpu['off'][0]:+.0f}",
                    f"{cpu['on'][1] - cpu['off'][1]:+.0f}",
                ],
            ],
        )


def run(
    *,
    duration_s: float = 8.0,
    connections: int = 32,
    rounds: int = 3,
    warmup_s: float = 2.0,
    single_duration_s: float = 3.0,
    client: str = "auto",
    micro_batches: int = 500,
    micro_batch_size: int = 20,
) -> dict[str, Any]:
    use_wrk = client == "wrk" or (client == "auto" and shutil.which("wrk") is not None)
    if client == "wrk" and shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")

    # 1. First, while nothing else of ours runs.
    t0 = time.monotonic()
    micro = _run_micro(micro_batches, micro_batch_size)
    print(
        f"  microbenchmark: {micro_batches} batches of {micro_batch_size} calls per case, interleaved, "
        f"{time.monotonic() - t0:.1f}s",
        flush=True,
    )
    micro_table = table(
        ["", "µs/call (median)", "p10", "p90", "net of baseline"],
        [
            [
                r.label,
                f"{r.median_us:.2f}",
                f"{r.p10_us:.2f}",
                f"{r.p90_us:.2f}",
                "-" if r.net_us is None else f"{r.net_us:.2f}",
            ]
            for r in micro
        ],
    )
    print(micro_table, flush=True)

    # 2. Throughput, auth off vs on.
    root = Path(tempfile.mkdtemp(prefix="strata-bench-auth-"))
    factory = TokenFactory()
    jwks_file = root / "jwks.json"
    jwks_file.write_text(json.dumps(factory.jwks()))
    token_headers = {"Authorization": f"Bearer {factory.token(ttl_s=3600)}"}
    script = root / "report.lua"
    script.write_text(WRK_SCRIPT)
    stack = _Stack(root, jwks_file)
    passes: list[_Pass] = []
    try:
        t_start = time.monotonic()
        stack.start()
        _check(stack, token_headers)
        print(
            f"  started nats-server, upstream (echo), gateway auth off/on in {time.monotonic() - t_start:.1f}s; "
            f"client: {'wrk -t1' if use_wrk else 'python asyncio keep-alive'}; every request carries a valid token",
            flush=True,
        )
        pids = {name: stack.pid(name) for name in ("off", "on", "upstream")}

        def load(variant: str, conns: int, seconds: float) -> _Round:
            cpu0 = {n: _cpu_seconds(p) for n, p in pids.items()}
            if use_wrk:
                raw = _wrk(
                    stack.procs[variant].url + PATH,
                    connections=conns,
                    duration_s=seconds,
                    script=script,
                    headers=list(token_headers.items()),
                )
            else:
                raw = _run_python_load(
                    stack.procs[variant].port, conns, seconds, path=PATH, headers=list(token_headers.items())
                )
            result = LoadResult(target=f"auth {variant}", connections=conns, **raw)  # type: ignore[arg-type]
            cpu: dict[str, float] = {}
            if result.requests:
                cpu = {
                    "gateway": (_cpu_seconds(pids[variant]) - cpu0[variant]) / result.requests * 1e6,
                    "upstream": (_cpu_seconds(pids["upstream"]) - cpu0["upstream"]) / result.requests * 1e6,
                }
                result.cpu_us_per_req = {k: round(v, 1) for k, v in cpu.items()}
            print(
                f"    auth {variant:<3} c={conns:<3} {result.rps:9.1f} req/s  p50 {result.p50_ms:7.2f} ms  "
                f"p99 {result.p99_ms:7.2f} ms  errors {result.errors}  cpu µs/req {result.cpu_us_per_req}",
                flush=True,
            )
            return _Round(variant, result, cpu)

        print(f"  warm-up {warmup_s:g}s each", flush=True)
        for variant in stack.VARIANTS:
            load(variant, connections, warmup_s)
        for conns, seconds in ((connections, duration_s), (1, single_duration_s)):
            print(f"  {rounds} rounds each at {conns} connection(s), {seconds:g}s, alternated", flush=True)
            passes.append(_Pass(conns, [load(v, conns, seconds) for _ in range(rounds) for v in stack.VARIANTS]))
    except Exception:
        print(stack.log_tail())
        raise
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)

    loaded, single = passes
    pct = loaded.summary()["throughput_pct"]
    added_us = single.summary()["added_p50_ms"] * 1000
    edge_net = next(r.net_us for r in micro if r.label.startswith("EdgeMiddleware"))
    jwt_net = next(r.net_us for r in micro if r.label.startswith("verify_header: EdDSA"))
    ok = "met" if pct >= TARGET_THROUGHPUT_PCT else "MISSED"
    print(f"\nAuth overhead: GET {PATH} through the gateway to an echo upstream, auth off/on alternated")
    for p in passes:
        print(
            f"\n{p.connections} connection(s): median round of {rounds} by throughput (CPU: median of the rounds)",
            p.table(),
            f"on/off per pair of rounds: {', '.join(f'{x:.1f} %' for x in p.pair_pcts())}",
            sep="\n",
        )
    print(
        f"\nauth per request: {edge_net:.0f} µs in-process (EdgeMiddleware; verify_header {jwt_net:.0f} µs), "
        f"{added_us:+.0f} µs of p50 latency through the real gateway at 1 connection",
        f"target: auth costs < {100 - TARGET_THROUGHPUT_PCT:.0f} % of gateway throughput "
        f"(on/off >= {TARGET_THROUGHPUT_PCT:.0f} % at {connections} connections): {pct:.1f} % ({ok})",
        sep="\n",
    )
    return {
        "path": PATH,
        "client": "wrk" if use_wrk else "python",
        "rounds": rounds,
        "micro": [asdict(r) for r in micro],
        f"{connections} connections": loaded.summary(),
        "1 connection": single.summary(),
        "throughput_pct": pct,
        "target_met": pct >= TARGET_THROUGHPUT_PCT,
    }
