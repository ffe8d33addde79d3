"""`/route history`: the room's last routed turns and failed turns, with what the
dispatcher really served. Pure: outcome records in, the turns to show out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

HISTORY_LENGTH = 5


@dataclass(frozen=True, slots=True)
class Call:
    """One LLM call as the dispatcher reported it."""

    model: str
    status: str
    latency_ms: int | None


@dataclass(frozen=True, slots=True)
class TurnCall:
    """A reported call without an intent, with the turn it belongs to."""

    turn: str  # TurnKey.ref
    at: datetime
    asker: str | None
    call: Call


@dataclass(frozen=True, slots=True)
class PastTurn:
    """A turn worth showing: routed by an intent, or failed on automatic routing."""

    at: datetime
    calls: tuple[Call, ...]
    who: str | None  # routed: who set the route; failed: who asked the question
    target: str | None = None  # routed only: the intent's target and model
    model: str | None = None
    claims: int = 0

    @property
    def routed(self) -> bool:
        return self.target is not None

    @property
    def failed(self) -> bool:
        """Its calls ended in an error: the last one reported failed."""
        return bool(self.calls) and self.calls[-1].status != "ok"

    @property
    def latency_ms(self) -> int | None:
        known = [c.latency_ms for c in self.calls if c.latency_ms is not None]
        return sum(known) if known else None


def failed_turns(calls: Sequence[TurnCall]) -> list[PastTurn]:
    """Group calls without an intent by turn (in any order; calls at the same time keep
    the order given) and keep the turns whose last call failed, dated by their first."""
    by_turn: dict[str, list[TurnCall]] = {}
    for call in sorted(calls, key=lambda c: c.at):
        by_turn.setdefault(call.turn, []).append(call)
    turns = [
        PastTurn(
            at=group[0].at,
            calls=tuple(c.call for c in group),
            who=next((c.asker for c in group if c.asker), None),
        )
        for group in by_turn.values()
    ]
    return [turn for turn in turns if turn.failed]


def latest(
    routed: Sequence[PastTurn], failed: Sequence[PastTurn], limit: int = HISTORY_LENGTH
) -> list[PastTurn]:
    """The newest `limit` turns of both kinds, newest first."""
    return sorted([*routed, *failed], key=lambda t: t.at, reverse=True)[:limit]
