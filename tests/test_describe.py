"""SPEC "Chat commands", MSC4391: the command described for clients (derived from the
parser's grammar and the configured targets), and a structured invocation read as the
command the same text would be."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from route_sidecar.core import commands
from route_sidecar.core.commands import (
    DEFAULT_PREFIXES,
    ClearIntent,
    CommandError,
    RouteTo,
    Scope,
    ShowHelp,
    ShowStatus,
    parse_command,
)
from route_sidecar.core.describe import (
    DESCRIPTION_EVENT,
    Invocation,
    command_name,
    command_of,
    command_text,
    current_description,
    description,
    is_invocation_for,
    needs_update,
    parse_message,
    state_key,
)
from route_sidecar.core.policy import may_send_state

BOT = "@route:example.org"
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def invoked(arguments: Any, mentions: tuple[str, ...] = (BOT,)) -> Invocation:
    return Invocation("route", arguments, mentions)


# ---- the description ----------------------------------------------------------------


def test_state_key_is_the_padded_base64_of_sha256_of_command_then_user_id() -> None:
    # The example of MSC4391's text: command `ban`, sender @draupnir:draupnir.space.
    assert state_key("ban", "@draupnir:draupnir.space") == (
        "JBDLR6YMe+72yqsEMi/MVdTmjN3ynPThMz+M7QLATZQ="
    )
    assert len(state_key("route", BOT)) == 44 and state_key("route", BOT).endswith("=")


def test_command_name_is_the_first_prefix_without_its_sigil() -> None:
    assert command_name(DEFAULT_PREFIXES) == "route"
    assert command_name(("!llm", "/llm")) == "llm"


def test_description_offers_targets_and_command_words_as_literal_choices() -> None:
    content = description(DEFAULT_PREFIXES, ["cloud", "local"])
    assert content["command"] == "route"
    first, *options = content["parameters"]
    assert first["key"] == "target" and not first.get("optional")
    assert first["schema"]["schema_type"] == "union"
    values = [v["value"] for v in first["schema"]["variants"]]
    assert values == ["cloud", "local", *commands.NAMED_WORDS, "auto"]
    assert {v["schema_type"] for v in first["schema"]["variants"]} == {"literal"}
    assert [(o["key"], o["schema"]["type"], o["optional"]) for o in options] == [
        ("turns", "integer", True),
        ("for", "string", True),
        ("again", "boolean", True),
    ]
    for part in (content, *content["parameters"]):
        assert part["description"]["m.text"][0]["body"]


def test_description_follows_the_grammar_every_choice_parses() -> None:
    """Derived from core/commands.py: each choice, option and `again` is what the parser
    reads (a change to the grammar shows here)."""
    content = description(DEFAULT_PREFIXES, ["cloud"])
    for variant in content["parameters"][0]["schema"]["variants"]:
        assert not isinstance(parse_command(f"/route {variant['value']}"), CommandError)
    for option in ("--turns 2", "--for 10m", "again"):
        assert isinstance(parse_command(f"/route cloud {option}"), RouteTo)
    keys = {p["key"] for p in content["parameters"][1:]}
    assert keys == {
        commands.TURNS_OPTION[2:],
        commands.FOR_OPTION[2:],
        commands.AGAIN_WORDS[0],
    }


def test_description_adds_a_free_string_when_raw_models_are_allowed() -> None:
    variants = description(DEFAULT_PREFIXES, ["cloud"], raw_models=True)["parameters"][0]
    assert {"schema_type": "primitive", "type": "string"} in variants["schema"]["variants"]


def test_description_changes_with_the_targets_only() -> None:
    one = description(DEFAULT_PREFIXES, ["cloud"])
    assert description(DEFAULT_PREFIXES, ["cloud"]) == one
    assert description(DEFAULT_PREFIXES, ["cloud", "big"]) != one


def test_current_description_is_read_from_the_room_state() -> None:
    key = state_key("route", BOT)
    content = description(DEFAULT_PREFIXES, ["cloud"])
    state = [
        {"type": "m.room.create", "state_key": "", "content": {}},
        {"type": DESCRIPTION_EVENT, "state_key": "other", "content": {"command": "x"}},
        {"type": DESCRIPTION_EVENT, "state_key": key, "content": content},
    ]
    assert current_description(state, key) == content
    assert current_description(state[:2], key) is None
    removed = [{"type": DESCRIPTION_EVENT, "state_key": key, "content": {}}]
    assert current_description(removed, key) is None
    assert not needs_update(content, content)
    assert needs_update(None, content) and needs_update(content, {})
    assert not needs_update(None, {})  # nothing to remove


def test_the_bot_may_describe_only_with_the_power_level_for_state_events() -> None:
    def state(levels: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"type": "m.room.power_levels", "state_key": "", "content": levels}]

    assert may_send_state(BOT, state({"users": {BOT: 50}}), DESCRIPTION_EVENT)
    assert not may_send_state(BOT, state({"users": {BOT: 0}}), DESCRIPTION_EVENT)
    assert not may_send_state(
        BOT, state({"users": {BOT: 50}, "state_default": 100}), DESCRIPTION_EVENT
    )
    assert may_send_state(
        BOT,
        state({"users": {BOT: 10}, "events": {DESCRIPTION_EVENT: 10}}),
        DESCRIPTION_EVENT,
    )
    assert not may_send_state(
        BOT, state({"users": {BOT: 100}, "events": {DESCRIPTION_EVENT: 101}}), DESCRIPTION_EVENT
    )
    assert may_send_state(BOT, [], DESCRIPTION_EVENT)  # no power_levels event at all


# ---- structured invocations ---------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"target": "cloud"}, RouteTo("cloud")),
        ({"target": "Cloud", "turns": 3}, RouteTo("cloud", Scope.next_turns(3))),
        ({"target": "cloud", "for": "30m"}, RouteTo("cloud", Scope.lasting(timedelta(minutes=30)))),
        ({"target": "cloud", "again": True}, RouteTo("cloud", again=True)),
        ({"target": "cloud", "again": False}, RouteTo("cloud")),
        ({"target": "auto"}, ClearIntent("auto")),
        ({"target": "help"}, ShowHelp()),
        ({"target": "status"}, ShowStatus()),
        ({}, ShowStatus()),
        (None, ShowStatus()),
        ({"target": "", "for": "", "turns": None}, ShowStatus()),  # fields left empty
        ({"target": "cloud", "for": ""}, RouteTo("cloud")),
    ],
)
def test_an_invocation_is_the_command_its_arguments_spell(arguments: Any, expected: Any) -> None:
    assert command_of(invoked(arguments), DEFAULT_PREFIXES) == expected


def test_an_invocation_and_the_typed_command_give_the_same_answer() -> None:
    """One parser rule: an invocation is written out and parsed, so its errors are the
    typed command's errors."""
    for arguments, typed in [
        ({"target": "status", "turns": 2}, "/route status --turns 2"),
        ({"target": "cloud", "turns": 0}, "/route cloud --turns 0"),
        ({"target": "cloud", "turns": 10**40}, f"/route cloud --turns {10**40}"),
        ({"target": "cloud", "turns": -3}, "/route cloud --turns -3"),
        ({"target": "cloud", "for": "ever"}, "/route cloud --for ever"),
        ({"target": "cloud", "turns": 2, "for": "1h"}, "/route cloud --turns 2 --for 1h"),
        ({"target": "cloud", "turns": 2, "again": True}, "/route cloud --turns 2 again"),
        ({"target": "again"}, "/route again"),
        ({"target": "--turns", "turns": 2}, "/route --turns --turns 2"),
        ({"target": "no/such"}, "/route no/such"),
    ]:
        assert command_of(invoked(arguments), DEFAULT_PREFIXES) == parse_command(typed), typed


