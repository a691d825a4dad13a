"""Event bus: JetStream publish rates, and outbox publish-to-handled latency, against core NATS measured alongside.

One ``nats-server -js`` of its own (temporary store), the streams Strata declares (:class:`strata.common.events.Bus`),
and everything else in this process on one event loop (uvloop, as the services run):

(a) Publish rate to ``STRATA_EVENTS`` with the headers Strata sends (``Nats-Msg-Id``, ``Content-Type``) and a
    CloudEvent of a few hundred bytes: ``js.publish`` awaiting each ack, and ``publish_async`` in batches (all futures
    of a batch awaited before the next). Baseline: core NATS publish to a subscriber on a second connection.
(b) Publish-to-handled latency at a steady rate: the time from staging an event (inside a committed SQLite session,
    ``stage_event`` + :class:`OutboxRelay`) to its handler running in an :class:`EventConsumer` (durable pull consumer,
    default :class:`ConsumerSpec`), the stage time carried in the event's data. Also ``Bus.publish_event`` straight to
    JetStream into the same kind of consumer (no outbox), and, as the baseline, core NATS pub -> sub.
    Then the highest sustained rate when staging in batches (the stager waits while more than ``max_backlog`` events
    are staged but not handled, so the figure is throughput end to end, not a burst into SQLite).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import nats
from sqlalchemy.orm import DeclarativeBase

from strata.common import tracing
from strata.common.consumer import ConsumerSpec, Delivery, EventConsumer
from strata.common.db import Database, new_metadata
from strata.common.events import EVENTS_STREAM, MSG_ID_HEADER, Bus, CloudEvent, EventPayload, source_of
from strata.common.outbox import OutboxMixin, OutboxRelay, stage_event
from strata.common.procs import NatsServer

from . import percentile, run_loop, table

SUBJECT_PREFIX = "strata.datasets.bench"  # inside STRATA_EVENTS (strata.datasets.>)
SOURCE = source_of("datasets")
clock = time.perf_counter


class Base(DeclarativeBase):
    metadata = new_metadata()


class Outbox(OutboxMixin, Base):
    """The outbox table, declared the way the services declare theirs."""


class BenchEvent(EventPayload):
    event_type: ClassVar[str] = f"{SUBJECT_PREFIX}.happened"
    seq: int
    t: float  # perf_counter() when the event was staged or published (same process, same clock)
    note: str = "x" * 120  # a payload of a realistic size


def _event(seq: int, subject: str, t: float = 0.0) -> CloudEvent:
    return CloudEvent.of(BenchEvent(seq=seq, t=t), source=SOURCE, subject=str(seq), type=subject)


def _headers(event: CloudEvent) -> dict[str, str]:
    return {MSG_ID_HEADER: event.id, "Content-Type": "application/cloudevents+json"}


def _lat_stats(latencies: list[float]) -> dict[str, float]:
    values = sorted(latencies)
    return {
        "n": len(values),
        "p50_ms": percentile(values, 50) * 1000,
        "p90_ms": percentile(values, 90) * 1000,
        "p99_ms": percentile(values, 99) * 1000,
        "max_ms": (values[-1] if values else 0.0) * 1000,
    }


async def _paced(count: int, rate: float, send: Callable[[int], Awaitable[None]]) -> None:
    """Call ``send(i)`` ``count`` times at ``rate`` per second, on a fixed schedule (late sends do not shift it)."""
    start = clock()
    for i in range(count):
        delay = start + i / rate - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        await send(i)


async def _wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = clock() + timeout_s
    while not predicate():
        if clock() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


# -- (a) publish rates ----------------------------------------------------------------------------------------------
async def core_throughput(bus: Bus, url: str, count: int) -> float:
    """Core NATS publish -> a subscriber on another connection: messages/s until the last one arrived."""
    sub_nc = await nats.connect(url, name="bench-sub")
    received = 0
    done = asyncio.Event()

    async def on_msg(_msg: Any) -> None:
        nonlocal received
        received += 1
        if received == count:
            done.set()

    subject = "bench.core.throughput"
    await sub_nc.subscribe(subject, cb=on_msg, pending_msgs_limit=count + 1, pending_bytes_limit=1 << 30)
    await sub_nc.flush()
    payload = _event(0, f"{SUBJECT_PREFIX}.core").model_dump_json().encode()
    headers = {MSG_ID_HEADER: "x" * 32, "Content-Type": "application/cloudevents+json"}
    nc = bus.nc
    start = clock()
    for _ in range(count):
        await nc.publish(subject, payload, headers=headers)
    await nc.flush()
    await asyncio.wait_for(done.wait(), 60)
    elapsed = clock() - start
    await sub_nc.close()
    return count / elapsed


async def js_sync_rate(bus: Bus, count: int) -> float:
    events = [_event(i, f"{SUBJECT_PREFIX}.sync") for i in range(count)]
    bodies = [(e.model_dump_json().encode(), _headers(e)) for e in events]
    js = bus.js
    start = clock()
    for body, headers in bodies:
        await js.publish(f"{SUBJECT_PREFIX}.sync", body, headers=headers)
    return count / (clock() - start)


async def js_async_rate(bus: Bus, count: int, batch: int) -> float:
    subject = f"{SUBJECT_PREFIX}.async{batch}"
    events = [_event(i, subject) for i in range(count)]
    bodies = [(e.model_dump_json().encode(), _headers(e)) for e in events]
    js = bus.js
    start = clock()
    for at in range(0, count, batch):
        futures = [await js.publish_async(subject, body, headers=headers) for body, headers in bodies[at : at + batch]]
        acks = await asyncio.gather(*futures)
        if any(ack.duplicate for ack in acks):
            raise RuntimeError("unexpected duplicate ack")
    return count / (clock() - start)


# -- (b) latencies --------------------------------------------------------------------------------------------------
async def core_latency(bus: Bus, url: str, count: int, rate: float) -> dict[str, float]:
    sub_nc = await nats.connect(url, name="bench-sub")
    latencies: list[float] = []

    async def on_msg(msg: Any) -> None:
        latencies.append(clock() - json.loads(msg.data)["data"]["t"])

    subject = "bench.core.latency"
    await sub_nc.subscribe(subject, cb=on_msg)
    await sub_nc.flush()
    nc = bus.nc

    async def send(i: int) -> None:
        event = _event(i, f"{SUBJECT_PREFIX}.core", clock())
        await nc.publish(subject, event.model_dump_json().encode(), headers=_headers(event))

    await _paced(count, rate, send)
    await nc.flush()
    await _wait_for(lambda: len(latencies) >= count, 10)
    await sub_nc.close()
    return _lat_stats(latencies)


class _Recorder:
    """A consumer handler that records (handled time - stage time) per event."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.handled = 0
        self.last_handled_at = 0.0

    async def __call__(self, event: CloudEvent, delivery: Delivery) -> None:
        now = clock()
        self.latencies.append(now - event.data["t"])
        self.handled += 1
        self.last_handled_at = now


