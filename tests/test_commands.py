"""SPEC "Chat commands": message text → a command, or an error saying what to type instead."""

from __future__ import annotations

import random
import re
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from route_sidecar.core.commands import (
    AGAIN_WORDS,
    CLEAR_WORDS,
    DEFAULT_PREFIXES,
    MAX_TURNS_SYNTAX,
    RESERVED_WORDS,
    ClearIntent,
    Command,
    CommandError,
    LeaveRoom,
    ListTargets,
    RouteTo,
    Scope,
    ScopeKind,
    ShowHelp,
    ShowHistory,
    ShowStatus,
    asked_question,
    format_command,
    format_duration,
    is_command,
    is_single_line_command,
    parse_command,
    parse_duration,
    typable_prefix,
)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies --------------------------------------------------------------------------

target_names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True).filter(
    lambda name: name not in RESERVED_WORDS
)
raw_model_targets = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,60}", fullmatch=True).map(
    lambda model_id: "model:" + model_id
)
durations = st.integers(min_value=1, max_value=999_999 * 3600).map(
    lambda seconds: timedelta(seconds=seconds)
)
scopes = st.one_of(
    st.just(Scope.once()),
    st.integers(min_value=1, max_value=MAX_TURNS_SYNTAX).map(Scope.next_turns),
    durations.map(Scope.lasting),
)
# A question survives the round trip only as split_first_line leaves it: stripped, non-empty.
questions = st.text(min_size=1, max_size=200).map(str.strip).filter(bool)


@st.composite
def route_commands(draw: st.DrawFn) -> RouteTo:
    target = draw(st.one_of(target_names, target_names, raw_model_targets))
    scope = draw(scopes)
    question = draw(st.none() | questions)
    again = scope.kind is ScopeKind.ONCE and question is None and draw(st.booleans())
    return RouteTo(target=target, scope=scope, question=question, again=again)


valid_commands: st.SearchStrategy[Command] = st.one_of(
    st.just(ShowStatus()),
    st.just(ShowHelp()),
    st.just(ListTargets()),
    st.just(ShowHistory()),
    st.just(LeaveRoom()),
    st.sampled_from(CLEAR_WORDS).map(ClearIntent),
    route_commands(),
)


def vary_case(text: str, rnd: random.Random) -> str:
    """Randomly re-case the first line: prefix, command words, target, options. A raw model
    id keeps its case (only its `model:` prefix varies): model ids are case-sensitive."""
    first, newline, rest = text.partition("\n")

    def flip(word: str) -> str:
        return "".join(ch.upper() if rnd.random() < 0.5 else ch for ch in word)

    words = []
    for word in first.split(" "):
        if word.lower().startswith("model:"):
            words.append(flip(word[:6]) + word[6:])
        else:
            words.append(flip(word))
    return " ".join(words) + newline + rest


def vary_spacing(text: str, rnd: random.Random) -> str:
    """Random runs of spaces and tabs between the words of the first line, and around it."""
    first, newline, rest = text.partition("\n")
    gaps = [" " * rnd.randint(1, 3) + "\t" * rnd.randint(0, 1) for _ in first.split(" ")]
    joined = "".join(w + g for w, g in zip(first.split(" "), gaps, strict=True)).rstrip(" \t")
    return " " * rnd.randint(0, 2) + joined + " " * rnd.randint(0, 2) + newline + rest


def says_what_to_type(error: CommandError, prefix: str = DEFAULT_PREFIXES[0]) -> bool:
    """An error reply names a whole command to type instead, as a code span."""
    return re.search(r"`" + re.escape(prefix) + r"(?: [^`]*)?`", error.message) is not None


# --- never raises ------------------------------------------------------------------------


@FAST
@given(st.text())
def test_parse_command_never_raises_on_any_text(body: str) -> None:
    result = parse_command(body)
    assert result is None or isinstance(
        result,
        CommandError
        | ShowStatus
        | ShowHelp
        | ListTargets
        | ShowHistory
        | LeaveRoom
        | ClearIntent
        | RouteTo,
    )


