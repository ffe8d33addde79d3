"""The service over a real SQLite store, without a homeserver: memory and database agree,
concurrent claims bind one turn, what was committed survives a reopen."""

from __future__ import annotations

import asyncio
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
