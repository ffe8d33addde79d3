"""SPEC "Intents" (nothing lost across a crash) and "The appservice side" (events handled
before the transaction is acknowledged), issue 6 point 1: the side-car is SIGKILLed at
each of its kill points (bot/faults.py) in a loop against the session's real Synapse and
real HTTP, restarted without the kill point, and then:

- every command Synapse delivered is reflected exactly once: one `commands` row, one
  intent, one reply in the room once the outbox has drained (a reply the crash kept from
  being sent is sent on restart; one sent just before the crash is not sent again);
- everything the bot posted in the room comes from one outbox row, once;
- no one-shot intent is answered `override: true` for two different turns, across the
  kill and the restart, and the turn it answered is the turn stored as bound;
- neither the log nor the database holds a token.

`ROUTE_SIDECAR_CRASH_RUNS` sets the number of runs (12 by default: two per kill point;
issue 6 asks for at least 200, the full setting). `ROUTE_SIDECAR_CRASH_REPORT`, when set,
is a path the figures are written to as JSON."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from .conftest import open_room
from .crash_support import (
    Answer,
    CrashRun,
    bot_room_events,
    dead,
    killed,
    plan,
    query,
    room_events,
    run_count,
    start_sidecar,
    wait_until,
)
from .harness import LookupClient, MatrixUser, Sidecar, is_bot_reply_to, reactions_on

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]
REPORT_ENV = "ROUTE_SIDECAR_CRASH_REPORT"
REDELIVERY_TIMEOUT = 120.0  # Synapse backs off 2 s, 4 s, 8 s, ... after failed pushes


async def test_sigkill_at_every_kill_point_loses_duplicates_and_leaks_nothing(
    users: dict[str, MatrixUser], sidecar: Sidecar
) -> None:
    runs = plan(run_count())
    violations: list[str] = []
    answers: list[Answer] = []
    records: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for index, (point, n) in enumerate(runs):
            record = await one_run(index, point, n, users, sidecar, violations, answers)
            records.append(record)
    finally:
        if dead(sidecar):  # leave the session's side-car running, without a kill point
            sidecar.stop()
            start_sidecar(sidecar, None)
    violations += leaked_tokens(sidecar, users)
    violations += double_overrides(sidecar, answers, "all runs")

    kills = Counter(r["point"] for r in records if r["killed"])
    summary = {
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
    print("\ncrash loop:", json.dumps(summary, indent=2))
    write_report(summary, records)

    assert not violations, "\n".join(violations)
    # A loop that never killed anything proves nothing: each point, set to die at its
    # first arrival, must have been reached.
    first_arrivals = {point for point, n in runs if n == 1}
    assert first_arrivals <= set(kills), f"points never reached: {first_arrivals - set(kills)}"


async def one_run(
    index: int,
    point: str,
    n: int,
    users: dict[str, MatrixUser],
    sidecar: Sidecar,
    violations: list[str],
    answers: list[Answer],
) -> dict[str, Any]:
    room = await open_room(users)  # the bot joins while the side-car runs as usual
    sidecar.stop()
    up = start_sidecar(sidecar, f"{point}@{n}")
    run = CrashRun(index, point, n, room, users, sidecar)
    if up:
        await run.drive()
        # The traffic is over: the outbox or a late echo can still reach the point.
        await wait_until(lambda: dead(sidecar), 1.5, 0.1)
    else:
        run.stage = "startup"
    was_killed = killed(sidecar)
    label = f"run {index} ({point}@{n}, stage {run.stage!r})"
    if dead(sidecar) and not was_killed:
        violations.append(f"{label}: the side-car exited by itself: {sidecar.log_tail(5)}")
    sidecar.stop()  # SIGTERM when the point was not reached; a dead process is reaped
    restarted = time.monotonic()
    start_sidecar(sidecar, None)
    await check_run(run, label, sidecar, violations)
    answers += run.answers
    return {
        "run": index,
        "point": point,
        "n": n,
        "killed": was_killed,
        "stage": run.stage,
        "commands": len(run.commands),
        "cut": run.cut,
        "recovery": round(time.monotonic() - restarted, 1),
    }


async def check_run(run: CrashRun, label: str, sidecar: Sidecar, violations: list[str]) -> None:
    found: list[str] = []
    alice, room = run.users["alice"], run.room
    # Synapse delivers in order: once a message sent now is seen, all earlier ones were.
    sentinel = await alice.say(room, f"after run {run.index}")
    seen = await wait_until(
        lambda: bool(query(sidecar, "SELECT 1 FROM seen_messages WHERE event_id = ?", sentinel)),
        REDELIVERY_TIMEOUT,
    )
    if not seen:
        found.append("Synapse's redelivery did not reach the restarted side-car")

    for command in run.commands:
        handled = query(sidecar, "SELECT intent_id FROM commands WHERE event_id = ?", command)
        intents = query(sidecar, "SELECT id FROM intents WHERE command_event_id = ?", command)
        if len(handled) != 1 or len(intents) != 1:
            found.append(f"command {command}: {len(handled)} command rows, {len(intents)} intents")
        elif handled[0][0] != intents[0][0]:
            found.append(f"command {command}: its row names {handled[0][0]}, not {intents[0][0]}")

    # The dispatcher asks again after the restart: the same turns, twice each, at once.
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

    events = await room_events(alice, room)
    for command in run.commands:
        replies = [e for e in events if is_bot_reply_to(e, command)]
        if len(replies) != 1:
            found.append(f"command {command}: {len(replies)} bot replies in the room")
        if len(reactions_on(events, command)) > 1:
            found.append(f"command {command}: reactions {reactions_on(events, command)}")
    posted = [e["event_id"] for e in bot_room_events(events)]
    sent = {
        event_id
        for (event_id,) in query(
            sidecar, "SELECT event_id FROM effects WHERE room_id = ? AND event_id IS NOT NULL", room
        )
    }
    twice = [event_id for event_id, count in Counter(posted).items() if count > 1]
    extra, missing = set(posted) - sent, sent - set(posted)
    if twice or extra or missing:
        mine = bot_room_events(events)
        shown = {e["event_id"]: e["content"].get("body", e["type"]) for e in mine}
        found.append(
            f"bot events vs the outbox: repeated {twice}, not from a sent outbox row "
            f"{[shown[e] for e in extra]}, marked sent but not in the room {sorted(missing)}"
        )

    found += double_overrides(sidecar, run.answers, "")
    violations += [f"{label}: {problem}" for problem in found]


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


def write_report(summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
    if os.environ.get(REPORT_ENV):
        report = {"summary": summary, "runs": records}
        Path(os.environ[REPORT_ENV]).write_text(json.dumps(report, indent=2), encoding="utf-8")


def leaked_tokens(sidecar: Sidecar, users: dict[str, MatrixUser]) -> list[str]:
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
        **{f"{name}'s access token": user.token for name, user in users.items()},
    }
    for name, secret in secrets.items():
        if secret in log:
            found.append(f"the side-car's log holds the {name}")
        if secret in dump:
            found.append(f"the side-car's database holds the {name}")
    return found
