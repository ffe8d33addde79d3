"""The service over a real SQLite store, without a homeserver: memory and database agree,
concurrent claims bind one turn, what was committed survives a reopen."""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from route_sidecar.config import parse_config
from route_sidecar.core import intents as core
from route_sidecar.core.describe import Invocation
from route_sidecar.core.events import RoomMessage
from route_sidecar.core.intents import ClaimAnswer, ClaimResult, Route, Timing
from route_sidecar.core.turns import Turn
from route_sidecar.core.turns import turn_key as derive_turn_key
from route_sidecar.metrics import Metrics
from route_sidecar.service import RouteService
from route_sidecar.store import Store

ROOM = "!room:test"
TIMING_TTL = timedelta(minutes=15)
RAW = {
    "homeserver": {"address": "http://127.0.0.1:1", "domain": "test"},
    "appservice": {"address": "http://127.0.0.1:2", "as_token": "a" * 20, "hs_token": "h" * 20},
    "api": {"tokens": ["t" * 20]},
    "database": "sqlite:///unused.db",
    "targets": {"cloud": {"model": "ollama-cloud/glm-5.1"}},
    "permissions": {"*": 0},
}


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 5, 9, 11, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def make_service(path: Path, clock: Clock, raw: dict[str, Any] | None = None) -> RouteService:
    store = await Store.open(path)
    config = parse_config(raw or RAW, {})
    service = RouteService(config, store, b"salt", Metrics(), clock=clock)
    await service.load()
    return service


