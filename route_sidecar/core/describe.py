"""The command described for clients that read MSC4391 ("Simplified in-room bot
commands"), and a structured invocation read back as the command it stands for.

The description is derived from the parser's grammar (core/commands.py) and the
configured targets, never written a second time; an invocation's arguments are written
out as the command text and parsed by `parse_command`, so one rule holds for both. Pure:
no I/O, no clock.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .commands import (
    AGAIN_WORDS,
    CLEAR_WORDS,
    FOR_OPTION,
    NAMED_WORDS,
    TURNS_OPTION,
    Command,
    CommandError,
    parse_command,
    quote_text,
)

# The unstable names (MSC4391 "Unstable prefix").
DESCRIPTION_EVENT = "org.matrix.msc4391.command_description"
INVOCATION_KEY = "org.matrix.msc4391.command"

TARGET = "target"  # the one required parameter: a target, or a command word
TURNS = TURNS_OPTION.removeprefix("--")
FOR = FOR_OPTION.removeprefix("--")
AGAIN = AGAIN_WORDS[0]
_ONE_WORD = re.compile(r"\S{1,200}")  # an argument is one word of the command text
MAX_ARGUMENTS = 16  # more than the description has: not a client's invocation


@dataclass(frozen=True, slots=True)
class Invocation:
    """A message's `org.matrix.msc4391.command` block and the users it mentions, as
    they came (`arguments` is any JSON: judged by `command_of`)."""

    command: str
    arguments: Any = field(hash=False)  # any JSON, a dict included: not hashable
    mentions: tuple[str, ...] = ()


def command_name(prefixes: Sequence[str]) -> str:
    """The command's name for clients: the first prefix without its sigil (`/route` →
    `route`)."""
    return prefixes[0].lstrip("/!.") or prefixes[0]


def state_key(command: str, bot_user_id: str) -> str:
    """MSC4391: the padded base64 of SHA-256 of the command followed by the bot's user id."""
    digest = hashlib.sha256((command + bot_user_id).encode("utf-8")).digest()
    return base64.standard_b64encode(digest).decode("ascii")


def _text(body: str) -> dict[str, Any]:
    """An MSC1767 text block, as MSC4391 descriptions are written."""
    return {"m.text": [{"body": body}]}


def description(
    prefixes: Sequence[str], targets: Sequence[str], raw_models: bool = False
) -> dict[str, Any]:
    """The `command_description` content: the targets and the command words as the
    literal choices of the first parameter, then the options and `again`."""
    p = prefixes[0]
    choices: list[dict[str, Any]] = [
        {"schema_type": "literal", "value": word}
        for word in (*targets, *NAMED_WORDS, CLEAR_WORDS[0])
    ]
    if raw_models:
        choices.append({"schema_type": "primitive", "type": "string"})
    return {
        "command": command_name(prefixes),
        "parameters": [
            {
                "key": TARGET,
                "schema": {"schema_type": "union", "variants": choices},
                "description": _text(
                    f"A target, or: {', '.join(NAMED_WORDS)}, "
                    f"{CLEAR_WORDS[0]} (back to automatic routing)"
                ),
            },
            {
                "key": TURNS,
                "schema": {"schema_type": "primitive", "type": "integer"},
                "optional": True,
                "description": _text("Route the next N turns, not just the next one"),
            },
            {
                "key": FOR,
                "schema": {"schema_type": "primitive", "type": "string"},
                "optional": True,
                "description": _text("Route every turn for a while: 30s, 10m, 2h or 1h30m"),
            },
            {
                "key": AGAIN,
                "schema": {"schema_type": "primitive", "type": "boolean"},
                "optional": True,
                "description": _text("Re-ask the room's last question on the target"),
            },
        ],
        "description": _text(
            f"Route the agent's next turn in this room to a model ({p} help for usage)"
        ),
    }


