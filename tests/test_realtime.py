"""Live events over the gateway's WebSocket, with every service a real process and two gateway replicas.

A browser-like client signs in (cookie mode), submits a query, follows its job, loses the connection mid-way,
reconnects with ``since`` and sees every event exactly once and in order, the same sequence ``GET /jobs/{id}/events``
returns, while another user is refused. Two gateway processes serve the same user's events; a deactivated user's and
a logged-out session's sockets are closed. The client is the reference one, ``bench/wsclient.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any

import httpx
import pytest
from bench.wsclient import RequestError, SessionClosed, WsClient

from strata.common.procs import SERVICES, NatsServer, ServiceProcess, free_port, suite_env

pytestmark = pytest.mark.slow
ADMIN = ("admin@example.com", "realtime admin password 1")
ORIGIN = "http://localhost:5173"  # one of the gateway's default CORS origins, as the frontend's dev server
#: ~2 s on two threads, long enough for progress events every 0.1 s.
LONG_QUERY = "SELECT sum(hash(i) % 7) AS s FROM range(400000000) t(i)"
FINAL = {"succeeded", "failed", "cancelled", "timed_out"}


@dataclass
class Realtime:
    gateways: list[str]
    admin: dict[str, str]

    def ws(self, index: int = 0) -> str:
        return self.gateways[index].replace("http://", "ws://") + "/api/v1/ws"


@pytest.fixture(scope="module")
def realtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Realtime]:
    root = tmp_path_factory.mktemp("realtime")
    nats = NatsServer(store_dir=root / "nats").start()
    ports = {name: free_port() for name in SERVICES}
    env = suite_env(
        data_dir=root / "data",
        nats_url=nats.url,
        ports=ports,
        extra={
            "STRATA_LOG_FORMAT": "json",
            "STRATA_ENVIRONMENT": "test",
            "STRATA_ADMIN_EMAIL": ADMIN[0],
            "STRATA_ADMIN_PASSWORD": ADMIN[1],
            "STRATA_GATEWAY_RATE_LIMIT_SIGNIN": "100/s;burst=100",
            "STRATA_AUTH_REFRESH_COOKIE_SECURE": "false",  # plain http on loopback
            "STRATA_EXECUTION_PROGRESS_INTERVAL_S": "0.1",
        },
    )
    procs = [
        ServiceProcess(service=name, port=ports[name], env=env, log_file=root / "logs" / f"{name}.log").start()
        for name in SERVICES
    ]
    second = ServiceProcess(service="gateway", port=free_port(), env=env, log_file=root / "logs" / "gateway-2.log")
    procs.append(second.start())
    try:
        gateways = [procs[SERVICES.index("gateway")].url, second.url]
        deadline = time.monotonic() + 60
        for url in gateways:
            while True:
                assert all(p.process is not None and p.process.poll() is None for p in procs), "a service died"
                try:
                    if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"{url} not ready in 60 s"
                time.sleep(0.2)
        token = httpx.post(gateways[0] + "/api/v1/auth/token", data={"username": ADMIN[0], "password": ADMIN[1]})
        assert token.status_code == 200, token.text
        yield Realtime(gateways=gateways, admin={"Authorization": f"Bearer {token.json()['access_token']}"})
    finally:
        for proc in reversed(procs):
            proc.stop()
        nats.stop()


@dataclass
class User:
    id: str
    email: str
    password: str
    token: str
    cookie: str  # the strata_access cookie, as a browser holds it
    headers: dict[str, str]


def sign_up(rt: Realtime, email: str, role: str = "analyst") -> User:
    password = f"{role} password for {email}"
    created = httpx.post(
        rt.gateways[0] + "/api/v1/auth/users",
        headers=rt.admin,
        json={"email": email, "password": password, "display_name": email.split("@")[0], "role": role},
    )
    assert created.status_code == 201, created.text
    return sign_in(rt, email, password, created.json()["id"])


def sign_in(rt: Realtime, email: str, password: str, user_id: str) -> User:
    resp = httpx.post(
        rt.gateways[0] + "/api/v1/auth/token?refresh_cookie=true", data={"username": email, "password": password}
    )
    assert resp.status_code == 200, resp.text
    cookies = SimpleCookie()
    for header in resp.headers.get_list("set-cookie"):
        cookies.load(header)
    access = cookies["strata_access"]
    assert access["path"] == "/api/v1/ws" and access["httponly"], access
    token = resp.json()["access_token"]
    return User(user_id, email, password, token, access.value, {"Authorization": f"Bearer {token}"})


def submit(rt: Realtime, user: User, sql: str = LONG_QUERY) -> str:
    resp = httpx.post(rt.gateways[0] + "/api/v1/queries", headers=user.headers, json={"sql": sql}, timeout=30)
    assert resp.status_code == 202, resp.text
    job_id: str = resp.json()["id"]
    return job_id


def rest_events(rt: Realtime, user: User, job_id: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{rt.gateways[1]}/api/v1/jobs/{job_id}/events?after=0", headers=user.headers).json()
    events: list[dict[str, Any]] = body["events"]
    return events


async def until_final(client: WsClient, channel: str, timeout_s: float = 60) -> list[dict[str, Any]]:
    got = []
    deadline = time.monotonic() + timeout_s
    while True:
        message = await client.receive(timeout_s=max(deadline - time.monotonic(), 0.1))
        if message["channel"] != channel:
            continue
        got.append(message)
        if message["event"]["data"].get("state") in FINAL and not message["type"].endswith(".progress"):
            return got


@pytest.fixture
async def clients() -> AsyncIterator[list[WsClient]]:
    opened: list[WsClient] = []
    yield opened
    for client in opened:
        await client.close()


async def test_browser_like_client_resumes_a_job_exactly_once(realtime: Realtime, clients: list[WsClient]) -> None:
    """The issue's "done when": log in, submit, subscribe, lose the connection, reconnect with since."""
    alice = sign_up(realtime, "alice@example.com")
    mallory = sign_up(realtime, "mallory@example.com")
    browser = WsClient(realtime.ws(0), cookie=alice.cookie, origin=ORIGIN)
    clients.append(browser)
    welcome = await browser.connect()
    assert welcome["user_id"] == alice.id and welcome["role"] == "analyst"

    intruder = WsClient(realtime.ws(1), token=mallory.token, origin=ORIGIN)
    clients.append(intruder)
    await intruder.connect()

    job_id = submit(realtime, alice)
    channel = f"job:{job_id}"
    subscribed = await browser.subscribe(channel, since=0)  # from the job's first event
    assert subscribed["recovered"] is True
    with pytest.raises(RequestError) as refused:
        await intruder.subscribe(channel)
    assert refused.value.code == "CHANNEL_NOT_FOUND"

    before = []
    while not any(m["type"] == "strata.execution.job.progress" for m in before):
        before.append(await browser.receive(timeout_s=30))
    browser.drop_connection()  # mid-job: the network goes away
    await asyncio.sleep(0.5)  # events go on meanwhile
    after = await until_final(browser, channel)
    assert browser.reconnects == 1 and browser.recovered[channel] is True
    seen = [m["seq"] for m in before + after]
    assert browser.duplicates == 0
    assert seen == sorted(seen) and len(seen) == len(set(seen))
    # Exactly the job's events, as polling returns them: same sequence numbers, same order, none missing.
    assert seen == [e["seq"] for e in rest_events(realtime, alice, job_id)]
    types = [m["type"] for m in before + after]
    assert types[0] == "strata.execution.job.queued" and types[-1] == "strata.execution.job.succeeded"
    assert "strata.execution.job.running" in types and types.count("strata.execution.job.progress") >= 1
    # Nothing of it reached the intruder.
    with pytest.raises(TimeoutError):
        await intruder.receive(timeout_s=0.5)


