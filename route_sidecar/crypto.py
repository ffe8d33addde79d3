"""End-to-end encryption for the bot, through mautrix's `OlmMachine` in appservice mode.

No /sync: the bot's device is created by the appservice itself (MSC4190), and its
to-device events (room keys), device list changes and one-time-key counts arrive in the
transactions the homeserver pushes (MSC2409, MSC3202). Olm and Megolm state lives in
the side-car's own SQLite file (mautrix's crypto store and room state cache, in tables
of their own), so the device and its keys survive restarts.

A room key that never reached the bot (Synapse 1.163 drops the to-device part of an
appservice transaction it retries, and those sent while the side-car is down) is asked
for again: an `m.room_key_request` to the sender's device, which Element answers for a
session it shared with the bot's device (`request_key`). Only that device's answer is
imported (`BotOlmMachine`).

Only this module imports the crypto libraries; without python-olm the side-car runs
without it (`config.encryption_available`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from mautrix.api import Method
from mautrix.api import Path as ApiPath
from mautrix.client import Client
from mautrix.client.state_store.asyncpg import PgStateStore
from mautrix.crypto import OlmMachine, PgCryptoStore
from mautrix.errors import DecryptionError, MatrixRequestError, SessionNotFound
from mautrix.types import (
    JSON,
    ASToDeviceEvent,
    DecryptedOlmEvent,
    DeviceID,
    DeviceLists,
    DeviceOTKCount,
    EncryptedEvent,
    EventType,
    ForwardedRoomKeyEventContent,
    IdentityKey,
    RoomID,
    SessionID,
    StateEvent,
    UserID,
)

from .config import Config
from .core.events import Undecryptable
from .crypto_db import open_crypto_db

log = logging.getLogger("route_sidecar.crypto")
# Unstable keys of the transaction extensions (Synapse 1.163).
TO_DEVICE_KEYS = ("de.sorunome.msc2409.to_device", "org.matrix.msc2409.to_device", "to_device")
DEVICE_LISTS_KEY = "org.matrix.msc3202.device_lists"
OTK_COUNT_KEY = "org.matrix.msc3202.device_one_time_keys_count"
TRACKED_STATE = ("m.room.member", "m.room.encryption")
KEY_POLL_SECONDS = 1.0  # a key that lands between two looks is seen this late at most
KEY_GRACE_SECONDS = 1.0  # how long a missing room key may be late before the bot asks
PROBE_TYPE = EventType.find("org.route_sidecar.delivery_probe", t_class=EventType.Class.TO_DEVICE)
PROBE_SECONDS = 0.5  # how long a probe of to-device delivery may take before the next
# How long a key request may wait for to-device messages to reach the bot again (after a
# restart Synapse may first push what it queued meanwhile; a ping makes it start at once).
DELIVERY_WAIT_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """A room key the bot asks for: in which room, and whom (the event's sender)."""

    room_id: RoomID
    sender: UserID
    sender_key: IdentityKey | None  # the session creator's Curve25519 key, when the event names it


class BotOlmMachine(OlmMachine):
    """mautrix's OlmMachine, except that a forwarded room key (`m.forwarded_room_key`) is
    imported only as the answer to the bot's own request, and only from the device that
    made the session: its sender, over an Olm channel keyed by the session's own Curve25519
    key, with no forwarding chain. Such a key is as good as the `m.room_key` it replaces;
    mautrix alone would import a forwarded key from anyone."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requested: dict[SessionID, KeyRequest] = {}

    async def _receive_forwarded_room_key(self, evt: DecryptedOlmEvent) -> None:
        key = cast(ForwardedRoomKeyEventContent, evt.content)
        refused = _refusal(self.requested.get(key.session_id), evt, key)
        if refused:
            log.warning(
                "forwarded room key refused room=%s session=%s sender=%s reason=%s",
                key.room_id,
                key.session_id,
                evt.sender,
                refused,
            )
            return
        known = await self.crypto_store.has_group_session(key.room_id, key.session_id)
        await super()._receive_forwarded_room_key(evt)
        log.info(
            "forwarded room key %s room=%s session=%s sender=%s device=%s",
            "not needed" if known else "accepted",
            key.room_id,
            key.session_id,
            evt.sender,
            evt.sender_device,
        )


def _refusal(
    asked: KeyRequest | None, evt: DecryptedOlmEvent, key: ForwardedRoomKeyEventContent
) -> str | None:
    """Why a forwarded room key is not imported; None when it answers the bot's request."""
    if asked is None:
        return "not-requested"
    if key.room_id != asked.room_id or evt.sender != asked.sender:
        return "wrong-room-or-sender"
    if asked.sender_key is not None and key.sender_key != asked.sender_key:
        return "other-session-creator"
    if evt.sender_key != key.sender_key or key.forwarding_key_chain:
        return "forwarded-by-another-device"
    if key.signing_key != evt.keys.ed25519:
        return "signing-key-mismatch"
    return None


class BotCrypto:
    """The bot's device: decrypts what it receives, encrypts what it sends."""

    def __init__(self, config: Config, crypto_path: Path, pickle_key: str) -> None:
        self.config = config
        self.db = open_crypto_db(
            crypto_path, PgCryptoStore.upgrade_table, logging.getLogger("route_sidecar.crypto.db")
        )
        bot = UserID(config.bot_user_id)
        self.crypto_store = PgCryptoStore(bot, pickle_key, self.db)
        self.state_store = PgStateStore(self.db)
        self.client = Client(
            base_url=config.homeserver.address,
            mxid=bot,
            token=config.appservice.as_token,
            state_store=self.state_store,
            log=logging.getLogger("route_sidecar.crypto.client"),
        )
        self.machine = BotOlmMachine(
            self.client,
            self.crypto_store,
            self.state_store,
            log=logging.getLogger("route_sidecar.crypto.olm"),
        )
        self._send_lock = asyncio.Lock()
        self._asking: dict[SessionID, asyncio.Future[datetime | None]] = {}
        self._awaiting_to_device: set[asyncio.Event] = set()
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
        account = self.machine.account
        if not device_id or account is None or not account.shared:
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
                await self.machine.handle_as_otk_counts(
                    own_otk_counts(counts, self.client.mxid, self.client.device_id)
                )
            except Exception as error:
                log.warning("one-time keys not replenished error=%s", type(error).__name__)
        lists = transaction.get(DEVICE_LISTS_KEY)
        if isinstance(lists, Mapping):
            try:
                await self.machine.handle_as_device_lists(
                    DeviceLists.deserialize(cast(JSON, dict(lists)))
                )
            except Exception as error:
                log.warning("device lists not handled error=%s", type(error).__name__)
        for key in TO_DEVICE_KEYS:
            events = transaction.get(key)
            if not isinstance(events, list):
                continue
            if events:  # (a retried transaction has an empty list)
                for arrived in self._awaiting_to_device:
                    arrived.set()  # to-device messages reach the bot: a key request may go
            for raw in events:
                if isinstance(raw, Mapping) and raw.get("type") == PROBE_TYPE.t:
                    continue
                try:
                    await self.machine.handle_as_to_device_event(
                        cast(ASToDeviceEvent, ASToDeviceEvent.deserialize(raw))
                    )
                except Exception as error:  # one bad to-device event must not stop the rest
                    log.warning("to-device event not handled error=%s", type(error).__name__)
            break

    async def track_state(self, raw: Mapping[str, Any]) -> None:
        """Membership and encryption state of the bot's rooms, for sharing keys."""
        if raw.get("type") not in TRACKED_STATE or "state_key" not in raw:
            return
        try:
            event = StateEvent.deserialize(cast(JSON, dict(raw)))
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
            event = EncryptedEvent.deserialize(cast(JSON, dict(raw)))
        except Exception:
            raise Undecryptable("not an encrypted event the bot understands") from None
        try:
            decrypted = await self.machine.decrypt_megolm_event(event)
        except SessionNotFound as error:
            raise Undecryptable("no room key (yet)", str(error.session_id)) from None
        except DecryptionError as error:
            raise Undecryptable(type(error).__name__) from None
        return cast(dict[str, Any], decrypted.serialize())

    async def wait_for_key(self, room_id: str, session_id: str, timeout: float) -> bool:
        """Whether the session's key is known within `timeout` (a room key, or the answer
        to a request). Looks again every KEY_POLL_SECONDS: mautrix wakes only waiters that
        were registered before the key arrived."""
        room, session = RoomID(room_id), SessionID(session_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = max(0.0, deadline - loop.time())
            step = min(KEY_POLL_SECONDS, left)
            if await self.machine.wait_for_session(room, session, timeout=step):
                return True
            if left <= step:
                return False

    async def request_key(self, raw: Mapping[str, Any], key_wait: float) -> datetime | None:
        """Ask the sender's device for the room key of an event the bot cannot decrypt
        (`m.room_key_request`), once per session and process: a restart asks again, as the
        answer may have been lost with the process. Returns when the request went out
        (events of one session share it); None when it was not: the event names no
        session, the key came anyway within KEY_GRACE_SECONDS (at most `key_wait`), or
        to-device messages did not reach the bot again within DELIVERY_WAIT_SECONDS (the
        answer would be lost). The answer arrives in a later transaction
        (`BotOlmMachine`)."""
        request = _key_request(raw)
        if request is None:
            return None
        session, asked, named = request
        asking = self._asking.get(session)
        if asking is None:
            asking = asyncio.ensure_future(self._ask(session, asked, named, key_wait, raw))
            self._asking[session] = asking
        try:
            asked_at = await asking
        except BaseException:
            if self._asking.get(session) is asking:
                del self._asking[session]  # not asked: a later event may try again
            raise
        if asked_at is None and self._asking.get(session) is asking:
            del self._asking[session]
        return asked_at

    async def _ask(
        self,
        session: SessionID,
        asked: KeyRequest,
        named: DeviceID | None,
        key_wait: float,
        raw: Mapping[str, Any],
    ) -> datetime | None:
        # A room key sent with the message is usually in the same or the next transaction.
        if await self.wait_for_key(asked.room_id, session, min(KEY_GRACE_SECONDS, key_wait)):
            return None
        if not await self._until_to_device_arrives(DELIVERY_WAIT_SECONDS):
            log.warning(
                "room key not requested room=%s event=%s session=%s reason=no-to-device",
                asked.room_id,
                raw.get("event_id"),
                session,
            )
            return None
        device = await self._sender_device(asked, named)
        self.machine.requested[session] = asked  # before the answer can arrive
        await self.machine.request_room_key(
            asked.room_id,
            IdentityKey(asked.sender_key or ""),
            session,
            {asked.sender: [device]},
            timeout=0,  # the caller waits (wait_for_key); no cancellation afterwards
        )
        log.info(
            "room key requested room=%s event=%s session=%s sender=%s device=%s",
            asked.room_id,
            raw.get("event_id"),
            session,
            asked.sender,
            device,
        )
        return datetime.now(UTC)

    async def _until_to_device_arrives(self, timeout: float) -> bool:
        """Whether to-device messages reach the bot (again) within `timeout`. Synapse
        drops those meant for an appservice it has marked down (from a failed push until
        it has pushed everything it queued meanwhile), and the answer to a key request is
        one. So a probe to the bot's own device goes first, again every PROBE_SECONDS;
        once, Synapse is also asked (appservice ping) to push its queue now rather than
        after its backoff."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        arrived = asyncio.Event()
        self._awaiting_to_device.add(arrived)
        pinged = False
        try:
            while True:
                await self.client.send_to_one_device(
                    PROBE_TYPE, self.client.mxid, self.client.device_id, cast(Any, {})
                )
                left = deadline - loop.time()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), max(0.0, min(PROBE_SECONDS, left)))
                if arrived.is_set():
                    return True
                if loop.time() >= deadline:
                    return False
                if not pinged:
                    pinged = True
                    await self._ping("no-to-device")
        finally:
            self._awaiting_to_device.discard(arrived)

    async def _ping(self, why: str) -> None:
        """Ask the homeserver to push what it queued for the side-car now (Synapse retries
        an appservice it has marked down on a successful ping, and marks it up once that
        is through)."""
        path = ApiPath.v1.appservice[self.config.appservice.id].ping
        try:
            await self.client.api.request(Method.POST, path, {})
        except MatrixRequestError as error:  # an older homeserver: its backoff then
            log.warning("appservice ping refused errcode=%s", error.errcode)
        else:
            log.info("appservice pinged reason=%s", why)

    async def _sender_device(self, asked: KeyRequest, named: DeviceID | None) -> DeviceID:
        """The device that made the session (found by its Curve25519 key), else the one
        the event names, else all of the sender's devices."""
        if asked.sender_key is not None:
            device = await self.machine.get_or_fetch_device_by_key(asked.sender, asked.sender_key)
            if device is not None:
                return device.device_id
        return named or DeviceID("*")

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


def _key_request(
    raw: Mapping[str, Any],
) -> tuple[SessionID, KeyRequest, DeviceID | None] | None:
    """The session an encrypted event needs, whom to ask for it, and the device the
    event names; None when the event does not say."""
    content, room_id, sender = raw.get("content"), raw.get("room_id"), raw.get("sender")
    if not isinstance(content, Mapping) or not isinstance(room_id, str):
        return None
    session_id, claimed, named = (content.get(k) for k in ("session_id", "sender_key", "device_id"))
    if not isinstance(session_id, str) or not session_id or not isinstance(sender, str):
        return None
    sender_key = IdentityKey(claimed) if isinstance(claimed, str) and claimed else None
    device = DeviceID(named) if isinstance(named, str) and named else None
    return SessionID(session_id), KeyRequest(RoomID(room_id), UserID(sender), sender_key), device


def own_otk_counts(
    counts: Mapping[str, Any], user_id: UserID, device_id: DeviceID
) -> dict[UserID, dict[DeviceID, DeviceOTKCount]]:
    """The one-time key count of the bot's own device, the only one that has keys to
    replenish. Synapse also lists the user's cross-signing keys, as devices named by
    their public keys; mautrix would log a warning for each of them in every
    transaction."""
    devices = counts.get(user_id)
    count = devices.get(device_id) if isinstance(devices, Mapping) else None
    if not isinstance(count, Mapping):
        return {}
    return {user_id: {device_id: DeviceOTKCount.deserialize(cast(JSON, count))}}
