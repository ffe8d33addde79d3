"""The crash loop's tools (issue 6, point 1): the side-car started with a kill point
(`ROUTE_SIDECAR_CRASH_AT`, see route_sidecar/faults.py), the plan of kill points and counts, the
traffic one run drives, the read-only look at the side-car's database, and the
exactly-once checks both loops make after the restart. The users who post are pluggable
(`CrashRun.senders`): the encrypted loop (issue 6, point 6) drives the same traffic from
one encrypting client."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from route_sidecar import faults  # parsed here, unset: the test process itself never dies

from .harness import (
    BOT,
    LookupClient,
    MatrixUser,
    Sidecar,
    hermes_request,
    is_bot_reply_to,
    reactions_on,
)

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
    users: Mapping[str, Speaker]
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


async def crash_and_restart(run: CrashRun, violations: list[str]) -> tuple[str, bool, float]:
    """Start the side-car with the run's kill point, drive the traffic until the process
    dies (or the traffic is over), then start it again without: the run's label, whether
    it was killed, and when it was started again (time.monotonic)."""
    sidecar = run.sidecar
    sidecar.stop()
    if start_sidecar(sidecar, f"{run.point}@{run.n}"):
        await run.drive()
        # The traffic is over: the outbox or a late echo can still reach the point.
        await wait_until(lambda: dead(sidecar), 1.5, 0.1)
    else:
        run.stage = "startup"
    was_killed = killed(sidecar)
    label = f"run {run.index} ({run.point}@{run.n}, stage {run.stage!r})"
    if dead(sidecar) and not was_killed:
        violations.append(f"{label}: the side-car exited by itself: {sidecar.log_tail(5)}")
    sidecar.stop()  # SIGTERM when the point was not reached; a dead process is reaped
    restarted = time.monotonic()
    start_sidecar(sidecar, None)
    return label, was_killed, restarted


def run_record(run: CrashRun, was_killed: bool, restarted: float) -> dict[str, Any]:
    """One run's figures, once its checks are done (`recovery`: from the restart)."""
    return {
        "run": run.index,
        "point": run.point,
        "n": run.n,
        "killed": was_killed,
        "stage": run.stage,
        "commands": len(run.commands),
        "cut": run.cut,
        "recovery": round(time.monotonic() - restarted, 1),
    }


