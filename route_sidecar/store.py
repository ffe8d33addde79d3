"""SQLite storage through aiosqlite: migrations, and the reads and writes of the core's
values. Holds no rule: it turns `Intent`s and friends into rows and back.

One connection, one lock: every access goes through `Store.atomic()`, which runs its
body in one database transaction (BEGIN IMMEDIATE … COMMIT, ROLLBACK on error).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite

from .core.commands import Scope, ScopeKind
from .core.history import Call, PastTurn, TurnCall
from .core.intents import BoundTurn, EndReason, Intent, IntentState
from .core.turns import SeenMessage, TurnKey
from .outbox import Effect, EffectKind, PendingEffect

log = logging.getLogger("route_sidecar.store")
_MIGRATION_NAME = re.compile(r"(\d{3})_[a-z0-9_]+\.sql")


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def from_ms(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """The numbered `.sql` files shipped as `route_sidecar.migrations`, in order, without gaps."""
    folder = resources.files("route_sidecar.migrations")
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise RuntimeError(f"migrations: expected version {expected}, found {migration.name}")
    return found


def split_statements(sql: str) -> list[str]:
    """Split a migration into statements for one-at-a-time execution (aiosqlite's
    executescript commits on its own, so it cannot share the version bump's transaction)."""
    statements: list[str] = []
    current: list[str] = []
    for line in sql.splitlines():
        stripped = line.strip()
        if stripped.startswith("--") and not current:
            continue
        current.append(line)
        if stripped.endswith(";") and _complete(current):
            statement = "\n".join(current).strip()
            statements.append(statement)
            current = []
    tail = "\n".join(current).strip()
    if tail and not all(line.strip().startswith("--") for line in current):
        statements.append(tail)
    return statements


def _complete(lines: list[str]) -> bool:
    text = "\n".join(lines)
    # A trigger body holds semicolons before its END;
    return "BEGIN" not in text.upper() or text.upper().rstrip().endswith("END;")


# What `prune_history` deletes, by table: records older than the cutoff (`?`, in ms) that
# nothing will read again. Unsent outbox rows and live intents are kept whatever their age.
PRUNED = {
    "transactions": "received_at < ?",
    "commands": "handled_at < ?",
    "outcomes": "at < ?",
    "effects": "(event_id IS NOT NULL OR failed = 1) AND created_at < ?",
    "intents": "state NOT IN ('pending', 'active') AND COALESCE(ended_at, created_at) < ?",
    "event_failures": "failed_at < ?",
}


def make_private(path: Path) -> None:
    """The database file and its side files readable by their owner only, before SQLite
    opens them: it gives the -wal and -shm files it creates the database file's mode.
    Files that earlier versions left readable by others are tightened."""
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o600))  # an empty file is a new database
    for name in (str(path), f"{path}-wal", f"{path}-shm", f"{path}-journal"):
        try:
            if os.stat(name).st_mode & 0o077:
                os.chmod(name, 0o600)
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warning("cannot make a database file private path=%s error=%s", name, error)


