"""What the dispatcher reports it served (`POST /v1/outcome`): stored, shown in the room
(the command's confirmation edited into the route's account, or, with `routing.receipts:
thread`, the turn's receipt posted in its thread and edited as more calls land), and, for
a failed call, the retry suggestion (SPEC "Retry"), held back until the turn has been
quiet.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from datetime import datetime

from . import outbox
from .core import commands, policy, replies
from .core.intents import Intent
from .core.turns import SeenMessage, Turn, TurnKey, notice_place, place_turn, resolve_room
from .core.turns import turn_key as derive_turn_key
from .faults import crash_point
from .state import RouteState
from .store import Tx

log = logging.getLogger("route_sidecar.service")
REPORTS_KEPT = 4096  # call ids of calls reported, for a second party's report of the same


class Outcomes:
    def __init__(self, state: RouteState) -> None:
        self.state = state
        # Failure suggestions of recent failed turns (outbox key → last error), so a
        # later successful call of the turn can withdraw one not yet sent.
        self.failures: dict[str, datetime] = {}
        # Calls reported already, by the agent's call id: the agent plugin and the
        # dispatcher it calls may both report one call; it counts once.
        self.reported: OrderedDict[str, None] = OrderedDict()

    async def load(self) -> None:
        """The suggestions still held back (a restart during a turn's grace)."""
        async with self.state.store.atomic(durable=False) as tx:
            held = await tx.held_effects(outbox.EffectKind.SUGGEST)
        self.failures = {key: self.state.clock() for key in held}

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
        """Store what the dispatcher served for a routed call and tell the room. False:
        no such intent. A call reported already (its call id) is acknowledged, not
        counted again."""
        state = self.state
        now = state.clock()
        async with state.lock, state.writing() as tx:
            intent = await tx.intent(intent_id)
            if intent is None:
                return False
            if not self._first_report(call_id):
                return True
            position = _outcome_turn(intent, turn_id)
            key = intent.bound_turns[position].key if position is not None else None
            ref = key.ref if key is not None else f"intent:{intent.id}:{position}"
            placed = await self._placed(tx, intent.room_id, key) if status != "ok" else None
            await tx.add_outcome(
                intent_id=intent.id,
                position=position,
                room_id=intent.room_id,
                turn=ref,
                asker=placed.sender if placed is not None else None,
                model=model,
                status=status,
                latency_ms=latency_ms,
                detail=detail,
                now=now,
            )
            if state.config.routing.receipts == "confirmation":
                # The live copy: its turns' claim counts are current (the store's may lag).
                live = state.live.intent(intent.room_id, intent.id) or intent
                await state.show_account(tx, live, now)
            else:
                calls = await tx.turn_outcomes(intent.id, position)
                text = replies.turn_receipt(intent, calls)
                await self._post_receipt(tx, intent, position, len(calls), text, now)
            await self._follow_failure(
                tx, intent.room_id, key, ref, placed, model, status, detail, intent, now
            )
        crash_point("outcome-committed")
        state.metrics.outcomes.labels(status).inc()
        log.info(
            "outcome recorded room=%s intent=%s position=%s status=%s",
            intent.room_id,
            intent.id,
            position,
            status,
        )
        state.outbox.queued()
        return True

    async def record_turn_outcome(
        self,
        turn: Turn,
        model: str,
        status: str,
        latency_ms: int | None,
        detail: str | None,
    ) -> None:
        """What the dispatcher served for a call without an override. Only what the retry
        suggestion and `/route history` need is kept: failed calls, and the calls of a
        turn that had failed."""
        if not self._first_report(turn.call_id):
            return
        if status == "ok" and not self.failures:
            return  # the common case, answered before any hashing
        state = self.state
        key = derive_turn_key(turn, state.salt)
        if key is None:
            return
        room_id = state.known_room(turn.room_id)
        now = state.clock()
        async with state.lock, state.store.atomic(durable=False) as tx:
            if room_id is None and key.message_hash is not None:
                room_id = resolve_room(await tx.rooms_with_hash(key.message_hash))
            room_id = room_id or turn.room_id  # nothing better found: the room given
            if room_id is None:
                return
            if status == "ok" and outbox.suggestion_key(room_id, key.ref) not in self.failures:
                return
            placed = await self._placed(tx, room_id, key, turn.event_id)
            await tx.add_outcome(
                intent_id=None,
                position=None,
                room_id=room_id,
                turn=key.ref,
                asker=placed.sender if placed is not None else None,
                model=model,
                status=status,
                latency_ms=latency_ms,
                detail=detail,
                now=now,
            )
            await self._follow_failure(
                tx, room_id, key, key.ref, placed, model, status, detail, None, now
            )
        state.metrics.outcomes.labels(status).inc()
        log.info("outcome recorded room=%s intent=- turn=%s status=%s", room_id, key, status)

    def _first_report(self, call_id: str | None) -> bool:
        """Whether this is the first report of the call (always, without a call id)."""
        if call_id is None:
            return True
        if call_id in self.reported:
            log.debug("outcome repeated call=%s", call_id)
            return False
        self.reported[call_id] = None
        while len(self.reported) > REPORTS_KEPT:
            self.reported.popitem(last=False)
        return True

    def forget_quiet_failures(self, now: datetime) -> None:
        """Failed turns quiet for longer than a suggestion's grace and a turn's idle time:
        no later call of theirs can withdraw the suggestion any more."""
        state = self.state
        before = now - state.config.routing.failure_grace - state.timing.turn_idle
        for key in [k for k, at in self.failures.items() if at < before]:
            del self.failures[key]

    async def _placed(
        self, tx: Tx, room_id: str, key: TurnKey | None, event_id: str | None = None
    ) -> SeenMessage | None:
        """The user message a turn answers, when the side-car saw it (the one with the
        event id the agent stamped, when it did)."""
        if key is None:
            return None
        return place_turn(key, await tx.seen_for_turn(room_id, key), event_id).message

    async def _follow_failure(
        self,
        tx: Tx,
        room_id: str,
        key: TurnKey | None,
        ref: str,
        placed: SeenMessage | None,
        model: str,
        status: str,
        detail: str | None,
        intent: Intent | None,
        now: datetime,
    ) -> None:
        """SPEC "Retry": a failed call (re)schedules the turn's one suggestion for when
        the turn has been quiet for `failure_grace`; a later successful call withdraws it
        while it is unsent. The outbox's unique key makes it one per turn."""
        config = self.state.config
        suggestion = outbox.suggestion_key(room_id, ref)
        if status == "ok":
            if self.failures.pop(suggestion, None) is not None:
                await tx.drop_unsent_effect(suggestion)
            return
        targets = policy.retry_targets(
            placed.sender if placed is not None else None,
            model,
            intent.target if intent is not None else None,
            config,
        )
        text = replies.failure_suggestion(
            model, detail, targets, commands.typable_prefix(config.routing.prefixes)
        )
        thread_root, reply_to = notice_place(key, placed)
        if intent is not None and reply_to is None:
            thread_root, reply_to = intent.command_thread_id, intent.command_event_id
        content = replies.notice_content(text, reply_to, thread_root)
        effect = outbox.suggestion(room_id, ref, content)
        if await tx.hold_effect(effect, now, not_before=now + config.routing.failure_grace):
            self.failures[suggestion] = now

    async def _post_receipt(
        self,
        tx: Tx,
        intent: Intent,
        position: int | None,
        calls: int,
        text: replies.Text,
        now: datetime,
    ) -> None:
        """The turn's receipt: queued, or its unsent copy replaced, or (once sent) edited."""
        thread_root, reply_to = _receipt_place(intent, position)
        content = replies.notice_content(text, reply_to, thread_root)
        receipt = outbox.receipt(intent.id, position, intent.room_id, content)
        if not await tx.effect_exists(receipt.key):
            await tx.add_effect(receipt, now)
        elif not await tx.replace_unsent_effect(receipt.key, content):
            edit = replies.edit_content(text, None)
            await tx.add_effect(outbox.receipt_edit(receipt.key, calls, intent.room_id, edit), now)


def _outcome_turn(intent: Intent, turn_id: str | None) -> int | None:
    """Which bound turn an outcome belongs to: the one with that turn id, else the one
    claimed last."""
    if not intent.bound_turns:
        return None
    if turn_id:
        for position, bound in enumerate(intent.bound_turns):
            if bound.key is not None and bound.key.turn_id == turn_id:
                return position
    return max(range(len(intent.bound_turns)), key=lambda i: intent.bound_turns[i].last_claim_at)


def _receipt_place(intent: Intent, position: int | None) -> tuple[str | None, str]:
    """(thread root, event replied to) for a turn's receipt: in the turn's thread when
    the turn id is a thread root event, else in reply to the command."""
    if position is not None:
        key = intent.bound_turns[position].key
        if key is not None and key.turn_id and key.turn_id.startswith("$"):
            return key.turn_id, key.turn_id
    return intent.command_thread_id, intent.command_event_id