COMMAND_VOCABULARY = [
    "cloud",
    "CLOUD",
    "local",
    "model:",
    "model:gpt-4o",
    "model:<bad>",
    "status",
    "help",
    "targets",
    "history",
    "leave",
    "auto",
    "off",
    "cancel",
    "again",
    "retry",
    "--turns",
    "--turns=",
    "--turns=3",
    "--for",
    "--for=1h30m",
    "--x",
    "-",
    "--",
    "3",
    "0",
    "-1",
    "1001",
    "30m",
    "1h30m",
    "0s",
    "1d",
    "٣",
    "²",
    "𝟘",
    "é",
    "<script>",
    "`",
    "\t",
    "\u00a0",
    "\u2028",
    "\x00",
    "\r",
]


@FAST
@given(
    st.sampled_from([*DEFAULT_PREFIXES, "/ROUTE", "!Route"]),
    st.lists(st.sampled_from(COMMAND_VOCABULARY) | st.text(max_size=8), max_size=8),
    st.none() | st.text(max_size=30),
)
def test_every_malformed_command_says_what_to_type_instead(
    prefix: str, words: list[str], question: str | None
) -> None:
    body = " ".join([prefix, *words]) + (f"\n{question}" if question is not None else "")
    result = parse_command(body)
    assert result is not None, "a line starting with the prefix and a space is a command"
    if isinstance(result, CommandError):
        assert says_what_to_type(result), result.message


@FAST
@given(
    st.sampled_from(["cloud", "Local", "model:gpt-4o", "big-2"]),
    st.lists(st.sampled_from(COMMAND_VOCABULARY), min_size=1, max_size=5),
    st.none() | st.sampled_from(["Why?", "  ", "line 1\nline 2"]),
)
def test_every_malformed_route_says_what_to_type_instead(
    target: str, words: list[str], question: str | None
) -> None:
    body = " ".join(["/route", target, *words]) + (f"\n{question}" if question else "")
    result = parse_command(body)
    assert isinstance(result, CommandError | RouteTo)
    if isinstance(result, CommandError):
        assert says_what_to_type(result), result.message


@pytest.mark.parametrize(
    "body",
    [
        "/route " + "a" * 1_000_000,
        "/route cloud --turns " + "9" * 200_000,
        "/route cloud --for " + "1" * 200_000 + "h",
        "/route cloud " + "again " * 100_000,
        "/route cloud\n" + "question " * 200_000,
        "/route " + " " * 500_000 + "cloud",
        "x" * 1_000_000,
        "/route model:" + "a" * 500_000,
    ],
    ids=[
        "long-target",
        "long-turns",
        "long-for",
        "many-agains",
        "long-question",
        "long-spaces",
        "long-non-command",
        "long-model",
    ],
)
def test_parse_command_handles_huge_messages(body: str) -> None:
    result = parse_command(body)
    assert result is None or isinstance(result, CommandError | RouteTo)
    if isinstance(result, CommandError):
        assert len(result.message) < 500, "the error never echoes the whole message"


@pytest.mark.parametrize("value", [None, 42, b"/route cloud", ["/route"], {"body": "/route"}])
def test_parse_command_returns_none_for_non_text(value: object) -> None:
    assert parse_command(value) is None  # type: ignore[arg-type]


# --- round trip --------------------------------------------------------------------------


@FAST
@given(valid_commands, st.sampled_from(DEFAULT_PREFIXES))
def test_every_valid_command_round_trips(command: Command, prefix: str) -> None:
    assert parse_command(format_command(command, prefix)) == command


@FAST
@given(valid_commands, st.sampled_from(DEFAULT_PREFIXES), st.randoms(use_true_random=False))
def test_prefix_and_command_words_are_case_insensitive(
    command: Command, prefix: str, rnd: random.Random
) -> None:
    assert parse_command(vary_case(format_command(command, prefix), rnd)) == command


@FAST
@given(valid_commands, st.sampled_from(DEFAULT_PREFIXES), st.randoms(use_true_random=False))
def test_spaces_and_tabs_between_words_do_not_matter(
    command: Command, prefix: str, rnd: random.Random
) -> None:
    assert parse_command(vary_spacing(format_command(command, prefix), rnd)) == command


@FAST
@given(valid_commands)
def test_slash_and_bang_prefixes_are_equivalent(command: Command) -> None:
    slash = parse_command(format_command(command, "/route"))
    bang = parse_command(format_command(command, "!route"))
    assert slash == bang == command


@FAST
@given(valid_commands, st.sampled_from(["!r", "?ai", "/Route-Bot"]))
def test_configured_prefixes_replace_the_defaults(command: Command, prefix: str) -> None:
    text = format_command(command, prefix)
    assert parse_command(text, (prefix,)) == command
    assert parse_command(text) is None
    assert parse_command(format_command(command, "/route"), (prefix,)) is None


