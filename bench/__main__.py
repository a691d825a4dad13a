"""``python -m bench [gateway|auth|events|datasets|execution|ws|all]``: run the benchmarks, print their tables.

What each measures, and the figures: bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import machine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "which", nargs="?", default="all", choices=("all", "gateway", "auth", "events", "datasets", "execution", "ws")
    )
    parser.add_argument("--quick", action="store_true", help="short runs, to check that the benchmarks work")
    parser.add_argument(
        "--client",
        default="auto",
        choices=("auto", "wrk", "python"),
        help="gateway and auth load generator (auto: wrk when installed)",
    )
    parser.add_argument("--connections", type=int, default=32, help="gateway, auth: concurrent connections")
    parser.add_argument(
        "--duration", type=float, default=None, help="gateway, auth: seconds per round (default: 10, 8)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    results: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine()}
    print(f"Strata benchmarks · {results['date']} · {results['machine']}", flush=True)
    if args.which in ("all", "gateway"):
        from . import gateway_overhead

        started = time.monotonic()
        print("\n== gateway overhead ==", flush=True)
        kwargs: dict[str, Any] = {"connections": args.connections, "client": args.client}
        if args.duration is not None:
            kwargs["duration_s"] = args.duration
        if args.quick:
            kwargs.update(duration_s=2.0, warmup_s=1.0, single_duration_s=1.0, rounds=1)
        results["gateway"] = gateway_overhead.run(**kwargs)
        print(f"(gateway benchmark took {time.monotonic() - started:.0f}s)", flush=True)
    if args.which in ("all", "auth"):
        from . import auth_overhead

        started = time.monotonic()
        print("\n== auth overhead ==", flush=True)
        kwargs = {"connections": args.connections, "client": args.client}
        if args.duration is not None:
            kwargs["duration_s"] = args.duration
        if args.quick:
            kwargs.update(duration_s=2.0, warmup_s=1.0, single_duration_s=1.0, rounds=1, micro_batches=50)
        results["auth"] = auth_overhead.run(**kwargs)
        print(f"(auth benchmark took {time.monotonic() - started:.0f}s)", flush=True)
    if args.which in ("all", "events"):
        from . import event_bus

        started = time.monotonic()
        print("\n== event bus ==", flush=True)
        kwargs = {}
        if args.quick:
            kwargs.update(messages=2000, latency_events=200, batch_events=2000)
        results["events"] = event_bus.run(**kwargs)
        print(f"(event bus benchmark took {time.monotonic() - started:.0f}s)", flush=True)
    if args.which in ("all", "datasets"):
        from . import datasets

        started = time.monotonic()
        print("\n== datasets: ingestion and preview ==", flush=True)
        kwargs = {}
        if args.quick:
            kwargs.update(csv_rows=1_000_000, preview_calls=100, warmup_calls=10)
        results["datasets"] = datasets.run(**kwargs)
        print(f"(datasets benchmark took {time.monotonic() - started:.0f}s)", flush=True)
    if args.which in ("all", "execution"):
        from . import execution

        started = time.monotonic()
        print("\n== execution: queries and jobs ==", flush=True)
        kwargs = {}
        if args.quick:
            kwargs.update(small_calls=60, warmup_calls=10, block=20, big_rows=2_000_000, heavy_rounds=3, jobs=200)
        results["execution"] = execution.run(**kwargs)
        print(f"(execution benchmark took {time.monotonic() - started:.0f}s)", flush=True)
    if args.which in ("all", "ws"):
        from . import ws_fanout

        started = time.monotonic()
        print("\n== WebSocket: fan-out and resume ==", flush=True)
        kwargs = {}
        if args.quick:
            kwargs.update(clients=(100, 500), rates=(10_000, 20_000), seconds=4.0, settle_s=3.0, resume_rounds=1)
        results["ws"] = ws_fanout.run(**kwargs)
        print(f"(WebSocket benchmark took {time.monotonic() - started:.0f}s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
