"""The outbox's rows: room events owed (replies, receipts, edits, reactions), queued in
the same transaction as the change they show, sent and marked by route_sidecar.matrix."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from ..outbox import Effect, EffectKind, PendingEffect
from .rows import Rows, to_ms


class EffectRecords(Rows):
    """Room events owed, and what became of them."""

    async def add_effect(self, effect: Effect, now: datetime) -> bool:
        """Queue a room event; False when an effect with this key is queued already."""
        cur = await self.db.execute(
            """INSERT INTO effects (key, room_id, event_type, content, edits, created_at)
               VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING""",
            (
                effect.key,
                effect.room_id,
                effect.event_type,
                json.dumps(effect.content),
                effect.edits,
                to_ms(now),
            ),
        )
        return cur.rowcount > 0

    async def hold_effect(self, effect: Effect, now: datetime, not_before: datetime) -> bool:
        """Queue a room event to be sent at `not_before`, or move an unsent one with this
        key to that time with the new content. False: this key was sent already."""
        cur = await self.db.execute(
            """INSERT INTO effects (key, room_id, event_type, content, created_at, not_before)
               VALUES (?, ?, ?, ?, ?, ?)
               ON CONFLICT (key) DO UPDATE SET content = excluded.content,
                   not_before = excluded.not_before
               WHERE effects.event_id IS NULL AND effects.failed = 0""",
            (
                effect.key,
                effect.room_id,
                effect.event_type,
                json.dumps(effect.content),
                to_ms(now),
                to_ms(not_before),
            ),
        )
        return cur.rowcount > 0

    async def drop_unsent_effect(self, key: str) -> bool:
        cur = await self.db.execute(
            "DELETE FROM effects WHERE key = ? AND event_id IS NULL", (key,)
        )
        return cur.rowcount > 0

    async def held_effects(self, kind: EffectKind) -> list[str]:
        """The keys of unsent effects of this kind still held back."""
        key_prefix = f"{kind}:"
        rows = await self._all(
            """SELECT key FROM effects WHERE event_id IS NULL AND failed = 0
               AND not_before IS NOT NULL AND substr(key, 1, ?) = ?""",
            (len(key_prefix), key_prefix),
        )
        return [str(row[0]) for row in rows]

    async def replace_unsent_effect(self, key: str, content: dict[str, Any]) -> bool:
        cur = await self.db.execute(
            "UPDATE effects SET content = ? WHERE key = ? AND event_id IS NULL",
            (json.dumps(content), key),
        )
        return cur.rowcount > 0

    async def unsent_effects(self, now: datetime, limit: int = 50) -> list[PendingEffect]:
        """Effects due (not held back past `now`), oldest first."""
        rows = await self._all(
            """SELECT id, key, room_id, event_type, content, edits, attempts FROM effects
               WHERE event_id IS NULL AND failed = 0
               AND (not_before IS NULL OR not_before <= ?) ORDER BY id LIMIT ?""",
            (to_ms(now), limit),
        )
        return [
            PendingEffect(
                id=row["id"],
                key=row["key"],
                room_id=row["room_id"],
                event_type=row["event_type"],
                content=row["content"],
                edits=row["edits"],
                attempts=row["attempts"],
            )
            for row in rows
        ]

    async def effect_event_id(self, key: str) -> str | None:
        row = await self._one("SELECT event_id FROM effects WHERE key = ?", (key,))
        return row[0] if row else None

    async def latest_effect(self, key_prefix: str) -> tuple[str, dict[str, Any], bool] | None:
        """The newest effect whose key starts with `key_prefix`: (key, content, sent)."""
        row = await self._one(
            """SELECT key, content, event_id IS NOT NULL FROM effects
               WHERE key >= ? AND key < ? ORDER BY id DESC LIMIT 1""",
            (key_prefix, key_prefix + "\U0010ffff"),
        )
        if row is None:
            return None
        return row[0], json.loads(row[1]), bool(row[2])

    async def effect_exists(self, key: str) -> bool:
        return await self._one("SELECT 1 FROM effects WHERE key = ?", (key,)) is not None

    async def mark_effect_sent(self, effect_id: int, event_id: str) -> str | None:
        """Record the event an effect became; returns the content stored for it now (a
        later outcome may have replaced it while it was being sent)."""
        await self.db.execute(
            "UPDATE effects SET event_id = ?, attempts = attempts + 1 WHERE id = ?",
            (event_id, effect_id),
        )
        row = await self._one("SELECT content FROM effects WHERE id = ?", (effect_id,))
        return str(row[0]) if row is not None else None

    async def mark_effect_attempt(self, effect_id: int, give_up: bool) -> None:
        await self.db.execute(
            "UPDATE effects SET attempts = attempts + 1, failed = ? WHERE id = ?",
            (int(give_up), effect_id),
        )
