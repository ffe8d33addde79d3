"""Issue 6, point 6: the crash loop of point 1 (tests/e2e/test_crash.py) in an encrypted
room. alice is a real encrypting client (demo/encrypted_user.py); she alone posts in the
room (commands and questions, Megolm-encrypted), claims and outcomes go over HTTP as in
the plain loop. The side-car is SIGKILLed at each of its kill points (route_sidecar/faults.py),
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
  "could not decrypt" ones, must not appear at all;
- the bot still has exactly one device, the one it had before the loop (no new device,
  so no lost Olm account).

A kill loses the room keys Synapse was pushing to the bot (it drops the to-device part of
a transaction it retries, and those sent while the side-car is down): the bot asks alice's
client for them (`m.room_key_request`), which answers as Element does. The figures count
those requests and answers.

`ROUTE_SIDECAR_CRASH_RUNS_ENCRYPTED` sets the number of runs (6 by default, one per kill
point: the CI setting; at least 200 for the full one). `ROUTE_SIDECAR_CRASH_REPORT_ENCRYPTED`,
when set, is a path the figures are written to as JSON."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from mautrix.types import UserID

from demo.encrypted_user import EncryptedUser

from .crash_support import (
    Answer,
    CrashRun,
    bot_room_events,
    crash_and_restart,
    dead,
    double_overrides,
    handled_once_and_drained,
    leaked_tokens,
    never_reached,
    one_reply_per_command,
    plan,
    room_events,
    room_matches_outbox,
    run_count,
    run_record,
    start_sidecar,
    summary,
    wait_until,
    write_report,
)
from .harness import BOT, MatrixUser, Sidecar, is_bot_reply_to, joined

RUNS_ENV = "ROUTE_SIDECAR_CRASH_RUNS_ENCRYPTED"
pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]
DEFAULT_RUNS = 6  # one per kill point: the CI setting
REPORT_ENV = "ROUTE_SIDECAR_CRASH_REPORT_ENCRYPTED"
REDELIVERY_TIMEOUT = 120.0  # Synapse backs off 2 s, 4 s, 8 s, ... after failed pushes
KEY_WAIT = 10.0  # how long alice's client waits for a room key before flagging an event
UNREADABLE = "could not decrypt"
# What the side-car logs about asking for room keys (route_sidecar/crypto.py), counted per run.
KEY_LOG = {
    "keys_requested": "room key requested ",
    "keys_not_requested": "room key not requested ",
    "forwarded_keys_accepted": "forwarded room key accepted ",
    "forwarded_keys_not_needed": "forwarded room key not needed ",
    "forwarded_keys_refused": "forwarded room key refused ",
}


@pytest_asyncio.fixture(loop_scope="session")
async def alice(hs_url: str, users: dict[str, MatrixUser]) -> AsyncIterator[EncryptedUser]:
    """Alice on a new, encrypting device (the `users` fixture registered her)."""
    person = await EncryptedUser.login(hs_url, "alice", "pw-alice-secret", key_wait=KEY_WAIT)
    yield person
    await person.close()


async def bot_devices(alice: EncryptedUser) -> list[str]:
    keys = await alice.client.query_keys([UserID(BOT)])
    return sorted(keys.device_keys.get(UserID(BOT), {}))


def key_requests_logged(sidecar: Sidecar, since: int) -> dict[str, int]:
    """The side-car's key-request log lines after byte `since` of its log, by kind."""
    with sidecar.log_path.open("rb") as log:
        log.seek(since)
        text = log.read().decode(errors="replace")
    return {name: text.count(line) for name, line in KEY_LOG.items()}


def answered_for_bot(alice: EncryptedUser) -> int:
    """How many of the bot's key requests alice's client answered (forwarded a key)."""
    return sum(1 for user, _, _ in alice.crypto.forwarded if user == BOT)


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
    tokens = {name: user.token for name, user in users.items()}
    violations += leaked_tokens(sidecar, {**tokens, "alice (encrypted)": alice.token})
    violations += double_overrides(sidecar, answers, "all runs")
    final = await bot_devices(alice)
    if final != devices:
        violations.append(f"after the loop the bot has devices {final}, not {devices}")

    figures = summary(runs, records, answers, violations, started)
    figures["bot_events_checked"] = sum(r["bot_events"] for r in records)
    figures["bot_device"] = devices[0]
    for name in (*KEY_LOG, "keys_answered_by_alice"):
        figures[name] = sum(r[name] for r in records)
    figures["runs_with_key_requests"] = sum(1 for r in records if r["keys_requested"])
    print("\nencrypted crash loop:", json.dumps(figures, indent=2))
    write_report(REPORT_ENV, figures, records)

    assert not violations, "\n".join(violations)
    missed = never_reached(runs, records)
    assert not missed, f"points never reached: {missed}"


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
    log_from = sidecar.log_path.stat().st_size
    answered_before = answered_for_bot(alice)
    room = await open_encrypted_room(alice, index)  # the side-car runs as usual here
    run = CrashRun(index, point, n, room, {"alice": alice}, sidecar, senders=("alice",))
    label, was_killed, restarted = await crash_and_restart(run, violations)
    bot_events = await check_run(run, alice, reader, label, sidecar, devices, violations)
    answers += run.answers
    return {
        **run_record(run, was_killed, restarted),
        "bot_events": bot_events,
        **key_requests_logged(sidecar, log_from),
        "keys_answered_by_alice": answered_for_bot(alice) - answered_before,
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

    found += await handled_once_and_drained(run)

    # The homeserver's view (a plain client of alice's: ciphertext stays ciphertext).
    raw = bot_room_events(await room_events(reader, room))
    clear = [e for e in raw if e.get("type") != "m.room.encrypted"]
    if clear:
        shown = [(e["type"], e.get("content", {}).get("body", "")) for e in clear]
        found.append(f"bot events sent in plaintext in the encrypted room: {shown}")
    found += room_matches_outbox(sidecar, room, raw)

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
    found += one_reply_per_command(run.commands, events)
    for command in run.commands:
        replies = [e for e in events if is_bot_reply_to(e, command)]
        if any(e["content"].get("msgtype") != "m.notice" for e in replies):
            found.append(f"command {command}: a reply that is not a notice: {replies}")

    now = await bot_devices(alice)
    if now != devices:
        found.append(f"the bot's devices are {now}, not {devices}")

    found += double_overrides(sidecar, run.answers, "")
    violations += [f"{label}: {problem}" for problem in found]
    return len(raw)