def message(body: str, event_id: str, at: datetime, sender: str = "@alice:test") -> RoomMessage:
    return RoomMessage(
        room_id=ROOM,
        event_id=event_id,
        sender=sender,
        body=body,
        msgtype="m.text",
        thread_root=None,
        is_edit=False,
        sent_at=at,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def test_a_failed_write_leaves_memory_as_the_database_has_it(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = await make_service(tmp_path / "db.sqlite", clock)
    from route_sidecar.store import Tx

    async def broken(*args: object, **kwargs: object) -> bool:
        raise RuntimeError("disk full")

    monkeypatch.setattr(Tx, "add_effect", broken)
    with pytest.raises(RuntimeError):
        await service.on_message(message("!route cloud", "$cmd", clock.now))
    assert len(service.live) == 0
    answer = await service.claim(Turn(room_id=ROOM, turn_id="$q", last_user_message="q"))
    assert answer.override is False
    await service.store.close()


async def test_concurrent_claims_from_many_turns_bind_exactly_one(
    tmp_path: Path, clock: Clock
) -> None:
    service = await make_service(tmp_path / "db.sqlite", clock)
    await service.on_message(message("!route cloud", "$cmd", clock.now))
    clock.now += timedelta(seconds=1)
    turns = [
        Turn(room_id=ROOM, turn_id=f"$t{i}", last_user_message=f"question {i}") for i in range(50)
    ]
    calls = [turns[i % 50] for i in range(200)]
    random.Random(7).shuffle(calls)
    answers = await asyncio.gather(*(service.claim(turn) for turn in calls))
    winners = {turn.turn_id for turn, answer in zip(calls, answers, strict=True) if answer.override}
    assert len(winners) == 1
    winner = winners.pop()
    assert all(a.override for t, a in zip(calls, answers, strict=True) if t.turn_id == winner)
    await service.store.close()


async def test_a_binding_survives_reopening_the_database(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "db.sqlite"
    service = await make_service(path, clock)
    await service.on_message(message("!route cloud", "$cmd", clock.now))
    clock.now += timedelta(seconds=1)
    bound = Turn(room_id=ROOM, turn_id="$a", last_user_message="a")
    assert (await service.claim(bound)).override is True
    clock.now += timedelta(seconds=1)
    assert (await service.claim(bound)).override is True  # only in memory until a sweep
    await service.store.close()  # a crash: no flush

    reopened = await make_service(path, clock)
    assert (await reopened.claim(bound)).override is True
    other = Turn(room_id=ROOM, turn_id="$b", last_user_message="b")
    assert (await reopened.claim(other)).override is False
    await reopened.store.close()


async def test_claim_times_kept_in_memory_are_written_by_the_sweep(
    tmp_path: Path, clock: Clock
) -> None:
    path = tmp_path / "db.sqlite"
    service = await make_service(path, clock)
    await service.on_message(message("!route cloud", "$cmd", clock.now))
    bound = Turn(room_id=ROOM, turn_id="$a", last_user_message="a")
    await service.claim(bound)
    clock.now += timedelta(minutes=4)
    await service.claim(bound)  # keeps the turn open 5 more minutes
    await service.sweep()
    await service.store.close()
    clock.now += timedelta(minutes=3)  # 7 min after binding, 3 after the last claim
    reopened = await make_service(path, clock)
    assert (await reopened.claim(bound)).override is True
    await reopened.store.close()


async def outbox(service: RouteService) -> list[tuple[str, str, dict[str, Any]]]:
    async with service.store.atomic(durable=False) as tx:
        rows = await tx.unsent_effects(service.clock() + timedelta(days=1))
    return [(row.key, row.event_type, json.loads(row.content)) for row in rows]


@pytest.mark.parametrize(
    ("powers", "leaves", "says"),
    [
        ((100, 50), True, "Leaving this room"),
        ((50, 50), True, "Leaving this room"),
        ((0, 50), False, "Only a room admin"),
        (None, False, "could not read this room's power levels"),
    ],
    ids=["admin", "moderator-who-may-kick", "member", "homeserver-unreachable"],
)
async def test_route_leave_queues_the_leave_after_its_reply_for_who_may_kick_only(
    tmp_path: Path, clock: Clock, powers: tuple[int, int] | None, leaves: bool, says: str
) -> None:
    service = await make_service(tmp_path / "db.sqlite", clock)
    asked: list[tuple[str, str]] = []

    async def room_powers(room_id: str, user_id: str) -> tuple[int, int] | None:
        asked.append((room_id, user_id))
        return powers

    service.room_powers = room_powers
    await service.on_message(message("!route cloud --for 1h", "$route", clock.now))
    clock.now += timedelta(seconds=1)
    await service.on_message(message("!route leave", "$leave", clock.now, sender="@bob:test"))
    assert asked == [(ROOM, "@bob:test")]
    effects = await outbox(service)
    keys = [key for key, _, _ in effects]
    reply = next(content for key, _, content in effects if key == "reply:$leave")
    assert says in reply["body"]
    if leaves:
        assert keys[-2:] == ["reply:$leave", "route_sidecar.leave:$leave"]
        assert effects[-1][1] == "route_sidecar.leave"
        assert ROOM not in service.live, "the room's route ends when the bot leaves"
    else:
        assert not any(key.startswith("route_sidecar.leave") for key in keys)
        assert ROOM in service.live, "a refused leave changes nothing"
    await service.store.close()


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(["!route cloud", "!route cloud --turns 2", "!route cloud --for 10m"]),
    st.integers(min_value=1_000, max_value=120_000),  # turn_idle, in milliseconds
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=400_000) | st.integers(0, 2_500_000),  # µs
            st.sampled_from(["turn", "turn", "turn", "other", "sweep"]),
        ),
        min_size=1,
        max_size=40,
    ),
)
# An answer held for a second would give the second call 11:00:02 where 11:00:03 is due.
@example("!route cloud", 1_500, [(300_000, "turn"), (300_000, "turn")])
def test_a_later_call_of_a_turn_is_answered_as_if_computed_afresh(
    command: str, idle_ms: int, calls: list[tuple[int, str]]
) -> None:
    """The service gives a later call of a turn the previous call's answer while that
    holds (route_sidecar/core/live.py, `expiry_second_holds_until`). Every answer must
    equal the one made from the intent itself, with a turn_idle that is not whole seconds."""

    async def scenario(path: Path) -> None:
        clock = Clock()
        service = await make_service(path, clock)
        try:
            await calls_of_a_turn(service, clock)
        finally:
            await service.store.close()

    async def calls_of_a_turn(service: RouteService, clock: Clock) -> None:
        service.state.timing = Timing(TIMING_TTL, timedelta(milliseconds=idle_ms))
        await service.on_message(message(command, "$cmd", clock.now))
        clock.now += timedelta(seconds=1)
        await service.on_message(message("why?", "$q", clock.now))
        asked = Turn(room_id=ROOM, turn_id="$q", last_user_message="why?")
        assert (await service.claim(asked)).result is ClaimResult.BOUND
        for gap_us, what in calls:
            clock.now += timedelta(microseconds=gap_us)
            if what == "sweep":
                await service.sweep()
                continue
            turn = asked if what == "turn" else Turn(room_id=ROOM, last_user_message="other")
            intent = service.live.current(ROOM)
            key = derive_turn_key(turn, b"salt")
            expected = (
                core.continue_turn(intent, key, clock.now, service.timing) if intent else None
            )
            answer = await service.claim(turn)
            if expected is None:
                assert answer.result is not ClaimResult.CONTINUED
                continue
            end = core.expires_at(expected.intent, service.timing)
            assert intent is not None and end is not None
            assert answer == ClaimAnswer(
                True,
                ClaimResult.CONTINUED,
                ROOM,
                turn.turn_id,
                Route(intent.id, "cloud", "ollama-cloud/glm-5.1", "@alice:test"),
                core.whole_second(end),
                asker="@alice:test" if turn is asked else None,  # who sent "why?"
            )
            assert service.live.current(ROOM) == expected.intent

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(scenario(Path(directory) / "db.sqlite"))