@FAST
@given(durations)
def test_durations_round_trip(duration: timedelta) -> None:
    assert parse_duration(format_duration(duration)) == duration


@FAST
@given(target_names, questions)
def test_multi_line_form_puts_everything_after_the_first_line_into_the_question(
    target: str, question: str
) -> None:
    assert parse_command(f"/route {target}\n{question}") == RouteTo(target, question=question)


# --- malformed forms ---------------------------------------------------------------------

MALFORMED = [
    ("/route cloud --fast", "unknown option"),
    ("/route cloud --turns", "--turns without a number"),
    ("/route cloud --turns three", "--turns with a word"),
    ("/route cloud --turns 2.5", "--turns with a fraction"),
    ("/route cloud --turns -1", "--turns negative"),
    ("/route cloud --turns ٣", "--turns with a non-ASCII digit"),
    ("/route cloud --turns 0", "--turns 0"),
    ("/route cloud --turns 1001", "--turns over the syntax cap"),
    ("/route cloud --turns=", "--turns= empty"),
    ("/route cloud --for", "--for without a duration"),
    ("/route cloud --for 10", "--for without a unit"),
    ("/route cloud --for 2d", "--for in days"),
    ("/route cloud --for 0m", "--for zero"),
    ("/route cloud --turns 3 --for 30m", "both --turns and --for"),
    ("/route cloud --for 30m --turns 3", "both --for and --turns"),
    ("/route cloud --turns 3 --turns 4", "--turns twice"),
    ("/route cloud again\nWhy?", "again with a question"),
    ("/route cloud again --turns 2", "again with --turns"),
    ("/route cloud --for 5m retry", "retry with --for"),
    ("/route cloud again again", "again twice"),
    ("/route cloud please", "words after the target"),
    ("/route cloud why did it fail?", "a question on the first line"),
    ("/route Clo$ud", "bad target characters"),
    ("/route -cloud", "target starting with a dash"),
    ("/route " + "a" * 65, "target too long"),
    ("/route model:", "model: with no id"),
    ("/route model:<script>", "model: with bad characters"),
    ("/route model:-x", "model: id starting with a dash"),
    ("/route again", "again without a target"),
    ("/route retry", "retry without a target"),
    ("/route status now", "status with an argument"),
    ("/route help me", "help with an argument"),
    ("/route auto please", "auto with an argument"),
    ("/route status\nwhat is set?", "status with a question"),
    ("/route\nWhy?", "bare prefix with a question"),
    ("/route auto\nWhy?", "auto with a question"),
]


@pytest.mark.parametrize(("body", "case"), MALFORMED, ids=[c for _, c in MALFORMED])
def test_malformed_command_gives_an_error_with_an_example_to_type(body: str, case: str) -> None:
    result = parse_command(body)
    assert isinstance(result, CommandError), f"{case}: {result!r}"
    assert says_what_to_type(result), f"{case}: {result.message}"


@pytest.mark.parametrize(("body", "case"), MALFORMED, ids=[c for _, c in MALFORMED])
def test_malformed_command_error_shows_the_first_configured_prefix(body: str, case: str) -> None:
    result = parse_command(body.replace("/route", "/ai"), ("!bot", "/ai"))
    assert isinstance(result, CommandError), case
    assert says_what_to_type(result, "!bot"), result.message


def test_error_never_lets_user_text_break_out_of_a_code_span() -> None:
    result = parse_command("/route clo`ud` **x**")
    assert isinstance(result, CommandError)
    assert result.message.count("`") % 2 == 0


def test_unexpected_word_error_tells_to_put_the_question_on_the_next_line() -> None:
    result = parse_command("/route cloud why is the sky blue")
    assert isinstance(result, CommandError)
    assert "next line" in result.message
    assert "`!route cloud`" in result.message


def test_again_without_target_names_an_example_with_a_target() -> None:
    result = parse_command("!route again")
    assert isinstance(result, CommandError)
    assert "`!route cloud again`" in result.message  # the form no client intercepts


# --- not commands ------------------------------------------------------------------------

