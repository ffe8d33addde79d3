"""The SQLite database of mautrix's crypto and state stores, in a file of its own beside
the side-car's (keys written with fsync); the key its pickles are encrypted with, in a
file of its own; and the move of a store from where earlier versions kept it (the
side-car's database, or a misplaced file) into that file."""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

from mautrix.util.async_db import Database, UpgradeTable
from yarl import URL

from .config import ConfigError
from .store import make_private

CRYPTO_FILE_STEM_SUFFIX = "-crypto"
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


def open_crypto_db(crypto_path: Path, upgrade_table: UpgradeTable, log: logging.Logger) -> Database:
    """mautrix's database in its own file (crypto_store_path), 0600 with its side files.
    mautrix keeps one connection to it (its pool's default size), and nothing else
    writes it while the side-car runs."""
    make_private(crypto_path)
    return Database.create(
        sqlite_url(crypto_path),
        upgrade_table=upgrade_table,
        # Keys are written with fsync: a lost Olm ratchet means messages nobody can read.
        db_args={"init_commands": ["PRAGMA synchronous = FULL"]},
        log=log,
    )


def crypto_store_path(db_path: Path) -> Path:
    """mautrix's crypto and state stores' own SQLite file, beside the side-car's database
    (`route-sidecar.db` -> `route-sidecar-crypto.db`), as maubot keeps its
    `crypto_database`: each file has one writer, so mautrix's transactions, which begin
    DEFERRED and may read before they write, never meet a commit of the side-car's store
    (they failed with "database is locked" when both shared one file)."""
    return db_path.with_name(f"{db_path.stem}{CRYPTO_FILE_STEM_SUFFIX}{db_path.suffix}")


def move_store_to_its_file(crypto_path: Path, db_path: Path, misplaced: Sequence[Path]) -> None:
    """Bring the bot's device into mautrix's own file from where earlier versions kept
    it, so the bot keeps its device and the room keys it holds: the side-car's database
    (versions before the crypto file had mautrix's tables beside its own), then a
    misplaced file (a relative database path read from `/`). mautrix's tables are copied
    in one transaction, then removed from where they were: dropped from the side-car's
    database, their pages zeroed; a misplaced file deleted. Done only while the crypto
    file holds no device; a store that is left (unreadable, or a second device) is named
    in the log at every start, never passed over in silence. A move cut short (copied,
    not yet removed) is finished at the next start."""
    make_private(crypto_path)
    if _mautrix_tables(db_path):
        _move_from_sidecar_database(crypto_path, db_path)
    found = [path for path in misplaced if os.path.isfile(path)]
    if not found:
        return
    if device_in(crypto_path) is not None:
        for old in found:
            log.warning(
                "an older encryption store is not used, remove it path=%s in_use=%s",
                old,
                crypto_path,
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
            _copy_mautrix_tables(old, crypto_path)
        except sqlite3.Error as error:
            log.error(
                "cannot move the encryption store from=%s to=%s error=%s", old, crypto_path, error
            )
            continue
        log.warning("encryption store moved from=%s to=%s device=%s", old, crypto_path, device)
        _remove_database_file(old)
        return


def _move_from_sidecar_database(crypto_path: Path, db_path: Path) -> None:
    try:
        device, in_use = device_in(db_path), device_in(crypto_path)
        if in_use is None:
            _copy_mautrix_tables(db_path, crypto_path)
            log.info("encryption store moved from=%s to=%s device=%s", db_path, crypto_path, device)
        elif device in (None, in_use):
            log.info("the encryption store's copy left in the database removed path=%s", db_path)
        else:
            log.warning(
                "a second encryption device in the database is not used path=%s device=%s"
                " in_use=%s in_use_device=%s",
                db_path,
                device,
                crypto_path,
                in_use,
            )
            return
        _drop_mautrix_tables(db_path)
    except sqlite3.Error as error:
        log.error(
            "cannot move the encryption store from=%s to=%s error=%s", db_path, crypto_path, error
        )


def pickle_key_path(db_path: Path) -> Path:
    """The file, beside the database, of the key that encrypts mautrix's pickles in it."""
    return db_path.with_name(f"{db_path.name}{PICKLE_KEY_SUFFIX}")


def keep_pickle_key(db_path: Path, from_meta: str | None, create: bool) -> str | None:
    """The key the Olm account and sessions in the crypto file are pickled with, kept in
    its own 0600 file beside the side-car's database (`route-sidecar.db.pickle-key`, where
    it has been since before the crypto file), in no database: a copy of the databases
    alone (a backup, a WAL) then cannot unpickle the bot's device. A key earlier versions
    kept in the `meta` table is written to the file first (the caller then deletes the
    row). With `create`, a missing key is made, unless the crypto file holds a device
    already: that device was pickled with a key that is lost, and a new one would not
    read it."""
    path = pickle_key_path(db_path)
    crypto_path = crypto_store_path(db_path)
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
    device = device_in(crypto_path)
    if device is not None:
        raise ConfigError(
            "",
            f"{path} is missing: the bot's device {device} in {crypto_path} is encrypted with "
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
    """The bot's device id in a database file holding mautrix's crypto store, or None
    (also for a file that does not exist)."""
    if not os.path.isfile(path):
        return None
    with closing(sqlite3.connect(_read_only(path), uri=True)) as db:
        try:
            row = db.execute(
                "SELECT device_id FROM crypto_account WHERE device_id <> '' LIMIT 1"
            ).fetchone()
        except sqlite3.OperationalError:  # no crypto store in this file
            return None
    return str(row[0]) if row else None


def _copy_mautrix_tables(old: Path, db_path: Path) -> None:
    # Opened as a URI: only then does SQLite read the ATTACHed `?mode=ro` URI as one
    # (unless it was built with SQLITE_USE_URI), not as a file name.
    with closing(sqlite3.connect(db_path.as_uri(), uri=True, isolation_level=None)) as db:
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


def _mautrix_tables(path: Path) -> list[str]:
    with closing(sqlite3.connect(_read_only(path), uri=True)) as db:
        return _mautrix_tables_in(db)


def _mautrix_tables_in(db: sqlite3.Connection) -> list[str]:
    names = db.execute("SELECT name FROM main.sqlite_master WHERE type = 'table'").fetchall()
    return [str(name) for (name,) in names if str(name).startswith(MAUTRIX_TABLE_PREFIXES)]


def _drop_mautrix_tables(db_path: Path) -> None:
    """mautrix's tables out of the side-car's database, and their bytes with them: pages
    zeroed (secure_delete), the WAL that held earlier copies emptied (a TRUNCATE
    checkpoint; when another connection keeps it in use, its frames go at a later one)."""
    with closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        db.execute("PRAGMA busy_timeout = 5000")
        db.execute("PRAGMA secure_delete = ON")
        db.execute("BEGIN IMMEDIATE")
        try:
            for name in _mautrix_tables_in(db):
                db.execute(f'DROP TABLE main."{name}"')
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


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