async def test_two_gateway_processes_serve_the_same_users_events(realtime: Realtime, clients: list[WsClient]) -> None:
    bob = sign_up(realtime, "bob@example.com")
    on_first = WsClient(realtime.ws(0), token=bob.token)
    on_second = WsClient(realtime.ws(1), token=bob.token)
    clients.extend([on_first, on_second])
    for client in (on_first, on_second):
        await client.connect()
        await client.subscribe("user")
    job_id = submit(realtime, bob, "SELECT 42 AS answer")
    first, second = await until_final(on_first, "user"), await until_final(on_second, "user")
    assert [m["seq"] for m in first] == [m["seq"] for m in second]
    assert {m["event"]["data"]["job_id"] for m in first} == {job_id}
    assert first[-1]["type"] == "strata.execution.job.succeeded"


async def test_dataset_channel_follows_an_upload(realtime: Realtime, clients: list[WsClient]) -> None:
    carol = sign_up(realtime, "carol@example.com")
    dave = sign_up(realtime, "dave@example.com")
    upload = httpx.post(
        realtime.gateways[0] + "/api/v1/datasets",
        headers=carol.headers,
        data={"name": "scores"},
        files={"file": ("scores.csv", b"name,score\na,1\nb,2\n", "text/csv")},
    )
    assert upload.status_code == 202, upload.text
    dataset_id = upload.json()["id"]
    client = WsClient(realtime.ws(1), token=carol.token)
    clients.append(client)
    await client.connect()
    await client.subscribe(f"dataset:{dataset_id}", since=0)
    types = []
    while "strata.datasets.dataset.profiled" not in types:
        types.append((await client.receive(timeout_s=30))["type"])
    assert types[0] == "strata.datasets.dataset.uploaded" and "strata.datasets.dataset.ready" in types
    other = WsClient(realtime.ws(0), token=dave.token)
    clients.append(other)
    await other.connect()
    with pytest.raises(RequestError):
        await other.subscribe(f"dataset:{dataset_id}")
    shared = httpx.post(
        f"{realtime.gateways[0]}/api/v1/datasets/{dataset_id}/shares",
        headers=carol.headers,
        json={"user_id": dave.id, "permission": "read"},
    )
    assert shared.status_code in (200, 201), shared.text
    await asyncio.sleep(0.2)
    dave_user = WsClient(realtime.ws(0), token=dave.token)
    clients.append(dave_user)
    await dave_user.connect()
    assert (await dave_user.subscribe(f"dataset:{dataset_id}", since=0))["recovered"] is True


