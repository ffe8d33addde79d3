"""The lookup API for the dispatcher (its own listener, apart from the appservice one):
authenticate, validate into typed requests, call the service, serialise.

Every error is `{"error": {"code", "message"}}` with 400/401/404/405/413/415; a request
rejected here never reaches the service, so it changes nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .auth import bearer_token, token_matches
from .config import Config
from .intents import Intent, Timing, expires_at
from .metrics import Metrics
from .service import ClaimAnswer, RouteService
from .turns import MAX_ID_LENGTH, Turn, extract_turn, merge_turn

log = logging.getLogger("route_sidecar.api")
MAX_MODEL_LENGTH = 255
MAX_DETAIL_LENGTH = 2000
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def bad_request(field: str, problem: str) -> ApiError:
    return ApiError(400, "bad_request", f"{field}: {problem}" if field else problem)


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_unicode(body: Any) -> None:
    """JSON may escape a lone surrogate (\\ud800), which no UTF-8 store (SQLite) accepts."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("", "strings must be Unicode text, without lone surrogates") from None
    except RecursionError:
        raise bad_request("", "body is nested too deeply") from None


# ---- typed requests ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    turn: Turn
    requested_model: str | None


@dataclass(frozen=True, slots=True)
class OutcomeRequest:
    model: str
    status: str
    latency_ms: int | None
    detail: str | None
    turn_id: str | None


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
    turn = parse_turn(body, max_chars)
    requested_model = _optional_str(body, "requested_model", MAX_MODEL_LENGTH)
    return ClaimRequest(turn=turn, requested_model=requested_model)


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
    return OutcomeRequest(
        model=model, status=status, latency_ms=latency, detail=detail, turn_id=turn_id
    )


# ---- serialisation -------------------------------------------------------------------


def claim_json(answer: ClaimAnswer) -> dict[str, Any]:
    intent = answer.intent if answer.override else None
    return {
        "override": answer.override,
        "model": intent.model if intent else None,
        "target": intent.target if intent else None,
        "intent_id": intent.id if intent else None,
        "room_id": answer.room_id,
        "turn_id": answer.turn_id,
        "expires_at": iso(answer.expires_at) if intent else None,
        "reason": answer.result.value,
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


class LookupApi:
    def __init__(self, config: Config, service: RouteService, metrics: Metrics) -> None:
        self.config = config
        self.service = service
        self.metrics = metrics
        self._tokens = [t.encode() for t in config.api.tokens]
        self._openapi = resources.files("bot").joinpath("openapi.json").read_bytes()

    def make_app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.config.api.max_body_bytes,
            middlewares=[self._errors],
        )
        app.router.add_post("/v1/claim", self._authed(self.claim))
        app.router.add_post("/v1/intents/{intent_id}/outcome", self._authed(self.outcome))
        app.router.add_post("/v1/outcome", self._authed(self.turn_outcome))
        app.router.add_get("/v1/rooms/{room_id}/intent", self._authed(self.get_intent))
        app.router.add_delete("/v1/rooms/{room_id}/intent", self._authed(self.delete_intent))
        app.router.add_get("/v1/openapi.json", self.openapi)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics_page)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as error:
            return error_response(error.status, error.code, error.message)
        except web.HTTPRequestEntityTooLarge:
            return error_response(
                413,
                "payload_too_large",
                f"body over the limit of {self.config.api.max_body_bytes} bytes",
            )
        except web.HTTPException as error:
            if error.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed"}.get(error.status, "http_error")
            response = error_response(error.status, code, error.reason)
            if "Allow" in error.headers:  # a 405 must say which methods the path serves
                response.headers["Allow"] = error.headers["Allow"]
            return response

    def _authed(self, handler: Handler) -> Handler:
        async def authed(request: web.Request) -> web.StreamResponse:
            given = bearer_token(request.headers)
            if given is None or not token_matches(given, self._tokens):
                raise ApiError(401, "unauthorized", "missing or wrong bearer token")
            return await handler(request)

        return authed

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        if request.content_length is not None and (
            request.content_length > self.config.api.max_body_bytes
        ):
            raise web.HTTPRequestEntityTooLarge(
                max_size=self.config.api.max_body_bytes, actual_size=request.content_length
            )
        if request.content_type != "application/json":
            raise ApiError(415, "unsupported_media_type", "send Content-Type: application/json")
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise ApiError(400, "bad_request", "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", "body must be a JSON object")
        if b"\\ud" in raw or b"\\uD" in raw:  # only a \uD800-\uDFFF escape can hide one
            _check_unicode(body)
        return body

    async def claim(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        parsed = parse_claim(await self._json_body(request), self.config.api.max_body_bytes)
        answer = await self.service.claim(parsed.turn)
        self.metrics.claims.labels(answer.result.value).inc()
        self.metrics.claim_seconds.observe(time.perf_counter() - started)
        return web.json_response(claim_json(answer))

    async def outcome(self, request: web.Request) -> web.Response:
        parsed = parse_outcome(await self._json_body(request))
        intent_id = request.match_info["intent_id"]
        found = await self.service.record_outcome(
            intent_id,
            parsed.model,
            parsed.status,
            parsed.latency_ms,
            parsed.detail,
            parsed.turn_id,
        )
        if not found:
            raise ApiError(404, "not_found", f"no intent with id {intent_id[:64]!r}")
        return web.Response(status=204)

    async def turn_outcome(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        outcome = parse_outcome(body)  # the outcome's fields first: `model` is required
        turn = parse_turn(body, self.config.api.max_body_bytes)
        await self.service.record_turn_outcome(
            turn, outcome.model, outcome.status, outcome.latency_ms, outcome.detail
        )
        return web.Response(status=204)

    def _room_id(self, request: web.Request) -> str:
        room_id = request.match_info["room_id"]
        if not room_id.startswith("!") or len(room_id) > MAX_ID_LENGTH:
            raise bad_request("room_id", "must be a room id starting with '!'")
        return room_id

    async def get_intent(self, request: web.Request) -> web.Response:
        room_id = self._room_id(request)
        intent = await self.service.room_intent(room_id)
        if intent is None:
            raise ApiError(404, "not_found", "no live intent in this room")
        return web.json_response(intent_json(intent, self.service.timing))

    async def delete_intent(self, request: web.Request) -> web.Response:
        room_id = self._room_id(request)
        if await self.service.cancel_room_intent(room_id) is None:
            raise ApiError(404, "not_found", "no live intent in this room")
        return web.Response(status=204)

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")

    async def healthz(self, request: web.Request) -> web.Response:
        database_ok = await self.service.store.ping()
        return web.json_response(
            {
                "status": "ok" if database_ok else "degraded",
                "database": "ok" if database_ok else "unavailable",
            },
            status=200 if database_ok else 503,
        )

    async def metrics_page(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
