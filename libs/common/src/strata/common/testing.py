"""A pytest plugin (loaded with ``-p strata.common.testing``): real parts for tests.

- ``nats_server``: a real ``nats-server`` with JetStream on a free port (one per session;
  ``fresh_nats`` for one per test); ``bus``: a connected ``Bus`` on it.
- ``postgres_url``: a new database on the local PostgreSQL server, dropped afterwards. Skipped with a reason when no
  server answers, but a failure under ``CI=true``. ``database_url`` runs a test on SQLite and on PostgreSQL.
- ``s3_server``: a moto S3 server in its own process.
- ``start_service``: a Strata service as a real uvicorn process.
- :func:`app_client`: an ``httpx.AsyncClient`` on an app with its lifespan running.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from fastapi import FastAPI

from .procs import NatsServer, ServiceProcess, free_port, http_status

POSTGRES_ADMIN_URL = os.environ.get("STRATA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(store_dir=tmp_path_factory.mktemp("nats")).start()
    yield server
    server.stop()


@pytest.fixture
def fresh_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A NATS server of this test's own, which the test may stop and start again (same port, same store)."""
    server = NatsServer(store_dir=tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Any]:
    """A connected :class:`strata.common.events.Bus` (streams declared) on the session's NATS server."""
    from .events import Bus

    connected = Bus(nats_url, name=f"test-{uuid.uuid4().hex[:8]}")
    await connected.start()
    assert connected.is_connected, "could not connect to the test NATS server"
    yield connected
    await connected.close()


async def _pg_execute(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=3)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _run(coro: Any) -> Any:
    """Run a coroutine from a sync fixture, whether or not an event loop is running in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@pytest.fixture(scope="session")
def postgres_available() -> bool:
    try:
        _run(_pg_execute("SELECT 1"))
    except Exception as exc:  # any failure to reach the server means "absent"
        reason = f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {type(exc).__name__}: {exc}"
        if in_ci():
            pytest.fail(f"{reason} (CI=true: PostgreSQL is required)", pytrace=False)
        pytest.skip(reason)
    return True


@pytest.fixture
def postgres_url(postgres_available: bool) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test (asyncpg URL), dropped afterwards."""
    name = f"strata_test_{uuid.uuid4().hex[:12]}"
    _run(_pg_execute(f'CREATE DATABASE "{name}"'))
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    yield f"{base}/{name}"
    _run(_pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Runs the test once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server in its own process; yields its endpoint URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while http_status(url + "/moto-api/") is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Start ``python -m strata.<service>`` processes; all are stopped at the end of the test."""
    started: list[ServiceProcess] = []

    def start(service: str, env: dict[str, str], *, port: int | None = None, wait: bool = True) -> ServiceProcess:
        proc = ServiceProcess(
            service=service, port=port or free_port(), env=env, log_file=tmp_path / "logs" / f"{service}.log"
        ).start()
        started.append(proc)
        if wait:
            proc.wait_healthy()
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


@asynccontextmanager
async def app_client(app: FastAPI, **kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on ``app`` in process, with the app's lifespan (and so its runtime) running."""
    from asgi_lifespan import LifespanManager

    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", **kwargs) as client:
            yield client


async def eventually(check: Callable[[], Any], *, timeout_s: float = 10.0, interval_s: float = 0.05) -> Any:
    """Await ``check()`` (sync or async) until it returns something truthy; fail with its last value."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s (last: {last!r})")


@asynccontextmanager
async def serve_app(app: Any, *, lifespan: Literal["auto", "on", "off"] = "on") -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port inside this event loop; yields its base URL.

    Use it where the in-process transport would hide the behaviour under test: httpx's ``ASGITransport`` buffers
    whole responses, so streaming can only be seen over a real socket.
    """
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan=lifespan, access_log=False)
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn stopped before it started")
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


class TokenFactory:
    """Signs access tokens with a key of its own, for tests of a service without the auth service.

    ``install(app)`` makes the app's verifier trust this factory's JWKS instead of asking auth over NATS.
    """

    def __init__(self, *, issuer: str = "strata", audience: str = "strata-api") -> None:
        import json

        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from jwt.algorithms import OKPAlgorithm

        self.issuer, self.audience = issuer, audience
        self.key = Ed25519PrivateKey.generate()
        self.kid = uuid.uuid4().hex
        jwk = json.loads(OKPAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid=self.kid, alg="EdDSA", use="sig")
        self._jwks = {"keys": [jwk]}

    def jwks(self) -> dict[str, Any]:
        return self._jwks

    def token(self, *, user_id: str = "user-1", role: str = "admin", ttl_s: int = 300, **claims: Any) -> str:
        import jwt

        now = int(time.time())
        payload = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": user_id,
            "role": role,
            "sid": f"sid-{user_id}",
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": now + ttl_s,
            **claims,
        }
        return jwt.encode(payload, self.key, algorithm="EdDSA", headers={"kid": self.kid})

    def headers(self, **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(**kwargs)}"}

    def install(self, app: FastAPI) -> None:
        async def source() -> dict[str, Any]:
            return self._jwks

        app.state.runtime.verifier.jwks_source = source


async def stream_messages(js: Any, subject: str, stream: str = "STRATA_EVENTS") -> list[Any]:
    """Every message ``stream`` holds on ``subject`` (a filter, wildcards allowed), oldest first."""
    from nats.js.errors import NotFoundError

    found: list[Any] = []
    seq = 1
    while True:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
        except NotFoundError:
            return found
        found.append(msg)
        seq = msg.seq + 1
