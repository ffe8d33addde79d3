"""The SQLite database of mautrix's crypto and state stores, in the side-car's own file:
keys written with fsync, and transactions that take the write lock when they begin; the
key its pickles are encrypted with, in a file of its own; and the move of a store that
earlier versions put in the wrong place back into that file."""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

from mautrix.util.async_db import Database, UpgradeTable
from mautrix.util.async_db import aiosqlite as mautrix_sqlite
from yarl import URL

from .config import ConfigError

IMMEDIATE_MARK = "_route_sidecar_begins_immediate"
PICKLE_KEY_SUFFIX = ".pickle-key"
# Where versions before this one kept the pickle key: a row of the side-car's `meta` table.
PICKLE_KEY_META = "crypto_pickle_key"
# mautrix's tables: the crypto store's and the room state cache's, with their versions.
MAUTRIX_TABLE_PREFIXES = ("crypto_", "mx_")
log = logging.getLogger("route_sidecar.crypto")


def sqlite_url(path: Path) -> URL:
    """mautrix reads the path of a `sqlite:///` URL from `/` whatever it says: only an
    absolute path makes one (built, not formatted, so `#` or `?` in a name stay a name)."""
    if not path.is_absolute():
        raise ValueError(f"a database URL needs an absolute path, not {path}")
    return URL.build(scheme="sqlite", path=str(path))


def open_crypto_db(db_path: Path, upgrade_table: UpgradeTable, log: logging.Logger) -> Database:
    begin_transactions_immediate()
    return Database.create(
        sqlite_url(db_path),
        upgrade_table=upgrade_table,
        # Keys are written with fsync: a lost Olm ratchet means messages nobody can read.
        db_args={"init_commands": ["PRAGMA synchronous = FULL"]},
        log=log,
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
    connection.transaction = transaction  # type: ignore[method-assign,assignment]


def move_misplaced_store(db_path: Path, misplaced: Sequence[Path]) -> None:
    """Bring a device that earlier versions kept at a misplaced path (a relative database
    path read from `/`) into the side-car's file, so the bot keeps its device and the room
    keys it holds: mautrix's tables are copied in one transaction, then the old file is
    removed. Done only while the side-car's file holds no device of its own; an old store
    that is left (unreadable, or a second device) is named in the log at every start,
    never passed over in silence."""
    found = [path for path in misplaced if os.path.isfile(path)]
    if not found:
        return
    if device_in(db_path) is not None:
        for old in found:
            log.warning(
                "an older encryption store is not used, remove it path=%s in_use=%s", old, db_path
            )
        return
    for old in found:
        try:
            device = device_in(old)
        except sqlite3.Error as error:
            log.error("cannot read an older encryption store path=%s error=%s", old, error)
            continue
        if device is None:
            continue
        try:
            _copy_mautrix_tables(old, db_path)
        except sqlite3.Error as error:
            log.error(
                "cannot move the encryption store from=%s to=%s error=%s", old, db_path, error
            )
            continue
        log.warning("encryption store moved from=%s to=%s device=%s", old, db_path, device)
        _remove_database_file(old)
        return


def pickle_key_path(db_path: Path) -> Path:
    """The file, beside the database, of the key that encrypts mautrix's pickles in it."""
    return db_path.with_name(f"{db_path.name}{PICKLE_KEY_SUFFIX}")


def keep_pickle_key(db_path: Path, from_meta: str | None, create: bool) -> str | None:
    """The key the Olm account and sessions in `db_path` are pickled with, kept in its own
    0600 file beside the database, never in it: a copy of the database alone (a backup,
    its WAL) then cannot unpickle the bot's device. A key earlier versions kept in the
    `meta` table is written to the file first (the caller then deletes the row). With
    `create`, a missing key is made, unless the database holds a device already: that
    device was pickled with a key that is lost, and a new one would not read it."""
    path = pickle_key_path(db_path)
    kept = _read_pickle_key(path)
    if from_meta is not None:
        if kept != from_meta:
            _write_private(path, from_meta)
            log.warning(
                "crypto pickle key moved out of the database to=%s replaced=%s",
                path,
                kept is not None,
            )
        return from_meta
    if kept is not None or not create:
        return kept
    device = device_in(db_path)
    if device is not None:
        raise ConfigError(
            "",
            f"{path} is missing: the bot's device {device} in {db_path} is encrypted with "
            "the key it held; restore that file from a backup",
        )
    key = secrets.token_hex(32)
    _write_private(path, key)
    return key


def _read_pickle_key(path: Path) -> str | None:
    try:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
        key = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError("", f"cannot read the crypto pickle key {path}: {error}") from None
    if not key:
        raise ConfigError("", f"the crypto pickle key file {path} is empty")
    return key


def _write_private(path: Path, text: str) -> None:
    """Written beside `path`, synced, then renamed over it: a crash leaves the old file
    or the new one, never a part."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power loss
    finally:
        os.close(folder)


def device_in(path: Path) -> str | None:
    """The bot's device id in a database file holding mautrix's crypto store, or None."""
    with closing(sqlite3.connect(_read_only(path), uri=True)) as db:
        try:
            row = db.execute(
                "SELECT device_id FROM crypto_account WHERE device_id <> '' LIMIT 1"
            ).fetchone()
        except sqlite3.OperationalError:  # no crypto store in this file
            return None
    return str(row[0]) if row else None


def _copy_mautrix_tables(old: Path, db_path: Path) -> None:
    with closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        db.execute("PRAGMA busy_timeout = 5000")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("ATTACH DATABASE ? AS old", (_read_only(old),))
        db.execute("BEGIN IMMEDIATE")
        try:
            schema = db.execute(
                "SELECT type, name, tbl_name, sql FROM old.sqlite_master"
                " WHERE sql IS NOT NULL AND type IN ('table', 'index')"
                " ORDER BY type = 'index', rowid"
            ).fetchall()
            for kind, name, table, sql in schema:
                if not table.startswith(MAUTRIX_TABLE_PREFIXES):
                    continue
                if kind == "table":
                    db.execute(f'DROP TABLE IF EXISTS main."{name}"')  # empty leftovers
                    db.execute(sql)
                    db.execute(f'INSERT INTO main."{name}" SELECT * FROM old."{name}"')
                else:
                    db.execute(sql)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("DETACH DATABASE old")


def _remove_database_file(path: Path) -> None:
    for name in (str(path), f"{path}-wal", f"{path}-shm", f"{path}-journal"):
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
        except OSError as error:
            log.error("cannot remove the moved encryption store path=%s error=%s", name, error)


def _read_only(path: Path) -> str:
    return f"{path.as_uri()}?mode=ro"
