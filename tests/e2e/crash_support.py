"""The crash loop's tools (issue 6, point 1): the side-car started with a kill point
(`ROUTE_SIDECAR_CRASH_AT`, see bot/faults.py), the plan of kill points and counts, the
traffic one run drives, and the read-only look at the side-car's database. The users who
post are pluggable (`CrashRun.senders`): the encrypted loop (issue 6, point 6) drives the
same traffic from one encrypting client."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from bot import faults  # parsed here, unset: the test process itself never dies

from .harness import BOT, LookupClient, MatrixUser, Sidecar, hermes_request, is_bot_reply_to

RUNS_ENV = "ROUTE_SIDECAR_CRASH_RUNS"
DEFAULT_RUNS = 12  # two per kill point: the CI setting
ROUNDS = 3  # command, questions, concurrent claims, outcomes: per run
SENDERS = ("alice", "bob", "carol")
CLAIMS_PER_TURN = 3
CLOUD = "ollama-cloud/glm-5.1"

# Roughly how often one run's traffic reaches each point (with the bot's own echoes and
# the outbox): the n of `<point>@<n>` cycles through 1..this, so kills land early, in the
# middle and late in a run (and some runs end without reaching the point).
REACH = {
    "transaction-received": 10,
    "transaction-handled": 10,
    "command-committed": ROUNDS,
    "event-sent": 9,
    "claim-bound": ROUNDS,
    "outcome-committed": 2 * ROUNDS,
}
assert set(REACH) == set(faults.POINTS)


def run_count(env: str = RUNS_ENV, default: int = DEFAULT_RUNS) -> int:
    raw = os.environ.get(env, "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else default


def plan(runs: int) -> list[tuple[str, int]]:
    """(point, n) per run: the points in turn, n varied per pass."""
    points = faults.POINTS
    out = []
    for index in range(runs):
        point = points[index % len(points)]
        n = 1 + (index // len(points)) % REACH[point]
        out.append((point, n))
    return out


def start_sidecar(sidecar: Sidecar, crash_at: str | None) -> bool:
    """Start the side-car, with `crash_at` in its environment when given. False: it killed
    itself at its point while starting (the outbox or a queued transaction reached it)."""
    saved = os.environ.pop(faults.CRASH_ENV, None)
    try:
        if crash_at is not None:
            os.environ[faults.CRASH_ENV] = crash_at
        try:
            sidecar.start()
        except RuntimeError:
            if crash_at is not None and killed(sidecar):
                return False
            raise
        return True
    finally:
        os.environ.pop(faults.CRASH_ENV, None)
        if saved is not None:
            os.environ[faults.CRASH_ENV] = saved


def killed(sidecar: Sidecar) -> bool:
    """The process is gone by SIGKILL: in a run, only its kill point sends that."""
    process = sidecar.process
    return process is not None and process.poll() == -signal.SIGKILL


def dead(sidecar: Sidecar) -> bool:
    return sidecar.process is None or sidecar.process.poll() is not None


def query(sidecar: Sidecar, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{sidecar.db_path}?mode=ro", uri=True) as db:
        return db.execute(sql, params).fetchall()


async def wait_until(condition: Any, timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(step)
    return bool(condition())


async def room_events(user: MatrixUser, room: str) -> list[dict[str, Any]]:
    """Every event of a (small, per-run) room, oldest first."""
    events: list[dict[str, Any]] = []
    path = f"/rooms/{quote(room)}/messages?dir=f&limit=500"
    page = await user.request("GET", path)
    events += page["chunk"]
    while page.get("end") and page["chunk"]:
        page = await user.request("GET", f"{path}&from={page['end']}")
        events += page["chunk"]
    return events


class Speaker(Protocol):
    """Who posts in a run's room: a plain `MatrixUser` or an encrypting `EncryptedUser`."""

    async def say(self, room_id: str, body: str) -> str: ...

    async def events(self, room_id: str, limit: int = ...) -> list[dict[str, Any]]: ...