class Store:
    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self._lock = asyncio.Lock()
        self.path = path

    @classmethod
    async def open(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        make_private(path)
        db = await aiosqlite.connect(path, isolation_level=None)
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.execute("PRAGMA busy_timeout=5000")
        store = cls(db, path)
        await store.migrate(load_migrations())
        return store

    async def forget_meta(self, key: str) -> bool:
        """Delete a `meta` row so that its value leaves the file's bytes: zeroed in its
        page (secure_delete), and the WAL that held earlier copies of the page emptied
        (a TRUNCATE checkpoint). False when another connection kept the WAL in use."""
        async with self._lock:
            await self._db.execute("PRAGMA secure_delete=ON")
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                try:
                    await self._db.execute("DELETE FROM meta WHERE key = ?", (key,))
                except BaseException:
                    await self._db.execute("ROLLBACK")
                    raise
                await self._db.execute("COMMIT")
            finally:
                await self._db.execute("PRAGMA secure_delete=OFF")
            async with self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
                row = await cur.fetchone()
            return row is not None and row[0] == 0

    async def close(self) -> None:
        async with self._lock:
            await self._db.close()

    async def migrate(self, migrations: list[Migration]) -> int:
        """Apply every migration newer than the stored version, each in a transaction
        together with its version bump. Returns the version now applied."""
        async with self._lock:
            await self._db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
            )
            async with self._db.execute("SELECT MAX(version) FROM schema_version") as cur:
                row = await cur.fetchone()
            current = (row[0] if row is not None else None) or 0
            latest = migrations[-1].version if migrations else 0
            if current > latest:
                raise RuntimeError(
                    f"database schema version {current} is newer than this program ({latest})"
                )
            for migration in migrations:
                if migration.version <= current:
                    continue
                await self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in split_statements(migration.sql):
                        await self._db.execute(statement)
                    await self._db.execute(
                        "INSERT INTO schema_version (version) VALUES (?)", (migration.version,)
                    )
                    await self._db.execute("COMMIT")
                except BaseException:
                    await self._db.execute("ROLLBACK")
                    raise
                log.info("migration applied version=%d name=%s", migration.version, migration.name)
                current = migration.version
            return current

    @asynccontextmanager
    async def atomic(self, durable: bool = True) -> AsyncIterator[Tx]:
        """One database transaction. `durable=False` (plain messages seen, claim times of
        a turn already bound) skips the fsync: such a commit survives a crash of the
        process but may be lost with the machine's power."""
        async with self._lock:
            if not durable:
                await self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield Tx(self._db)
                except BaseException:
                    await self._db.execute("ROLLBACK")
                    raise
                await self._db.execute("COMMIT")
            finally:
                if not durable:
                    await self._db.execute("PRAGMA synchronous=FULL")

    async def ping(self) -> bool:
        try:
            async with self._lock, self._db.execute("SELECT 1") as cur:
                return (await cur.fetchone()) is not None
        except Exception:
            return False


