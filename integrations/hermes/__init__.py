"""Hermes Agent plugin: keep route-sidecar's commands out of the agent's input.

The side-car answers `/route …` and `!route …` in the room; without this plugin
Hermes replies "Unknown command" to `/route cloud` and never sees the question
of the multi-line form (`/route cloud` + newline + question). The hook
`pre_gateway_dispatch` runs for every user message before Hermes's command
handling and:

- drops a route-sidecar command (`{"action": "skip"}`);
- rewrites the multi-line form to its question (`{"action": "rewrite"}`), so
  the agent answers the question as a new turn, on the target the side-car
  recorded for that very message;
- rewrites `/route <target> again` (also `retry`) to the room's last question,
  so the agent answers it again as a new turn, on the target the side-car
  recorded for the `again` message; drops it when the room has no recent
  question (the side-car's reply says so);
- leaves every other message alone (returns None), remembering it as the room's
  last question.

The rules live in `RouteFilter`, usable outside Hermes (the demo's stand-in agent
uses it); the hook is a thin wrapper around one instance.

From Hermes 0.17 the plugin also stamps every call of the agent's main loop with the
Matrix room, the message's event id, the thread and the sender (`stamp.py`), so the
side-car places each call exactly; and, given the side-car's URL and a token
(`ROUTE_SIDECAR_URL`, `ROUTE_SIDECAR_TOKEN`), asks the side-car itself and sets the
request's model (`route.py`), so routing needs no change to the endpoint Hermes calls.

Prefixes come from `ROUTE_SIDECAR_PREFIXES` (comma-separated, default
`/route,!route`) and must match the side-car's `routing.prefixes`; how long a
question can be re-asked comes from `ROUTE_SIDECAR_QUESTION_TTL` (default `15m`)
and must match the side-car's `routing.intent_ttl`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

PREFIXES_ENV = "ROUTE_SIDECAR_PREFIXES"
QUESTION_TTL_ENV = "ROUTE_SIDECAR_QUESTION_TTL"
DEFAULT_QUESTION_TTL = timedelta(minutes=15)  # the side-car's default routing.intent_ttl
SKIP_REASON = "route-sidecar command: the side-car answers it in the room"
NOTHING_TO_REASK = (
    "route-sidecar again: no recent question in this room; the side-car's reply says so"
)
SWEEP_EVERY = timedelta(minutes=1)

logger = logging.getLogger(__name__)

Action = dict[str, str]


def _load_side_car_module(name: str) -> ModuleType:
    """One of the side-car's pure modules, `commands` or `questions`, next to this file.

    Both are the side-car's own route_sidecar/core/<name>.py (standard library only): this
    folder holds symbolic links to them, and the wheel built from it (`pip install
    ./integrations/hermes`) holds copies. So the plugin needs nothing else installed in
    Hermes's environment, and always uses the rules of the side-car it came with.
    """
    # Loaded again with the plugin: Hermes may load the plugin again (another folder,
    # another process state), and the copy next to this file is the one that belongs to it.
    sys.modules.pop(f"{__name__}.{name}", None)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError:
        pass
    try:  # a folder copied without following its links, next to an installed side-car
        return importlib.import_module(f"route_sidecar.core.{name}")
    except ImportError as error:
        here = Path(__file__).parent / f"{name}.py"
        raise ImportError(
            f"route-sidecar plugin: cannot load {name}.py next to {Path(__file__).name} "
            f"({here} is missing or a dangling link) and no route-sidecar is installed; "
            "install the plugin with pip (`pip install ./integrations/hermes`) or symlink "
            "the plugin folder from a route-sidecar checkout instead of copying it"
        ) from error


commands = _load_side_car_module("commands")
questions = _load_side_car_module("questions")
describe = _load_side_car_module("describe")
from . import route, stamp  # noqa: E402  (after the side-car's modules: they need none)


def utcnow() -> datetime:
    """The wall clock; looked up at each call, so tests can replace it."""
    return datetime.now(UTC)


def prefixes_from_env(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """`ROUTE_SIDECAR_PREFIXES` as a tuple of words; the side-car's defaults when unset."""
    raw = environ.get(PREFIXES_ENV, "")
    if not raw.strip():
        return tuple(commands.DEFAULT_PREFIXES)
    prefixes = tuple(p.strip() for p in raw.split(",") if p.strip())
    if not prefixes or any(any(c.isspace() for c in p) for p in prefixes):
        raise ValueError(
            f"{PREFIXES_ENV}={raw!r}: give comma-separated words such as /route,!route"
        )
    return prefixes


def question_ttl_from_env(environ: Mapping[str, str] = os.environ) -> timedelta:
    """`ROUTE_SIDECAR_QUESTION_TTL` as a duration; 15 minutes when unset."""
    raw = environ.get(QUESTION_TTL_ENV, "")
    if not raw.strip():
        return DEFAULT_QUESTION_TTL
    ttl: timedelta | None = commands.parse_duration(raw)
    if ttl is None:
        raise ValueError(
            f"{QUESTION_TTL_ENV}={raw!r}: give a duration such as 15m, 90s or 1h30m, "
            "the same as the side-car's routing.intent_ttl"
        )
    return ttl


