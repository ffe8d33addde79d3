"""A Matrix user with a real end-to-end encrypting client, the way Element acts for a person
in an encrypted room: its own device and Olm account, a background /sync for to-device room
keys, device lists and one-time key counts, Megolm for what it sends, and a timeline of
what it decrypted. Used by the end-to-end tests of encrypted rooms.

Same shape as `demo.matrix_user.MatrixUser` (create_room, join, say, events, wait_for,
wait_reply, close), so `is_bot_reply_to`, `edits_of`, `reactions_on` and `in_thread` work
on its events. Every event carries `"encrypted"`: whether it arrived as `m.room.encrypted`;
one that could not be decrypted keeps `type: m.room.encrypted` and has `"decryption_error"`.

It answers room key requests (`m.room_key_request`) as Element does: see
`ElementLikeMachine`.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import ClientSession
from mautrix.client import Client, InternalEventType
from mautrix.client.state_store import MemoryStateStore
from mautrix.crypto import MemoryCryptoStore, OlmMachine
from mautrix.crypto.key_share import RejectKeyShare
from mautrix.crypto.sessions import InboundGroupSession, OutboundGroupSession
from mautrix.crypto.store import StateStore as CryptoStateStore
from mautrix.errors import MNotFound, SessionNotFound
from mautrix.types import (
    JSON,
    CrossSigner,
    CrossSigningUsage,
    DeviceID,
    DeviceIdentity,
    EncryptedEvent,
    EncryptionAlgorithm,
    EventFilter,
    EventID,
    EventType,
    Filter,
    ForwardedRoomKeyEventContent,
    IdentityKey,
    Membership,
    MemberStateEventContent,
    RequestedKeyInfo,
    RoomCreatePreset,
    RoomEncryptionStateEventContent,
    RoomEventFilter,
    RoomFilter,
    RoomID,
    SessionID,
    SigningKey,
    TOFUSigningKey,
    TrustState,
    UserID,
)
from mautrix.util.logging import TraceLogger  # noqa: F401 (mautrix's loggers need .trace)

from demo.matrix_user import BOT, is_bot_reply_to, text_content

__all__ = ["BOT", "ElementLikeMachine", "EncryptedUser"]

Event = dict[str, Any]

# Request bodies are logged at DEBUG (message text in plain rooms): keep them out of logs.
_http_log = logging.getLogger("mau.demo.encrypted_user.http")
_http_log.setLevel(logging.WARNING)
_crypto_log = logging.getLogger("mau.demo.encrypted_user.crypto")
_crypto_log.setLevel(logging.INFO)


def _not_about_cross_signing(record: logging.LogRecord) -> bool:
    # Element's users and the bot have no cross-signing keys: mautrix warns on every message.
    return "cross-sign" not in record.getMessage()


_crypto_log.addFilter(_not_about_cross_signing)

_SYNC_FILTER = Filter(
    presence=EventFilter(not_types=[EventType.find("*")]),
    room=RoomFilter(timeline=RoomEventFilter(limit=100)),
)


class _MemoryCryptoStore(MemoryCryptoStore):
    """mautrix 0.21's MemoryCryptoStore fails when a user's cross-signing keys are fetched a
    second time (it assigns to a NamedTuple; `drop_signatures_by_key` takes `len(None)`),
    which the bot's restarts cause (each one is a device-list change for its users)."""

    async def put_cross_signing_key(
        self, user_id: UserID, usage: CrossSigningUsage, key: SigningKey
    ) -> None:
        current = self._cross_signing_keys.setdefault(user_id, {}).get(usage)
        first = current.first if current is not None else key
        self._cross_signing_keys[user_id][usage] = TOFUSigningKey(key=key, first=first)

    async def drop_signatures_by_key(self, signer: CrossSigner) -> int:
        return len(self._signatures.pop(signer, {}))


