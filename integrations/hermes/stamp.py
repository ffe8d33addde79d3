"""Hermes 0.17 and later: say where every main-loop LLM call comes from.

Hermes sends its model endpoint no room, message or user id. From Hermes 0.17 a plugin may
rewrite each request of the agent's main loop (`llm_request` middleware); in that call,
Hermes's session context names the Matrix room, the user's event id, the thread and the
sender of the message being answered. This module puts them in the request body as
`matrix_context` (through the OpenAI client's `extra_body`), where route-sidecar's claim
reads them first: the call is then placed exactly, not inferred from prompt lines or
message hashes (SPEC "The turn key").

`matrix_context` is not an OpenAI field: a dispatcher consumes it and strips it before the
request goes upstream (the reference dispatcher and the LiteLLM hook do; see README.md).
Standard library only. Calls outside the main loop (titles, compression) carry no stamp.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

CONTEXT_FIELD = "matrix_context"  # route_sidecar.core.turns.CONTEXT_FIELD
MIDDLEWARE = "llm_request"
# Hermes's session variables (gateway/session_context.py) → the stamp's fields.
SESSION_FIELDS = {
    "room_id": "HERMES_SESSION_CHAT_ID",
    "event_id": "HERMES_SESSION_MESSAGE_ID",
    "thread_id": "HERMES_SESSION_THREAD_ID",
    "sender": "HERMES_SESSION_USER_ID",
}
# Only an OpenAI-style chat-completions request goes to a dispatcher that reads the stamp.
STAMPED_API_MODES = ("chat_completions", "")

logger = logging.getLogger(__name__)

ReadSession = Callable[[str], str]


def session_context(read_session: ReadSession) -> dict[str, str | None] | None:
    """The Matrix message being answered, from Hermes's session context; None outside a
    Matrix message (the CLI, cron, another platform) or when the room or event id is
    missing."""
    if read_session("HERMES_SESSION_PLATFORM") != "matrix":
        return None
    context = {field: read_session(name) or None for field, name in SESSION_FIELDS.items()}
    if not context["room_id"] or not context["event_id"]:
        return None
    return context


def stamped(request: dict[str, Any], context: dict[str, str | None]) -> dict[str, Any]:
    """The request with `matrix_context` in its `extra_body`, every other field kept."""
    extra_body = request.get("extra_body")
    extra = dict(extra_body) if isinstance(extra_body, dict) else {}
    extra[CONTEXT_FIELD] = context
    return {**request, "extra_body": extra}


def make_middleware(read_session: ReadSession) -> Callable[..., dict[str, Any] | None]:
    def stamp_llm_request(
        request: Any = None, api_mode: str | None = None, **_: Any
    ) -> dict[str, Any] | None:
        # Hermes also passes original_request=, task_id=, turn_id=, session_id=, model=, ...
        if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
            return None
        if (api_mode or "") not in STAMPED_API_MODES:
            return None
        context = session_context(read_session)
        if context is None:
            return None
        return {"request": stamped(request, context)}

    return stamp_llm_request


def session_reader(ctx: Any) -> ReadSession | None:
    """Hermes's session context reader, where Hermes offers request middleware (the
    capability, not a version string); None on Hermes 0.13 to 0.16."""
    if getattr(ctx, "register_middleware", None) is None:
        return None
    try:
        from gateway.session_context import get_session_env
    except ImportError:
        return None
    reader: ReadSession = get_session_env
    return reader


def register_stamp(ctx: Any) -> bool:
    """Register the middleware where Hermes offers it; False on Hermes 0.13 to 0.16,
    which keep the behaviour they had. (Hermes gives every `llm_request` middleware the
    same request and keeps the last one's: a plugin registers one, which does all.)"""
    read_session = session_reader(ctx)
    if read_session is None:
        return False
    ctx.register_middleware(MIDDLEWARE, make_middleware(read_session))
    return True
