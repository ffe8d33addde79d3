"""The processes under measure: the side-car (`route-sidecar run`, exactly as deployed, no
homeserver) and the bare aiohttp yardstick (bench/bare.py). Each runs pinned to the
servers' CPU when pinning is on, and can be paused (SIGSTOP) while another is measured,
so that an idle one's timers (the side-car's sweep every second) steal nothing.

Tokens are random per run, handed over in the config file or the environment, never on
a command line and never printed.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SERVER_CPU = 0  # the servers' core; the load generator gets the other one
LOAD_CPU = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinning_available() -> bool:
    return (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None


def pinned(command: list[str], cpu: int | None) -> list[str]:
    """`command` run on one CPU (taskset execs it: the pid stays the command's)."""
    return command if cpu is None else ["taskset", "-c", str(cpu), *command]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def http_status(port: int, path: str, timeout: float = 1.0) -> int | None:
    """GET on loopback; None when nothing answers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


def http_post(
    port: int, path: str, body: bytes, token: str, method: str = "POST"
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            method,
            path,
            body=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@dataclass
class Server:
    """A server process the bench started; `port` serves `POST /v1/claim` and `/healthz`."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    token: str
    log_path: Path
    started_at: float  # perf_counter just before the process was started
    ready_after: float = float("nan")  # seconds from start to the first healthy answer
    paused: bool = False
    config: SidecarConfig | None = None  # a side-car's: its appservice port and hs_token

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Poll `/healthz` every 5 ms; the seconds from process start to its first 200."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
            if http_status(self.port, "/healthz", timeout=2.0) == 200:
                self.ready_after = time.perf_counter() - self.started_at
                return self.ready_after
            time.sleep(0.005)
        raise RuntimeError(f"{self.name} did not become ready:\n{self.log_tail()}")

    def pause(self) -> None:
        if not self.paused and self.process.poll() is None:
            os.kill(self.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            os.kill(self.pid, signal.SIGCONT)
            self.paused = False

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        return http_post(self.port, path, body, self.token)

    def stop(self) -> None:
        self.resume()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _spawn(
    command: list[str], log_path: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], float]:
    log = log_path.open("ab")
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO, stdout=log, stderr=log, env=env, start_new_session=True
    )
    log.close()
    return process, started


# ---- the side-car -------------------------------------------------------------------------


@dataclass
class SidecarConfig:
    """A side-car config with no homeserver: the lookup API and the appservice listener on
    free loopback ports, fresh tokens, the database in `work`."""

    work: Path
    database: Path
    api_port: int = field(default_factory=free_port)
    as_port: int = field(default_factory=free_port)
    api_token: str = field(default_factory=lambda: secrets.token_hex(16))
    hs_token: str = field(default_factory=lambda: secrets.token_hex(16))

    def as_dict(self) -> dict[str, Any]:
        return {
            # Nothing listens there: the bot never registers, so the outbox keeps what the
            # bot owes rooms and sends nothing (the Matrix figure measures sending).
            "homeserver": {"address": f"http://127.0.0.1:{free_port()}", "domain": "bench"},
            "appservice": {
                "address": f"http://127.0.0.1:{self.as_port}",
                "listen": {"host": "127.0.0.1", "port": self.as_port},
                "as_token": secrets.token_hex(16),
                "hs_token": self.hs_token,
            },
            "api": {
                "listen": {"host": "127.0.0.1", "port": self.api_port},
                "tokens": [self.api_token],
            },
            "database": f"sqlite:///{self.database}",
            "targets": {
                "cloud": {"model": "ollama-cloud/glm-5.1"},
                "local": {"model": "glm-4.7-flash"},
            },
            "permissions": {"*": 0},
            "limits": {"routes_per_hour": 0},
            # With encryption on, transactions wait for the bot's device, which needs the
            # homeserver: off here (the Matrix figure runs with it on).
            "encryption": {"enabled": False},
            "logging": {"level": "INFO"},
        }


def start_sidecar(
    config: SidecarConfig,
    name: str = "side-car",
    cpu: int | None = None,
    wrapper: Sequence[str] = (),
) -> Server:
    """Start `route-sidecar run` (not waiting for it: see `Server.wait_ready`), under
    `wrapper` (valgrind, say) when given."""
    config.work.mkdir(parents=True, exist_ok=True)
    path = config.work / f"{name}.yaml"
    path.write_text(json.dumps(config.as_dict()), encoding="utf-8")
    path.chmod(0o600)
    command = pinned([*wrapper, sys.executable, "-m", "route_sidecar", "run", "-c", str(path)], cpu)
    process, started = _spawn(command, config.work / f"{name}.log")
    log_path = config.work / f"{name}.log"
    return Server(
        name, process, config.api_port, config.api_token, log_path, started, config=config
    )


# ---- the yardstick --------------------------------------------------------------------------


def start_bare(work: Path, cpu: int | None = None, wrapper: Sequence[str] = ()) -> Server:
    """Start bench/bare.py on a free port with a fresh token (in its environment)."""
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "BENCH_BARE_TOKEN": token}
    command = pinned([*wrapper, sys.executable, "-m", "bench.bare", "--port", str(port)], cpu)
    process, started = _spawn(command, work / "bare.log", env)
    return Server("bare aiohttp", process, port, token, work / "bare.log", started)
