"""The lookup API for the dispatcher (its own listener, apart from the appservice one):
authenticate, validate into typed requests, call the service, serialise.

Every error is `{"error": {"code", "message"}}` with 400/401/404/405/413/415; a request
rejected here never reaches the service, so it changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from types import MethodType
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .auth import bearer_token, token_matches
from .config import Config
from .core.intents import ClaimAnswer, ClaimResult, Intent, Timing, expires_at
from .core.turns import MAX_ID_LENGTH, Turn, extract_turn, merge_turn
from .listeners import GuardedServer, connection_limit
from .metrics import Metrics
from .service import RouteService

log = logging.getLogger("route_sidecar.api")
MAX_MODEL_LENGTH = 255
MAX_DETAIL_LENGTH = 2000
CONTINUED_BODIES_KEPT = 1024  # serialised answers of open turns (one per turn at a time)
Endpoint = Callable[..., Awaitable[web.StreamResponse]]  # (request, *path segment values)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def json_response(data: Any, status: int = 200) -> web.Response:
    """orjson, a third of the time of `web.json_response`'s json.dumps for a claim."""
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status=status)


def malformed_response(status: int, message: str) -> web.Response:
    """A request aiohttp could not parse (route_sidecar.listeners)."""
    return error_response(status, "bad_request", message)


def bad_request(field: str, problem: str) -> ApiError:
    return ApiError(400, "bad_request", f"{field}: {problem}" if field else problem)


