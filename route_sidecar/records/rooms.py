"""The rooms the bot is in, from its own membership: what makes a claim's room hint one
the side-car knows before any message arrives there (SPEC "The turn key")."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime

from .rows import Rows, to_ms


class RoomRecords(Rows):
    """The bot's membership, one row a room: joined, or left (kicked and banned alike)."""

    async def rooms_by_membership(self) -> tuple[set[str], set[str]]:
        """(rooms joined, rooms left)."""
        rows = await self._all("SELECT room_id, joined FROM rooms")
        return {r[0] for r in rows if r[1]}, {r[0] for r in rows if not r[1]}

    async def set_membership(self, room_id: str, joined: bool, now: datetime) -> None:
        await self.db.execute(
            """INSERT INTO rooms (room_id, joined, changed_at) VALUES (?, ?, ?)
               ON CONFLICT (room_id) DO UPDATE SET joined = excluded.joined,
                   changed_at = excluded.changed_at""",
            (room_id, int(joined), to_ms(now)),
        )

    async def set_joined_rooms(self, joined: Iterable[str], listed_at: datetime) -> None:
        """The homeserver's list as of `listed_at`, the truth: every room in it joined,
        every other left; a membership change recorded since then stands."""
        rooms = sorted(set(joined))
        at = to_ms(listed_at)
        await self.db.execute(
            """UPDATE rooms SET joined = 0, changed_at = ? WHERE joined = 1 AND changed_at < ?
               AND room_id NOT IN (SELECT value FROM json_each(?))""",
            (at, at, json.dumps(rooms)),
        )
        await self.db.executemany(
            """INSERT INTO rooms (room_id, joined, changed_at) VALUES (?, 1, ?)
               ON CONFLICT (room_id) DO UPDATE SET joined = 1, changed_at = excluded.changed_at
               WHERE joined = 0 AND changed_at < excluded.changed_at""",
            [(room_id, at) for room_id in rooms],
        )
