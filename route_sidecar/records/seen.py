"""The room messages the side-car saw: what a claim's turn is matched against (by
thread and message hash), and what a claim without a room resolves its room from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

import aiosqlite

from ..core.turns import SeenMessage, TurnKey
from .rows import Rows, datetime_of, to_ms


class SeenRecords(Rows):
    """Messages seen, with the hashes of their other texts."""

    async def add_seen(self, message: SeenMessage) -> None:
        await self.add_seen_many([message])

    async def add_seen_many(self, messages: Sequence[SeenMessage]) -> None:
        await self.db.executemany(
            """INSERT INTO seen_messages (event_id, room_id, thread_id, sent_at, message_hash,
                   is_command, sender) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING""",
            [
                (
                    m.event_id,
                    m.room_id,
                    m.thread_id,
                    to_ms(m.sent_at),
                    m.message_hash,
                    int(m.is_command),
                    m.sender,
                )
                for m in messages
            ],
        )
        others = [(m.event_id, h) for m in messages for h in m.other_hashes if h != m.message_hash]
        if others:
            await self.db.executemany(
                "INSERT OR IGNORE INTO seen_hashes (event_id, message_hash) VALUES (?, ?)", others
            )

    async def seen_for_turn(self, room_id: str, key: TurnKey) -> list[SeenMessage]:
        """The messages a turn may answer: with its hash (as their text or one of their
        other texts, then shown with that hash), its event id or its thread."""
        rows = await self._all(
            """SELECT event_id, room_id, thread_id, sent_at, is_command, sender,
                   CASE WHEN message_hash IS NOT :hash AND event_id IN
                       (SELECT event_id FROM seen_hashes WHERE message_hash = :hash)
                   THEN :hash ELSE message_hash END AS message_hash
               FROM seen_messages WHERE room_id = :room AND
                   (message_hash = :hash OR event_id = :turn OR thread_id = :turn OR event_id IN
                       (SELECT event_id FROM seen_hashes WHERE message_hash = :hash))
               ORDER BY sent_at DESC LIMIT 200""",
            {"room": room_id, "hash": key.message_hash, "turn": key.turn_id},
        )
        return [_seen(row) for row in rows]

    async def recent_arrivals(self, limit: int) -> list[tuple[str, str, str | None]]:
        """(room, event id, thread root) of the last messages seen, oldest first."""
        rows = await self._all(
            """SELECT room_id, event_id, thread_id FROM seen_messages
               ORDER BY sent_at DESC LIMIT ?""",
            (limit,),
        )
        return [(row[0], row[1], row[2]) for row in reversed(rows)]

    async def recent_seen(self, limit: int) -> list[SeenMessage]:
        """The last messages seen that a turn may answer, with their other texts' hashes,
        oldest first (who asked them is kept in memory: route_sidecar/arrivals.py)."""
        rows = await self._all(
            """SELECT m.event_id, m.room_id, m.thread_id, m.sent_at, m.message_hash,
                   m.is_command, m.sender,
                   (SELECT group_concat(h.message_hash) FROM seen_hashes h
                    WHERE h.event_id = m.event_id) AS other_hashes
               FROM seen_messages m WHERE m.is_command = 0 AND m.sender IS NOT NULL
               ORDER BY m.sent_at DESC LIMIT ?""",
            (limit,),
        )
        return [
            replace(
                _seen(row),
                other_hashes=tuple(row["other_hashes"].split(",")) if row["other_hashes"] else (),
            )
            for row in reversed(rows)
        ]

    async def rooms_with_hash(self, message_hash: str) -> list[str]:
        """Up to two rooms where a message with this text (or other text) was seen."""
        rows = await self._all(
            """SELECT room_id FROM seen_messages WHERE message_hash = :hash
               UNION SELECT room_id FROM seen_messages WHERE event_id IN
                   (SELECT event_id FROM seen_hashes WHERE message_hash = :hash)
               LIMIT 2""",
            {"hash": message_hash},
        )
        return [row[0] for row in rows]

    async def forget_seen_before(self, before: datetime) -> None:
        await self.db.execute("DELETE FROM seen_messages WHERE sent_at < ?", (to_ms(before),))


def _seen(row: aiosqlite.Row) -> SeenMessage:
    return SeenMessage(
        room_id=row["room_id"],
        event_id=row["event_id"],
        thread_id=row["thread_id"],
        sent_at=datetime_of(row["sent_at"]),
        message_hash=row["message_hash"],
        is_command=bool(row["is_command"]),
        sender=row["sender"],
    )
