"""Matrix events pushed by the homeserver → the few typed values the side-car acts on.

Pure and total: any JSON (wrong types, missing fields, huge strings) gives a value or
None, never an exception. Uses mautrix's id types rather than a parallel set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .describe import INVOCATION_KEY, Invocation

MAX_BODY_CHARS = 65_536
MAX_ID_CHARS = 255
MAX_MENTIONS = 50  # user ids read from `m.mentions`
MEMBERSHIPS = ("join", "leave", "ban")  # the changes that put a user in a room or out of it


@dataclass(frozen=True, slots=True)
class RoomMessage:
    room_id: str
    event_id: str
    sender: str
    body: str
    msgtype: str | None
    thread_root: str | None  # the thread the message is in, if any
    is_edit: bool
    sent_at: datetime
    # An edit's new text (`m.new_content`); `body` is then its `* ` fallback.
    new_body: str | None = None
    # An MSC4391 structured invocation (`org.matrix.msc4391.command`) the message carries.
    invocation: Invocation | None = None


@dataclass(frozen=True, slots=True)
class Invite:
    room_id: str
    sender: str
    invitee: str


@dataclass(frozen=True, slots=True)
class Membership:
    """A user's membership in a room changed (other than an invite): `join`, `leave`
    (left or kicked) or `ban`. The bot's own tells which rooms it is in."""

    room_id: str
    user_id: str
    membership: str


@dataclass(frozen=True, slots=True)
class Redaction:
    room_id: str
    redacted_event_id: str
    sender: str


@dataclass(frozen=True, slots=True)
class PowerLevels:
    """The room's power levels changed: the bot may now describe its command there
    (MSC4391), or no longer."""

    room_id: str


@dataclass(frozen=True, slots=True)
class EncryptedMessage:
    room_id: str
    event_id: str
    sender: str


RoomEvent = RoomMessage | Invite | Membership | Redaction | EncryptedMessage | PowerLevels


class Undecryptable(Exception):
    """An encrypted event the bot cannot read (yet): `session_id` is the key it waits for."""

    def __init__(self, reason: str, session_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.session_id = session_id


def _str(mapping: Mapping[str, Any], key: str) -> str | None:
    """A non-empty identifier string; one no UTF-8 store could hold (a lone surrogate
    from a JSON escape) counts as absent."""
    value = mapping.get(key)
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def parse_event(raw: Any) -> RoomEvent | None:
    """The event as a typed value, or None when the side-car has nothing to do with it."""
    if not isinstance(raw, Mapping):
        return None
    event_type = _str(raw, "type")
    room_id = _str(raw, "room_id")
    sender = _str(raw, "sender")
    event_id = _str(raw, "event_id")
    content = raw.get("content")
    if not (event_type and room_id and sender and event_id and isinstance(content, Mapping)):
        return None
    if event_type == "m.room.member":
        member = _str(raw, "state_key")
        membership = content.get("membership")
        if member and membership == "invite":
            return Invite(room_id, sender, member)
        if member and membership in MEMBERSHIPS:
            return Membership(room_id, member, membership)
        return None
    if event_type == "m.room.power_levels":
        return PowerLevels(room_id) if raw.get("state_key") == "" else None
    if event_type == "m.room.redaction":
        redacts = _str(raw, "redacts") or _str(content, "redacts")
        return Redaction(room_id, redacts, sender) if redacts else None
    if event_type == "m.room.encrypted":
        return EncryptedMessage(room_id, event_id, sender)
    if event_type != "m.room.message":
        return None
    body = content.get("body")
    if not isinstance(body, str):
        return None
    ts = raw.get("origin_server_ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not 0 <= ts < 2**53:
        return None
    try:
        sent_at = datetime.fromtimestamp(ts / 1000, UTC)
    except (OverflowError, ValueError, OSError):  # past year 9999: datetime cannot hold it
        return None
    relates = content.get("m.relates_to")
    relates = relates if isinstance(relates, Mapping) else {}
    is_edit = relates.get("rel_type") == "m.replace" or "m.new_content" in content
    thread_root = _str(relates, "event_id") if relates.get("rel_type") == "m.thread" else None
    msgtype = content.get("msgtype")
    new_content = content.get("m.new_content") if is_edit else None
    new_body = new_content.get("body") if isinstance(new_content, Mapping) else None
    return RoomMessage(
        room_id=room_id,
        event_id=event_id,
        sender=sender,
        body=_clean(body),
        msgtype=msgtype if isinstance(msgtype, str) else None,
        thread_root=thread_root if thread_root else None,
        is_edit=is_edit,
        sent_at=sent_at,
        new_body=_clean(new_body) if isinstance(new_body, str) else None,
        invocation=_invocation(content),
    )


def _invocation(content: Mapping[str, Any]) -> Invocation | None:
    """The message's structured invocation, its arguments as they came; None without one."""
    block = content.get(INVOCATION_KEY)
    if not isinstance(block, Mapping):
        return None
    command = _str(block, "command")
    if command is None:
        return None
    mentions = content.get("m.mentions")
    user_ids = mentions.get("user_ids") if isinstance(mentions, Mapping) else None
    named = user_ids[:MAX_MENTIONS] if isinstance(user_ids, list) else []
    return Invocation(
        command, block.get("arguments"), tuple(u for u in named if isinstance(u, str))
    )


def _clean(body: str) -> str:
    # Lone surrogates (JSON escapes) become "?": the body is hashed and quoted.
    return body[:MAX_BODY_CHARS].encode("utf-8", "replace").decode("utf-8")