@pytest.mark.parametrize(
    "arguments",
    [
        [],
        "cloud",
        42,
        {"target": 5},
        {"target": "cloud --turns 9"},  # one argument cannot smuggle words in
        {"target": "cloud\nWhat is 2+2?"},
        {"target": ["cloud"]},
        {"target": {"id": "cloud"}},
        {"target": "cloud", "turns": "3"},
        {"target": "cloud", "turns": True},
        {"target": "cloud", "turns": 2.5},
        {"target": "cloud", "for": 30},
        {"target": "cloud", "for": "30 m"},
        {"target": "cloud", "again": "yes"},
        {"target": "cloud", "model": "x"},
        {"target": "cloud", "`evil`" * 20: 1},
        {f"k{i}": i for i in range(40)},
    ],
)
def test_malformed_arguments_are_an_error_saying_what_to_send(arguments: Any) -> None:
    parsed = command_of(invoked(arguments), DEFAULT_PREFIXES)
    assert isinstance(parsed, CommandError)
    assert "!route" in parsed.message  # the form the bot teaches
    assert parsed.message.count("`") % 2 == 0  # user text cannot break out of a code span


@FAST
@given(JSON)
def test_any_arguments_give_a_command_or_an_error_never_an_exception(arguments: Any) -> None:
    parsed = command_of(invoked(arguments), DEFAULT_PREFIXES)
    assert parsed is not None
    text = command_text(arguments, "/route")
    if not isinstance(text, CommandError):
        assert "\n" not in text  # never a question: that is the body's, not an argument's


