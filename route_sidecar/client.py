"""The dispatcher side: ask the side-car how to route one LLM call, report what was served.

Depends on httpx and on `route_sidecar.core.turns` (standard library only), not on the
server. Fail-open by design: a side-car that is down, slow past the timeout or answering
garbage means "no override" and a logged warning, never an exception in the dispatcher's
request path.

    client = RouteClient("http://127.0.0.1:29334", token)
    decision = await client.claim(request=body)
    body["model"] = decision.model or body["model"]
    ...  # call the model
    await client.report(decision, request=body, model=served, status="ok")
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from .core.turns import CONTEXT_FIELD, Turn, extract_turn

__all__ = ["CONTEXT_FIELD", "Decision", "RouteClient", "Turn", "extract_turn"]
log = logging.getLogger("route_sidecar.client")
DEFAULT_TIMEOUT = 0.5
# Garbage bodies: bad JSON or bad UTF-8 (ValueError), nesting past the recursion limit.
_BAD_BODY = (ValueError, RecursionError)


@dataclass(frozen=True, slots=True)
class Decision:
    """The side-car's answer for one call; `Decision()` is automatic routing."""

    override: bool = False
    model: str | None = None
    target: str | None = None
    intent_id: str | None = None
    room_id: str | None = None
    turn_id: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    reason: str = "no_answer"  # why: the side-car's `reason`, or what went wrong here

    @property
    def worth_reporting(self) -> bool:
        """Whether the call's outcome should be reported: the side-car answered the claim.
        One that timed out, could not be reached or refused the claim is not sent the
        report too (a side-car that is down must not cost a second timeout per call); a
        claim refused as too large (413) still is: the report carries only the turn."""
        if self.reason in ("timeout", "unavailable", "no_answer"):
            return False
        return not self.reason.startswith("http_") or self.reason == "http_413"

    @classmethod
    def from_json(cls, data: Any) -> Decision:
        """The claim response, checked; anything malformed is automatic routing."""
        if not isinstance(data, Mapping) or not isinstance(data.get("override"), bool):
            raise ValueError("not a claim response")
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, Mapping):
            raise ValueError("metadata is not an object")
        override = data["override"]
        model = data.get("model")
        if override and (not isinstance(model, str) or not model):
            raise ValueError("override without a model")
        return cls(
            override=override,
            model=model if override else None,
            target=_opt_str(data.get("target")),
            intent_id=_opt_str(data.get("intent_id")),
            room_id=_opt_str(data.get("room_id")),
            turn_id=_opt_str(data.get("turn_id")),
            metadata={str(k): str(v) for k, v in metadata.items() if isinstance(v, str)},
            reason=_opt_str(data.get("reason")) or "",
        )


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class RouteClient:
    """One connection pool to the side-car's lookup API, reused for every call."""

    def __init__(
        self,
        base_url: str,
        token: str,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        # httpx's timeout bounds each phase (connect, each read); this bounds the whole call.
        self._deadline = timeout
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout),
            transport=transport,
        )

    async def __aenter__(self) -> RouteClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def claim(
        self,
        *,
        request: Mapping[str, Any] | None = None,
        room_id: str | None = None,
        turn_id: str | None = None,
        last_user_message: str | None = None,
        requested_model: str | None = None,
    ) -> Decision:
        """The routing decision for one LLM call. Never raises: on any failure, no override."""
        body: dict[str, Any] = {
            key: value
            for key, value in (
                ("room_id", room_id),
                ("turn_id", turn_id),
                ("last_user_message", last_user_message),
                ("requested_model", requested_model),
                ("request", request),
            )
            if value is not None
        }
        if not body:
            return Decision(reason="nothing_to_claim")
        try:
            async with asyncio.timeout(self._deadline):
                response = await self._http.post("/v1/claim", json=body)
            if response.status_code != 200:
                log.warning(
                    "route claim refused status=%d: automatic routing", response.status_code
                )
                return Decision(reason=f"http_{response.status_code}")
            return Decision.from_json(response.json())
        except (httpx.TimeoutException, TimeoutError):
            log.warning("route claim timed out: automatic routing")
            return Decision(reason="timeout")
        except (httpx.HTTPError, TypeError, *_BAD_BODY) as error:  # TypeError: not JSON
            log.warning("route claim failed error=%s: automatic routing", type(error).__name__)
            return Decision(reason="unavailable")

    async def outcome(
        self,
        intent_id: str,
        *,
        model: str,
        status: str,
        latency_ms: int | None = None,
        detail: str | None = None,
        turn_id: str | None = None,
        call_id: str | None = None,
    ) -> bool:
        """Report what was really served for a routed call. Never raises; False on failure.
        `call_id`: the agent's id of the call (its `matrix_context`), so that the call
        counts once when the agent plugin reports it too."""
        body = _outcome_body(model, status, latency_ms, detail, call_id)
        if turn_id is not None:
            body["turn_id"] = turn_id
        return await self._report(f"/v1/intents/{quote(intent_id, safe='')}/outcome", body)

    async def turn_outcome(
        self,
        *,
        model: str,
        status: str,
        room_id: str | None = None,
        turn_id: str | None = None,
        last_user_message: str | None = None,
        request: Mapping[str, Any] | None = None,
        latency_ms: int | None = None,
        detail: str | None = None,
        call_id: str | None = None,
    ) -> bool:
        """Report what served a call that had no override (`POST /v1/outcome`): the turn
        is given, or read from `request` here (only its turn fields are sent, and the
        agent's call id). Never raises; False on failure or when nothing identifies the
        turn."""
        found = extract_turn(request) if request is not None else Turn()
        turn = {
            "room_id": room_id or found.room_id,
            "turn_id": turn_id or found.turn_id,
            "last_user_message": (
                last_user_message if last_user_message is not None else found.last_user_message
            ),
        }
        if turn["room_id"] is None and turn["last_user_message"] is None:
            return False  # no room and no message: the side-car could not place it
        body = _outcome_body(model, status, latency_ms, detail, call_id or found.call_id)
        body.update({key: value for key, value in turn.items() if value is not None})
        return await self._report("/v1/outcome", body)

    async def report(
        self,
        decision: Decision,
        *,
        model: str,
        status: str,
        request: Mapping[str, Any] | None = None,
        last_user_message: str | None = None,
        latency_ms: int | None = None,
        detail: str | None = None,
        call_id: str | None = None,
    ) -> bool:
        """Report one call's result, routed or not: the intent's outcome for an
        override, `POST /v1/outcome` otherwise (the turn from the decision, then from
        `last_user_message` or `request`). The agent's call id is given, or read from
        `request`'s `matrix_context`. Never raises; False on failure."""
        call_id = call_id or (extract_turn(request).call_id if request is not None else None)
        if decision.override and decision.intent_id:
            return await self.outcome(
                decision.intent_id,
                model=model,
                status=status,
                latency_ms=latency_ms,
                detail=detail,
                turn_id=decision.turn_id,
                call_id=call_id,
            )
        return await self.turn_outcome(
            model=model,
            status=status,
            room_id=decision.room_id,
            turn_id=decision.turn_id,
            last_user_message=last_user_message,
            request=request,
            latency_ms=latency_ms,
            detail=detail,
            call_id=call_id,
        )

    async def _report(self, path: str, body: dict[str, Any]) -> bool:
        try:
            async with asyncio.timeout(self._deadline):
                response = await self._http.post(path, json=body)
        except (httpx.HTTPError, TimeoutError) as error:
            log.warning("route outcome not reported error=%s", type(error).__name__)
            return False
        if response.status_code != 204:
            log.warning("route outcome refused status=%d", response.status_code)
            return False
        return True

    async def intent(self, room_id: str) -> dict[str, Any] | None:
        """The room's live intent, or None (none, or the side-car unreachable)."""
        try:
            async with asyncio.timeout(self._deadline):
                response = await self._http.get(f"/v1/rooms/{quote(room_id, safe='')}/intent")
            if response.status_code == 200:
                data = response.json()
                return data if isinstance(data, dict) else None
            if response.status_code != 404:
                log.warning("route intent lookup refused status=%d", response.status_code)
        except (httpx.HTTPError, TimeoutError, *_BAD_BODY) as error:
            log.warning("route intent lookup failed error=%s", type(error).__name__)
        return None


def _outcome_body(
    model: str, status: str, latency_ms: int | None, detail: str | None, call_id: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "status": status}
    if latency_ms is not None:
        body["latency_ms"] = latency_ms
    if detail is not None:
        body["detail"] = detail
    if call_id is not None:
        body["call_id"] = call_id
    return body
