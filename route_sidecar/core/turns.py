"""Turns: which room, which turn and which user message an LLM call belongs to.

Pure: request body → `Turn`; `Turn` → `TurnKey`; Matrix body → the same normal form as
the agent's last user message, so the two can be compared by hash. `route_sidecar.client` imports
`extract_turn` from here: the dispatcher side and the server use one implementation.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from typing import Any

from .commands import is_single_line_command

# Lines the Hermes gateway writes into the system prompt of every main-loop call.
_ROOM_LINE = re.compile(r"\*\*Matrix Room ID:\*\*[ \t]*`?(![^\s`]+)`?")
_THREAD_LINE = re.compile(r"\*\*Matrix Thread:\*\*[ \t]*`?(\$[^\s`]+)`?")
# Hermes prefixes `[Display Name] ` in shared sessions and adds `[System note: ...]` /
# `[Note: ...]` paragraphs before or after the user's text.
_LEADING_BRACKETS = re.compile(r"(?:\s*\[[^\[\]]{0,2000}\])*\s*")
# The trailing ones, matched at the start of the reversed text: anchored, so linear time
# (a search for `\s*[...]\s*$` is quadratic on long runs of spaces).
_TRAILING_BRACKETS_REVERSED = re.compile(r"(?:\s*\][^\[\]]{0,2000}\[)*\s*")
# `@hermes` or `@hermes:example.org`, not the `@` of an e-mail address.
# (The `@` first, then the look back: the engine then jumps from `@` to `@`.)
_MENTION = re.compile(r"@(?<!\w@)[A-Za-z0-9._=/+-]+(?::[A-Za-z0-9.-]+(?::\d+)?)?")
# Punctuation that a space before it is dropped from (`ready ?` is `ready?`).
_PUNCTUATION = ",.;:!?"
# A reply quote: a line starting with `>` (after blanks), with its line break. Lines end
# where `str.splitlines` ends them; the quicker `_QUOTE_LINE_LF` where `\n` is the only
# line break.
_LINE_BREAK = "\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]"
_OTHER_LINE_BREAK = re.compile(r"[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_QUOTE_LINE_LF = re.compile(r"^[^\S\n]*>.*(?:\n|\Z)", re.MULTILINE)
_QUOTE_LINE = re.compile(
    rf"(?:(?<=[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029])|\A)"
    rf"[^\S\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]*>"
    rf"[^\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]*(?:{_LINE_BREAK}|\Z)"
)
SYSTEM_ROLES = ("system", "developer")
MAX_ID_LENGTH = 255
# The request field where an agent plugin says where the call comes from (the Hermes
# plugin, from Hermes 0.17): `{"room_id", "event_id", "thread_id", "sender", "call_id"}`.
# A dispatcher strips it before the request goes upstream (SPEC "The turn key").
CONTEXT_FIELD = "matrix_context"


@dataclass(frozen=True, slots=True)
class Turn:
    """What a claim says (or its request body shows) about the call's turn."""

    room_id: str | None = None
    # The thread root (Hermes's `**Matrix Thread:**`), or the message's own event id.
    turn_id: str | None = None
    last_user_message: str | None = None
    # From the agent itself (`matrix_context`), not from its prompt, `user` or a hash: the
    # turn's message is the one with this event id, and the asker is its sender.
    event_id: str | None = None
    sender: str | None = None
    # The agent's id for this one LLM call (`matrix_context.call_id`): a claim or a report
    # of the same call from a second party (the agent plugin and a dispatcher both asking)
    # is answered as the first and counted once.
    call_id: str | None = None


@dataclass(frozen=True, slots=True)
class TurnKey:
    """`(turn_id, hash(last user message))` with whichever parts exist; never both None."""

    turn_id: str | None
    message_hash: str | None

    def __str__(self) -> str:
        return f"{self.turn_id or '-'}/{(self.message_hash or '-')[:12]}"

    @property
    def ref(self) -> str:
        """The whole key as one string: how outcomes and notices name the turn."""
        return f"{self.turn_id or '-'}/{self.message_hash or '-'}"


