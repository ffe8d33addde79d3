"""Hermes 0.17 and later: the plugin asks route-sidecar itself, so routing needs no change
to the endpoint Hermes calls (SPEC "Integrations").

Turned on by `ROUTE_SIDECAR_URL` (the lookup API, e.g. `http://127.0.0.1:29334`) and
`ROUTE_SIDECAR_TOKEN` in Hermes's environment; off by default. Then, for every call of the
agent's main loop in a Matrix room:

- `llm_request` middleware: stamps the call as `stamp.py` does, names it (`call_id` in
  its `matrix_context`), claims it (`POST /v1/claim`), and on an override sets the
  request's `model` to the route's model: any endpoint that serves by model name (Ollama,
  a LiteLLM model group, OpenRouter, a dispatcher that honours `model`) then serves it;
- `llm_execution` middleware: times the call and reports what the endpoint answered
  with (its response's `model`, ok or error, the latency) to the intent, or to
  `POST /v1/outcome` for a call without a route, so the room's account, the retry
  suggestion and `!route history` stay true with no dispatcher report.

A dispatcher that also claims and reports stays correct: its claim and its report carry
the same `call_id` (it forwards `matrix_context`), and the side-car counts the call once.

It fails open: a side-car that is down, slow (`ROUTE_SIDECAR_TIMEOUT`, default 0.5 s) or
refusing leaves the request as it was, with one warning a minute in Hermes's log and never
an error to the user. Standard library only; one kept connection per thread; reports are
sent by a background thread, so the answer never waits for them.
"""

from __future__ import annotations

import http.client
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from . import stamp

URL_ENV = "ROUTE_SIDECAR_URL"
TOKEN_ENV = "ROUTE_SIDECAR_TOKEN"
TIMEOUT_ENV = "ROUTE_SIDECAR_TIMEOUT"
DEFAULT_TIMEOUT = 0.5  # seconds, for the claim each LLM call waits for
REPORT_TIMEOUT = 5.0  # seconds, for a report (sent in the background)
WARN_EVERY = 60.0  # seconds between two warnings that the side-car is not answering
REPORTS_QUEUED = 1000  # reports waiting to be sent; past that the newest are dropped
PENDING_KEPT = 1000  # claims waiting for their call's execution, by Hermes's request id
DETAIL_CHARS = 500

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SideCarSettings:
    host: str
    port: int
    https: bool
    base_path: str
    token: str
    timeout: float


def settings_from_env(environ: Mapping[str, str]) -> SideCarSettings | None:
    """The side-car to ask, from Hermes's environment; None when `ROUTE_SIDECAR_URL` is
    unset (the plugin only stamps). A bad value stops the plugin and says which."""
    url = environ.get(URL_ENV, "").strip()
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"{URL_ENV}={url!r}: give the lookup API's URL, e.g. http://127.0.0.1:29334"
        )
    token = environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ValueError(f"{TOKEN_ENV} is empty: give one of the side-car's api.tokens")
    raw_timeout = environ.get(TIMEOUT_ENV, "").strip()
    try:
        timeout = float(raw_timeout) if raw_timeout else DEFAULT_TIMEOUT
    except ValueError:
        timeout = -1.0
    if not 0 < timeout <= 30:
        raise ValueError(f"{TIMEOUT_ENV}={raw_timeout!r}: give seconds, e.g. 0.5")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"{URL_ENV}={url!r}: the port is not a number") from None
    return SideCarSettings(
        host=parts.hostname,
        port=port,
        https=parts.scheme == "https",
        base_path=parts.path.rstrip("/"),
        token=token,
        timeout=timeout,
    )


