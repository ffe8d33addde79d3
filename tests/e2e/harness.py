"""What the end-to-end tests drive: a real Synapse (synapse-example/local_synapse.py), the
side-car as its own process (`route-sidecar run`), and users who talk to the room over
the client-server API the way Element does."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from demo.matrix_user import (
    MatrixUser,
    edits_of,
    in_thread,
    is_bot_reply_to,
    joined,
    reactions_on,
    shown_text,
)
from route_sidecar import faults

__all__ = [  # with what the tests take from demo.matrix_user and local_synapse through here
    "API_TOKEN",
    "BOT",
    "REPO_ROOT",
    "SERVER",
    "LookupClient",
    "MatrixUser",
    "Sidecar",
    "agent_answer_in",
    "base_config",
    "edits_of",
    "failing_on",
    "free_port",
    "hermes_request",
    "in_thread",
    "is_bot_reply_to",
    "joined",
    "local_synapse",
    "reactions_on",
    "receipts_in",
    "register",
    "shown_text",
    "synapse_and_sidecar",
    "synapse_python",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "synapse-example"))

import local_synapse  # noqa: E402

SERVER = "localhost"
BOT = f"@route:{SERVER}"
API_TOKEN = "test-api-token-" + secrets.token_hex(8)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def synapse_python() -> str | None:
    env = os.environ.get("SYNAPSE_PYTHON")
    if env:
        return env
    default = REPO_ROOT / ".venv-synapse" / "bin" / "python"
    return str(default) if default.exists() else None


def base_config(hs_url: str, as_port: int, api_port: int, db: Path) -> dict[str, Any]:
    return {
        "homeserver": {"address": hs_url, "domain": SERVER},
        "appservice": {
            "id": "route-sidecar",
            "bot_localpart": "route",
            "address": f"http://127.0.0.1:{as_port}",
            "listen": {"host": "127.0.0.1", "port": as_port},
            "as_token": "placeholder-placeholder",
            "hs_token": "placeholder-placeholder",
        },
        "api": {"listen": {"host": "127.0.0.1", "port": api_port}, "tokens": [API_TOKEN]},
        "database": f"sqlite:///{db}",
        "targets": {
            "cloud": {"model": "ollama-cloud/glm-5.1", "aliases": ["c"]},
            "local": {"model": "glm-4.7-flash:q4_K_M"},
            "big": {"model": "ollama-cloud/big-1t", "level": 50},
        },
        "routing": {"intent_ttl": "15m", "turn_idle": "5m", "failure_grace": "1s"},
        "permissions": {
            "@alice:localhost": 100,
            "@bob:localhost": 0,
            "@agent:localhost": 0,
            "@carol:localhost": 0,
        },
        "agents": ["@agent:localhost"],
        "limits": {"routes_per_hour": 1000},
        "logging": {"level": "DEBUG"},
        "encryption": {"enabled": True, "key_wait": "2s"},
    }


class Sidecar:
    """The side-car as a separate process, as an admin runs it."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.config_path = workdir / "config.yaml"
        self.log_path = workdir / "sidecar.log"
        self.registration = workdir / "registration.yaml"
        self.process: subprocess.Popen[bytes] | None = None
        self.write_config(config)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "route_sidecar",
                "generate-registration",
                "-c",
                str(self.config_path),
                "-o",
                str(self.registration),
            ],
            check=True,
            cwd=REPO_ROOT,
            capture_output=True,
        )
        self.tokens = self.read_tokens()

    def write_config(self, config: dict[str, Any]) -> None:
        if self.config_path.exists():  # keep the generated tokens
            tokens = self.read_tokens()
            config = json.loads(json.dumps(config))
            config["appservice"].update(tokens)
        self.config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        self.config = config

    def read_tokens(self) -> dict[str, str]:
        from ruamel.yaml import YAML

        raw = YAML(typ="safe", pure=True).load(self.config_path.read_text(encoding="utf-8"))
        return {k: raw["appservice"][k] for k in ("as_token", "hs_token")}

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.config['api']['listen']['port']}"

    @property
    def as_url(self) -> str:
        return f"http://127.0.0.1:{self.config['appservice']['listen']['port']}"

    @property
    def db_path(self) -> Path:
        return Path(self.config["database"][len("sqlite:///") :])

    def start(self, timeout: float = 20.0) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "route_sidecar", "run", "-c", str(self.config_path)],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"side-car exited: {self.log_tail()}")
            try:
                if httpx.get(self.api_url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"side-car did not start: {self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self.process = None

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextmanager
def failing_on(sidecar: Sidecar, marker: str) -> Iterator[Sidecar]:
    """The side-car restarted with a fail point (route_sidecar/faults.py) on messages
    holding `marker` (encrypted ones once decrypted), then restarted without it."""
    saved = os.environ.pop(faults.FAIL_ENV, None)
    os.environ[faults.FAIL_ENV] = f"event-received:{marker}"
    try:
        sidecar.restart()
    finally:
        os.environ.pop(faults.FAIL_ENV, None)
        if saved is not None:
            os.environ[faults.FAIL_ENV] = saved
    try:
        yield sidecar
    finally:
        sidecar.restart()


@contextmanager
def synapse_and_sidecar(
    work: Path, synapse: str, **config: Any
) -> Iterator[tuple[local_synapse.SynapseHandle, Sidecar]]:
    """A throwaway Synapse on loopback with the side-car registered and running (its
    config: `base_config` updated with `config`); both stopped at the end, Synapse even
    when the side-car fails to start."""
    hs_port = free_port()
    sidecar = Sidecar(
        work,
        {
            **base_config(
                f"http://127.0.0.1:{hs_port}", free_port(), free_port(), work / "sidecar.db"
            ),
            **config,
        },
    )
    hs = local_synapse.start(
        work / "synapse",
        synapse_python=synapse,
        port=hs_port,
        server_name="localhost",
        registrations=[sidecar.registration],
    )
    try:
        sidecar.start()
        yield hs, sidecar
    finally:
        sidecar.stop()
        local_synapse.stop(hs.data_dir)


def register(hs_url: str, name: str) -> MatrixUser:
    """A new user of the tests' Synapse, signed in (password `pw-<name>-secret`)."""
    data = local_synapse.register_user(hs_url, name, f"pw-{name}-secret")
    return MatrixUser(hs_url, data["user_id"], data["access_token"])


class LookupClient:
    """The dispatcher side, in plain HTTP."""

    def __init__(self, base_url: str, token: str = API_TOKEN) -> None:
        self.client = httpx.AsyncClient(
            base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=10
        )

    async def claim(self, **body: Any) -> dict[str, Any]:
        response = await self.client.post("/v1/claim", json=body)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    async def outcome(self, intent_id: str, **body: Any) -> httpx.Response:
        return await self.client.post(f"/v1/intents/{intent_id}/outcome", json=body)

    async def room_intent(self, room_id: str) -> dict[str, Any] | None:
        response = await self.client.get(f"/v1/rooms/{quote(room_id, safe='')}/intent")
        if response.status_code == 404:
            return None
        assert response.status_code == 200, response.text
        intent: dict[str, Any] = response.json()
        return intent

    async def live_intent(self, room_id: str) -> dict[str, Any]:
        """The room's live intent; the test fails when there is none."""
        intent = await self.room_intent(room_id)
        assert intent is not None, f"no live intent in {room_id}"
        return intent

    async def close(self) -> None:
        await self.client.aclose()


def hermes_request(room_id: str, thread: str | None, user_text: str) -> dict[str, Any]:
    """An OpenAI body as the Hermes gateway builds it: context lines in the system prompt."""
    system = f"You are Hermes.\n\n**Matrix Room ID:** {room_id}\n"
    if thread:
        system += f"**Matrix Thread:** {thread}\n"
    return {
        "model": "glm-4.7-flash:q4_K_M",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user_text},
        ],
    }


def agent_answer_in(thread: str, agent_id: str) -> Callable[[dict[str, Any]], bool]:
    """A matcher for the agent's answer in a thread (Hermes answers in the thread)."""
    return in_thread(thread, agent_id)


def receipts_in(events: list[dict[str, Any]], thread: str) -> list[dict[str, Any]]:
    """The bot's notices in a thread (receipts, suggestions), edits excluded."""
    return [e for e in events if in_thread(thread, BOT)(e)]