def content_text(content: Any) -> str | None:
    """Text of an OpenAI message content: a string, or the text parts of a list joined by
    newlines. None when there is no text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            part["text"]
            for part in content
            if _is_mapping(part)
            and part.get("type", "text") == "text"
            and isinstance(part.get("text"), str)
        ]
        return "\n".join(parts) if parts else None
    return None


def extract_turn(body: Any) -> Turn:
    """Room id, turn id and last user message from an OpenAI chat-completions body: the
    room and the message's event id from `matrix_context` when an agent plugin stamped
    them, else the room from Hermes's `**Matrix Room ID:**` line, else from the `user`
    field, and the turn from the `**Matrix Thread:**` line.

    Never raises: anything it cannot read is simply absent from the result. The last user
    message is looked for from the end, so a long conversation costs only its tail.
    """
    if not _is_mapping(body):
        return Turn()
    messages = body.get("messages")
    stamped = body.get(CONTEXT_FIELD)
    context = read_context(stamped) if stamped is not None else None
    if not isinstance(messages, list):
        return context or Turn()
    last_user = None
    for message in reversed(messages):
        if _is_mapping(message) and message.get("role") == "user":
            last_user = content_text(message.get("content"))
            if last_user is not None:
                break
    if context is not None:
        return replace(context, last_user_message=last_user)
    room_id = turn_id = None
    for message in messages:
        if not (_is_mapping(message) and message.get("role") in SYSTEM_ROLES):
            continue
        text = content_text(message.get("content"))
        if text is not None:
            room_id = room_id or _first_match(_ROOM_LINE, text)
            turn_id = turn_id or _first_match(_THREAD_LINE, text)
            if room_id and turn_id:
                break
    if room_id is None:
        # matrix-gptbot names the room in OpenAI's `user` field (an end-user id).
        room_id = _room_id_or_none(body.get("user"))
    return Turn(room_id=room_id, turn_id=turn_id, last_user_message=last_user)


def read_context(value: Any) -> Turn | None:
    """An agent's `matrix_context` stamp as an exact turn, or None when it does not name
    both a room and an event id of the right shape (it then counts as absent). The turn
    id is the thread root, as Hermes's `**Matrix Thread:**` line gives it, else the
    message's own event id."""
    if not _is_mapping(value):
        return None
    room_id = _room_id_or_none(value.get("room_id"))
    event_id = _id_or_none(value.get("event_id"), "$")
    if room_id is None or event_id is None:
        return None
    return Turn(
        room_id=room_id,
        turn_id=_id_or_none(value.get("thread_id"), "$") or event_id,
        event_id=event_id,
        sender=_id_or_none(value.get("sender"), "@"),
        call_id=_id_or_none(value.get("call_id"), ""),
    )


def _id_or_none(value: Any, sigil: str) -> str | None:
    """An id starting with `sigil` (`$` event, `@` user, "" any), no blanks, at most 255."""
    if (
        isinstance(value, str)
        and value.startswith(sigil)
        and len(sigil) < len(value) <= MAX_ID_LENGTH
        and not any(c.isspace() for c in value)
    ):
        return value
    return None


def _room_id_or_none(value: Any) -> str | None:
    """A value that has a room id's shape (`!` and no blanks; room version 12 ids have no
    server part), else None."""
    if (
        isinstance(value, str)
        and value.startswith("!")
        and 1 < len(value) <= MAX_ID_LENGTH
        and not any(c.isspace() for c in value)
    ):
        return value
    return None


def _is_mapping(value: Any) -> bool:
    """A dict (what JSON gives) at once; any other Mapping by the slower ABC check."""
    return type(value) is dict or isinstance(value, Mapping)


def merge_turn(given: Turn, extracted: Turn) -> Turn:
    """Fields given explicitly win over those read from the request body; the agent's
    stamp stays exact only where the given fields agree with it."""
    room_id = given.room_id or extracted.room_id
    turn_id = given.turn_id or extracted.turn_id
    return Turn(
        room_id=room_id,
        turn_id=turn_id,
        last_user_message=(
            given.last_user_message
            if given.last_user_message is not None
            else extracted.last_user_message
        ),
        # The agent's stamp holds where the given fields agree with it.
        event_id=(
            extracted.event_id
            if (room_id, turn_id) == (extracted.room_id, extracted.turn_id)
            else None
        ),
        sender=extracted.sender,
        call_id=extracted.call_id,
    )


