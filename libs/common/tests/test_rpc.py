"""Typed request-reply over a real NATS server: results, errors as the caller sees them, load sharing, context."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from pydantic import BaseModel

from strata.common import tracing
from strata.common.context import request_id_var
from strata.common.errors import GatewayTimeout, NotFound, RemoteError, ServiceUnavailable
from strata.common.events import Bus
from strata.common.rpc import RpcClient, RpcServer


class Greet(BaseModel):
    name: str
    times: int = 1


class Greeting(BaseModel):
    text: str
    answered_by: str = ""
    trace_id: str | None = None
    request_id: str | None = None


class NotAGreet(BaseModel):
    nom: str
    times: str


@pytest.fixture(scope="module", autouse=True)
def _tracing() -> None:
    tracing.setup_tracing(service_name="test", mode="local")


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    b = Bus(nats_url, name=f"test-rpc-{uuid.uuid4().hex[:6]}")
    await b.start()
    assert b.is_connected
    yield b
    await b.close()


@pytest.fixture
def service() -> str:
    """A service name of this test's own (the session's NATS server is shared)."""
    return f"test{uuid.uuid4().hex[:10]}"


@pytest.fixture
def client(bus: Bus) -> RpcClient:
    return RpcClient(bus, default_timeout_s=2.0)


Handler = Callable[[Greet], Awaitable[Greeting]]
Serve = Callable[[Handler], Awaitable[RpcServer]]


@pytest.fixture
async def serve(bus: Bus, service: str) -> AsyncIterator[Serve]:
    """Start an RPC server of ``service`` answering ``greet`` with the given handler."""
    servers: list[RpcServer] = []

    async def start(handler: Handler) -> RpcServer:
        server = RpcServer(bus, service=service)
        server.register("greet", Greet, handler)
        await server.start()
        await bus.nc.flush()  # the subscription is known to the server before anyone calls
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


async def test_a_typed_round_trip(client: RpcClient, serve: Serve, service: str) -> None:
    async def greet(req: Greet) -> Greeting:
        return Greeting(text=" ".join([f"hello {req.name}"] * req.times))

    await serve(greet)
    result = await client.call(service, "greet", Greet(name="ada", times=2), Greeting)
    assert isinstance(result, Greeting)
    assert result.text == "hello ada hello ada"


async def test_a_strata_error_reaches_the_caller_with_its_status_and_code(
    client: RpcClient, serve: Serve, service: str
) -> None:
    async def missing(req: Greet) -> Greeting:
        raise NotFound(f"nobody called {req.name}", details=[{"name": req.name}])

    await serve(missing)
    with pytest.raises(RemoteError) as info:
        await client.call(service, "greet", Greet(name="bob"), Greeting)
    assert info.value.status == 404
    assert info.value.code == "NOT_FOUND"
    assert info.value.message == "nobody called bob"
    assert info.value.details == [{"name": "bob"}]


async def test_an_invalid_request_is_a_validation_error(client: RpcClient, serve: Serve, service: str) -> None:
    called: list[Greet] = []

    async def greet(req: Greet) -> Greeting:
        called.append(req)
        return Greeting(text="hi")

    await serve(greet)
    with pytest.raises(RemoteError) as info:
        await client.call(service, "greet", NotAGreet(nom="x", times="many"), Greeting)
    assert info.value.status == 422
    assert info.value.code == "VALIDATION_ERROR"
    locs = [d["loc"] for d in info.value.details]
    assert ["name"] in locs
    assert ["times"] in locs
    assert all("input" not in d for d in info.value.details)  # the offending values are not echoed back
    assert called == []


async def test_an_unexpected_exception_is_an_internal_error_that_reveals_nothing(
    client: RpcClient, serve: Serve, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(req: Greet) -> Greeting:
        raise RuntimeError("connect to postgresql://admin:hunter2@db:5432 failed")

    await serve(broken)
    with pytest.raises(RemoteError) as info:
        await client.call(service, "greet", Greet(name="eve"), Greeting)
    assert info.value.status == 500
    assert info.value.code == "INTERNAL_ERROR"
    assert info.value.message == "Internal error."
    assert info.value.details == []
    assert "hunter2" not in str(info.value)
    # ...but the server logged it, with the traceback, for its operators.
    [record] = [r for r in caplog.records if r.name == "strata.common.rpc" and r.exc_info]
    assert "hunter2" in str(record.exc_info[1])  # type: ignore[index]


async def test_a_slow_handler_is_a_gateway_timeout(client: RpcClient, serve: Serve, service: str) -> None:
    release = asyncio.Event()

    async def slow(req: Greet) -> Greeting:
        await release.wait()
        return Greeting(text="too late")

    await serve(slow)
    start = time.monotonic()
    try:
        with pytest.raises(GatewayTimeout) as info:
            await client.call(service, "greet", Greet(name="zed"), Greeting, timeout_s=0.3)
    finally:
        release.set()
    elapsed = time.monotonic() - start
    assert info.value.status == 504
    assert info.value.code == "UPSTREAM_TIMEOUT"
    assert service in info.value.message
    assert 0.3 <= elapsed < 1.5


async def test_no_responders_is_service_unavailable_at_once(client: RpcClient, service: str) -> None:
    start = time.monotonic()
    with pytest.raises(ServiceUnavailable) as info:
        await client.call(service, "greet", Greet(name="nobody"), Greeting, timeout_s=5.0)
    elapsed = time.monotonic() - start
    assert info.value.status == 503
    assert info.value.code == "SERVICE_UNAVAILABLE"
    assert service in info.value.message
    assert elapsed < 1.0  # not the 5 s timeout


async def test_servers_in_one_queue_group_share_the_requests(nats_url: str, client: RpcClient, service: str) -> None:
    buses = [Bus(nats_url, name=f"test-rpc-replica-{i}") for i in range(2)]
    servers: list[RpcServer] = []
    try:
        for i, b in enumerate(buses):
            await b.start()

            async def greet(req: Greet, replica: str = f"replica-{i}") -> Greeting:
                await asyncio.sleep(0)
                return Greeting(text=f"hello {req.name}", answered_by=replica)

            server = RpcServer(b, service=service)
            server.register("greet", Greet, greet)
            await server.start()
            await b.nc.flush()
            servers.append(server)

        results = await asyncio.gather(
            *(client.call(service, "greet", Greet(name=f"n{i}"), Greeting) for i in range(40))
        )
        assert [r.text for r in results] == [f"hello n{i}" for i in range(40)]  # each answered once, correctly
        by_replica = Counter(r.answered_by for r in results)
        assert set(by_replica) == {"replica-0", "replica-1"}, by_replica
        assert sum(by_replica.values()) == 40
    finally:
        for server in servers:
            await server.stop()
        for b in buses:
            await b.close()


async def test_trace_context_and_request_id_travel_to_the_handler(
    client: RpcClient, serve: Serve, service: str
) -> None:
    async def whoami(req: Greet) -> Greeting:
        trace_id, _ = tracing.current_ids()
        return Greeting(text="hi", trace_id=trace_id, request_id=request_id_var.get())

    await serve(whoami)
    token = request_id_var.set("req-1234")
    try:
        with tracing.tracer("test").start_as_current_span("caller"):
            caller_trace_id, _ = tracing.current_ids()
            result = await client.call(service, "greet", Greet(name="t"), Greeting)
    finally:
        request_id_var.reset(token)
    assert caller_trace_id is not None
    assert result.trace_id == caller_trace_id
    assert result.request_id == "req-1234"

    # Without a caller context the handler gets none (and not the previous request's).
    plain = await client.call(service, "greet", Greet(name="t"), Greeting)
    assert plain.request_id is None
    assert plain.trace_id != caller_trace_id
