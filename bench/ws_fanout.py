"""WebSocket fan-out and resume (``WS /api/v1/ws``, docs/realtime.md), against baselines measured in the same run.

Starts ``nats-server``, the ``auth``, ``datasets``, ``execution`` and ``gateway`` services as real processes, creates an
analyst (through the gateway, as the admin), signs in as them and runs ``SELECT 42`` three times (real jobs of theirs,
so that ``rpc.execution.can_read_job`` says yes to ``job:<id>``). The benchmark then publishes synthetic events of those
jobs straight to JetStream (``strata.execution.job.progress.<owner>.<job>`` and ``...job.running.<owner>.<job>``
CloudEvents, ``time`` = now), as the execution service would.

Every socket signs in as that one user, so the gateway runs with ``STRATA_GATEWAY_WS_MAX_CONNECTIONS_PER_USER`` raised
above the largest client count (the default, 20 per replica, would refuse the rest with 4429), the access token lives
2 h (``STRATA_AUTH_ACCESS_TOKEN_TTL_S``: no ``token_expiring`` during the run) and the rate limits are lifted
(``BENCH_ENV``, and ``STRATA_GATEWAY_RATE_LIMIT_WS_SUBSCRIBE``: every subscribe spends a token of the user's bucket).
Only the owner (or an admin) may read a job, so one user for every client is also what lets them all follow the same
``job:<id>``.

(1) **Fan-out.** N clients (100, 1,000, 5,000; ``--quick``: 100, 500) in a separate process (:class:`_Fleet`:
    ``websockets``' sans-I/O client protocol on asyncio transports, all on one uvloop event loop, no client-side pings),
    each subscribed to the same ``job:<id>`` and to its own ``user`` channel: every event reaches every client twice,
    once per channel. Events are published at a fixed rate chosen so that the frames offered to the clients are 10,000,
    20,000 and 40,000 per second (``--quick``: 10,000 and 20,000), for 10 s each (4 s) and at least 10 events; every
    fifth is a ``running`` (a state change, never dropped), the others ``progress`` (which the gateway may coalesce for
    a client that is behind). Each client records, per frame, its receive time minus the event's ``time`` (same machine,
    same clock), drops and counts any seq not above the last on its channel. Reported: frames delivered per second (from
    the first publish to the last frame received), latency p50/p99/max, state events lost (must be 0), progress frames
    coalesced, sockets closed by the server (e.g. 4500, too slow), the server's CPU time per delivered frame, and the
    CPU used by the server, the clients and nats-server (% of one core). Clients and servers share the machine's cores,
    and one event's frames leave the server one socket after another and reach the clients' one loop one after another:
    at 1,000 clients an event is 2,000 frames, so its last frame arrives after 2,000 times the per-frame cost of both.
    The baseline's latency shows that floor.

    **Baseline**: the same clients against a bare ``websockets`` server (:func:`_baseline_main`, its own process,
    uvloop) that takes the same live feed (core NATS subscriptions to ``live.<the channel's subjects>``, as the gateway
    does), builds the same frame once per event and channel and hands it to every subscriber with
    :func:`websockets.asyncio.server.broadcast`. It checks no token and no access, keeps no per-socket queue, coalesces
    nothing and exports no metrics: the cheapest way to push these frames from one Python process with this library, so
    gateway/baseline is what the gateway's own work costs. The clients offer permessage-deflate, as browsers do; the
    baseline accepts it exactly when the gateway does (``STRATA_GATEWAY_WS_PER_MESSAGE_DEFLATE``, probed at the start),
    so both compress alike (once per frame and socket). When the gateway accepts it, the client count nearest 1,000 runs
    again with clients that do not offer it, to show what it costs. The baseline runs first for each N, then the
    gateway, with the same clients and schedule.

(2) **Resume.** A client follows a second job, sees one event, and leaves; 10,000 ``running`` events of that job are
    published while no one is connected. Then a new connection (:class:`bench.wsclient.WsClient`: connect, ``auth``,
    ``subscribe`` with ``since`` = the seq seen) until the 10,000th replayed event, checked in order and complete.
    Baseline: the same 10,000 messages read with nats-py straight from JetStream the way the gateway's replay reads
    them (connect, an ephemeral ``AckPolicy.NONE`` pull consumer filtered on the job's subjects from ``since + 1``,
    fetches of 1,000, each message's JSON decoded). Rounds alternated; the median is reported. The same again with
    10,000 ``progress`` events, which the gateway may coalesce (how many arrive is reported).
(3) **Automatic resume.** 2,000 ``running`` events published at 1,000/s to a :class:`WsClient` whose TCP connection is
    aborted (no close handshake) after the first 500: it must reconnect by itself and get every event exactly once,
    in order; the longest gap between two events is reported.
"""

from __future__ import annotations

import asyncio
import gc
import json
import multiprocessing
import os
import re
import resource
import shutil
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import httpx
import nats
from nats.js import api as js_api
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import enable_client_permessage_deflate
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from strata.common.contracts.execution import JobEvent, JobProgress, job_events_filter, user_job_events_filter
from strata.common.contracts.realtime import WS_PATH, live_subject
from strata.common.events import EVENTS_STREAM, Bus, CloudEvent, source_of
from strata.common.procs import SERVICES, ServiceProcess, free_port, suite_env

from . import BENCH_ENV, ProcessStack, percentile, run_loop, table
from .datasets import ADMIN, CpuMeter, _sign_in, _timed, clock
from .wsclient import WsClient