class Tx:
    """The queries, inside one database transaction."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def _one(self, sql: str, params: Iterable[Any] = ()) -> aiosqlite.Row | None:
        async with self.db.execute(sql, tuple(params)) as cur:
            return await cur.fetchone()

    async def _all(
        self, sql: str, params: Iterable[Any] | Mapping[str, Any] = ()
    ) -> list[aiosqlite.Row]:
        named = isinstance(params, Mapping)  # `:name` parameters
        async with self.db.execute(sql, params if named else tuple(params)) as cur:
            return list(await cur.fetchall())

    # meta

    async def meta(self, key: str) -> str | None:
        row = await self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return row[0] if row else None

    async def set_meta(self, key: str, value: str) -> None:
        await self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # transactions

    async def has_transaction(self, txn_id: str) -> bool:
        return await self._one("SELECT 1 FROM transactions WHERE txn_id = ?", (txn_id,)) is not None

    async def record_transaction(self, txn_id: str, now: datetime) -> None:
        await self.db.execute(
            "INSERT INTO transactions (txn_id, received_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
            (txn_id, to_ms(now)),
        )

    # commands

    async def command_handled(self, event_id: str) -> bool:
        return await self._one("SELECT 1 FROM commands WHERE event_id = ?", (event_id,)) is not None

    async def record_command(
        self, event_id: str, room_id: str, sender: str, intent_id: str | None, now: datetime
    ) -> None:
        await self.db.execute(
            "INSERT INTO commands (event_id, room_id, sender, intent_id, handled_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (event_id, room_id, sender, intent_id, to_ms(now)),
        )

    # intents

    async def save_claim_times(self, turns: Sequence[tuple[str, int, BoundTurn]]) -> None:
        """The last-claim time and claim count of bound turns already stored (by intent id
        and position); never moved back, so an older copy written late changes nothing."""
        await self.db.executemany(
            """UPDATE bound_turns SET last_claim_at = MAX(last_claim_at, ?),
                   claims = MAX(claims, ?)
               WHERE intent_id = ? AND position = ?""",
            [(to_ms(t.last_claim_at), t.claims, intent_id, pos) for intent_id, pos, t in turns],
        )

    async def save_intent(self, intent: Intent) -> None:
        scope = intent.scope
        await self.db.execute(
            """INSERT INTO intents (id, room_id, target, model, scope_kind, scope_turns,
                   scope_seconds, sender, command_event_id, command_thread_id, command_at,
                   created_at, state, question_hash, ended_at, end_reason, closed_at,
                   closed_by, reasks)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (id) DO UPDATE SET state = excluded.state,
                   ended_at = excluded.ended_at, end_reason = excluded.end_reason,
                   closed_at = excluded.closed_at, closed_by = excluded.closed_by""",
            (
                intent.id,
                intent.room_id,
                intent.target,
                intent.model,
                scope.kind.value,
                scope.turns,
                int(scope.duration.total_seconds()) if scope.duration is not None else None,
                intent.sender,
                intent.command_event_id,
                intent.command_thread_id,
                to_ms(intent.command_at),
                to_ms(intent.created_at),
                intent.state.value,
                intent.question_hash,
                to_ms(intent.ended_at) if intent.ended_at is not None else None,
                intent.end_reason.value if intent.end_reason is not None else None,
                to_ms(intent.closed_at) if intent.closed_at is not None else None,
                intent.closed_by.value if intent.closed_by is not None else None,
                int(intent.reasks),
            ),
        )
        for position, turn in enumerate(intent.bound_turns):
            key = turn.key
            await self.db.execute(
                """INSERT INTO bound_turns (intent_id, position, turn_id, message_hash,
                       request_scoped, bound_at, last_claim_at, claims)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (intent_id, position) DO UPDATE SET
                       last_claim_at = MAX(last_claim_at, excluded.last_claim_at),
                       claims = MAX(claims, excluded.claims)""",
                (
                    intent.id,
                    position,
                    key.turn_id if key else None,
                    key.message_hash if key else None,
                    int(key is None),
                    to_ms(turn.bound_at),
                    to_ms(turn.last_claim_at),
                    turn.claims,
                ),
            )

    async def live_intents(self) -> list[Intent]:
        """Every live intent, in two queries (not one per intent: start-up time)."""
        rows = await self._all(
            "SELECT * FROM intents WHERE state IN ('pending', 'active') ORDER BY created_at"
        )
        turns: dict[str, list[aiosqlite.Row]] = {}
        for turn in await self._all(
            """SELECT * FROM bound_turns WHERE intent_id IN
                   (SELECT id FROM intents WHERE state IN ('pending', 'active'))
               ORDER BY intent_id, position"""
        ):
            turns.setdefault(turn["intent_id"], []).append(turn)
        return [_intent_from(row, turns.get(row["id"], [])) for row in rows]

    async def intent(self, intent_id: str) -> Intent | None:
        row = await self._one("SELECT * FROM intents WHERE id = ?", (intent_id,))
        return await self._intent(row) if row else None

    async def intent_by_command(self, event_id: str) -> Intent | None:
        row = await self._one("SELECT * FROM intents WHERE command_event_id = ?", (event_id,))
        return await self._intent(row) if row else None

    async def routes_since(self, sender: str, since: datetime) -> int:
        row = await self._one(
            "SELECT COUNT(*) FROM intents WHERE sender = ? AND created_at > ?",
            (sender, to_ms(since)),
        )
        return int(row[0]) if row else 0

    async def _intent(self, row: aiosqlite.Row) -> Intent:
        turns = await self._all(
            "SELECT * FROM bound_turns WHERE intent_id = ? ORDER BY position", (row["id"],)
        )
        return _intent_from(row, turns)

    # seen messages

    async def add_seen(self, message: SeenMessage) -> None:
        await self.add_seen_many([message])

    async def add_seen_many(self, messages: Sequence[SeenMessage]) -> None:
        await self.db.executemany(
            """INSERT INTO seen_messages (event_id, room_id, thread_id, sent_at, message_hash,
                   is_command, sender) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING""",
            [
                (
                    m.event_id,
                    m.room_id,
                    m.thread_id,
                    to_ms(m.sent_at),
                    m.message_hash,
                    int(m.is_command),
                    m.sender,
                )
                for m in messages
            ],
        )
        others = [(m.event_id, h) for m in messages for h in m.other_hashes if h != m.message_hash]
        if others:
            await self.db.executemany(
                "INSERT OR IGNORE INTO seen_hashes (event_id, message_hash) VALUES (?, ?)", others
            )

    async def seen_for_turn(self, room_id: str, key: TurnKey) -> list[SeenMessage]:
        """The messages a turn may answer: with its hash (as their text or one of their
        other texts, then shown with that hash), its event id or its thread."""
        rows = await self._all(
            """SELECT event_id, room_id, thread_id, sent_at, is_command, sender,
                   CASE WHEN message_hash IS NOT :hash AND event_id IN
                       (SELECT event_id FROM seen_hashes WHERE message_hash = :hash)
                   THEN :hash ELSE message_hash END AS message_hash
               FROM seen_messages WHERE room_id = :room AND
                   (message_hash = :hash OR event_id = :turn OR thread_id = :turn OR event_id IN
                       (SELECT event_id FROM seen_hashes WHERE message_hash = :hash))
               ORDER BY sent_at DESC LIMIT 200""",
            {"room": room_id, "hash": key.message_hash, "turn": key.turn_id},
        )
        return [_seen(row) for row in rows]

    async def recent_arrivals(self, limit: int) -> list[tuple[str, str, str | None]]:
        """(room, event id, thread root) of the last messages seen, oldest first."""
        rows = await self._all(
            """SELECT room_id, event_id, thread_id FROM seen_messages
               ORDER BY sent_at DESC LIMIT ?""",
            (limit,),
        )
        return [(row[0], row[1], row[2]) for row in reversed(rows)]

    async def rooms_with_hash(self, message_hash: str) -> list[str]:
        """Up to two rooms where a message with this text (or other text) was seen."""
        rows = await self._all(
            """SELECT room_id FROM seen_messages WHERE message_hash = :hash
               UNION SELECT room_id FROM seen_messages WHERE event_id IN
                   (SELECT event_id FROM seen_hashes WHERE message_hash = :hash)
               LIMIT 2""",
            {"hash": message_hash},
        )
        return [row[0] for row in rows]

    async def forget_seen_before(self, before: datetime) -> None:
        await self.db.execute("DELETE FROM seen_messages WHERE sent_at < ?", (to_ms(before),))

    async def prune_history(self, before: datetime, batch: int) -> int:
        """Delete up to `batch` rows of each kind of record older than `before`: handled
        transactions and commands, outcomes, delivered (or given up) outbox rows, ended
        intents with their turns. What is live or still owed is never touched. Returns
        the number of rows deleted."""
        cutoff = to_ms(before)
        deleted = 0
        for table, old_rows in PRUNED.items():
            cur = await self.db.execute(
                f"DELETE FROM {table} WHERE rowid IN "
                f"(SELECT rowid FROM {table} WHERE {old_rows} LIMIT ?)",
                (cutoff, batch),
            )
            deleted += max(cur.rowcount, 0)
        return deleted

    # outcomes

    async def add_outcome(
        self,
        *,
        intent_id: str | None,
        position: int | None,
        room_id: str | None,
        turn: str | None,
        asker: str | None,
        model: str,
        status: str,
        latency_ms: int | None,
        detail: str | None,
        now: datetime,
    ) -> None:
        await self.db.execute(
            """INSERT INTO outcomes (intent_id, position, room_id, turn, asker, model, status,
                   latency_ms, detail, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                intent_id,
                position,
                room_id,
                turn,
                asker,
                model,
                status,
                latency_ms,
                detail,
                to_ms(now),
            ),
        )

    async def turn_outcomes(self, intent_id: str, position: int | None) -> list[Call]:
        rows = await self._all(
            "SELECT * FROM outcomes WHERE intent_id = ? AND position IS ? ORDER BY id",
            (intent_id, position),
        )
        return [_call(row) for row in rows]

    async def routed_turns(self, room_id: str, limit: int) -> list[PastTurn]:
        """The room's last turns bound to an intent, newest first, with their calls."""
        rows = await self._all(
            """SELECT b.intent_id, b.position, b.bound_at, b.claims, i.target, i.model, i.sender
               FROM bound_turns b JOIN intents i ON i.id = b.intent_id
               WHERE i.room_id = ? ORDER BY b.bound_at DESC, b.position DESC LIMIT ?""",
            (room_id, limit),
        )
        return [
            PastTurn(
                at=_from_ms(row["bound_at"]),
                calls=tuple(await self.turn_outcomes(row["intent_id"], row["position"])),
                who=row["sender"],
                target=row["target"],
                model=row["model"],
                claims=row["claims"],
            )
            for row in rows
        ]

    async def unrouted_calls(self, room_id: str, limit: int) -> list[TurnCall]:
        """The room's last reported calls without an intent (failures, and the calls that
        followed one in the same turn), oldest first."""
        rows = await self._all(
            """SELECT * FROM outcomes WHERE room_id = ? AND intent_id IS NULL
               AND turn IS NOT NULL ORDER BY id DESC LIMIT ?""",
            (room_id, limit),
        )
        # Oldest first: calls reported in the same millisecond keep their order.
        return [
            TurnCall(row["turn"], _from_ms(row["at"]), row["asker"], _call(row))
            for row in reversed(rows)
        ]

    # encrypted events waiting for their key

    async def hold_undecrypted(
        self, event_id: str, room_id: str, session_id: str, event: dict[str, Any], now: datetime
    ) -> None:
        await self.db.execute(
            """INSERT INTO undecrypted (event_id, room_id, session_id, event, received_at)
               VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING""",
            (event_id, room_id, session_id, json.dumps(event), to_ms(now)),
        )

    async def drop_undecrypted(self, event_id: str) -> None:
        await self.db.execute("DELETE FROM undecrypted WHERE event_id = ?", (event_id,))

    async def undecrypted(self) -> list[tuple[dict[str, Any], str, datetime]]:
        """(event, session id, received at) of every event still waiting, oldest first."""
        rows = await self._all("SELECT * FROM undecrypted ORDER BY received_at")
        return [
            (json.loads(row["event"]), row["session_id"], _from_ms(row["received_at"]))
            for row in rows
        ]

    # events whose handling failed (route_sidecar.appservice)

    async def count_event_failure(self, event_key: str, room_id: str | None, now: datetime) -> int:
        """One more failed attempt at an event; how many there have been."""
        row = await self._one(
            """INSERT INTO event_failures (event_key, room_id, attempts, failed_at)
               VALUES (?, ?, 1, ?) ON CONFLICT (event_key) DO UPDATE SET
                   attempts = event_failures.attempts + 1, failed_at = excluded.failed_at
               RETURNING attempts""",
            (event_key, room_id, to_ms(now)),
        )
        assert row is not None
        return int(row[0])

    async def give_up_event(self, event_key: str, reference: str, now: datetime) -> None:
        await self.db.execute(
            "UPDATE event_failures SET given_up_at = ?, reference = ? WHERE event_key = ?",
            (to_ms(now), reference, event_key),
        )

    async def given_up_events(self) -> dict[str, str]:
        """The events given up, by key, with their reference."""
        rows = await self._all(
            "SELECT event_key, reference FROM event_failures WHERE given_up_at IS NOT NULL"
        )
        return {row[0]: row[1] for row in rows}

    # effects (the outbox)

    async def add_effect(self, effect: Effect, now: datetime) -> bool:
        """Queue a room event; False when an effect with this key is queued already."""
        cur = await self.db.execute(
            """INSERT INTO effects (key, room_id, event_type, content, edits, created_at)
               VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING""",
            (
                effect.key,
                effect.room_id,
                effect.event_type,
                json.dumps(effect.content),
                effect.edits,
                to_ms(now),
            ),
        )
        return cur.rowcount > 0

    async def hold_effect(self, effect: Effect, now: datetime, not_before: datetime) -> bool:
        """Queue a room event to be sent at `not_before`, or move an unsent one with this
        key to that time with the new content. False: this key was sent already."""
        cur = await self.db.execute(
            """INSERT INTO effects (key, room_id, event_type, content, created_at, not_before)
               VALUES (?, ?, ?, ?, ?, ?)
               ON CONFLICT (key) DO UPDATE SET content = excluded.content,
                   not_before = excluded.not_before
               WHERE effects.event_id IS NULL AND effects.failed = 0""",
            (
                effect.key,
                effect.room_id,
                effect.event_type,
                json.dumps(effect.content),
                to_ms(now),
                to_ms(not_before),
            ),
        )
        return cur.rowcount > 0

    async def drop_unsent_effect(self, key: str) -> bool:
        cur = await self.db.execute(
            "DELETE FROM effects WHERE key = ? AND event_id IS NULL", (key,)
        )
        return cur.rowcount > 0

    async def held_effects(self, kind: EffectKind) -> list[str]:
        """The keys of unsent effects of this kind still held back."""
        key_prefix = f"{kind}:"
        rows = await self._all(
            """SELECT key FROM effects WHERE event_id IS NULL AND failed = 0
               AND not_before IS NOT NULL AND substr(key, 1, ?) = ?""",
            (len(key_prefix), key_prefix),
        )
        return [str(row[0]) for row in rows]

    async def replace_unsent_effect(self, key: str, content: dict[str, Any]) -> bool:
        cur = await self.db.execute(
            "UPDATE effects SET content = ? WHERE key = ? AND event_id IS NULL",
            (json.dumps(content), key),
        )
        return cur.rowcount > 0

    async def unsent_effects(self, now: datetime, limit: int = 50) -> list[PendingEffect]:
        """Effects due (not held back past `now`), oldest first."""
        rows = await self._all(
            """SELECT id, key, room_id, event_type, content, edits, attempts FROM effects
               WHERE event_id IS NULL AND failed = 0
               AND (not_before IS NULL OR not_before <= ?) ORDER BY id LIMIT ?""",
            (to_ms(now), limit),
        )
        return [
            PendingEffect(
                id=row["id"],
                key=row["key"],
                room_id=row["room_id"],
                event_type=row["event_type"],
                content=row["content"],
                edits=row["edits"],
                attempts=row["attempts"],
            )
            for row in rows
        ]

    async def effect_event_id(self, key: str) -> str | None:
        row = await self._one("SELECT event_id FROM effects WHERE key = ?", (key,))
        return row[0] if row else None

    async def effect_exists(self, key: str) -> bool:
        return await self._one("SELECT 1 FROM effects WHERE key = ?", (key,)) is not None

    async def mark_effect_sent(self, effect_id: int, event_id: str) -> str | None:
        """Record the event an effect became; returns the content stored for it now (a
        later outcome may have replaced it while it was being sent)."""
        await self.db.execute(
            "UPDATE effects SET event_id = ?, attempts = attempts + 1 WHERE id = ?",
            (event_id, effect_id),
        )
        row = await self._one("SELECT content FROM effects WHERE id = ?", (effect_id,))
        return str(row[0]) if row is not None else None

    async def mark_effect_attempt(self, effect_id: int, give_up: bool) -> None:
        await self.db.execute(
            "UPDATE effects SET attempts = attempts + 1, failed = ? WHERE id = ?",
            (int(give_up), effect_id),
        )