NOT_COMMANDS = [
    "",
    "   ",
    "\n",
    "hello",
    "/router",
    "/router cloud",
    "!routes",
    "/routecloud",
    "hello /route cloud",
    "route cloud",
    "/ route cloud",
    "///route cloud",
    "//!route cloud",
    "!!route cloud",
    "> /route cloud",
    "\n/route cloud",
    "please\n/route cloud",
    "/rout",
]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("//route cloud", RouteTo("cloud")),  # Element X sends the two slashes as typed
        ("//ROUTE auto", ClearIntent("auto")),
        ("//route cloud\nwhy?", RouteTo("cloud", question="why?")),
        ("//route", ShowStatus()),
    ],
)
def test_a_slash_prefix_is_also_read_with_two_slashes(body: str, expected: object) -> None:
    assert parse_command(body) == expected
    assert is_command(body)


def test_two_slashes_are_read_only_for_a_slash_prefix() -> None:
    assert parse_command("//route cloud", ("!route",)) is None


def test_errors_teach_the_prefix_no_client_intercepts() -> None:
    for prefixes in (("/route", "!route"), ("!route", "/route")):
        result = parse_command("/route cloud why", prefixes)
        assert isinstance(result, CommandError) and "`!route cloud`" in result.message
    only_slash = parse_command("/route cloud why", ("/route",))
    assert isinstance(only_slash, CommandError) and "`/route cloud`" in only_slash.message


@pytest.mark.parametrize("body", NOT_COMMANDS)
def test_non_command_gives_none(body: str) -> None:
    assert parse_command(body) is None
    assert not is_command(body)


# --- examples ----------------------------------------------------------------------------

EXAMPLES: list[tuple[str, Command]] = [
    ("/route", ShowStatus()),
    ("!route", ShowStatus()),
    ("/route status", ShowStatus()),
    ("!ROUTE Status", ShowStatus()),
    ("  /route   status  ", ShowStatus()),
    ("/route help", ShowHelp()),
    ("/route targets", ListTargets()),
    ("/route history", ShowHistory()),
    ("/route leave", LeaveRoom()),
    ("!route LEAVE", LeaveRoom()),
    ("/route auto", ClearIntent("auto")),
    ("/route OFF", ClearIntent("off")),
    ("!route cancel", ClearIntent("cancel")),
    ("/route cloud", RouteTo("cloud")),
    ("!route Cloud", RouteTo("cloud")),
    ("/route\tcloud", RouteTo("cloud")),
    ("/route\u00a0cloud", RouteTo("cloud")),
    ("/route cloud\r\n", RouteTo("cloud")),
    ("/route cloud\n   \n", RouteTo("cloud")),
    ("/route big-model_2.1", RouteTo("big-model_2.1")),
    ("/route cloud --turns 3", RouteTo("cloud", Scope.next_turns(3))),
    ("/route cloud --TURNS=3", RouteTo("cloud", Scope.next_turns(3))),
    ("/route cloud --turns 1000", RouteTo("cloud", Scope.next_turns(1000))),
    ("/route cloud --turns 007", RouteTo("cloud", Scope.next_turns(7))),
    ("/route cloud --for 30m", RouteTo("cloud", Scope.lasting(timedelta(minutes=30)))),
    ("/route cloud --for 1H30M", RouteTo("cloud", Scope.lasting(timedelta(minutes=90)))),
    ("/route cloud --for=45s", RouteTo("cloud", Scope.lasting(timedelta(seconds=45)))),
    ("/route cloud --for 2h", RouteTo("cloud", Scope.lasting(timedelta(hours=2)))),
    ("/route cloud again", RouteTo("cloud", again=True)),
    ("/route cloud retry", RouteTo("cloud", again=True)),
    ("/route cloud AGAIN", RouteTo("cloud", again=True)),
    ("/route cloud\nWhy did it fail?", RouteTo("cloud", question="Why did it fail?")),
    ("/route cloud\r\nWhy?\r\n", RouteTo("cloud", question="Why?")),
    (
        "/route cloud --turns 2\nfirst line\n\nsecond /route line",
        RouteTo("cloud", Scope.next_turns(2), question="first line\n\nsecond /route line"),
    ),
    ("/route model:gpt-4o", RouteTo("model:gpt-4o")),
    ("/route MODEL:Qwen/Qwen3-32B", RouteTo("model:Qwen/Qwen3-32B")),
    ("/route model:ollama-cloud/glm-5.1:q4_K_M", RouteTo("model:ollama-cloud/glm-5.1:q4_K_M")),
]


