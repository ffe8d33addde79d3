"""LiteLLM proxy hook: the room's `/route` picks the proxy's model group for its turn.

Next to the proxy's config.yaml (copied or symlinked), registered with

    litellm_settings:
      callbacks: route_hook.route_hook

and configured from the environment: ROUTE_SIDECAR_URL, ROUTE_SIDECAR_TOKEN,
ROUTE_SIDECAR_TARGETS (JSON object, side-car target name → LiteLLM model group),
ROUTE_SIDECAR_TIMEOUT (seconds, optional). For every chat completion the pre-call hook
claims with the request body; on an override it rewrites `data["model"]` to the target's
model group. Either way it remembers the call (the side-car's decision and the turn: room,
thread, last user message), whose success and failure events then report what really
served it: a routed call's outcome to its intent (the room's receipt), any other call's to
`POST /v1/outcome`, so the side-car can suggest a retry on another target when a turn's
calls end in an error. A side-car that is down means automatic routing: the call goes to
the model it asked for, never fails because of the side-car, and is not reported.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any, NamedTuple

from litellm.integrations.custom_logger import CustomLogger

try:
    from route_sidecar_client import (
        CONTEXT_FIELD,
        DEFAULT_TIMEOUT,
        Decision,
        RouteClient,
        extract_turn,
    )
except ImportError as error:  # the proxy's venv, not ours: say what to install
    raise ImportError(
        "route_hook needs route-sidecar's client in the LiteLLM proxy's environment: "
        "pip install <route-sidecar checkout>/integrations/client"
    ) from error

__all__ = ["CLAIMED_CALL_TYPES", "ClaimedCall", "RouteHook", "ServedDeployment", "route_hook"]

log = logging.getLogger("route_sidecar.litellm")

URL_ENV = "ROUTE_SIDECAR_URL"
TOKEN_ENV = "ROUTE_SIDECAR_TOKEN"
TARGETS_ENV = "ROUTE_SIDECAR_TARGETS"
TIMEOUT_ENV = "ROUTE_SIDECAR_TIMEOUT"
# Chat completions carry the Hermes system-prompt lines the side-car reads.
CLAIMED_CALL_TYPES = frozenset({"completion", "acompletion"})
# Keys of the side-car's metadata (SPEC "The lookup API"): its answer wins for these,
# every other key already in the request (LiteLLM's own, the client's) is left alone.
SIDECAR_KEY_PREFIXES = ("route_", "matrix_")
# Calls claimed but not yet answered; retries and fallbacks of one call share its id, so an
# entry stays until the call succeeds, and the oldest go first when calls never end. Each
# keeps its last user message whole (the side-car hashes it to find the turn), so the
# messages kept are also capped in total.
MAX_REMEMBERED_CALLS = 4096
MAX_REMEMBERED_CHARS = 16 * 1024 * 1024
MAX_DETAIL_CHARS = 2000  # the side-car's limit on an outcome's detail


class ClaimedCall(NamedTuple):
    """What a call's report needs, kept from its claim: not the request itself."""

    # A NamedTuple, not a dataclass: the proxy loads this file without registering it in
    # sys.modules, where dataclasses look string annotations up.
    decision: Decision  # without its metadata, which the report does not send
    last_user_message: str | None
    model_group: str | None  # the group the call was sent to
    call_id: str | None = None  # the agent's id of the call, from its matrix_context


