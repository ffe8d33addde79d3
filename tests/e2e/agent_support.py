"""What the end-to-end tests of real agents without a plugin share (matrix-gptbot,
nanobot): finding an agent's venv, running the agent as its own process, and reading
which fake model answered from the agent's reply in the room (each fake model answers
"answer from <name>", demo/upstream.py).

The reader of the room is a `MatrixUser` or an `EncryptedUser` (both read the room's
events newest first, the latter decrypted), so the same helpers serve plain and
encrypted rooms.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, Protocol

import pytest

from .harness import BOT, Sidecar, joined, synapse_and_sidecar, synapse_python

MODELS = ("cloud", "local")  # the fake upstreams' names, as they sign their answers
ALICE = "@alice:localhost"  # the person in the room, who may route to any target
# `again_wait` short: an agent without a plugin never sees the question `again` re-asks.
ROUTING = {"intent_ttl": "15m", "turn_idle": "5m", "failure_grace": "1s", "again_wait": "2s"}


class RoomReader(Protocol):
    async def say(
        self, room_id: str, body: str, thread_root: str | None = None, msgtype: str = "m.text"
    ) -> str: ...

    async def events(self, room_id: str, limit: int = 100) -> list[dict[str, Any]]: ...

    async def wait_for(
        self,
        room_id: str,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 15.0,
        what: str = "event",
    ) -> dict[str, Any]: ...


def agent_python(python: Path, needed: Sequence[Path], what: str) -> Path:
    """An agent venv's Python; a missing venv (or a file it needs) fails the tests when
    Synapse is required (as in `make test`), and skips them, saying why, otherwise."""
    missing = [str(path) for path in (python, *needed) if not path.exists()]
    if missing:
        unavailable(f"{what} venv not found ({', '.join(missing)}): make setup")
    return python


def unavailable(why: str) -> NoReturn:
    """An agent the tests need is not installed: a failure where everything is required
    (`make test` sets ROUTE_SIDECAR_REQUIRE_SYNAPSE; CI sets CI), else a skip saying why."""
    if os.environ.get("ROUTE_SIDECAR_REQUIRE_SYNAPSE") or os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


@contextmanager
def synapse_for_agents(
    work: Path, agents: Sequence[str], **config: Any
) -> Iterator[tuple[Any, Sidecar]]:
    """A Synapse and a side-car for a module of real agents' tests: `agents` in the
    config's `agents`, alice allowed every target, `again_wait` short; more of the
    side-car's config in `config` (harness.synapse_and_sidecar)."""
    python = synapse_python()
    if python is None:
        pytest.fail("Synapse is required for the agents' tests: run `make setup`")
    permissions = {ALICE: 100, **{agent: 0 for agent in agents}}
    with synapse_and_sidecar(
        work, python, agents=list(agents), routing=ROUTING, permissions=permissions, **config
    ) as (hs, sidecar):
        yield hs, sidecar


async def joined_by_bot_and(reader: RoomReader, room_id: str, agent_id: str) -> str:
    """`room_id`, once the side-car's bot and the agent (both invited) have joined it."""
    for user_id in (BOT, agent_id):
        await reader.wait_for(room_id, joined(user_id), timeout=30, what=f"{user_id} to join")
    return room_id


class AgentProcess:
    """An agent as its own process (its own session, so it stops with its children), its
    output in `log_path`; stopped at the end."""

    def __init__(
        self, what: str, argv: Sequence[str], cwd: Path, log_path: Path, env: Mapping[str, str]
    ) -> None:
        self.what = what
        self.log_path = log_path
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                list(argv),
                cwd=cwd,
                stdout=log,
                stderr=log,
                env={**os.environ, **env},
                start_new_session=True,
            )
        time.sleep(0.5)
        if self.process.poll() is not None:
            raise RuntimeError(f"{what} exited at start:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_for_log(self, text: str, timeout: float) -> None:
        """Until the agent's log holds `text` (it says it is ready); fails if it exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.what} exited:\n{self.log_tail()}")
            if text in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.what} did not log {text!r}:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


def served_by(body: str) -> str:
    """Which fake model wrote an answer ("local" or "cloud")."""
    for name in MODELS:
        if f"answer from {name}" in body:
            return name
    raise AssertionError(body)


def is_message_from(agent: str, event: dict[str, Any]) -> bool:
    return event.get("sender") == agent and event.get("type") == "m.room.message"


async def reply_of(
    reader: RoomReader,
    agent: AgentProcess,
    agent_id: str,
    room_id: str,
    after: str,
    timeout: float,
    answers_only: bool = True,
) -> dict[str, Any]:
    """The agent's next message after the event `after` (newest first, so its latest):
    an answer from a model, or (`answers_only=False`) anything it says, such as a refusal
    of its own."""

    def wanted(event: dict[str, Any]) -> bool:
        content = event.get("content", {})
        if not is_message_from(agent_id, event) or "m.new_content" in content:
            return False  # an edit of an earlier answer is not a new one
        return not answers_only or "answer from" in content.get("body", "")

    async def newer() -> dict[str, Any] | None:
        found = None
        for event in await reader.events(room_id, 1000):  # newest first: stop at `after`
            if event["event_id"] == after:
                return found
            if found is None and wanted(event):
                found = event
        return None  # `after` not read yet (a syncing client): nothing is newer yet

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await newer()
        if found is not None:
            return found
        await asyncio.sleep(0.2)
    raise AssertionError(f"{agent.what} did not answer after {after}:\n{agent.log_tail()}")
