"""The room messages the side-car has received, for the claims that wait on them. In
memory; reloaded at start from the messages seen (route_sidecar/service.py)."""

from __future__ import annotations

import asyncio

from .core.turns import Turn

ARRIVALS_KEPT = 200_000  # event ids and thread roots remembered for claims to wait on


class Arrivals:
    """The room messages the side-car has received (event ids and thread roots, in
    memory), and the claims waiting for theirs: an agent that syncs can see a message
    before the homeserver has pushed it here, and its first claim must not overtake the
    `/route` it answers."""

    def __init__(self, limit: int = ARRIVALS_KEPT) -> None:
        self.limit = limit
        self.rooms: set[str] = set()
        self._ids: dict[str, None] = {}  # insertion-ordered: the oldest go first
        self._waiting: dict[str, asyncio.Event] = {}

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

    def should_wait(self, turn: Turn) -> bool:
        """A claim in a room the bot is in, for a turn whose message has not arrived."""
        return (
            turn.turn_id is not None
            and turn.turn_id.startswith("$")
            and turn.room_id in self.rooms
            and turn.turn_id not in self._ids
        )

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
