"""What the side-car does with room events: every message is seen (its salted hash, for
message-hash room resolution), a `/route` command is parsed (core/commands.py), checked
(core/policy.py) and applied to the room's intent (core/intents.py), with its reply queued
in the same transaction; redactions cancel, unreadable messages get a notice.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta

from . import outbox
from .core import commands, describe, history, intents, policy, replies
from .core.events import EncryptedMessage, Invite, Redaction, RoomMessage
from .core.intents import EndReason, Intent
from .core.questions import LastQuestions, Question
from .core.turns import SeenMessage, message_hash
from .faults import crash_point
from .state import RouteState
from .store import Tx

log = logging.getLogger("route_sidecar.service")
LEAVING = "leaving"  # the result label of a `/route leave` that is honoured
# At most one "I cannot decrypt" notice per sender and room in this long: a device that
# never gets keys would otherwise answer every message.
UNDECRYPTABLE_NOTICE_EVERY = timedelta(minutes=10)
HISTORY_CALLS = 200  # reported calls without an intent read to find the failed turns

# (room, user) → (the user's power level, the level to kick), from the homeserver; None
# when it cannot say.
RoomPowers = Callable[[str, str], Awaitable[tuple[int, int] | None]]
Parsed = commands.Command | commands.CommandError  # what a command message parses to


class RoomEvents:
    def __init__(self, state: RouteState) -> None:
        self.state = state
        # SPEC "Retry": each room's last question, in memory only.
        self.questions = LastQuestions(state.config.routing.intent_ttl)
        self.room_powers: RoomPowers | None = None  # set by the composition root, app.py

    def accepts_invite(self, invite: Invite) -> bool:
        config = self.state.config
        return policy.may_invite(invite.sender, config) and policy.room_allowed(
            invite.room_id, config
        )

    async def on_bot_membership(self, room_id: str, joined: bool) -> None:
        """The bot joined a room, or left it (kicked and banned alike): a claim naming a
        room it is in belongs there from now on, whether or not a message arrived."""
        state = self.state
        async with state.store.atomic() as tx:
            await tx.set_membership(room_id, joined, state.clock())
        if joined:
            state.arrivals.joined(room_id)
        else:
            state.arrivals.left(room_id)
        log.info("room membership room=%s joined=%s", room_id, joined)

    async def on_joined_rooms(self, rooms: Sequence[str], listed_at: datetime) -> None:
        """The homeserver's list of the bot's rooms, read at start (`listed_at`): the
        truth, also for a store from before membership was kept, except for a change
        that arrived since it was read."""
        state = self.state
        async with state.store.atomic() as tx:
            await tx.set_joined_rooms(rooms, listed_at)
            joined, left = await tx.rooms_by_membership()
        state.arrivals.set_rooms(joined, left)
        log.info("rooms joined count=%d", len(joined))

    async def on_messages(self, messages: Sequence[RoomMessage]) -> None:
        """Room messages in the order the homeserver sent them (one transaction). The
        plain ones are only seen: written together, in one database transaction; each
        command is handled on its own, after everything before it is written."""
        arrivals = self.state.arrivals
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
                arrivals.add(message.room_id, message.event_id, message.thread_root)

    async def _write_seen(self, seen: list[SeenMessage], arrived: list[RoomMessage]) -> None:
        if seen:
            async with self.state.store.atomic(durable=False) as tx:
                await tx.add_seen_many(seen)
            for record in seen:
                self.state.arrivals.remember_asker(record)
        for message in arrived:
            self.state.arrivals.add(message.room_id, message.event_id, message.thread_root)

    def _observe(
        self, message: RoomMessage
    ) -> tuple[Parsed | None, SeenMessage, Question | None] | None:
        """What a message is (a command or not), how the side-car records it, and the
        question an `again` would re-ask; None for messages the bot does not read."""
        config = self.state.config
        if message.is_edit and policy.is_from_people(message.sender, message.msgtype, config):
            return None, self._edit_seen(message), None
        if not policy.listens_to(message.sender, message.msgtype, message.is_edit, config):
            return None
        prefixes = config.routing.prefixes
        parsed = self._parse(message)
        # A structured invocation (MSC4391) is a command whatever its body says.
        structured = config.routing.describe_command and describe.is_invocation_for(
            message.invocation, prefixes, config.bot_user_id
        )
        asked = (
            None if structured else commands.asked_question(message.body, prefixes, message.msgtype)
        )
        if asked is not None:
            self.questions.remember(
                message.room_id,
                Question(
                    asked, message.sent_at, message.event_id, message.sender, message.thread_root
                ),
            )
        reask = (
            self.questions.last(message.room_id, self.state.clock())
            if isinstance(parsed, commands.RouteTo) and parsed.again
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
            message_hash=message_hash(self.state.salt, stands_for or message.body),
            is_command=stands_for is None,
            sender=message.sender,
            # An agent without the plugin answers the whole text (SPEC "The turn key").
            other_hashes=self._hashes(message.body) if stands_for is not None else (),
        )
        return parsed, record, reask

    def _parse(self, message: RoomMessage) -> Parsed | None:
        """The command a message is: its MSC4391 invocation when it mentions the bot (the
        arguments win over the body), else its body's; None when it is none."""
        config = self.state.config
        return describe.parse_message(
            message.body,
            message.invocation,
            config.routing.prefixes,
            config.bot_user_id,
            structured=config.routing.describe_command,
        )

    def _edit_seen(self, message: RoomMessage) -> SeenMessage:
        """An edit, seen as a new message of its sender (agents answer an edit as a new
        question), known by its new text and by its `* ` fallback body. Never a command."""
        new_text = message.new_body if message.new_body is not None else message.body
        return SeenMessage(
            room_id=message.room_id,
            event_id=message.event_id,
            thread_id=message.thread_root,
            sent_at=message.sent_at,
            message_hash=message_hash(self.state.salt, new_text),
            is_command=commands.parse_command(new_text, self.state.config.routing.prefixes)
            is not None,
            sender=message.sender,
            other_hashes=self._hashes(message.body),
        )

    def _hashes(self, text: str) -> tuple[str, ...]:
        hashed = message_hash(self.state.salt, text)
        return (hashed,) if hashed is not None else ()

    async def _on_command(
        self,
        message: RoomMessage,
        parsed: Parsed,
        seen: SeenMessage,
        reask: Question | None,
    ) -> None:
        state = self.state
        config, metrics = state.config, state.metrics
        now = state.clock()
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
            metrics.commands.labels(_command_name(parsed), "stale").inc()
            async with state.store.atomic(durable=False) as tx:
                await tx.add_seen(seen)
            return
        powers = None
        if isinstance(parsed, commands.LeaveRoom) and self.room_powers is not None:
            powers = await self.room_powers(message.room_id, message.sender)  # before the lock
        async with state.lock, state.writing() as tx:
            if await tx.command_handled(message.event_id):
                metrics.duplicates.labels("event").inc()
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
            content = replies.notice_content(text, message.event_id, message.thread_root)
            await tx.add_effect(outbox.reply(message.event_id, message.room_id, content), now)
            if result == LEAVING:  # after the reply: the bot can no longer post once gone
                await tx.add_effect(outbox.leave(message.event_id, message.room_id), now)
        crash_point("command-committed")
        state.arrivals.remember_asker(seen)  # the question of a multi-line form or `again`
        metrics.commands.labels(_command_name(parsed), result).inc()
        metrics.active_intents.set(len(state.live))
        log.info(
            "command handled room=%s event=%s intent=%s command=%s result=%s",
            message.room_id,
            message.event_id,
            intent.id if intent else "-",
            _command_name(parsed),
            result,
        )
        state.outbox.queued()

    async def _run_command(
        self,
        tx: Tx,
        parsed: Parsed,
        message: RoomMessage,
        reask: Question | None,
        powers: tuple[int, int] | None,
        now: datetime,
    ) -> tuple[replies.Text, Intent | None, str]:
        """The reply, the intent created (if any) and a result label for one command."""
        state = self.state
        config, prefix = state.config, state.prefix
        current = state.current(message.room_id, now)
        match parsed:
            case commands.CommandError(message=error):
                return replies.command_error(error), None, "malformed"
            case commands.ShowHelp():
                return replies.help_text(prefix, config.routing.prefixes), None, "ok"
            case commands.ListTargets():
                targets = policy.usable_targets(message.sender, config)
                return (
                    replies.targets_list(targets, prefix, config.routing.raw_models.allowed),
                    None,
                    "ok",
                )
            case commands.ShowStatus():
                reported = await state.reported(tx, current) if current is not None else []
                return replies.status(current, reported, now, state.timing, prefix), None, "ok"
            case commands.ShowHistory():
                routed = await tx.routed_turns(message.room_id, history.HISTORY_LENGTH)
                calls = await tx.unrouted_calls(message.room_id, HISTORY_CALLS)
                turns = history.latest(routed, history.failed_turns(calls))
                return replies.history(turns, prefix), None, "ok"
            case commands.LeaveRoom():
                if powers is None:
                    return replies.leave_unchecked(), None, "error"
                if not policy.may_ask_to_leave(*powers):
                    return replies.leave_refused(*powers), None, "refused"
                if current is not None:
                    await state.end(tx, current, EndReason.CLEARED, now)
                return replies.leaving(current), None, LEAVING
            case commands.ClearIntent():
                if current is None:
                    return replies.cleared(None, None, prefix), None, "ok"
                reported = await state.reported(tx, current)
                in_flight = any(
                    intents.answering(turn, len(calls), now, state.timing)
                    for turn, calls in zip(current.bound_turns, reported, strict=True)
                )
                cleared = await state.end(tx, current, EndReason.CLEARED, now)
                return replies.cleared(current, cleared, prefix, in_flight), None, "ok"
            case commands.RouteTo() as route:
                return await self._route(tx, route, message, current, reask, now)
        raise AssertionError(parsed)

    async def _route(
        self,
        tx: Tx,
        route: commands.RouteTo,
        message: RoomMessage,
        current: Intent | None,
        reask: Question | None,
        now: datetime,
    ) -> tuple[replies.Text, Intent | None, str]:
        state = self.state
        config, prefix, timing = state.config, state.prefix, state.timing
        resolved = policy.resolve_route(route, message.sender, config, prefix)
        if isinstance(resolved, policy.Refused):
            return replies.refusal(resolved.reason), None, "refused"
        if route.again and reask is None:
            text = replies.nothing_to_reask(route.target, prefix, timing.intent_ttl)
            return text, None, "no_question"
        question = reask.text if reask is not None else route.question
        recent = await tx.routes_since(message.sender, now - policy.RATE_WINDOW)
        if policy.rate_limited(recent, config):
            return replies.rate_limited(config.routes_per_hour), None, "rate_limited"
        intent = intents.new_intent(
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
            question_hash=message_hash(state.salt, question) if question else None,
            reasks=reask is not None,
        )
        replaced = None
        if current is not None:
            superseded = await state.end(tx, current, EndReason.SUPERSEDED, now)
            replaced = current if intents.unused_part_cancelled(current, superseded) else None
        await tx.save_intent(intent)
        state.live.set(intent)
        if reask is None:
            text = replies.confirmation(intent, replaced, timing, prefix)
            return text, intent, "routed"
        # The reply quotes the question: that copy is sent from memory, never stored.
        quoted = replies.reask_confirmation(
            intent, replies.excerpt(reask.text), reask.sender, reask.asked_at, replaced, prefix
        )
        state.outbox.send_from_memory(
            outbox.reply_key(message.event_id),
            replies.notice_content(quoted, message.event_id, message.thread_root),
        )
        text = replies.reask_confirmation(
            intent, None, reask.sender, reask.asked_at, replaced, prefix
        )
        return text, intent, "routed"

    async def on_undecryptable(self, message: EncryptedMessage) -> None:
        """An encrypted message the bot could not read: say so (it may have been a
        command), to each sender whose message went unread, once per sender and room and
        UNDECRYPTABLE_NOTICE_EVERY (another sender's notice never stands for theirs)."""
        state = self.state
        now = state.clock()
        bucket = int(now.timestamp() // UNDECRYPTABLE_NOTICE_EVERY.total_seconds())
        text = replies.cannot_decrypt(message.sender, state.prefix)
        content = replies.notice_content(text, message.event_id)
        async with state.store.atomic() as tx:
            added = await tx.add_effect(
                outbox.undecryptable(message.room_id, message.sender, bucket, content), now
            )
        if added:
            state.outbox.queued()

    async def on_unreadable_room(self, message: EncryptedMessage) -> None:
        """An encrypted room while encryption is off: say it once, in a plain notice."""
        state = self.state
        if not policy.room_allowed(message.room_id, state.config):
            return
        content = replies.notice_content(replies.encryption_off())
        async with state.store.atomic() as tx:
            added = await tx.add_effect(outbox.unreadable(message.room_id, content), state.clock())
        if added:
            log.info("encrypted room unreadable room=%s", message.room_id)
            state.outbox.queued()

    async def on_event_given_up(self, message: RoomMessage, reference: str) -> None:
        """A message whose handling kept failing, given up (route_sidecar.appservice): a command the
        bot would have answered gets a reply with the reference its log line carries."""
        state = self.state
        config = state.config
        if not (
            policy.room_allowed(message.room_id, config)
            and policy.listens_to(message.sender, message.msgtype, message.is_edit, config)
            and self._parse(message) is not None
        ):
            return
        content = replies.notice_content(
            replies.command_failed(reference), message.event_id, message.thread_root
        )
        async with state.store.atomic() as tx:
            if await tx.command_handled(message.event_id):
                return  # it was answered before it failed
            added = await tx.add_effect(
                outbox.reply(message.event_id, message.room_id, content), state.clock()
            )
        if added:
            state.outbox.queued()

    async def on_redaction(self, redaction: Redaction) -> None:
        state = self.state
        now = state.clock()
        async with state.lock, state.writing() as tx:
            intent = await tx.intent_by_command(redaction.redacted_event_id)
            if intent is None or intent.room_id != redaction.room_id:
                return
            intent = state.current(intent.room_id, now) if intent.state.is_live else intent
            if intent is None or intent.command_event_id != redaction.redacted_event_id:
                return
            ended = intents.cancel_on_redaction(intent, now, state.timing)
            if ended is not intent:
                await state.record_end(tx, ended, now)
                log.info(
                    "intent cancelled room=%s intent=%s reason=redacted", intent.room_id, intent.id
                )
        state.outbox.queued()


def _command_name(parsed: Parsed) -> str:
    return {
        commands.ShowStatus: "status",
        commands.ShowHelp: "help",
        commands.ListTargets: "targets",
        commands.ShowHistory: "history",
        commands.LeaveRoom: "leave",
        commands.ClearIntent: "auto",
        commands.RouteTo: "route",
        commands.CommandError: "malformed",
    }[type(parsed)]
