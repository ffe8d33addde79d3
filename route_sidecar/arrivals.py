"""The rooms the bot is in and the room messages it has received, for the claims that
wait on them and name who asked. In memory; reloaded at start from the rooms and the
messages the store holds (route_sidecar/service.py)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable

from .core.turns import SeenMessage, Turn, message_hash

ARRIVALS_KEPT = 200_000  # event ids and thread roots remembered for claims to wait on
# Event ids and message hashes whose sender is remembered, for a claim's metadata to name
# the asker without a database read (the no-intent claim is the hot path).
ASKERS_KEPT = 50_000
_IN_TWO_ROOMS = ("", "")  # a text seen in more than one room: no room, no asker


class Arrivals:
    """The rooms the bot is in (joined, or where a message arrived since start) and the
    room messages it has received (event ids and thread roots, in memory), and the claims
    waiting for theirs: an agent that syncs can see a message before the homeserver has
    pushed it here, and its first claim must not overtake the `/route` it answers."""

    def __init__(self, limit: int = ARRIVALS_KEPT, askers_kept: int = ASKERS_KEPT) -> None:
        self.limit = limit
        self.askers_kept = askers_kept
        self.rooms: set[str] = set()
        self._ids: dict[str, None] = {}  # insertion-ordered: the oldest go first
        self._waiting: dict[str, asyncio.Event] = {}
        # Event id or message hash → (room, sender) of the latest message with it.
        self._askers: dict[str, tuple[str, str]] = {}

    def joined(self, room_id: str) -> None:
        self.rooms.add(room_id)

    def left(self, room_id: str) -> None:
        self.rooms.discard(room_id)

    def set_rooms(self, joined: Iterable[str], left: Iterable[str]) -> None:
        """The bot's membership as stored: joined rooms are known, left ones forgotten
        (whatever messages arrived there before)."""
        self.rooms.update(joined)
        self.rooms.difference_update(left)

    def add(self, room_id: str, event_id: str, thread_id: str | None) -> None:
        self.rooms.add(room_id)
        for key in (event_id, thread_id):
            if key is None:
                continue
            self._ids.pop(key, None)
            self._ids[key] = None
            waiter = self._waiting.pop(key, None)
            if waiter is not None:
                waiter.set()
        while len(self._ids) > self.limit:
            del self._ids[next(iter(self._ids))]

    def remember_asker(self, message: SeenMessage) -> None:
        """Who sent a message a turn may answer, by its event id and its hashes."""
        if message.sender is None or message.is_command:
            return
        asker = (sys.intern(message.room_id), sys.intern(message.sender))
        self._askers.pop(message.event_id, None)
        self._askers[message.event_id] = asker
        for key in {message.message_hash, *message.other_hashes} - {None}:
            assert key is not None
            before = self._askers.pop(key, None)
            # The same text in two rooms places a call in neither (SPEC "The turn key").
            in_two_rooms = before is not None and before[0] != message.room_id
            self._askers[key] = _IN_TWO_ROOMS if in_two_rooms else asker
        while len(self._askers) > self.askers_kept:
            del self._askers[next(iter(self._askers))]

    @property
    def remembers_askers(self) -> bool:
        return bool(self._askers)

    def asker(self, room_id: str, turn: Turn, salt: bytes) -> str | None:
        """The sender of the turn's message in this room, when it is among the messages
        remembered: by its text's hash first (inside a thread the turn id is shared), then
        by the turn id as an event id. (Every claim asks: no turn key is built for it.)"""
        askers = self._askers
        if turn.last_user_message is not None:
            hashed = message_hash(salt, turn.last_user_message)
            found = askers.get(hashed) if hashed is not None else None
            if found is not None and found[0] == room_id:
                return found[1]
        found = askers.get(turn.turn_id) if turn.turn_id is not None else None
        return found[1] if found is not None and found[0] == room_id else None

    def room_of(self, turn: Turn, salt: bytes) -> str | None:
        """The one room where the turn's text was seen among the messages remembered;
        None when it was seen in none or in several."""
        if not self._askers or turn.last_user_message is None:
            return None
        hashed = message_hash(salt, turn.last_user_message)
        found = self._askers.get(hashed) if hashed is not None else None
        return found[0] or None if found is not None else None

    def awaited(self, turn: Turn) -> str | None:
        """The event a claim waits for: in a room the bot is in, the turn's message (the
        agent's stamp names it; else the turn id) when it has not arrived. None: no wait."""
        awaited = turn.event_id or turn.turn_id
        if (
            awaited is not None
            and awaited.startswith("$")
            and turn.room_id in self.rooms
            and awaited not in self._ids
        ):
            return awaited
        return None

    async def wait(self, turn_id: str, timeout: float) -> bool:
        waiter = self._waiting.setdefault(turn_id, asyncio.Event())
        try:
            await asyncio.wait_for(waiter.wait(), timeout)
            return True
        except TimeoutError:
            # Not coming (a thread older than the bot's memory, an id the agent made up):
            # the turn's other calls do not wait again.
            self._waiting.pop(turn_id, None)
            self._ids[turn_id] = None
            return False