class SideCarClient:
    """The lookup API over the standard library: a kept connection per thread, a short
    timeout, never an exception to the caller (None or False means "no answer")."""

    def __init__(
        self, settings: SideCarSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._local = threading.local()
        self._warned_at: float | None = None
        self._warn_lock = threading.Lock()

    def post(self, path: str, body: Mapping[str, Any], timeout: float) -> tuple[int, Any] | None:
        """(status, JSON answer or None) of one POST; None when it could not be made."""
        payload = json.dumps(body).encode("utf-8")
        headers = {
            "Authorization": f"Bearer {self.settings.token}",
            "Content-Type": "application/json",
        }
        for attempt in (1, 2):  # a kept connection the server closed: once more, anew
            connection = self._connection(timeout)
            try:
                connection.request("POST", self.settings.base_path + path, payload, headers)
                response = connection.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException) as error:
                self._drop_connection()
                if attempt == 2 or isinstance(error, TimeoutError):
                    self.warn(f"not answering ({type(error).__name__})")
                    return None
                continue
            try:
                answer = json.loads(raw) if raw else None
            except ValueError:
                answer = None
            return response.status, answer
        return None

    def warn(self, why: str) -> None:
        """One warning a minute at most: a side-car that is down must not fill the log."""
        with self._warn_lock:
            now = self._clock()
            if self._warned_at is not None and now - self._warned_at < WARN_EVERY:
                return
            self._warned_at = now
        logger.warning(
            "route-sidecar: the side-car is %s: LLM calls go out as they are "
            "(automatic routing) until it answers",
            why,
        )

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is None:
            kind = (
                http.client.HTTPSConnection if self.settings.https else http.client.HTTPConnection
            )
            connection = kind(self.settings.host, self.settings.port, timeout=timeout)
            self._local.connection = connection
        connection.timeout = timeout
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None


@dataclass(slots=True)
class ClaimedCall:
    """What a call's report needs, kept from its claim."""

    answer: Mapping[str, Any]
    context: Mapping[str, Any]
    last_user_message: Any


