"""SPEC "The turn key": request body → room, turn id, last user message, turn key, placement."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from route_sidecar.core.turns import (
    MAX_COMPARED_CHARS,
    MAX_ID_LENGTH,
    Placement,
    SeenMessage,
    Turn,
    TurnKey,
    content_text,
    extract_turn,
    is_command_turn,
    merge_turn,
    message_hash,
    normalise_message,
    notice_place,
    place_turn,
    resolve_room,
    turn_key,
)

PREFIXES = ("/route", "!route")
SALT = b"test-salt"
ROOM = "!abc:example.org"
HERMES_SYSTEM = (
    "You are Hermes, a helpful agent.\n"
    "## Current Session Context\n"
    "**Source:** Matrix (group)\n"
    f"**Matrix Room ID:** {ROOM}\n"
    "**Matrix Thread:** $ev1\n"
    "**User:** Alice\n"
)
T0 = datetime(2026, 5, 9, 11, 0, tzinfo=UTC)


def body(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"model": "glm-4.7-flash:q4_K_M", "messages": list(messages)}


def system(text: str, role: str = "system") -> dict[str, Any]:
    return {"role": role, "content": text}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


# --- extract_turn ------------------------------------------------------------------------


def test_reads_room_thread_and_string_user_content() -> None:
    turn = extract_turn(body(system(HERMES_SYSTEM), user("Why did the deploy fail?")))
    assert turn == Turn(room_id=ROOM, turn_id="$ev1", last_user_message="Why did the deploy fail?")


def test_list_content_joins_text_parts_with_newlines_and_ignores_images() -> None:
    content = [
        {"type": "text", "text": "first part"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "second part"},
    ]
    turn = extract_turn(body(user(content)))
    assert turn.last_user_message == "first part\nsecond part"


def test_list_content_in_the_system_message_is_read_too() -> None:
    content = [{"type": "text", "text": "preamble"}, {"type": "text", "text": HERMES_SYSTEM}]
    turn = extract_turn(body(system(content), user("hi")))  # type: ignore[arg-type]
    assert (turn.room_id, turn.turn_id) == (ROOM, "$ev1")


def test_missing_system_message_leaves_room_and_turn_id_absent() -> None:
    assert extract_turn(body(user("hello"))) == Turn(last_user_message="hello")


def test_last_user_message_wins_over_earlier_ones() -> None:
    turn = extract_turn(
        body(
            system(HERMES_SYSTEM),
            user("first question"),
            {"role": "assistant", "content": "an answer"},
            user("second question"),
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
            {"role": "tool", "tool_call_id": "c1", "content": "tool output"},
        )
    )
    assert turn.last_user_message == "second question"


def test_user_message_without_text_keeps_the_turns_last_text() -> None:
    # An image-only user message (e.g. injected by a vision tool mid-turn) must not change
    # the turn key of the calls that follow it.
    image_only = [{"type": "image_url", "image_url": {"url": "https://example.org/a.png"}}]
    turn = extract_turn(body(user("describe this"), user(image_only)))
    assert turn.last_user_message == "describe this"


def test_hermes_lines_absent_give_no_room_and_no_turn_id() -> None:
    turn = extract_turn(body(system("You are a helpful agent."), user("hi")))
    assert (turn.room_id, turn.turn_id) == (None, None)


def test_dm_rooms_have_a_room_line_but_no_thread_line() -> None:
    turn = extract_turn(body(system(f"**Matrix Room ID:** {ROOM}"), user("hi")))
    assert (turn.room_id, turn.turn_id) == (ROOM, None)


def test_hermes_lines_in_a_developer_message_are_read() -> None:
    turn = extract_turn(body(system(HERMES_SYSTEM, role="developer"), user("hi")))
    assert (turn.room_id, turn.turn_id) == (ROOM, "$ev1")


def test_hermes_lines_in_backticks_are_read() -> None:
    text = "**Matrix Room ID:** `!r00m:example.org`\n**Matrix Thread:** `$t:example.org`"
    turn = extract_turn(body(system(text), user("hi")))
    assert (turn.room_id, turn.turn_id) == ("!r00m:example.org", "$t:example.org")


def test_hermes_lines_typed_by_a_user_are_not_trusted() -> None:
    text = "**Matrix Room ID:** !other:example.org\n**Matrix Thread:** $forged"
    turn = extract_turn(body(system("no session context"), user(text)))
    assert (turn.room_id, turn.turn_id) == (None, None)


def test_first_system_line_wins_over_later_ones() -> None:
    turn = extract_turn(
        body(system(HERMES_SYSTEM), system("**Matrix Room ID:** !late:example.org"), user("x"))
    )
    assert turn.room_id == ROOM


def test_overlong_ids_are_ignored() -> None:
    text = f"**Matrix Room ID:** !{'a' * 300}:example.org\n**Matrix Thread:** ${'b' * 300}"
    turn = extract_turn(body(system(text), user("x")))
    assert (turn.room_id, turn.turn_id) == (None, None)


GARBAGE: list[Any] = [
    None,
    5,
    "messages",
    b"bytes",
    [],
    [{"role": "user", "content": "hi"}],
    {},
    {"messages": None},
    {"messages": "hello"},
    {"messages": {"role": "user", "content": "hi"}},
    {"messages": [None, 1, "x", [], ["user", "hi"]]},
    {"messages": [{"role": "user"}]},
    {"messages": [{"role": "user", "content": 42}]},
    {"messages": [{"role": "user", "content": {"text": "hi"}}]},
    {"messages": [{"role": "user", "content": [None, 1, "text", {"type": "text", "text": 5}]}]},
    {"messages": [{"role": ["user"], "content": "hi"}]},
    {"messages": [{"role": {"a": 1}, "content": "hi"}]},
    {"messages": [{"role": "system", "content": None}]},
    {"messages": [{"role": "system", "content": [{"type": "text"}]}]},
    {1: 2, (1, 2): "x"},
]


@pytest.mark.parametrize("garbage", GARBAGE, ids=[repr(g)[:40] for g in GARBAGE])
def test_garbage_bodies_never_raise_and_give_nothing(garbage: Any) -> None:
    assert extract_turn(garbage) == Turn()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
# Message-shaped values reach the deeper branches that random JSON rarely does.
message_like = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]) | json_values,
        "content": st.text()
        | st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "type": st.sampled_from(["text", "image_url"]) | json_values,
                    "text": st.text() | json_values,
                },
            )
            | json_values,
            max_size=3,
        )
        | json_values,
    },
)


@settings(max_examples=100, deadline=None)
@given(json_values | st.fixed_dictionaries({"messages": st.lists(message_like | json_values)}))
def test_extract_turn_never_raises_on_arbitrary_json(value: Any) -> None:
    turn = extract_turn(value)
    for field in (turn.room_id, turn.turn_id, turn.last_user_message):
        assert field is None or isinstance(field, str)


def reference_extract_turn(value: Any) -> Turn:
    """The plain one-pass reading extract_turn must agree with: every message in order,
    the first room and thread lines of system messages, the last user message with text."""
    messages = value.get("messages") if isinstance(value, dict) else None
    if not isinstance(messages, list):
        return Turn()
    room_id = turn_id = last_user = None
    for message in messages:
        if not isinstance(message, dict):
            continue
        text = content_text(message.get("content"))
        if text is None:
            continue
        if message.get("role") in ("system", "developer"):
            room = re.search(r"\*\*Matrix Room ID:\*\*[ \t]*`?(![^\s`]+)`?", text)
            thread = re.search(r"\*\*Matrix Thread:\*\*[ \t]*`?(\$[^\s`]+)`?", text)
            if room_id is None and room and len(room.group(1)) <= MAX_ID_LENGTH:
                room_id = room.group(1)
            if turn_id is None and thread and len(thread.group(1)) <= MAX_ID_LENGTH:
                turn_id = thread.group(1)
        elif message.get("role") == "user":
            last_user = text
    return Turn(room_id=room_id, turn_id=turn_id, last_user_message=last_user)


hermes_lines = st.sampled_from(
    ["**Matrix Room ID:** !a:x", "**Matrix Room ID:** `!b:y`", "**Matrix Thread:** $t1", ""]
)
conversation_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
        "content": st.lists(hermes_lines, max_size=2).map("\n".join)
        | st.text(max_size=8)
        | st.none(),
    }
)


@settings(max_examples=300, deadline=None)
@given(st.lists(conversation_message | message_like | json_values, max_size=12))
def test_extract_turn_reads_what_one_plain_pass_reads(messages: list[Any]) -> None:
    value = {"messages": messages}
    assert extract_turn(value) == reference_extract_turn(value)


def test_room_and_thread_lines_may_be_in_different_system_messages() -> None:
    turn = extract_turn(
        body(system("**Matrix Room ID:** !a:x"), user("q"), system("**Matrix Thread:** $t"))
    )
    assert turn == Turn(room_id="!a:x", turn_id="$t", last_user_message="q")


@settings(max_examples=50, deadline=None)
@given(
    st.from_regex(r"![A-Za-z0-9]{1,30}:[a-z0-9.-]{1,30}", fullmatch=True),
    st.from_regex(r"\$[A-Za-z0-9_-]{1,60}", fullmatch=True),
    st.text(min_size=1),
)
def test_any_hermes_room_and_thread_are_read_back_exactly(
    room_id: str, thread: str, question: str
) -> None:
    prompt = f"intro\n**Matrix Room ID:** {room_id}\n**Matrix Thread:** {thread}\nmore"
    assert extract_turn(body(system(prompt), user(question))) == Turn(room_id, thread, question)


# --- merge_turn --------------------------------------------------------------------------


def test_given_fields_win_over_the_request_body() -> None:
    given_turn = Turn(room_id="!given:x", turn_id="$given", last_user_message="given text")
    extracted = Turn(room_id=ROOM, turn_id="$ev1", last_user_message="body text")
    assert merge_turn(given_turn, extracted) == given_turn


def test_missing_given_fields_come_from_the_request_body() -> None:
    extracted = Turn(room_id=ROOM, turn_id="$ev1", last_user_message="body text")
    assert merge_turn(Turn(), extracted) == extracted
    assert merge_turn(Turn(turn_id="$mine"), extracted) == Turn(ROOM, "$mine", "body text")


# --- the agent's stamp (`matrix_context`) ------------------------------------------------

STAMP = {"room_id": "!stamped:x", "event_id": "$msg", "thread_id": "$root", "sender": "@bob:x"}


def test_an_agents_stamp_places_the_call_before_its_prompt_lines_and_user_field() -> None:
    stamped = {
        **body(system(HERMES_SYSTEM), user("[Bob] a question")),
        "user": "!other:x",
        "matrix_context": STAMP,
    }
    turn = extract_turn(stamped)
    assert turn == Turn(
        room_id="!stamped:x",
        turn_id="$root",  # the thread root, as Hermes's thread line gives it
        last_user_message="[Bob] a question",
        event_id="$msg",
        sender="@bob:x",
    )
    assert turn.event_id is not None  # placed by the stamp


def test_a_stamp_outside_a_thread_makes_the_message_its_own_turn() -> None:
    stamp = {"room_id": "!dm:x", "event_id": "$msg", "thread_id": None, "sender": "@bob:x"}
    turn = extract_turn({**body(user("hi")), "matrix_context": stamp})
    assert (turn.room_id, turn.turn_id, turn.event_id) == ("!dm:x", "$msg", "$msg")


@pytest.mark.parametrize(
    "stamp",
    [
        None,
        "!stamped:x",
        [],
        {},
        {"room_id": "!stamped:x"},  # no event id
        {"event_id": "$msg"},  # no room
        {"room_id": "stamped", "event_id": "$msg"},  # not a room id
        {"room_id": "!stamped:x", "event_id": "msg"},  # not an event id
        {"room_id": "!stamped:x", "event_id": "$" + "m" * MAX_ID_LENGTH},
        {"room_id": "!a b", "event_id": "$msg"},
        {"room_id": 7, "event_id": ["$msg"]},
    ],
)
def test_a_stamp_without_a_room_and_an_event_id_counts_as_absent(stamp: Any) -> None:
    request = {**body(system(HERMES_SYSTEM), user("q")), "matrix_context": stamp}
    assert extract_turn(request) == extract_turn(body(system(HERMES_SYSTEM), user("q")))


def test_a_stamps_ill_shaped_sender_or_thread_is_left_out() -> None:
    stamp = {"room_id": "!r:x", "event_id": "$m", "thread_id": "root", "sender": "bob"}
    turn = extract_turn({**body(user("q")), "matrix_context": stamp})
    assert (turn.turn_id, turn.sender, turn.event_id) == ("$m", None, "$m")


def test_given_fields_that_disagree_with_the_stamp_make_the_turn_inexact() -> None:
    extracted = extract_turn({**body(user("q")), "matrix_context": STAMP})
    assert merge_turn(Turn(), extracted) == extracted
    assert merge_turn(Turn(room_id="!stamped:x"), extracted).event_id == "$msg"
    assert merge_turn(Turn(room_id="!given:x"), extracted).event_id is None
    assert merge_turn(Turn(turn_id="$given"), extracted).event_id is None


def test_a_stamped_message_is_placed_by_its_event_id_never_by_an_earlier_same_text() -> None:
    repeated = [seen("$q1", 0, "what now?"), seen("$q2", 5, "what now?"), seen("$q3", 9, "x")]
    key = TurnKey("$q1", message_hash(SALT, "what now?"))
    assert place_turn(key, repeated, "$q1") == Placement.of(repeated[0])
    unstamped = TurnKey(None, message_hash(SALT, "what now?"))  # by its text: the latest
    assert place_turn(unstamped, repeated) == Placement.of(repeated[1])
    # The stamped message not seen (yet): unplaced, never another message.
    assert place_turn(key, repeated, "$unseen") == Placement(arrived_at=None, is_command=False)


def test_a_stamped_command_joined_with_the_question_after_it_is_placed_by_that_question() -> None:
    """Hermes joins a session's messages sent within 0.6 s into one, named by the first:
    `!route cloud` then at once the question reach the agent as the multi-line form, which
    the plugin rewrites to the question. The turn is the question's, after the command."""
    joined = [
        seen("$earlier", 0, "the question"),
        seen("$cmd", 5, "!route cloud", is_command=True),
        seen("$question", 5, "the question"),
    ]
    key = TurnKey("$cmd", message_hash(SALT, "[Alice] the question"))
    assert place_turn(key, joined, "$cmd") == Placement.of(joined[2])
    alone = TurnKey("$cmd", message_hash(SALT, "[Alice] !route cloud"))  # answered as it is
    assert place_turn(alone, joined, "$cmd").is_command