def _consumer(bus: Bus, name: str, subject: str, recorder: _Recorder) -> EventConsumer:
    spec = ConsumerSpec(name=name, subjects=(subject,), description="benchmark")
    return EventConsumer(bus=bus, spec=spec, handler=recorder, service="bench")


async def _declared(consumer: EventConsumer) -> None:
    await consumer.declare()
    consumer.start()
    await asyncio.sleep(0.2)  # let the fetch loop bind and wait


async def js_latency(bus: Bus, count: int, rate: float) -> dict[str, float]:
    subject = f"{SUBJECT_PREFIX}.direct"
    recorder = _Recorder()
    consumer = _consumer(bus, "bench-direct", subject, recorder)
    await _declared(consumer)

    async def send(i: int) -> None:
        await bus.publish_event(_event(i, subject, clock()))

    try:
        await _paced(count, rate, send)
        await _wait_for(lambda: recorder.handled >= count, 15)
    finally:
        await consumer.stop()
    return _lat_stats(recorder.latencies)


async def outbox_latency(bus: Bus, db: Database, count: int, rate: float, name: str) -> dict[str, float]:
    subject = f"{SUBJECT_PREFIX}.{name}"
    recorder = _Recorder()
    consumer = _consumer(bus, f"bench-{name}", subject, recorder)
    await _declared(consumer)

    async def send(i: int) -> None:
        t = clock()
        async with db.session() as session:
            stage_event(session, Outbox, _event(i, subject, t))

    try:
        await _paced(count, rate, send)
        await _wait_for(lambda: recorder.handled >= count, 15)
    finally:
        await consumer.stop()
    return _lat_stats(recorder.latencies)


