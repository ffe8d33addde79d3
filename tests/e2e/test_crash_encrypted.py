"""Issue 6, point 6: the crash loop of point 1 (tests/e2e/test_crash.py) in an encrypted
room. alice is a real encrypting client (demo/encrypted_user.py); she alone posts in the
room (commands and questions, Megolm-encrypted), claims and outcomes go over HTTP as in
the plain loop. The side-car is SIGKILLed at each of its kill points (bot/faults.py),
restarted without the kill point, and then:

- the bot still decrypts alice's next command (a `!route status` sent after the restart
  gets its reply), and that reply decrypts for her;
- the exactly-once invariants of the plain loop hold: one `commands` row and one intent
  per command of the run, one reply per command once the outbox has drained, the bot's
  events in the room are exactly the outbox rows marked sent, and no one-shot intent is
  answered `override: true` for two turns (across the kill and the restart);
- nothing the bot posted is in plaintext: on the homeserver every bot event in the room
  (its membership aside) is `m.room.encrypted`, and in alice's client every one of them
  decrypted (no `decryption_error`); the only notices the bot may send unencrypted, the
  "could not decrypt" ones, must not appear at all in a healthy run;
- the bot still has exactly one device, the one it had before the loop (no new device,
  so no lost Olm account).

`ROUTE_SIDECAR_CRASH_RUNS_ENCRYPTED` sets the number of runs (6 by default: one per kill
point). `ROUTE_SIDECAR_CRASH_REPORT_ENCRYPTED`, when set, is a path the figures are
written to as JSON."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from mautrix.types import UserID

from demo.encrypted_user import EncryptedUser

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
from .harness import BOT, LookupClient, MatrixUser, Sidecar, is_bot_reply_to, joined, reactions_on
from .test_crash import double_overrides, leaked_tokens

RUNS_ENV = "ROUTE_SIDECAR_CRASH_RUNS_ENCRYPTED"
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.asyncio(loop_scope="session"),
    # Known to FAIL today (issue 6, point 6, open; docs/reliability.md): Synapse 1.163
    # drops to-device messages from the appservice transactions it retries
    # (storage/databases/main/appservice.py, get_oldest_unsent_txn), so a room key sent
    # to the bot while it is down or dying is lost, and that sender's session stays
    # unreadable to it. Each failing run waits 120 s, so it is not part of `.ci/run` until
    # fixed; run it with ROUTE_SIDECAR_CRASH_RUNS_ENCRYPTED=6.
    pytest.mark.skipif(
        not os.environ.get(RUNS_ENV),
        reason="known failure (lost room keys after SIGKILL, issue 6 open): "
        f"set {RUNS_ENV} to run it",
    ),
]
DEFAULT_RUNS = 6  # one per kill point: the CI setting
REPORT_ENV = "ROUTE_SIDECAR_CRASH_REPORT_ENCRYPTED"
REDELIVERY_TIMEOUT = 120.0  # Synapse backs off 2 s, 4 s, 8 s, ... after failed pushes
KEY_WAIT = 10.0  # how long alice's client waits for a room key before flagging an event
UNREADABLE = "could not decrypt"


@pytest_asyncio.fixture(loop_scope="session")
async def alice(hs_url: str, users: dict[str, MatrixUser]) -> AsyncIterator[EncryptedUser]:
    """Alice on a new, encrypting device (the `users` fixture registered her)."""
    person = await EncryptedUser.login(hs_url, "alice", "pw-alice-secret", key_wait=KEY_WAIT)
    yield person
    await person.close()


async def bot_devices(alice: EncryptedUser) -> list[str]:
    keys = await alice.client.query_keys([UserID(BOT)])
    return sorted(keys.device_keys.get(UserID(BOT), {}))


async def test_sigkill_in_an_encrypted_room_keeps_decrypting_encrypting_and_exactly_once(
    users: dict[str, MatrixUser], sidecar: Sidecar, alice: EncryptedUser
) -> None:
    runs = plan(run_count(RUNS_ENV, DEFAULT_RUNS))
    devices = await bot_devices(alice)
    assert len(devices) == 1, f"the bot has devices {devices} before the loop"
    violations: list[str] = []
    answers: list[Answer] = []
    records: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for index, (point, n) in enumerate(runs):
            record = await one_run(
                index, point, n, alice, users["alice"], sidecar, devices, violations, answers
            )
            records.append(record)
    finally:
        if dead(sidecar):  # leave the session's side-car running, without a kill point
            sidecar.stop()
            start_sidecar(sidecar, None)
    violations += leaked_tokens(sidecar, {**users, "alice (encrypted)": alice})  # type: ignore[dict-item]
    violations += double_overrides(sidecar, answers, "all runs")
    final = await bot_devices(alice)
    if final != devices:
        violations.append(f"after the loop the bot has devices {final}, not {devices}")

    kills = Counter(r["point"] for r in records if r["killed"])
    summary = {
        "kill_points": len({point for point, _ in runs}),
        "runs": len(records),
        "kills": sum(kills.values()),
        "kills_per_point": dict(kills),
        "not_reached": [f"{r['point']}@{r['n']}" for r in records if not r["killed"]],
        "kill_stages": dict(Counter(r["stage"] for r in records if r["killed"])),
        "commands": sum(r["commands"] for r in records),
        "bot_events_checked": sum(r["bot_events"] for r in records),
        "claims_answered": len(answers),
        "requests_cut_by_kills": sum(r["cut"] for r in records),
        "bot_device": devices[0],
        "max_recovery_seconds": max((r["recovery"] for r in records), default=0.0),
        "wall_seconds": round(time.monotonic() - started, 1),
        "violations": violations,
    }
    print("\nencrypted crash loop:", json.dumps(summary, indent=2))
    write_report(summary, records)

    assert not violations, "\n".join(violations)
    first_arrivals = {point for point, n in runs if n == 1}
    assert first_arrivals <= set(kills), f"points never reached: {first_arrivals - set(kills)}"


def write_report(summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
    if os.environ.get(REPORT_ENV):
        report = {"summary": summary, "runs": records}
        Path(os.environ[REPORT_ENV]).write_text(json.dumps(report, indent=2), encoding="utf-8")


async def open_encrypted_room(alice: EncryptedUser, index: int) -> str:
    """A fresh encrypted room with alice and the bot, as Element would create it."""
    room = await alice.create_room(invite=[BOT], encrypted=True, name=f"encrypted crash {index}")
    await alice.wait_for(room, joined(BOT), timeout=20, what="the bot to join")
    return room


async def one_run(
    index: int,
    point: str,
    n: int,
    alice: EncryptedUser,
    reader: MatrixUser,
    sidecar: Sidecar,
    devices: list[str],
    violations: list[str],
    answers: list[Answer],
) -> dict[str, Any]:
    room = await open_encrypted_room(alice, index)  # the side-car runs as usual here
    sidecar.stop()
    up = start_sidecar(sidecar, f"{point}@{n}")
    run = CrashRun(index, point, n, room, {"alice": alice}, sidecar, senders=("alice",))
    if up:
        await run.drive()
        await wait_until(lambda: dead(sidecar), 1.5, 0.1)
    else:
        run.stage = "startup"
    was_killed = killed(sidecar)
    label = f"run {index} ({point}@{n}, stage {run.stage!r})"
    if dead(sidecar) and not was_killed:
        violations.append(f"{label}: the side-car exited by itself: {sidecar.log_tail(5)}")
    sidecar.stop()
    restarted = time.monotonic()
    start_sidecar(sidecar, None)
    bot_events = await check_run(run, alice, reader, label, sidecar, devices, violations)
    answers += run.answers
    return {
        "run": index,
        "point": point,
        "n": n,
        "killed": was_killed,
        "stage": run.stage,
        "commands": len(run.commands),
        "bot_events": bot_events,
        "cut": run.cut,
        "recovery": round(time.monotonic() - restarted, 1),
    }


async def check_run(
    run: CrashRun,
    alice: EncryptedUser,
    reader: MatrixUser,
    label: str,
    sidecar: Sidecar,
    devices: list[str],
    violations: list[str],
) -> int:
    """The run's checks; returns how many bot events in the room were checked."""
    found: list[str] = []
    room = run.room
    # The bot still decrypts: alice's next command gets a reply. Synapse delivers in order,
    # so once it is handled every earlier event (retried transactions too) was delivered.
    probe = await alice.say(room, "!route status")
    try:
        reply = await alice.wait_reply(room, probe, timeout=REDELIVERY_TIMEOUT)
    except AssertionError as error:
        found.append(f"no reply to the command sent after the restart: {error}")
    else:
        if reply.get("encrypted") is not True:
            found.append(f"the reply after the restart arrived unencrypted: {reply}")

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

    # The homeserver's view (a plain client of alice's: ciphertext stays ciphertext).
    raw = bot_room_events(await room_events(reader, room))
    clear = [e for e in raw if e.get("type") != "m.room.encrypted"]
    if clear:
        shown = [(e["type"], e.get("content", {}).get("body", "")) for e in clear]
        found.append(f"bot events sent in plaintext in the encrypted room: {shown}")
    posted = [e["event_id"] for e in raw]
    sent = {
        event_id
        for (event_id,) in query(
            sidecar, "SELECT event_id FROM effects WHERE room_id = ? AND event_id IS NOT NULL", room
        )
    }
    twice = [event_id for event_id, count in Counter(posted).items() if count > 1]
    extra, missing = set(posted) - sent, sent - set(posted)
    if twice or extra or missing:
        found.append(
            f"bot events vs the outbox: repeated {twice}, not from a sent outbox row "
            f"{sorted(extra)}, marked sent but not in the room {sorted(missing)}"
        )

    # Alice's client's view: every bot event decrypted (a key that never arrives is flagged
    # after KEY_WAIT), each command answered once, encrypted.
    def settled() -> bool:
        mine = {e["event_id"]: e for e in alice._timelines.get(room, [])}
        return all(
            e["event_id"] in mine and not mine[e["event_id"]].get("decryption_pending") for e in raw
        )

    if not await wait_until(settled, KEY_WAIT + 10):
        found.append("alice's client did not see (or settle) every bot event in the room")
    events = await alice.events(room, 1000)
    bot = [e for e in events if e.get("sender") == BOT and e.get("type") != "m.room.member"]
    for event in bot:
        if "decryption_error" in event:
            found.append(
                f"bot event {event['event_id']} undecryptable: {event['decryption_error']}"
            )
        elif event.get("encrypted") is not True:
            found.append(f"bot event {event['event_id']} arrived unencrypted: {event['content']}")
        if UNREADABLE in event.get("content", {}).get("body", ""):
            found.append(f"the bot could not decrypt a message: {event['content']['body']}")
    for command in run.commands:
        replies = [e for e in events if is_bot_reply_to(e, command)]
        if len(replies) != 1:
            found.append(f"command {command}: {len(replies)} bot replies in the room")
        if len(reactions_on(events, command)) > 1:
            found.append(f"command {command}: reactions {reactions_on(events, command)}")
        notices = [e for e in replies if e["content"].get("msgtype") == "m.notice"]
        if len(notices) != len(replies):
            found.append(f"command {command}: a reply that is not a notice: {replies}")

    now = await bot_devices(alice)
    if now != devices:
        found.append(f"the bot's devices are {now}, not {devices}")

    found += double_overrides(sidecar, run.answers, "")
    violations += [f"{label}: {problem}" for problem in found]
    return len(raw)