# --- normalise_message and message_hash --------------------------------------------------

SAME_MESSAGE = [
    ("Why did the deploy fail?", "[Alice] Why did the deploy fail?"),
    (
        "Why did the deploy fail?",
        "[Alice] Why did the deploy fail?\n\n[System note: The user replied in a thread.]",
    ),
    (
        "Why did the deploy fail?",
        "[Note: model was just switched from glm-4.7-flash to glm-5.1. Adjust.]\n\n"
        "[Alice Smith] Why did the deploy fail?",
    ),
    (
        "> <@bob:example.org> the deploy is red\n\nWhy did the deploy fail?",
        "[Alice] Why did the deploy fail?",
    ),
    ("Why  did the\ndeploy   FAIL?", "[Alice] why did the deploy fail?"),
    ("  Why did the deploy fail?  ", "[Alice]   Why did the deploy fail?\t"),
    ("Straße", "[Alice] STRASSE"),
    (
        "Why did the deploy fail?",
        "[Note: switched]\n[Alice] Why did the deploy fail?\n[System note: a]\n[System note: b]",
    ),
]


@pytest.mark.parametrize(("matrix_body", "agent_text"), SAME_MESSAGE)
def test_matrix_body_and_agent_text_hash_equal(matrix_body: str, agent_text: str) -> None:
    assert normalise_message(matrix_body) == normalise_message(agent_text)
    assert message_hash(SALT, matrix_body) == message_hash(SALT, agent_text)
    assert message_hash(SALT, matrix_body) is not None


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("[Alice] Hello World", "hello world"),
        ("Hello\n\n[System note: x]", "hello"),
        ("> quoted\n> more\nanswer", "answer"),
        ("  > indented quote\nanswer", "answer"),
        ("a [b] c", "a [b] c"),
        ("[unclosed hello", "[unclosed hello"),
        ("hello [a [nested] b]", "hello [a [nested] b]"),
        ("x -> y", "x -> y"),
    ],
)
def test_normalise_message_removes_only_decoration(text: str, normal: str) -> None:
    assert normalise_message(text) == normal


