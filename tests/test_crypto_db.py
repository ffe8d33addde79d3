"""route_sidecar/crypto_db.py: mautrix's stores share the side-car's SQLite file, so a mautrix
transaction that reads, then writes after the side-car's store has committed, must not
fail (it did, with "database is locked", before its transactions began IMMEDIATE)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiosqlite
from mautrix.util.async_db import Connection, UpgradeTable
from mautrix.util.async_db import aiosqlite as mautrix_sqlite

from route_sidecar.crypto_db import begin_transactions_immediate, open_crypto_db

upgrade_table = UpgradeTable()


@upgrade_table.register(description="a table")
async def create(conn: Connection) -> None:
    await conn.execute("CREATE TABLE crypto_thing (n INTEGER)")


async def store_writes(path: Path, started: asyncio.Event) -> None:
    """The side-car's store: its own connection, BEGIN IMMEDIATE, a busy timeout."""
    async with aiosqlite.connect(path, isolation_level=None) as db:
        await db.execute("PRAGMA busy_timeout=5000")
        started.set()
        await db.execute("BEGIN IMMEDIATE")
        await db.execute("CREATE TABLE IF NOT EXISTS store_thing (n INTEGER)")
        await db.execute("INSERT INTO store_thing VALUES (1)")
        await db.execute("COMMIT")


async def test_a_mautrix_read_then_write_survives_a_commit_by_the_store_in_between(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sidecar.db"
    db = open_crypto_db(path, upgrade_table, logging.getLogger("test.crypto.db"))
    await db.start()
    try:
        started = asyncio.Event()
        async with db.acquire() as conn, conn.transaction():
            assert await conn.fetchval("SELECT count(*) FROM crypto_thing") == 0
            store = asyncio.create_task(store_writes(path, started))
            await started.wait()
            await asyncio.sleep(0.2)  # the store's write, between mautrix's read and write
            await conn.execute("INSERT INTO crypto_thing VALUES (1)")
        await asyncio.wait_for(store, 10)
        assert await db.fetchval("SELECT count(*) FROM crypto_thing") == 1
        assert await db.fetchval("SELECT count(*) FROM store_thing") == 1
    finally:
        await db.stop()


def test_the_patch_is_applied_once() -> None:
    begin_transactions_immediate()
    patched = mautrix_sqlite.TxnConnection.transaction
    begin_transactions_immediate()
    assert mautrix_sqlite.TxnConnection.transaction is patched


def test_mautrix_is_the_version_the_patch_was_written_for() -> None:
    # The patch copies TxnConnection.transaction of mautrix 0.21 (pyproject pins < 0.22).
    import mautrix

    major, minor = (int(part) for part in mautrix.__version__.split(".")[:2])
    assert (major, minor) == (0, 21), "re-read mautrix's TxnConnection.transaction"
