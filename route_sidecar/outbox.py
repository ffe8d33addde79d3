"""The outbox: every room event the side-car owes (a reply, a receipt, an edit, a
reaction, a leave) is queued as an `Effect` in the same database transaction as the
change that owes it, and sent by route_sidecar/matrix.py, which reads `PendingEffect`s back.
This module is the one place for the kinds of effect, their keys and their rows: a key
names what the event is about, so queueing the same one twice is a no-op (the table's
unique key), and a crash between the change and the send loses nothing.

`Outbox` is what the use cases and the sender share in memory: the wake-up of the
sender, and contents sent from memory and never stored (a reply that quotes a question:
after a restart the stored copy, without the quote, is sent).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

ROOM_MESSAGE = "m.room.message"
REACTION = "m.reaction"


class EffectKind(StrEnum):
    """What an effect is; the first part of its key (and the label of its log lines)."""

    REPLY = "reply"  # the answer to a command
    REACT = "react"  # ✅ on a command when its route takes its first turn
    RECEIPT = "receipt"  # what served a routed turn, edited as more calls land
    ENDED = "ended"  # an edit of a confirmation queued by versions before the account
    ACCOUNT = "account"  # an edit of a confirmation: the route's account as it changes
    UNPICKED = "unpicked"  # the edit of an `again` reply that no turn took
    SUGGEST = "suggest"  # the retry suggestion after a failed turn
    UNDECRYPTABLE = "undecryptable"  # "I could not read your message"
    UNREADABLE = "unreadable"  # an encrypted room while encryption is off
    LEAVE = "route_sidecar.leave"  # `/route leave`: the bot leaves, after its reply


# Notices about what the bot cannot read go out unencrypted: when keys do not reach the
# bot, its encrypted messages may not reach the sender either.
SENT_IN_CLEAR = frozenset({EffectKind.UNDECRYPTABLE, EffectKind.UNREADABLE})


def kind_of(key: str) -> EffectKind | None:
    """The kind a key names; None for a key no version of the side-car writes."""
    prefix = key.split(":", 1)[0]
    return EffectKind(prefix) if prefix in EffectKind.__members__.values() else None


@dataclass(frozen=True, slots=True)
class Effect:
    """A room event to queue. `edits`: the key of the effect whose event this one edits
    (its event id is filled in when that one is sent)."""

    key: str
    room_id: str
    event_type: str
    content: dict[str, Any]
    edits: str | None = None

    @property
    def kind(self) -> EffectKind | None:
        return kind_of(self.key)


@dataclass(frozen=True, slots=True)
class PendingEffect:
    """An outbox row not sent yet, as the store reads it."""

    id: int
    key: str
    room_id: str
    event_type: str
    content: str  # JSON, as stored
    edits: str | None
    attempts: int

    @property
    def kind(self) -> EffectKind | None:
        return kind_of(self.key)

    @property
    def sent_in_clear(self) -> bool:
        return self.kind in SENT_IN_CLEAR


def in_sending_order(pending: list[PendingEffect]) -> list[PendingEffect]:
    """Replies first, then everything else, each oldest first. An edit still waits for
    the event it edits, and a leave for everything before it in its room (the sender)."""
    return sorted(pending, key=lambda effect: (effect.kind is not EffectKind.REPLY, effect.id))


# ---- the keys and effects, one builder per kind ------------------------------------


def reply_key(command_event_id: str) -> str:
    return f"{EffectKind.REPLY}:{command_event_id}"


def reply(command_event_id: str, room_id: str, content: dict[str, Any]) -> Effect:
    return Effect(reply_key(command_event_id), room_id, ROOM_MESSAGE, content)


def leave(command_event_id: str, room_id: str) -> Effect:
    return Effect(f"{EffectKind.LEAVE}:{command_event_id}", room_id, EffectKind.LEAVE, {})


def reaction(intent_id: str, room_id: str, content: dict[str, Any]) -> Effect:
    return Effect(f"{EffectKind.REACT}:{intent_id}", room_id, REACTION, content)


def receipt_key(intent_id: str, position: int | None) -> str:
    return f"{EffectKind.RECEIPT}:{intent_id}:{position}"


def receipt(intent_id: str, position: int | None, room_id: str, content: dict[str, Any]) -> Effect:
    return Effect(receipt_key(intent_id, position), room_id, ROOM_MESSAGE, content)


def receipt_edit(receipt: str, calls: int, room_id: str, content: dict[str, Any]) -> Effect:
    """The edit of a sent receipt, once more calls of its turn have landed."""
    return Effect(f"{receipt}:edit:{calls}", room_id, ROOM_MESSAGE, content, edits=receipt)


def account_prefix(intent_id: str) -> str:
    return f"{EffectKind.ACCOUNT}:{intent_id}:"


def account_number(key: str) -> int:
    """Which edit of its confirmation an account key names (1, 2, ...; its late edit too)."""
    return int(key.split(":")[2])


def account(
    intent_id: str, number: int, command_event_id: str, room_id: str, content: dict[str, Any]
) -> Effect:
    """The `number`th edit of an intent's confirmation: each says what the route did so
    far; the latest one is what the room shows."""
    return Effect(
        f"{account_prefix(intent_id)}{number}",
        room_id,
        ROOM_MESSAGE,
        content,
        edits=reply_key(command_event_id),
    )


def unpicked(
    intent_id: str, command_event_id: str, room_id: str, content: dict[str, Any]
) -> Effect:
    return Effect(
        f"{EffectKind.UNPICKED}:{intent_id}",
        room_id,
        ROOM_MESSAGE,
        content,
        edits=reply_key(command_event_id),
    )


def suggestion_key(room_id: str, turn_ref: str) -> str:
    return f"{EffectKind.SUGGEST}:{room_id}:{turn_ref}"


def suggestion(room_id: str, turn_ref: str, content: dict[str, Any]) -> Effect:
    return Effect(suggestion_key(room_id, turn_ref), room_id, ROOM_MESSAGE, content)


def undecryptable(room_id: str, sender: str, bucket: int, content: dict[str, Any]) -> Effect:
    """One per sender, room and time bucket (route_sidecar.service.UNDECRYPTABLE_NOTICE_EVERY)."""
    key = f"{EffectKind.UNDECRYPTABLE}:{room_id}:{sender}:{bucket}"
    return Effect(key, room_id, ROOM_MESSAGE, content)


def unreadable(room_id: str, content: dict[str, Any]) -> Effect:
    return Effect(f"{EffectKind.UNREADABLE}:{room_id}", room_id, ROOM_MESSAGE, content)


def late_edit(sent: PendingEffect, content: dict[str, Any]) -> Effect:
    """An effect replaced while it was being sent (a receipt's later outcome): what the
    room shows catches up by an edit, of the event it was (or, for an edit, of the event
    that one edited)."""
    edits = sent.edits or sent.key
    return Effect(f"{sent.key}:late-edit", sent.room_id, sent.event_type, content, edits)


class Outbox:
    def __init__(self) -> None:
        self.changed = asyncio.Event()  # set when something is queued: the sender wakes
        # Contents to send instead of the stored ones, by key (they quote a question).
        self.unstored: dict[str, dict[str, Any]] = {}

    def queued(self) -> None:
        self.changed.set()

    def send_from_memory(self, key: str, content: dict[str, Any]) -> None:
        self.unstored[key] = content

    def content_of(self, pending: PendingEffect) -> dict[str, Any]:
        """What to send for a pending effect: the copy in memory, else the stored one."""
        kept = self.unstored.get(pending.key)
        if kept is not None:
            return kept
        content: dict[str, Any] = json.loads(pending.content)
        return content

    def settled(self, key: str) -> None:
        """Sent, or given up: its copy in memory goes."""
        self.unstored.pop(key, None)