def test_different_messages_hash_differently() -> None:
    assert message_hash(SALT, "Why did the deploy fail?") != message_hash(SALT, "Why did it pass?")


def test_message_hash_is_salted() -> None:
    a = message_hash(b"salt-a", "Why did the deploy fail?")
    b = message_hash(b"salt-b", "Why did the deploy fail?")
    assert a is not None and b is not None
    assert a != b
    assert a == message_hash(b"salt-a", "why did the deploy FAIL?")
    assert len(a) == 64 and int(a, 16) >= 0


@pytest.mark.parametrize("text", ["", "   ", "\n\n", "[Alice] ", "[System note: x]", "> quote"])
def test_message_hash_is_none_when_nothing_is_left(text: str) -> None:
    assert message_hash(SALT, text) is None


def test_message_hash_accepts_lone_surrogates() -> None:
    assert message_hash(SALT, "bad \udc80 text") is not None


names = st.text(alphabet=st.characters(blacklist_characters="[]\n\r"), min_size=1, max_size=20)
plain_messages = st.text(min_size=1, max_size=80).filter(
    lambda text: not any(line.lstrip().startswith(">") for line in text.splitlines())
)


notes = st.text(alphabet=st.characters(blacklist_characters="[]"), max_size=30)


@settings(max_examples=150, deadline=None)
@given(plain_messages, names, notes)
def test_hermes_decoration_never_changes_the_hash(message: str, name: str, note: str) -> None:
    decorated = f"[{name}] {message}\n\n[System note: {note}]"
    assert message_hash(SALT, decorated) == message_hash(SALT, message)


