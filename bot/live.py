"""The live intents, one per room, in memory: written through to SQLite by the service
and rebuilt at start, so a claim for a room with nothing set never waits for the
database.

Most claims are later calls of a turn already bound, and such a call changes only that
turn's last-claim time and count. So each room keeps its *open turn* here (the bound
turn as of its latest call) apart from the intent, and the two are folded together when
anything reads the intent: a call of a turn copies no intent. No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import intents as core
from .intents import BoundTurn, Intent, Timing
from .turns import TurnKey


@dataclass(slots=True)
class OpenTurn:
    """A room's bound turn as of its latest call, not yet folded into the intent."""

    position: int  # in the intent's bound turns
    turn: BoundTurn
    # What the service answered for this turn, and until when that answer holds (its own
    # cache: it goes when the turn does, and the turn goes whenever the intent changes).
    answer: Any = None


class LiveIntents:
    def __init__(self, intents: Iterable[Intent] = ()) -> None:
        self._intents: dict[str, Intent] = {intent.room_id: intent for intent in intents}
        self._open: dict[str, OpenTurn] = {}
        self._unsaved: set[str] = set()  # rooms with a call not yet written to SQLite

    def __len__(self) -> int:
        return len(self._intents)

    def __contains__(self, room_id: object) -> bool:
        return room_id in self._intents

    def __getitem__(self, room_id: str) -> Intent:
        intent = self.get(room_id)
        if intent is None:
            raise KeyError(room_id)
        return intent

    def get(self, room_id: str, default: Intent | None = None) -> Intent | None:
        """The room's live intent, with its open turn's latest call in it."""
        intent = self._intents.get(room_id)
        if intent is None:
            return default
        open_turn = self._open.get(room_id)
        if open_turn is not None and intent.bound_turns[open_turn.position] is not open_turn.turn:
            intent = core.with_turn(intent, open_turn.position, open_turn.turn)
            self._intents[room_id] = intent  # folded once; the open turn stays
        return intent

    def values(self) -> list[Intent]:
        return [
            intent for room_id in list(self._intents) if (intent := self.get(room_id)) is not None
        ]

    def set(self, intent: Intent) -> None:
        """A new or changed live intent (the service has written it)."""
        self._intents[intent.room_id] = intent
        self._open.pop(intent.room_id, None)

    def pop(self, room_id: str) -> None:
        self._intents.pop(room_id, None)
        self._open.pop(room_id, None)
        self._unsaved.discard(room_id)

    def continue_turn(
        self, room_id: str, key: TurnKey | None, now: datetime, timing: Timing
    ) -> OpenTurn | None:
        """A later call of a bound turn that is still open, counted; None when the call
        is not one (`intents.continue_turn` decides), and then nothing changes."""
        open_turn = self._open.get(room_id)
        if open_turn is not None and open_turn.turn.key == key:
            # The intent has not changed since this turn's first call here (any change
            # drops the open turn), so it is the turn `continue_turn` would pick.
            called = open_turn.turn.called(now, timing)
            if called is None:
                return None
            open_turn.turn = called
        else:
            intent = self.get(room_id)  # folds the room's other open turn, if any
            claimed = core.continue_turn(intent, key, now, timing) if intent else None
            if claimed is None or claimed.turn_position is None:
                return None
            position = claimed.turn_position
            self._intents[room_id] = claimed.intent
            open_turn = OpenTurn(position, claimed.intent.bound_turns[position])
            self._open[room_id] = open_turn
        self._unsaved.add(room_id)
        return open_turn

    def take_unsaved(self) -> list[Intent]:
        """The intents with calls not yet written, once: the caller writes them."""
        rooms, self._unsaved = self._unsaved, set()
        return [intent for room_id in rooms if (intent := self.get(room_id)) is not None]
