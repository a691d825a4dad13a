"""``make run``: the whole suite on one machine, from embedded defaults.

Starts ``nats-server`` (JetStream store under the data folder; skipped when ``STRATA_NATS_URL`` points elsewhere) and
the five services, each in a session of its own so that Ctrl-C reaches only this supervisor, which then stops them in
order. Their output is prefixed with the service name. If one dies, the rest are stopped and the exit code says so.

Environment: ``STRATA_DATA_DIR`` (default ``./.data``), ``STRATA_GATEWAY_PORT`` (default 8000); any other ``STRATA_*``
setting passes through to the services.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO

from .procs import SERVICES, NatsServer, free_port, http_json

COLORS = {"nats": 90, "auth": 33, "datasets": 32, "execution": 35, "schemas": 36, "gateway": 34}
START_ORDER = ("auth", "datasets", "execution", "schemas", "gateway")


class Supervisor:
    def __init__(self, data_dir: Path, gateway_port: int) -> None:
        self.data_dir = data_dir
        self.gateway_port = gateway_port
        self.color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.nats: NatsServer | None = None
        self.stopping = False
        self.first_run: str | None = None
        self._stopped: asyncio.Task[None] | None = None
        self.width = max(len(s) for s in (*SERVICES, "nats"))

    def say(self, name: str, line: str, stream: IO[str] = sys.stdout) -> None:
        label = name.ljust(self.width)
        if self.color:
            label = f"\033[{COLORS.get(name, 0)}m{label}\033[0m"
        print(f"{label} | {line}", file=stream, flush=True)

    async def pump(self, name: str, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if "FIRST RUN: created the admin" in line:
                self.first_run = line.split("FIRST RUN: ", 1)[1].split("  ", 1)[0]
            self.say(name, line)

    async def start(self) -> int:
        nats_url = os.environ.get("STRATA_NATS_URL")
        if not nats_url:
            self.nats = NatsServer(store_dir=self.data_dir / "nats", log_file=self.data_dir / "nats.log")
            self.nats.start()
            nats_url = self.nats.url
            self.say(
                "nats",
                f"nats-server with JetStream on {nats_url} (store {self.nats.store_dir}, log {self.nats.log_file})",
            )
        else:
            self.say("nats", f"using the NATS server at {nats_url}")

        ports = {name: free_port() for name in SERVICES if name != "gateway"}
        ports["gateway"] = self.gateway_port
        env = dict(os.environ)
        env.setdefault("STRATA_LOG_FORMAT", "text")
        env.setdefault("STRATA_DATASETS_DEMO_DATA", "true")
        env.update({"STRATA_DATA_DIR": str(self.data_dir), "STRATA_NATS_URL": nats_url, "PYTHONUNBUFFERED": "1"})
        for name, port in ports.items():
            env[f"STRATA_{name.upper()}_PORT"] = str(port)
            if name != "gateway":
                env[f"STRATA_GATEWAY_{name.upper()}_URL"] = f"http://127.0.0.1:{port}"
        env["STRATA_GATEWAY_HOST"] = os.environ.get("STRATA_GATEWAY_HOST", "127.0.0.1")

        pumps = []
        for name in START_ORDER:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                f"strata.{name}",
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
            self.procs[name] = proc
            pumps.append(asyncio.create_task(self.pump(name, proc)))
        waiters = {asyncio.create_task(p.wait()): n for n, p in self.procs.items()}
        ready = asyncio.create_task(self.wait_ready())
        done, _ = await asyncio.wait([*waiters, ready], return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
        exit_code = 0
        if ready in done and ready.result():
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task in waiters and not self.stopping:
                name = waiters[task]
                self.say(name, f"exited with code {task.result()}; stopping the others", sys.stderr)
                exit_code = 1
        await self.stop()
        for pump in pumps:
            pump.cancel()
        return exit_code

    async def wait_ready(self, timeout_s: float = 120.0) -> bool:
        url = f"http://127.0.0.1:{self.gateway_port}/readyz"
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            try:
                status, body = await asyncio.to_thread(http_json, url, 2.0)
            except (OSError, ValueError):
                status, body = 0, None
            if status == 200:
                self.banner(time.monotonic() - started)
                return True
            await asyncio.sleep(0.25)
        self.say("gateway", f"not ready after {timeout_s:.0f}s: {url} said {body}", sys.stderr)
        return True  # keep running: the logs above say what is wrong

    def banner(self, seconds: float) -> None:
        base = f"http://localhost:{self.gateway_port}"
        lines = [
            f"Strata is up in {seconds:.1f}s. Data in {self.data_dir}. Ctrl-C stops everything.",
            f"  API        {base}/api/v1",
            f"  Readiness  {base}/readyz",
            f"  Metrics    {base}/metrics",
            f"  Docs       {base}/docs  (Authorize: sign in with an email and password)",
            f"  Sign in    curl -X POST {base}/api/v1/auth/token -d username=EMAIL -d password=PASSWORD",
        ]
        if self.first_run:
            lines.append(f"  First run: {self.first_run}")
        else:
            lines.append(
                "  The first admin was created on the first run; its password was printed then (or set with "
                "STRATA_ADMIN_PASSWORD)."
            )
        for line in lines:
            self.say("gateway", line)

    async def stop(self) -> None:
        """Stop everything, once: every caller (the signal handler, the exit path) waits for the same stop."""
        self.stopping = True
        if self._stopped is None:
            self._stopped = asyncio.create_task(self._stop())
        await asyncio.shield(self._stopped)

    async def _stop(self) -> None:
        for name in reversed(START_ORDER):
            proc = self.procs.get(name)
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for name in reversed(START_ORDER):
            proc = self.procs.get(name)
            if proc is None:
                continue
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                self.say(name, "did not stop in 15s; killing it", sys.stderr)
                proc.kill()
                await proc.wait()
        if self.nats is not None:
            self.nats.stop()
            self.say("nats", "stopped")


async def amain(data_dir: Path, gateway_port: int, lock: IO[str]) -> int:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(
            f"Another `make run` is using {data_dir}; set STRATA_DATA_DIR (and STRATA_GATEWAY_PORT) to run a "
            "second copy.",
            file=sys.stderr,
        )
        return 2
    supervisor = Supervisor(data_dir, gateway_port)
    loop = asyncio.get_running_loop()

    stop_tasks: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        if not supervisor.stopping:
            supervisor.say("gateway", "stopping...")
            stop_tasks.append(asyncio.create_task(supervisor.stop()))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        return await supervisor.start()
    finally:
        await supervisor.stop()


def main() -> None:
    data_dir = Path(os.environ.get("STRATA_DATA_DIR", ".data")).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    gateway_port = int(os.environ.get("STRATA_GATEWAY_PORT", "8000"))
    with (data_dir / ".run.lock").open("w") as lock:  # held for the whole run: one `make run` per data folder
        sys.exit(asyncio.run(amain(data_dir, gateway_port, lock)))


if __name__ == "__main__":
    main()