class RouteAsker:
    """The two middlewares: stamp and claim (and set `model`) before each call; report
    after it."""

    def __init__(self, client: SideCarClient, read_session: stamp.ReadSession) -> None:
        self.client = client
        # Hermes hands every request middleware the same request and keeps the last
        # answer: this one stamps the call itself, then claims with the stamped ids.
        self._stamp = stamp.make_middleware(read_session)
        self._pending: dict[str, ClaimedCall] = {}
        self._pending_lock = threading.Lock()
        self._reports: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(REPORTS_QUEUED)
        self._sender: threading.Thread | None = None

    # ---- before the call ---------------------------------------------------------

    def on_request(
        self, request: Any = None, api_request_id: Any = None, **kwargs: Any
    ) -> dict[str, Any] | None:
        """`llm_request` middleware: stamp the call, claim it; on an override, its model."""
        stamped = self._stamp(request=request, **kwargs)
        if stamped is None:  # not a main-loop call answering a Matrix message
            return None
        try:
            return self._claim(stamped["request"], api_request_id)
        except Exception:  # a bug here must cost the route, never the LLM call
            logger.exception("route-sidecar: claim failed: automatic routing")
            return stamped

    def _claim(self, request: dict[str, Any], api_request_id: Any) -> dict[str, Any]:
        context = _context_of(request)
        assert context is not None  # stamped just now
        context = {**context, "call_id": uuid.uuid4().hex}
        messages = request.get("messages")
        last_user = _last_user_message(messages)
        body = {
            "request": {
                "model": request.get("model"),
                "messages": [{"role": "user", "content": last_user}] if last_user else [],
                stamp.CONTEXT_FIELD: context,
            }
        }
        answered = self.client.post("/v1/claim", body, self.client.settings.timeout)
        claimed = stamp.stamped(request, context)  # the call id travels on, downstream
        if answered is None:
            return {"request": claimed}
        status, answer = answered
        if status != 200 or not isinstance(answer, dict):
            self.client.warn(f"refusing claims (HTTP {status})")
            return {"request": claimed}
        if isinstance(api_request_id, str) and api_request_id:
            self._remember(api_request_id, ClaimedCall(answer, context, last_user))
        if answer.get("override") is True and isinstance(answer.get("model"), str):
            claimed["model"] = answer["model"]
            logger.info(
                "route-sidecar: routed to %s (%s) room=%s intent=%s",
                answer.get("target"),
                answer["model"],
                context.get("room_id"),
                answer.get("intent_id"),
            )
        return {"request": claimed}

    def _remember(self, api_request_id: str, call: ClaimedCall) -> None:
        with self._pending_lock:
            self._pending[api_request_id] = call
            while len(self._pending) > PENDING_KEPT:
                del self._pending[next(iter(self._pending))]

    # ---- around the call ---------------------------------------------------------

    def on_execution(
        self,
        request: Any = None,
        next_call: Callable[..., Any] | None = None,
        api_request_id: Any = None,
        **_: Any,
    ) -> Any:
        """`llm_execution` middleware: the call itself, timed, then its report."""
        assert next_call is not None
        with self._pending_lock:
            call = self._pending.pop(api_request_id, None) if api_request_id else None
        started = time.monotonic()
        try:
            response = next_call(request)
        except Exception as error:
            if call is not None:
                self._queue_report(call, request, None, "error", started, error)
            raise
        if call is not None:
            self._queue_report(call, request, response, "ok", started, None)
        return response

    def _queue_report(
        self,
        call: ClaimedCall,
        request: Any,
        response: Any,
        status: str,
        started: float,
        error: BaseException | None,
    ) -> None:
        asked = request.get("model") if isinstance(request, dict) else None
        answered = getattr(response, "model", None)
        model = answered if isinstance(answered, str) and answered else asked
        body: dict[str, Any] = {
            "model": str(model or "unknown")[:255],
            "status": status,
            "latency_ms": int((time.monotonic() - started) * 1000),
            "call_id": call.context["call_id"],
        }
        if error is not None:
            body["detail"] = f"{type(error).__name__}: {error}"[:DETAIL_CHARS]
        intent_id = call.answer.get("intent_id")
        if call.answer.get("override") is True and isinstance(intent_id, str):
            path = f"/v1/intents/{quote(intent_id, safe='')}/outcome"
            body["turn_id"] = call.answer.get("turn_id")
        else:
            path = "/v1/outcome"
            body["request"] = {
                "messages": [{"role": "user", "content": call.last_user_message}]
                if call.last_user_message
                else [],
                stamp.CONTEXT_FIELD: call.context,
            }
        try:
            self._reports.put_nowait((path, body))
        except queue.Full:
            self.client.warn("not taking reports")
            return
        self._start_sender()

    def _start_sender(self) -> None:
        if self._sender is None or not self._sender.is_alive():
            self._sender = threading.Thread(
                target=self._send_reports, name="route-sidecar-reports", daemon=True
            )
            self._sender.start()

    def _send_reports(self) -> None:
        while True:
            path, body = self._reports.get()
            try:
                answered = self.client.post(path, body, REPORT_TIMEOUT)
                if answered is not None and answered[0] not in (204, 404):
                    self.client.warn(f"refusing reports (HTTP {answered[0]})")
            except Exception:
                logger.exception("route-sidecar: report failed")
            finally:
                self._reports.task_done()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the queued reports are sent (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._reports.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


def _context_of(request: Any) -> dict[str, Any] | None:
    """The stamp `stamp.py` put in the request (a main-loop call answering a message)."""
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        return None
    extra = request.get("extra_body")
    context = extra.get(stamp.CONTEXT_FIELD) if isinstance(extra, dict) else None
    return dict(context) if isinstance(context, dict) else None


def _last_user_message(messages: Any) -> Any:
    """The last `role: user` content (what the side-car hashes to find the turn)."""
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return message.get("content")
    return None


def register_asker(ctx: Any, settings: SideCarSettings | None) -> RouteAsker | None:
    """Register both middlewares (the request one stamps too) when the side-car is
    configured and Hermes offers them; says once why not otherwise."""
    if settings is None:
        return None
    read_session = stamp.session_reader(ctx)
    if read_session is None:
        logger.warning(
            "route-sidecar: %s is set, but asking the side-car from the plugin needs "
            "Hermes 0.17 or later (llm_request middleware): routing works only where the "
            "dispatcher asks the side-car",
            URL_ENV,
        )
        return None
    asker = RouteAsker(SideCarClient(settings), read_session)
    ctx.register_middleware("llm_request", asker.on_request)
    ctx.register_middleware("llm_execution", asker.on_execution)
    logger.info(
        "route-sidecar: asking the side-car at %s:%d for every LLM call (timeout %.2f s)",
        settings.host,
        settings.port,
        settings.timeout,
    )
    return asker
