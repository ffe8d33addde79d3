"""The routing state every use case shares, and the one place an intent change is
written: the live intents in memory (route_sidecar/core/live.py, rebuilt from SQLite at start, so a
claim for a room with nothing set never waits for the database), the store behind
them, the lock that makes one writer of intents at a time, and `record_change`, which
writes an intent's new state, keeps the memory true and queues what the room must see
of it. The use cases (room_events.py, claims.py, outcomes.py and the sweep in
service.py) ask the pure core what happens and write it through here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime

from . import outbox
from .arrivals import Arrivals
from .config import Config
from .core import intents, replies
from .core.intents import EndReason, Intent, IntentState, Timing
from .core.live import LiveIntents
from .metrics import Metrics
from .outbox import Outbox
from .store import Store, Tx


class RouteState:
    def __init__(
        self,
        config: Config,
        store: Store,
        salt: bytes,
        metrics: Metrics,
        clock: Callable[[], datetime],
    ) -> None:
        self.config = config
        self.store = store
        self.salt = salt  # of the message hashes (SPEC "The turn key")
        self.metrics = metrics
        self.clock = clock
        self.timing = Timing(config.routing.intent_ttl, config.routing.turn_idle)
        self.prefix = config.routing.prefixes[0]  # the one replies show
        self.live = LiveIntents()
        self.arrivals = Arrivals()
        self.outbox = Outbox()
        self.lock = asyncio.Lock()  # one writer of intents at a time: claims are exclusive

    async def reload_live(self) -> None:
        async with self.store.atomic(durable=False) as tx:
            live = await tx.live_intents()
        self.live = LiveIntents(live)
        self.metrics.active_intents.set(len(self.live))

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[Tx]:
        """A database transaction that may change live intents (caller holds the lock).
        If it fails, the memory index is rebuilt from the database: the two never
        disagree, whatever was written to `self.live` before the failure."""
        try:
            async with self.store.atomic() as tx:
                yield tx
        except BaseException:
            await self.reload_live()
            raise

    def known_room(self, room_id: str | None) -> str | None:
        """SPEC "The turn key": a room id naming no room the side-car knows (one that
        Hermes's `privacy.redact_pii` hashed, a truncated one, another format) counts as
        absent: the room is then found from the message hash, never refused."""
        if room_id is None or room_id in self.live or room_id in self.arrivals.rooms:
            return room_id
        return None

    def current(self, room_id: str, now: datetime) -> Intent | None:
        """The room's current intent as of `now` (time applied, not yet written)."""
        intent = self.live.current(room_id)
        if intent is None:
            return None
        advanced = intents.advance(intent, now, self.timing)
        return advanced if advanced.state.is_live else None

    async def end(self, tx: Tx, intent: Intent, reason: EndReason, now: datetime) -> Intent:
        """Cancel what is left of the intent (a turn in progress finishes on it)."""
        ended = intents.cancel(intent, now, reason, self.timing)
        await self.record_end(tx, ended, now)
        return ended

    async def record_end(self, tx: Tx, ended: Intent, now: datetime) -> None:
        before = self.live.intent(ended.room_id, ended.id) or ended
        await self.record_change(tx, before, ended, now)

    async def record_change(self, tx: Tx, before: Intent, after: Intent, now: datetime) -> None:
        """Write an intent's new state, keep the memory index true, and queue the edit of
        the confirmation that the room must see when an intent ends unused or early."""
        await tx.save_intent(after)
        if after.state.is_live:
            self.live.set(after)
        else:
            self.live.pop(after)
        # Once per intent: when it ends, or is closed with a turn still being answered.
        ends = before.state.is_live and not after.state.is_live and not before.is_closed
        if ends or (after.is_closed and not before.is_closed):
            text = _end_notice(after, now, self.timing, self.prefix)
            if text is not None:
                content = replies.edit_content(text, None)
                await tx.add_effect(
                    outbox.ended(after.id, after.command_event_id, after.room_id, content), now
                )


def _end_notice(intent: Intent, now: datetime, timing: Timing, prefix: str) -> replies.Text | None:
    if intent.state is IntentState.EXPIRED:
        return replies.expired(intent, timing)
    if intent.state is IntentState.CANCELLED or intent.is_closed:
        return replies.cancelled(intent, now, timing, prefix)
    return None
