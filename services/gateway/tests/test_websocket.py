"""``WS /api/v1/ws``: sign-in, channels and their authorization, ordered delivery with JetStream sequences, resume with
``since``, coalescing and overflow for slow clients, revocations, expiry, limits and heartbeats.

The gateway runs in this process under uvicorn (a real socket) against the session's NATS server; the execution and
datasets services are stand-ins answering their ``rpc.*.can_read*`` verbs on the same NATS, and events are published
to JetStream as the services publish them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from strata.common.contracts.auth import SessionRevoked, UserDeactivated, UserDemoted
from strata.common.contracts.datasets import DatasetReady, DatasetShared
from strata.common.contracts.execution import JobEvent, JobProgress
from strata.common.contracts.realtime import ReadCheck, ReadVerdict, SharedWith, SharedWithRequest
from strata.common.events import EVENTS_STREAM, Bus, CloudEvent
from strata.common.procs import free_port
from strata.common.rpc import RpcServer
from strata.common.testing import TokenFactory, eventually
from strata.gateway.app import create_app
from strata.gateway.config import Settings
from strata.gateway.live import Hub, LiveEvent

TOKENS = TokenFactory()
ALICE, BOB = "alice-" + uuid.uuid4().hex[:8], "bob-" + uuid.uuid4().hex[:8]


@dataclass
class Services:
    """Stand-ins for execution and datasets: who owns which job and dataset, and what is shared with whom."""

    jobs: dict[str, str] = field(default_factory=dict)  # job -> owner
    datasets: dict[str, str] = field(default_factory=dict)  # dataset -> owner
    readers: dict[str, set[str]] = field(default_factory=dict)  # dataset -> users it is shared with
    calls: int = 0

    async def can_read_job(self, check: ReadCheck) -> ReadVerdict:
        self.calls += 1
        owner = self.jobs.get(check.resource_id)
        ok = owner is not None and (owner == check.user_id or check.role.value == "admin")
        return ReadVerdict(readable=ok, owner_id=owner if ok else None)

    async def can_read_dataset(self, check: ReadCheck) -> ReadVerdict:
        self.calls += 1
        owner = self.datasets.get(check.resource_id)
        ok = owner is not None and (
            owner == check.user_id or check.user_id in self.readers.get(check.resource_id, set())
        )
        return ReadVerdict(readable=ok, owner_id=owner if ok else None)

    async def shared_with(self, request: SharedWithRequest) -> SharedWith:
        return SharedWith(dataset_ids=sorted(d for d, users in self.readers.items() if request.user_id in users))


@pytest.fixture
async def services(bus: Bus) -> AsyncIterator[Services]:
    state = Services()
    execution, datasets = RpcServer(bus, service="execution"), RpcServer(bus, service="datasets")
    execution.register("can_read_job", ReadCheck, state.can_read_job)
    datasets.register("can_read", ReadCheck, state.can_read_dataset)
    datasets.register("shared_with", SharedWithRequest, state.shared_with)
    await execution.start()
    await datasets.start()
    yield state
    await execution.stop()
    await datasets.stop()


@asynccontextmanager
async def gateway(tmp_path: Path, nats_url: str, **overrides: Any) -> AsyncIterator[str]:
    """The gateway under uvicorn with its own WebSocket options; yields the ws:// URL of /api/v1/ws."""
    settings = Settings(data_dir=tmp_path, nats_url=nats_url, instance_id=f"gw-{uuid.uuid4().hex[:8]}", **overrides)
    app = create_app(settings)
    TOKENS.install(app)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, lifespan="on", **settings.uvicorn_options()
    )  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"ws://127.0.0.1:{port}/api/v1/ws"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def ws_url(tmp_path: Path, nats_url: str, services: Services) -> AsyncIterator[str]:
    async with gateway(tmp_path, nats_url, ws_auth_timeout_s=1.0) as url:
        yield url


def token(user: str = ALICE, role: str = "analyst", **claims: Any) -> str:
    return TOKENS.token(user_id=user, role=role, **claims)


async def signed_in(url: str, user: str = ALICE, role: str = "analyst", **kw: Any) -> ClientConnection:
    ws = await connect(url, **kw)
    await ws.send(json.dumps({"type": "auth", "token": token(user, role)}))
    welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome" and welcome["user_id"] == user, welcome
    return ws