TARGET_P99_MS = 100.0
TARGET_P99_CLIENTS = 1000
TARGET_DELIVERED_PER_S = 20_000.0
OWNER = ("ws-bench@example.com", "ws bench owner password 1")
SOURCE = source_of("execution")
RUNNING = "strata.execution.job.running"
PROGRESS = "strata.execution.job.progress"
STATE_EVERY = 5  # every fifth event is a state change (never coalesced), the others progress
CHANNELS = 2  # per client: job:<id> and user; every event of the job reaches a client on both
MIN_EVENTS = 10
CONNECT_CONCURRENCY = 200
#: How the gateway (``LiveEvent.frame``) and the baseline begin an event frame.
FRAME_HEAD = re.compile(rb'\{"channel":"((?:[^"\\]|\\.)*)","seq":(\d+),')


# -- the stack ------------------------------------------------------------------------------------------------------
class _Stack(ProcessStack):
    def start(self, *, max_sockets: int) -> None:
        self.nats.start()
        ports = {name: free_port() for name in SERVICES}  # schemas: an unused port
        extra = {
            **BENCH_ENV,
            "STRATA_ADMIN_EMAIL": ADMIN[0],
            "STRATA_ADMIN_PASSWORD": ADMIN[1],
            "STRATA_DATASETS_DEMO_DATA": "false",
            "STRATA_GATEWAY_RATE_LIMIT_SIGNIN": "1000000/s;burst=1000000",
            "STRATA_GATEWAY_RATE_LIMIT_WS_SUBSCRIBE": "1000000/s;burst=1000000",
            "STRATA_GATEWAY_WS_MAX_CONNECTIONS_PER_USER": str(max_sockets),
            "STRATA_AUTH_ACCESS_TOKEN_TTL_S": "7200",
        }
        env = suite_env(data_dir=self.root / "data", nats_url=self.nats.url, ports=ports, extra=extra)
        for name in ("auth", "datasets", "execution", "gateway"):
            self.procs[name] = ServiceProcess(name, ports[name], env, log_file=self.root / "logs" / f"{name}.log")
            self.procs[name].start()
        for proc in self.procs.values():
            proc.wait_healthy(timeout_s=60)


def _owner_and_jobs(client: httpx.Client, gateway: str, jobs: int) -> tuple[str, str, list[str]]:
    """An analyst made by the admin, their access token, and ``jobs`` finished jobs of theirs."""
    admin = {"Authorization": f"Bearer {_sign_in(client, gateway)}"}
    spec = {"email": OWNER[0], "password": OWNER[1], "display_name": "WebSocket bench", "role": "analyst"}
    resp = client.post(f"{gateway}/api/v1/auth/users", json=spec, headers=admin, timeout=30)
    if resp.status_code != 201:
        raise RuntimeError(f"creating the user answered {resp.status_code}: {resp.text[:300]}")
    user_id = str(resp.json()["id"])
    resp = client.post(f"{gateway}/api/v1/auth/token", data={"username": OWNER[0], "password": OWNER[1]}, timeout=30)
    resp.raise_for_status()
    token = str(resp.json()["access_token"])
    ids = []
    for _ in range(jobs):
        resp = client.post(
            f"{gateway}/api/v1/queries",
            json={"sql": "SELECT 42 AS answer", "wait_ms": 20_000},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        if resp.status_code != 200 or resp.json().get("state") != "succeeded":
            raise RuntimeError(f"SELECT 42 answered {resp.status_code}: {resp.text[:300]}")
        ids.append(str(resp.json()["id"]))
    return token, user_id, ids


class _Publisher:
    """Synthetic events of one job, published to JetStream as the execution service publishes them."""

    def __init__(self, bus: Bus, owner_id: str, job_id: str) -> None:
        self.bus, self.owner_id, self.job_id = bus, owner_id, job_id

    def event(self, i: int, *, state: bool) -> CloudEvent:  # its ``time`` is now
        if state:
            payload: JobEvent | JobProgress = JobEvent(
                job_id=self.job_id, owner_id=self.owner_id, kind="query", engine="duckdb", state="running"
            )
            return CloudEvent.of(payload, source=SOURCE, subject=self.job_id, type=RUNNING)
        payload = JobProgress(job_id=self.job_id, owner_id=self.owner_id, fraction=0.5, rows_read=i, elapsed_s=1.0)
        return CloudEvent.of(payload, source=SOURCE, subject=self.job_id)

    async def one(self, i: int, *, state: bool) -> int:
        event = self.event(i, state=state)
        ack = await self.bus.publish_event(event)
        return int(ack.seq)

    async def many(self, count: int, *, state: bool, batch: int = 500) -> list[int]:
        """``count`` events as fast as JetStream acks them (batches of ``publish_async``); their seqs in order."""
        seqs: list[int] = []
        js = self.bus.js
        for at in range(0, count, batch):
            futures = []
            for i in range(at, min(at + batch, count)):
                event = self.event(i, state=state)
                body = event.model_dump_json().encode()
                futures.append(await js.publish_async(event.nats_subject, body, headers=self.bus.event_headers(event)))
            seqs += [int(ack.seq) for ack in await asyncio.gather(*futures)]
        return sorted(seqs)


async def _paced(count: int, rate: float, send: Callable[[int], Awaitable[object]]) -> None:
    """``send(i)`` ``count`` times at ``rate`` per second on a fixed schedule (a late send does not shift the next)."""
    start = clock()
    for i in range(count):
        delay = start + i / rate - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        await send(i)


# -- the clients' process -------------------------------------------------------------------------------------------
class _LoadSocket(asyncio.Protocol):
    """One load client: ``websockets``' sans-I/O :class:`~websockets.client.ClientProtocol` on an asyncio transport, so
    that a frame costs a parse and a call rather than a task wake-up as with ``websockets.asyncio`` (here about a
    quarter less CPU per frame)."""

    def __init__(self, fleet: _Fleet, url: str, token: str, channels: list[str], compression: str | None) -> None:
        extensions = enable_client_permessage_deflate(None) if compression == "deflate" else None
        self.ws = ClientProtocol(parse_uri(url), extensions=extensions)
        self.fleet, self.token, self.channels = fleet, token, channels
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()  # signed in, every channel subscribed
        self.lost: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.answered = 0
        self.last: dict[bytes, int] = {}  # channel -> last seq
        self.fragments: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.ws.send_request(self.ws.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Frame):
                if event.opcode not in (Opcode.TEXT, Opcode.CONT):
                    continue  # ping (answered by the protocol), close
                if not event.fin:
                    self.fragments.append(bytes(event.data))
                    continue
                raw = b"".join([*self.fragments, event.data]) if self.fragments else bytes(event.data)
                self.fragments = []
                if self.ready.done():
                    self.fleet.on_frame(self, raw)
                else:
                    self._handshake(json.loads(raw))
            elif self.ws.handshake_exc is not None and not self.ready.done():  # the HTTP response refused us
                self.ready.set_exception(self.ws.handshake_exc)
            elif not self.ready.done():
                self._send({"type": "auth", "token": self.token})
        self._flush()

    def _handshake(self, message: dict[str, Any]) -> None:
        if message.get("type") == "welcome":
            for n, channel in enumerate(self.channels):
                self._send({"type": "subscribe", "channel": channel, "id": n})
        elif message.get("type") == "subscribed":
            self.answered += 1
            if self.answered == len(self.channels):
                self.ready.set_result(None)
        else:
            self.ready.set_exception(RuntimeError(f"unexpected answer: {str(message)[:200]}"))

    def _send(self, message: dict[str, Any]) -> None:
        self.ws.send_text(json.dumps(message).encode())
        self._flush()

    def _flush(self) -> None:
        assert self.transport is not None
        for data in self.ws.data_to_send():
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                self.transport.write_eof()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("closed during the handshake"))
        elif not self.fleet.closing:
            self.fleet.closes[self.ws.close_code or 1006] += 1
        if not self.lost.done():
            self.lost.set_result(None)

    def close(self) -> None:
        if self.transport is not None and not self.lost.done():
            self.ws.send_close(1000)
            self._flush()