@dataclass
class Answer:
    """One claim answered over HTTP, as the dispatcher saw it."""

    run: int
    phase: str  # "crash" (the process with the kill point) or "restart"
    turn: str
    override: bool
    intent_id: str | None


@dataclass
class Turn:
    event_id: str
    text: str
    name: str


@dataclass
class CrashRun:
    """One run: traffic against the side-car that carries a kill point, until it dies or
    the traffic is over."""

    index: int
    point: str
    n: int
    room: str
    users: dict[str, Speaker]
    sidecar: Sidecar
    commands: list[str] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    stage: str = "start"
    cut: int = 0  # HTTP requests the kill cut off
    # Who sends the commands (in turn) and the questions (one per name of SENDERS, taken
    # from these in turn): all three users in a plain room, alice alone in an encrypted one.
    senders: tuple[str, ...] = SENDERS

    async def drive(self) -> None:
        lookup = LookupClient(self.sidecar.api_url)
        try:
            for number in range(1, ROUNDS + 1):
                if not await self._round(lookup, number):
                    return
            self.stage = "after the traffic"
        finally:
            await lookup.close()

    async def _round(self, lookup: LookupClient, number: int) -> bool:
        sender = self.users[self.senders[(self.index + number) % len(self.senders)]]
        self.stage = f"round {number}: command"
        if dead(self.sidecar):
            return False
        command = await sender.say(self.room, "!route cloud" if number % 2 else "!route c")
        self.commands.append(command)
        if not await self._wait_reply(sender, command):
            return False
        self.stage = f"round {number}: questions"
        turns = []
        for k in range(len(SENDERS)):
            name = self.senders[k % len(self.senders)]
            text = f"question {self.index}.{number} from {name}"
            if len(self.senders) < len(SENDERS):
                text += f" #{k + 1}"  # one sender asks several: distinct texts
            turns.append(Turn(await self.users[name].say(self.room, text), text, name))
        self.turns += turns
        self.stage = f"round {number}: concurrent claims"
        calls = [turn for turn in turns for _ in range(CLAIMS_PER_TURN)]
        random.Random(self.index * 10 + number).shuffle(calls)
        answers = await asyncio.gather(*(self.claim(lookup, t, "crash") for t in calls))
        won = [(turn, a) for turn, a in zip(calls, answers, strict=True) if a and a.override]
        if dead(self.sidecar):
            return False
        if not won:
            return True
        turn, answer = won[0]
        self.stage = f"round {number}: outcomes"
        for latency in (900, 400):
            try:
                response = await lookup.outcome(
                    answer.intent_id or "",
                    model=CLOUD,
                    status="ok",
                    latency_ms=latency,
                    turn_id=turn.event_id,
                )
            except httpx.HTTPError:
                self.cut += 1
                return False
            assert response.status_code == 204, response.text
        return not dead(self.sidecar)

    async def _wait_reply(self, user: Speaker, command: str, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if dead(self.sidecar):
                return False
            if any(is_bot_reply_to(e, command) for e in await user.events(self.room, 30)):
                return True
            await asyncio.sleep(0.1)
        return not dead(self.sidecar)  # late: the checks after the restart will tell

    async def claim(self, lookup: LookupClient, turn: Turn, phase: str) -> Answer | None:
        request = hermes_request(self.room, turn.event_id, f"[{turn.name}] {turn.text}")
        try:
            data = await lookup.claim(request=request)
        except httpx.HTTPError:
            self.cut += 1
            return None
        answer = Answer(self.index, phase, turn.event_id, data["override"], data["intent_id"])
        self.answers.append(answer)
        return answer


def bot_room_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the bot posted (its membership aside): each should come from one outbox row."""
    return [e for e in events if e.get("sender") == BOT and e.get("type") != "m.room.member"]


__all__ = [
    "Answer",
    "CrashRun",
    "Speaker",
    "bot_room_events",
    "dead",
    "killed",
    "plan",
    "query",
    "room_events",
    "run_count",
    "start_sidecar",
    "wait_until",
]
