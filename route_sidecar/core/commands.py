"""Chat commands: message text → a command, or an error saying what to type instead.

Pure: no I/O, no config file, no clock. `parse_command` knows only the syntax;
`route_sidecar.core.policy` checks a parsed command against the config (targets, caps, levels).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

# `!route` first: the form the bot teaches (SPEC "Chat commands"). Element Web opens an
# "Unknown command" dialog for `/route`; `!route` gets through every client untouched.
DEFAULT_PREFIXES = ("!route", "/route")

# The grammar: `<prefix> [<target> | <named word> | <clear word>] [--turns N | --for D]
# [again]`, with a question on the next lines. These names are what the command's
# MSC4391 description (core/describe.py) is derived from.
NAMED_WORDS = ("status", "targets", "history", "help", "leave")  # each takes no argument
CLEAR_WORDS = ("auto", "off", "cancel")
AGAIN_WORDS = ("again", "retry")
TURNS_OPTION = "--turns"  # a whole number of turns
FOR_OPTION = "--for"  # a duration: 30s, 10m, 2h, 1h30m
# Words that can never name a target: the config refuses them as target names or aliases.
RESERVED_WORDS = frozenset({*NAMED_WORDS, *CLEAR_WORDS, *AGAIN_WORDS})
RAW_MODEL_PREFIX = "model:"
# Messages that can be a question: a caption or a file name is not one.
QUESTION_MSGTYPES = ("m.text",)
_DURATION = re.compile(r"(?:(\d{1,6})h)?(?:(\d{1,6})m)?(?:(\d{1,7})s)?")
_TARGET = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}")
MAX_TURNS_SYNTAX = 1000


class ScopeKind(StrEnum):
    ONCE = "once"
    TURNS = "turns"
    DURATION = "for"


@dataclass(frozen=True, slots=True)
class Scope:
    """How many turns an intent covers: one, the next N, or every turn for a while."""

    kind: ScopeKind = ScopeKind.ONCE
    turns: int = 1
    duration: timedelta | None = None

    @classmethod
    def once(cls) -> Scope:
        return cls()

    @classmethod
    def next_turns(cls, n: int) -> Scope:
        return cls(ScopeKind.TURNS, n, None)

    @classmethod
    def lasting(cls, duration: timedelta) -> Scope:
        return cls(ScopeKind.DURATION, 0, duration)

    def describe(self) -> str:
        if self.kind is ScopeKind.ONCE:
            return "the next turn"
        if self.kind is ScopeKind.TURNS:
            return f"the next {self.turns} turns"
        assert self.duration is not None
        return f"every turn for {format_duration(self.duration)}"


@dataclass(frozen=True, slots=True)
class ShowStatus:
    pass


@dataclass(frozen=True, slots=True)
class ShowHelp:
    pass


@dataclass(frozen=True, slots=True)
class ListTargets:
    pass


@dataclass(frozen=True, slots=True)
class ShowHistory:
    pass


@dataclass(frozen=True, slots=True)
class LeaveRoom:
    """`/route leave`: a room admin asks the bot to leave (SPEC "The appservice side")."""


@dataclass(frozen=True, slots=True)
class ClearIntent:
    word: str = "auto"


@dataclass(frozen=True, slots=True)
class RouteTo:
    """`/route <target> [--turns N | --for D] [again]`, with the question of the multi-line form."""

    target: str
    scope: Scope = Scope()
    question: str | None = None
    again: bool = False

    @property
    def is_raw_model(self) -> bool:
        return self.target.startswith(RAW_MODEL_PREFIX)

    @property
    def raw_model(self) -> str | None:
        return self.target[len(RAW_MODEL_PREFIX) :] if self.is_raw_model else None


Command = ShowStatus | ShowHelp | ListTargets | ShowHistory | LeaveRoom | ClearIntent | RouteTo


@dataclass(frozen=True, slots=True)
class CommandError:
    """A message that is a command but a malformed one; `message` says what to type instead."""

    message: str


def typable_prefix(prefixes: tuple[str, ...]) -> str:
    """The prefix for a command the bot suggests typing as it is: one that is not a slash
    command (Element asks about unknown ones, or drops them on Android), if configured."""
    return next((p for p in prefixes if not p.startswith("/")), prefixes[0])


def split_first_line(body: str) -> tuple[str, str | None]:
    """The command line and the question (everything after the first line, or None)."""
    first, _, rest = body.partition("\n")
    question = rest.strip()
    return first.strip(), (question or None)


def command_prefix(first_line: str, prefixes: tuple[str, ...]) -> str | None:
    """The prefix the line starts with, as written there, case-insensitively, followed by
    a space or nothing. A slash prefix may be written with two slashes (`//route`: Element
    X sends it so, and Element Web's hint suggests it)."""
    lowered = first_line.lower()
    for prefix in prefixes:
        for written in (prefix, "/" + prefix) if prefix.startswith("/") else (prefix,):
            p = written.lower()
            if lowered.startswith(p) and (len(lowered) == len(p) or lowered[len(p)].isspace()):
                return first_line[: len(p)]
    return None


def is_command(body: str, prefixes: tuple[str, ...] = DEFAULT_PREFIXES) -> bool:
    return command_prefix(split_first_line(body)[0], prefixes) is not None


def is_single_line_command(body: str, prefixes: tuple[str, ...] = DEFAULT_PREFIXES) -> bool:
    first, question = split_first_line(body)
    return question is None and command_prefix(first, prefixes) is not None


def asked_question(
    body: str, prefixes: tuple[str, ...] = DEFAULT_PREFIXES, msgtype: str | None = "m.text"
) -> str | None:
    """What a message asks the agent, the room's last question for `<target> again`: the
    text of a plain text message that is not a command, or the question of the multi-line
    form (the agent answers it). None for every other command, for a message starting
    with `/` (the agent takes it as one of its own commands), for media and notices, and
    for a blank message."""
    if not isinstance(body, str) or msgtype not in QUESTION_MSGTYPES:
        return None
    parsed = parse_command(body, prefixes)
    if parsed is None:
        text: str | None = body.strip()
    elif isinstance(parsed, RouteTo) and parsed.question:
        text = parsed.question
    else:
        return None
    return text if text and not text.startswith("/") else None


def parse_command(
    body: str, prefixes: tuple[str, ...] = DEFAULT_PREFIXES
) -> Command | CommandError | None:
    """Parse one message body. None: not a command (no reply). Never raises."""
    if not isinstance(body, str):
        return None
    first, question = split_first_line(body)
    prefix = command_prefix(first, prefixes)
    if prefix is None:
        return None
    p = typable_prefix(prefixes)  # the one error messages teach
    words = first[len(prefix) :].split()
    if not words:
        return _no_question(ShowStatus(), question, p)
    word = words[0].lower()
    rest = words[1:]
    if word in (*NAMED_WORDS, *CLEAR_WORDS):
        if rest:
            return CommandError(f"`{p} {word}` takes no arguments. Type `{p} help` for usage.")
        named: dict[str, Command] = {
            "status": ShowStatus(),
            "help": ShowHelp(),
            "targets": ListTargets(),
            "history": ShowHistory(),
            "leave": LeaveRoom(),
        }
        command = named.get(word) or ClearIntent(word)
        return _no_question(command, question, p)
    if word in AGAIN_WORDS:
        return CommandError(
            f"Name a target before `{word}`, for example `{p} cloud {word}`. "
            f"Type `{p} targets` to list them."
        )
    return _parse_route(words, question, p)


def _no_question(command: Command, question: str | None, p: str) -> Command | CommandError:
    if question is not None:
        return CommandError(
            f"Only `{p} <target>` takes a question on the next lines. "
            f"Send the question as its own message, or type `{p} help`."
        )
    return command


def _parse_route(words: list[str], question: str | None, p: str) -> RouteTo | CommandError:
    raw_target = words[0]
    if raw_target.lower().startswith(RAW_MODEL_PREFIX):
        model_id = raw_target[len(RAW_MODEL_PREFIX) :]
        if not _MODEL_ID.fullmatch(model_id):
            return CommandError(
                f"`{quote_text(raw_target)}` is not a model id. Write `{p} model:<id>` "
                "with letters, digits and `._:/@+-` only."
            )
        target = RAW_MODEL_PREFIX + model_id
    else:
        target = raw_target.lower()
        if not _TARGET.fullmatch(target):
            return CommandError(
                f"`{quote_text(raw_target)}` is not a target name. Type `{p} targets` to list them."
            )
    scope = Scope.once()
    again = False
    i = 1
    while i < len(words):
        word = words[i]
        lowered = word.lower()
        name, eq, inline_value = lowered.partition("=")
        if name in (TURNS_OPTION, FOR_OPTION):
            if scope.kind is not ScopeKind.ONCE:
                return CommandError(
                    f"Give one of `--turns N` or `--for D`, once. "
                    f"Example: `{p} {target} --turns 3`."
                )
            if eq:
                value: str | None = inline_value
                i += 1
            else:
                value = words[i + 1].lower() if i + 1 < len(words) else None
                i += 2
            parsed = _parse_scope(name, value, target, p)
            if isinstance(parsed, CommandError):
                return parsed
            scope = parsed
            continue
        if lowered in AGAIN_WORDS and not again:
            again = True
            i += 1
            continue
        if word.startswith("--"):
            return CommandError(
                f"Unknown option `{quote_text(word)}`: "
                "use `--turns N` or `--for D` (30s, 10m, 2h), "
                f"for example `{p} {target} --for 30m`."
            )
        return CommandError(
            f"Unexpected `{quote_text(word)}`. Put your question on the next line "
            f"(Shift+Enter): `{p} {target}` then the question."
        )
    if again and question is not None:
        return CommandError(
            f"`{p} {target} again` re-asks the room's last question; it takes no new one. "
            f"To ask a new question on {target}, write `{p} {target}` then the question "
            "on the next line."
        )
    if again and scope.kind is not ScopeKind.ONCE:
        return CommandError(
            f"`again` re-asks one question: drop `--turns`/`--for` and type `{p} {target} again`."
        )
    return RouteTo(target=target, scope=scope, question=question, again=again)


def _parse_scope(name: str, value: str | None, target: str, p: str) -> Scope | CommandError:
    if name == TURNS_OPTION:
        if value is None or not value.isascii() or not value.isdigit():
            return CommandError(
                f"`--turns` needs a whole number, for example `{p} {target} --turns 3`."
            )
        n = int(value[:7])
        if not 1 <= n <= MAX_TURNS_SYNTAX or len(value) > 7:
            return CommandError(
                f"`--turns` must be between 1 and {MAX_TURNS_SYNTAX}, "
                f"for example `{p} {target} --turns 3`."
            )
        return Scope.next_turns(n)
    duration = parse_duration(value or "")
    if duration is None:
        return CommandError(
            f"`--for` needs a duration such as `30s`, `10m`, `2h` or `1h30m`, "
            f"for example `{p} {target} --for 30m`."
        )
    return Scope.lasting(duration)


def parse_duration(text: str) -> timedelta | None:
    """`30s`, `10m`, `2h`, `1h30m` → a positive timedelta; anything else → None."""
    match = _DURATION.fullmatch(text.strip().lower()) if text else None
    if not match or not any(match.groups()):
        return None
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    duration = timedelta(hours=hours, minutes=minutes, seconds=seconds)
    return duration if duration.total_seconds() > 0 else None


def format_duration(duration: timedelta) -> str:
    total = int(duration.total_seconds())
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{v}{u}" for v, u in ((hours, "h"), (minutes, "m"), (seconds, "s")) if v]
    return "".join(parts) or "0s"


def format_command(command: Command, prefix: str = DEFAULT_PREFIXES[0]) -> str:
    """The canonical text of a command: `parse_command(format_command(c)) == c`."""
    match command:
        case ShowStatus():
            return f"{prefix} status"
        case ShowHelp():
            return f"{prefix} help"
        case ListTargets():
            return f"{prefix} targets"
        case ShowHistory():
            return f"{prefix} history"
        case LeaveRoom():
            return f"{prefix} leave"
        case ClearIntent(word=word):
            return f"{prefix} {word}"
        case RouteTo(target=target, scope=scope, question=question, again=again):
            line = f"{prefix} {target}"
            if scope.kind is ScopeKind.TURNS:
                line += f" --turns {scope.turns}"
            elif scope.kind is ScopeKind.DURATION and scope.duration is not None:
                line += f" --for {format_duration(scope.duration)}"
            if again:
                line += " again"
            return line + (f"\n{question}" if question else "")
    raise TypeError(f"not a command: {command!r}")


def quote_text(text: str, limit: int = 40) -> str:
    """User text echoed in a reply: short, and unable to break out of a code span."""
    cleaned = "".join(ch for ch in text if ch.isprintable()).replace("`", "'")
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"
