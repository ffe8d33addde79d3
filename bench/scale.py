"""Flat in scale (figure 3) and start-up (figure 8), on side-car databases filled directly
with SQLite before the side-car starts (the schema is made by the side-car's own
migrations, through `route_sidecar.store.Store.open`).

Three databases:

- small: 10 past intents, 10 rooms;
- past: N past intents (1,000,000 in full mode), in the same 10 rooms;
- rooms: 10 past intents, M rooms (10,000 in full mode).

A past intent is what a handled `/route` leaves behind for good: the intent (done,
expired or cancelled), its bound turn when it was used, its command row, the bot's sent
reply in the outbox and the dispatcher's outcome. A room is the heavy case of a room the
bot serves: a live (pending) intent, its command and sent reply, and 10 messages seen in
the last minutes (so the side-car's memory index, its arrivals and its sweep every second
all hold M rooms). The claim measured is for a room with no intent, as in figure 2.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .claims import ROOM_IDLE, claim, explicit_body
from .http import Case, Load, Wrk, alternate, paired, rps
from .ingest import message_event, put_transaction
from .report import AT_LEAST, AT_MOST, Row, Target, median
from .servers import SERVER_CPU, Server, SidecarConfig, start_sidecar

SEEN_PER_ROOM = 10
DAY_MS = 86_400_000
REPLY = '{"msgtype": "m.notice", "body": "Routing the next turn to cloud", "m.mentions": {}}'


@dataclass(frozen=True, slots=True)
class Shape:
    name: str
    past_intents: int
    rooms: int

    def label(self) -> str:
        return f"{self.past_intents:,} past intents, {self.rooms:,} rooms"


async def _create_schema(path: Path) -> None:
    from route_sidecar.store import Store

    store = await Store.open(path)
    await store.close()


def _numbers(db: sqlite3.Connection, count: int) -> None:
    db.execute("DROP TABLE IF EXISTS temp.n")
    db.execute("CREATE TEMP TABLE n (i INTEGER PRIMARY KEY)")
    db.execute(
        "WITH RECURSIVE c(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i + 1 < ?) "
        "INSERT INTO temp.n SELECT i FROM c",
        (count,),
    )


def fill(path: Path, shape: Shape) -> dict[str, Any]:
    """A database of that shape; returns its size and how long the filling took."""
    started = time.perf_counter()
    path.unlink(missing_ok=True)
    asyncio.run(_create_schema(path))
    now = int(time.time() * 1000)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA synchronous=OFF")
        _numbers(db, shape.past_intents)
        # Past intents over the last 90 days, cycling through done/expired/cancelled.
        db.execute(
            """INSERT INTO intents (id, room_id, target, model, scope_kind, scope_turns,
                   scope_seconds, sender, command_event_id, command_thread_id, command_at,
                   created_at, state, question_hash, ended_at, end_reason)
               SELECT printf('past%08d', i), printf('!room-%d:bench', i % 10), 'cloud',
                   'ollama-cloud/glm-5.1', 'once', 1, NULL, printf('@user%d:bench', i % 500),
                   printf('$past-command-%08d', i), NULL, :t - i * :step, :t - i * :step,
                   CASE i % 3 WHEN 0 THEN 'done' WHEN 1 THEN 'expired' ELSE 'cancelled' END,
                   NULL, :t - i * :step + 60000,
                   CASE i % 3 WHEN 0 THEN 'done' WHEN 1 THEN 'expired' ELSE 'superseded' END
               FROM temp.n""",
            {"t": now - DAY_MS, "step": max(1, 90 * DAY_MS // max(shape.past_intents, 1))},
        )
        db.execute(
            """INSERT INTO bound_turns (intent_id, position, turn_id, message_hash,
                   request_scoped, bound_at, last_claim_at, claims)
               SELECT id, 0, '$turn' || substr(id, 5), printf('%064d', rowid), 0,
                   created_at + 5000, created_at + 30000, 4
               FROM intents WHERE state = 'done'"""
        )
        db.execute(
            """INSERT INTO outcomes (intent_id, position, room_id, model, status, latency_ms,
                   detail, at, turn, asker)
               SELECT id, 0, room_id, model, 'ok', 6816, NULL, created_at + 30000,
                   '$turn' || substr(id, 5) || '/' || printf('%064d', rowid), sender
               FROM intents WHERE state = 'done'"""
        )
        # Live intents, one per room, made in the last minute; 10 messages seen in each.
        _numbers(db, shape.rooms)
        db.execute(
            """INSERT INTO intents (id, room_id, target, model, scope_kind, scope_turns,
                   scope_seconds, sender, command_event_id, command_thread_id, command_at,
                   created_at, state, question_hash, ended_at, end_reason)
               SELECT printf('live%08d', i), printf('!room-%d:bench', i), 'cloud',
                   'ollama-cloud/glm-5.1', 'once', 1, NULL, printf('@user%d:bench', i % 500),
                   printf('$live-command-%d', i), NULL, :t - (i % 60) * 1000,
                   :t - (i % 60) * 1000, 'pending', NULL, NULL, NULL
               FROM temp.n""",
            {"t": now},
        )
        _numbers(db, shape.rooms * SEEN_PER_ROOM)
        db.execute(
            """INSERT INTO seen_messages (event_id, room_id, thread_id, sent_at, message_hash,
                   is_command, sender)
               SELECT CASE WHEN i % :per = 0 THEN printf('$live-command-%d', i / :per)
                           ELSE printf('$seen-%d', i) END,
                   printf('!room-%d:bench', i / :per), NULL, :t - 120000 + i % :per * 1000,
                   printf('%064x', i), i % :per = 0, printf('@user%d:bench', i % 500)
               FROM temp.n""",
            {"t": now, "per": SEEN_PER_ROOM},
        )
        # Every intent came from a handled command, answered by a reply that was sent.
        db.execute(
            """INSERT INTO commands (event_id, room_id, sender, intent_id, handled_at)
               SELECT command_event_id, room_id, sender, id, created_at FROM intents"""
        )
        db.execute(
            """INSERT INTO effects (key, room_id, event_type, content, event_id, created_at,
                   attempts)
               SELECT 'reply:' || command_event_id, room_id, 'm.room.message', :reply,
                   '$sent-' || id, created_at, 1
               FROM intents""",
            {"reply": REPLY},
        )
        db.execute("DROP TABLE temp.n")
    with sqlite3.connect(path) as db:  # the side-car runs in WAL mode: leave no journal
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return {
        "seconds": time.perf_counter() - started,
        "mb": path.stat().st_size / 1e6,
    }


@dataclass(frozen=True, slots=True)
class ScalePlan:
    past_intents: int
    rooms: int
    starts: int  # start-ups measured per database (median)
    rounds: int
    seconds: int
    connections: int
    warmup_requests: int


def scale_figures(wrk: Wrk, work: Path, plan: ScalePlan, pin: bool) -> tuple[list[Row], Any]:
    shapes = [
        Shape("small", 10, 10),
        Shape("past", plan.past_intents, 10),
        Shape("rooms", 10, plan.rooms),
    ]
    filled: dict[str, dict[str, Any]] = {}
    for shape in shapes:
        filled[shape.name] = fill(work / f"scale-{shape.name}.db", shape)
        print(
            f"  filled {shape.label()}: {filled[shape.name]['mb']:.0f} MB in "
            f"{filled[shape.name]['seconds']:.1f} s",
            flush=True,
        )
    servers: dict[str, Server] = {}
    starts: dict[str, list[float]] = {}
    try:
        for shape in shapes:
            for server in servers.values():
                server.pause()  # nothing else runs while one starts
            config = SidecarConfig(work, work / f"scale-{shape.name}.db")
            starts[shape.name] = []
            for n in range(plan.starts):
                server = start_sidecar(config, f"scale-{shape.name}", SERVER_CPU if pin else None)
                starts[shape.name].append(server.wait_ready())
                if n < plan.starts - 1:
                    server.stop()
            servers[shape.name] = server
        body = explicit_body(ROOM_IDLE)
        for server in servers.values():
            server.resume()
            # A room the bot is in (one it never saw counts as no room hint at all).
            hello = message_event(ROOM_IDLE, "@bob:bench", "$hello", "good morning")
            put_transaction(server, f"hello-{server.name}", [hello])
            if claim(server, body).get("override") is not False:
                raise RuntimeError(f"{server.name}: a room with no intent got an override")
        encoded = json.dumps(body).encode()
        cases = [Case(name, Load(s, encoded, plan.connections)) for name, s in servers.items()]
        got = alternate(wrk, cases, plan.rounds, plan.seconds, plan.warmup_requests)
        rss = {name: s.rss_mb() for name, s in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    how = f"median of {plan.rounds} rounds × {plan.seconds} s, wrk -t1 -c{plan.connections}"
    small = got["small"].rps
    past_shape, rooms_shape = shapes[1], shapes[2]

    def errors(name: str) -> str:
        return f"{got[name].errors} errors or non-2xx answers" if got[name].errors else ""

    start_note = "time from process start to the first 200 of /healthz, median of {n}: {each}"

    def each(name: str) -> str:
        return ", ".join(f"{x:.2f}" for x in starts[name]) + " s"

    rows = [
        Row(
            f"3a flat: no-intent claims/s, {past_shape.past_intents:,} past intents vs 10",
            got["past"].rps,
            "req/s",
            baseline=small,
            baseline_label="10",
            ratio=paired(got["past"], got["small"], rps),
            target=Target(AT_LEAST, 0.9),
            note=(
                f"{how} (ratio: of per-round ratios); database "
                f"{filled['past']['mb']:.0f} MB; side-car RSS {rss['past']:.0f} MB"
            ),
            failed=errors("past"),
        ),
        Row(
            f"3b flat: no-intent claims/s, {rooms_shape.rooms:,} rooms vs 10",
            got["rooms"].rps,
            "req/s",
            baseline=small,
            baseline_label="10",
            ratio=paired(got["rooms"], got["small"], rps),
            target=Target(AT_LEAST, 0.9),
            note=(
                f"{how} (ratio: of per-round ratios); each room has a live intent "
                f"and {SEEN_PER_ROOM} messages seen; side-car RSS {rss['rooms']:.0f} MB "
                f"(small: {rss['small']:.0f} MB)"
            ),
            failed=errors("rooms"),
        ),
        Row(
            f"8a start-up, {past_shape.past_intents:,} stored intents",
            median(starts["past"]),
            "s",
            median(starts["small"]),
            "10",
            Target(AT_MOST, 2.0, on="value"),
            start_note.format(n=plan.starts, each=each("past")) + "; page cache warm",
        ),
        Row(
            f"8b start-up, {rooms_shape.rooms:,} rooms with a live intent",
            median(starts["rooms"]),
            "s",
            median(starts["small"]),
            "10",
            note=start_note.format(n=plan.starts, each=each("rooms")),
        ),
    ]
    raw = {
        "filled": filled,
        "starts": starts,
        "rss_mb": rss,
        "rounds": {name: [r.rps for r in s.rounds] for name, s in got.items()},
    }
    return rows, raw
