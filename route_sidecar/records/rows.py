"""What every kind of record shares: the connection of the running transaction, its
two read helpers, and times as integer milliseconds (UTC)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import aiosqlite


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def datetime_of(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def from_ms(ms: int | None) -> datetime | None:
    return None if ms is None else datetime_of(ms)


class Rows:
    """The queries of one kind of record, inside the running database transaction."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def _one(self, sql: str, params: Iterable[Any] = ()) -> aiosqlite.Row | None:
        async with self.db.execute(sql, tuple(params)) as cur:
            return await cur.fetchone()

    async def _all(
        self, sql: str, params: Iterable[Any] | Mapping[str, Any] = ()
    ) -> list[aiosqlite.Row]:
        named = isinstance(params, Mapping)  # `:name` parameters
        async with self.db.execute(sql, params if named else tuple(params)) as cur:
            return list(await cur.fetchall())