async def recv(ws: ClientConnection, timeout_s: float = 5.0) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout_s))
    return message


async def subscribe(ws: ClientConnection, channel: str, **kw: Any) -> dict[str, Any]:
    request_id = uuid.uuid4().hex
    await ws.send(json.dumps({"type": "subscribe", "channel": channel, "id": request_id, **kw}))
    while True:
        answer = await recv(ws)
        if answer.get("id") == request_id:
            return answer


async def events(ws: ClientConnection, n: int, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while len(got) < n:
        message = await recv(ws, timeout_s)
        if "seq" in message and "channel" in message and "event" in message:
            got.append(message)
    return got


async def closed_with(ws: ClientConnection, timeout_s: float = 5.0) -> int | None:
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout_s)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None


async def publish_job(bus: Bus, job: str, state: str, owner: str = ALICE, **extra: Any) -> int:
    payload = JobEvent(job_id=job, owner_id=owner, kind="query", engine="duckdb", state=state, **extra)
    event = CloudEvent.of(payload, source="/strata/execution", subject=job, type=f"strata.execution.job.{state}")
    return (await bus.publish_event(event)).seq


async def publish_progress(bus: Bus, job: str, fraction: float, owner: str = ALICE) -> int:
    payload = JobProgress(job_id=job, owner_id=owner, fraction=fraction, elapsed_s=fraction)
    return (await bus.publish_event(CloudEvent.of(payload, source="/strata/execution", subject=job))).seq


async def publish_raw(bus: Bus, subject: str, event_type: str, data: dict[str, Any]) -> int:
    """An event with a payload the model would not carry (padding, to fill socket buffers)."""
    body = {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": "/strata/test",
        "type": event_type,
        "time": "2026-01-01T00:00:00+00:00",
        "data": data,
    }
    return (await bus.js.publish(subject, json.dumps(body).encode())).seq


async def stalled_socket(url: str, services: Services) -> tuple[ClientConnection, str]:
    """A socket following a new job of ALICE's whose client has stopped reading (a busy browser tab)."""
    job = new_job(services)
    ws = await signed_in(url, max_size=None)
    await subscribe(ws, f"job:{job}")
    ws.transport.pause_reading()
    return ws, job


def new_job(services: Services, owner: str = ALICE) -> str:
    job = uuid.uuid4().hex
    services.jobs[job] = owner
    return job