def test_a_note_with_a_quoted_line_does_not_change_the_hash() -> None:
    # Found by the property test above: a line of the note that starts with `>` was
    # dropped as a reply quote before the note itself was stripped.
    decorated = "[Alice] why did it fail?\n\n[System note: the user replied to:\n> deploy log]"
    assert message_hash(SALT, decorated) == message_hash(SALT, "why did it fail?")


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=80))
def test_normalise_message_is_idempotent(text: str) -> None:
    once = normalise_message(text)
    assert normalise_message(once) == once


def plainly_normalised(text: str) -> str:
    """normalise_message as SPEC words it, one step per rule, with no regard for speed: the
    reference the quick version is checked against."""

    def without_notes(text: str) -> str:
        while (stripped := re.sub(r"^\s*\[[^\[\]]{0,2000}\]", "", text)) != text:
            text = stripped
        while (stripped := re.sub(r"\[[^\[\]]{0,2000}\]\s*$", "", text)) != text:
            text = stripped
        return text.strip()

    text = without_notes(text)
    lines = [line for line in text.splitlines() if not line.lstrip().startswith(">")]
    text = without_notes("\n".join(lines)).casefold()
    text = re.sub(r"(?<![\w])@[A-Za-z0-9._=/+-]+(?::[A-Za-z0-9.-]+(?::\d+)?)?", "", text)
    text = re.sub(r"\s+", " ", text)
    return re.sub(r" ([,.;:!?])", r"\1", text).strip()


