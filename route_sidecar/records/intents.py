"""Intents with their bound turns, and the commands handled (by event id, so a
redelivered command is known)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import aiosqlite

from ..core.commands import Scope, ScopeKind
from ..core.intents import BoundTurn, EndReason, Intent, IntentState
from ..core.turns import TurnKey
from .rows import Rows, datetime_of, from_ms, to_ms


class IntentRecords(Rows):
    """Commands handled, intents and their bound turns."""

    # commands

    async def command_handled(self, event_id: str) -> bool:
        return await self._one("SELECT 1 FROM commands WHERE event_id = ?", (event_id,)) is not None

    async def record_command(
        self, event_id: str, room_id: str, sender: str, intent_id: str | None, now: datetime
    ) -> None:
        await self.db.execute(
            "INSERT INTO commands (event_id, room_id, sender, intent_id, handled_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (event_id, room_id, sender, intent_id, to_ms(now)),
        )

    # intents

    async def save_claim_times(self, turns: Sequence[tuple[str, int, BoundTurn]]) -> None:
        """The last-claim time and claim count of bound turns already stored (by intent id
        and position); never moved back, so an older copy written late changes nothing."""
        await self.db.executemany(
            """UPDATE bound_turns SET last_claim_at = MAX(last_claim_at, ?),
                   claims = MAX(claims, ?)
               WHERE intent_id = ? AND position = ?""",
            [(to_ms(t.last_claim_at), t.claims, intent_id, pos) for intent_id, pos, t in turns],
        )

    async def save_intent(self, intent: Intent) -> None:
        scope = intent.scope
        await self.db.execute(
            """INSERT INTO intents (id, room_id, target, model, scope_kind, scope_turns,
                   scope_seconds, sender, command_event_id, command_thread_id, command_at,
                   created_at, state, question_hash, ended_at, end_reason, closed_at,
                   closed_by, reasks)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (id) DO UPDATE SET state = excluded.state,
                   ended_at = excluded.ended_at, end_reason = excluded.end_reason,
                   closed_at = excluded.closed_at, closed_by = excluded.closed_by""",
            (
                intent.id,
                intent.room_id,
                intent.target,
                intent.model,
                scope.kind.value,
                scope.turns,
                int(scope.duration.total_seconds()) if scope.duration is not None else None,
                intent.sender,
                intent.command_event_id,
                intent.command_thread_id,
                to_ms(intent.command_at),
                to_ms(intent.created_at),
                intent.state.value,
                intent.question_hash,
                to_ms(intent.ended_at) if intent.ended_at is not None else None,
                intent.end_reason.value if intent.end_reason is not None else None,
                to_ms(intent.closed_at) if intent.closed_at is not None else None,
                intent.closed_by.value if intent.closed_by is not None else None,
                int(intent.reasks),
            ),
        )
        for position, turn in enumerate(intent.bound_turns):
            key = turn.key
            await self.db.execute(
                """INSERT INTO bound_turns (intent_id, position, turn_id, message_hash,
                       request_scoped, bound_at, last_claim_at, claims)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (intent_id, position) DO UPDATE SET
                       last_claim_at = MAX(last_claim_at, excluded.last_claim_at),
                       claims = MAX(claims, excluded.claims)""",
                (
                    intent.id,
                    position,
                    key.turn_id if key else None,
                    key.message_hash if key else None,
                    int(key is None),
                    to_ms(turn.bound_at),
                    to_ms(turn.last_claim_at),
                    turn.claims,
                ),
            )

    async def live_intents(self) -> list[Intent]:
        """Every live intent, in two queries (not one per intent: start-up time)."""
        rows = await self._all(
            "SELECT * FROM intents WHERE state IN ('pending', 'active') ORDER BY created_at"
        )
        turns: dict[str, list[aiosqlite.Row]] = {}
        for turn in await self._all(
            """SELECT * FROM bound_turns WHERE intent_id IN
                   (SELECT id FROM intents WHERE state IN ('pending', 'active'))
               ORDER BY intent_id, position"""
        ):
            turns.setdefault(turn["intent_id"], []).append(turn)
        return [_intent_from(row, turns.get(row["id"], [])) for row in rows]

    async def intent(self, intent_id: str) -> Intent | None:
        row = await self._one("SELECT * FROM intents WHERE id = ?", (intent_id,))
        return await self._intent(row) if row else None

    async def intent_by_command(self, event_id: str) -> Intent | None:
        row = await self._one("SELECT * FROM intents WHERE command_event_id = ?", (event_id,))
        return await self._intent(row) if row else None

    async def routes_since(self, sender: str, since: datetime) -> int:
        row = await self._one(
            "SELECT COUNT(*) FROM intents WHERE sender = ? AND created_at > ?",
            (sender, to_ms(since)),
        )
        return int(row[0]) if row else 0

    async def _intent(self, row: aiosqlite.Row) -> Intent:
        turns = await self._all(
            "SELECT * FROM bound_turns WHERE intent_id = ? ORDER BY position", (row["id"],)
        )
        return _intent_from(row, turns)


def _intent_from(row: aiosqlite.Row, turns: Sequence[aiosqlite.Row]) -> Intent:
    kind = ScopeKind(row["scope_kind"])
    seconds = row["scope_seconds"]
    scope = Scope(
        kind, row["scope_turns"], timedelta(seconds=seconds) if seconds is not None else None
    )
    return Intent(
        id=row["id"],
        room_id=row["room_id"],
        target=row["target"],
        model=row["model"],
        scope=scope,
        sender=row["sender"],
        command_event_id=row["command_event_id"],
        command_thread_id=row["command_thread_id"],
        command_at=datetime_of(row["command_at"]),
        created_at=datetime_of(row["created_at"]),
        state=IntentState(row["state"]),
        bound_turns=tuple(
            BoundTurn(
                key=None
                if t["request_scoped"]
                else TurnKey(turn_id=t["turn_id"], message_hash=t["message_hash"]),
                bound_at=datetime_of(t["bound_at"]),
                last_claim_at=datetime_of(t["last_claim_at"]),
                claims=t["claims"],
            )
            for t in turns
        ),
        question_hash=row["question_hash"],
        ended_at=from_ms(row["ended_at"]),
        end_reason=EndReason(row["end_reason"]) if row["end_reason"] else None,
        closed_at=from_ms(row["closed_at"]),
        closed_by=EndReason(row["closed_by"]) if row["closed_by"] else None,
        reasks=bool(row["reasks"]),
    )
