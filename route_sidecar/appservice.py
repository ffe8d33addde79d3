"""The appservice listener that the homeserver pushes to.

Not mautrix's `AppService` handler: that one keeps transaction ids in memory only and
acknowledges before its handlers run (a crash would lose the command). Here a
transaction is handled event by event, each change committed, its id stored, and only
then acknowledged; a retried transaction id is acknowledged without reprocessing, also
after a restart. An event whose handling keeps failing is given up after
MAX_EVENT_ATTEMPTS (counted in the database), so it cannot hold back every room behind it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .auth import bearer_token, token_matches
from .config import Config
from .core import policy
from .core.events import (
    EncryptedMessage,
    Invite,
    Membership,
    PowerLevels,
    Redaction,
    RoomMessage,
    Undecryptable,
    parse_event,
)
from .faults import crash_point, fail_point
from .listeners import GuardedAppRunner, connection_limit
from .matrix import NOT_ALLOWED, MatrixBot
from .metrics import Metrics
from .service import RouteService, utcnow

if TYPE_CHECKING:  # route_sidecar.crypto needs python-olm, an optional dependency
    from .crypto import BotCrypto

log = logging.getLogger("route_sidecar.appservice")
# Synapse sends up to 100 events (64 KiB each) and 100 ephemeral events and to-device
# messages; a to-device message may be as big as its client's request (50 MB by default).
# A transaction refused for its size is retried forever, so the limit stays above those.
MAX_TRANSACTION_BYTES = 64 * 1024 * 1024
CRYPTO_READY_SECONDS = 30.0
MAX_EVENT_ATTEMPTS = 3  # failed attempts at one event before it is given up
ERRCODES = {404: "M_UNRECOGNIZED", 405: "M_UNRECOGNIZED", 413: "M_TOO_LARGE"}


def _matrix_error(status: int, errcode: str, error: str) -> web.Response:
    return web.json_response({"errcode": errcode, "error": error}, status=status)


def _malformed(status: int, error: str) -> web.Response:
    return _matrix_error(status, "M_UNRECOGNIZED", error)


@web.middleware
async def _matrix_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own refusals (no such path, wrong method, body too large) as Matrix
    errors."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        response = _matrix_error(
            error.status, ERRCODES.get(error.status, "M_UNKNOWN"), error.reason
        )
        if "Allow" in error.headers:
            response.headers["Allow"] = error.headers["Allow"]
        return response


def _event_key(raw: Any, fallback: str) -> str:
    event_id = raw.get("event_id") if isinstance(raw, dict) else None
    return event_id if isinstance(event_id, str) and event_id else fallback


def _reference(event_key: str) -> str:
    """What the reply and the log line of a given-up event both show (the same on every
    try, so a reply queued before a crash matches the log line after it)."""
    return hashlib.sha256(event_key.encode("utf-8", "surrogateescape")).hexdigest()[:12]


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
        self._given_up: dict[str, str] | None = None  # event key → reference, once loaded

    def make_runner(self) -> web.BaseRunner:
        return GuardedAppRunner(
            self.make_app(),
            access_log=None,
            error_response=_malformed,
            max_connections=connection_limit(),
        )

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_TRANSACTION_BYTES, middlewares=[_matrix_errors])
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
        log.debug("transaction received txn=%s", txn_id)  # bench/matrix.py times from here
        if request.content_length is not None and request.content_length > MAX_TRANSACTION_BYTES:
            # Refused before a byte of it is read.
            return _matrix_error(413, "M_TOO_LARGE", f"Over {MAX_TRANSACTION_BYTES} bytes")
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep
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
                await self._handle_events(f"{self._txn_scope}:{txn_id}", events)
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

    async def _handle_events(self, txn_key: str, events: list[Any]) -> None:
        """The events in order. Runs of plain room messages are handed over together: the
        side-car writes what it saw of them in one database transaction, not one each."""
        if self._given_up is None:
            async with self.service.store.atomic(durable=False) as tx:
                self._given_up = await tx.given_up_events()
        run: list[tuple[str, RoomMessage]] = []
        for position, raw in enumerate(events):
            key = _event_key(raw, f"{txn_key}#{position}")
            if key in self._given_up:  # given up, then a crash before the acknowledgement
                await self._answer_given_up(raw, self._given_up[key])
                continue
            try:
                if self.crypto is not None and isinstance(raw, dict):
                    await self.crypto.track_state(raw)
                event = parse_event(raw)
                await self._leave_if_not_allowed(event)
            except Exception as error:
                await self._failed(key, raw, error)
                continue
            if isinstance(event, RoomMessage):
                run.append((key, event))
                continue
            await self._hand_over(run)
            run = []
            try:
                fail_point("event-received", raw)
                await self.handle_event(raw)
                fail_point("event-handled", raw)
            except Exception as error:
                await self._failed(key, raw, error)
        await self._hand_over(run)

    async def _hand_over(self, run: list[tuple[str, RoomMessage]]) -> None:
        """A run of room messages, together; if that fails, one by one, so that the one
        failing is known (those handled already are recognised by their event id)."""
        if not run:
            return
        try:
            for _, message in run:
                fail_point("event-received", message)
            await self.service.on_messages([message for _, message in run])
            for _, message in run:
                fail_point("event-handled", message)
            return
        except Exception as error:
            if len(run) == 1:
                await self._failed(run[0][0], run[0][1], error)
                return
        for key, message in run:
            try:
                fail_point("event-received", message)
                await self.service.on_message(message)
                fail_point("event-handled", message)
            except Exception as error:
                await self._failed(key, message, error)

    async def _failed(
        self, key: str, event: Any, error: Exception, allowed: int = MAX_EVENT_ATTEMPTS
    ) -> None:
        """One more failed attempt at an event. Under `allowed` attempts the error stands
        (the transaction is answered 500 and the homeserver retries it); then the event
        is given up, a command answered with a reference, and the transaction goes on."""
        room_id = event.get("room_id") if isinstance(event, dict) else event.room_id
        room_id = room_id if isinstance(room_id, str) else None
        async with self.service.store.atomic() as tx:
            attempts = await tx.count_event_failure(key, room_id, utcnow())
        if attempts < allowed:
            log.warning(
                "event failed room=%s event=%s attempt=%d of %d",
                room_id,
                key,
                attempts,
                allowed,
            )
            raise error
        reference = _reference(key)
        log.error(
            "event given up room=%s event=%s attempts=%d reference=%s",
            room_id,
            key,
            attempts,
            reference,
            exc_info=error,
        )
        async with self.service.store.atomic() as tx:
            await tx.give_up_event(key, reference, utcnow())
        assert self._given_up is not None
        self._given_up[key] = reference
        await self._answer_given_up(event, reference)

    async def _answer_given_up(self, event: Any, reference: str) -> None:
        """A command given up gets a reply with the reference; an encrypted one is
        decrypted for it first. An event that cannot be read or parsed gets none (the
        log line that gave it up names it), and never holds up the transaction."""
        try:
            message = event if isinstance(event, RoomMessage) else parse_event(event)
            if isinstance(message, EncryptedMessage) and self.crypto is not None:
                message = parse_event(await self.crypto.decrypt(event))
        except Exception as error:
            log.warning(
                "event given up without a reply reference=%s error=%s",
                reference,
                type(error).__name__,
            )
            return
        if isinstance(message, RoomMessage):
            await self.service.on_event_given_up(message, reference)

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
                    if await self.bot.join(event.room_id):
                        await self.service.on_bot_membership(event.room_id, joined=True)
                        await self.bot.descriptions.publish(event.room_id)
                        if self.crypto is not None:
                            await self.crypto.joined(event.room_id)
                else:
                    log.info("invite refused room=%s sender=%s", event.room_id, event.sender)
                    await self.bot.decline(event.room_id, "Not invited by a permitted user")
            case Membership() if event.user_id == self.config.bot_user_id:
                await self.service.on_bot_membership(
                    event.room_id, joined=event.membership == "join"
                )
                if event.membership == "join":  # joined however it was (checked, not resent)
                    await self.bot.descriptions.publish(event.room_id)
            case PowerLevels():  # the bot may have been given the level to describe
                await self.bot.descriptions.publish(event.room_id)
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
        fail_point("event-received", decrypted)  # its body is known from here on
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
                try:
                    fail_point("event-received", decrypted)
                    await self.handle_event(decrypted)
                except Exception as error:
                    # Off its transaction, only a restart would try it again (and fail
                    # again): given up at once, its sender told with the reference.
                    await self._failed(event.event_id, decrypted, error, allowed=1)
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