class _Fleet:
    """In its own process: many load clients on one event loop, driven over a pipe by the benchmark. The load is
    measured with these, not with :class:`WsClient`, to keep the clients' CPU low."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.sockets: list[_LoadSocket] = []
        self.closing = False
        self.op_reset()

    def op_reset(self) -> dict[str, Any]:
        # A full collection of the clients' objects takes 50-80 ms here: start each phase with none pending, so the
        # latencies measured are the servers' and not the clients' collector's.
        gc.collect()
        gc.freeze()
        self.frames = 0
        self.types: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.first = self.last = 0.0
        self.duplicates = 0
        self.closes: Counter[int] = Counter()
        self.seen: dict[int, tuple[float, str]] = {}  # seq -> the event's time and type: parsed once, not per socket
        return {}

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            op, args = await loop.run_in_executor(None, self.conn.recv)
            try:
                result = getattr(self, f"op_{op}")(**args)
                if asyncio.iscoroutine(result):
                    result = await result
            except Exception as exc:
                result = {"error": f"{op}: {exc!r}"}
            self.conn.send(result)
            if op == "disconnect" and args.get("exit"):
                return

    async def _open(
        self, url: str, token: str, channels: list[str], compression: str | None, sem: asyncio.Semaphore
    ) -> _LoadSocket:
        uri = parse_uri(url)
        async with sem:
            _, sock = await asyncio.get_running_loop().create_connection(
                lambda: _LoadSocket(self, url, token, channels, compression), uri.host, uri.port
            )
            try:
                await asyncio.wait_for(asyncio.shield(sock.ready), 60)
            except BaseException:
                if sock.transport is not None:
                    sock.transport.abort()
                raise
            return sock

    async def op_connect(
        self, url: str, token: str, channels: list[str], count: int, compression: str | None
    ) -> dict[str, Any]:
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
        self.closing = False
        t0 = clock()
        results = await asyncio.gather(
            *(self._open(url, token, channels, compression, sem) for _ in range(count)), return_exceptions=True
        )
        seconds = clock() - t0
        errors = Counter(repr(r)[:120] for r in results if isinstance(r, BaseException))
        self.sockets = [r for r in results if isinstance(r, _LoadSocket)]
        extensions = sorted({ext.name for sock in self.sockets for ext in sock.ws.extensions})
        return {"connected": len(self.sockets), "errors": dict(errors), "seconds": seconds, "extensions": extensions}

    def on_frame(self, sock: _LoadSocket, raw: bytes) -> None:
        now = time.time()
        head = FRAME_HEAD.match(raw)
        if head is not None:  # the gateway's layout: channel and seq read without decoding the JSON
            channel, seq = head[1], int(head[2])
            seen = self.seen.get(seq)
        else:
            message = json.loads(raw)
            if "event" not in message or "seq" not in message:
                return  # a control message (none is expected while measuring)
            channel, seq, seen = str(message["channel"]).encode(), int(message["seq"]), None
        if seq <= sock.last.get(channel, 0):
            self.duplicates += 1
            return
        sock.last[channel] = seq
        if seen is None:
            message = json.loads(raw)
            at = datetime.fromisoformat(message["event"]["time"]).timestamp()
            seen = self.seen[seq] = (at, str(message["type"]))
        self.latencies.append(now - seen[0])
        self.types[seen[1]] += 1
        self.frames += 1
        self.first = self.first or now
        self.last = now

    def op_count(self) -> dict[str, Any]:
        return {"frames": self.frames, "last": self.last}

    def op_stats(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "frames": self.frames,
            "types": dict(self.types),
            "first": self.first,
            "last": self.last,
            "p50_ms": percentile(lat, 50) * 1000,
            "p90_ms": percentile(lat, 90) * 1000,
            "p99_ms": percentile(lat, 99) * 1000,
            "max_ms": (lat[-1] if lat else float("nan")) * 1000,
            "duplicates": self.duplicates,
            "closed_by_server": {str(k): v for k, v in self.closes.items()},
            "open": sum(1 for sock in self.sockets if not sock.lost.done()),
        }

    async def op_disconnect(self, exit: bool = False) -> dict[str, Any]:
        self.closing = True
        for sock in self.sockets:
            sock.close()
        if self.sockets:
            await asyncio.wait([sock.lost for sock in self.sockets], timeout=10)
        for sock in self.sockets:
            if not sock.lost.done() and sock.transport is not None:
                sock.transport.abort()
        closed, self.sockets = len(self.sockets), []
        return {"closed": closed}


def _fleet_main(conn: Connection) -> None:
    run_loop(_Fleet(conn).serve())


class _FleetProcess:
    """The benchmark's handle on the clients' process."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_fleet_main, args=(child,), name="ws-clients", daemon=True)
        self.process.start()
        child.close()

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        await asyncio.to_thread(self.conn.send, (op, args))
        reply: dict[str, Any] = await asyncio.to_thread(self.conn.recv)
        if "error" in reply:
            raise RuntimeError(f"the clients' process failed: {reply['error']}")
        return reply

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(("disconnect", {"exit": True}))
                if self.conn.poll(30):
                    self.conn.recv()
            except (OSError, EOFError):
                pass
            self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