def bot_room_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the bot posted (its membership aside): each should come from one outbox row."""
    return [e for e in events if e.get("sender") == BOT and e.get("type") != "m.room.member"]


# ---- the checks both loops make after the restart ------------------------------------


async def handled_once_and_drained(run: CrashRun) -> list[str]:
    """One `commands` row and one intent per command of the run; the dispatcher's claims
    of the run's turns again (twice each, at once, as after its own restart); then the
    outbox drained, nothing abandoned."""
    found: list[str] = []
    sidecar, room = run.sidecar, run.room
    for command in run.commands:
        handled = query(sidecar, "SELECT intent_id FROM commands WHERE event_id = ?", command)
        intents = query(sidecar, "SELECT id FROM intents WHERE command_event_id = ?", command)
        if len(handled) != 1 or len(intents) != 1:
            found.append(f"command {command}: {len(handled)} command rows, {len(intents)} intents")
        elif handled[0][0] != intents[0][0]:
            found.append(f"command {command}: its row names {handled[0][0]}, not {intents[0][0]}")

    lookup = LookupClient(sidecar.api_url)
    try:
        await asyncio.gather(
            *(run.claim(lookup, turn, "restart") for turn in run.turns for _ in range(2))
        )
    finally:
        await lookup.close()

    unsent = "SELECT COUNT(*) FROM effects WHERE room_id = ? AND event_id IS NULL AND failed = 0"
    if not await wait_until(lambda: query(sidecar, unsent, room)[0][0] == 0, 30):
        found.append(f"the outbox did not drain: {query(sidecar, unsent, room)[0][0]} unsent")
    failed = query(sidecar, "SELECT key FROM effects WHERE room_id = ? AND failed = 1", room)
    if failed:
        found.append(f"room events abandoned: {[key for (key,) in failed]}")
    return found


def room_matches_outbox(sidecar: Sidecar, room: str, events: list[dict[str, Any]]) -> list[str]:
    """The bot's events in the room (as the homeserver lists them) are exactly the outbox
    rows marked sent, each once."""
    mine = bot_room_events(events)
    posted = [e["event_id"] for e in mine]
    sent = {
        event_id
        for (event_id,) in query(
            sidecar, "SELECT event_id FROM effects WHERE room_id = ? AND event_id IS NOT NULL", room
        )
    }
    twice = [event_id for event_id, count in Counter(posted).items() if count > 1]
    extra, missing = set(posted) - sent, sent - set(posted)
    if not (twice or extra or missing):
        return []
    shown = {e["event_id"]: e["content"].get("body", e["type"]) for e in mine}
    return [
        f"bot events vs the outbox: repeated {twice}, not from a sent outbox row "
        f"{[shown[e] for e in extra]}, marked sent but not in the room {sorted(missing)}"
    ]


def one_reply_per_command(commands: list[str], events: list[dict[str, Any]]) -> list[str]:
    """Each command answered once, with at most one reaction."""
    found = []
    for command in commands:
        replies = [e for e in events if is_bot_reply_to(e, command)]
        if len(replies) != 1:
            found.append(f"command {command}: {len(replies)} bot replies in the room")
        if len(reactions_on(events, command)) > 1:
            found.append(f"command {command}: reactions {reactions_on(events, command)}")
    return found


def double_overrides(sidecar: Sidecar, answers: list[Answer], where: str) -> list[str]:
    """A one-shot intent answered `override: true` for more than one turn, or for a turn
    other than the one stored as bound."""
    once = {row[0] for row in query(sidecar, "SELECT id FROM intents WHERE scope_kind = 'once'")}
    true_turns: dict[str, set[str]] = defaultdict(set)
    for answer in answers:
        if answer.override and answer.intent_id is not None:
            true_turns[answer.intent_id].add(answer.turn)
    found = []
    for intent_id, turns in true_turns.items():
        if intent_id not in once:
            continue
        bound = {
            turn
            for (turn,) in query(
                sidecar, "SELECT turn_id FROM bound_turns WHERE intent_id = ?", intent_id
            )
        }
        if len(turns) != 1 or turns != bound:
            phases = sorted({(a.phase, a.turn) for a in answers if a.intent_id == intent_id})
            found.append(
                f"{where + ': ' if where else ''}one-shot intent {intent_id} answered true for "
                f"turns {sorted(turns)} (bound: {sorted(bound)}; answers {phases})"
            )
    return found


def leaked_tokens(sidecar: Sidecar, tokens: dict[str, str]) -> list[str]:
    """The side-car's secrets, and the users' access tokens (`tokens`: whose → token), in
    neither its log nor its database."""
    log = sidecar.log_path.read_text(errors="replace")
    with sqlite3.connect(f"file:{sidecar.db_path}?mode=ro", uri=True) as db:
        dump = "\n".join(db.iterdump())
    found = []
    if "command handled" not in log or "CREATE TABLE intents" not in dump:
        found.append("the log or the database dump is not what the side-car writes")
    secrets = {
        "as_token": sidecar.tokens["as_token"],
        "hs_token": sidecar.tokens["hs_token"],
        **{f"api token {i}": token for i, token in enumerate(sidecar.config["api"]["tokens"])},
        **{f"{name}'s access token": token for name, token in tokens.items()},
    }
    for name, secret in secrets.items():
        if secret in log:
            found.append(f"the side-car's log holds the {name}")
        if secret in dump:
            found.append(f"the side-car's database holds the {name}")
    return found


def summary(
    runs: list[tuple[str, int]],
    records: list[dict[str, Any]],
    answers: list[Answer],
    violations: list[str],
    started: float,
) -> dict[str, Any]:
    """The figures of a loop (each record: one run's `point`, `n`, `killed`, `stage`,
    `commands`, `cut`, `recovery`)."""
    kills = Counter(r["point"] for r in records if r["killed"])
    return {
        "kill_points": len({point for point, _ in runs}),
        "runs": len(records),
        "kills": sum(kills.values()),
        "kills_per_point": dict(kills),
        "not_reached": [f"{r['point']}@{r['n']}" for r in records if not r["killed"]],
        "kill_stages": dict(Counter(r["stage"] for r in records if r["killed"])),
        "commands": sum(r["commands"] for r in records),
        "claims_answered": len(answers),
        "requests_cut_by_kills": sum(r["cut"] for r in records),
        "max_recovery_seconds": max((r["recovery"] for r in records), default=0.0),
        "wall_seconds": round(time.monotonic() - started, 1),
        "violations": violations,
    }


def never_reached(runs: list[tuple[str, int]], records: list[dict[str, Any]]) -> set[str]:
    """A loop that never killed anything proves nothing: each point, set to die at its
    first arrival, must have been reached."""
    killed_at = {r["point"] for r in records if r["killed"]}
    return {point for point, n in runs if n == 1} - killed_at


def write_report(env: str, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """The figures as JSON, to the path in the environment variable `env` (when set)."""
    if os.environ.get(env):
        report = {"summary": summary, "runs": records}
        Path(os.environ[env]).write_text(json.dumps(report, indent=2), encoding="utf-8")


__all__ = [
    "Answer",
    "CrashRun",
    "Speaker",
    "bot_room_events",
    "crash_and_restart",
    "dead",
    "double_overrides",
    "handled_once_and_drained",
    "killed",
    "leaked_tokens",
    "never_reached",
    "one_reply_per_command",
    "plan",
    "query",
    "room_events",
    "room_matches_outbox",
    "run_count",
    "run_record",
    "start_sidecar",
    "summary",
    "wait_until",
    "write_report",
]