async def outbox_max_rate(
    bus: Bus, db: Database, count: int, batch: int, max_backlog: int, name: str
) -> dict[str, float]:
    """Stage ``count`` events, ``batch`` per transaction, as fast as the pipeline keeps up (bounded backlog)."""
    subject = f"{SUBJECT_PREFIX}.{name}"
    recorder = _Recorder()
    consumer = _consumer(bus, f"bench-{name}", subject, recorder)
    await _declared(consumer)
    staged = 0
    start = clock()
    try:
        while staged < count:
            while staged - recorder.handled > max_backlog:
                await asyncio.sleep(0.001)
            n = min(batch, count - staged)
            t = clock()
            async with db.session() as session:
                for i in range(staged, staged + n):
                    stage_event(session, Outbox, _event(i, subject, t))
            staged += n
        finished = await _wait_for(lambda: recorder.handled >= count, 30)
    finally:
        await consumer.stop()
    if not finished:
        raise RuntimeError(f"only {recorder.handled} of {count} events handled")
    stats = _lat_stats(recorder.latencies)
    stats["rate"] = count / (recorder.last_handled_at - start)
    return stats


# -- the benchmark --------------------------------------------------------------------------------------------------
async def _main(
    url: str, root: Path, *, messages: int, latency_events: int, rate: float, batch_events: int, max_backlog: int
) -> dict[str, Any]:
    tracing.setup_tracing(service_name="bench", mode="local")  # as the services run by default
    bus = Bus(url, name="strata-bench")
    await bus.start(wait_s=10)
    if not bus.is_connected:
        raise RuntimeError(f"could not connect to {url}")
    db = Database(f"sqlite+aiosqlite:///{root / 'bench.db'}")
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    relay = OutboxRelay(db=db, bus=bus, model=Outbox)
    relay.start()
    out: dict[str, Any] = {"messages": messages, "latency_events": latency_events, "rate": rate}
    try:
        size = len(_event(0, f"{SUBJECT_PREFIX}.sync", clock()).model_dump_json())
        out["event_bytes"] = size
        core_count = max(messages * 5, 50_000)
        print(f"  (a) publish rates: {messages} events of {size} B ({core_count} for core NATS)", flush=True)
        await core_throughput(bus, url, 5000)  # warm-up
        out["core_rate"] = await core_throughput(bus, url, core_count)
        print(f"    core NATS pub->sub   {out['core_rate']:9.0f} msg/s", flush=True)
        await js_sync_rate(bus, 500)  # warm-up
        out["js_sync_rate"] = await js_sync_rate(bus, messages)
        print(f"    js.publish (sync)    {out['js_sync_rate']:9.0f} msg/s", flush=True)
        for batch in (200, 1000):
            out[f"js_async_rate_{batch}"] = await js_async_rate(bus, messages, batch)
            print(f"    publish_async x{batch:<5} {out[f'js_async_rate_{batch}']:9.0f} msg/s", flush=True)
        info = await bus.js.stream_info(EVENTS_STREAM)
        out["stream_messages"] = info.state.messages

        print(f"  (b) publish-to-handled latency: {latency_events} events at {rate:g}/s", flush=True)
        out["core_latency"] = await core_latency(bus, url, latency_events, rate)
        print(f"    core NATS pub->sub          {_fmt_lat(out['core_latency'])}", flush=True)
        out["js_latency"] = await js_latency(bus, latency_events, rate)
        print(f"    JetStream -> EventConsumer  {_fmt_lat(out['js_latency'])}", flush=True)
        out["outbox_latency"] = await outbox_latency(bus, db, latency_events, rate, "outbox")
        print(f"    outbox -> EventConsumer     {_fmt_lat(out['outbox_latency'])}", flush=True)
        for batch in (1, 100):
            key = f"outbox_max_{batch}"
            n = batch_events if batch > 1 else batch_events // 2
            out[key] = await outbox_max_rate(bus, db, n, batch, max_backlog, f"max{batch}")
            out[key]["batch"] = batch
            rate_s = f"{out[key]['rate']:7.0f} ev/s"
            print(f"    outbox max rate, {batch:>3}/txn  {rate_s}  {_fmt_lat(out[key])}", flush=True)
        out["outbox_pending_after"] = await relay.pending_count()
    finally:
        await relay.stop()
        await bus.close()
        await db.dispose()
    return out


