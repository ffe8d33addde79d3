"""The service over a real SQLite store, without a homeserver: memory and database agree,
concurrent claims bind one turn, what was committed survives a reopen."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.config import parse_config
from bot.events import RoomMessage
from bot.metrics import Metrics
from bot.service import RouteService
from bot.store import Store
from bot.turns import Turn

ROOM = "!room:test"
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


async def make_service(path: Path, clock: Clock) -> RouteService:
    store = await Store.open(path)
    service = RouteService(parse_config(RAW, {}), store, b"salt", Metrics(), clock=clock)
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
    from bot.store import Tx

    async def broken(*args: object, **kwargs: object) -> bool:
        raise RuntimeError("disk full")

    monkeypatch.setattr(Tx, "add_effect", broken)
    with pytest.raises(RuntimeError):
        await service.on_message(message("!route cloud", "$cmd", clock.now))
    assert service.live == {}
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


async def outbox(service: RouteService) -> list[tuple[str, str, dict]]:
    async with service.store.atomic(durable=False) as tx:
        rows = await tx.unsent_effects(service.clock() + timedelta(days=1))
    return [(row["key"], row["event_type"], json.loads(row["content"])) for row in rows]


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