def test_an_invocation_counts_only_for_this_command_with_the_bot_mentioned() -> None:
    assert is_invocation_for(invoked({"target": "cloud"}), DEFAULT_PREFIXES, BOT)
    assert not is_invocation_for(invoked({}, mentions=()), DEFAULT_PREFIXES, BOT)
    assert not is_invocation_for(
        invoked({}, mentions=("@other:example.org",)), DEFAULT_PREFIXES, BOT
    )
    assert not is_invocation_for(Invocation("gif", {}, (BOT,)), DEFAULT_PREFIXES, BOT)
    assert not is_invocation_for(None, DEFAULT_PREFIXES, BOT)


def test_structured_arguments_take_precedence_over_the_body() -> None:
    gomuks_body = f"/route{BOT} cloud"  # what gomuks sends: the parser does not read it
    assert parse_command(gomuks_body) is None
    invocation = invoked({"target": "cloud", "turns": 2})
    assert parse_message(gomuks_body, invocation, DEFAULT_PREFIXES, BOT) == RouteTo(
        "cloud", Scope.next_turns(2)
    )
    # The body says otherwise: the arguments win.
    assert parse_message("!route local", invocation, DEFAULT_PREFIXES, BOT) == RouteTo(
        "cloud", Scope.next_turns(2)
    )
    # Not mentioned, another command, or the switch off: the body as typed.
    unmentioned = invoked({"target": "cloud"}, mentions=())
    assert parse_message("!route local", unmentioned, DEFAULT_PREFIXES, BOT) == RouteTo("local")
    assert parse_message(gomuks_body, unmentioned, DEFAULT_PREFIXES, BOT) is None
    assert parse_message(
        "!route local", invocation, DEFAULT_PREFIXES, BOT, structured=False
    ) == RouteTo("local")
    assert parse_message("hello", None, DEFAULT_PREFIXES, BOT) is None


def test_a_configured_prefix_names_the_invoked_command() -> None:
    prefixes = ("!llm",)
    invocation = Invocation("llm", {"target": "cloud"}, (BOT,))
    assert parse_message("/llm@bot cloud", invocation, prefixes, BOT) == RouteTo("cloud")
    assert parse_message("x", invoked({"target": "cloud"}), prefixes, BOT) is None