def _call(row: aiosqlite.Row) -> Call:
    return Call(model=row["model"], status=row["status"], latency_ms=row["latency_ms"])


def _seen(row: aiosqlite.Row) -> SeenMessage:
    return SeenMessage(
        room_id=row["room_id"],
        event_id=row["event_id"],
        thread_id=row["thread_id"],
        sent_at=_from_ms(row["sent_at"]),
        message_hash=row["message_hash"],
        is_command=bool(row["is_command"]),
        sender=row["sender"],
    )


def _intent_from(row: aiosqlite.Row, turns: Sequence[aiosqlite.Row]) -> Intent:
    kind = ScopeKind(row["scope_kind"])
    seconds = row["scope_seconds"]
    scope = Scope(
        kind, row["scope_turns"], timedelta(seconds=seconds) if seconds is not None else None
    )
    return Intent(
        id=row["id"],
        room_id=row["room_id"],
        target=row["target"],
        model=row["model"],
        scope=scope,
        sender=row["sender"],
        command_event_id=row["command_event_id"],
        command_thread_id=row["command_thread_id"],
        command_at=_from_ms(row["command_at"]),
        created_at=_from_ms(row["created_at"]),
        state=IntentState(row["state"]),
        bound_turns=tuple(
            BoundTurn(
                key=None
                if t["request_scoped"]
                else TurnKey(turn_id=t["turn_id"], message_hash=t["message_hash"]),
                bound_at=_from_ms(t["bound_at"]),
                last_claim_at=_from_ms(t["last_claim_at"]),
                claims=t["claims"],
            )
            for t in turns
        ),
        question_hash=row["question_hash"],
        ended_at=from_ms(row["ended_at"]),
        end_reason=EndReason(row["end_reason"]) if row["end_reason"] else None,
        closed_at=from_ms(row["closed_at"]),
        closed_by=EndReason(row["closed_by"]) if row["closed_by"] else None,
        reasks=bool(row["reasks"]),
    )