DECORATION = st.text(
    alphabet=st.sampled_from(list("ab >[]@.,:!?\n\r\x0b\x1c\x85\u2028\t\u00a0ßİ1-"))
)


@settings(max_examples=600, deadline=None)
@given(st.one_of(DECORATION, st.text(max_size=60)))
def test_normalise_message_is_the_plain_rules(text: str) -> None:
    """The quick normalisation (issue 14: a 64 KB message stalled every claim) means what
    the plain one means, line breaks of every kind included."""
    assert normalise_message(text) == plainly_normalised(text)


def test_a_text_longer_than_any_room_message_could_make_is_not_compared() -> None:
    """Issue 14: a 1 MB last user message was normalised inline (805 ms, every claim
    waiting); no room message can match it, so it is not hashed at all."""
    biggest_event = "why? " * (65536 // 5)
    agent_text = "[Alice] " + biggest_event + "\n\n[System note: replying to:\n> ...]"
    assert message_hash(SALT, agent_text) == message_hash(SALT, biggest_event) is not None
    assert message_hash(SALT, "a" * MAX_COMPARED_CHARS) is not None
    assert message_hash(SALT, "a" * (MAX_COMPARED_CHARS + 1)) is None
    assert turn_key(Turn(last_user_message="x" * 1_000_000), SALT) is None


@pytest.mark.parametrize(
    "text",
    [
        "a" + " " * 1_000_000 + "b",
        "[a]" * 300_000 + "x",
        "x" + " [a]" * 300_000,
        "[" * 1_000_000,
        "]" * 1_000_000,
        "[" + " " * 1_000_000,
        "\n" * 500_000 + "x",
    ],
    ids=[
        "spaces",
        "leading-notes",
        "trailing-notes",
        "opening",
        "closing",
        "open-spaces",
        "newlines",
    ],
)
def test_normalising_a_hostile_megabyte_stays_fast(text: str) -> None:
    start = time.perf_counter()
    normalise_message(text)
    is_command_turn(text, PREFIXES)
    assert time.perf_counter() - start < 2.0


# --- turn_key ----------------------------------------------------------------------------


def test_turn_key_has_both_parts_when_both_exist() -> None:
    key = turn_key(Turn(turn_id="$ev1", last_user_message="[Alice] hi"), SALT)
    assert key == TurnKey(turn_id="$ev1", message_hash=message_hash(SALT, "hi"))


def test_turn_key_from_the_turn_id_alone() -> None:
    assert turn_key(Turn(turn_id="$ev1"), SALT) == TurnKey("$ev1", None)
    assert turn_key(Turn(turn_id="$ev1", last_user_message="[Alice] "), SALT) == TurnKey(
        "$ev1", None
    )


def test_turn_key_from_the_message_alone() -> None:
    assert turn_key(Turn(last_user_message="hi"), SALT) == TurnKey(None, message_hash(SALT, "hi"))


@pytest.mark.parametrize(
    "turn", [Turn(), Turn(room_id=ROOM), Turn(last_user_message=""), Turn(last_user_message="  ")]
)
def test_turn_key_is_none_without_turn_id_or_message(turn: Turn) -> None:
    assert turn_key(turn, SALT) is None


def test_turn_key_prints_short() -> None:
    assert str(TurnKey("$ev1", "ab" * 32)) == "$ev1/" + "ab" * 6
    assert str(TurnKey(None, None)) == "-/-"


def test_turn_key_ref_is_the_whole_key() -> None:
    assert TurnKey("$ev1", "ab" * 32).ref == "$ev1/" + "ab" * 32
    assert TurnKey("$ev1", None).ref == "$ev1/-"
    assert TurnKey(None, "ab" * 32).ref == "-/" + "ab" * 32


@settings(max_examples=100, deadline=None)
@given(
    st.none() | st.from_regex(r"\$[A-Za-z0-9_.:-]{1,40}", fullmatch=True),
    st.none() | st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
    st.none() | st.from_regex(r"\$[A-Za-z0-9_.:-]{1,40}", fullmatch=True),
    st.none() | st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
)
def test_turn_key_ref_is_stable_and_tells_keys_apart(
    turn_a: str | None, hash_a: str | None, turn_b: str | None, hash_b: str | None
) -> None:
    a, b = TurnKey(turn_a, hash_a), TurnKey(turn_b, hash_b)
    assert a.ref == TurnKey(turn_a, hash_a).ref  # the same key, the same ref: a stored name
    assert (a.ref == b.ref) is (a == b)


def test_turn_key_ref_of_a_derived_key_is_the_same_for_every_call_of_the_turn() -> None:
    first = turn_key(Turn(turn_id="$ev1", last_user_message="[Alice] Why?"), SALT)
    again = turn_key(Turn(turn_id="$ev1", last_user_message="why ?"), SALT)
    assert first is not None and again is not None
    assert first.ref == again.ref


# --- place_turn --------------------------------------------------------------------------


def seen(
    event_id: str, minutes: int, text: str, thread: str | None = None, is_command: bool = False
) -> SeenMessage:
    return SeenMessage(
        room_id=ROOM,
        event_id=event_id,
        thread_id=thread,
        sent_at=T0 + timedelta(minutes=minutes),
        message_hash=message_hash(SALT, text),
        is_command=is_command,
    )


THREAD = [
    seen("$root", 0, "first question"),
    seen("$m1", 1, "follow-up one", thread="$root"),
    seen("$cmd", 2, "/route cloud", thread="$root", is_command=True),
    seen("$m2", 3, "follow-up two", thread="$root"),
]


def test_inside_a_thread_the_hash_beats_the_shared_turn_id() -> None:
    key = TurnKey("$root", message_hash(SALT, "[Alice] follow-up two"))
    assert place_turn(key, THREAD) == Placement.of(THREAD[3])
    assert place_turn(key, THREAD).arrived_at == T0 + timedelta(minutes=3)
    key = TurnKey("$root", message_hash(SALT, "follow-up one"))
    assert place_turn(key, THREAD).arrived_at == T0 + timedelta(minutes=1)


def test_placement_says_when_the_turn_is_a_command_message() -> None:
    key = TurnKey("$root", message_hash(SALT, "[Alice] /route cloud"))
    placement = place_turn(key, THREAD)
    assert placement == Placement(T0 + timedelta(minutes=2), is_command=True, message=THREAD[2])


def test_turn_id_alone_places_the_latest_message_of_its_event_or_thread() -> None:
    assert place_turn(TurnKey("$m1", None), THREAD).arrived_at == T0 + timedelta(minutes=1)
    assert place_turn(TurnKey("$root", None), THREAD).arrived_at == T0 + timedelta(minutes=3)
    assert place_turn(TurnKey("$elsewhere", None), THREAD).arrived_at is None


def test_an_unknown_hash_falls_back_to_the_turn_id() -> None:
    # A top-level message still being answered: its own event, before any command.
    alone = [seen("$q1", 0, "@hermes why did it fail?"), seen("$cmd", 1, "!route cloud")]
    key = TurnKey("$q1", message_hash(SALT, "the text as the agent changed it"))
    assert place_turn(key, alone) == Placement(arrived_at=T0, is_command=False, message=alone[0])
    key = TurnKey("$m1", message_hash(SALT, "a message the side-car never saw"))
    assert place_turn(key, THREAD).arrived_at == T0 + timedelta(minutes=1)


def test_hash_in_the_turn_beats_a_later_identical_message_elsewhere() -> None:
    messages = [seen("$a", 0, "same text", thread="$t"), seen("$b", 5, "same text")]
    key = TurnKey("$t", message_hash(SALT, "same text"))
    assert place_turn(key, messages).arrived_at == T0


def test_identical_messages_outside_the_turn_place_at_the_latest() -> None:
    messages = [seen("$a", 0, "same text"), seen("$b", 5, "same text")]
    assert place_turn(TurnKey(None, message_hash(SALT, "same text")), messages).arrived_at == (
        T0 + timedelta(minutes=5)
    )
    assert place_turn(TurnKey("$zzz", message_hash(SALT, "same text")), messages).arrived_at == (
        T0 + timedelta(minutes=5)
    )


def test_placement_carries_the_placed_message() -> None:
    key = TurnKey("$root", message_hash(SALT, "[Alice] follow-up one"))
    assert place_turn(key, THREAD).message is THREAD[1]
    assert place_turn(TurnKey("$root", None), THREAD).message is THREAD[3]
    assert place_turn(TurnKey("$elsewhere", None), THREAD).message is None
    assert place_turn(None, THREAD).message is None


def test_placement_of_a_message_is_when_and_what_it_was() -> None:
    placement = Placement.of(THREAD[2])
    assert placement.arrived_at == THREAD[2].sent_at
    assert placement.is_command
    assert placement.message == THREAD[2]


def test_unknown_turns_are_unplaced() -> None:
    assert place_turn(None, THREAD) == Placement(arrived_at=None, is_command=False)
    assert place_turn(TurnKey("$root", message_hash(SALT, "x")), []) == Placement(None, False)
    assert place_turn(TurnKey(None, message_hash(SALT, "never seen")), THREAD).arrived_at is None


# --- resolve_room ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rooms", "expected"),
    [
        ([], None),
        (["!a:x"], "!a:x"),
        (["!a:x", "!a:x", "!a:x"], "!a:x"),
        (["!a:x", "!b:x"], None),
        (["!a:x", "!b:x", "!a:x"], None),
    ],
)
def test_room_resolves_only_when_exactly_one_room_matches(
    rooms: list[str], expected: str | None
) -> None:
    assert resolve_room(rooms) == expected


