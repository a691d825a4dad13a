"""The NATS connection: what our Bus fixes in nats-py."""

from __future__ import annotations

import asyncio
from typing import Any

from strata.common.events import Bus


async def test_a_cancelled_or_timed_out_flush_leaves_the_connection_reading(bus: Bus) -> None:
    """nats-py 2.16 would set a result on the cancelled PONG future and its read loop would die (events.py)."""
    nc = bus.nc
    for delay in (0, 0, 0.0001, 0.001):
        task = asyncio.create_task(nc.flush())
        await asyncio.sleep(delay)
        task.cancel()
    await asyncio.sleep(0.3)  # their PONGs arrive
    got: list[Any] = []

    async def received(msg: Any) -> None:
        got.append(msg)

    sub = await nc.subscribe("test.bus.after-cancelled-flush", cb=received)
    await nc.flush()
    await nc.publish("test.bus.after-cancelled-flush", b"x")
    await nc.flush()
    for _ in range(50):
        if got:
            break
        await asyncio.sleep(0.02)
    assert got and nc._reading_task is not None and not nc._reading_task.done()
    await sub.unsubscribe()