@pytest.mark.parametrize(("body", "expected"), EXAMPLES, ids=[b for b, _ in EXAMPLES])
def test_examples_parse_as_documented(body: str, expected: Command) -> None:
    assert parse_command(body) == expected


def test_raw_model_id_keeps_its_case_and_exposes_the_model() -> None:
    command = parse_command("/route model:Qwen/Qwen3-32B")
    assert isinstance(command, RouteTo)
    assert command.is_raw_model
    assert command.raw_model == "Qwen/Qwen3-32B"
    plain = parse_command("/route cloud")
    assert isinstance(plain, RouteTo)
    assert not plain.is_raw_model
    assert plain.raw_model is None


def test_reserved_words_are_the_command_words() -> None:
    assert {
        "status",
        "help",
        "targets",
        "history",
        "leave",
        *CLEAR_WORDS,
        *AGAIN_WORDS,
    } == RESERVED_WORDS
    for word in RESERVED_WORDS:
        assert not isinstance(parse_command(f"/route {word}"), RouteTo)


def test_single_line_command_is_told_apart_from_the_multi_line_form() -> None:
    assert is_single_line_command("/route cloud")
    assert is_single_line_command("!route")
    assert not is_single_line_command("/route cloud\nWhy?")
    assert not is_single_line_command("hello")
    assert is_command("/route cloud\nWhy?")


# --- durations and scopes ----------------------------------------------------------------

DURATIONS = [
    ("30s", timedelta(seconds=30)),
    ("10m", timedelta(minutes=10)),
    ("2h", timedelta(hours=2)),
    ("1h30m", timedelta(hours=1, minutes=30)),
    ("1h30m15s", timedelta(hours=1, minutes=30, seconds=15)),
    ("90m", timedelta(minutes=90)),
    (" 10M ", timedelta(minutes=10)),
    ("0h5m", timedelta(minutes=5)),
]


@pytest.mark.parametrize(("text", "expected"), DURATIONS)
def test_parse_duration_reads_hours_minutes_seconds(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["", " ", "0s", "0h0m", "5", "m", "1d", "-5m", "5 m", "1m1h", "1.5h", "h"]
)
def test_parse_duration_refuses_anything_else(text: str) -> None:
    assert parse_duration(text) is None


@pytest.mark.parametrize(
    ("duration", "text"),
    [
        (timedelta(seconds=30), "30s"),
        (timedelta(minutes=90), "1h30m"),
        (timedelta(hours=4), "4h"),
        (timedelta(hours=1, seconds=5), "1h5s"),
    ],
)
def test_format_duration_is_the_shortest_form(duration: timedelta, text: str) -> None:
    assert format_duration(duration) == text


def test_scope_describes_itself_in_words() -> None:
    assert Scope.once().describe() == "the next turn"
    assert Scope.next_turns(3).describe() == "the next 3 turns"
    assert Scope.lasting(timedelta(minutes=30)).describe() == "every turn for 30m"


def test_format_command_refuses_what_is_not_a_command() -> None:
    with pytest.raises(TypeError):
        format_command("status")  # type: ignore[arg-type]


# --- the question a message asks (SPEC "Retry": the room's last question) ---------------


@FAST
@given(st.text(), st.sampled_from([DEFAULT_PREFIXES, ("!r",), ("?ai", "/ai")]))
def test_asked_question_never_raises_and_is_the_text_of_any_non_command(
    body: str, prefixes: tuple[str, ...]
) -> None:
    asked = asked_question(body, prefixes)
    parsed = parse_command(body, prefixes)
    if parsed is None:
        text = body.strip()
        assert asked == (text if text and not text.startswith("/") else None)
    else:
        assert asked == (parsed.question if isinstance(parsed, RouteTo) else None)


@FAST
@given(
    st.lists(st.sampled_from(COMMAND_VOCABULARY) | st.text(max_size=8), max_size=6),
    st.none() | st.text(max_size=30),
)
def test_asked_question_of_a_command_is_only_ever_the_question_of_a_route(
    words: list[str], question: str | None
) -> None:
    body = " ".join(["!route", *words]) + (f"\n{question}" if question is not None else "")
    parsed = parse_command(body)
    asked = asked_question(body)
    if isinstance(parsed, RouteTo) and parsed.question and not parsed.question.startswith("/"):
        assert asked == parsed.question
    else:
        assert asked is None, (parsed, asked)


