"""The database's size over a long run (issue 14): days of traffic through the service
and its store, in process, on a simulated clock (the side-car's pruning runs on the
clock it is given), with `limits.history_retention` at 3 days so that the run covers it
four times. Each day, in 10 rooms: `!route cloud`, a question, three claims of its turn
and their three outcomes (a receipt and its edits), a failed call of an unrouted turn
(a retry suggestion), the homeserver's transaction ids; every queued room event is
marked sent, as the outbox would. At the end of each day `forget_old_records` runs, as
the side-car's background task does; then the WAL is checkpointed into the database and
the database's size is read. (The WAL file itself keeps its high-water mark, which
follows the largest burst of writes between checkpoints, not the history kept: it is
reported beside the figure.)

Target: once the retention is reached, the size stays flat (the last day within 10% of
the day the retention was first reached). A record kept forever would grow it by a day's
worth every day.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from route_sidecar.config import parse_config
from route_sidecar.core.events import RoomMessage
from route_sidecar.core.turns import Turn
from route_sidecar.metrics import Metrics
from route_sidecar.service import RouteService
from route_sidecar.store import Store

from .report import AT_MOST, Row, Target

RETENTION_DAYS = 3
ROOMS = 10
CONFIG = {
    "homeserver": {"address": "http://127.0.0.1:1", "domain": "bench"},
    "appservice": {"address": "http://127.0.0.1:2", "as_token": "a" * 24, "hs_token": "h" * 24},
    "api": {"tokens": ["t" * 24]},
    "database": "sqlite:///unused.db",
    "targets": {"cloud": {"model": "ollama-cloud/glm-5.1"}},
    "permissions": {"*": 0},
    "limits": {"routes_per_hour": 100_000, "history_retention": f"{RETENTION_DAYS * 24}h"},
}


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def wal_size(database: Path) -> int:
    wal = Path(f"{database}-wal")
    return os.path.getsize(wal) if wal.exists() else 0


def checkpointed_size(database: Path) -> int:
    """The database file's size once every page of the WAL is written into it."""
    with sqlite3.connect(database) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return os.path.getsize(database)


async def one_turn(service: RouteService, clock: Clock, day: int, n: int) -> None:
    room = f"!room-{n % ROOMS}:bench"

    def said(body: str, event_id: str) -> RoomMessage:
        return RoomMessage(room, event_id, "@alice:bench", body, "m.text", None, False, clock.now)

    tag = f"{day}-{n}"
    await service.on_message(said("!route cloud", f"$c{tag}"))
    clock.now += timedelta(seconds=1)
    question = f"day {day}, question {n}: why did build {n * 7} fail?"
    await service.on_message(said(question, f"$q{tag}"))
    turn = Turn(room_id=room, turn_id=f"$q{tag}", last_user_message=question)
    for _ in range(3):
        answer = await service.claim(turn)
        assert answer.route is not None, answer
        await service.record_outcome(
            answer.route.intent_id, "ollama-cloud/glm-5.1", "ok", 800, None, f"$q{tag}"
        )
    failed = Turn(room_id=room, turn_id=f"$f{tag}", last_user_message=f"other {tag}")
    await service.record_turn_outcome(failed, "glm-4.7-flash", "error", 50, "HTTP 500")
    async with service.store.atomic() as tx:
        await tx.record_transaction(f"txn-{tag}", clock.now)
        for effect in await tx.unsent_effects(clock.now + timedelta(days=1), limit=1000):
            await tx.mark_effect_sent(effect.id, f"$sent-{effect.id}")
    clock.now += timedelta(minutes=10)  # the turn goes idle, the route ends
    await service.sweep()


async def simulate(database: Path, days: int, turns_per_day: int) -> tuple[list[int], int]:
    clock = Clock()
    store = await Store.open(database)
    service = RouteService(parse_config(CONFIG, {}), store, b"bench-salt", Metrics(), clock)
    await service.load()
    sizes = []
    wal_high = 0
    try:
        for day in range(days):
            start = clock.now
            for n in range(turns_per_day):
                await one_turn(service, clock, day, n)
            clock.now = start + timedelta(days=1)
            await service.forget_old_records()
            wal_high = max(wal_high, wal_size(database))
            sizes.append(checkpointed_size(database))
    finally:
        await store.close()
    return sizes, wal_high


def growth_figures(days: int, turns_per_day: int) -> tuple[list[Row], dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="route-growth-") as tmp:
        sizes, wal_high = asyncio.run(simulate(Path(tmp) / "growth.db", days, turns_per_day))
    reached = RETENTION_DAYS  # the first day whose end prunes a whole day
    kib = [size / 1024 for size in sizes]
    rows = [
        Row(
            f"11 database size after {days} days vs day {reached + 1} "
            f"(retention {RETENTION_DAYS} d)",
            kib[-1],
            "KB",
            baseline=kib[reached],
            baseline_label=f"day {reached + 1}",
            target=Target(AT_MOST, 1.1),
            note=(
                f"{turns_per_day} routed turns a day in {ROOMS} rooms (a command, a question, "
                "3 claims, 3 outcomes, a failed unrouted call, a transaction id; every room "
                "event marked sent), simulated clock; the database after each day, WAL "
                "checkpointed: "
                + ", ".join(f"{k:.0f}" for k in kib)
                + f" KB; the WAL file's high-water mark {wal_high / 1024:.0f} KB"
            ),
        )
    ]
    return rows, {"sizes_bytes": sizes, "wal_high_bytes": wal_high}
