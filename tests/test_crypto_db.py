"""route_sidecar/crypto_db.py: mautrix's stores have a SQLite file of their own, so a mautrix
transaction that reads, then writes after the side-car's store has committed, does not
fail. (When both shared one file it failed with "database is locked": mautrix begins its
transactions DEFERRED, and the side-car patched them to begin IMMEDIATE; with two files
mautrix's own transaction is used as it is.)"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import cast

import aiosqlite
from mautrix.util.async_db import Connection, UpgradeTable
from mautrix.util.async_db import aiosqlite as mautrix_sqlite

from route_sidecar.crypto_db import crypto_store_path, open_crypto_db

upgrade_table = UpgradeTable()


async def create(conn: Connection) -> None:
    await conn.execute("CREATE TABLE crypto_thing (n INTEGER)")


upgrade_table.register(create, description="a table")


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
    path = tmp_path / "route-sidecar.db"
    crypto = crypto_store_path(path)
    assert crypto != path
    db = open_crypto_db(crypto, upgrade_table, logging.getLogger("test.crypto.db"))
    await db.start()
    try:
        started = asyncio.Event()
        acquired = cast(AbstractAsyncContextManager[Connection], db.acquire())
        # (mautrix types `transaction()` as a coroutine; it is an async context manager)
        async with acquired as conn, conn.transaction():  # type: ignore[attr-defined]
            assert await conn.fetchval("SELECT count(*) FROM crypto_thing") == 0
            store = asyncio.create_task(store_writes(path, started))
            await started.wait()
            await asyncio.sleep(0.2)  # the store's write, between mautrix's read and write
            await conn.execute("INSERT INTO crypto_thing VALUES (1)")
        await asyncio.wait_for(store, 10)
        assert await db.fetchval("SELECT count(*) FROM crypto_thing") == 1
    finally:
        await db.stop()
    async with aiosqlite.connect(path) as sidecar:
        async with sidecar.execute("SELECT count(*) FROM store_thing") as cursor:
            assert await cursor.fetchone() == (1,)


def test_mautrix_transactions_are_mautrix_own() -> None:
    """No copy of mautrix's private TxnConnection.transaction to re-read at every upgrade."""
    transaction: Callable[..., object] = mautrix_sqlite.TxnConnection.transaction
    assert transaction.__module__ == mautrix_sqlite.__name__
    assert transaction.__qualname__ == "TxnConnection.transaction"