class _CryptoStateStore(MemoryStateStore, CryptoStateStore):  # type: ignore[misc]
    """MemoryStateStore lacks `find_shared_rooms`, which OlmMachine calls whenever a user's
    device list changes (also the first time it fetches one)."""

    async def find_shared_rooms(self, user_id: UserID) -> list[RoomID]:
        return [
            room_id
            for room_id, members in self.members.items()
            if self.encryption.get(room_id) is not None
            and user_id in members
            and members[user_id].membership in (Membership.JOIN, Membership.INVITE)
        ]


@dataclass(frozen=True, slots=True)
class _ShareInfo:
    """What Element's outbound session records per device it sent the room key to."""

    identity_key: IdentityKey  # the device's Curve25519 key then
    message_index: int  # the session's next message index then


class ElementLikeMachine(OlmMachine):
    """mautrix's OlmMachine, answering room key requests as Element does (matrix-rust-sdk,
    `GossipMachine::should_share_key` in crates/matrix-sdk-crypto/src/gossiping/machine.rs;
    Element Web builds it with `automatic-room-key-forwarding` and leaves forwarding on,
    turning off only its own requests: matrix-js-sdk src/rust-crypto/index.ts):

    - the user's own verified device (cross-signed by a trusted identity, or verified
      locally) gets the whole session, from its first known index;
    - any other device, another user's too, gets it only if the session is the room's
      current outbound session and it was shared with that very device (same Curve25519
      key as now), from the message index at which it was shared: what that device could
      read anyway;
    - everything else is refused silently (no `m.room_key.withheld`).

    mautrix alone answers the user's own devices only, and from the first known index.
    `room_key_forwarding_enabled` is Element's `OlmMachine.roomKeyForwardingEnabled`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.room_key_forwarding_enabled = True
        self.shared: dict[SessionID, dict[tuple[UserID, DeviceID], _ShareInfo]] = {}
        self.forwarded: list[tuple[UserID, DeviceID, SessionID]] = []  # requests answered

    async def _encrypt_and_share_group_session(
        self, session: OutboundGroupSession, olm_sessions: Any
    ) -> None:
        shares = self.shared.setdefault(SessionID(session.id), {})
        for user_id, devices in olm_sessions.items():
            for device_id, (_, device) in devices.items():
                shares[(user_id, device_id)] = _ShareInfo(
                    device.identity_key, session.message_index
                )
        await super()._encrypt_and_share_group_session(session, olm_sessions)

    async def _handle_room_key_request(
        self, device: DeviceIdentity, request: RequestedKeyInfo
    ) -> None:
        if not self.room_key_forwarding_enabled:
            raise RejectKeyShare("room key forwarding is off", code=None)
        session = await self.crypto_store.get_group_session(request.room_id, request.session_id)
        if session is None:
            raise RejectKeyShare("no such session", code=None)
        first = max(await self._shared_from(device, session), session.first_known_index)
        content = ForwardedRoomKeyEventContent(
            algorithm=EncryptionAlgorithm.MEGOLM_V1,
            room_id=session.room_id,
            session_id=SessionID(session.id),
            session_key=session.export_session(first),
            sender_key=session.sender_key,
            forwarding_key_chain=[str(key) for key in session.forwarding_chain],
            signing_key=session.signing_key,
        )
        await self.send_encrypted_to_device(device, EventType.FORWARDED_ROOM_KEY, content)
        self.forwarded.append((device.user_id, device.device_id, SessionID(session.id)))

    async def _shared_from(self, device: DeviceIdentity, session: InboundGroupSession) -> int:
        """The first message index `device` may have (`should_share_key`), or RejectKeyShare."""
        own = device.user_id == self.client.mxid
        if own and await self.resolve_trust(device) >= TrustState.CROSS_SIGNED_TRUSTED:
            return int(session.first_known_index)
        outbound = await self.crypto_store.get_outbound_group_session(session.room_id)
        if outbound is None or outbound.id != session.id:
            raise RejectKeyShare("not the room's current outbound session", code=None)
        share = self.shared.get(SessionID(session.id), {}).get((device.user_id, device.device_id))
        if share is None:
            raise RejectKeyShare("session not shared with that device", code=None)
        if share.identity_key != device.identity_key:
            raise RejectKeyShare("the device's Curve25519 key changed", code=None)
        return share.message_index


class EncryptedUser:
    """A person in Element in (possibly) encrypted rooms: sends encrypted when the room is,
    reads what others send, decrypted. Build with `login` or `from_session`."""

    def __init__(self, client: Client, crypto: ElementLikeMachine, key_wait: float) -> None:
        self.client = client
        self.crypto = crypto
        self.key_wait = key_wait  # how long an event may wait for its room key before erroring
        self._timelines: dict[str, list[Event]] = {}
        self._seen: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._room_locks: dict[str, asyncio.Lock] = {}
        self._synced = asyncio.Event()
        self._sync_error: BaseException | None = None

    # ------------------------------------------------------------------ building

    @classmethod
    async def login(
        cls,
        hs_url: str,
        user: str,
        password: str,
        device_id: str | None = None,
        key_wait: float = 10.0,
    ) -> EncryptedUser:
        """Password login, creating a device (named `device_id` if given: it must be new on
        this homeserver, since the Olm account lives in memory)."""
        client = cls._client(hs_url, "", "")
        await client.login(
            identifier=UserID(user),
            password=password,
            device_id=device_id,
            device_name="route-sidecar test (encrypted)",
            store_access_token=True,
        )
        return await cls._start(client, key_wait)

    @classmethod
    async def from_session(
        cls, hs_url: str, session: dict[str, Any], key_wait: float = 10.0
    ) -> EncryptedUser:
        """From a fresh login or registration response (`user_id`, `access_token`,
        `device_id`), e.g. what `local_synapse.register_user` returns."""
        client = cls._client(hs_url, session["user_id"], session["access_token"])
        client.device_id = session["device_id"]
        return await cls._start(client, key_wait)

    @staticmethod
    def _client(hs_url: str, user_id: str, token: str) -> Client:
        return Client(
            mxid=UserID(user_id),
            base_url=hs_url,
            token=token,
            client_session=ClientSession(),
            log=_http_log,
            state_store=_CryptoStateStore(),
            sync_store=None,
        )

    @classmethod
    async def _start(cls, client: Client, key_wait: float) -> EncryptedUser:
        store = _MemoryCryptoStore(client.mxid, "route-sidecar-test")
        await store.put_device_id(client.device_id)
        crypto = ElementLikeMachine(client, store, client.state_store, log=_crypto_log)
        # Element's defaults: room keys go to unverified devices (the bot's device is one)
        # and are accepted from them; key requests are answered as ElementLikeMachine says.
        crypto.send_keys_min_trust = TrustState.UNVERIFIED
        await crypto.load()
        await crypto.share_keys()  # device keys and one-time keys, before anyone asks
        user = cls(client, crypto, key_wait)
        client.add_event_handler(InternalEventType.SYNC_SUCCESSFUL, user._on_sync, wait_sync=True)
        client.add_event_handler(InternalEventType.SYNC_STOPPED, user._on_sync_stopped)
        client.start(_SYNC_FILTER)
        await asyncio.wait_for(user._synced.wait(), 30)
        return user

    @property
    def user_id(self) -> str:
        return self.client.mxid

    @property
    def device_id(self) -> str:
        return self.client.device_id

    @property
    def token(self) -> str:
        return self.client.api.token

    # ------------------------------------------------------------------ rooms

    async def create_room(
        self, invite: list[str], name: str = "route test", encrypted: bool = True
    ) -> str:
        initial_state = []
        if encrypted:
            content = {"algorithm": EncryptionAlgorithm.MEGOLM_V1.value}
            initial_state.append({"type": "m.room.encryption", "state_key": "", "content": content})
        return await self.client.create_room(
            preset=RoomCreatePreset.PRIVATE,
            name=name,
            invitees=[UserID(u) for u in invite],
            initial_state=initial_state,
        )

    async def enable_encryption(self, room_id: str) -> str:
        """Turn encryption on in a plain room, as Element's room settings do."""
        content = RoomEncryptionStateEventContent(algorithm=EncryptionAlgorithm.MEGOLM_V1)
        return await self.client.send_state_event(
            RoomID(room_id), EventType.ROOM_ENCRYPTION, content
        )

    async def invite(self, room_id: str, user_id: str) -> None:
        await self.client.invite_user(RoomID(room_id), UserID(user_id))

    async def join(self, room_id: str) -> None:
        await self.client.join_room(RoomID(room_id))

    async def members(self, room_id: str) -> dict[str, str]:
        return {
            e.state_key: cast(MemberStateEventContent, e.content).membership.value
            for e in await self.client.get_members(RoomID(room_id))
        }

    async def is_encrypted(self, room_id: str) -> bool:
        """Asks the server unless already known: a message must never go out in the clear
        because this client's /sync has not caught up with `m.room.encryption` yet."""
        store = self.client.state_store
        assert store is not None  # given to the client in _client
        if await store.is_encrypted(RoomID(room_id)):
            return True  # encryption cannot be turned off
        try:
            content = await self.client.get_state_event(RoomID(room_id), EventType.ROOM_ENCRYPTION)
        except MNotFound:
            return False
        await store.set_encryption_info(
            RoomID(room_id), cast(RoomEncryptionStateEventContent, content)
        )
        return True

    # ------------------------------------------------------------------ sending

    async def send(
        self, room_id: str, content: dict[str, Any], event_type: str = "m.room.message"
    ) -> str:
        """Send a message event, Megolm-encrypted when the room is encrypted (reactions too,
        as Element does)."""
        room = RoomID(room_id)
        evt_type = EventType.find(event_type, t_class=EventType.Class.MESSAGE)
        async with self._room_locks.setdefault(room_id, asyncio.Lock()):
            if not await self.is_encrypted(room_id):
                return await self.client.send_message_event(room, evt_type, cast(JSON, content))
            await self._share_room_key(room)
            encrypted = await self.crypto.encrypt_megolm_event(room, evt_type, content)
            return await self.client.send_message_event(
                room, EventType.ROOM_ENCRYPTED, cast(JSON, encrypted), disable_encryption=True
            )

    async def say(
        self, room_id: str, body: str, thread_root: str | None = None, msgtype: str = "m.text"
    ) -> str:
        return await self.send(room_id, text_content(body, thread_root, msgtype))

    async def react(self, room_id: str, event_id: str, key: str) -> str:
        relates = {"rel_type": "m.annotation", "event_id": event_id, "key": key}
        return await self.send(room_id, {"m.relates_to": relates}, "m.reaction")

    async def redact(self, room_id: str, event_id: str) -> None:
        await self.client.redact(RoomID(room_id), EventID(event_id))

    async def _share_room_key(self, room_id: RoomID) -> None:
        """Make sure every device of every joined or invited member has the room key, as
        Element does before each send: a new session when there is none (or it expired or
        a member left), otherwise the current one, sent only to devices that lack it."""
        members = await self.client.get_members(room_id)
        users = [
            UserID(e.state_key)
            for e in members
            if cast(MemberStateEventContent, e.content).membership
            in (Membership.JOIN, Membership.INVITE)
        ]
        session = await self.crypto.crypto_store.get_outbound_group_session(room_id)
        if session is not None and session.shared and not session.expired:
            if not await self._devices_without_key(session, users):
                return
            session.shared = False  # mautrix shares a shared session only once
        await self.crypto.share_group_session(room_id, users)

    async def _devices_without_key(self, session: Any, users: list[UserID]) -> bool:
        done = session.users_shared_with | session.users_ignored
        for user_id in users:
            devices = await self.crypto.crypto_store.get_devices(user_id)
            if devices is None:
                return True  # never fetched: share_group_session fetches them
            for device_id in devices:
                if (user_id, device_id) not in done and device_id != self.device_id:
                    return True
        return False

    # ------------------------------------------------------------------ reading

    async def _on_sync(self, data: dict[str, Any]) -> None:
        # Runs before mautrix handles the sync (and its to-device room keys): decryptions
        # wait for their key in their own tasks.
        rooms = data["data"].get("rooms", {}).get("join", {})
        for room_id, room in rooms.items():
            timeline = self._timelines.setdefault(room_id, [])
            for raw in room.get("timeline", {}).get("events", []):
                event_id = raw.get("event_id")
                if event_id in self._seen:
                    continue
                self._seen.add(event_id)
                event = copy.deepcopy(raw)
                event["room_id"] = room_id
                event["encrypted"] = raw.get("type") == "m.room.encrypted"
                if event["encrypted"]:
                    event["decryption_pending"] = True
                    self._spawn(self._decrypt(event))
                timeline.append(event)
        self._synced.set()

    async def _on_sync_stopped(self, data: dict[str, Any]) -> None:
        self._sync_error = data.get("error") or RuntimeError("sync stopped")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _decrypt(self, event: Event) -> None:
        """Decrypt `event` in place; flag it as an error after `key_wait` without its room key,
        but keep waiting for a late key (until close)."""
        try:
            encrypted = EncryptedEvent.deserialize(cast(JSON, copy.deepcopy(event)))
        except Exception as err:  # a redacted or malformed event: no ciphertext
            _fail(event, f"not a Megolm event: {type(err).__name__}")
            return
        flag_at = time.monotonic() + self.key_wait
        while True:
            try:
                decrypted = await self.crypto.decrypt_megolm_event(encrypted)
            except SessionNotFound as err:
                if time.monotonic() >= flag_at and "decryption_error" not in event:
                    _fail(event, f"no room key for session {err.session_id}")
                await self.crypto.wait_for_session(encrypted.room_id, err.session_id, timeout=1.0)
                continue
            except Exception as err:
                _fail(event, f"{type(err).__name__}: {err}")
                return
            break
        plain: dict[str, Any] = {
            key: event[key]
            for key in ("event_id", "sender", "room_id", "origin_server_ts", "unsigned")
            if key in event
        }
        plain["type"] = decrypted.type.t
        plain["content"] = decrypted.content.serialize()
        plain["encrypted"] = True
        plain["trust"] = str(decrypted["mautrix"]["trust_state"])
        event.clear()
        event.update(plain)

    async def events(self, room_id: str, limit: int = 100) -> list[Event]:
        """The room as this client saw it since it started, newest first (like /messages
        with dir=b), encrypted events replaced by their decryption."""
        self._raise_if_sync_stopped()
        return [dict(e) for e in reversed(self._timelines.get(room_id, [])[-limit:])]

    async def wait_for(
        self,
        room_id: str,
        predicate: Callable[[Event], bool],
        timeout: float = 15.0,
        what: str = "event",
    ) -> Event:
        deadline = time.monotonic() + timeout
        while True:
            for event in await self.events(room_id, limit=1000):
                if predicate(event):
                    return event
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        failed = [e for e in await self.events(room_id, 1000) if "decryption_error" in e]
        pending = [e for e in await self.events(room_id, 1000) if e.get("decryption_pending")]
        raise AssertionError(
            f"timed out waiting for {what} in {room_id} "
            f"({len(failed)} undecryptable, {len(pending)} waiting for keys)"
        )

    async def bot_replies(self, room_id: str, event_id: str) -> list[Event]:
        return [e for e in await self.events(room_id, 1000) if is_bot_reply_to(e, event_id)]

    async def wait_reply(self, room_id: str, event_id: str, timeout: float = 15.0) -> Event:
        """The bot's reply to a command: its first reply (a turn the command started, as
        `again` does, gets a receipt in reply to the command too, later)."""
        await self.wait_for(
            room_id, lambda e: is_bot_reply_to(e, event_id), timeout, "the bot's reply"
        )
        replies = [e for e in await self.events(room_id) if is_bot_reply_to(e, event_id)]
        return min(replies, key=lambda e: e.get("origin_server_ts", 0))

    def _raise_if_sync_stopped(self) -> None:
        if self._sync_error is not None:
            raise AssertionError(f"{self.user_id}'s sync stopped: {self._sync_error!r}")

    async def close(self) -> None:
        self.client.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.api.session.close()


def _fail(event: Event, reason: str) -> None:
    event.pop("decryption_pending", None)
    event["decryption_error"] = reason