class RouteHook(CustomLogger):
    """Claims before routing, rewrites the model group on an override, reports outcomes.

    Arguments override the environment; with no URL the hook does nothing (one warning).
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        targets: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # Private attributes only: LiteLLM tells callback instances apart by their public
        # str/bool/int attributes and would drop a second instance that looks the same.
        self._url = url if url is not None else os.environ.get(URL_ENV, "").strip()
        self._token = token if token is not None else os.environ.get(TOKEN_ENV, "").strip()
        self._targets = dict(targets) if targets is not None else _targets_from_env()
        self._timeout = timeout if timeout is not None else _timeout_from_env()
        if self._url and not self._token:
            raise ValueError(f"{TOKEN_ENV}: required with {URL_ENV} (one of the api.tokens)")
        if not self._url:
            log.warning("%s is not set: the route hook leaves every call alone", URL_ENV)
        self._client: RouteClient | None = None
        self._calls: OrderedDict[str, ClaimedCall] = OrderedDict()
        self._remembered_chars = 0  # the last user messages kept in _calls, in total

    def route_client(self) -> RouteClient:
        """One connection pool to the side-car, made on first use (inside the proxy's loop)."""
        if self._client is None:
            self._client = RouteClient(self._url, self._token, timeout=self._timeout)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ---- before routing ----------------------------------------------------------------

    async def async_pre_call_hook(
        self,
        user_api_key_dict: Any,
        cache: Any,
        data: dict[str, Any],
        call_type: str,
    ) -> dict[str, Any]:
        if not self._url or call_type not in CLAIMED_CALL_TYPES or not isinstance(data, dict):
            return data
        try:
            await self._claim(data)
        except Exception:  # a bug here must cost the route, never the LLM call
            log.exception("route hook failed: automatic routing")
        return data

    async def _claim(self, data: dict[str, Any]) -> None:
        requested = data.get("model")
        requested = requested if isinstance(requested, str) else None
        # The OpenAI body only: the proxy's `data` also holds its logging object and auth.
        # An agent plugin's `matrix_context` is read by the side-car and never forwarded
        # (LiteLLM would pass it to a provider that may refuse it).
        request = {"messages": data.get("messages")}
        context = data.pop(CONTEXT_FIELD, None)
        if context is not None:
            request[CONTEXT_FIELD] = context
        if requested is not None:
            request["model"] = requested
        decision = await self.route_client().claim(request=request, requested_model=requested)
        _merge_metadata(data, decision.metadata)
        _attribute(data, decision)
        if not decision.worth_reporting:
            return
        model_group = requested
        if decision.override and decision.intent_id and decision.model:
            model_group = data["model"] = self._targets.get(decision.target or "", decision.model)
        call_id = data.get("litellm_call_id")
        if not isinstance(call_id, str) or not call_id:
            call_id = data["litellm_call_id"] = str(uuid.uuid4())
        # The claim's turn, else the request's (a refused claim answered none).
        turn = extract_turn(request)
        decision = replace(
            decision,
            room_id=decision.room_id or turn.room_id,
            turn_id=decision.turn_id or turn.turn_id,
            metadata={},
        )
        self._remember(
            call_id, ClaimedCall(decision, turn.last_user_message, model_group, turn.call_id)
        )
        if decision.override and decision.intent_id:
            log.info(
                "route override call=%s intent=%s target=%s requested=%s model_group=%s",
                call_id,
                decision.intent_id,
                decision.target,
                requested,
                model_group,
            )

    def _remember(self, call_id: str, call: ClaimedCall) -> None:
        self._forget(call_id)
        self._calls[call_id] = call
        self._remembered_chars += len(call.last_user_message or "")
        while len(self._calls) > MAX_REMEMBERED_CALLS or (
            self._remembered_chars > MAX_REMEMBERED_CHARS and len(self._calls) > 1
        ):
            self._forget(next(iter(self._calls)))

    def _forget(self, call_id: str) -> None:
        call = self._calls.pop(call_id, None)
        if call is not None:
            self._remembered_chars -= len(call.last_user_message or "")

    # ---- after the deployment answered -------------------------------------------------

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        await self._report(kwargs, "ok", start_time, end_time, done=True)

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        # Not done: the router may retry the call or fall back, under the same call id.
        await self._report(kwargs, "error", start_time, end_time, done=False)

    async def _report(
        self, kwargs: Mapping[str, Any], status: str, start_time: Any, end_time: Any, done: bool
    ) -> None:
        try:
            call_id = _call_id(kwargs)
            call = self._calls.get(call_id) if call_id else None
            if call is None:  # not claimed (or the side-car did not answer): nothing to say
                return
            if done and call_id is not None:
                self._forget(call_id)
            served = ServedDeployment.from_logging(kwargs, call.model_group)
            await self.route_client().report(
                call.decision,
                model=served.model,
                status=status,
                last_user_message=call.last_user_message,
                call_id=call.call_id,
                latency_ms=_latency_ms(start_time, end_time, kwargs),
                detail=served.detail(kwargs.get("exception") if status == "error" else None),
            )
        except Exception:  # the answer is already on its way; a report is best effort
            log.exception("route outcome not reported")


class ServedDeployment(NamedTuple):
    """Which deployment really answered, from LiteLLM's logging payload and kwargs."""

    model: str  # the deployment's LiteLLM model, e.g. "openai/glm-5.1"
    model_group: str | None
    model_id: str | None  # what the proxy returns as x-litellm-model-id
    api_base: str | None

    @classmethod
    def from_logging(cls, kwargs: Mapping[str, Any], asked_group: str | None) -> ServedDeployment:
        payload = _mapping(kwargs.get("standard_logging_object"))
        params = _mapping(kwargs.get("litellm_params"))
        metadata = _mapping(params.get("metadata"))
        hidden = _mapping(payload.get("hidden_params"))
        model_info = _mapping(params.get("model_info"))
        group = _first_str(payload.get("model_group"), metadata.get("model_group"))
        return cls(
            model=_first_str(
                payload.get("model"),
                metadata.get("deployment"),
                kwargs.get("model"),
                group,
                asked_group,
            )
            or "unknown",
            model_group=group,
            model_id=_first_str(
                payload.get("model_id"), model_info.get("id"), hidden.get("model_id")
            ),
            api_base=_first_str(
                payload.get("api_base"), metadata.get("api_base"), params.get("api_base")
            ),
        )

    def detail(self, error: Any = None) -> str:
        parts = [
            f"{key}={value}"
            for key, value in (
                ("model_group", self.model_group),
                ("model_id", self.model_id),
                ("api_base", self.api_base),
            )
            if value
        ]
        if error is not None:
            # The class and status only: an error's text can quote the prompt.
            status = getattr(error, "status_code", None)
            parts.append(f"error={type(error).__name__}" + (f"/{status}" if status else ""))
        return " ".join(parts)[:MAX_DETAIL_CHARS] or "litellm"


# ---- configuration and small readers -------------------------------------------------------


def _targets_from_env() -> dict[str, str]:
    raw = os.environ.get(TARGETS_ENV, "").strip()
    if not raw:
        return {}
    try:
        targets = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{TARGETS_ENV}: not JSON ({error.msg})") from None
    if not isinstance(targets, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in targets.items()
    ):
        raise ValueError(
            f'{TARGETS_ENV}: must map target names to model groups, e.g. {{"cloud": "cloud-model"}}'
        )
    return targets


def _timeout_from_env() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        timeout = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}: not a number of seconds: {raw!r}") from None
    if not 0 < timeout <= 60:
        raise ValueError(f"{TIMEOUT_ENV}: must be over 0 and at most 60 seconds")
    return timeout


