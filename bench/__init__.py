"""Strata benchmarks: ``python -m bench [gateway|auth|events|datasets]``; not in ``make test`` (bench/README.md).

Each benchmark starts its own ``nats-server`` and services on free loopback ports in a temporary data folder, measures,
prints a table with ratios against a baseline measured in the same run, and stops everything it started.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from strata.common.procs import NatsServer, ServiceProcess

T = TypeVar("T")


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on a uvloop event loop, as the services run (asyncio's own loop where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


# What every benchmarked process gets: JSON logs, and no access log line per request (it would dominate the cost).
BENCH_ENV: dict[str, str] = {
    "STRATA_LOG_FORMAT": "json",
    "STRATA_ACCESS_LOG": "false",
    # One client sends everything as one user: the gateway's per-user limits would measure themselves.
    "STRATA_GATEWAY_RATE_LIMIT_USER": "1000000/s;burst=1000000",
    "STRATA_GATEWAY_RATE_LIMIT_ANONYMOUS": "1000000/s;burst=1000000",
}


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) of already sorted values, by linear interpolation; NaN when empty."""
    if not sorted_values:
        return math.nan
    k = (len(sorted_values) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))]
        return "  ".join(parts).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def machine() -> str:
    """One line about where the figures were taken."""
    import platform

    return f"{platform.node()} · {os.cpu_count()} CPUs · Python {platform.python_version()} · {platform.system()}"


class ProcessStack:
    """A benchmark's processes: a nats-server and services, stopped together; subclasses start what they need."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nats = NatsServer(store_dir=root / "nats")
        self.procs: dict[str, ServiceProcess] = {}

    def stop(self) -> None:
        for proc in reversed(self.procs.values()):
            proc.stop()
        self.nats.stop()

    def pid(self, name: str) -> int:
        process = self.procs[name].process
        assert process is not None
        return process.pid

    def log_tail(self, chars: int = 3000) -> str:
        out = []
        for proc in self.procs.values():
            if proc.log_file is not None and proc.log_file.exists():
                out.append(f"--- {proc.service} ---\n{proc.log_file.read_text(errors='replace')[-chars:]}")
        return "\n".join(out)