# -- connecting ------------------------------------------------------------------------------------------------------
async def test_origin_must_be_allowed(ws_url: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(ws_url, origin="https://evil.example")  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    ws = await signed_in(ws_url, origin="http://localhost:5173")  # type: ignore[arg-type]
    await ws.close()
    same_origin = ws_url.replace("ws://", "http://").removesuffix("/api/v1/ws")
    ws = await signed_in(ws_url, origin=same_origin)  # type: ignore[arg-type]
    await ws.close()


async def test_authentication_first_message_cookie_and_failures(ws_url: str) -> None:
    ws = await connect(ws_url)  # says nothing
    assert await closed_with(ws) == 4408
    ws = await connect(ws_url)
    await ws.send(json.dumps({"type": "subscribe", "channel": "user"}))
    assert await closed_with(ws) == 4401
    for bad in ("junk", token(ttl_s=-120), TokenFactory().token()):
        ws = await connect(ws_url)
        await ws.send(json.dumps({"type": "auth", "token": bad}))
        assert await closed_with(ws) == 4401
    ws = await connect(ws_url)
    await ws.send("not json")
    assert await closed_with(ws) == 4401
    ws = await connect(ws_url, additional_headers={"Cookie": f"strata_access={token()}"})
    welcome = await recv(ws)
    assert welcome["type"] == "welcome" and welcome["user_id"] == ALICE and welcome["role"] == "analyst"
    await ws.close()


async def test_bad_messages_get_errors_and_the_socket_stays(ws_url: str, services: Services) -> None:
    ws = await signed_in(ws_url)
    await ws.send("{")
    assert (await recv(ws))["error"]["code"] == "BAD_MESSAGE"
    await ws.send(b"\x00binary")
    assert (await recv(ws))["error"]["code"] == "BAD_MESSAGE"
    await ws.send(json.dumps({"type": "dance", "id": 1}))
    answer = await recv(ws)
    assert answer["error"]["code"] == "BAD_MESSAGE" and answer["id"] == 1
    for channel in ("job:a.b", "job:*", "job:>", "job:", "dataset:" + "x" * 65, "users", "job", 7):
        answer = await subscribe(ws, channel)  # type: ignore[arg-type]
        assert answer["type"] == "error" and answer["error"]["code"] == "INVALID_CHANNEL", (channel, answer)
    for since in (-1, "5", True, 1.5):
        answer = await subscribe(ws, "user", since=since)
        assert answer["error"]["code"] == "INVALID_SINCE", since
    await ws.send(json.dumps({"type": "ping", "id": "p"}))
    assert await recv(ws) == {"type": "pong", "id": "p"}
    await ws.close()


# -- channels --------------------------------------------------------------------------------------------------------
async def test_job_events_arrive_in_order_with_their_stream_sequence(ws_url: str, services: Services, bus: Bus) -> None:
    job = new_job(services)
    ws = await signed_in(ws_url)
    answer = await subscribe(ws, f"job:{job}")
    assert answer["type"] == "subscribed" and answer["recovered"] is True
    other = new_job(services)  # another job of the same user: not on this channel
    seqs = [await publish_job(bus, job, "queued")]
    await publish_job(bus, other, "queued")
    seqs.append(await publish_job(bus, job, "running"))
    seqs.append(await publish_progress(bus, job, 0.5))
    seqs.append(await publish_job(bus, job, "succeeded", rows=3))
    got = await events(ws, 4)
    assert [m["seq"] for m in got] == seqs
    assert [m["type"] for m in got] == [
        "strata.execution.job.queued",
        "strata.execution.job.running",
        "strata.execution.job.progress",
        "strata.execution.job.succeeded",
    ]
    assert all(m["channel"] == f"job:{job}" for m in got)
    assert got[-1]["event"]["data"]["rows"] == 3 and got[-1]["event"]["subject"] == job
    # The same sequence numbers as JetStream holds (what GET /jobs/{id}/events returns).
    stored = await bus.js.get_msg(EVENTS_STREAM, seqs[-1])
    assert json.loads(stored.data or b"{}")["id"] == got[-1]["event"]["id"]
    await ws.close()


async def test_another_users_job_or_dataset_is_refused(ws_url: str, services: Services, bus: Bus) -> None:
    job = new_job(services, owner=ALICE)
    services.datasets["ds-" + job] = ALICE
    ws = await signed_in(ws_url, user=BOB)
    for channel in (f"job:{job}", f"dataset:ds-{job}", "job:does-not-exist"):
        answer = await subscribe(ws, channel)
        assert answer["type"] == "error" and answer["error"]["code"] == "CHANNEL_NOT_FOUND", answer
        assert answer["channel"] == channel
    await publish_job(bus, job, "queued")
    await ws.send(json.dumps({"type": "ping"}))
    assert (await recv(ws))["type"] == "pong"  # nothing of alice's job came first
    admin = await signed_in(ws_url, user="root-" + job[:6], role="admin")
    assert (await subscribe(admin, f"job:{job}"))["type"] == "subscribed"
    await ws.close()
    await admin.close()


async def test_user_channel_carries_own_and_shared_things_only(ws_url: str, services: Services, bus: Bus) -> None:
    mine, theirs = new_job(services, ALICE), new_job(services, BOB)
    shared, later, private = (uuid.uuid4().hex for _ in range(3))
    services.datasets.update({shared: BOB, later: BOB, private: BOB})
    services.readers[shared] = {ALICE}
    ws = await signed_in(ws_url)
    assert (await subscribe(ws, "user"))["recovered"] is True

    def ready(dataset: str) -> DatasetReady:
        return DatasetReady(dataset_id=dataset, owner_id=BOB, version=1, name="d", rows=1, bytes=1, columns=[])

    async def publish(payload: Any) -> int:
        event = CloudEvent.of(payload, source="/strata/datasets", subject=payload.dataset_id)
        return (await bus.publish_event(event)).seq

    expected = [await publish_job(bus, mine, "queued")]
    await publish_job(bus, theirs, "queued", owner=BOB)
    expected.append(await publish(ready(shared)))
    await publish(ready(private))
    await publish(ready(later))  # not shared yet
    grant = DatasetShared(
        dataset_id=later, owner_id=BOB, version=1, name="d", grantee_type="user", grantee=ALICE, permission="read"
    )
    await publish(DatasetShared(**{**grant.model_dump(), "grantee": "someone-else"}))
    expected.append(await publish(grant))
    # Once granted, the dataset's own events follow, right after the grant (no pause): the channel holds its live
    # events while it reads what the dataset had since the grant.
    expected.append(await publish(ready(later)))
    await publish(ready(private))
    expected.append(await publish_job(bus, mine, "running"))
    got = await events(ws, 5)
    assert [m["seq"] for m in got] == expected
    await ws.close()


async def test_reconnect_with_since_gets_every_missed_event_exactly_once(
    ws_url: str, services: Services, bus: Bus
) -> None:
    job = new_job(services)
    ws = await signed_in(ws_url)
    await subscribe(ws, f"job:{job}")
    first = [await publish_job(bus, job, "queued"), await publish_job(bus, job, "running")]
    got = await events(ws, 2)
    assert [m["seq"] for m in got] == first
    ws.transport.abort()  # the connection is lost, no close handshake
    missed = [await publish_progress(bus, job, i / 10) for i in range(1, 6)]
    ws = await signed_in(ws_url)
    answer = await subscribe(ws, f"job:{job}", since=first[-1])
    assert answer["type"] == "subscribed" and answer["recovered"] is True and answer["seq"] == first[-1]
    replayed = await events(ws, 5)
    assert [m["seq"] for m in replayed] == missed
    live = await publish_job(bus, job, "succeeded")
    assert [m["seq"] for m in await events(ws, 1)] == [live]
    await ws.send(json.dumps({"type": "ping"}))
    assert (await recv(ws))["type"] == "pong"  # and nothing twice before it
    # since=0: everything of the channel still retained.
    again = await signed_in(ws_url)
    await subscribe(again, f"job:{job}", since=0)
    assert [m["seq"] for m in await events(again, 8)] == [*first, *missed, live]
    await ws.close()
    await again.close()


async def test_unsubscribe_and_subscribe_twice(ws_url: str, services: Services, bus: Bus) -> None:
    job = new_job(services)
    ws = await signed_in(ws_url)
    await subscribe(ws, f"job:{job}")
    again = await subscribe(ws, f"job:{job}")
    assert again["type"] == "subscribed" and again["already"] is True
    await ws.send(json.dumps({"type": "unsubscribe", "channel": f"job:{job}", "id": "u"}))
    assert await recv(ws) == {"type": "unsubscribed", "channel": f"job:{job}", "id": "u"}
    await publish_job(bus, job, "queued")
    await ws.send(json.dumps({"type": "ping"}))
    assert (await recv(ws))["type"] == "pong"
    await ws.close()


async def test_dataset_subscriber_who_loses_the_share_is_unsubscribed(
    ws_url: str, services: Services, bus: Bus
) -> None:
    dataset = uuid.uuid4().hex
    services.datasets[dataset] = BOB
    services.readers[dataset] = {ALICE}
    ws = await signed_in(ws_url)
    assert (await subscribe(ws, f"dataset:{dataset}"))["type"] == "subscribed"
    services.readers[dataset] = set()
    unshare = DatasetShared(
        dataset_id=dataset, owner_id=BOB, version=1, name="d", grantee_type="user", grantee=ALICE, permission=None
    )
    await bus.publish_event(CloudEvent.of(unshare, source="/strata/datasets", subject=dataset))
    assert (await recv(ws))["type"] == "strata.datasets.dataset.shared"  # the event itself, then the consequence
    assert await recv(ws) == {"type": "unsubscribed", "channel": f"dataset:{dataset}", "reason": "access_revoked"}
    await ws.close()


# -- slow clients ----------------------------------------------------------------------------------------------------
PAD = "x" * 60_000  # big frames fill the socket buffers quickly


async def test_slow_client_gets_coalesced_progress_but_every_state_change(
    tmp_path: Path, nats_url: str, services: Services, bus: Bus
) -> None:
    async with gateway(tmp_path, nats_url, ws_max_queue=200) as url:
        job = new_job(services)
        ws = await signed_in(url, max_size=None)
        await subscribe(ws, f"job:{job}")
        ws.transport.pause_reading()  # the browser tab is busy
        subject = f"strata.execution.job.%s.{ALICE}.{job}"
        states, progress = [], []
        for i in range(120):
            if i % 30 == 0:
                states.append(await publish_raw(bus, subject % "running", "strata.execution.job.running", {"i": i}))
            progress.append(
                await publish_raw(bus, subject % "progress", "strata.execution.job.progress", {"i": i, "pad": PAD})
            )
        states.append(await publish_raw(bus, subject % "succeeded", "strata.execution.job.succeeded", {}))
        await asyncio.sleep(1.0)
        ws.transport.resume_reading()
        got: list[dict[str, Any]] = []
        while not got or got[-1]["seq"] != states[-1]:
            got.extend(await events(ws, 1))
        seqs = [m["seq"] for m in got]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert [s for s in seqs if s in states] == states  # every state change, in order
        got_progress = [s for s in seqs if s in progress]
        assert len(got_progress) < len(progress)  # coalesced...
        assert got_progress[-1] == progress[-1]  # ...latest wins
        await ws.close()


async def test_client_whose_queue_overflows_is_closed_and_resumes(
    tmp_path: Path, nats_url: str, services: Services, bus: Bus
) -> None:
    async with gateway(tmp_path, nats_url, ws_max_queue=20) as url:
        ws, job = await stalled_socket(url, services)
        subject = f"strata.execution.job.running.{ALICE}.{job}"
        published = [
            await publish_raw(bus, subject, "strata.execution.job.running", {"i": i, "pad": PAD}) for i in range(150)
        ]
        ws.transport.resume_reading()
        got: list[int] = []
        try:
            while True:
                message = await recv(ws)
                if "seq" in message:
                    got.append(message["seq"])
        except ConnectionClosed as exc:
            assert exc.rcvd is not None and exc.rcvd.code == 4500, exc
        assert len(got) < len(published)
        ws = await signed_in(url, max_size=None)
        assert (await subscribe(ws, f"job:{job}", since=got[-1] if got else published[0] - 1))["recovered"]
        rest = await events(ws, len(published) - len(got))
        assert got + [m["seq"] for m in rest] == published
        await ws.close()


# -- sessions --------------------------------------------------------------------------------------------------------
async def test_deactivated_demoted_or_logged_out_users_are_closed(ws_url: str, services: Services, bus: Bus) -> None:
    carol, dave, erin = (f"{n}-{uuid.uuid4().hex[:6]}" for n in ("carol", "dave", "erin"))
    carol_ws = await signed_in(ws_url, user=carol)
    dave_ws = await signed_in(ws_url, user=dave, role="admin")
    session = uuid.uuid4().hex
    erin_token = TOKENS.token(user_id=erin, role="analyst", sid=session)
    erin_ws = await connect(ws_url)
    await erin_ws.send(json.dumps({"type": "auth", "token": erin_token}))
    assert (await recv(erin_ws))["type"] == "welcome"
    bystander = await signed_in(ws_url, user=ALICE)

    def user_event(kind: type[Any], user: str, role: str, **extra: Any) -> CloudEvent:
        payload = kind(user_id=user, email=f"{user}@x.io", role=role, is_active=kind is not UserDeactivated, **extra)
        return CloudEvent.of(payload, source="/strata/auth", subject=user)

    await bus.publish_event(user_event(UserDeactivated, carol, "analyst"))
    assert await closed_with(carol_ws) == 4403
    await bus.publish_event(user_event(UserDemoted, dave, "viewer", previous_role="admin"))
    assert await closed_with(dave_ws) == 4403
    revoked = SessionRevoked(user_id=erin, session_id=session, reason="logout")
    await bus.publish_event(CloudEvent.of(revoked, source="/strata/auth", subject=erin))
    assert await closed_with(erin_ws) == 4403
    # Their old tokens no longer open a socket; a new viewer token for dave does.
    for user, role, old in (
        (carol, "analyst", token(carol)),
        (dave, "admin", token(dave, "admin")),
        (erin, "analyst", erin_token),
    ):
        ws = await connect(ws_url)
        await ws.send(json.dumps({"type": "auth", "token": old}))
        assert await closed_with(ws) == 4403, (user, role)
    ws = await signed_in(ws_url, user=dave, role="viewer")
    await ws.close()
    await bystander.send(json.dumps({"type": "ping"}))
    assert (await recv(bystander))["type"] == "pong"
    await bystander.close()


async def test_token_expiry_warns_then_closes_unless_renewed(tmp_path: Path, nats_url: str, services: Services) -> None:
    async with gateway(tmp_path, nats_url, ws_token_expiring_s=1.5) as url:
        ws = await connect(url)
        await ws.send(json.dumps({"type": "auth", "token": TOKENS.token(user_id=ALICE, role="analyst", ttl_s=2)}))
        assert (await recv(ws))["type"] == "welcome"
        assert (await recv(ws))["type"] == "token_expiring"
        await ws.send(json.dumps({"type": "auth", "token": TOKENS.token(user_id=ALICE, role="analyst", ttl_s=3)}))
        assert (await recv(ws))["type"] == "welcome"
        assert (await recv(ws))["type"] == "token_expiring"
        assert await closed_with(ws) == 4401
        # Re-authenticating as someone else ends the socket.
        ws = await signed_in(url)
        await ws.send(json.dumps({"type": "auth", "token": token(BOB)}))
        assert await closed_with(ws) == 4401


async def test_per_user_connection_limit(tmp_path: Path, nats_url: str, services: Services) -> None:
    async with gateway(tmp_path, nats_url, ws_max_connections_per_user=2) as url:
        first, second = await signed_in(url), await signed_in(url)
        third = await connect(url)
        await third.send(json.dumps({"type": "auth", "token": token()}))
        assert await closed_with(third) == 4429
        other = await signed_in(url, user=BOB)  # the limit is per user
        await first.close()
        await asyncio.sleep(0.1)
        again = await signed_in(url)
        for ws in (second, other, again):
            await ws.close()


async def test_dead_connection_is_closed_by_the_heartbeat(tmp_path: Path, nats_url: str, services: Services) -> None:
    async with gateway(tmp_path, nats_url, ws_ping_interval_s=0.2, ws_ping_timeout_s=0.3) as url:
        ws = await signed_in(url, ping_interval=None)
        ws.transport.pause_reading()  # never answers the pings
        lost = await asyncio.wait_for(_metric(url, 'strata_ws_disconnects_total{reason="connection_lost"}'), 5)
        assert lost >= 1
        ws.transport.abort()


async def _metric(ws_url: str, name: str) -> float:
    import httpx

    base = ws_url.replace("ws://", "http://").removesuffix("/api/v1/ws")
    async with httpx.AsyncClient() as client:
        while True:
            text = (await client.get(base + "/metrics")).text
            for line in text.splitlines():
                if line.startswith(name + " "):
                    value = float(line.split()[-1])
                    if value > 0:
                        return value
            await asyncio.sleep(0.1)


async def test_metrics_count_connections_messages_and_latency(ws_url: str, services: Services, bus: Bus) -> None:
    job = new_job(services)
    ws = await signed_in(ws_url)
    await subscribe(ws, f"job:{job}")
    await publish_job(bus, job, "queued")
    await events(ws, 1)
    assert await _metric(ws_url, "strata_ws_connections") >= 1
    assert await _metric(ws_url, 'strata_ws_subscriptions{kind="job"}') >= 1
    assert await _metric(ws_url, 'strata_ws_messages_sent_total{kind="event"}') >= 1
    assert await _metric(ws_url, "strata_ws_fanout_latency_seconds_count") >= 1
    await ws.close()


# -- the hub ---------------------------------------------------------------------------------------------------------
class RecordingSink:
    """Takes what the hub routes, each sequence once and in order, as a channel does."""

    def __init__(self) -> None:
        self.seqs: list[int] = []

    def offer(self, event: LiveEvent, via: str) -> None:
        if not self.seqs or event.seq > self.seqs[-1]:
            self.seqs.append(event.seq)

    def resync(self) -> None:
        raise AssertionError("nothing is too much here")


async def test_hub_catches_up_what_its_subscriptions_missed(bus: Bus) -> None:
    """After a NATS reconnect the hub reads from JetStream what was stored while its core subscriptions were away."""
    sink = RecordingSink()
    got = sink.seqs
    hub = Hub(bus)
    job = uuid.uuid4().hex
    await hub.add(f"strata.execution.job.*.*.{job}", sink)
    seen = await publish_job(bus, job, "queued")
    await eventually(lambda: got == [seen])
    await hub._interests[f"strata.execution.job.*.*.{job}"].sub.unsubscribe()  # as if the connection dropped
    missed = [await publish_job(bus, job, s) for s in ("running", "succeeded")]
    await publish_job(bus, uuid.uuid4().hex, "queued")  # not this sink's
    await hub.catch_up()
    assert got == [seen, *missed]


def test_progress_frames_are_built_once_per_channel() -> None:
    body = {"type": "strata.execution.job.progress", "time": "2026-01-01T00:00:00+00:00", "data": {"a": 1}}
    event = LiveEvent.parse(7, "strata.execution.job.progress.u.j", json.dumps(body).encode())
    assert event is not None and event.progress
    frame: Callable[[str], str] = event.frame
    assert frame("job:j") is frame("job:j")
    assert json.loads(frame("job:j")) == {"channel": "job:j", "seq": 7, "type": body["type"], "event": body}
    assert LiveEvent.parse(8, "s", b"not json") is None


# -- what cannot be replayed -----------------------------------------------------------------------------------------
async def test_resume_after_retention_removed_events_says_recovered_false(tmp_path: Path, fresh_nats: Any) -> None:
    own_bus = Bus(fresh_nats.url, name="test-retention")
    await own_bus.start()
    state = Services()
    execution = RpcServer(own_bus, service="execution")
    execution.register("can_read_job", ReadCheck, state.can_read_job)
    await execution.start()
    try:
        async with gateway(tmp_path, fresh_nats.url) as url:
            job = new_job(state)
            seqs = [await publish_job(own_bus, job, s) for s in ("queued", "running")]
            for i in range(5):
                await publish_progress(own_bus, job, i / 10)
            await own_bus.js.purge_stream(EVENTS_STREAM, keep=2)  # as the age or size limit does
            ws = await signed_in(url)
            answer = await subscribe(ws, f"job:{job}", since=seqs[0])
            assert answer["recovered"] is False
            info = await own_bus.js.stream_info(EVENTS_STREAM)
            assert answer["seq"] == info.state.last_seq  # live events follow it; the client refetches the state
            live = await publish_job(own_bus, job, "succeeded")
            assert [m["seq"] for m in await events(ws, 1)] == [live]
            await ws.close()
    finally:
        await execution.stop()
        await own_bus.close()


async def test_more_missed_events_than_the_replay_limit_says_recovered_false(
    tmp_path: Path, nats_url: str, services: Services, bus: Bus
) -> None:
    async with gateway(tmp_path, nats_url, ws_max_replay=3) as url:
        job = new_job(services)
        first = await publish_job(bus, job, "queued")
        for i in range(5):
            await publish_progress(bus, job, i / 10)
        ws = await signed_in(url)
        answer = await subscribe(ws, f"job:{job}", since=first)
        assert answer["recovered"] is False
        live = await publish_job(bus, job, "running")
        assert [m["seq"] for m in await events(ws, 1)] == [live]
        assert (await subscribe(ws, "user", since=live))["recovered"] is True  # a small replay is fine
        await ws.close()


async def test_subscription_limit_holds_for_subscribes_sent_at_once(
    tmp_path: Path, nats_url: str, services: Services
) -> None:
    async with gateway(tmp_path, nats_url, ws_max_subscriptions=3) as url:
        ws = await signed_in(url)
        jobs = [new_job(services) for _ in range(6)]
        for i, job in enumerate(jobs):  # all sent before any answer: the limit counts those still being authorized
            await ws.send(json.dumps({"type": "subscribe", "channel": f"job:{job}", "id": i}))
        answers = [await recv(ws) for _ in jobs]
        kinds = sorted(a["type"] if a["type"] == "subscribed" else a["error"]["code"] for a in answers)
        assert kinds == ["TOO_MANY_SUBSCRIPTIONS"] * 3 + ["subscribed"] * 3
        await ws.close()


# -- races the review found ------------------------------------------------------------------------------------------
async def test_subscribe_unsubscribe_subscribe_at_once_ends_subscribed(
    ws_url: str, services: Services, bus: Bus
) -> None:
    """React's StrictMode mounts, unmounts and mounts again: the last word wins, and events flow."""
    job = new_job(services)
    ws = await signed_in(ws_url)
    channel = f"job:{job}"
    for message in (
        {"type": "subscribe", "channel": channel, "id": 1},
        {"type": "unsubscribe", "channel": channel, "id": 2},
        {"type": "subscribe", "channel": channel, "id": 3},
    ):
        await ws.send(json.dumps(message))
    answers: dict[Any, dict[str, Any]] = {}
    while 3 not in answers:
        answer = await recv(ws)
        answers[answer.get("id")] = answer
    assert answers[3]["type"] == "subscribed"
    seq = await publish_job(bus, job, "queued")
    assert [m["seq"] for m in await events(ws, 1)] == [seq]
    # Unsubscribe while a subscribe is being authorized: nothing arrives, nothing stays subscribed.
    other = new_job(services)
    await ws.send(json.dumps({"type": "subscribe", "channel": f"job:{other}", "id": 4}))
    await ws.send(json.dumps({"type": "unsubscribe", "channel": f"job:{other}", "id": 5}))
    await asyncio.sleep(0.2)
    await publish_job(bus, other, "queued")
    await asyncio.sleep(0.2)
    await ws.send(json.dumps({"type": "ping", "id": 6}))
    while (answer := await recv(ws)).get("id") != 6:
        assert "event" not in answer, answer
    await ws.close()


async def test_a_removed_share_is_not_served_from_a_cache(ws_url: str, services: Services, bus: Bus) -> None:
    dataset = uuid.uuid4().hex
    services.datasets[dataset] = BOB
    services.readers[dataset] = {ALICE}
    ws = await signed_in(ws_url)
    assert (await subscribe(ws, f"dataset:{dataset}"))["type"] == "subscribed"
    await ws.send(json.dumps({"type": "unsubscribe", "channel": f"dataset:{dataset}"}))
    services.readers[dataset] = set()  # removed, on another replica say: this one saw no event
    answer = await subscribe(ws, f"dataset:{dataset}")
    assert answer["type"] == "error" and answer["error"]["code"] == "CHANNEL_NOT_FOUND"
    await ws.close()


async def test_an_overflow_caused_by_a_reply_closes_the_socket(
    tmp_path: Path, nats_url: str, services: Services, bus: Bus
) -> None:
    async with gateway(tmp_path, nats_url, ws_max_queue=20) as url:
        ws, job = await stalled_socket(url, services)
        subject = f"strata.execution.job.running.{ALICE}.{job}"
        for i in range(12):  # fills the socket's buffers; the queue stays under its limit
            await publish_raw(bus, subject, "strata.execution.job.running", {"i": i, "pad": PAD * 4})
        await asyncio.sleep(0.3)
        for i in range(60):  # the replies do the rest
            await ws.send(json.dumps({"type": "ping", "id": i}))
        ws.transport.resume_reading()
        assert await closed_with(ws, timeout_s=10) == 4500
        assert await _metric(url, 'strata_ws_disconnects_total{reason="slow_consumer"}') >= 1


async def test_hub_holds_live_events_until_its_catch_up_has_run(bus: Bus) -> None:
    """After a reconnect nats-py re-subscribes before the hub hears of it: live events arriving first must not hide
    the ones the catch-up reads."""
    sink = RecordingSink()
    got = sink.seqs
    hub = Hub(bus)
    job = uuid.uuid4().hex
    subject_filter = f"strata.execution.job.*.*.{job}"
    await hub.add(subject_filter, sink)
    seen = await publish_job(bus, job, "queued")
    await eventually(lambda: got == [seen])
    await hub._interests[subject_filter].sub.unsubscribe()  # the connection drops: these are lost to it
    hub._on_disconnect()
    missed = [await publish_job(bus, job, s) for s in ("running", "cancelling")]
    live = await publish_job(bus, job, "cancelled")  # re-subscribed: this one comes live, before the catch-up
    stored = await bus.js.get_msg(EVENTS_STREAM, live)
    hub._pending.append((live, f"strata.execution.job.cancelled.{ALICE}.{job}", stored.data or b"", subject_filter))
    hub._schedule_flush()
    await asyncio.sleep(0.1)
    assert got == [seen]  # held
    await hub.catch_up()
    assert got == [seen, *missed, live]