@FAST
@given(target_names, questions)
def test_the_question_of_the_multi_line_form_is_asked(target: str, question: str) -> None:
    # Unless it starts with `/`: the agent would run it as one of its own commands.
    expected = None if question.startswith("/") else question
    assert asked_question(f"/route {target}\n{question}") == expected
    assert asked_question(f"!ROUTE {target} --turns 2\n{question}") == expected


ASKED = [
    ("Why did the deploy fail?", "Why did the deploy fail?"),
    ("  Why did the deploy fail?  \n", "Why did the deploy fail?"),
    ("line one\n\nline two", "line one\n\nline two"),
    ("@hermes what is /route cloud?", "@hermes what is /route cloud?"),
    ("please\n/route cloud", "please\n/route cloud"),
    ("!router cloud", "!router cloud"),
    ("what does /help do?", "what does /help do?"),
    ("/route cloud\nWhy did it fail?", "Why did it fail?"),
    ("!route Cloud\r\n  Why?  \r\n", "Why?"),
    ("/route cloud --for 30m\nfirst\nsecond", "first\nsecond"),
    ("/route model:gpt-4o\nWhy?", "Why?"),
]


@pytest.mark.parametrize(("body", "question"), ASKED, ids=[b for b, _ in ASKED])
def test_a_message_that_is_not_a_command_asks_its_stripped_text(body: str, question: str) -> None:
    assert asked_question(body) == question


NOT_ASKED = [
    "/route cloud",
    "!route cloud --turns 3",
    "/route cloud again",
    "!route local retry",
    "/route",
    "/route status",
    "/route help",
    "/route targets",
    "/route history",
    "/route auto",
    "!route off",
    "/route cloud please",  # malformed
    "/route again",  # malformed
    "/route cloud again\nWhy?",  # malformed: again takes no question
    "/route status\nwhat is set?",  # malformed: only a route takes a question
    "/route\nWhy?",
    "/route cloud\n   \n",  # a blank question is no question
    "",
    "   ",
    "\n\t \n",
    # The agent takes a message starting with `/` as one of its own commands.
    "/router cloud",
    "/help",
    "  /model gpt-4o  ",
    "/",
]


@pytest.mark.parametrize("body", NOT_ASKED, ids=[repr(b) for b in NOT_ASKED])
def test_every_other_command_and_a_blank_message_ask_nothing(body: str) -> None:
    assert asked_question(body) is None


def test_asked_question_follows_the_configured_prefixes() -> None:
    assert asked_question("?ai cloud", ("?ai",)) is None
    assert asked_question("?ai cloud\nWhy?", ("?ai",)) == "Why?"
    assert asked_question("!route cloud", ("?ai",)) == "!route cloud"


@pytest.mark.parametrize("msgtype", ["m.notice", "m.image", "m.file", "m.emote", "m.video", None])
def test_only_a_text_message_asks_a_question(msgtype: str | None) -> None:
    assert asked_question("Why did it fail?", DEFAULT_PREFIXES, msgtype) is None
    assert asked_question("/route cloud\nWhy did it fail?", DEFAULT_PREFIXES, msgtype) is None
    assert asked_question("Why did it fail?", DEFAULT_PREFIXES, "m.text") == "Why did it fail?"


@pytest.mark.parametrize("value", [None, 42, b"Why?", ["Why?"], {"body": "Why?"}])
def test_asked_question_of_non_text_is_none(value: object) -> None:
    assert asked_question(value) is None  # type: ignore[arg-type]


# --- the prefix the bot suggests typing --------------------------------------------------


@pytest.mark.parametrize(
    ("prefixes", "typable"),
    [
        (("/route", "!route"), "!route"),
        (("!route", "/route"), "!route"),
        (("/route", "?ai", "!route"), "?ai"),
        (("/route",), "/route"),
        (("/route", "/ai"), "/route"),
        (("?ai",), "?ai"),
    ],
)
def test_typable_prefix_is_the_first_that_is_not_a_slash_command(
    prefixes: tuple[str, ...], typable: str
) -> None:
    assert typable_prefix(prefixes) == typable


@FAST
@given(st.lists(st.sampled_from(["/route", "/ai", "!route", "?ai", "!r"]), min_size=1))
def test_typable_prefix_is_one_of_the_prefixes_and_a_slash_only_when_all_are(
    prefixes: list[str],
) -> None:
    typable = typable_prefix(tuple(prefixes))
    assert typable in prefixes
    assert typable.startswith("/") is all(p.startswith("/") for p in prefixes)