async def test_deactivation_and_logout_close_sockets(realtime: Realtime, clients: list[WsClient]) -> None:
    erin = sign_up(realtime, "erin@example.com")
    frank = sign_up(realtime, "frank@example.com")
    erin_client = WsClient(realtime.ws(1), token=erin.token)
    frank_client = WsClient(realtime.ws(0), cookie=frank.cookie)
    clients.extend([erin_client, frank_client])
    await erin_client.connect()
    await frank_client.connect()
    await erin_client.subscribe("user")

    patched = httpx.patch(
        f"{realtime.gateways[0]}/api/v1/auth/users/{erin.id}", headers=realtime.admin, json={"is_active": False}
    )
    assert patched.status_code == 200, patched.text
    with pytest.raises(SessionClosed) as closed:
        await erin_client.receive(timeout_s=10)
    assert closed.value.code == 4403

    logout = httpx.post(realtime.gateways[1] + "/api/v1/auth/logout", headers=frank.headers)
    assert logout.status_code == 204
    with pytest.raises(SessionClosed) as ended:
        await frank_client.receive(timeout_s=10)
    assert ended.value.code == 4403
    # The same token opens no new socket on either replica.
    for url in realtime.ws(0), realtime.ws(1):
        retry = WsClient(url, token=erin.token)
        with pytest.raises(SessionClosed) as refused:
            await retry.connect()
        assert refused.value.code == 4403
        await retry.close()
