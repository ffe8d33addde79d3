"""The side-car's use cases: a room message arrives, a claim is asked, an outcome is
reported, time passes. Each one reads state, asks the pure core (commands, policy,
intents, turns) what happens, and writes the new state and the room events it owes
(the outbox) in one database transaction. It holds no routing rule of its own.

Live intents are also kept in memory (`self.live`, by room, bot/live.py), written
through to SQLite and rebuilt at start, so a claim for a room with nothing set never
waits for the database.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from . import commands as cmd
from . import history as past
from . import intents as core
from . import policy, replies
from .config import Config
from .events import EncryptedMessage, Invite, Redaction, RoomMessage
from .faults import crash_point
from .intents import (
    ClaimAnswer,
    ClaimResult,
    EndReason,
    Intent,
    IntentState,
    Route,
    Timing,
)
from .live import LiveIntents
from .metrics import Metrics
from .questions import LastQuestions, Question
from .store import Store, Tx
from .turns import (
    SeenMessage,
    Turn,
    TurnKey,
    is_ambiguous,
    is_command_turn,
    message_hash,
    notice_place,
    place_turn,
    resolve_room,
)
from .turns import turn_key as derive_turn_key

log = logging.getLogger("route_sidecar.service")
SEEN_RETENTION = timedelta(hours=24)
PRUNE_BATCH = 2000  # rows per table and transaction when pruning old records
SUGGESTION = "suggest"  # key prefix of the outbox's failure suggestions
# The outbox row (event type and key prefix) of a `/route leave`: the bot leaves the room.
LEAVE_EFFECT = "route_sidecar.leave"
LEAVING = "leaving"  # the result label of a `/route leave` that is honoured
# At most one "I cannot decrypt" notice per room in this long: a device that never gets
# keys would otherwise answer every message.
UNDECRYPTABLE_NOTICE_EVERY = timedelta(minutes=10)
HISTORY_CALLS = 200  # reported calls without an intent read to find the failed turns
ARRIVALS_KEPT = 200_000  # event ids and thread roots remembered for claims to wait on
CLAIM_WAIT_SECONDS = 0.5  # the longest a claim waits for its turn's message to arrive


def utcnow() -> datetime:
    return datetime.now(UTC)


class Arrivals:
    """The room messages the side-car has received (event ids and thread roots, in
    memory), and the claims waiting for theirs: an agent that syncs can see a message
    before the homeserver has pushed it here, and its first claim must not overtake the
    `/route` it answers."""

    def __init__(self, limit: int = ARRIVALS_KEPT) -> None:
        self.limit = limit
        self.rooms: set[str] = set()
        self._ids: dict[str, None] = {}  # insertion-ordered: the oldest go first
        self._waiting: dict[str, asyncio.Event] = {}

    def add(self, room_id: str, event_id: str, thread_id: str | None) -> None:
        self.rooms.add(room_id)
        for key in (event_id, thread_id):
            if key is None:
                continue
            self._ids.pop(key, None)
            self._ids[key] = None
            waiter = self._waiting.pop(key, None)
            if waiter is not None:
                waiter.set()
        while len(self._ids) > self.limit:
            del self._ids[next(iter(self._ids))]

    def should_wait(self, turn: Turn) -> bool:
        """A claim in a room the bot is in, for a turn whose message has not arrived."""
        return (
            turn.turn_id is not None
            and turn.turn_id.startswith("$")
            and turn.room_id in self.rooms
            and turn.turn_id not in self._ids
        )

    async def wait(self, turn_id: str, timeout: float) -> bool:
        waiter = self._waiting.setdefault(turn_id, asyncio.Event())
        try:
            await asyncio.wait_for(waiter.wait(), timeout)
            return True
        except TimeoutError:
            # Not coming (a thread older than the bot's memory, an id the agent made up):
            # the turn's other calls do not wait again.
            self._waiting.pop(turn_id, None)
            self._ids[turn_id] = None
            return False


class RouteService:
    def __init__(
        self,
        config: Config,
        store: Store,
        salt: bytes,
        metrics: Metrics,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.config = config
        self.store = store
        self.salt = salt
        self.metrics = metrics
        self.clock = clock
        self.timing = Timing(config.routing.intent_ttl, config.routing.turn_idle)
        self.prefix = config.routing.prefixes[0]
        self.live = LiveIntents()
        # SPEC "Retry": each room's last question, in memory only.
        self.questions = LastQuestions(config.routing.intent_ttl)
        # Room events that quote a question: sent from here, stored without the quote.
        self.unstored: dict[str, dict[str, Any]] = {}
        # Failure suggestions of recent failed turns (outbox key → last error), so a
        # later successful call of the turn can withdraw one not yet sent.
        self.failures: dict[str, datetime] = {}
        self.arrivals = Arrivals()
        # `again` intents whose "no agent took it" edit is queued (the outbox key is the
        # record that survives a restart; this spares the sweep a write per pass).
        self.reasks_told: set[str] = set()
        # (room, user) → (the user's power level, the level to kick), from the homeserver;
        # None when it cannot say. Set by the composition root (bot.matrix).
        self.room_powers: Callable[[str, str], Awaitable[tuple[int, int] | None]] | None = None
        self._lock = asyncio.Lock()  # one writer of intents at a time: claims are exclusive
        self.outbox_changed = asyncio.Event()

    async def load(self) -> None:
        await self._reload_live()
        async with self.store.atomic(durable=False) as tx:
            held = await tx.held_effects(f"{SUGGESTION}:")
            for room_id, event_id, thread_id in await tx.recent_arrivals(ARRIVALS_KEPT):
                self.arrivals.add(room_id, event_id, thread_id)
        self.failures = {row["key"]: self.clock() for row in held}
        log.info("live intents loaded count=%d", len(self.live))

    async def _reload_live(self) -> None:
        async with self.store.atomic(durable=False) as tx:
            intents = await tx.live_intents()
        self.live = LiveIntents(intents)
        self.metrics.active_intents.set(len(self.live))

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[Tx]:
        """A database transaction that may change live intents (caller holds the lock).
        If it fails, the memory index is rebuilt from the database: the two never
        disagree, whatever was written to `self.live` before the failure."""
        try:
            async with self.store.atomic() as tx:
                yield tx
        except BaseException:
            await self._reload_live()
            raise

    # ---- room events -------------------------------------------------------------

    def accepts_invite(self, invite: Invite) -> bool:
        return policy.may_invite(invite.sender, self.config) and policy.room_allowed(
            invite.room_id, self.config
        )

    async def on_message(self, message: RoomMessage) -> None:
        await self.on_messages([message])

    async def on_messages(self, messages: Sequence[RoomMessage]) -> None:
        """Room messages in the order the homeserver sent them (one transaction). The
        plain ones are only seen: written together, in one database transaction; each
        command is handled on its own, after everything before it is written."""
        seen: list[SeenMessage] = []
        arrived: list[RoomMessage] = []
        try:
            for message in messages:
                arrived.append(message)
                observed = self._observe(message)
                if observed is None:
                    continue
                parsed, record, reask = observed
                if parsed is None:
                    seen.append(record)
                    continue
                await self._write_seen(seen, arrived[:-1])
                seen, arrived = [], [message]
                await self._on_command(message, parsed, record, reask)
            await self._write_seen(seen, arrived)
            arrived = []
        finally:  # handled (or ignored): claims waiting for these messages go on
            for message in arrived:
                self.arrivals.add(message.room_id, message.event_id, message.thread_root)

    async def _write_seen(self, seen: list[SeenMessage], arrived: list[RoomMessage]) -> None:
        if seen:
            async with self.store.atomic(durable=False) as tx:
                await tx.add_seen_many(seen)
        for message in arrived:
            self.arrivals.add(message.room_id, message.event_id, message.thread_root)

    def _observe(
        self, message: RoomMessage
    ) -> tuple[cmd.Command | cmd.CommandError | None, SeenMessage, Question | None] | None:
        """What a message is (a command or not), how the side-car records it, and the
        question an `again` would re-ask; None for messages the bot does not read."""
        config = self.config
        if message.is_edit and policy.is_from_people(message.sender, message.msgtype, config):
            return None, self._edit_seen(message), None
        if not policy.listens_to(message.sender, message.msgtype, message.is_edit, config):
            return None
        prefixes = config.routing.prefixes
        parsed = cmd.parse_command(message.body, prefixes)
        asked = cmd.asked_question(message.body, prefixes, message.msgtype)
        if asked is not None:
            self.questions.remember(
                message.room_id,
                Question(
                    asked, message.sent_at, message.event_id, message.sender, message.thread_root
                ),
            )
        reask = (
            self.questions.last(message.room_id, self.clock())
            if isinstance(parsed, cmd.RouteTo) and parsed.again
            else None
        )
        # What the agent sees of this message: its question (the multi-line form, or the
        # question `again` re-asks, which the agent plugin puts in its place), else itself.
        stands_for = asked if asked is not None else reask.text if reask is not None else None
        record = SeenMessage(
            room_id=message.room_id,
            event_id=message.event_id,
            thread_id=message.thread_root,
            sent_at=message.sent_at,
            message_hash=message_hash(self.salt, stands_for or message.body),
            is_command=stands_for is None,
            sender=message.sender,
            # An agent without the plugin answers the whole text (SPEC "The turn key").
            other_hashes=self._hashes(message.body) if stands_for is not None else (),
        )
        return parsed, record, reask

    def _edit_seen(self, message: RoomMessage) -> SeenMessage:
        """An edit, seen as a new message of its sender (agents answer an edit as a new
        question), known by its new text and by its `* ` fallback body. Never a command."""
        new_text = message.new_body if message.new_body is not None else message.body
        return SeenMessage(
            room_id=message.room_id,
            event_id=message.event_id,
            thread_id=message.thread_root,
            sent_at=message.sent_at,
            message_hash=message_hash(self.salt, new_text),
            is_command=cmd.parse_command(new_text, self.config.routing.prefixes) is not None,
            sender=message.sender,
            other_hashes=self._hashes(message.body),
        )

    def _hashes(self, text: str) -> tuple[str, ...]:
        hashed = message_hash(self.salt, text)
        return (hashed,) if hashed is not None else ()

    async def _on_command(
        self,
        message: RoomMessage,
        parsed: cmd.Command | cmd.CommandError,
        seen: SeenMessage,
        reask: Question | None,
    ) -> None:
        config = self.config
        now = self.clock()
        if not policy.room_allowed(message.room_id, config):
            log.info(
                "command ignored room=%s event=%s reason=room-not-allowed",
                message.room_id,
                message.event_id,
            )
            return
        if policy.is_stale(message.sent_at, now, config):
            log.info(
                "command ignored room=%s event=%s reason=stale", message.room_id, message.event_id
            )
            self.metrics.commands.labels(_command_name(parsed), "stale").inc()
            async with self.store.atomic(durable=False) as tx:
                await tx.add_seen(seen)
            return
        powers = None
        if isinstance(parsed, cmd.LeaveRoom) and self.room_powers is not None:
            powers = await self.room_powers(message.room_id, message.sender)  # before the lock
        async with self._lock, self._writing() as tx:
            if await tx.command_handled(message.event_id):
                self.metrics.duplicates.labels("event").inc()
                log.info("command duplicate room=%s event=%s", message.room_id, message.event_id)
                return
            await tx.add_seen(seen)
            text, intent, result = await self._run_command(tx, parsed, message, reask, powers, now)
            await tx.record_command(
                message.event_id,
                message.room_id,
                message.sender,
                intent.id if intent else None,
                now,
            )
            await tx.add_effect(
                f"reply:{message.event_id}",
                message.room_id,
                "m.room.message",
                replies.notice_content(text, message.event_id, message.thread_root),
                now,
            )
            if result == LEAVING:  # after the reply: the bot can no longer post once gone
                await tx.add_effect(
                    f"{LEAVE_EFFECT}:{message.event_id}", message.room_id, LEAVE_EFFECT, {}, now
                )
        crash_point("command-committed")
        self.metrics.commands.labels(_command_name(parsed), result).inc()
        self.metrics.active_intents.set(len(self.live))
        log.info(
            "command handled room=%s event=%s intent=%s command=%s result=%s",
            message.room_id,
            message.event_id,
            intent.id if intent else "-",
            _command_name(parsed),
            result,
        )
        self.outbox_changed.set()

    async def _run_command(
        self,
        tx: Tx,
        parsed: cmd.Command | cmd.CommandError,
        message: RoomMessage,
        reask: Question | None,
        powers: tuple[int, int] | None,
        now: datetime,
    ) -> tuple[replies.Text, Intent | None, str]:
        """The reply, the intent created (if any) and a result label for one command."""
        config, prefix = self.config, self.prefix
        current = self._current(message.room_id, now)
        match parsed:
            case cmd.CommandError(message=error):
                return replies.command_error(error), None, "malformed"
            case cmd.ShowHelp():
                return replies.help_text(prefix, config.routing.prefixes), None, "ok"
            case cmd.ListTargets():
                targets = policy.usable_targets(message.sender, config)
                return (
                    replies.targets_list(targets, prefix, config.routing.raw_models.allowed),
                    None,
                    "ok",
                )
            case cmd.ShowStatus():
                return replies.status(current, now, self.timing, prefix), None, "ok"
            case cmd.ShowHistory():
                routed = await tx.routed_turns(message.room_id, past.HISTORY_LENGTH)
                calls = await tx.unrouted_calls(message.room_id, HISTORY_CALLS)
                turns = past.latest(routed, past.failed_turns(calls))
                return replies.history(turns, prefix), None, "ok"
            case cmd.LeaveRoom():
                if powers is None:
                    return replies.leave_unchecked(), None, "error"
                if not policy.may_ask_to_leave(*powers):
                    return replies.leave_refused(*powers), None, "refused"
                if current is not None:
                    await self._end(tx, current, EndReason.CLEARED, now)
                return replies.leaving(current), None, LEAVING
            case cmd.ClearIntent():
                if current is None:
                    return replies.cleared(None, None, prefix), None, "ok"
                cleared = await self._end(tx, current, EndReason.CLEARED, now)
                return replies.cleared(current, cleared, prefix), None, "ok"
            case cmd.RouteTo() as route:
                return await self._route(tx, route, message, current, reask, now)
        raise AssertionError(parsed)

    async def _route(
        self,
        tx: Tx,
        route: cmd.RouteTo,
        message: RoomMessage,
        current: Intent | None,
        reask: Question | None,
        now: datetime,
    ) -> tuple[replies.Text, Intent | None, str]:
        resolved = policy.resolve_route(route, message.sender, self.config, self.prefix)
        if isinstance(resolved, policy.Refused):
            return replies.refusal(resolved.reason), None, "refused"
        if route.again and reask is None:
            text = replies.nothing_to_reask(route.target, self.prefix, self.timing.intent_ttl)
            return text, None, "no_question"
        question = reask.text if reask is not None else route.question
        recent = await tx.routes_since(message.sender, now - policy.RATE_WINDOW)
        if policy.rate_limited(recent, self.config):
            return replies.rate_limited(self.config.routes_per_hour), None, "rate_limited"
        intent = core.new_intent(
            intent_id=uuid.uuid4().hex,
            room_id=message.room_id,
            target=resolved.target,
            model=resolved.model,
            scope=resolved.scope,
            sender=message.sender,
            command_event_id=message.event_id,
            command_thread_id=message.thread_root,
            command_at=message.sent_at,
            now=now,
            question_hash=message_hash(self.salt, question) if question else None,
            reasks=reask is not None,
        )
        replaced = None
        if current is not None:
            superseded = await self._end(tx, current, EndReason.SUPERSEDED, now)
            replaced = current if core.unused_part_cancelled(current, superseded) else None
        await tx.save_intent(intent)
        self.live.set(intent)
        if reask is None:
            text = replies.confirmation(intent, replaced, self.timing, self.prefix)
            return text, intent, "routed"
        # The reply quotes the question: that copy is sent from memory, never stored.
        quoted = replies.reask_confirmation(
            intent, replies.excerpt(reask.text), reask.sender, reask.asked_at, replaced, self.prefix
        )
        self.unstored[f"reply:{message.event_id}"] = replies.notice_content(
            quoted, message.event_id, message.thread_root
        )
        text = replies.reask_confirmation(
            intent, None, reask.sender, reask.asked_at, replaced, self.prefix
        )
        return text, intent, "routed"

    async def on_undecryptable(self, message: EncryptedMessage) -> None:
        """An encrypted message the bot could not read: say so (it may have been a
        command), to each sender whose message went unread, once per sender and room and
        UNDECRYPTABLE_NOTICE_EVERY (another sender's notice never stands for theirs)."""
        now = self.clock()
        bucket = int(now.timestamp() // UNDECRYPTABLE_NOTICE_EVERY.total_seconds())
        text = replies.cannot_decrypt(message.sender, self.prefix)
        async with self.store.atomic() as tx:
            added = await tx.add_effect(
                f"undecryptable:{message.room_id}:{message.sender}:{bucket}",
                message.room_id,
                "m.room.message",
                replies.notice_content(text, message.event_id),
                now,
            )
        if added:
            self.outbox_changed.set()

    async def on_unreadable_room(self, message: EncryptedMessage) -> None:
        """An encrypted room while encryption is off: say it once, in a plain notice."""
        if not policy.room_allowed(message.room_id, self.config):
            return
        now = self.clock()
        async with self.store.atomic() as tx:
            added = await tx.add_effect(
                f"unreadable:{message.room_id}",
                message.room_id,
                "m.room.message",
                replies.notice_content(replies.encryption_off()),
                now,
            )
        if added:
            log.info("encrypted room unreadable room=%s", message.room_id)
            self.outbox_changed.set()

    async def on_event_given_up(self, message: RoomMessage, reference: str) -> None:
        """A message whose handling kept failing, given up (bot.appservice): a command the
        bot would have answered gets a reply with the reference its log line carries."""
        config = self.config
        if not (
            policy.room_allowed(message.room_id, config)
            and policy.listens_to(message.sender, message.msgtype, message.is_edit, config)
            and cmd.parse_command(message.body, config.routing.prefixes) is not None
        ):
            return
        async with self.store.atomic() as tx:
            if await tx.command_handled(message.event_id):
                return  # it was answered before it failed
            added = await tx.add_effect(
                f"reply:{message.event_id}",
                message.room_id,
                "m.room.message",
                replies.notice_content(
                    replies.command_failed(reference), message.event_id, message.thread_root
                ),
                self.clock(),
            )
        if added:
            self.outbox_changed.set()

    async def on_redaction(self, redaction: Redaction) -> None:
        now = self.clock()
        async with self._lock, self._writing() as tx:
            intent = await tx.intent_by_command(redaction.redacted_event_id)
            if intent is None or intent.room_id != redaction.room_id:
                return
            intent = self._current(intent.room_id, now) if intent.state.is_live else intent
            if intent is None or intent.command_event_id != redaction.redacted_event_id:
                return
            ended = core.cancel_on_redaction(intent, now, self.timing)
            if ended is not intent:
                await self._record_end(tx, ended, now)
                log.info(
                    "intent cancelled room=%s intent=%s reason=redacted", intent.room_id, intent.id
                )
        self.outbox_changed.set()

    # ---- claims and outcomes -------------------------------------------------------

    async def claim(self, turn: Turn) -> ClaimAnswer:
        """The routing decision for one LLM call; binds a pending intent to its turn."""
        if self.arrivals.should_wait(turn):
            assert turn.turn_id is not None
            arrived = await self.arrivals.wait(turn.turn_id, CLAIM_WAIT_SECONDS)
            log.info("claim waited for its message turn=%s arrived=%s", turn.turn_id, arrived)
        room_id = self._known_room(turn.room_id)
        if (room_id is not None or not self.live) and room_id not in self.live:
            # The common case, answered before any hashing: nothing is set for the room.
            return ClaimAnswer(False, ClaimResult.NO_INTENT, turn.room_id, turn.turn_id)
        key = derive_turn_key(turn, self.salt)
        if room_id is None and key is not None and key.message_hash is not None:
            async with self.store.atomic(durable=False) as tx:
                rooms = await tx.rooms_with_hash(key.message_hash)
            if is_ambiguous(rooms):
                log.info("claim not placed turn=%s reason=ambiguous_room", key)
                return ClaimAnswer(False, ClaimResult.AMBIGUOUS_ROOM, None, turn.turn_id)
            room_id = resolve_room(rooms)
        if room_id is None or room_id not in self.live:
            return ClaimAnswer(False, ClaimResult.NO_INTENT, room_id, turn.turn_id)
        if not self._lock.locked():
            # No writer is between a read and a write: a later call of a bound turn is
            # answered here, in memory, with nothing awaited (the common case in a turn).
            continued = self._continue_bound_turn(room_id, key, turn)
            if continued is not None:
                return continued
        async with self._lock:
            continued = self._continue_bound_turn(room_id, key, turn)
            if continued is not None:
                return continued
            now = self.clock()
            room = self.live.room(room_id)
            if not room:
                return ClaimAnswer(False, ClaimResult.NO_INTENT, room_id, turn.turn_id)
            async with self._writing() as tx:
                seen = await tx.seen_for_turn(room_id, key) if key is not None else []
                placement = place_turn(key, seen)
                if is_command_turn(turn.last_user_message, self.config.routing.prefixes):
                    placement = replace(placement, is_command=True)
                claimed = core.claim_among(room, core.ClaimedTurn(key, placement), now, self.timing)
                if claimed is None:
                    return ClaimAnswer(False, ClaimResult.NO_INTENT, room_id, turn.turn_id)
                intent = next(i for i in room if i.id == claimed.intent.id)
                if claimed.intent != intent:
                    await self._record_change(tx, intent, claimed.intent, now)
                if claimed.result is ClaimResult.BOUND and claimed.turn_position == 0:
                    await tx.add_effect(
                        f"react:{intent.id}",
                        room_id,
                        "m.reaction",
                        replies.reaction_content(intent.command_event_id),
                        now,
                    )
        if claimed.result is ClaimResult.BOUND:
            crash_point("claim-bound")
            log.info(
                "turn bound room=%s intent=%s turn=%s position=%s",
                room_id,
                intent.id,
                key,
                claimed.turn_position,
            )
            self.outbox_changed.set()
        return self._answer(claimed, room_id, turn)

    def _known_room(self, room_id: str | None) -> str | None:
        """SPEC "The turn key": a room id naming no room the side-car knows (one that
        Hermes's `privacy.redact_pii` hashed, a truncated one, another format) counts as
        absent: the room is then found from the message hash, never refused."""
        if room_id is None or room_id in self.live or room_id in self.arrivals.rooms:
            return room_id
        return None

    def _continue_bound_turn(
        self, room_id: str, key: TurnKey | None, turn: Turn
    ) -> ClaimAnswer | None:
        """A later call of a turn the room's intent is bound to. Only the turn's last-claim
        time changes: kept in memory, written by the next sweep (the binding itself is
        already durable). The answer is the turn's previous one while that holds: every
        part of it but `expires_at` is the turn's, and that keeps its second until
        `expiry_second_holds_until`. None: not such a call."""
        now = self.clock()
        open_turn = self.live.continue_turn(room_id, key, now, self.timing)
        if open_turn is None:
            return None
        held = open_turn.answer
        if held is not None and now < held[0]:
            return held[1]
        intent = self.live.intent(room_id, open_turn.intent_id)
        assert intent is not None  # the open turn's intent is live
        answer = self._answer(
            core.Claimed(intent, ClaimResult.CONTINUED, open_turn.position), room_id, turn
        )
        open_turn.answer = (core.expiry_second_holds_until(intent, now, self.timing), answer)
        return answer

    def _answer(self, claimed: core.Claimed, room_id: str, turn: Turn) -> ClaimAnswer:
        intent = claimed.intent
        end = core.expires_at(intent, self.timing) if intent.state.is_live else None
        return ClaimAnswer(
            override=claimed.override,
            result=claimed.result,
            room_id=room_id,
            turn_id=turn.turn_id,
            route=(
                Route(intent.id, intent.target, intent.model, intent.sender)
                if claimed.override
                else None
            ),
            expires_at=core.whole_second(end) if end is not None else None,
        )

    async def record_outcome(
        self,
        intent_id: str,
        model: str,
        status: str,
        latency_ms: int | None,
        detail: str | None,
        turn_id: str | None,
    ) -> bool:
        """Store what the dispatcher served for a routed call and post or update the
        turn's receipt. False: no such intent."""
        now = self.clock()
        async with self._lock, self._writing() as tx:
            intent = await tx.intent(intent_id)
            if intent is None:
                return False
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
            rows = await tx.turn_outcomes(intent.id, position)
            latencies = [r["latency_ms"] for r in rows if r["latency_ms"] is not None]
            text = replies.receipt(
                intent,
                [r["model"] for r in rows],
                [r["status"] for r in rows],
                sum(latencies) if latencies else None,
            )
            await self._post_receipt(tx, intent, position, len(rows), text, now)
            await self._follow_failure(
                tx, intent.room_id, key, ref, placed, model, status, detail, intent, now
            )
        crash_point("outcome-committed")
        self.metrics.outcomes.labels(status).inc()
        log.info(
            "outcome recorded room=%s intent=%s position=%s status=%s",
            intent.room_id,
            intent.id,
            position,
            status,
        )
        self.outbox_changed.set()
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
        if status == "ok" and not self.failures:
            return  # the common case, answered before any hashing
        key = derive_turn_key(turn, self.salt)
        if key is None:
            return
        room_id = self._known_room(turn.room_id)
        now = self.clock()
        async with self._lock, self.store.atomic(durable=False) as tx:
            if room_id is None and key.message_hash is not None:
                room_id = resolve_room(await tx.rooms_with_hash(key.message_hash))
            room_id = room_id or turn.room_id  # nothing better found: the room given
            if room_id is None:
                return
            if status == "ok" and _suggestion_key(room_id, key.ref) not in self.failures:
                return
            placed = await self._placed(tx, room_id, key)
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
        self.metrics.outcomes.labels(status).inc()
        log.info("outcome recorded room=%s intent=- turn=%s status=%s", room_id, key, status)

    async def _placed(self, tx: Tx, room_id: str, key: TurnKey | None) -> SeenMessage | None:
        """The user message a turn answers, when the side-car saw it."""
        if key is None:
            return None
        return place_turn(key, await tx.seen_for_turn(room_id, key)).message

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
        suggestion = _suggestion_key(room_id, ref)
        if status == "ok":
            if self.failures.pop(suggestion, None) is not None:
                await tx.drop_unsent_effect(suggestion)
            return
        targets = policy.retry_targets(
            placed.sender if placed is not None else None,
            model,
            intent.target if intent is not None else None,
            self.config,
        )
        text = replies.failure_suggestion(
            model, detail, targets, cmd.typable_prefix(self.config.routing.prefixes)
        )
        thread_root, reply_to = notice_place(key, placed)
        if intent is not None and reply_to is None:
            thread_root, reply_to = intent.command_thread_id, intent.command_event_id
        content = replies.notice_content(text, reply_to, thread_root)
        grace = self.config.routing.failure_grace
        if await tx.hold_effect(suggestion, room_id, content, now, not_before=now + grace):
            self.failures[suggestion] = now

    async def _post_receipt(
        self,
        tx: Tx,
        intent: Intent,
        position: int | None,
        count: int,
        text: replies.Text,
        now: datetime,
    ) -> None:
        key = f"receipt:{intent.id}:{position}"
        thread_root, reply_to = _receipt_place(intent, position)
        content = replies.notice_content(text, reply_to, thread_root)
        if not await tx.effect_exists(key):
            await tx.add_effect(key, intent.room_id, "m.room.message", content, now)
        elif not await tx.replace_unsent_effect(key, content):
            await tx.add_effect(
                f"{key}:edit:{count}",
                intent.room_id,
                "m.room.message",
                replies.edit_content(text, None),
                now,
                edits=key,
            )

    async def room_intent(self, room_id: str) -> Intent | None:
        async with self._lock:
            return self._current(room_id, self.clock())

    async def cancel_room_intent(self, room_id: str) -> Intent | None:
        now = self.clock()
        async with self._lock:
            current = self._current(room_id, now)
            if current is None:
                return None
            async with self._writing() as tx:
                await self._end(tx, current, EndReason.API, now)
        log.info("intent cancelled room=%s intent=%s reason=api", room_id, current.id)
        self.outbox_changed.set()
        return current

    # ---- time ---------------------------------------------------------------------

    async def sweep(self) -> None:
        """Write the claim times kept in memory, then apply the passing of time to every
        live intent (expiry edits the confirmation)."""
        now = self.clock()
        await self._save_claim_times()
        if any(core.advance(i, now, self.timing) != i for i in list(self.live.values())):
            async with self._lock:
                changed = [
                    (intent, advanced)
                    for intent in list(self.live.values())
                    if (advanced := core.advance(intent, now, self.timing)) != intent
                ]
                async with self._writing() as tx:
                    for before, after in changed:
                        await self._record_change(tx, before, after, now)
                        log.info(
                            "intent ended room=%s intent=%s state=%s",
                            after.room_id,
                            after.id,
                            after.state,
                        )
                self.outbox_changed.set()
        await self._tell_reasks_not_taken(now)
        self.questions.forget_expired(now)
        forget_before = now - self.config.routing.failure_grace - self.timing.turn_idle
        for key in [k for k, at in self.failures.items() if at < forget_before]:
            del self.failures[key]
        self.metrics.active_intents.set(len(self.live))

    async def _tell_reasks_not_taken(self, now: datetime) -> None:
        """SPEC "Retry": an `again` that no turn took within `again_wait` (an agent without
        the plugin never sees its question): its reply is edited to say so, once."""
        wait = self.config.routing.again_wait
        untold = [
            intent
            for intent in self.live.values()
            if intent.id not in self.reasks_told and core.reask_not_taken(intent, now, wait)
        ]
        if not untold:
            return
        async with self.store.atomic() as tx:
            for intent in untold:
                await tx.add_effect(
                    f"unpicked:{intent.id}",
                    intent.room_id,
                    "m.room.message",
                    replies.edit_content(
                        replies.reask_not_taken(intent, wait, self.timing, self.prefix), None
                    ),
                    now,
                    edits=f"reply:{intent.command_event_id}",
                )
                log.info(
                    "re-ask not taken room=%s intent=%s event=%s",
                    intent.room_id,
                    intent.id,
                    intent.command_event_id,
                )
        self.reasks_told.update(intent.id for intent in untold)
        self.outbox_changed.set()

    async def flush(self) -> None:
        """Write what is only in memory (at shutdown)."""
        await self._save_claim_times()

    async def _save_claim_times(self) -> None:
        """Claim times of bound turns, taken from memory at once and written without the
        service lock: the write touches only those columns (never the intent's state),
        so claims go on while it runs, and an older copy never undoes a newer one."""
        turns = [
            (intent.id, position, turn)
            for intent in self.live.take_unsaved()
            for position, turn in enumerate(intent.bound_turns)
        ]
        if turns:
            async with self.store.atomic(durable=False) as tx:
                await tx.save_claim_times(turns)

    async def forget_old_records(self) -> None:
        """Forget seen messages after SEEN_RETENTION, and every other record past
        `limits.history_retention`, a batch per transaction so claims go on between."""
        now = self.clock()
        async with self.store.atomic(durable=False) as tx:
            await tx.forget_seen_before(now - SEEN_RETENTION)
        deleted = PRUNE_BATCH
        total = 0
        while deleted >= PRUNE_BATCH:
            async with self.store.atomic(durable=False) as tx:
                deleted = await tx.prune_history(now - self.config.history_retention, PRUNE_BATCH)
            total += deleted
        if total:
            log.info("old records pruned rows=%d", total)

    # ---- helpers ------------------------------------------------------------------

    def _current(self, room_id: str, now: datetime) -> Intent | None:
        """The room's current intent as of `now` (time applied, not yet written)."""
        intent = self.live.current(room_id)
        if intent is None:
            return None
        advanced = core.advance(intent, now, self.timing)
        return advanced if advanced.state.is_live else None

    async def _end(self, tx: Tx, intent: Intent, reason: EndReason, now: datetime) -> Intent:
        """Cancel what is left of the intent (a turn in progress finishes on it)."""
        ended = core.cancel(intent, now, reason, self.timing)
        await self._record_end(tx, ended, now)
        return ended

    async def _record_end(self, tx: Tx, ended: Intent, now: datetime) -> None:
        before = self.live.intent(ended.room_id, ended.id) or ended
        await self._record_change(tx, before, ended, now)

    async def _record_change(self, tx: Tx, before: Intent, after: Intent, now: datetime) -> None:
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
                await tx.add_effect(
                    f"ended:{after.id}",
                    after.room_id,
                    "m.room.message",
                    replies.edit_content(text, None),
                    now,
                    edits=f"reply:{after.command_event_id}",
                )


def _end_notice(intent: Intent, now: datetime, timing: Timing, prefix: str) -> replies.Text | None:
    if intent.state is IntentState.EXPIRED:
        return replies.expired(intent, timing)
    if intent.state is IntentState.CANCELLED or intent.is_closed:
        return replies.cancelled(intent, now, timing, prefix)
    return None


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


def _suggestion_key(room_id: str, turn_ref: str) -> str:
    return f"{SUGGESTION}:{room_id}:{turn_ref}"


def _command_name(parsed: cmd.Command | cmd.CommandError) -> str:
    return {
        cmd.ShowStatus: "status",
        cmd.ShowHelp: "help",
        cmd.ListTargets: "targets",
        cmd.ShowHistory: "history",
        cmd.LeaveRoom: "leave",
        cmd.ClearIntent: "auto",
        cmd.RouteTo: "route",
        cmd.CommandError: "malformed",
    }[type(parsed)]


def new_salt() -> str:
    return secrets.token_hex(16)
