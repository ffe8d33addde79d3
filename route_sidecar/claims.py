"""Where a claim is answered (`POST /v1/claim`, SPEC "The lookup API"): the room is found
(the hint, else the message hash), the turn key derived (core/turns.py), and the room's
intents asked whether this call's turn is theirs (core/intents.py `claim_among`). A
later call of a bound turn, the common case, is answered in memory. The lookup API's
view of a room's intent (`GET`/`DELETE /v1/rooms/{id}/intent`) is here too.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import replace

from . import outbox
from .core import intents, replies
from .core.intents import ClaimAnswer, ClaimResult, EndReason, Intent, Route
from .core.turns import Turn, TurnKey, is_ambiguous, is_command_turn, place_turn, resolve_room
from .core.turns import turn_key as derive_turn_key
from .faults import crash_point
from .state import RouteState

log = logging.getLogger("route_sidecar.service")
CLAIM_WAIT_SECONDS = 0.5  # the longest a claim waits for its turn's message to arrive


CALLS_KEPT = 4096  # answers by the agent's call id, for a second party asking of the call


class Claims:
    def __init__(self, state: RouteState) -> None:
        self.state = state
        self.calls: OrderedDict[str, ClaimAnswer] = OrderedDict()

    async def claim(self, turn: Turn) -> ClaimAnswer:
        """The routing decision for one LLM call; binds a pending intent to its turn. A
        call the agent named (`call_id`) that was claimed already (the agent plugin asked,
        then the dispatcher it calls asks too) gets the same answer, counted once."""
        if turn.call_id is not None:
            return await self._claim_named(turn, turn.call_id)
        return await self.decide(turn)

    async def _claim_named(self, turn: Turn, call_id: str) -> ClaimAnswer:
        known = self.calls.get(call_id)
        if known is not None:
            log.debug("claim repeated call=%s", call_id)
            return known
        answer = await self.decide(turn)
        self.calls[call_id] = answer
        while len(self.calls) > CALLS_KEPT:
            self.calls.popitem(last=False)
        return answer

    async def decide(self, turn: Turn) -> ClaimAnswer:
        """`claim` for a call the agent did not name (the API calls it directly: no wrapper)."""
        state = self.state
        awaited = state.arrivals.awaited(turn)
        if awaited is not None:
            arrived = await state.arrivals.wait(awaited, CLAIM_WAIT_SECONDS)
            log.info("claim waited for its message event=%s arrived=%s", awaited, arrived)
        live = state.live
        room_id = turn.room_id
        if room_id is not None and room_id not in live:
            if room_id in state.arrivals.rooms:
                # The common case, answered from memory: nothing is set for a room the bot
                # is in (joined, whether or not a message arrived there yet).
                return self._unrouted(room_id, turn)
            # A room id naming no room the bot is in counts as absent (state.known_room).
            room_id = None
        if room_id is None and not live:  # nothing is set anywhere: placed from memory
            return self._unrouted(state.arrivals.room_of(turn, state.salt), turn)
        key = derive_turn_key(turn, state.salt)
        if room_id is None and key is not None and key.message_hash is not None:
            async with state.store.atomic(durable=False) as tx:
                rooms = await tx.rooms_with_hash(key.message_hash)
            if is_ambiguous(rooms):
                log.info("claim not placed turn=%s reason=ambiguous_room", key)
                return ClaimAnswer(False, ClaimResult.AMBIGUOUS_ROOM, None, turn.turn_id)
            room_id = resolve_room(rooms)
        if room_id is None or room_id not in state.live:
            return self._unrouted(room_id, turn)
        if not state.lock.locked():
            # No writer is between a read and a write: a later call of a bound turn is
            # answered here, in memory, with nothing awaited (the common case in a turn).
            continued = self._continue_bound_turn(room_id, key, turn)
            if continued is not None:
                return continued
        async with state.lock:
            continued = self._continue_bound_turn(room_id, key, turn)
            if continued is not None:
                return continued
            now = state.clock()
            room = state.live.room(room_id)
            if not room:
                return self._unrouted(room_id, turn)
            async with state.writing() as tx:
                seen = await tx.seen_for_turn(room_id, key) if key is not None else []
                placement = place_turn(key, seen, turn.event_id)
                if is_command_turn(turn.last_user_message, state.config.routing.prefixes):
                    placement = replace(placement, is_command=True)
                claimed = intents.claim_among(
                    room, intents.ClaimedTurn(key, placement), now, state.timing
                )
                if claimed is None:
                    return self._unrouted(room_id, turn)
                intent = next(i for i in room if i.id == claimed.intent.id)
                if claimed.intent != intent:
                    await state.record_change(tx, intent, claimed.intent, now)
                if claimed.result is ClaimResult.BOUND and claimed.turn_position == 0:
                    content = replies.reaction_content(intent.command_event_id)
                    await tx.add_effect(outbox.reaction(intent.id, room_id, content), now)
        if claimed.result is ClaimResult.BOUND:
            crash_point("claim-bound")
            log.info(
                "turn bound room=%s intent=%s turn=%s position=%s",
                room_id,
                intent.id,
                key,
                claimed.turn_position,
            )
            state.outbox.queued()
        return self._answer(claimed, room_id, turn)

    def _continue_bound_turn(
        self, room_id: str, key: TurnKey | None, turn: Turn
    ) -> ClaimAnswer | None:
        """A later call of a turn the room's intent is bound to. Only the turn's last-claim
        time changes: kept in memory, written by the next sweep (the binding itself is
        already durable). The answer is the turn's previous one while that holds: every
        part of it but `expires_at` is the turn's, and that keeps its second until
        `expiry_second_holds_until`. None: not such a call."""
        state = self.state
        now = state.clock()
        open_turn = state.live.continue_turn(room_id, key, now, state.timing)
        if open_turn is None:
            return None
        held = open_turn.answer
        if held is not None and now < held[0]:
            return held[1]
        intent = state.live.intent(room_id, open_turn.intent_id)
        assert intent is not None  # the open turn's intent is live
        answer = self._answer(
            intents.Claimed(intent, ClaimResult.CONTINUED, open_turn.position), room_id, turn
        )
        open_turn.answer = (intents.expiry_second_holds_until(intent, now, state.timing), answer)
        return answer

    def _asker(self, room_id: str | None, turn: Turn) -> str | None:
        """Who sent the turn's message (SPEC "The lookup API": every placed call names
        its asker): the agent's stamp says, else the message the side-car remembers."""
        if room_id is None:
            return None
        if turn.sender is not None:
            return turn.sender
        state = self.state
        if not state.arrivals.remembers_askers:  # no message seen yet: nothing to hash
            return None
        return state.arrivals.asker(room_id, turn, state.salt)

    def _unrouted(self, room_id: str | None, turn: Turn) -> ClaimAnswer:
        return ClaimAnswer(
            False, ClaimResult.NO_INTENT, room_id, turn.turn_id, asker=self._asker(room_id, turn)
        )

    def _answer(self, claimed: intents.Claimed, room_id: str, turn: Turn) -> ClaimAnswer:
        intent = claimed.intent
        end = intents.expires_at(intent, self.state.timing) if intent.state.is_live else None
        return ClaimAnswer(
            override=claimed.override,
            result=claimed.result,
            room_id=room_id,
            turn_id=turn.turn_id,
            asker=self._asker(room_id, turn),
            route=(
                Route(intent.id, intent.target, intent.model, intent.sender)
                if claimed.override
                else None
            ),
            expires_at=intents.whole_second(end) if end is not None else None,
        )

    async def room_intent(self, room_id: str) -> Intent | None:
        async with self.state.lock:
            return self.state.current(room_id, self.state.clock())

    async def cancel_room_intent(self, room_id: str) -> Intent | None:
        state = self.state
        now = state.clock()
        async with state.lock:
            current = state.current(room_id, now)
            if current is None:
                return None
            async with state.writing() as tx:
                await state.end(tx, current, EndReason.API, now)
        log.info("intent cancelled room=%s intent=%s reason=api", room_id, current.id)
        state.outbox.queued()
        return current
