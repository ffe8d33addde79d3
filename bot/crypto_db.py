"""The SQLite database of mautrix's crypto and state stores, in the side-car's own file:
keys written with fsync, and transactions that take the write lock when they begin."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from mautrix.util.async_db import Database, UpgradeTable
from mautrix.util.async_db import aiosqlite as mautrix_sqlite

IMMEDIATE_MARK = "_route_sidecar_begins_immediate"


def open_crypto_db(db_path: Path, upgrade_table: UpgradeTable, log: logging.Logger) -> Database:
    begin_transactions_immediate()
    return Database.create(
        f"sqlite:///{db_path}",
        upgrade_table=upgrade_table,
        # Keys are written with fsync: a lost Olm ratchet means messages nobody can read.
        db_args={"init_commands": ["PRAGMA synchronous = FULL"]},
        log=log,  # type: ignore[arg-type]
    )


def begin_transactions_immediate() -> None:
    """mautrix begins its SQLite transactions DEFERRED. One that reads and then writes
    fails at once with "database is locked" when the side-car's store has committed in
    between (SQLite's busy timeout does not apply when a read transaction must become a
    write one), and mautrix loses what it was storing: in the encrypted crash loop, the
    cross-signing signatures of each device-list refresh after a restart. IMMEDIATE takes
    the write lock when the transaction begins, waiting for it as long as the busy
    timeout allows. (mautrix 0.21 has no setting for this: its connection class is
    patched, once, the same way it is written.)"""
    connection = mautrix_sqlite.TxnConnection
    if getattr(connection.transaction, IMMEDIATE_MARK, False):
        return

    @asynccontextmanager
    async def transaction(self: Any) -> AsyncIterator[None]:
        if mautrix_sqlite.in_transaction.get():
            yield
            return
        await self.execute("BEGIN IMMEDIATE")
        token = mautrix_sqlite.in_transaction.set(True)
        try:
            yield
        except Exception:
            await self.rollback()
            raise
        else:
            await self.commit()
        finally:
            mautrix_sqlite.in_transaction.reset(token)

    setattr(transaction, IMMEDIATE_MARK, True)
    connection.transaction = transaction  # type: ignore[method-assign]
