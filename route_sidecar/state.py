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
from typing import Any

from . import outbox
from .arrivals import Arrivals
from .config import Config
from .core import commands, intents, replies
from .core.history import Call
from .core.intents import EndReason, Intent, Timing
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
        # The one replies teach: `!route`, which no client intercepts, when configured.
        self.prefix = commands.typable_prefix(config.routing.prefixes)
        self.live = LiveIntents()
        self.arrivals = Arrivals()
        self.outbox = Outbox()
        self.lock = asyncio.Lock()  # one writer of intents at a time: claims are exclusive
        # Intents whose confirmation says a turn is being answered: intent id → (its room,
        # when that may stop being true with no event). The sweep edits it then
        # (`recheck_accounts`).
        self.rechecks: dict[str, tuple[str, datetime]] = {}

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
        """Write an intent's new state, keep the memory index true, and edit the command's
        confirmation whenever what it says changes: a turn taken, a close, an end."""
        await tx.save_intent(after)
        if after.state.is_live:
            self.live.set(after)
        else:
            self.live.pop(after)
        told = (before.state, before.is_closed, len(before.bound_turns))
        if (after.state, after.is_closed, len(after.bound_turns)) != told:
            await self.show_account(tx, after, now)

    async def reported(self, tx: Tx, intent: Intent) -> list[list[Call]]:
        """The calls the dispatcher reported for each of the intent's bound turns."""
        return [
            await tx.turn_outcomes(intent.id, position)
            for position in range(len(intent.bound_turns))
        ]

    async def show_account(self, tx: Tx, intent: Intent, now: datetime) -> None:
        """Edit the command's confirmation into the route's account as of `now` (SPEC
        "POST /v1/intents/{intent_id}/outcome"), when its text changed: an edit not yet
        sent is replaced, else a new one is queued. With `routing.receipts: thread` the
        account leaves out what served each turn (the receipts in the threads say it)."""
        reported = await self.reported(tx, intent)
        served = self.config.routing.receipts == "confirmation"
        text = replies.account(intent, reported, now, self.timing, self.prefix, served)
        content = replies.edit_content(text, None)
        await self._edit_confirmation(tx, intent, content, now)
        recheck = intents.answering_ends_at(intent, [len(r) for r in reported], now, self.timing)
        if recheck is None:
            self.rechecks.pop(intent.id, None)
        else:
            self.rechecks[intent.id] = (intent.room_id, recheck)

    async def _edit_confirmation(
        self, tx: Tx, intent: Intent, content: dict[str, Any], now: datetime
    ) -> None:
        """Queue an edit of the confirmation showing `content`, unless the latest one
        shows it already; an edit not sent yet is replaced instead."""
        latest = await tx.latest_effect(outbox.account_prefix(intent.id))
        number = 1
        if latest is not None:
            key, stored, sent = latest
            if stored == content or (not sent and await tx.replace_unsent_effect(key, content)):
                return
            number = outbox.account_number(key) + 1
        edit = outbox.account(intent.id, number, intent.command_event_id, intent.room_id, content)
        await tx.add_effect(edit, now)

    async def recheck_accounts(self, now: datetime) -> None:
        """Confirmations that said a turn was being answered, once that may be untrue
        (SPEC "Intents": an edit that a later event makes untrue is redone)."""
        due = [(i, room_id) for i, (room_id, at) in self.rechecks.items() if at <= now]
        if not due:
            return
        async with self.lock, self.store.atomic() as tx:
            for intent_id, room_id in due:
                intent = self.live.intent(room_id, intent_id) or await tx.intent(intent_id)
                if intent is None:
                    self.rechecks.pop(intent_id, None)
                    continue
                await self.show_account(tx, intents.advance(intent, now, self.timing), now)
        self.outbox.queued()