def iso(moment: datetime | None) -> str | None:
    """`2026-11-26T02:30:00Z` (the side-car's datetimes are all UTC). A claim's answer
    carries one per call, and within a second it is the same text: formatted once."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return _iso_second(int(moment.timestamp() // 1))


@lru_cache(maxsize=1024)
def _iso_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))


# ---- typed requests ------------------------------------------------------------------


CLAIM_FIELDS = frozenset(
    ("room_id", "turn_id", "session_id", "last_user_message", "request", "requested_model")
)
MAX_WARNINGS = 8
MAX_WARNED_NAME = 64


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    turn: Turn
    requested_model: str | None
    warnings: tuple[str, ...] = ()  # the top-level fields it ignored


@dataclass(frozen=True, slots=True)
class OutcomeRequest:
    model: str
    status: str
    latency_ms: int | None
    detail: str | None
    turn_id: str | None
    call_id: str | None = None  # the agent's id of the call: a second report of it is ignored


def _optional_str(body: dict[str, Any], field: str, limit: int, prefix: str = "") -> str | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(field, "must be a string")
    if len(value) > limit:
        raise bad_request(field, f"must be at most {limit} characters")
    if prefix and not value.startswith(prefix):
        raise bad_request(field, f"must start with {prefix!r}")
    return value


def parse_turn(body: dict[str, Any], max_chars: int) -> Turn:
    """The turn fields shared by claims and outcomes: given, or read from `request`."""
    room_id = _optional_str(body, "room_id", MAX_ID_LENGTH, prefix="!")
    turn_id = _optional_str(body, "turn_id", MAX_ID_LENGTH)
    session_id = _optional_str(body, "session_id", MAX_ID_LENGTH)
    if turn_id and session_id and turn_id != session_id:
        raise bad_request("session_id", "is an alias of turn_id; give one, or the same value")
    last_user_message = _optional_str(body, "last_user_message", max_chars)
    request = body.get("request")
    if request is not None:
        if not isinstance(request, dict):
            raise bad_request("request", "must be an OpenAI chat-completions object")
        messages = request.get("messages")
        if messages is not None and not isinstance(messages, list):
            raise bad_request("request.messages", "must be a list")
    if room_id is None and request is None and last_user_message is None:
        raise bad_request("", "give at least one of room_id, request, last_user_message")
    given = Turn(
        room_id=room_id, turn_id=turn_id or session_id, last_user_message=last_user_message
    )
    return merge_turn(given, extract_turn(request)) if request is not None else given


def parse_claim(body: dict[str, Any], max_chars: int) -> ClaimRequest:
    ignored = ignored_fields(body, CLAIM_FIELDS)
    try:
        turn = parse_turn(body, max_chars)
    except ApiError as error:
        if ignored:  # e.g. `body` for `request`: say which name was not read
            error.message += f" ({ignored[0]})"
        raise
    requested_model = _optional_str(body, "requested_model", MAX_MODEL_LENGTH)
    return ClaimRequest(turn=turn, requested_model=requested_model, warnings=tuple(ignored))


def ignored_fields(body: dict[str, Any], known: frozenset[str]) -> list[str]:
    """One warning per top-level field the request names that is not read (a misspelt
    `request` otherwise costs the override with no hint why). Capped, names shortened."""
    if body.keys() <= known:  # every claim a dispatcher sends: checked in C, no list
        return []
    unknown = [name for name in body if name not in known]
    warnings = [
        f"ignored field {name[:MAX_WARNED_NAME]!r}: not a field of this request"
        for name in unknown[:MAX_WARNINGS]
    ]
    if len(unknown) > MAX_WARNINGS:
        warnings.append(f"and {len(unknown) - MAX_WARNINGS} more ignored fields")
    if warnings:
        warnings.append(f"the fields read are: {', '.join(sorted(known))}")
    return warnings


def parse_outcome(body: dict[str, Any]) -> OutcomeRequest:
    model = _optional_str(body, "model", MAX_MODEL_LENGTH)
    if not model:
        raise bad_request("model", "is required: the model that really served the call")
    status = body.get("status")
    if status not in ("ok", "error"):
        raise bad_request("status", 'must be "ok" or "error"')
    latency = body.get("latency_ms")
    if latency is not None and (
        isinstance(latency, bool) or not isinstance(latency, int) or not 0 <= latency < 2**31
    ):
        raise bad_request("latency_ms", "must be a whole number of milliseconds >= 0")
    detail = _optional_str(body, "detail", MAX_DETAIL_LENGTH)
    turn_id = _optional_str(body, "turn_id", MAX_ID_LENGTH)
    call_id = _optional_str(body, "call_id", MAX_ID_LENGTH)
    return OutcomeRequest(
        model=model,
        status=status,
        latency_ms=latency,
        detail=detail,
        turn_id=turn_id,
        call_id=call_id,
    )


# ---- serialisation -------------------------------------------------------------------


def claim_json(answer: ClaimAnswer) -> dict[str, Any]:
    route = answer.route
    return {
        "override": answer.override,
        "model": route.model if route else None,
        "target": route.target if route else None,
        "intent_id": route.intent_id if route else None,
        "room_id": answer.room_id,
        "turn_id": answer.turn_id,
        "expires_at": iso(answer.expires_at) if route else None,
        "reason": answer.result,
        "metadata": answer.metadata(),
    }


def intent_json(intent: Intent, timing: Timing) -> dict[str, Any]:
    scope = intent.scope
    return {
        "id": intent.id,
        "room_id": intent.room_id,
        "target": intent.target,
        "model": intent.model,
        "scope": {
            "kind": scope.kind.value,
            "turns": scope.turns if scope.kind.value != "for" else None,
            "seconds": int(scope.duration.total_seconds()) if scope.duration else None,
        },
        "sender": intent.sender,
        "command_event_id": intent.command_event_id,
        "created_at": iso(intent.created_at),
        "expires_at": iso(expires_at(intent, timing)),
        "state": intent.state.value,
        "bound_turns": len(intent.bound_turns),
        "prebound": intent.is_prebound,
    }


# ---- the application -------------------------------------------------------------------


_SEGMENT = re.compile(r"\{[a-z_]+\}")


@dataclass
class _Path:
    """One path of ROUTES: its handlers by method (HEAD wherever GET), and what a 405
    lists."""

    template: tuple[str, ...]
    methods: dict[str, Endpoint]

    @property
    def allow(self) -> str:
        return ",".join(sorted(self.methods))


class LookupApi:
    """Served by aiohttp's low-level `web.Server`, routed here by one dict lookup (the
    claim path) or a segment match: no Application, router, middleware or signals run per
    request, which the claim path measurably pays for (docs/performance.md)."""

    def __init__(self, config: Config, service: RouteService, metrics: Metrics) -> None:
        self.config = config
        self.service = service
        self.metrics = metrics
        self._tokens = [t.encode() for t in config.api.tokens]
        self._openapi = resources.files("route_sidecar").joinpath("openapi.json").read_bytes()
        self._continued: dict[int, tuple[ClaimAnswer, bytes]] = {}  # id → answer, its body
        paths: dict[str, _Path] = {}
        for method, path, handler, authed in ROUTES:
            found = paths.setdefault(path, _Path(tuple(_SEGMENT.sub("{}", path).split("/")), {}))
            endpoint = self._endpoint(MethodType(handler, self), authed)
            found.methods[method] = endpoint
            if method == "GET":
                found.methods["HEAD"] = endpoint
        self._exact = {path: found for path, found in paths.items() if "{}" not in found.template}
        self._templated = [found for found in paths.values() if "{}" in found.template]

    def make_runner(self) -> web.BaseRunner:
        loop = asyncio.get_running_loop()
        limit = self.config.api.max_body_bytes

        def make_request(
            message: Any, payload: Any, protocol: Any, writer: Any, task: Any
        ) -> web.BaseRequest:
            return web.BaseRequest(
                message, payload, protocol, writer, task, loop, client_max_size=limit
            )

        server = GuardedServer(
            self.route,
            request_factory=make_request,
            access_log=None,
            error_response=malformed_response,
            max_connections=connection_limit(),
        )
        return web.ServerRunner(server, handle_signals=False)

    async def route(self, request: web.BaseRequest) -> web.StreamResponse:
        path = self._exact.get(request.path)
        values: list[str] = []
        if path is None:
            path, values = self._match(request.rel_url.parts)
            if path is None:
                return error_response(404, "not_found", "Not Found")
        endpoint = path.methods.get(request.method)
        if endpoint is None:
            response = error_response(405, "method_not_allowed", "Method Not Allowed")
            response.headers["Allow"] = path.allow  # a 405 says which methods the path serves
            return response
        return await endpoint(request, *values)

    def _match(self, parts: tuple[str, ...]) -> tuple[_Path | None, list[str]]:
        """The templated path whose literal segments are `parts`' (decoded, as aiohttp's
        router reads them), with the values of its `{}` segments (none empty)."""
        segments = ("", *parts[1:]) if parts[:1] == ("/",) else parts
        for path in self._templated:
            if len(path.template) != len(segments):
                continue
            values = []
            for want, got in zip(path.template, segments, strict=True):
                if want == "{}":
                    if not got:
                        break
                    values.append(got)
                elif want != got:
                    break
            else:
                return path, values
        return None, []

    def _endpoint(self, handler: Endpoint, authed: bool) -> Endpoint:
        """The one wrapper of every endpoint: the bearer token (when `authed`), then the
        handler, with its ApiError (or a body over the limit) as a JSON error."""

        async def endpoint(request: web.BaseRequest, *values: str) -> web.StreamResponse:
            try:
                if authed:
                    given = bearer_token(request.headers)
                    if given is None or not token_matches(given, self._tokens):
                        raise ApiError(401, "unauthorized", "missing or wrong bearer token")
                return await handler(request, *values)
            except ApiError as error:
                return error_response(error.status, error.code, error.message)
            except web.HTTPRequestEntityTooLarge:
                return error_response(
                    413,
                    "payload_too_large",
                    f"body over the limit of {self.config.api.max_body_bytes} bytes",
                )

        return endpoint

    async def _json_body(self, request: web.BaseRequest) -> dict[str, Any]:
        if request.content_length is not None and (
            request.content_length > self.config.api.max_body_bytes
        ):
            raise web.HTTPRequestEntityTooLarge(
                max_size=self.config.api.max_body_bytes, actual_size=request.content_length
            )
        if request.content_type != "application/json":
            raise ApiError(415, "unsupported_media_type", "send Content-Type: application/json")
        try:
            # orjson also refuses what no UTF-8 store accepts: lone surrogates (\ud800),
            # invalid UTF-8, NaN, and nesting deeper than 1,024.
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as error:
            raise ApiError(400, "bad_request", f"body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", "body must be a JSON object")
        return body

    async def claim(self, request: web.BaseRequest) -> web.Response:
        started = time.perf_counter()
        parsed = parse_claim(await self._json_body(request), self.config.api.max_body_bytes)
        turn = parsed.turn
        claims = self.service.claims
        # The hot path: no wrapper (a call the agent named goes through its cache).
        answer = await (claims.decide(turn) if turn.call_id is None else claims.claim(turn))
        # A StrEnum is its value (as a dict key, and to orjson): no `.value` on the hot path.
        self.metrics.claims.record(answer.result, time.perf_counter() - started)
        if parsed.warnings:
            body = orjson.dumps({**claim_json(answer), "warnings": list(parsed.warnings)})
        else:
            body = self._claim_body(answer)
        return web.Response(body=body, content_type="application/json")

    def _claim_body(self, answer: ClaimAnswer) -> bytes:
        """The answer serialised; the service gives a later call of a turn the very answer
        of the call before while it holds, and that one is serialised once."""
        if answer.result is not ClaimResult.CONTINUED:
            return orjson.dumps(claim_json(answer))
        held = self._continued.get(id(answer))
        if held is not None and held[0] is answer:
            return held[1]
        body = orjson.dumps(claim_json(answer))
        if len(self._continued) >= CONTINUED_BODIES_KEPT:
            self._continued.clear()
        self._continued[id(answer)] = (answer, body)
        return body

    async def outcome(self, request: web.BaseRequest, intent_id: str) -> web.Response:
        parsed = parse_outcome(await self._json_body(request))
        found = await self.service.record_outcome(
            intent_id,
            parsed.model,
            parsed.status,
            parsed.latency_ms,
            parsed.detail,
            parsed.turn_id,
            parsed.call_id,
        )
        if not found:
            raise ApiError(404, "not_found", f"no intent with id {intent_id[:64]!r}")
        return web.Response(status=204)

    async def turn_outcome(self, request: web.BaseRequest) -> web.Response:
        body = await self._json_body(request)
        outcome = parse_outcome(body)  # the outcome's fields first: `model` is required
        turn = parse_turn(body, self.config.api.max_body_bytes)
        if outcome.call_id is not None:
            turn = replace(turn, call_id=outcome.call_id)
        await self.service.record_turn_outcome(
            turn, outcome.model, outcome.status, outcome.latency_ms, outcome.detail
        )
        return web.Response(status=204)

    @staticmethod
    def _room_id(room_id: str) -> str:
        if not room_id.startswith("!") or len(room_id) > MAX_ID_LENGTH:
            raise bad_request("room_id", "must be a room id starting with '!'")
        return room_id

    async def get_intent(self, request: web.BaseRequest, room_id: str) -> web.Response:
        room_id = self._room_id(room_id)
        intent = await self.service.room_intent(room_id)
        if intent is None:
            raise ApiError(404, "not_found", "no live intent in this room")
        return json_response(intent_json(intent, self.service.timing))

    async def delete_intent(self, request: web.BaseRequest, room_id: str) -> web.Response:
        room_id = self._room_id(room_id)
        if await self.service.cancel_room_intent(room_id) is None:
            raise ApiError(404, "not_found", "no live intent in this room")
        return web.Response(status=204)

    async def openapi(self, request: web.BaseRequest) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")

    async def healthz(self, request: web.BaseRequest) -> web.Response:
        database_ok = await self.service.store.ping()
        return json_response(
            {
                "status": "ok" if database_ok else "degraded",
                "database": "ok" if database_ok else "unavailable",
            },
            status=200 if database_ok else 503,
        )

    async def metrics_page(self, request: web.BaseRequest) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# Every endpoint: method, path (`{}` stands for one path segment, given to the handler),
# the LookupApi method that answers it, and whether it needs an API token.
ROUTES: tuple[tuple[str, str, Endpoint, bool], ...] = (
    ("POST", "/v1/claim", LookupApi.claim, True),
    ("POST", "/v1/intents/{intent_id}/outcome", LookupApi.outcome, True),
    ("POST", "/v1/outcome", LookupApi.turn_outcome, True),
    ("GET", "/v1/rooms/{room_id}/intent", LookupApi.get_intent, True),
    ("DELETE", "/v1/rooms/{room_id}/intent", LookupApi.delete_intent, True),
    ("GET", "/v1/openapi.json", LookupApi.openapi, False),
    ("GET", "/healthz", LookupApi.healthz, False),
    ("GET", "/metrics", LookupApi.metrics_page, False),
)