def _first_match(pattern: re.Pattern[str], text: str) -> str | None:
    match = pattern.search(text)
    if match and len(match.group(1)) <= MAX_ID_LENGTH:
        return match.group(1)
    return None


def normalise_message(text: str) -> str:
    """The comparable form of a user message, the same for a Matrix body and for the text
    the agent gives the LLM: no reply quotes, no bracketed prefix or notes, no `@user`
    mentions (Hermes strips its own), no space before punctuation, folded spaces and case."""
    # Notes first (one may hold a line starting with `>`), then reply quotes, then the
    # notes the quotes hid.
    text = _strip_bracketed_notes(text)
    # Each pattern is searched for only where its first character occurs: a big message
    # costs a few scans at C speed (bench/: claims stay fast while big messages arrive).
    if ">" in text:
        quote = _QUOTE_LINE if _OTHER_LINE_BREAK.search(text) else _QUOTE_LINE_LF
        text = quote.sub("", text)
    # Case folded before mentions go: folding can make one (`@ß` is `@ss`).
    stripped = _strip_bracketed_notes(text).casefold()
    if "@" in stripped:
        stripped = _MENTION.sub("", stripped)
    # Spaces folded first (str.split's whitespace is the same as `\s`): a space is then
    # followed by one character, so each pair is removed by a plain replace.
    folded = " ".join(stripped.split())
    for mark in _PUNCTUATION:
        if " " + mark in folded:
            folded = folded.replace(" " + mark, mark)
    return folded


def _strip_bracketed_notes(text: str) -> str:
    """The text without the bracketed paragraphs (`[Name]`, `[System note: ...]`) that start
    or end it."""
    leading = _LEADING_BRACKETS.match(text)
    text = text[leading.end() :] if leading else text
    reversed_text = text[::-1]
    trailing = _TRAILING_BRACKETS_REVERSED.match(reversed_text)
    return (reversed_text[trailing.end() :] if trailing else reversed_text)[::-1]


# Every LLM call of a turn carries the same last user message: its hash is remembered
# (in memory, for messages up to this length) instead of normalised again per call.
HASH_CACHE_TEXT_CHARS = 4096
HASH_CACHE_SIZE = 4096


# No room message is longer than a Matrix event (64 KiB): a text the agent built from one,
# with a 64 KiB quote of another and its own prefix, is shorter than this. A longer one
# can match nothing the side-car saw, and is not normalised (it would hold the claim, and
# every other claim, for milliseconds per 100 KB).
MAX_COMPARED_CHARS = 2 * 65536 + 4096


def message_hash(salt: bytes, text: str) -> str | None:
    """Salted hash of the normalised text; None when nothing is left to compare, or when
    the text is longer than any room message could make it."""
    if len(text) > MAX_COMPARED_CHARS:
        return None
    if len(text) <= HASH_CACHE_TEXT_CHARS:
        return _remembered_hash(salt, text)
    return _message_hash(salt, text)


def _message_hash(salt: bytes, text: str) -> str | None:
    normal = normalise_message(text)
    if not normal:
        return None
    return hashlib.sha256(salt + normal.encode("utf-8", "surrogatepass")).hexdigest()


_remembered_hash = lru_cache(maxsize=HASH_CACHE_SIZE)(_message_hash)


def turn_key(turn: Turn, salt: bytes) -> TurnKey | None:
    """The turn key, or None when the claim can only be request-scoped."""
    hashed = message_hash(salt, turn.last_user_message) if turn.last_user_message else None
    if turn.turn_id is None and hashed is None:
        return None
    return TurnKey(turn_id=turn.turn_id, message_hash=hashed)