# -- the baseline server --------------------------------------------------------------------------------------------
async def _baseline(port: int, nats_url: str, owner_id: str, deflate: bool) -> None:
    nc = await nats.connect(nats_url, name="bench-ws-baseline")
    members: dict[str, set[ServerConnection]] = {}
    subs: dict[str, Any] = {}
    lock = asyncio.Lock()

    def subject_filter(channel: str) -> str:
        return user_job_events_filter(owner_id) if channel == "user" else job_events_filter(channel.split(":", 1)[1])

    async def follow(channel: str) -> None:
        encoded = json.dumps(channel)

        async def on_msg(msg: Any) -> None:
            raw = msg.data.decode()
            seq = msg.headers["Nats-Sequence"]
            frame = f'{{"channel":{encoded},"seq":{seq},"type":{json.dumps(json.loads(raw)["type"])},"event":{raw}}}'
            broadcast(members.get(channel, ()), frame)

        subs[channel] = await nc.subscribe(
            live_subject(subject_filter(channel)), cb=on_msg, pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 29
        )
        await nc.flush()

    async def handler(ws: ServerConnection) -> None:
        joined: set[str] = set()
        try:
            async for raw in ws:
                message = json.loads(raw)
                if message.get("type") == "auth":
                    await ws.send(json.dumps({"type": "welcome", "user_id": owner_id, "role": "analyst"}))
                elif message.get("type") == "subscribe":
                    channel = str(message["channel"])
                    async with lock:
                        if channel not in subs:
                            await follow(channel)
                    members.setdefault(channel, set()).add(ws)
                    joined.add(channel)
                    answer = {"type": "subscribed", "channel": channel, "id": message.get("id"), "recovered": True}
                    await ws.send(json.dumps(answer))
        except ConnectionClosed:
            pass
        finally:
            for channel in joined:
                members[channel].discard(ws)
                if not members[channel]:
                    async with lock:
                        if not members[channel] and channel in subs:
                            await subs.pop(channel).unsubscribe()

    async with serve(handler, "127.0.0.1", port, compression="deflate" if deflate else None):
        gc.freeze()  # as the services do once started (strata.common.app)
        await asyncio.Event().wait()  # until terminated


def _baseline_main(port: int, nats_url: str, owner_id: str, deflate: bool) -> None:
    run_loop(_baseline(port, nats_url, owner_id, deflate))


async def _accepts_deflate(url: str) -> bool:
    """Whether the server at ``url`` agrees to permessage-deflate when a client offers it (the baseline then does as
    the gateway does; the gateway's ``STRATA_GATEWAY_WS_PER_MESSAGE_DEFLATE``)."""
    async with connect(url, proxy=None, compression="deflate") as ws:
        return any(ext.name == "permessage-deflate" for ext in ws.protocol.extensions)


# -- (1) fan-out ----------------------------------------------------------------------------------------------------
async def _drain(fleet: _FleetProcess, expected: int, *, quiet_s: float = 2.0, timeout_s: float = 60.0) -> None:
    """Until every expected frame arrived, or none arrived for ``quiet_s`` (some were coalesced or lost)."""
    deadline = clock() + timeout_s
    seen, since = -1, clock()
    while clock() < deadline:
        frames = (await fleet.call("count"))["frames"]
        if frames >= expected:
            return
        if frames != seen:
            seen, since = frames, clock()
        elif clock() - since > quiet_s:
            return
        await asyncio.sleep(0.1)