def _merge_metadata(data: dict[str, Any], from_claim: Mapping[str, str]) -> None:
    """Add the claim's metadata to the request's, in place (LiteLLM may hold that dict)."""
    if not from_claim:
        return
    metadata = data.get("metadata")
    if metadata is None:
        metadata = data["metadata"] = {}
    if not isinstance(metadata, dict):
        return  # someone else's shape: leave it as it is
    for key, value in from_claim.items():
        if key not in metadata or key.startswith(SIDECAR_KEY_PREFIXES):
            metadata[key] = value


def _attribute(data: dict[str, Any], decision: Decision) -> None:
    """Where LiteLLM's own logging reads who and where (its Langfuse callback: the trace's
    user, session and tags): the asker is the user, the room the session, and a routed
    call is tagged with its target. Values the client set are left alone."""
    metadata = data.get("metadata")
    if not isinstance(metadata, dict):
        return
    fields = decision.metadata
    if "matrix_sender" in fields:
        metadata.setdefault("trace_user_id", fields["matrix_sender"])
    if "matrix_room_id" in fields:
        metadata.setdefault("session_id", fields["matrix_room_id"])
    if decision.override and decision.target:
        tags = metadata.get("tags")
        tags = list(tags) if isinstance(tags, list) else []
        metadata["tags"] = [*tags, f"route:{decision.target}"]


def _call_id(kwargs: Mapping[str, Any]) -> str | None:
    return _first_str(
        kwargs.get("litellm_call_id"), _mapping(kwargs.get("litellm_params")).get("litellm_call_id")
    )


def _latency_ms(start: Any, end: Any, kwargs: Mapping[str, Any]) -> int | None:
    if isinstance(start, datetime) and isinstance(end, datetime):
        seconds = (end - start).total_seconds()
    elif isinstance(start, int | float) and isinstance(end, int | float):
        seconds = float(end - start)
    else:
        response_time = _mapping(kwargs.get("standard_logging_object")).get("response_time")
        if not isinstance(response_time, int | float):
            return None
        seconds = float(response_time)
    return max(0, round(seconds * 1000))


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _first_str(*values: Any) -> str | None:
    return next((v for v in values if isinstance(v, str) and v), None)


route_hook = RouteHook()
