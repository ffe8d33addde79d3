"""The live intents in memory, by room: written through to SQLite by the service and
rebuilt at start, so a claim for a room with nothing set never waits for the database.
A room holds its current intent and, for as long as their last turns are answered,
intents a newer command closed (`intents.cancel`), oldest first.

Most claims are later calls of a turn already bound, and such a call changes only that
turn's last-claim time and count. So each room keeps its *open turn* here (the bound
turn as of its latest call, and whose intent it is) apart from the intent, and the two
are folded together when anything reads the room: a call of a turn copies no intent.
No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from .intents import (
    BoundTurn,
    ClaimAnswer,
    Intent,
    Timing,
    continue_turn,
    current_of,
    with_turn,
)
from .turns import TurnKey


@dataclass(slots=True)
class OpenTurn:
    """A room's bound turn as of its latest call, not yet folded into its intent."""

    intent_id: str
    position: int  # in the intent's bound turns
    turn: BoundTurn
    # What the service answered for this turn, and until when that answer holds (its own
    # cache: it goes when the turn does, and the turn goes whenever the intent changes).
    answer: tuple[datetime, ClaimAnswer] | None = None


class LiveIntents:
    def __init__(self, intents: Iterable[Intent] = ()) -> None:
        self._rooms: dict[str, list[Intent]] = {}
        for intent in sorted(intents, key=lambda i: i.created_at):
            self._rooms.setdefault(intent.room_id, []).append(intent)
        self._open: dict[str, OpenTurn] = {}
        self._unsaved: set[str] = set()  # rooms with a call not yet written to SQLite

    def __len__(self) -> int:
        return sum(len(intents) for intents in self._rooms.values())

    def __bool__(self) -> bool:
        """Whether anything is live anywhere (without counting: `len` walks every room)."""
        return bool(self._rooms)

    def __contains__(self, room_id: object) -> bool:
        """Whether anything is live in the room."""
        return room_id in self._rooms

    def room(self, room_id: str) -> tuple[Intent, ...]:
        """The room's live intents, oldest first, with its open turn's latest call in."""
        intents = self._rooms.get(room_id)
        if intents is None:
            return ()
        open_turn = self._open.get(room_id)
        if open_turn is not None:
            for index, intent in enumerate(intents):
                if intent.id == open_turn.intent_id:
                    if intent.bound_turns[open_turn.position] is not open_turn.turn:
                        # Folded once; the open turn stays.
                        intents[index] = with_turn(intent, open_turn.position, open_turn.turn)
                    break
        return tuple(intents)

    def current(self, room_id: str) -> Intent | None:
        """The room's current intent (the newest that a new turn may bind), if any."""
        return current_of(self.room(room_id))

    def intent(self, room_id: str, intent_id: str) -> Intent | None:
        return next((i for i in self.room(room_id) if i.id == intent_id), None)

    def values(self) -> list[Intent]:
        return [intent for room_id in list(self._rooms) for intent in self.room(room_id)]

    def set(self, intent: Intent) -> None:
        """A new or changed live intent (the service has written it)."""
        intents = self._rooms.setdefault(intent.room_id, [])
        self._drop_open_turn(intent.room_id, intent.id)
        for index, known in enumerate(intents):
            if known.id == intent.id:
                intents[index] = intent
                return
        intents.append(intent)

    def pop(self, intent: Intent) -> None:
        """An intent that is live no more."""
        intents = self._rooms.get(intent.room_id)
        if intents is None:
            return
        self.room(intent.room_id)  # fold the open turn of the intents that stay
        self._drop_open_turn(intent.room_id, intent.id)
        intents[:] = [known for known in intents if known.id != intent.id]
        if not intents:
            del self._rooms[intent.room_id]
            self._unsaved.discard(intent.room_id)

    def continue_turn(
        self, room_id: str, key: TurnKey | None, now: datetime, timing: Timing
    ) -> OpenTurn | None:
        """A later call of a bound turn that is still open, counted; None when the call
        is not one (`intents.continue_turn` decides), and then nothing changes."""
        open_turn = self._open.get(room_id)
        if open_turn is not None and open_turn.turn.key == key:
            # Its intent has not changed since this turn's first call here (any change
            # drops the open turn), so it is the turn `continue_turn` would pick.
            called = open_turn.turn.called(now, timing)
            if called is None:
                return None
            open_turn.turn = called
        else:
            intents = self._rooms.get(room_id, [])
            self.room(room_id)  # folds the room's other open turn, if any
            for index in range(len(intents) - 1, -1, -1):
                claimed = continue_turn(intents[index], key, now, timing)
                if claimed is not None and claimed.turn_position is not None:
                    break
            else:
                return None
            position = claimed.turn_position
            intents[index] = claimed.intent
            open_turn = OpenTurn(claimed.intent.id, position, claimed.intent.bound_turns[position])
            self._open[room_id] = open_turn
        self._unsaved.add(room_id)
        return open_turn

    def take_unsaved(self) -> list[Intent]:
        """The intents of rooms with calls not yet written, once: the caller writes them."""
        rooms, self._unsaved = self._unsaved, set()
        return [intent for room_id in rooms for intent in self.room(room_id)]

    def _drop_open_turn(self, room_id: str, intent_id: str) -> None:
        open_turn = self._open.get(room_id)
        if open_turn is not None and open_turn.intent_id == intent_id:
            self.room(room_id)  # fold it first: the turn's latest call is kept
            del self._open[room_id]