async def _phase(
    fleet: _FleetProcess, pub: _Publisher, cpu: CpuMeter, *, clients: int, offered: float, seconds: float
) -> dict[str, Any]:
    rate = offered / (clients * CHANNELS)  # events per second
    events = max(MIN_EVENTS, round(rate * seconds))
    states = len(range(0, events, STATE_EVERY))
    await fleet.call("reset")
    before = cpu.mark()
    started = time.time()
    await _paced(events, rate, lambda i: pub.one(i, state=i % STATE_EVERY == 0))
    published_in = time.time() - started
    await _drain(fleet, events * clients * CHANNELS)
    spent = CpuMeter.spent(before, cpu.mark())
    wall = time.time() - started
    stats = await fleet.call("stats")
    frames = stats["frames"]
    # From the first publish to the last frame, and at least the schedule's length (events / rate), so that a server
    # that keeps up delivers what is offered.
    span = max(stats["last"] - started, events / rate)
    return {
        "clients": clients,
        "offered_per_s": offered,
        "events": events,
        "events_per_s": round(rate, 2),
        "published_in_s": round(published_in, 2),
        "expected": events * clients * CHANNELS,
        "frames": frames,
        "delivered_per_s": frames / span,
        "state_lost": states * clients * CHANNELS - stats["types"].get(RUNNING, 0),
        "progress_coalesced": (events - states) * clients * CHANNELS - stats["types"].get(PROGRESS, 0),
        "cpu_s": spent,
        "wall_s": round(wall, 2),
        **{k: stats[k] for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "duplicates", "closed_by_server", "open")},
    }


_GC_LINE = re.compile(r'^strata_gc_pause_seconds_(count|sum|bucket)\{generation="2"(?:,le="([^"]+)")?\} (\S+)$')


async def _full_collections(ws_url: str) -> dict[str, float]:
    """The gateway's full garbage collections so far, from its /metrics: count, seconds, and how many took > 100 ms."""
    base = ws_url.replace("ws://", "http://").split("/api/", 1)[0]
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(base + "/metrics")).text
    found = {"count": 0.0, "sum": 0.0, "le_0.1": 0.0}
    for line in text.splitlines():
        m = _GC_LINE.match(line)
        if m and m.group(1) != "bucket":
            found[m.group(1)] = float(m.group(3))
        elif m and m.group(2) == "0.1":
            found["le_0.1"] = float(m.group(3))
    return {"count": found["count"], "seconds": found["sum"], "over_100ms": found["count"] - found["le_0.1"]}


def _gc_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    return {k: round(after[k] - before[k], 3) for k in before}


async def fanout(
    fleet: _FleetProcess,
    pub: _Publisher,
    servers: dict[str, tuple[str, int]],
    *,
    nats_pid: int,
    token: str,
    channels: list[str],
    clients: tuple[int, ...],
    rates: tuple[float, ...],
    seconds: float,
    settle_s: float,
    compression: str | None,
) -> list[dict[str, Any]]:
    """Each client count against each server (name -> (ws URL, pid)): connect, warm up, settle (a phase reported
    apart), one phase per rate."""
    out = []
    for count in clients:
        for name, (url, pid) in servers.items():
            connected = await fleet.call(
                "connect", url=url, token=token, channels=channels, count=count, compression=compression
            )
            print(
                f"    {name}: {connected['connected']}/{count} clients connected and subscribed in "
                f"{connected['seconds']:.1f}s (extensions: {', '.join(connected['extensions']) or 'none'})"
                + (f"; errors {connected['errors']}" if connected["errors"] else ""),
                flush=True,
            )
            if connected["connected"] < count:
                await fleet.call("disconnect")
                raise RuntimeError(f"{name}: only {connected['connected']} of {count} clients connected")
            cpu = CpuMeter({"server": pid, "clients": fleet.pid, "nats": nats_pid, "bench": os.getpid()})
            await fleet.call("reset")  # warm-up: a few events to every client
            await _paced(3, 10.0, lambda i: pub.one(i, state=True))
            await _drain(fleet, 3 * count * CHANNELS, timeout_s=30)
            try:
                # The first phase right after the sockets connect is reported apart: the server's collector is still
                # taking in the new connections' objects (full collections of every live object, 100+ ms at 1,000
                # sockets), which a gateway whose clients come and go a few at a time does once in minutes.
                for settling, offered in ((True, rates[0]), *((False, r) for r in rates)):
                    gc_before = await _full_collections(url) if name == "gateway" else None
                    result = await _phase(
                        fleet, pub, cpu, clients=count, offered=offered, seconds=settle_s if settling else seconds
                    )
                    gc_after = await _full_collections(url) if name == "gateway" else None
                    result.update(settling=settling, full_gc=_gc_delta(gc_before, gc_after))
                    result.update(server=name, connect_s=round(connected["seconds"], 2))
                    result["extensions"] = connected["extensions"]
                    result["deflate"] = "permessage-deflate" in connected["extensions"]
                    out.append(result)
                    print(f"      {_phase_line(result)}", flush=True)
                    await asyncio.sleep(0.5)
            finally:
                await fleet.call("disconnect")
            await asyncio.sleep(1.0)  # let the server let go of the sockets
    return out


def _label(r: dict[str, Any], mixed: bool = True) -> str:
    """The server, whether permessage-deflate was off (said only when some phases had it on: ``mixed``), and whether
    the phase came right after the clients connected."""
    return (
        str(r["server"])
        + ("" if r["deflate"] or not mixed else ", no deflate")
        + (", just connected" if r.get("settling") else "")
    )


def _gc_text(r: dict[str, Any]) -> str:
    gc = r.get("full_gc")
    if not gc:
        return "-"
    return f"{gc['count']:.0f} ({gc['seconds'] * 1000:.0f} ms, {gc['over_100ms']:.0f} > 100 ms)"


def _phase_line(r: dict[str, Any]) -> str:
    return (
        f"{_label(r):<20} {r['clients']:>5} clients, {r['offered_per_s']:>6.0f} offered/s: "
        f"{r['delivered_per_s']:>8.0f} delivered/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
        f"state lost {r['state_lost']}, progress coalesced {r['progress_coalesced']}, "
        f"closed {r['closed_by_server'] or 'none'}, full GCs {_gc_text(r)}"
    )


