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
- leaves every other message alone (returns None).

Prefixes come from `ROUTE_SIDECAR_PREFIXES` (comma-separated, default
`/route,!route`) and must match the side-car's `routing.prefixes`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

PREFIXES_ENV = "ROUTE_SIDECAR_PREFIXES"
SKIP_REASON = "route-sidecar command: the side-car answers it in the room"

logger = logging.getLogger(__name__)


def _load_commands() -> ModuleType:
    """The side-car's own parser: the checkout's bot/commands.py, else an installed one."""
    # The plugin folder is meant to be a symlink to <checkout>/integrations/hermes, and
    # bot/commands.py is pure stdlib: loaded by path, it needs nothing in Hermes's venv and
    # always matches this plugin's version.
    path = Path(__file__).resolve().parent.parent.parent / "bot" / "commands.py"
    if not path.is_file():
        try:
            import bot.commands
        except ImportError as error:
            raise ImportError(
                f"route-sidecar plugin: no bot/commands.py at {path} and no route-sidecar "
                "installed; symlink the plugin folder from a route-sidecar checkout "
                "instead of copying it"
            ) from error
        return bot.commands
    name = "route_sidecar_commands"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


commands = _load_commands()


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


def dispatch_action(text: object, prefixes: tuple[str, ...]) -> dict[str, str] | None:
    """What Hermes should do with a message: skip it, rewrite it, or (None) carry on."""
    if not isinstance(text, str):
        return None
    command = commands.parse_command(text, prefixes)
    if command is None:
        return None
    if isinstance(command, commands.RouteTo) and command.question:
        return {"action": "rewrite", "text": command.question}
    # Every other command, malformed ones included: the side-car's reply says what to do.
    return {"action": "skip", "reason": SKIP_REASON}


def make_hook(prefixes: tuple[str, ...]) -> Callable[..., dict[str, str] | None]:
    def pre_gateway_dispatch(event: Any = None, **_: Any) -> dict[str, str] | None:
        # Hermes also passes gateway=, session_store= and telemetry_schema_version=.
        action = dispatch_action(getattr(event, "text", None), prefixes)
        if action is not None and action["action"] == "rewrite":
            logger.debug("route-sidecar: rewrote a multi-line /route to its question")
        return action

    return pre_gateway_dispatch


def register(ctx: Any) -> None:
    """Entry point called by Hermes's plugin loader."""
    prefixes = prefixes_from_env()
    ctx.register_hook("pre_gateway_dispatch", make_hook(prefixes))
    logger.info("route-sidecar: handling messages that start with %s", ", ".join(prefixes))