async def test_each_sender_whose_message_went_unread_gets_the_notice(
    tmp_path: Path, clock: Clock
) -> None:
    """Issue 13 §5: one sender's notice never stands for another's; each sender gets one
    per room every ten minutes, in reply to their own message."""
    from mautrix.types import EventID, RoomID, UserID

    from route_sidecar.core.events import EncryptedMessage

    service = await make_service(tmp_path / "db.sqlite", clock)

    async def unread(event_id: str, sender: str) -> None:
        await service.on_undecryptable(
            EncryptedMessage(RoomID(ROOM), EventID(event_id), UserID(sender))
        )

    await unread("$a1", "@alice:test")
    clock.now += timedelta(seconds=41)
    await unread("$b1", "@bob:test")  # 41 s later, another sender: notified too
    await unread("$a2", "@alice:test")  # alice again within ten minutes: not again
    assert await notices_replying_to(service) == ["$a1", "$b1"]
    clock.now += timedelta(minutes=10)
    await unread("$a3", "@alice:test")
    assert await notices_replying_to(service) == ["$a1", "$a3", "$b1"]
    await service.store.close()


async def notices_replying_to(service: RouteService) -> list[str]:
    async with service.store.atomic(durable=False) as tx:
        outbox = await tx.unsent_effects(service.clock())
    return sorted(
        json.loads(row.content)["m.relates_to"]["m.in_reply_to"]["event_id"]
        for row in outbox
        if row.key.startswith("undecryptable:")
    )


def table_counts(path: Path) -> dict[str, int]:
    import sqlite3

    with sqlite3.connect(path) as db:
        return {
            table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("transactions", "commands", "outcomes", "effects", "intents")
        }


async def test_old_records_are_pruned_and_nothing_live_or_owed_is(
    tmp_path: Path, clock: Clock
) -> None:
    """Issue 14: commands, outcomes, outbox rows and transactions are not kept forever."""
    path = tmp_path / "db.sqlite"
    service = await make_service(path, clock)
    old = clock.now
    await service.on_message(message("!route cloud", "$old-cmd", old))
    await service.on_message(message("!route auto", "$old-auto", old))  # cancels it
    async with service.store.atomic() as tx:
        await tx.record_transaction("txn-old", old)
        await tx.add_outcome(
            intent_id=None, position=None, room_id=ROOM, turn=None, asker=None,
            model="m", status="error", latency_ms=1, detail=None, now=old,
        )  # fmt: skip
        sent = [row for row in await tx.unsent_effects(old) if row.key == "reply:$old-cmd"]
        await tx.mark_effect_sent(sent[0].id, "$reply")
    before = table_counts(path)
    assert before == {"transactions": 1, "commands": 2, "outcomes": 1, "effects": 3, "intents": 1}
    clock.now += service.config.history_retention - timedelta(minutes=1)
    await service.forget_old_records()
    assert table_counts(path) == before  # not old enough yet
    clock.now += timedelta(minutes=2)
    await service.on_message(message("!route cloud --turns 2", "$new-cmd", clock.now))
    await service.forget_old_records()
    after = table_counts(path)
    # Left: the new command, its intent and reply, and the old replies never sent (owed).
    assert after == {"transactions": 0, "commands": 1, "outcomes": 0, "effects": 3, "intents": 1}
    assert service.live.current(ROOM) is not None
    await service.store.close()


async def test_an_msc4391_invocation_that_mentions_the_bot_is_a_command(
    tmp_path: Path, clock: Clock
) -> None:
    """Its arguments win over the body (gomuks writes `/route@bot cloud`, which the text
    parser does not read); malformed ones get an error reply and record nothing."""
    service = await make_service(tmp_path / "db.sqlite", clock)
    bot = service.config.bot_user_id
    body = f"/route{bot} cloud"
    structured = replace(
        message(body, "$structured", clock.now),
        invocation=Invocation("route", {"target": "cloud", "turns": 2}, (bot,)),
    )
    await service.on_message(structured)
    intent = service.live.current(ROOM)
    assert intent is not None and intent.target == "cloud" and intent.scope.turns == 2
    hostile = replace(
        message(body, "$hostile", clock.now),
        invocation=Invocation("route", {"target": "cloud --turns 9"}, (bot,)),
    )
    await service.on_message(hostile)
    assert service.live.current(ROOM) == intent  # nothing recorded
    replies = {key: content["body"] for key, _, content in await outbox(service)}
    assert "must be one word" in replies["reply:$hostile"]
    unmentioned = replace(
        message(body, "$unmentioned", clock.now),
        invocation=Invocation("route", {"target": "auto"}, ()),
    )
    await service.on_message(unmentioned)  # the body is read: not a command, no reply
    assert "reply:$unmentioned" not in {key for key, _, _ in await outbox(service)}
    assert service.live.current(ROOM) == intent
    await service.store.close()