# -- (2) resume -----------------------------------------------------------------------------------------------------
async def _ws_replay(url: str, token: str, channel: str, since: int, seqs: list[int]) -> dict[str, Any]:
    t0 = clock()
    client = WsClient(url, token=token, request_timeout_s=60)
    await client.connect()
    t1 = clock()
    answer = await client.subscribe(channel, since=since)
    t2 = clock()
    got: list[int] = []
    try:
        while not got or got[-1] < seqs[-1]:
            got.append(int((await client.receive(timeout_s=30))["seq"]))
    except TimeoutError:
        pass
    t3 = clock()
    await client.close()
    return {
        "total_s": t3 - t0,
        "connect_s": t1 - t0,
        "subscribed_s": t2 - t1,
        "events_s": t3 - t2,
        "received": len(got),
        "in_order": got == sorted(got) and set(got) <= set(seqs),
        "complete": got == seqs,
        "recovered": answer.get("recovered"),
        "duplicates": client.duplicates,
        "reconnects": client.reconnects,
    }


async def _js_replay(nats_url: str, job_id: str, since: int, count: int) -> dict[str, Any]:
    t0 = clock()
    nc = await nats.connect(nats_url, name="bench-ws-replay")
    try:
        js = nc.jetstream()
        config = js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=since + 1,
            ack_policy=js_api.AckPolicy.NONE,
            inactive_threshold=30.0,
            mem_storage=True,
            num_replicas=1,
        )
        t1 = clock()
        sub = await js.pull_subscribe(job_events_filter(job_id), stream=EVENTS_STREAM, config=config)
        got = 0
        while got < count:
            for msg in await sub.fetch(min(1000, count - got), timeout=10):
                json.loads(msg.data)
                got += 1
        t2 = clock()
        await sub.unsubscribe()
    finally:
        await nc.close()
    return {"total_s": t2 - t0, "connect_s": t1 - t0, "events_s": t2 - t1, "received": got}


async def resume(
    url: str, token: str, nats_url: str, pub: _Publisher, *, events: int, rounds: int, state: bool
) -> dict[str, Any]:
    channel = f"job:{pub.job_id}"
    async with WsClient(url, token=token) as client:  # a position: one event seen
        await client.subscribe(channel)
        since = await pub.one(0, state=True)
        seen = await client.receive(timeout_s=10)
        if seen["seq"] != since:
            raise RuntimeError(f"expected seq {since}, got {seen['seq']}")
    t0 = clock()
    seqs = await pub.many(events, state=state)
    publish_s = clock() - t0
    ws_runs, js_runs = [], []
    for _ in range(rounds):
        ws_runs.append(await _ws_replay(url, token, channel, since, seqs))
        js_runs.append(await _js_replay(nats_url, pub.job_id, since, len(seqs)))
        if ws_runs[-1]["received"] == 0:
            raise RuntimeError(f"nothing replayed over the WebSocket: {ws_runs[-1]}")

    def median(runs: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r[key] for r in runs))

    return {
        "kind": "running" if state else "progress",
        "events": events,
        "publish_s": round(publish_s, 3),
        "rounds": rounds,
        "ws": {k: median(ws_runs, k) for k in ("total_s", "connect_s", "subscribed_s", "events_s", "received")},
        "js": {k: median(js_runs, k) for k in ("total_s", "connect_s", "events_s", "received")},
        "ws_runs": ws_runs,
        "complete": all(r["complete"] for r in ws_runs),
        "in_order": all(r["in_order"] for r in ws_runs),
        "duplicates": sum(r["duplicates"] for r in ws_runs),
        "reconnects": sum(r["reconnects"] for r in ws_runs),
        "recovered": [r["recovered"] for r in ws_runs],
    }


# -- (3) automatic resume -------------------------------------------------------------------------------------------
async def auto_resume(url: str, token: str, pub: _Publisher, *, events: int, rate: float) -> dict[str, Any]:
    channel = f"job:{pub.job_id}"
    client = WsClient(url, token=token, backoff_s=(0.05, 1.0))
    await client.connect()
    await client.subscribe(channel)
    seqs: list[int] = []
    got: list[int] = []
    gap = 0.0

    async def send(i: int) -> None:
        seqs.append(await pub.one(i, state=True))

    publisher = asyncio.create_task(_paced(events, rate, send))
    try:
        last = clock()
        while len(got) < events:
            got.append(int((await client.receive(timeout_s=30))["seq"]))
            now = clock()
            gap, last = max(gap, now - last), now
            if len(got) == events // 4:
                client.drop_connection()
        await publisher
    except TimeoutError:
        publisher.cancel()
    finally:
        await client.close()
    return {
        "events": events,
        "rate": rate,
        "received": len(got),
        "exactly_once_in_order": got == sorted(seqs),
        "reconnects": client.reconnects,
        "duplicates_dropped": client.duplicates,
        "longest_gap_ms": round(gap * 1000, 1),
    }


# -- the benchmark --------------------------------------------------------------------------------------------------
async def _main(stack: _Stack, **options: Any) -> dict[str, Any]:
    gateway = stack.procs["gateway"].url
    with httpx.Client() as http, _timed("made the user and ran its three jobs"):
        token, owner_id, jobs = await asyncio.to_thread(_owner_and_jobs, http, gateway, 3)
    assert stack.nats.process is not None
    return await measure(
        nats_url=stack.nats.url,
        nats_pid=stack.nats.process.pid,
        gateway=(gateway.replace("http://", "ws://") + WS_PATH, stack.pid("gateway")),
        token=token,
        owner_id=owner_id,
        jobs=jobs,
        **options,
    )