# --- is_command_turn ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "[alice] !route cloud",
        "[alice] /route cloud\n\n[System note: x]",
        "/route cloud",
        "!ROUTE status",
        "[Note: model was just switched]\n\n[alice] /route",
        "  [Alice Smith]   !route cloud --turns 3  ",
    ],
)
def test_single_line_command_turn_is_recognised(text: str) -> None:
    assert is_command_turn(text, PREFIXES)


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "[alice] hello",
        "[alice] /route cloud\nWhy did the deploy fail?",
        "[alice] Why did the deploy fail?",
        "[alice] what does /route cloud do?",
        "[alice] /router",
    ],
)
def test_other_turns_are_not_command_turns(text: str | None) -> None:
    assert not is_command_turn(text, PREFIXES)


def test_command_turn_follows_the_configured_prefixes() -> None:
    assert is_command_turn("[alice] ?ai cloud", ("?ai",))
    assert not is_command_turn("[alice] /route cloud", ("?ai",))


@pytest.mark.parametrize(
    ("matrix_body", "agent_text"),
    [
        ("@hermes:example.org why did the deploy fail ?", "[alice] why did the deploy fail?"),
        ("@hermes why did the deploy fail?", "[alice] why did the deploy fail?"),
        ("hey @hermes, why did it fail?", "[alice] hey, why did it fail?"),
        ("Hermes Agent: why?", "[alice] Hermes Agent: why?"),  # a pill keeps the name
    ],
)
def test_a_mention_the_agent_strips_does_not_change_the_hash(
    matrix_body: str, agent_text: str
) -> None:
    assert message_hash(SALT, matrix_body) == message_hash(SALT, agent_text)


