"""The room's last question, for `/route <target> again` (SPEC "Retry").

Kept in memory only, for the intent TTL, never written anywhere: the side-car and the
Hermes plugin each hold one. Pure and standard-library only, so the plugin can load this
file by path inside Hermes's own environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

MAX_ROOMS = 10_000


@dataclass(frozen=True, slots=True)
class Question:
    """A message that asked the agent something: its text and where it came from."""

    text: str
    asked_at: datetime
    event_id: str | None = None
    sender: str | None = None
    thread_id: str | None = None


class LastQuestions:
    """The last question of each room, forgotten once it is older than `ttl`."""

    def __init__(self, ttl: timedelta, max_rooms: int = MAX_ROOMS) -> None:
        self.ttl = ttl
        self.max_rooms = max_rooms
        self._rooms: dict[str, Question] = {}

    def __len__(self) -> int:
        return len(self._rooms)

    def remember(self, room_id: str, question: Question) -> None:
        """Keep `question` as the room's last one, unless a newer one is kept already."""
        kept = self._rooms.get(room_id)
        if kept is not None and kept.asked_at > question.asked_at:
            return
        self._rooms.pop(room_id, None)
        self._rooms[room_id] = question  # re-inserted: the dict stays ordered by use
        while len(self._rooms) > self.max_rooms:
            del self._rooms[next(iter(self._rooms))]  # the room quiet the longest

    def last(self, room_id: str, now: datetime) -> Question | None:
        """The room's last question, or None: none seen, or older than the TTL."""
        question = self._rooms.get(room_id)
        if question is None or now - question.asked_at > self.ttl:
            return None
        return question

    def forget_expired(self, now: datetime) -> None:
        for room_id in [r for r, q in self._rooms.items() if now - q.asked_at > self.ttl]:
            del self._rooms[room_id]