@dataclass(frozen=True, slots=True)
class SeenMessage:
    """A room message the side-car saw: never its text, only a salted hash of it."""

    room_id: str
    event_id: str
    thread_id: str | None
    sent_at: datetime
    message_hash: str | None
    is_command: bool
    sender: str | None = None
    # Hashes of the other texts an agent may answer for it (SPEC "The turn key"): a
    # multi-line command's whole text, an edit's `* ` fallback body.
    other_hashes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a claimed turn stands among the room's messages."""

    arrived_at: datetime | None  # when its user message reached the room; None: unknown
    is_command: bool  # the turn's user message is a single-line /route command
    message: SeenMessage | None = None  # the user message itself, when found

    @classmethod
    def of(cls, message: SeenMessage) -> Placement:
        return cls(arrived_at=message.sent_at, is_command=message.is_command, message=message)


def place_turn(
    key: TurnKey | None, seen: Sequence[SeenMessage], event_id: str | None = None
) -> Placement:
    """Find the user message a turn answers among the room messages seen.

    `seen` holds the candidates: messages whose event id or thread is the turn id, and
    messages whose hash is the turn's. With `event_id` (the agent stamped its message's
    event id), the message with that event id is the turn's, or none is; unless it is a
    single-line command, which the agent sent on joined with the messages after it.
    Otherwise the text hash
    decides first (inside a thread the turn id is shared by every message); when it
    matches nothing (the agent changed the text in a way normalising does not undo), the
    turn is taken to be the latest message of the turn id's event or thread.
    """
    if key is None:
        return Placement(arrived_at=None, is_command=False)
    if event_id is not None:  # an earlier message with the same text is another turn
        itself = [m for m in seen if m.event_id == event_id]
        if not itself:
            return Placement(arrived_at=None, is_command=False)
        if not itself[0].is_command:
            return Placement.of(itself[0])
        # A single-line command named as the message: the agent joined it with the
        # messages after it (Hermes batches a session's messages sent within 0.6 s), and
        # answers their text: placed by that text, among the messages from it on.
        seen = [m for m in seen if m.sent_at >= itself[0].sent_at]
    by_hash = [m for m in seen if key.message_hash and m.message_hash == key.message_hash]
    if key.turn_id:
        in_turn = [m for m in by_hash if key.turn_id in (m.event_id, m.thread_id)]
        by_hash = in_turn or by_hash
    if by_hash:
        return Placement.of(max(by_hash, key=lambda m: m.sent_at))
    if key.turn_id:
        in_turn = [m for m in seen if key.turn_id in (m.event_id, m.thread_id)]
        if in_turn:
            return Placement.of(max(in_turn, key=lambda m: m.sent_at))
    return Placement(arrived_at=None, is_command=False)


def notice_place(key: TurnKey | None, placed: SeenMessage | None) -> tuple[str | None, str | None]:
    """(thread root, event replied to) for a notice about a turn: in the turn's thread,
    in reply to its user message when known. Hermes's turn id is the thread root; in a
    DM there is no thread, and the notice replies to the message (or stands alone)."""
    thread = placed.thread_id if placed is not None else None
    if thread is None and key is not None and key.turn_id and key.turn_id.startswith("$"):
        thread = key.turn_id
    reply_to = placed.event_id if placed is not None else thread
    return thread, reply_to


def resolve_room(candidate_rooms: Sequence[str]) -> str | None:
    """A room found from message hashes counts only when it is the one room that matches."""
    distinct = set(candidate_rooms)
    return next(iter(distinct)) if len(distinct) == 1 else None


def is_ambiguous(candidate_rooms: Sequence[str]) -> bool:
    """The text was seen in more than one room: a claim says so (`ambiguous_room`)."""
    return len(set(candidate_rooms)) > 1


def is_command_turn(last_user_message: str | None, prefixes: tuple[str, ...]) -> bool:
    """The agent is answering a single-line `/route` message itself (`[Name] !route cloud`):
    such a turn never binds or consumes an intent."""
    if last_user_message is None:
        return False
    text = _strip_bracketed_notes(last_user_message)
    return is_single_line_command(text.strip(), prefixes)
