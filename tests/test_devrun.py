"""``make run``'s supervisor: up and ready, Ctrl-C stops every process, a second run reuses the data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from strata.common.procs import free_port

pytestmark = pytest.mark.slow


def start(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env.update(STRATA_DATA_DIR=str(data_dir), STRATA_GATEWAY_PORT=str(port))
    return subprocess.Popen(
        [sys.executable, "-m", "strata.common.devrun"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def wait_ready(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 60) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        assert proc.poll() is None, (proc.stdout.read() if proc.stdout else b"").decode()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"not ready in {timeout_s}s: {(proc.stdout.read() if proc.stdout else b'').decode()[-3000:]}")


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=40)
    return proc.returncode, output.decode(errors="replace")


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Supervisors this test starts: killed, with their pipes closed, even when the test fails half-way."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_make_run_comes_up_stops_cleanly_and_restarts(tmp_path: Path, started: list[subprocess.Popen[bytes]]) -> None:
    port = free_port()
    data = tmp_path / "data"
    proc = start(data, port)
    started.append(proc)
    wait_ready(proc, port)
    children = children_of(proc.pid)
    assert len(children) == 6  # nats-server and the five services
    ready = httpx.get(f"http://127.0.0.1:{port}/readyz").json()
    assert set(ready["checks"]) == {"nats", "auth", "datasets", "execution", "schemas"}

    # A second copy on the same data folder is refused with a clear message instead of corrupting it.
    clash = start(data, free_port())
    started.append(clash)
    out, _ = clash.communicate(timeout=20)
    assert clash.returncode == 2 and b"Another `make run`" in out

    code, output = stop(proc)
    assert code == 0, output[-3000:]
    for line in ("gateway   |", "datasets  |", "nats      | stopped"):
        assert line in output
    assert "Traceback" not in output
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()

    # Again, on the same data: the databases and the NATS store are reused.
    assert (data / "datasets.db").exists() and (data / "nats").is_dir()
    proc = start(data, port)
    started.append(proc)
    seconds = wait_ready(proc, port)
    code, output = stop(proc)
    assert code == 0 and seconds < 60
    assert "Running upgrade" not in output  # nothing left to migrate