def test_an_email_address_is_not_taken_for_a_mention() -> None:
    assert "bob@example.org" in normalise_message("mail bob@example.org now")


# --- notice_place: where a notice about a turn goes ----------------------------------------


def placed(event_id: str, thread: str | None = None) -> SeenMessage:
    return SeenMessage(
        room_id=ROOM,
        event_id=event_id,
        thread_id=thread,
        sent_at=T0,
        message_hash=message_hash(SALT, "Why?"),
        is_command=False,
        sender="@alice:example.org",
    )


@pytest.mark.parametrize(
    ("key", "message", "place"),
    [
        # The placed message is in a thread: the notice goes there, in reply to it.
        (TurnKey("$root", "h"), placed("$m2", thread="$root"), ("$root", "$m2")),
        (TurnKey(None, "h"), placed("$m2", thread="$root"), ("$root", "$m2")),
        (TurnKey("sess-1", "h"), placed("$m2", thread="$root"), ("$root", "$m2")),
        # Top-level message and a Matrix turn id (Hermes threads each top-level message).
        (TurnKey("$q1", "h"), placed("$q1"), ("$q1", "$q1")),
        (TurnKey("$q1", None), placed("$q1"), ("$q1", "$q1")),
        # No placed message: the turn id is the thread root and the reply target.
        (TurnKey("$q1", "h"), None, ("$q1", "$q1")),
        (TurnKey("$q1", None), None, ("$q1", "$q1")),
        # A DM: no turn id, no thread; the notice replies to the message.
        (TurnKey(None, "h"), placed("$dm"), (None, "$dm")),
        # A turn id that is no event id (a session id) is no thread root.
        (TurnKey("sess-1", "h"), placed("$dm"), (None, "$dm")),
        # Nothing known: the notice stands alone.
        (TurnKey(None, "h"), None, (None, None)),
        (TurnKey("sess-1", None), None, (None, None)),
        (None, None, (None, None)),
        (None, placed("$dm"), (None, "$dm")),
        (None, placed("$m2", thread="$root"), ("$root", "$m2")),
    ],
)
def test_a_notice_about_a_turn_goes_in_its_thread_in_reply_to_its_message(
    key: TurnKey | None, message: SeenMessage | None, place: tuple[str | None, str | None]
) -> None:
    assert notice_place(key, message) == place


@settings(max_examples=100, deadline=None)
@given(
    st.none() | st.sampled_from(["$q1", "$root", "sess-1", ""]),
    st.none() | st.sampled_from(["h", "other"]),
    st.none() | st.tuples(st.sampled_from(["$m1", "$q1"]), st.none() | st.just("$root")),
)
def test_a_notice_in_a_thread_always_replies_to_something(
    turn_id: str | None, hash_: str | None, message: tuple[str, str | None] | None
) -> None:
    key = TurnKey(turn_id, hash_) if turn_id or hash_ else None
    seen_message = placed(*message) if message is not None else None
    thread, reply_to = notice_place(key, seen_message)
    if thread is not None:
        assert reply_to is not None
    if seen_message is not None:
        assert reply_to == seen_message.event_id
    for event in (thread, reply_to):
        assert event is None or event.startswith("$"), "only event ids relate a notice"