def is_invocation_for(
    invocation: Invocation | None, prefixes: Sequence[str], bot_user_id: str
) -> bool:
    """A structured invocation of this command that mentions the bot (MSC4391: bots
    look for the mention, so that another bot's command never triggers this one)."""
    return (
        invocation is not None
        and invocation.command == command_name(prefixes)
        and bot_user_id in invocation.mentions
    )


def command_text(arguments: Any, prefix: str) -> str | CommandError:
    """The command line an invocation's arguments stand for, or what is wrong with them."""
    p = prefix
    if arguments is None:
        return p
    if not isinstance(arguments, Mapping) or len(arguments) > MAX_ARGUMENTS:
        return CommandError(f"The command's arguments are not readable. Type `{p} help`.")
    known = (TARGET, TURNS, FOR, AGAIN)
    unknown = [key for key in arguments if key not in known]
    if unknown:
        name = quote_text(str(unknown[0]))
        return CommandError(
            f"`{name}` is not an argument of `{p}`: use {', '.join(known)}. Type `{p} help`."
        )
    # An empty value is an argument not given (a form's untouched field).
    arguments = {key: value for key, value in arguments.items() if value not in (None, "")}
    words = [p]
    target = arguments.get(TARGET)
    if target is not None:
        if not isinstance(target, str) or not _ONE_WORD.fullmatch(target):
            return CommandError(
                f"`{TARGET}` must be one word, a target name. Type `{p} targets` to list them."
            )
        words.append(target)
    turns = arguments.get(TURNS)
    if turns is not None:
        if not isinstance(turns, int) or isinstance(turns, bool):
            return CommandError(
                f"`{TURNS}` must be a whole number, for example `{p} cloud {TURNS_OPTION} 3`."
            )
        words += [TURNS_OPTION, str(turns)]
    duration = arguments.get(FOR)
    if duration is not None:
        if not isinstance(duration, str) or not _ONE_WORD.fullmatch(duration):
            return CommandError(
                f"`{FOR}` must be a duration such as `30s`, `10m` or `2h`, "
                f"for example `{p} cloud {FOR_OPTION} 30m`."
            )
        words += [FOR_OPTION, duration]
    again = arguments.get(AGAIN)
    if again is not None and not isinstance(again, bool):
        return CommandError(f"`{AGAIN}` is true or false, for example `{p} cloud {AGAIN}`.")
    if again:
        words.append(AGAIN)
    return " ".join(words)


def command_of(invocation: Invocation, prefixes: Sequence[str]) -> Command | CommandError:
    """A structured invocation as the command its arguments stand for: written out as
    command text and read by the same parser as a typed command."""
    text = command_text(invocation.arguments, prefixes[0])
    if isinstance(text, CommandError):
        return text
    parsed = parse_command(text, (prefixes[0],))
    assert parsed is not None  # the text starts with the prefix
    return parsed


def parse_message(
    body: str,
    invocation: Invocation | None,
    prefixes: tuple[str, ...],
    bot_user_id: str,
    structured: bool = True,
) -> Command | CommandError | None:
    """What a message asks of the bot: a structured invocation for this command that
    mentions the bot (its arguments win over the body), else the body's command (None:
    not a command)."""
    if structured and is_invocation_for(invocation, prefixes, bot_user_id):
        assert invocation is not None
        return command_of(invocation, prefixes)
    return parse_command(body, prefixes)


def current_description(state: Sequence[Mapping[str, Any]], key: str) -> Mapping[str, Any] | None:
    """The room's description under this state key, from its state events; None when
    there is none (an empty content is a removed one)."""
    for event in state:
        if event.get("type") == DESCRIPTION_EVENT and event.get("state_key") == key:
            content = event.get("content")
            return content if isinstance(content, Mapping) and content else None
    return None


def needs_update(current: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> bool:
    """Whether the room's description differs from the one wanted (empty: none)."""
    return (dict(current) if current else {}) != dict(wanted)
