"""End-to-end encryption for the bot, through mautrix's `OlmMachine` in appservice mode.

No /sync: the bot's device is created by the appservice itself (MSC4190), and its
to-device events (room keys), device list changes and one-time-key counts arrive in the
transactions the homeserver pushes (MSC2409, MSC3202). Olm and Megolm state lives in
the side-car's own SQLite file (mautrix's crypto store and room state cache, in tables
of their own), so the device and its keys survive restarts.

Only this module imports the crypto libraries; without python-olm the side-car runs
without it (`config.encryption_available`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mautrix.client import Client
from mautrix.client.state_store.asyncpg import PgStateStore
from mautrix.crypto import OlmMachine, PgCryptoStore
from mautrix.errors import DecryptionError, MatrixRequestError, SessionNotFound
from mautrix.types import (
    ASToDeviceEvent,
    DeviceLists,
    DeviceOTKCount,
    EncryptedEvent,
    EventType,
    RoomID,
    StateEvent,
    UserID,
)
from mautrix.util.async_db import Database

from .config import Config
from .events import Undecryptable

log = logging.getLogger("route_sidecar.crypto")
# Unstable keys of the transaction extensions (Synapse 1.163).
TO_DEVICE_KEYS = ("de.sorunome.msc2409.to_device", "org.matrix.msc2409.to_device", "to_device")
DEVICE_LISTS_KEY = "org.matrix.msc3202.device_lists"
OTK_COUNT_KEY = "org.matrix.msc3202.device_one_time_keys_count"
TRACKED_STATE = ("m.room.member", "m.room.encryption")


class BotCrypto:
    """The bot's device: decrypts what it receives, encrypts what it sends."""

    def __init__(self, config: Config, db_path: Path, pickle_key: str) -> None:
        self.config = config
        self.db = Database.create(
            f"sqlite:///{db_path}",
            upgrade_table=PgCryptoStore.upgrade_table,
            # Keys are written with fsync: a lost Olm ratchet means messages nobody can read.
            db_args={"init_commands": ["PRAGMA synchronous = FULL"]},
            log=logging.getLogger("route_sidecar.crypto.db"),  # type: ignore[arg-type]
        )
        bot = UserID(config.bot_user_id)
        self.crypto_store = PgCryptoStore(bot, pickle_key, self.db)
        self.state_store = PgStateStore(self.db)
        self.client = Client(
            base_url=config.homeserver.address,
            mxid=bot,
            token=config.appservice.as_token,
            state_store=self.state_store,
            log=logging.getLogger("route_sidecar.crypto.client"),  # type: ignore[arg-type]
        )
        self.machine = OlmMachine(
            self.client,
            self.crypto_store,
            self.state_store,
            log=logging.getLogger("route_sidecar.crypto.olm"),  # type: ignore[arg-type]
        )
        self._send_lock = asyncio.Lock()
        self.ready = asyncio.Event()

    @property
    def device_id(self) -> str:
        return str(self.client.device_id or "")

    async def start(self) -> None:
        """Open the stores, create (or reuse) the bot's device and publish its keys."""
        await self.db.start()
        await PgStateStore.upgrade_table.upgrade(self.db)
        await self.crypto_store.open()
        device_id = await self.crypto_store.get_device_id()
        await self.client.create_device_msc4190(
            device_id=device_id or "", initial_display_name=self.config.encryption.device_name
        )
        await self.machine.load()
        if not device_id:
            await self.crypto_store.put_device_id(self.client.device_id)
            log.info("bot device created device=%s", self.client.device_id)
        if not device_id or not self.machine.account.shared:
            await self.machine.share_keys()
        await self._cross_sign_own_device()
        self.ready.set()
        log.info("encryption ready device=%s", self.client.device_id)

    async def _cross_sign_own_device(self) -> None:
        """Sign the bot's device with its own cross-signing keys, once: Element then shows
        its messages as from a device its owner verified, not with a warning. The
        recovery key is not kept: the bot never needs to restore the keys elsewhere."""
        try:
            # Keys already published: this device was signed when they were made (a trust
            # check here can fail before mautrix has fetched them, and a second set of
            # keys would be a device-list change for every member).
            if await self.machine.get_own_cross_signing_public_keys() is not None:
                return
            await self.machine.generate_recovery_key()
            log.info("bot device cross-signed device=%s", self.client.device_id)
        except Exception as error:  # a homeserver that refuses it: messages still work
            log.warning("bot device not cross-signed error=%s", type(error).__name__)

    async def close(self) -> None:
        await self.crypto_store.close()
        await self.db.stop()
        await self.client.api.session.close()

    # ---- what arrives -------------------------------------------------------------

    async def receive(self, transaction: Mapping[str, Any]) -> None:
        """The transaction's encryption extras, before its room events: room keys sent
        with a message must be known when the message is decrypted. A failure here (the
        homeserver refusing a key upload) is logged, never a reason to refuse commands."""
        counts = transaction.get(OTK_COUNT_KEY)
        if isinstance(counts, Mapping):
            try:
                await self.machine.handle_as_otk_counts(_otk_counts(counts))
            except Exception as error:
                log.warning("one-time keys not replenished error=%s", type(error).__name__)
        lists = transaction.get(DEVICE_LISTS_KEY)
        if isinstance(lists, Mapping):
            try:
                await self.machine.handle_as_device_lists(DeviceLists.deserialize(dict(lists)))
            except Exception as error:
                log.warning("device lists not handled error=%s", type(error).__name__)
        for key in TO_DEVICE_KEYS:
            events = transaction.get(key)
            if not isinstance(events, list):
                continue
            for raw in events:
                try:
                    await self.machine.handle_as_to_device_event(ASToDeviceEvent.deserialize(raw))
                except Exception as error:  # one bad to-device event must not stop the rest
                    log.warning("to-device event not handled error=%s", type(error).__name__)
            break

    async def track_state(self, raw: Mapping[str, Any]) -> None:
        """Membership and encryption state of the bot's rooms, for sharing keys."""
        if raw.get("type") not in TRACKED_STATE or "state_key" not in raw:
            return
        try:
            event = StateEvent.deserialize(dict(raw))
        except Exception:
            return
        await self.state_store.update_state(event)
        if event.type == EventType.ROOM_MEMBER:
            await self.machine.handle_member_event(event)

    async def joined(self, room_id: str) -> None:
        """The bot joined a room: learn whether it is encrypted, and who is in it."""
        try:
            await self.client.get_state_event(RoomID(room_id), EventType.ROOM_ENCRYPTION)
        except MatrixRequestError:
            pass  # not encrypted (404), or not readable: the state event will tell later
        await self.client.get_joined_members(RoomID(room_id))

    async def decrypt(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The decrypted event as the homeserver would show a plain one; Undecryptable
        when the key is missing (yet) or the event is broken."""
        try:
            event = EncryptedEvent.deserialize(dict(raw))
        except Exception:
            raise Undecryptable("not an encrypted event the bot understands") from None
        try:
            decrypted = await self.machine.decrypt_megolm_event(event)
        except SessionNotFound as error:
            raise Undecryptable("no room key (yet)", str(error.session_id)) from None
        except DecryptionError as error:
            raise Undecryptable(type(error).__name__) from None
        return decrypted.serialize()

    async def wait_for_key(self, room_id: str, session_id: str, timeout: float) -> bool:
        return await self.machine.wait_for_session(RoomID(room_id), session_id, timeout=timeout)

    # ---- what the bot sends ---------------------------------------------------------

    async def is_encrypted(self, room_id: str) -> bool:
        return bool(await self.state_store.is_encrypted(RoomID(room_id)))

    async def encrypt(
        self, room_id: str, event_type: str, content: dict[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        """`m.room.encrypted` content for a room event. A new Megolm session is shared
        with every device of the room's members before each send: a member's new device
        (or a member who joined since) always gets the key (mautrix's store does not
        remember which devices received a session)."""
        room = RoomID(room_id)
        async with self._send_lock:
            members = list(await self.client.get_joined_members(room))
            # Fresh device lists (mautrix has no public call for it): a new device counts.
            await self.machine._fetch_keys(members, include_untracked=True)
            await self.crypto_store.remove_outbound_group_session(room)
            await self.machine.share_group_session(room, members)
            encrypted = await self.machine.encrypt_megolm_event(
                room, EventType.find(event_type), content
            )
        return "m.room.encrypted", encrypted.serialize()


def _otk_counts(counts: Mapping[str, Any]) -> dict[UserID, dict[Any, DeviceOTKCount]]:
    return {
        UserID(user): {
            device: DeviceOTKCount.deserialize(count)
            for device, count in devices.items()
            if isinstance(count, Mapping)
        }
        for user, devices in counts.items()
        if isinstance(devices, Mapping)
    }
