"""What both listeners do against clients that are broken or hostile, below the routes:
a request aiohttp cannot parse is refused without its bytes reaching the log or the
answer (they may hold a token); a connection with no complete request for a while is
closed; and each listener holds a bounded number of connections, so idle ones cannot
use up the process's open files."""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

log = logging.getLogger("route_sidecar.listeners")
# Longer than the clients' own keep-alive (Synapse's pool keeps one 2 min, httpx 5 s,
# aiohttp 15 s), so a client closes an idle connection before the side-car does. It also
# bounds a request's header: aiohttp's timer runs until a whole header has arrived.
IDLE_SECONDS = 180.0
MAX_CONNECTIONS = 1000  # per listener, at most
FILES_KEPT = 128  # open files left to the database, the homeserver client and logs
WARN_EVERY = 60.0  # seconds between two "connection limit reached" log lines
ErrorResponse = Callable[[int, str], web.Response]  # status, message → the listener's error


def connection_limit(listeners: int = 2) -> int:
    """Connections per listener: half of the open files beyond those kept, shared
    between the listeners."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(8, min(MAX_CONNECTIONS, (soft - FILES_KEPT) // (2 * listeners)))


class _Connection(RequestHandler):
    __slots__ = ("_error_response",)

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._error_response = manager.error_response

    @property
    def idle(self) -> bool:
        """No request being handled or waiting (a half-sent header counts as idle)."""
        return self.transport is not None and not self._request_in_progress and not self._messages

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError | RequestPayloadError):
            return super().handle_error(request, status, exc, message)  # the side-car's fault
        # aiohttp's message quotes the request line, header or body bytes it choked on:
        # neither logged nor echoed, only the kind of error.
        kind = type(exc).__name__
        code = getattr(exc, "code", 0) or 400
        log.warning("malformed request refused status=%d error=%s", code, kind)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        response = self._error_response(code, f"malformed HTTP request ({kind})")
        response.force_close()
        return response


class GuardedServer(web.Server):
    """aiohttp's low-level server with the three guards of this module."""

    def __init__(
        self,
        handler: Any,
        *,
        error_response: ErrorResponse,
        max_connections: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, keepalive_timeout=IDLE_SECONDS, **kwargs)
        self.error_response = error_response
        self.max_connections = max_connections
        self.refused = 0  # connections closed at the limit since the last log line
        self._warned_at = -WARN_EVERY

    def __call__(self) -> RequestHandler:
        return _Connection(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._connections) <= self.max_connections:
            return
        # Full: the connection idle longest makes room (one with a request in progress is
        # never cut); when every one is busy, the newcomer is closed.
        victim = next(
            (c for c in self._connections if isinstance(c, _Connection) and c.idle), handler
        )
        victim.force_close()
        self.refused += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            log.warning(
                "connection limit reached limit=%d closed=%d", self.max_connections, self.refused
            )
            self._warned_at, self.refused = now, 0


class GuardedAppRunner(web.AppRunner):
    """An `Application`'s runner on a `GuardedServer`."""

    def __init__(
        self,
        app: web.Application,
        *,
        error_response: ErrorResponse,
        max_connections: int,
        handle_signals: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, handle_signals=handle_signals, **kwargs)
        self._server_kwargs = {
            "error_response": error_response,
            "max_connections": max_connections,
            **kwargs,
        }

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # starts the application up and freezes it
        return GuardedServer(
            plain.request_handler, request_factory=plain.request_factory, **self._server_kwargs
        )
