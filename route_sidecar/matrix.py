"""The Matrix client side of the bot, through mautrix's IntentAPI: registering the bot
user, joining or declining invites, and delivering the outbox (replies, edits,
reactions) in order. Every send carries a transaction id derived from the outbox row,
so a send repeated after a crash is deduplicated by the homeserver."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from aiohttp import ClientSession
from mautrix.api import Method, Path
from mautrix.appservice import AppServiceAPI, IntentAPI
from mautrix.appservice.state_store import ASStateStore
from mautrix.client.state_store import MemoryStateStore
from mautrix.errors import MatrixRequestError, MatrixStandardRequestError
from mautrix.types import EventType, RoomID, UserID

from . import outbox
from .config import Config
from .core import policy, replies
from .descriptions import CommandDescriptions
from .faults import crash_point
from .metrics import Metrics
from .store import Store

if TYPE_CHECKING:  # route_sidecar.crypto needs python-olm, an optional dependency
    from .crypto import BotCrypto

log = logging.getLogger("route_sidecar.matrix")
MAX_ATTEMPTS = 8
LEFT_ROOM = "(left)"  # what a leave's outbox row records in place of an event id
ASKED_TO_LEAVE = "Asked to leave by a room admin (`/route leave`)"
NOT_ALLOWED = "This room is not on the route side-car's allow-list (`rooms` in its config)"


class _MemoryASStateStore(MemoryStateStore, ASStateStore):
    """mautrix's AppService writes mx-state.json unless given a store; memory is enough:
    the bot only needs power levels, which it fetches again after a restart."""

    def __init__(self) -> None:
        MemoryStateStore.__init__(self)
        ASStateStore.__init__(self)


class MatrixBot:
    def __init__(
        self,
        config: Config,
        store: Store,
        metrics: Metrics,
        instance: str,
        queued: outbox.Outbox | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        crypto: BotCrypto | None = None,
    ) -> None:
        self.clock = clock
        self.crypto = crypto  # None: encryption off; events go out as they are
        self.config = config
        self.store = store
        self.metrics = metrics
        self.instance = instance  # per-database id: keeps transaction ids unique
        self.outbox = queued if queued is not None else outbox.Outbox()
        self.session: ClientSession | None = None
        self.api: AppServiceAPI | None = None
        self.registered = asyncio.Event()
        self.descriptions = CommandDescriptions(config, lambda: self.intent)

    async def start(self) -> None:
        self.session = ClientSession()
        self.api = AppServiceAPI(
            base_url=self.config.homeserver.address,
            bot_mxid=UserID(self.config.bot_user_id),
            token=self.config.appservice.as_token,
            log=logging.getLogger("route_sidecar.mautrix"),  # type: ignore[arg-type]
            state_store=_MemoryASStateStore(),
            client_session=self.session,
            default_retry_count=1,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    @property
    def intent(self) -> IntentAPI:
        assert self.api is not None, "MatrixBot.start() first"
        return cast(IntentAPI, self.api.bot_intent())

    async def ensure_registered(self, stop: asyncio.Event) -> None:
        """Register the bot user (and its display name), retrying while the homeserver is
        unreachable; the lookup API serves meanwhile."""
        delay = 1.0
        while not stop.is_set():
            try:
                await self.intent.ensure_registered()
                with contextlib.suppress(MatrixRequestError):
                    await self.intent.set_displayname(self.config.appservice.bot_displayname)
                self.registered.set()
                log.info("bot registered user=%s", self.config.bot_user_id)
                return
            except Exception as error:  # any failure: retry later
                log.warning(
                    "bot registration failed, retrying in %.0fs error=%s",
                    delay,
                    type(error).__name__,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 60)

    async def join(self, room_id: str) -> bool:
        try:
            await self.intent.join_room_by_id(RoomID(room_id))
        except MatrixRequestError as error:
            log.warning("room join failed room=%s error=%s", room_id, error.errcode)
            return False
        log.info("room joined room=%s", room_id)
        return True

    async def joined_rooms(self) -> list[str] | None:
        """The rooms the bot is in, as the homeserver says; None when it cannot say."""
        try:
            return [str(room_id) for room_id in await self.intent.get_joined_rooms()]
        except MatrixRequestError as error:
            log.warning("joined rooms not listed error=%s", error.errcode)
            return None

    async def leave_rooms_not_allowed(self) -> None:
        """With an allow-list (`rooms`), leave every joined room that is not on it."""
        if not self.config.rooms:
            return
        try:
            joined = await self.intent.get_joined_rooms()
        except MatrixRequestError as error:
            log.warning("joined rooms not listed error=%s", error.errcode)
            return
        for room_id in joined:
            if not policy.room_allowed(room_id, self.config):
                await self.leave(room_id, NOT_ALLOWED)

    async def power_levels(self, room_id: str, user_id: str) -> tuple[int, int] | None:
        """The user's power level in the room and the level needed to kick; None when
        the homeserver cannot say."""
        try:
            state = await self.intent.api.request(Method.GET, Path.v3.rooms[room_id].state)
        except Exception as error:  # network or homeserver trouble
            log.warning("power levels not read room=%s error=%s", room_id, type(error).__name__)
            return None
        return policy.room_power(user_id, state if isinstance(state, list) else [])

    async def leave(self, room_id: str, reason: str) -> None:
        await self.descriptions.withdraw(room_id)
        try:
            await self.intent.leave_room(RoomID(room_id), reason=reason)
            log.info("room left room=%s", room_id)
        except MatrixRequestError as error:
            log.warning("room leave failed room=%s error=%s", room_id, error.errcode)

    async def decline(self, room_id: str, reason: str) -> None:
        try:
            await self.intent.leave_room(RoomID(room_id), reason=reason)
            log.info("invite declined room=%s", room_id)
        except MatrixRequestError as error:
            log.warning("invite decline failed room=%s error=%s", room_id, error.errcode)

    # ---- the outbox -------------------------------------------------------------------

    async def deliver_outbox(self) -> int:
        """Send every queued room event: replies to commands first (what someone just
        typed and waits for; a command that ends a route also queues the edit of the older
        confirmation, which can wait one send), then the rest, oldest first. Returns how
        many were sent."""
        async with self.store.atomic() as tx:
            pending = outbox.in_sending_order(await tx.unsent_effects(self.clock()))
        sent = 0
        unsent_rooms: set[str] = set()  # rooms with an earlier event not sent in this pass
        for effect in pending:
            is_leave = effect.kind is outbox.EffectKind.LEAVE
            if is_leave and effect.room_id in unsent_rooms:
                continue  # leave only once everything before it is sent
            content = self.outbox.content_of(effect)
            if effect.edits:
                async with self.store.atomic() as tx:
                    target = await tx.effect_event_id(effect.edits)
                if target is None:
                    unsent_rooms.add(effect.room_id)
                    continue  # the event it edits is not sent yet (or failed): later
                content["m.relates_to"]["event_id"] = target
            txn_id = f"rs-{self.instance}-{effect.id}"
            event_type = effect.event_type
            try:
                if is_leave:  # `/route leave`, after its reply
                    await self.descriptions.withdraw(effect.room_id)
                    await self.intent.leave_room(RoomID(effect.room_id), reason=ASKED_TO_LEAVE)
                    event_id = LEFT_ROOM
                else:
                    if (
                        self.crypto is not None
                        and not effect.sent_in_clear
                        and await self.crypto.is_encrypted(effect.room_id)
                    ):
                        event_type, content = await self.crypto.encrypt(
                            effect.room_id, event_type, content
                        )
                    # bench/matrix.py: the side-car's own time ends here.
                    log.debug("room event sending room=%s key=%s", effect.room_id, effect.key)
                    event_id = await self.intent.send_message_event(
                        RoomID(effect.room_id),
                        EventType.find(event_type),
                        cast(Any, content),  # a plain JSON object: mautrix sends it as it is
                        txn_id=txn_id,
                    )
            except MatrixStandardRequestError as error:
                permanent = error.http_status < 500 and error.http_status != 429
                give_up = permanent or effect.attempts + 1 >= MAX_ATTEMPTS
                await self._attempt_failed(effect, give_up, error.errcode)
                unsent_rooms.add(effect.room_id)
                continue
            except Exception as error:  # network or homeserver trouble
                give_up = effect.attempts + 1 >= MAX_ATTEMPTS
                await self._attempt_failed(effect, give_up, type(error).__name__)
                unsent_rooms.add(effect.room_id)
                continue
            crash_point("event-sent")
            async with self.store.atomic() as tx:
                stored = await tx.mark_effect_sent(effect.id, event_id)
                if stored is not None and stored != effect.content and not is_leave:
                    # Replaced while it was being sent (a receipt's later outcome, a newer
                    # account): what the room shows catches up by an edit, at the next
                    # delivery pass (an edit's newer content edits the same event again).
                    later = json.loads(stored)
                    edit = later if effect.edits else replies.edit_of(later)
                    await tx.add_effect(outbox.late_edit(effect, edit), self.clock())
            self.outbox.settled(effect.key)
            self.metrics.room_effects.labels("sent").inc()
            log.info(
                "room event sent room=%s kind=%s event=%s", effect.room_id, effect.kind, event_id
            )
            sent += 1
        return sent

    async def _attempt_failed(
        self, effect: outbox.PendingEffect, give_up: bool, error: str
    ) -> None:
        async with self.store.atomic() as tx:
            await tx.mark_effect_attempt(effect.id, give_up)
        if give_up:
            self.outbox.settled(effect.key)
        self.metrics.room_effects.labels("failed" if give_up else "retry").inc()
        log.warning(
            "room event %s room=%s kind=%s error=%s",
            "abandoned" if give_up else "send failed",
            effect.room_id,
            effect.kind,
            error,
        )


async def run_outbox(bot: MatrixBot, wake: asyncio.Event, stop: asyncio.Event) -> None:
    """Deliver the outbox whenever the service queues something, and every few seconds
    (retries, and what a crash left unsent)."""
    await bot.registered.wait()
    while not stop.is_set():
        wake.clear()
        try:
            await bot.deliver_outbox()
        except Exception:
            log.exception("outbox delivery failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), 2.0)
