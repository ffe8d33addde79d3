"""What arrived from the homeserver and how it went: the transactions handled (by id,
so a resent one is known), encrypted events waiting for their room key, and events
whose handling failed (counted, then given up: route_sidecar.appservice)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from .rows import Rows, datetime_of, to_ms


class EventRecords(Rows):
    """Transactions, undecrypted events and event failures."""

    # transactions

    async def has_transaction(self, txn_id: str) -> bool:
        return await self._one("SELECT 1 FROM transactions WHERE txn_id = ?", (txn_id,)) is not None

    async def record_transaction(self, txn_id: str, now: datetime) -> None:
        await self.db.execute(
            "INSERT INTO transactions (txn_id, received_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
            (txn_id, to_ms(now)),
        )

    # encrypted events waiting for their key

    async def hold_undecrypted(
        self, event_id: str, room_id: str, session_id: str, event: dict[str, Any], now: datetime
    ) -> None:
        await self.db.execute(
            """INSERT INTO undecrypted (event_id, room_id, session_id, event, received_at)
               VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING""",
            (event_id, room_id, session_id, json.dumps(event), to_ms(now)),
        )

    async def drop_undecrypted(self, event_id: str) -> None:
        await self.db.execute("DELETE FROM undecrypted WHERE event_id = ?", (event_id,))

    async def undecrypted(self) -> list[tuple[dict[str, Any], str, datetime]]:
        """(event, session id, received at) of every event still waiting, oldest first."""
        rows = await self._all("SELECT * FROM undecrypted ORDER BY received_at")
        return [
            (json.loads(row["event"]), row["session_id"], datetime_of(row["received_at"]))
            for row in rows
        ]

    # events whose handling failed (route_sidecar.appservice)

    async def count_event_failure(self, event_key: str, room_id: str | None, now: datetime) -> int:
        """One more failed attempt at an event; how many there have been."""
        row = await self._one(
            """INSERT INTO event_failures (event_key, room_id, attempts, failed_at)
               VALUES (?, ?, 1, ?) ON CONFLICT (event_key) DO UPDATE SET
                   attempts = event_failures.attempts + 1, failed_at = excluded.failed_at
               RETURNING attempts""",
            (event_key, room_id, to_ms(now)),
        )
        assert row is not None
        return int(row[0])

    async def give_up_event(self, event_key: str, reference: str, now: datetime) -> None:
        await self.db.execute(
            "UPDATE event_failures SET given_up_at = ?, reference = ? WHERE event_key = ?",
            (to_ms(now), reference, event_key),
        )

    async def given_up_events(self) -> dict[str, str]:
        """The events given up, by key, with their reference."""
        rows = await self._all(
            "SELECT event_key, reference FROM event_failures WHERE given_up_at IS NOT NULL"
        )
        return {row[0]: row[1] for row in rows}
