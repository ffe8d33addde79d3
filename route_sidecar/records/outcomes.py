"""What the dispatcher served: each call's outcome, and the turns and calls `/route
history` and the retry suggestions read back."""

from __future__ import annotations

from datetime import datetime

import aiosqlite

from ..core.history import Call, PastTurn, TurnCall
from .rows import Rows, datetime_of, to_ms


class OutcomeRecords(Rows):
    """Outcomes of calls, routed or not."""

    async def add_outcome(
        self,
        *,
        intent_id: str | None,
        position: int | None,
        room_id: str | None,
        turn: str | None,
        asker: str | None,
        model: str,
        status: str,
        latency_ms: int | None,
        detail: str | None,
        now: datetime,
    ) -> None:
        await self.db.execute(
            """INSERT INTO outcomes (intent_id, position, room_id, turn, asker, model, status,
                   latency_ms, detail, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                intent_id,
                position,
                room_id,
                turn,
                asker,
                model,
                status,
                latency_ms,
                detail,
                to_ms(now),
            ),
        )

    async def turn_outcomes(self, intent_id: str, position: int | None) -> list[Call]:
        rows = await self._all(
            "SELECT * FROM outcomes WHERE intent_id = ? AND position IS ? ORDER BY id",
            (intent_id, position),
        )
        return [_call(row) for row in rows]

    async def routed_turns(self, room_id: str, limit: int) -> list[PastTurn]:
        """The room's last turns bound to an intent, newest first, with their calls."""
        rows = await self._all(
            """SELECT b.intent_id, b.position, b.bound_at, b.claims, i.target, i.model, i.sender
               FROM bound_turns b JOIN intents i ON i.id = b.intent_id
               WHERE i.room_id = ? ORDER BY b.bound_at DESC, b.position DESC LIMIT ?""",
            (room_id, limit),
        )
        return [
            PastTurn(
                at=datetime_of(row["bound_at"]),
                calls=tuple(await self.turn_outcomes(row["intent_id"], row["position"])),
                who=row["sender"],
                target=row["target"],
                model=row["model"],
                claims=row["claims"],
            )
            for row in rows
        ]

    async def unrouted_calls(self, room_id: str, limit: int) -> list[TurnCall]:
        """The room's last reported calls without an intent (failures, and the calls that
        followed one in the same turn), oldest first."""
        rows = await self._all(
            """SELECT * FROM outcomes WHERE room_id = ? AND intent_id IS NULL
               AND turn IS NOT NULL ORDER BY id DESC LIMIT ?""",
            (room_id, limit),
        )
        # Oldest first: calls reported in the same millisecond keep their order.
        return [
            TurnCall(row["turn"], datetime_of(row["at"]), row["asker"], _call(row))
            for row in reversed(rows)
        ]


def _call(row: aiosqlite.Row) -> Call:
    return Call(model=row["model"], status=row["status"], latency_ms=row["latency_ms"])
