"""route_sidecar/crypto_db.move_store_to_its_file: a device that earlier versions kept in the
side-car's database, or in a misplaced file (a relative database path read from `/`), is
brought into mautrix's own file with mautrix's real crypto store, the same device and
account; an old store is never passed over in silence. (The end-to-end moves, through
the real `/` and Synapse, are in tests/e2e/test_deploy.py.)"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from contextlib import closing
from pathlib import Path

import pytest

pytest.importorskip("olm", reason="python-olm is the [encryption] extra; make test installs it")

from mautrix.client.state_store.asyncpg import PgStateStore
from mautrix.crypto import OlmAccount, PgCryptoStore
from mautrix.types import DeviceID, RoomID, UserID

from route_sidecar.app import start_sidecar
from route_sidecar.config import Config, ConfigError, parse_config
from route_sidecar.crypto_db import (
    MAUTRIX_TABLE_PREFIXES,
    crypto_store_path,
    device_in,
    move_store_to_its_file,
    open_crypto_db,
    pickle_key_path,
    sqlite_url,
)
from route_sidecar.store import Store

from .api_support import TOKEN, free_port

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
    crypto = crypto_store_path(main)
    old.parent.mkdir()
    await sidecar_file(main)
    keys = await make_crypto_store(old, "OLDDEVICE")
    before = tables(main)
    with caplog.at_level(logging.INFO, "route_sidecar.crypto"):
        move_store_to_its_file(crypto, main, [tmp_path / "elsewhere.db", old])
    assert files_of(old) == []
    assert tables(main) == before  # the side-car's file untouched
    assert await read_crypto_store(crypto) == ("OLDDEVICE", keys, True)
    assert stat.S_IMODE(crypto.stat().st_mode) == 0o600
    moved = [r for r in caplog.records if "moved" in r.getMessage()]
    assert len(moved) == 1
    assert str(old) in moved[0].getMessage() and str(crypto) in moved[0].getMessage()
    # Done once: a second start finds nothing to move and says nothing.
    caplog.clear()
    move_store_to_its_file(crypto, main, [old])
    assert not caplog.records


async def test_a_store_with_a_device_of_its_own_is_kept_and_the_old_one_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    main, old = tmp_path / "main.db", tmp_path / "old.db"
    crypto = crypto_store_path(main)
    await sidecar_file(main)
    keys = await make_crypto_store(crypto, "CURRENT")
    await make_crypto_store(old, "OLDDEVICE")
    with caplog.at_level(logging.INFO, "route_sidecar.crypto"):
        move_store_to_its_file(crypto, main, [old])
    assert old.exists() and device_in(old) == "OLDDEVICE"
    assert (await read_crypto_store(crypto))[:2] == ("CURRENT", keys)
    [warning] = caplog.records
    assert warning.levelno == logging.WARNING and str(old) in warning.getMessage()


async def test_an_unreadable_old_store_is_named_and_nothing_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    main, old = tmp_path / "main.db", tmp_path / "old.db"
    crypto = crypto_store_path(main)
    await sidecar_file(main)
    old.write_bytes(b"not a database, " * 512)
    before = tables(main)
    with caplog.at_level(logging.INFO, "route_sidecar.crypto"):
        move_store_to_its_file(crypto, main, [old])
    assert tables(main) == before and old.exists() and device_in(crypto) is None
    [error] = caplog.records
    assert error.levelno == logging.ERROR and str(old) in error.getMessage()


async def test_a_file_without_a_device_is_not_moved(tmp_path: Path) -> None:
    main, old = tmp_path / "main.db", tmp_path / "old.db"
    crypto = crypto_store_path(main)
    await sidecar_file(main)
    with sqlite3.connect(old) as db:
        db.execute("CREATE TABLE crypto_account (device_id TEXT)")
    move_store_to_its_file(crypto, main, [old])
    assert old.exists() and "crypto_account" not in tables(crypto)


def sidecar_tables(path: Path) -> set[str]:
    return {name for name in tables(path) if not name.startswith(MAUTRIX_TABLE_PREFIXES)}


async def test_a_device_kept_in_the_sidecar_database_moves_to_its_own_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    main = tmp_path / "route-sidecar.db"
    crypto = crypto_store_path(main)
    assert crypto == tmp_path / "route-sidecar-crypto.db"
    await sidecar_file(main)
    keys = await make_crypto_store(main, "KEPTDEVICE")  # the layout of earlier versions
    own = sidecar_tables(main)
    assert own < tables(main)
    with caplog.at_level(logging.INFO, "route_sidecar.crypto"):
        move_store_to_its_file(crypto, main, [])
    assert tables(main) == own  # mautrix's tables left, the side-car's kept
    assert b"KEPTDEVICE" not in file_bytes(main)  # their pages zeroed, the WAL emptied
    assert await read_crypto_store(crypto) == ("KEPTDEVICE", keys, True)
    assert [stat.S_IMODE(os.stat(name).st_mode) for name in files_of(crypto)] == [0o600] * len(
        files_of(crypto)
    )
    [moved] = [r for r in caplog.records if "moved" in r.getMessage()]
    assert f"from={main} to={crypto} device=KEPTDEVICE" in moved.getMessage()
    caplog.clear()
    move_store_to_its_file(crypto, main, [])
    assert not caplog.records


async def test_a_move_cut_short_after_the_copy_is_finished_at_the_next_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    main = tmp_path / "route-sidecar.db"
    crypto = crypto_store_path(main)
    await sidecar_file(main)
    keys = await make_crypto_store(main, "KEPTDEVICE")
    # Killed between the copy (committed) and the drop: both files hold the device.
    with closing(sqlite3.connect(main)) as src, closing(sqlite3.connect(crypto)) as dst:
        src.backup(dst)
    with caplog.at_level(logging.INFO, "route_sidecar.crypto"):
        move_store_to_its_file(crypto, main, [])
    assert tables(main) == sidecar_tables(main)
    assert await read_crypto_store(crypto) == ("KEPTDEVICE", keys, True)
    [finished] = caplog.records
    assert "left in the database removed" in finished.getMessage()


async def test_a_second_device_in_the_database_is_named_and_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    main = tmp_path / "route-sidecar.db"
    crypto = crypto_store_path(main)
    await sidecar_file(main)
    keys = await make_crypto_store(crypto, "CURRENT")
    await make_crypto_store(main, "OTHER")
    with caplog.at_level(logging.INFO, "route_sidecar.crypto"):
        move_store_to_its_file(crypto, main, [])
    assert device_in(main) == "OTHER"  # nothing deleted that is not used elsewhere
    assert (await read_crypto_store(crypto))[:2] == ("CURRENT", keys)
    [warning] = caplog.records
    assert warning.levelno == logging.WARNING
    assert all(part in warning.getMessage() for part in (str(main), "OTHER", "CURRENT"))


def test_a_database_url_is_built_from_an_absolute_path_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="absolute"):
        sqlite_url(Path("route-sidecar.db"))
    odd = tmp_path / "a b#c?.db"
    assert sqlite_url(odd).path == str(odd)  # `#` and `?` stay part of the name
    assert os.path.isabs(sqlite_url(odd).path)


# --- the pickle key: kept apart from the pickles it protects -----------------------------


def encrypted_config(database: Path) -> Config:
    """Encryption on, no homeserver there: start-up moves the key, the device waits."""
    return parse_config(
        {
            "homeserver": {"address": f"http://127.0.0.1:{free_port()}", "domain": "example.org"},
            "appservice": {
                "address": "http://127.0.0.1:29333",
                "listen": {"host": "127.0.0.1", "port": free_port()},
                "as_token": "as-token-0123456789abcdef",
                "hs_token": "hs-token-0123456789abcdef",
            },
            "api": {"listen": {"host": "127.0.0.1", "port": free_port()}, "tokens": [TOKEN]},
            "database": f"sqlite:///{database}",
            "targets": {"cloud": {"model": "ollama-cloud/glm-5.1"}},
            "encryption": {"enabled": True},
        },
        {},
    )


def file_bytes(database: Path) -> bytes:
    return b"".join(Path(name).read_bytes() for name in files_of(database))


async def test_a_key_earlier_versions_kept_in_the_database_leaves_it_and_the_device_stays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    database = tmp_path / "route-sidecar.db"
    await sidecar_file(database)  # the key in `meta`, as earlier versions kept it
    keys = await make_crypto_store(database, "KEPTDEVICE")
    assert PICKLE_KEY.encode() in file_bytes(database)
    with caplog.at_level(logging.INFO, "route_sidecar.crypto"):
        sidecar = await start_sidecar(encrypted_config(database))
    try:
        # While it runs, with its WAL open: the key is in no byte of the database's files.
        assert PICKLE_KEY.encode() not in file_bytes(database)
        async with sidecar.store.atomic() as tx:
            assert await tx.meta("crypto_pickle_key") is None
    finally:
        await sidecar.stop()
    assert PICKLE_KEY.encode() not in file_bytes(database)
    key_file = pickle_key_path(database)
    assert key_file.read_text().strip() == PICKLE_KEY
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert [r for r in caplog.records if "pickle key moved" in r.getMessage()]
    # The Olm account still unpickles with the key from its file: the same device, now in
    # mautrix's own file.
    assert await read_crypto_store(crypto_store_path(database)) == ("KEPTDEVICE", keys, True)
    assert device_in(database) is None
    # A second start finds the key in its file and leaves it there.
    caplog.clear()
    sidecar = await start_sidecar(encrypted_config(database))
    await sidecar.stop()
    assert key_file.read_text().strip() == PICKLE_KEY
    assert not [r for r in caplog.records if "pickle key" in r.getMessage()]


async def test_a_new_database_gets_a_random_key_in_its_own_file(tmp_path: Path) -> None:
    database = tmp_path / "data" / "route-sidecar.db"
    sidecar = await start_sidecar(encrypted_config(database))
    await sidecar.stop()
    key = pickle_key_path(database).read_text().strip()
    assert len(key) == 64 and key.encode() not in file_bytes(database)
    assert stat.S_IMODE(pickle_key_path(database).stat().st_mode) == 0o600


async def test_a_device_whose_key_file_is_lost_stops_start_naming_the_file(
    tmp_path: Path,
) -> None:
    database = tmp_path / "route-sidecar.db"
    await _empty_store(database)
    await make_crypto_store(database, "ORPHAN")
    with pytest.raises(ConfigError) as caught:
        started = await start_sidecar(encrypted_config(database))
        await started.stop()
    message = str(caught.value)
    assert str(pickle_key_path(database)) in message and "ORPHAN" in message
    assert len(message.splitlines()) == 1
    assert not pickle_key_path(database).exists()  # no new key that would not read it


async def _empty_store(path: Path) -> None:
    store = await Store.open(path)
    await store.close()
