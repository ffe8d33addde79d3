"""bot/crypto_db.move_misplaced_store: a device that earlier versions kept in a misplaced
file (a relative database path read from `/`) is brought into the side-car's file with
mautrix's real crypto store, the same device and account; an old store is never passed
over in silence. (The end-to-end move, through the real `/` and Synapse, is in
tests/e2e/test_deploy.py.)"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("olm", reason="python-olm is the [encryption] extra; make test installs it")

from mautrix.client.state_store.asyncpg import PgStateStore
from mautrix.crypto import OlmAccount, PgCryptoStore
from mautrix.types import DeviceID, RoomID, UserID

from bot.crypto_db import device_in, move_misplaced_store, open_crypto_db, sqlite_url
from bot.store import Store

BOT = UserID("@route:example.org")
PICKLE_KEY = "the-pickle-key-kept-in-the-sidecar-meta"


async def make_crypto_store(path: Path, device: str) -> dict[str, str]:
    """A store as mautrix writes it (crypto tables, state cache, their versions)."""
    db = open_crypto_db(path, PgCryptoStore.upgrade_table, logging.getLogger("test"))
    await db.start()
    try:
        await PgStateStore.upgrade_table.upgrade(db)
        store = PgCryptoStore(BOT, PICKLE_KEY, db)
        await store.open()
        account = OlmAccount()
        await store.put_account(account)
        await store.put_device_id(DeviceID(device))
        await PgStateStore(db).set_encryption_info(RoomID("!r:example.org"), {"algorithm": "x"})
        return dict(account.identity_keys)
    finally:
        await db.stop()


async def read_crypto_store(path: Path) -> tuple[str | None, dict[str, str] | None, bool]:
    db = open_crypto_db(path, PgCryptoStore.upgrade_table, logging.getLogger("test"))
    await db.start()
    try:
        await PgStateStore.upgrade_table.upgrade(db)
        store = PgCryptoStore(BOT, PICKLE_KEY, db)
        await store.open()
        account = await store.get_account()
        encrypted = await PgStateStore(db).is_encrypted(RoomID("!r:example.org"))
        keys = dict(account.identity_keys) if account is not None else None
        return await store.get_device_id(), keys, bool(encrypted)
    finally:
        await db.stop()


async def sidecar_file(path: Path) -> None:
    store = await Store.open(path)
    async with store.atomic() as tx:
        await tx.set_meta("crypto_pickle_key", PICKLE_KEY)
    await store.close()


def files_of(database: Path) -> list[str]:
    return [f"{database}{s}" for s in ("", "-wal", "-shm") if os.path.exists(f"{database}{s}")]


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


async def test_a_misplaced_store_moves_in_with_its_device_and_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    main, old = tmp_path / "data" / "route-sidecar.db", tmp_path / "root" / "route-sidecar.db"
    old.parent.mkdir()
    await sidecar_file(main)
    keys = await make_crypto_store(old, "OLDDEVICE")
    before = tables(main)
    with caplog.at_level(logging.INFO, "route_sidecar.crypto"):
        move_misplaced_store(main, [tmp_path / "elsewhere.db", old])
    assert files_of(old) == []
    assert before < tables(main)  # the side-car's tables kept, mautrix's added
    assert await read_crypto_store(main) == ("OLDDEVICE", keys, True)
    moved = [r for r in caplog.records if "moved" in r.getMessage()]
    assert len(moved) == 1
    assert str(old) in moved[0].getMessage() and str(main) in moved[0].getMessage()
    # Done once: a second start finds nothing to move and says nothing.
    caplog.clear()
    move_misplaced_store(main, [old])
    assert not caplog.records


async def test_a_store_with_a_device_of_its_own_is_kept_and_the_old_one_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    main, old = tmp_path / "main.db", tmp_path / "old.db"
    await sidecar_file(main)
    keys = await make_crypto_store(main, "CURRENT")
    await make_crypto_store(old, "OLDDEVICE")
    with caplog.at_level(logging.INFO, "route_sidecar.crypto"):
        move_misplaced_store(main, [old])
    assert old.exists() and device_in(old) == "OLDDEVICE"
    assert (await read_crypto_store(main))[:2] == ("CURRENT", keys)
    [warning] = caplog.records
    assert warning.levelno == logging.WARNING and str(old) in warning.getMessage()


async def test_an_unreadable_old_store_is_named_and_nothing_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    main, old = tmp_path / "main.db", tmp_path / "old.db"
    await sidecar_file(main)
    old.write_bytes(b"not a database, " * 512)
    before = tables(main)
    with caplog.at_level(logging.INFO, "route_sidecar.crypto"):
        move_misplaced_store(main, [old])
    assert tables(main) == before and old.exists()
    [error] = caplog.records
    assert error.levelno == logging.ERROR and str(old) in error.getMessage()


async def test_a_file_without_a_device_is_not_moved(tmp_path: Path) -> None:
    main, old = tmp_path / "main.db", tmp_path / "old.db"
    await sidecar_file(main)
    with sqlite3.connect(old) as db:
        db.execute("CREATE TABLE crypto_account (device_id TEXT)")
    move_misplaced_store(main, [old])
    assert old.exists() and "crypto_account" not in tables(main)


def test_a_database_url_is_built_from_an_absolute_path_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="absolute"):
        sqlite_url(Path("route-sidecar.db"))
    odd = tmp_path / "a b#c?.db"
    assert sqlite_url(odd).path == str(odd)  # `#` and `?` stay part of the name
    assert os.path.isabs(sqlite_url(odd).path)
