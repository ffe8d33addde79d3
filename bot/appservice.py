"""The appservice listener that the homeserver pushes to.

Not mautrix's `AppService` handler: that one keeps transaction ids in memory only and
acknowledges before its handlers run (a crash would lose the command). Here a
transaction is handled event by event, each change committed, its id stored, and only
then acknowledged; a retried transaction id is acknowledged without reprocessing, also
after a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import policy
from .auth import bearer_token, token_matches
from .config import Config
from .events import EncryptedMessage, Invite, Redaction, RoomMessage, Undecryptable, parse_event
from .faults import crash_point
from .matrix import NOT_ALLOWED, MatrixBot
from .metrics import Metrics
from .service import RouteService, utcnow

if TYPE_CHECKING:  # bot.crypto needs python-olm, an optional dependency
    from .crypto import BotCrypto

log = logging.getLogger("route_sidecar.appservice")
MAX_TRANSACTION_BYTES = 64 * 1024 * 1024
CRYPTO_READY_SECONDS = 30.0


def _matrix_error(status: int, errcode: str, error: str) -> web.Response:
    return web.json_response({"errcode": errcode, "error": error}, status=status)


class AppserviceShell:
    def __init__(
        self,
        config: Config,
        service: RouteService,
        bot: MatrixBot,
        metrics: Metrics,
        crypto: BotCrypto | None = None,
    ) -> None:
        self.config = config
        self.service = service
        self.bot = bot
        self.metrics = metrics
        self.crypto = crypto
        self._waiting: set[asyncio.Task[None]] = set()  # messages waiting for their key
        self._left: set[str] = set()  # rooms off the allow-list already left
        self._hs_token = config.appservice.hs_token.encode()
        # Transaction ids are the homeserver's counter for one registration: a new
        # registration (new hs_token) may count from 1 again, so ids are kept per token.
        self._txn_scope = hashlib.sha256(self._hs_token).hexdigest()[:12]
        self._order = asyncio.Lock()  # transactions are applied one at a time, in order

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_TRANSACTION_BYTES)
        for prefix in ("/_matrix/app/v1", ""):  # "" is the legacy unprefixed path
            app.router.add_put(prefix + "/transactions/{txn_id}", self._guard(self.transaction))
            app.router.add_get(prefix + "/users/{user_id}", self._guard(self.query_user))
            app.router.add_get(prefix + "/rooms/{alias}", self._guard(self.query_alias))
        app.router.add_post("/_matrix/app/v1/ping", self._guard(self.ping))
        return app

    def _guard(
        self, handler: Callable[[web.Request], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """hs_token check, constant time: missing → 401, wrong → 403 (Matrix AS spec)."""

        async def guarded(request: web.Request) -> web.Response:
            token = bearer_token(request.headers)
            if token is None and request.query.get("access_token"):  # deprecated query form
                token = request.query["access_token"].encode("utf-8", "surrogateescape")
            if not token:
                return _matrix_error(401, "M_UNAUTHORIZED", "Missing hs_token")
            if not token_matches(token, [self._hs_token]):
                return _matrix_error(403, "M_FORBIDDEN", "Wrong hs_token")
            return await handler(request)

        return guarded

    async def ping(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def query_user(self, request: web.Request) -> web.Response:
        if request.match_info["user_id"] == self.config.bot_user_id:
            return web.json_response({})
        return _matrix_error(404, "M_NOT_FOUND", "No such user")

    async def query_alias(self, request: web.Request) -> web.Response:
        return _matrix_error(404, "M_NOT_FOUND", "No such room alias")

    async def transaction(self, request: web.Request) -> web.Response:
        txn_id = request.match_info["txn_id"]
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _matrix_error(400, "M_NOT_JSON", "Body is not JSON")
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list):
            return _matrix_error(400, "M_BAD_JSON", "`events` must be a list")
        if self.crypto is not None and not self.crypto.ready.is_set():
            try:  # the bot's device is being set up: keys and messages wait for it
                await asyncio.wait_for(self.crypto.ready.wait(), CRYPTO_READY_SECONDS)
            except TimeoutError:
                return _matrix_error(503, "M_UNKNOWN", "Encryption is starting; retry")
        async with self._order:
            async with self.service.store.atomic() as tx:
                duplicate = await tx.has_transaction(f"{self._txn_scope}:{txn_id}")
            if duplicate:
                self.metrics.duplicates.labels("transaction").inc()
                self.metrics.transactions.labels("duplicate").inc()
                log.info("transaction duplicate txn=%s", txn_id)
                return web.json_response({})
            crash_point("transaction-received")
            try:
                if self.crypto is not None:
                    await self.crypto.receive(body)
                # Runs of plain room messages are handed over together: the side-car
                # writes what it saw of them in one database transaction, not one each.
                messages: list[RoomMessage] = []
                for raw in events:
                    if self.crypto is not None and isinstance(raw, dict):
                        await self.crypto.track_state(raw)
                    event = parse_event(raw)
                    await self._leave_if_not_allowed(event)
                    if isinstance(event, RoomMessage):
                        messages.append(event)
                        continue
                    if messages:
                        await self.service.on_messages(messages)
                        messages = []
                    await self.handle_event(raw)
                if messages:
                    await self.service.on_messages(messages)
            except Exception:
                # Nothing is acknowledged: the homeserver retries, and events already
                # handled are recognised by their event id.
                log.exception("transaction failed txn=%s", txn_id)
                self.metrics.transactions.labels("error").inc()
                return _matrix_error(500, "M_UNKNOWN", "Transaction failed; retry")
            crash_point("transaction-handled")
            async with self.service.store.atomic() as tx:
                await tx.record_transaction(f"{self._txn_scope}:{txn_id}", utcnow())
        self.metrics.transactions.labels("ok").inc()
        log.debug("transaction handled txn=%s events=%d", txn_id, len(events))
        return web.json_response({})

    async def _leave_if_not_allowed(self, event: Any) -> None:
        """An event from a room off the allow-list (the bot joined before the list was
        set): leave it, once."""
        room_id = getattr(event, "room_id", None)
        if (
            room_id is None
            or isinstance(event, Invite)
            or policy.room_allowed(room_id, self.config)
            or room_id in self._left
        ):
            return
        self._left.add(room_id)
        await self.bot.leave(room_id, NOT_ALLOWED)

    async def handle_event(self, raw: Any) -> None:
        event = parse_event(raw)
        match event:
            case RoomMessage():
                await self.service.on_message(event)
            case Redaction():
                await self.service.on_redaction(event)
            case EncryptedMessage():
                await self._encrypted(raw, event)
            case Invite() if event.invitee == self.config.bot_user_id:
                if self.service.accepts_invite(event):
                    if await self.bot.join(event.room_id) and self.crypto is not None:
                        await self.crypto.joined(event.room_id)
                else:
                    log.info("invite refused room=%s sender=%s", event.room_id, event.sender)
                    await self.bot.decline(event.room_id, "Not invited by a permitted user")
            case _:
                return

    async def _encrypted(self, raw: Any, event: EncryptedMessage) -> None:
        """Decrypt and handle like a plain event. A message whose room key has not
        arrived is stored (ciphertext only) and waits for it off the transaction (the
        key comes in a later one); one that cannot be read at all gets a notice."""
        if event.sender == self.config.bot_user_id:
            return
        if self.crypto is None:
            await self.service.on_unreadable_room(event)
            return
        if not await self.crypto.is_encrypted(event.room_id):
            # Joined before encryption was on here (or the state was missed): learn it now,
            # so the reply goes out encrypted.
            await self.crypto.joined(event.room_id)
        try:
            decrypted = await self.crypto.decrypt(raw)
        except Undecryptable as error:
            if error.session_id is None:
                log.warning(
                    "event not decrypted room=%s event=%s reason=%s",
                    event.room_id,
                    event.event_id,
                    error.reason,
                )
                await self.service.on_undecryptable(event)
                return
            now = utcnow()
            async with self.service.store.atomic() as tx:
                await tx.hold_undecrypted(event.event_id, event.room_id, error.session_id, raw, now)
            self._wait_for_key(raw, event, error.session_id, now)
            return
        await self.handle_event(decrypted)

    def _wait_for_key(
        self, raw: Any, event: EncryptedMessage, session_id: str, received_at: datetime
    ) -> None:
        name = f"key-wait {event.event_id}"
        if any(task.get_name() == name for task in self._waiting):
            return  # resumed after a restart, and now redelivered by a retried transaction
        waiting = asyncio.create_task(
            self._await_key(raw, event, session_id, received_at), name=name
        )
        self._waiting.add(waiting)
        waiting.add_done_callback(self._waiting.discard)

    async def _await_key(
        self, raw: Any, event: EncryptedMessage, session_id: str, received_at: datetime
    ) -> None:
        """Wait for the room key, asking the sender's device for it; the wait counts from
        the request too (an event resumed after a restart asks again, and its answer gets
        the whole `key_wait`)."""
        assert self.crypto is not None
        log.info("event waits for its key room=%s event=%s", event.room_id, event.event_id)
        asked_at = await self._request_key(raw, event, session_id)
        deadline = max(received_at, asked_at or received_at) + self.config.encryption.key_wait
        wait = max(0.0, (deadline - utcnow()).total_seconds())
        arrived = await self.crypto.wait_for_key(event.room_id, session_id, wait)
        async with self._order:
            try:
                decrypted = await self.crypto.decrypt(raw) if arrived or wait == 0 else None
            except Undecryptable:
                decrypted = None
            if decrypted is None:
                log.warning(
                    "event not decrypted room=%s event=%s reason=no-key",
                    event.room_id,
                    event.event_id,
                )
                await self.service.on_undecryptable(event)
            else:
                await self.handle_event(decrypted)
            async with self.service.store.atomic() as tx:
                await tx.drop_undecrypted(event.event_id)

    async def _request_key(
        self, raw: Any, event: EncryptedMessage, session_id: str
    ) -> datetime | None:
        """When the key was asked for (None: it was not); a failed request leaves the
        event to its plain wait."""
        assert self.crypto is not None
        try:
            return await self.crypto.request_key(
                raw, self.config.encryption.key_wait.total_seconds()
            )
        except Exception as error:
            log.warning(
                "room key not requested room=%s event=%s session=%s error=%s",
                event.room_id,
                event.event_id,
                session_id,
                type(error).__name__,
            )
            return None

    async def resume_undecrypted(self) -> None:
        """After a restart: the events that were waiting for their key wait on (or, their
        time up, are tried once more and get their notice)."""
        async with self.service.store.atomic() as tx:
            waiting = await tx.undecrypted()
        for raw, session_id, received_at in waiting:
            event = parse_event(raw)
            if isinstance(event, EncryptedMessage):
                self._wait_for_key(raw, event, session_id, received_at)
        if waiting:
            log.info("events waiting for their key resumed count=%d", len(waiting))