class RouteFilter:
    """What an agent does with a room message: skip it, answer other text, or carry on.

    Remembers each room's last question (in memory, for `ttl`) so that
    `/route <target> again` can be answered as that question.
    """

    def __init__(
        self,
        prefixes: tuple[str, ...] = commands.DEFAULT_PREFIXES,
        ttl: timedelta = DEFAULT_QUESTION_TTL,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.prefixes = tuple(prefixes)
        self.last_questions = questions.LastQuestions(ttl)
        self._clock = clock
        self._next_sweep: datetime | None = None

    def now(self) -> datetime:
        return self._clock() if self._clock is not None else utcnow()

    def action(
        self,
        room_id: str,
        text: object,
        *,
        side_car_reads: bool = True,
        msgtype: str | None = "m.text",
    ) -> Action | None:
        """`{"action": "skip", ...}`, `{"action": "rewrite", "text": ...}`, or None (carry on).

        `side_car_reads=False` is for a message the side-car ignores (an `m.notice`, an
        edit): it never becomes the room's last question, and its `again` re-asks
        nothing, since the side-car records no intent for it. `msgtype`: the Matrix
        message type; only text messages are questions (not a file name or caption).
        """
        if not isinstance(text, str):
            return None
        now = self.now()
        self._sweep(now)
        command = commands.parse_command(text, self.prefixes)
        asked = commands.asked_question(text, self.prefixes, msgtype)
        if asked is not None and side_car_reads:
            self.last_questions.remember(room_id, questions.Question(asked, now))
        if command is None:
            return None
        if isinstance(command, commands.RouteTo) and command.again:
            last = self.last_questions.last(room_id, now) if side_car_reads else None
            if last is None:
                return {"action": "skip", "reason": NOTHING_TO_REASK}
            return {"action": "rewrite", "text": last.text}
        if isinstance(command, commands.RouteTo) and command.question:
            return {"action": "rewrite", "text": command.question}  # the multi-line form
        # Every other command, malformed ones included: the side-car's reply says what to do.
        return {"action": "skip", "reason": SKIP_REASON}

    def _sweep(self, now: datetime) -> None:
        """Forget expired questions now and then, so quiet rooms do not stay in memory."""
        if self._next_sweep is None or now >= self._next_sweep:
            self.last_questions.forget_expired(now)
            self._next_sweep = now + SWEEP_EVERY


def _side_car_reads(event: Any) -> bool:
    """False for what the side-car ignores: notices (its own replies among them), edits."""
    # Hermes drops edits, its own messages and (unless MATRIX_PROCESS_NOTICES) notices
    # before the hook; with MATRIX_PROCESS_NOTICES on, notices reach it.
    content = getattr(event, "raw_message", None)
    if not isinstance(content, Mapping):
        return True
    relates = content.get("m.relates_to")
    is_edit = "m.new_content" in content or (
        isinstance(relates, Mapping) and relates.get("rel_type") == "m.replace"
    )
    return content.get("msgtype") != "m.notice" and not is_edit


def _invoked_text(content: Any, prefixes: tuple[str, ...]) -> str | None:
    """The command text a structured invocation (MSC4391, as gomuks sends one) stands for:
    its arguments win over the body (`/route@bot:server cloud`), as for the side-car.
    An invocation with unreadable arguments stands for the bare command (dropped: the
    side-car's reply says what is wrong). None: not an invocation of this command."""
    if not isinstance(content, Mapping):
        return None
    invocation = content.get(describe.INVOCATION_KEY)
    if not isinstance(invocation, Mapping):
        return None
    if invocation.get("command") != describe.command_name(prefixes):
        return None
    text = describe.command_text(invocation.get("arguments"), prefixes[0])
    return text if isinstance(text, str) else prefixes[0]


def make_hook(route_filter: RouteFilter) -> Callable[..., Action | None]:
    def pre_gateway_dispatch(event: Any = None, **_: Any) -> Action | None:
        # Hermes also passes gateway=, session_store= and telemetry_schema_version=.
        room_id = str(getattr(getattr(event, "source", None), "chat_id", None) or "")
        content = getattr(event, "raw_message", None)
        msgtype = content.get("msgtype", "m.text") if isinstance(content, Mapping) else "m.text"
        invoked = _invoked_text(content, route_filter.prefixes)
        action = route_filter.action(
            room_id,
            invoked if invoked is not None else getattr(event, "text", None),
            side_car_reads=_side_car_reads(event),
            msgtype=msgtype,
        )
        if action is not None and action["action"] == "rewrite":
            logger.debug("route-sidecar: rewrote a /route message to its question")
        return action

    return pre_gateway_dispatch


def register(ctx: Any) -> None:
    """Entry point called by Hermes's plugin loader."""
    prefixes = prefixes_from_env()
    ttl = question_ttl_from_env()
    side_car = route.settings_from_env(os.environ)
    ctx.register_hook("pre_gateway_dispatch", make_hook(RouteFilter(prefixes, ttl)))
    if route.register_asker(ctx, side_car) is not None:  # it stamps the calls too
        pass
    elif stamp.register_stamp(ctx):
        logger.info("route-sidecar: stamping each LLM call with its Matrix room and message")
    else:
        logger.info(
            "route-sidecar: this Hermes has no llm_request middleware (it needs 0.17 or "
            "later): LLM calls are placed from the prompt and the message text, as before"
        )
    logger.info(
        "route-sidecar: handling messages that start with %s; re-asking questions up to %s old",
        ", ".join(prefixes),
        commands.format_duration(ttl),
    )