async def measure(
    *,
    nats_url: str,
    nats_pid: int,
    gateway: tuple[str, int],
    token: str,
    owner_id: str,
    jobs: list[str],
    clients: tuple[int, ...],
    rates: tuple[float, ...],
    seconds: float,
    settle_s: float,
    resume_events: int,
    resume_rounds: int,
    compression: str | None,
) -> dict[str, Any]:
    """(1), (2) and (3) against ``gateway`` (its WebSocket URL and pid), once the user (``token``, ``owner_id``) and
    three jobs of theirs exist."""
    ws_url = gateway[0]
    deflate = await _accepts_deflate(ws_url)
    bus = Bus(nats_url, name="bench-ws")
    await bus.start(wait_s=10)
    fleet = _FleetProcess()
    port = free_port()
    baseline = multiprocessing.get_context("spawn").Process(
        target=_baseline_main, args=(port, nats_url, owner_id, deflate), name="ws-baseline"
    )
    baseline.start()
    summary: dict[str, Any] = {
        "clients": clients,
        "rates": rates,
        "phase_s": seconds,
        "offered_compression": compression,
        "gateway_deflate": deflate,
        "fanout": [],
    }
    try:
        await _wait_port(port)
        assert baseline.pid is not None
        servers = {"baseline": (f"ws://127.0.0.1:{port}{WS_PATH}", baseline.pid), "gateway": gateway}
        passes = [(clients, compression)]
        if compression is not None and deflate:  # and what permessage-deflate costs, at the target's client count
            passes.append(((min(clients, key=lambda c: abs(c - TARGET_P99_CLIENTS)),), None))
        print(f"  (1) fan-out: {', '.join(f'{n:,}' for n in clients)} clients x {CHANNELS} channels", flush=True)
        for counts, offer in passes:
            if offer is None and compression is not None:
                print(f"    again with {counts[0]:,} clients that do not offer permessage-deflate", flush=True)
            summary["fanout"] += await fanout(
                fleet,
                _Publisher(bus, owner_id, jobs[0]),
                servers,
                nats_pid=nats_pid,
                token=token,
                channels=[f"job:{jobs[0]}", "user"],
                clients=counts,
                rates=rates,
                seconds=seconds,
                settle_s=settle_s,
                compression=offer,
            )
        fleet.stop()
        baseline.terminate()
        print(f"  (2) resume: {resume_events:,} events missed, {resume_rounds} round(s)", flush=True)
        summary["resume"] = []
        for state, job in ((True, jobs[1]), (False, jobs[2])):
            pub = _Publisher(bus, owner_id, job)
            result = await resume(ws_url, token, nats_url, pub, events=resume_events, rounds=resume_rounds, state=state)
            summary["resume"].append(result)
            print(
                f"    {result['kind']}: WS {result['ws']['total_s']:.3f}s ({result['ws']['received']:.0f} received), "
                f"JetStream {result['js']['total_s']:.3f}s",
                flush=True,
            )
        print("  (3) automatic resume after an aborted connection", flush=True)
        pub = _Publisher(bus, owner_id, jobs[1])
        summary["auto_resume"] = await auto_resume(ws_url, token, pub, events=2000, rate=1000)
        print(f"    {summary['auto_resume']}", flush=True)
    finally:
        fleet.stop()
        if baseline.is_alive():
            baseline.terminate()
        baseline.join(5)
        await bus.close()
    return summary


async def _wait_port(port: int, timeout_s: float = 15.0) -> None:
    deadline = clock() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if clock() > deadline:
                raise
            await asyncio.sleep(0.05)


