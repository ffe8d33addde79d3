"""The side-car's use cases, in one object the shells call: a room event arrives
(route_sidecar/room_events.py), a claim is asked (route_sidecar/claims.py), an outcome is reported
(route_sidecar/outcomes.py), time passes (the sweep, here). Each one reads state, asks the pure
core (commands, policy, intents, turns) what happens, and writes the new state and the
room events it owes (route_sidecar/outbox.py) in one database transaction through the shared
`RouteState` (route_sidecar/state.py). It holds no routing rule of its own.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from . import outbox
from .arrivals import ARRIVALS_KEPT, ASKERS_KEPT
from .claims import Claims
from .config import Config
from .core import intents, replies
from .core.events import EncryptedMessage, Invite, Redaction, RoomMessage
from .core.intents import ClaimAnswer, Intent, Timing
from .core.live import LiveIntents
from .core.turns import Turn
from .metrics import Metrics
from .outbox import Outbox
from .outcomes import Outcomes
from .room_events import RoomEvents, RoomPowers
from .state import RouteState
from .store import Store

log = logging.getLogger("route_sidecar.service")
SEEN_RETENTION = timedelta(hours=24)
PRUNE_BATCH = 2000  # rows per table and transaction when pruning old records


def utcnow() -> datetime:
    return datetime.now(UTC)


class RouteService:
    def __init__(
        self,
        config: Config,
        store: Store,
        salt: bytes,
        metrics: Metrics,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.state = RouteState(config, store, salt, metrics, clock)
        self.room_events = RoomEvents(self.state)
        self.claims = Claims(self.state)
        self.outcomes = Outcomes(self.state)
        # `again` intents whose "no agent took it" edit is queued (the outbox key is the
        # record that survives a restart; this spares the sweep a write per pass).
        self.reasks_told: set[str] = set()

    # What the shells and tests read of the state.
    @property
    def config(self) -> Config:
        return self.state.config

    @property
    def store(self) -> Store:
        return self.state.store

    @property
    def clock(self) -> Callable[[], datetime]:
        return self.state.clock

    @property
    def timing(self) -> Timing:
        return self.state.timing

    @property
    def live(self) -> LiveIntents:
        return self.state.live

    @property
    def outbox(self) -> Outbox:
        return self.state.outbox

    @property
    def room_powers(self) -> RoomPowers | None:
        return self.room_events.room_powers

    @room_powers.setter
    def room_powers(self, room_powers: RoomPowers | None) -> None:
        self.room_events.room_powers = room_powers

    async def load(self) -> None:
        state = self.state
        await state.reload_live()
        async with state.store.atomic(durable=False) as tx:
            for room_id, event_id, thread_id in await tx.recent_arrivals(ARRIVALS_KEPT):
                state.arrivals.add(room_id, event_id, thread_id)
            for message in await tx.recent_seen(ASKERS_KEPT):
                state.arrivals.remember_asker(message)
            state.arrivals.set_rooms(*await tx.rooms_by_membership())
        await self.outcomes.load()
        # What their confirmations say of turns being answered is checked at the next sweep.
        now = state.clock()
        for intent in state.live.values():
            if any(turn.is_open(now, state.timing) for turn in intent.bound_turns):
                state.rechecks[intent.id] = (intent.room_id, now)
        log.info("live intents loaded count=%d", len(state.live))

    # ---- room events (route_sidecar/room_events.py) --------------------------------------------

    def accepts_invite(self, invite: Invite) -> bool:
        return self.room_events.accepts_invite(invite)

    async def on_bot_membership(self, room_id: str, joined: bool) -> None:
        await self.room_events.on_bot_membership(room_id, joined)

    async def on_joined_rooms(self, rooms: Sequence[str], listed_at: datetime) -> None:
        await self.room_events.on_joined_rooms(rooms, listed_at)

    async def on_message(self, message: RoomMessage) -> None:
        await self.room_events.on_messages([message])

    async def on_messages(self, messages: Sequence[RoomMessage]) -> None:
        await self.room_events.on_messages(messages)

    async def on_undecryptable(self, message: EncryptedMessage) -> None:
        await self.room_events.on_undecryptable(message)

    async def on_unreadable_room(self, message: EncryptedMessage) -> None:
        await self.room_events.on_unreadable_room(message)

    async def on_event_given_up(self, message: RoomMessage, reference: str) -> None:
        await self.room_events.on_event_given_up(message, reference)

    async def on_redaction(self, redaction: Redaction) -> None:
        await self.room_events.on_redaction(redaction)

    # ---- claims and the API's intent view (route_sidecar/claims.py) -----------------------------

    async def claim(self, turn: Turn) -> ClaimAnswer:
        return await self.claims.claim(turn)

    async def room_intent(self, room_id: str) -> Intent | None:
        return await self.claims.room_intent(room_id)

    async def cancel_room_intent(self, room_id: str) -> Intent | None:
        return await self.claims.cancel_room_intent(room_id)

    # ---- outcomes (route_sidecar/outcomes.py) ----------------------------------------------------

    async def record_outcome(
        self,
        intent_id: str,
        model: str,
        status: str,
        latency_ms: int | None,
        detail: str | None,
        turn_id: str | None,
        call_id: str | None = None,
    ) -> bool:
        return await self.outcomes.record_outcome(
            intent_id, model, status, latency_ms, detail, turn_id, call_id
        )

    async def record_turn_outcome(
        self, turn: Turn, model: str, status: str, latency_ms: int | None, detail: str | None
    ) -> None:
        await self.outcomes.record_turn_outcome(turn, model, status, latency_ms, detail)

    # ---- time ---------------------------------------------------------------------

    async def sweep(self) -> None:
        """Write the claim times kept in memory, then apply the passing of time to every
        live intent (expiry edits the confirmation)."""
        state = self.state
        now = state.clock()
        await self._save_claim_times()
        timing = state.timing
        live = state.live.values()  # once a second over every live intent: read it once
        if any(intents.advance(i, now, timing) != i for i in live):
            async with state.lock:
                changed = [
                    (intent, advanced)
                    for intent in list(state.live.values())
                    if (advanced := intents.advance(intent, now, timing)) != intent
                ]
                async with state.writing() as tx:
                    for before, after in changed:
                        await state.record_change(tx, before, after, now)
                        log.info(
                            "intent ended room=%s intent=%s state=%s",
                            after.room_id,
                            after.id,
                            after.state,
                        )
                state.outbox.queued()
            live = state.live.values()  # what the changes left
        await self._tell_reasks_not_taken(live, now)
        await state.recheck_accounts(now)
        self.room_events.questions.forget_expired(now)
        self.outcomes.forget_quiet_failures(now)
        state.metrics.active_intents.set(len(state.live))

    async def _tell_reasks_not_taken(self, live: list[Intent], now: datetime) -> None:
        """SPEC "Retry": an `again` that no turn took within `again_wait` (an agent without
        the plugin never sees its question): its reply is edited to say so, once."""
        state = self.state
        wait = state.config.routing.again_wait
        untold = [
            intent
            for intent in live
            if intent.reasks  # few are: the rest cost one attribute read
            and intent.id not in self.reasks_told
            and intents.reask_not_taken(intent, now, wait)
        ]
        if not untold:
            return
        async with state.store.atomic() as tx:
            for intent in untold:
                text = replies.reask_not_taken(intent, wait, state.timing, state.prefix)
                await tx.add_effect(
                    outbox.unpicked(
                        intent.id,
                        intent.command_event_id,
                        intent.room_id,
                        replies.edit_content(text, None),
                    ),
                    now,
                )
                log.info(
                    "re-ask not taken room=%s intent=%s event=%s",
                    intent.room_id,
                    intent.id,
                    intent.command_event_id,
                )
        self.reasks_told.update(intent.id for intent in untold)
        state.outbox.queued()

    async def flush(self) -> None:
        """Write what is only in memory (at shutdown)."""
        await self._save_claim_times()

    async def _save_claim_times(self) -> None:
        """Claim times of bound turns, taken from memory at once and written without the
        service lock: the write touches only those columns (never the intent's state),
        so claims go on while it runs, and an older copy never undoes a newer one."""
        turns = [
            (intent.id, position, turn)
            for intent in self.state.live.take_unsaved()
            for position, turn in enumerate(intent.bound_turns)
        ]
        if turns:
            async with self.state.store.atomic(durable=False) as tx:
                await tx.save_claim_times(turns)

    async def forget_old_records(self) -> None:
        """Forget seen messages after SEEN_RETENTION, and every other record past
        `limits.history_retention`, a batch per transaction so claims go on between."""
        state = self.state
        now = state.clock()
        async with state.store.atomic(durable=False) as tx:
            await tx.forget_seen_before(now - SEEN_RETENTION)
        deleted = PRUNE_BATCH
        total = 0
        while deleted >= PRUNE_BATCH:
            async with state.store.atomic(durable=False) as tx:
                deleted = await tx.prune_history(now - state.config.history_retention, PRUNE_BATCH)
            total += deleted
        if total:
            log.info("old records pruned rows=%d", total)


def new_salt() -> str:
    return secrets.token_hex(16)
