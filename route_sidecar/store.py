"""SQLite storage through aiosqlite: migrations, and the reads and writes of the core's
values. Holds no rule: it turns `Intent`s and friends into rows and back.

One connection, one lock: every access goes through `Store.atomic()`, which runs its
body in one database transaction (BEGIN IMMEDIATE … COMMIT, ROLLBACK on error).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path

import aiosqlite

from .records.effects import EffectRecords
from .records.events import EventRecords
from .records.intents import IntentRecords
from .records.outcomes import OutcomeRecords
from .records.rooms import RoomRecords
from .records.rows import to_ms
from .records.seen import SeenRecords

log = logging.getLogger("route_sidecar.store")
_MIGRATION_NAME = re.compile(r"(\d{3})_[a-z0-9_]+\.sql")


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


class Tx(EventRecords, IntentRecords, SeenRecords, OutcomeRecords, EffectRecords, RoomRecords):
    """The queries, inside one database transaction: one class per kind of record
    (route_sidecar/records/), and what spans them."""

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