def _raise_fd_limit(needed: int) -> None:
    """Sockets are files: the clients' process, the gateway and the baseline each hold one per client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed <= hard or (soft < needed and hard == resource.RLIM_INFINITY):
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    elif soft < needed:
        raise RuntimeError(f"{needed} open files needed; the limit is {hard} (ulimit -n)")


def run(
    *,
    clients: tuple[int, ...] = (100, 1000, 5000),
    rates: tuple[float, ...] = (10_000, 20_000, 40_000),
    seconds: float = 10.0,
    settle_s: float = 6.0,
    resume_events: int = 10_000,
    resume_rounds: int = 3,
    compression: str | None = "deflate",
) -> dict[str, Any]:
    _raise_fd_limit(max(clients) * 2 + 1000)  # inherited by every process started from here
    root = Path(tempfile.mkdtemp(prefix="strata-bench-ws-"))
    stack = _Stack(root)
    try:
        with _timed("started nats-server, auth, datasets, execution, gateway"):
            stack.start(max_sockets=max(clients) + 100)
        coro = _main(
            stack,
            clients=clients,
            rates=rates,
            seconds=seconds,
            settle_s=settle_s,
            resume_events=resume_events,
            resume_rounds=resume_rounds,
            compression=compression,
        )
        summary = run_loop(coro)
    except Exception:
        print(stack.log_tail())
        raise
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)
    _print(summary)
    return summary


# -- the tables -----------------------------------------------------------------------------------------------------
def _ratio(value: float, base: float) -> str:
    return f"x{value / base:.2f}" if base and value == value and base == base else "-"


def _print(s: dict[str, Any]) -> None:
    rows = []
    phases = s["fanout"]
    mixed = len({r["deflate"] for r in phases}) > 1

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["clients"], r["offered_per_s"], r["deflate"], bool(r.get("settling")))

    base = {key(r): r for r in phases if r["server"] == "baseline"}
    for r in phases:
        b = base.get(key(r))
        is_base = r["server"] == "baseline"
        frames = max(r["frames"], 1)
        server_us = r["cpu_s"]["server"] / frames * 1e6
        base_us = b["cpu_s"]["server"] / max(b["frames"], 1) * 1e6 if b else float("nan")
        rows.append(
            [
                _label({**r, "server": "baseline: bare websockets broadcast" if is_base else "gateway"}, mixed),
                f"{r['clients']:,}",
                f"{r['offered_per_s']:,.0f}",
                f"{r['delivered_per_s']:,.0f}",
                "100 %" if is_base or not b else f"{r['delivered_per_s'] / b['delivered_per_s'] * 100:.0f} %",
                f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} / {r['max_ms']:.0f}",
                "" if is_base or not b else _ratio(r["p99_ms"], b["p99_ms"]),
                f"{r['state_lost']} / {r['progress_coalesced']}",
                ", ".join(f"{k}x{v}" for k, v in r["closed_by_server"].items()) or "-",
                f"{server_us:.1f}" + ("" if is_base or not b else f" ({_ratio(server_us, base_us)})"),
                " / ".join(f"{r['cpu_s'][k] / r['wall_s'] * 100:.0f}" for k in ("server", "clients", "nats")),
                _gc_text(r),
            ]
        )
    accepts = "accepts it" if s["gateway_deflate"] else "refuses it (STRATA_GATEWAY_WS_PER_MESSAGE_DEFLATE)"
    print(
        f"\n(1) Fan-out: every client follows job:<id> and user (2 frames per event), 1 in {STATE_EVERY} events a "
        f"state change; {s['phase_s']:g} s per rate, after a phase 'just connected' at the first rate. The clients "
        f"offer permessage-deflate, as browsers do; the gateway "
        f"{accepts} and the baseline does as the gateway"
    )
    print(
        table(
            [
                "",
                "clients",
                "offered/s",
                "delivered/s",
                "vs baseline",
                "p50 / p99 / max ms",
                "p99 vs baseline",
                "state lost / progress coalesced",
                "closed by server",
                "server CPU us/frame",
                "CPU % server / clients / nats",
                "gateway full GCs (pause, > 100 ms)",
            ],
            rows,
        )
    )
    for deflate in sorted({r["deflate"] for r in phases}, reverse=True):
        gateway = [r for r in phases if r["server"] == "gateway" and r["deflate"] == deflate]
        how = "target" if deflate or not mixed else "without permessage-deflate"
        near = [r for r in gateway if r["clients"] <= TARGET_P99_CLIENTS and not r.get("settling")]
        just = [r for r in gateway if r["clients"] <= TARGET_P99_CLIENTS and r.get("settling")]
        if just:
            r = max(just, key=lambda r: r["clients"])
            print(
                f"{how}: just after {r['clients']:,} clients connected: p99 {r['p99_ms']:.1f} ms at "
                f"{r['offered_per_s']:,.0f}/s, full GCs {_gc_text(r)}"
            )
        if near:
            n = max(r["clients"] for r in near)
            verdicts = ", ".join(
                f"{r['p99_ms']:.1f} ms at {r['offered_per_s']:,.0f}/s "
                f"({'met' if r['p99_ms'] < TARGET_P99_MS else 'MISSED'})"
                for r in near
                if r["clients"] == n
            )
            note = "" if n == TARGET_P99_CLIENTS else f" (measured with {n:,})"
            print(f"{how}: {TARGET_P99_CLIENTS:,} clients, p99 < {TARGET_P99_MS:.0f} ms{note}: {verdicts}")
        sound = [r for r in gateway if r["state_lost"] == 0 and not r["closed_by_server"]]
        best = max(sound, key=lambda r: r["delivered_per_s"], default=None)
        if best is None:
            print(f"{how}: no gateway phase delivered every state event without closing sockets")
            continue
        ok = "met" if best["delivered_per_s"] >= TARGET_DELIVERED_PER_S else "MISSED"
        print(
            f"{how}: >= {TARGET_DELIVERED_PER_S:,.0f} frames/s delivered by one gateway process: "
            f"{best['delivered_per_s']:,.0f}/s ({best['clients']:,} clients, {best['offered_per_s']:,.0f} offered) "
            f"({ok})"
        )

    print(f"\n(2) Resume: {s['resume'][0]['events']:,} events missed, then connect + subscribe(since) (medians)")
    rows = []
    for r in s["resume"]:
        ws, js = r["ws"], r["js"]
        rows.append(
            [
                f"JetStream, nats-py: connect + consumer + fetch ({r['kind']}, baseline)",
                f"{js['received']:.0f}",
                f"{js['total_s'] * 1000:.0f}",
                f"{js['connect_s'] * 1000:.1f} / - / {js['events_s'] * 1000:.0f}",
                f"{js['received'] / js['total_s']:,.0f}",
                "x1.00",
                "",
            ]
        )
        checks = (
            f"{'complete' if r['complete'] else 'INCOMPLETE'}, {'in order' if r['in_order'] else 'OUT OF ORDER'}, "
            f"dup {r['duplicates']}, reconnects {r['reconnects']}, recovered {r['recovered']}"
        )
        rows.append(
            [
                f"WebSocket: connect + auth + subscribe(since) ({r['kind']})",
                f"{ws['received']:.0f}",
                f"{ws['total_s'] * 1000:.0f}",
                f"{ws['connect_s'] * 1000:.1f} / {ws['subscribed_s'] * 1000:.1f} / {ws['events_s'] * 1000:.0f}",
                f"{ws['received'] / ws['total_s']:,.0f}",
                _ratio(ws["total_s"], js["total_s"]),
                checks,
            ]
        )
    print(
        table(
            ["", "events", "to the last ms", "connect / subscribed / events ms", "events/s", "vs JetStream", ""],
            rows,
        )
    )
    a = s["auto_resume"]
    ok = "yes" if a["exactly_once_in_order"] and a["reconnects"] >= 1 else "NO"
    print(
        f"\n(3) Automatic resume: {a['events']:,} events at {a['rate']:,.0f}/s, the connection aborted after "
        f"{a['events'] // 4:,}: received {a['received']:,}, exactly once and in order: {ok}, reconnects "
        f"{a['reconnects']}, duplicates dropped {a['duplicates_dropped']}, longest gap {a['longest_gap_ms']:.0f} ms"
    )