def _fmt_lat(s: dict[str, float]) -> str:
    return f"n={s['n']:<5} p50 {s['p50_ms']:7.2f} ms  p99 {s['p99_ms']:7.2f} ms  max {s['max_ms']:7.2f} ms"


def run(
    *,
    messages: int = 10_000,
    latency_events: int = 1000,
    rate: float = 200.0,
    batch_events: int = 10_000,
    max_backlog: int = 2000,
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="strata-bench-events-"))
    server = NatsServer(store_dir=root / "nats")
    try:
        server.start()
        coro = _main(
            server.url,
            root,
            messages=messages,
            latency_events=latency_events,
            rate=rate,
            batch_events=batch_events,
            max_backlog=max_backlog,
        )
        out = run_loop(coro)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    _print(out)
    return out


def _pct(value: float, base: float) -> str:
    return f"{value / base * 100:.1f} %" if base else "-"


def _print(out: dict[str, Any]) -> None:
    core = out["core_rate"]
    rows = [["core NATS pub -> sub, no ack (baseline)", f"{core:.0f}", "100 %"]]
    rows.append(["js.publish, await each ack", f"{out['js_sync_rate']:.0f}", _pct(out["js_sync_rate"], core)])
    for batch in (200, 1000):
        r = out[f"js_async_rate_{batch}"]
        rows.append([f"publish_async, batches of {batch}", f"{r:.0f}", _pct(r, core)])
    print(f"\n(a) publish rate to {EVENTS_STREAM}, {out['messages']} events of {out['event_bytes']} B + headers")
    print(table(["", "msg/s", "vs baseline"], rows))

    base = out["core_latency"]["p50_ms"]
    rows = []
    for label, key in (
        ("core NATS pub -> sub (baseline)", "core_latency"),
        ("Bus.publish_event -> EventConsumer", "js_latency"),
        ("stage (SQLite commit) -> relay -> EventConsumer", "outbox_latency"),
    ):
        s = out[key]
        rows.append(
            [
                label,
                s["n"],
                f"{s['p50_ms']:.2f}",
                f"{s['p90_ms']:.2f}",
                f"{s['p99_ms']:.2f}",
                f"{s['max_ms']:.2f}",
                f"x{s['p50_ms'] / base:.1f}" if base else "-",
            ]
        )
    print(f"\n(b) publish-to-handled latency, {out['latency_events']} events at {out['rate']:g}/s")
    print(table(["", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "p50 vs baseline"], rows))

    rows = []
    for batch in (1, 100):
        s = out[f"outbox_max_{batch}"]
        rows.append(
            [
                f"{batch} event(s) per transaction",
                s["n"],
                f"{s['rate']:.0f}",
                _pct(s["rate"], core),
                f"{s['p50_ms']:.1f}",
                f"{s['p99_ms']:.1f}",
            ]
        )
    print("\n(b) outbox max sustained rate, stage -> handled end to end (backlog bounded)")
    print(table(["staging", "events", "events/s", "vs core pub->sub", "p50 ms", "p99 ms"], rows))
