"""What the bot says: one m.notice per command, HTML with a plain fallback, never raw HTML
from users or config, and the relations that put it in reply and in the thread."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from route_sidecar.config import Target
from route_sidecar.core.commands import (
    RESERVED_WORDS,
    RouteTo,
    Scope,
    parse_command,
    typable_prefix,
)
from route_sidecar.core.history import Call, PastTurn
from route_sidecar.core.intents import (
    ANSWERING_WITHOUT_REPORT,
    ClaimedTurn,
    EndReason,
    Intent,
    Timing,
    answering,
    cancel,
    claim,
    new_intent,
)
from route_sidecar.core.replies import (
    ACCOUNT_TURNS,
    DETAIL_CHARS,
    EXCERPT_CHARS,
    Text,
    account,
    cancelled,
    cleared,
    command_error,
    confirmation,
    edit_content,
    excerpt,
    expired,
    failure_suggestion,
    help_text,
    history,
    literal,
    nothing_to_reask,
    notice_content,
    reaction_content,
    reask_confirmation,
    receipt,
    refusal,
    render,
    status,
    targets_list,
)
from route_sidecar.core.turns import TurnKey

T0 = datetime(2026, 5, 9, 11, 0, tzinfo=UTC)
TIMING = Timing()
HOSTILE = '<script>alert("x")</script>'
ALLOWED_TAGS = re.compile(r"</?(?:code|b|del)>|<br>")


def intent_for(
    target: str = "cloud",
    model: str = "ollama-cloud/glm-5.1",
    sender: str = "@alice:example.org",
    scope: Scope | None = None,
    question_hash: str | None = None,
) -> Intent:
    return new_intent(
        intent_id="i1",
        room_id="!r:example.org",
        target=target,
        model=model,
        scope=scope or Scope.once(),
        sender=sender,
        command_event_id="$cmd",
        command_thread_id=None,
        command_at=T0,
        now=T0,
        question_hash=question_hash,
    )


def no_raw_html(html: str) -> bool:
    """Only the tags the renderer itself writes; everything else is escaped text."""
    return "<" not in ALLOWED_TAGS.sub("", html) and ">" not in ALLOWED_TAGS.sub("", html)


# --- render ------------------------------------------------------------------------------


def test_render_turns_code_and_bold_into_html_and_keeps_a_plain_fallback() -> None:
    text = render("Type `/route cloud` for **cloud**.\nThen wait.")
    assert text.html == "Type <code>/route cloud</code> for <b>cloud</b>.<br>Then wait."
    assert text.plain == "Type `/route cloud` for cloud.\nThen wait."


def test_render_escapes_html_in_the_text() -> None:
    text = render(f"Unknown target {HOSTILE} & `{HOSTILE}` and **{HOSTILE}**")
    assert "<script>" not in text.html
    assert "&lt;script&gt;" in text.html
    assert "&amp;" in text.html
    assert no_raw_html(text.html)
    assert HOSTILE in text.plain  # the plain body is text, shown as text by clients


def test_render_leaves_unpaired_markup_alone() -> None:
    text = render("a `b and **c")
    assert text.html == "a `b and **c"
    assert text.plain == "a `b and **c"


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_render_never_lets_markup_through(markup: str) -> None:
    text = render(markup)
    assert no_raw_html(text.html)
    assert "\n" not in text.html


# --- hostile names in every reply --------------------------------------------------------


def test_hostile_target_model_and_sender_never_appear_unescaped() -> None:
    hostile = intent_for(target=HOSTILE, model=HOSTILE, sender=f"@{HOSTILE}:example.org")
    active = claim(
        hostile, ClaimedTurn(TurnKey("$a", "h")), T0 + timedelta(seconds=5), TIMING
    ).intent
    texts = [
        confirmation(hostile, hostile, TIMING, "/route"),
        confirmation(intent_for(target=HOSTILE, question_hash="q"), None, TIMING, "/route"),
        status(hostile, [], T0, TIMING, "/route"),
        status(active, [[]], T0, TIMING, "/route"),
        cleared(hostile, cancel(active, T0 + timedelta(seconds=6), EndReason.CLEARED, TIMING), "/"),
        account(
            cancel(active, T0 + timedelta(seconds=6), EndReason.SUPERSEDED, TIMING),
            [[Call(HOSTILE, "ok", 10)]],
            T0,
            TIMING,
            "/",
        ),
        cancelled(cancel(hostile, T0, EndReason.API, TIMING), HOSTILE),
        expired(hostile, TIMING),
        receipt(hostile, [HOSTILE, "other<b>"], ["ok", "error"], 1200),
        receipt(hostile, [HOSTILE], ["error"], None),
        refusal(f"Unknown target `{HOSTILE}`"),
        command_error(HOSTILE),
        targets_list(
            [Target(name=HOSTILE, model=HOSTILE, aliases=(HOSTILE,), description=HOSTILE)],
            HOSTILE,
            raw_allowed=True,
        ),
        help_text(HOSTILE, [HOSTILE, "!route"]),
    ]
    for text in texts:
        assert "<script>" not in text.html, text.html
        assert no_raw_html(text.html), text.html


# --- replies say what happened -----------------------------------------------------------


def test_confirmation_names_target_model_scope_and_how_to_cancel() -> None:
    text = confirmation(intent_for(scope=Scope.next_turns(3)), None, TIMING, "!route")
    assert "**cloud**" not in text.plain and "cloud" in text.plain
    assert "<code>ollama-cloud/glm-5.1</code>" in text.html
    assert "the next 3 turns" in text.plain
    assert "`!route auto`" in text.plain
    assert "11:15:00 UTC" in text.plain  # expires after the TTL if unused


def test_confirmation_says_what_it_replaces() -> None:
    text = confirmation(intent_for(), intent_for(target="local"), TIMING, "/route")
    assert "replaces the earlier route to local" in text.plain


def test_confirmation_of_the_multi_line_form_speaks_of_this_question() -> None:
    text = confirmation(intent_for(question_hash="q" * 64), None, TIMING, "/route")
    assert "this question" in text.plain


T_CLOSE = T0 + timedelta(seconds=9)


def served(scope: Scope, turns: int) -> Intent:
    intent = intent_for(scope=scope)
    for n in range(turns):
        key = TurnKey(f"$t{n}", f"h{n}")
        intent = claim(intent, ClaimedTurn(key), T0 + timedelta(seconds=5 + n), TIMING).intent
    return intent


@pytest.mark.parametrize(
    ("reason", "turns", "expected"),
    [
        (EndReason.SUPERSEDED, 0, "Route to cloud: replaced by a newer route. Nothing was routed."),
        (EndReason.CLEARED, 0, "Route to cloud: cancelled by `!route auto`. Nothing was routed."),
        (EndReason.REDACTED, 0, "Route to cloud: the command was deleted. Nothing was routed."),
        (EndReason.API, 0, "Route to cloud: cancelled through the API. Nothing was routed."),
        (
            EndReason.SUPERSEDED,
            1,
            "Route to cloud (`ollama-cloud/glm-5.1`), the next 3 turns: used for 1 turn (the "
            "answer in progress finishes on cloud); later turns follow the newer route.",
        ),
        (
            EndReason.CLEARED,
            2,
            "Route to cloud (`ollama-cloud/glm-5.1`), the next 3 turns: used for 2 turns (the "
            "answer in progress finishes on cloud); later turns are routed automatically.",
        ),
    ],
)
def test_an_ended_route_says_how_many_turns_it_served_never_replaced_once_used(
    reason: EndReason, turns: int, expected: str
) -> None:
    intent = served(Scope.next_turns(3), turns)
    after = cancel(intent, T_CLOSE, reason, TIMING)
    unreported: list[list[Call]] = [[] for _ in range(turns)]
    text = account(after, unreported, T_CLOSE, TIMING, "!route", served=False).plain
    assert text == expected
    if turns:  # once no call is in flight, the edit no longer speaks of an answer in progress
        later = account(after, unreported, T_CLOSE + timedelta(minutes=2), TIMING, "!route")
        assert "in progress" not in later.plain and f"used for {turns} turn" in later.plain


def test_an_answer_is_in_progress_only_while_a_call_of_its_turn_is_in_flight() -> None:
    turn = served(Scope.once(), 1).bound_turns[0]  # claimed once, at T0 + 5 s
    claimed = turn.last_claim_at
    # A dispatcher that reports: in flight until the call is reported.
    assert answering(turn, 0, claimed + timedelta(seconds=1), TIMING)
    assert not answering(turn, 1, claimed + timedelta(seconds=1), TIMING)
    again = turn.called(claimed + timedelta(seconds=2), TIMING)
    assert again is not None and answering(again, 1, claimed + timedelta(seconds=3), TIMING)
    # One that never reports: only moments after the latest claim.
    assert not answering(turn, 0, claimed + ANSWERING_WITHOUT_REPORT, TIMING)
    # Never once the turn has ended, reported or not.
    assert not answering(again, 1, claimed + TIMING.turn_idle * 2, TIMING)


def test_auto_says_the_answer_in_progress_finishes_only_while_one_is_in_flight() -> None:
    active = served(Scope.once(), 1)
    closed = cancel(active, T_CLOSE, EndReason.CLEARED, TIMING)
    text = cleared(active, closed, "!", in_flight=True).plain
    assert "The answer in progress finishes on cloud." in text
    assert "(in use until now)" in text
    assert "in progress" not in cleared(active, closed, "!", in_flight=False).plain
    pending = intent_for()
    ended = cancel(pending, T_CLOSE, EndReason.CLEARED, TIMING)
    assert "in progress" not in cleared(pending, ended, "!", in_flight=True).plain
    assert "nothing was set" in cleared(None, None, "!").plain


ANSWERED = [Call("ollama-cloud/glm-5.1", "ok", 20), Call("ollama-cloud/glm-5.1", "ok", 6)]


def test_the_confirmation_becomes_the_routes_account_of_what_served() -> None:
    one = served(Scope.once(), 1)
    answering_now = account(one, [[]], T_CLOSE, TIMING, "!route").plain
    assert answering_now.startswith("Route to cloud (`ollama-cloud/glm-5.1`), the next turn:")
    assert "answering now" in answering_now
    done = account(one, [ANSWERED], T_CLOSE, TIMING, "!route").plain
    assert done == (
        "Route to cloud (`ollama-cloud/glm-5.1`), the next turn: used for 1 turn; later turns "
        "are routed automatically.\n"
        "• Answered by cloud (`ollama-cloud/glm-5.1`): 2 call(s), 26 ms."
    )
    # In the thread-receipt mode the account leaves the served models to the receipts.
    assert "Answered by" not in account(one, [ANSWERED], T_CLOSE, TIMING, "!", False).plain


def test_the_account_of_several_turns_keeps_a_short_running_list() -> None:
    three = served(Scope.next_turns(3), 2)
    text = account(three, [ANSWERED, []], T_CLOSE + timedelta(minutes=2), TIMING, "!route")
    lines = text.plain.split("\n")
    assert lines[0].endswith("the next 3 turns: 2 of 3 turns used.")
    assert lines[1].startswith("• Answered by cloud")
    assert lines[2] == "• no outcome reported, so I cannot say which model answered."
    assert "If no further turn uses it by" in text.plain and "`!route auto`" in text.plain
    many = served(Scope.lasting(timedelta(hours=1)), 8)
    text = account(many, [ANSWERED] * 8, T_CLOSE, TIMING, "!route")
    assert text.plain.count("• Answered by") == ACCOUNT_TURNS
    assert "• … 3 earlier turn(s)" in text.plain
    assert "used for 8 turns so far, until 12:00:00 UTC." in text.plain


def test_status_of_a_route_whose_turn_was_answered_says_so() -> None:
    one = served(Scope.once(), 1)
    text = status(one, [ANSWERED], T_CLOSE, TIMING, "!route").plain
    assert "State: used for 1 turn; later turns are routed automatically." in text
    assert "Ends at" not in text  # nothing left to cancel
    text = status(one, [[]], T_CLOSE, TIMING, "!route").plain
    assert "State: answering now." in text


def test_status_without_intent_says_how_to_set_one() -> None:
    text = status(None, [], T0, TIMING, "/route")
    assert "`/route <target>`" in text.plain


def test_an_unused_for_route_expires_at_its_end_and_says_so() -> None:
    text = expired(intent_for(scope=Scope.lasting(timedelta(hours=2))), TIMING).plain
    assert "before 13:00:00 UTC" in text and "15m" not in text


def test_expired_strikes_the_route_through() -> None:
    text = expired(intent_for(), TIMING)
    assert text.html.startswith("<del>Route to cloud</del>")
    assert "15m" in text.plain and "Nothing was routed" in text.plain


def test_receipt_reports_what_was_served_not_what_was_asked() -> None:
    intent = intent_for()
    ok = receipt(intent, ["ollama-cloud/glm-5.1"] * 3, ["ok"] * 3, 6816)
    assert ok.plain.startswith("Answered by cloud")
    assert "3 call(s)" in ok.plain and "6.8 s" in ok.plain
    other = receipt(intent, ["glm-4.7-flash:q4_K_M", "ollama-cloud/glm-5.1"], ["ok", "ok"], None)
    assert other.plain.startswith("⚠")
    assert "glm-4.7-flash:q4_K_M" in other.plain
    failed = receipt(intent, ["ollama-cloud/glm-5.1"] * 2, ["error", "error"], 100)
    assert "failed" in failed.plain and "all errors" in failed.plain
    partly = receipt(intent, ["ollama-cloud/glm-5.1"] * 2, ["ok", "error"], 100)
    assert "1 call(s) failed" in partly.plain


def test_targets_list_shows_aliases_models_and_an_example() -> None:
    text = targets_list(
        [Target("cloud", "ollama-cloud/glm-5.1", ("c",), 0, "hard questions")], "/route", False
    )
    assert "`cloud`" in text.plain and "`c`" in text.plain and "hard questions" in text.plain
    assert "`/route cloud`" in text.plain
    assert "model:" not in text.plain
    assert "No target" in targets_list([], "/route", False).plain


def test_help_names_the_other_prefix() -> None:
    text = help_text("/route", ["/route", "!route"])
    assert "`!route` works the same" in text.plain
    assert "`/route auto`" in text.plain


# --- event contents ----------------------------------------------------------------------

TEXT = Text(plain="Routing to cloud.", html="Routing to <b>cloud</b>.")


def test_notice_is_an_html_m_notice_that_mentions_nobody() -> None:
    content = notice_content(TEXT)
    assert content == {
        "msgtype": "m.notice",
        "body": "Routing to cloud.",
        "format": "org.matrix.custom.html",
        "formatted_body": "Routing to <b>cloud</b>.",
        "m.mentions": {},
    }


def test_notice_replies_to_the_command() -> None:
    content = notice_content(TEXT, reply_to="$cmd")
    assert content["m.relates_to"] == {"m.in_reply_to": {"event_id": "$cmd"}}


def test_notice_in_a_thread_stays_in_the_thread_and_replies_to_the_command() -> None:
    content = notice_content(TEXT, reply_to="$cmd", thread_root="$root")
    assert content["m.relates_to"] == {
        "rel_type": "m.thread",
        "event_id": "$root",
        "is_falling_back": False,
        "m.in_reply_to": {"event_id": "$cmd"},
    }


def test_notice_in_a_thread_without_a_reply_target_replies_to_the_root() -> None:
    content = notice_content(TEXT, thread_root="$root")
    assert content["m.relates_to"]["m.in_reply_to"] == {"event_id": "$root"}


def test_edit_replaces_the_notice_with_a_fallback_body() -> None:
    content = edit_content(TEXT, "$notice")
    assert content["m.relates_to"] == {"rel_type": "m.replace", "event_id": "$notice"}
    assert content["body"] == "* Routing to cloud."
    assert content["formatted_body"] == "* Routing to <b>cloud</b>."
    assert content["msgtype"] == "m.notice"
    assert content["m.new_content"] == {
        "msgtype": "m.notice",
        "body": "Routing to cloud.",
        "format": "org.matrix.custom.html",
        "formatted_body": "Routing to <b>cloud</b>.",
        "m.mentions": {},
    }
    assert "m.relates_to" not in content["m.new_content"]


def test_reaction_annotates_the_event() -> None:
    assert reaction_content("$cmd") == {
        "m.relates_to": {"rel_type": "m.annotation", "event_id": "$cmd", "key": "✅"}
    }


@pytest.mark.parametrize("reply_to", [None, "$cmd"])
@pytest.mark.parametrize("thread_root", [None, "$root"])
def test_notice_always_carries_body_and_html(reply_to: str | None, thread_root: str | None) -> None:
    content = notice_content(render("**x** `y`"), reply_to=reply_to, thread_root=thread_root)
    assert content["body"] == "x `y`"
    assert content["formatted_body"] == "<b>x</b> <code>y</code>"
    assert ("m.relates_to" in content) is (reply_to is not None or thread_root is not None)


# --- literal text and excerpts -----------------------------------------------------------

ALICE = "@alice:example.org"
BOB = "@bob:example.org"
MARKUP_QUESTION = "Why does <b>deploy</b> fail with `make all` and **no** logs & <x>?"


def test_literal_text_is_escaped_and_never_marked_up() -> None:
    text = literal(MARKUP_QUESTION)
    assert text.plain == MARKUP_QUESTION
    assert text.html == (
        "Why does &lt;b&gt;deploy&lt;/b&gt; fail with `make all` and **no** logs &amp; &lt;x&gt;?"
    )


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_literal_text_never_lets_markup_through(words: str) -> None:
    text = literal(words)
    assert "<" not in text.html and ">" not in text.html
    assert text.plain == words


def test_texts_add_up_body_by_body() -> None:
    joined = render("**a** ") + literal("<b>") + render(" `c`")
    assert joined == Text(plain="a <b> `c`", html="<b>a</b> &lt;b&gt; <code>c</code>")


def test_markup_never_pairs_across_added_texts() -> None:
    joined = render("x `") + literal("y") + render("` z")
    assert "<code>" not in joined.html


EXCERPTS = [
    ("Why did it fail?", "Why did it fail?"),
    ("  Why\n did\t\tit \r\n fail?  ", "Why did it fail?"),
    ("line one\u2028line two\u00a0end", "line one line two end"),
    ("a" * EXCERPT_CHARS, "a" * EXCERPT_CHARS),
    ("a" * (EXCERPT_CHARS + 1), "a" * (EXCERPT_CHARS - 1) + "…"),
    ("", ""),
    (" \n\t ", ""),
]


@pytest.mark.parametrize(("text", "expected"), EXCERPTS, ids=[repr(t)[:30] for t, _ in EXCERPTS])
def test_excerpt_is_one_short_line(text: str, expected: str) -> None:
    assert excerpt(text) == expected


def test_excerpt_cut_drops_the_space_before_the_ellipsis() -> None:
    assert excerpt("abcd efgh", limit=6) == "abcd…"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("re\u200bstart", "restart"),  # zero-width space
        ("de\u00adploy", "deploy"),  # soft hyphen
        ("a\x00b\x7fc", "abc"),  # control characters
        ("why\u200e?", "why?"),  # left-to-right mark
    ],
)
def test_excerpt_drops_non_printable_characters(text: str, expected: str) -> None:
    assert excerpt(text) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300), st.integers(min_value=1, max_value=120))
def test_excerpt_is_always_one_printable_line_within_the_limit(text: str, limit: int) -> None:
    line = excerpt(text, limit)
    assert len(line) <= limit
    assert line.isprintable()
    assert line == line.strip()
    assert "  " not in line
    folded = " ".join(text.split())
    if folded.isprintable() and len(folded) <= limit:
        assert line == folded
    elif folded.isprintable():
        assert line.endswith("…") and folded.startswith(line[:-1])


# --- `again` -----------------------------------------------------------------------------

REASKED = intent_for(question_hash="q" * 64)


def test_reask_confirmation_quotes_the_question_and_names_target_and_model() -> None:
    text = reask_confirmation(REASKED, "Why did the deploy fail?", ALICE, T0, None, "!route")
    assert text.plain.startswith("Re-asking “Why did the deploy fail?”")
    assert f"asked by {ALICE}" in text.plain
    assert "<b>cloud</b>" in text.html and "<code>ollama-cloud/glm-5.1</code>" in text.html
    assert "`!route auto`" in text.plain
    assert "really answered" in text.plain


def test_reask_confirmation_shows_markup_in_the_question_as_it_is() -> None:
    question = excerpt(MARKUP_QUESTION)
    text = reask_confirmation(REASKED, question, ALICE, T0, None, "/route")
    assert f"“{question}”" in text.plain
    assert "&lt;b&gt;deploy&lt;/b&gt;" in text.html
    assert "`make all`" in text.html and "<code>make all</code>" not in text.html
    assert "**no**" in text.html and "<b>no</b>" not in text.html
    assert no_raw_html(text.html)


def test_reask_confirmation_of_a_hostile_question_is_escaped() -> None:
    text = reask_confirmation(REASKED, excerpt(HOSTILE), f"@{HOSTILE}:x", T0, None, HOSTILE)
    assert "<script>" not in text.html
    assert no_raw_html(text.html)


def test_stored_reask_confirmation_never_holds_the_question() -> None:
    text = reask_confirmation(REASKED, None, ALICE, T0 + timedelta(seconds=42), None, "!route")
    assert "deploy" not in text.plain and "“" not in text.plain
    assert f"asked by {ALICE} at 11:00:42 UTC" in text.plain
    assert "the room's last question" in text.plain
    assert "<b>cloud</b>" in text.html


def test_reask_confirmation_without_a_known_asker_still_says_when() -> None:
    text = reask_confirmation(REASKED, None, None, T0, None, "!route")
    assert "(asked at 11:00:00 UTC)" in text.plain
    assert "None" not in text.plain


def test_reask_confirmation_says_what_it_replaces() -> None:
    text = reask_confirmation(REASKED, "Why?", ALICE, T0, intent_for(target="local"), "!route")
    assert "replaces the earlier route to local" in text.plain


def test_nothing_to_reask_says_nothing_was_routed_and_what_to_type() -> None:
    text = nothing_to_reask("cloud", "!route", timedelta(minutes=15))
    assert text.plain.startswith("⛔")
    assert "15m" in text.plain
    assert "Nothing was routed" in text.plain
    assert "`!route cloud`" in text.plain and "next line" in text.plain


# --- the failure suggestion ----------------------------------------------------------------

CLOUD = Target("cloud", "ollama-cloud/glm-5.1", ("c",), 0, "hard questions")
BIG = Target("big", "ollama-cloud/kimi-k2", (), 50)
COMMAND_SPAN = re.compile(r"• `([^`]+)`")


def test_failure_suggestion_names_the_model_and_each_command_to_type() -> None:
    text = failure_suggestion("glm-4.7-flash:q4_K_M", "HTTP 500", [CLOUD, BIG], "!route")
    assert text.plain.startswith("⚠")
    assert "`glm-4.7-flash:q4_K_M`" in text.plain and "(HTTP 500)" in text.plain
    assert COMMAND_SPAN.findall(text.plain) == ["!route cloud again", "!route big again"]
    assert "<code>!route cloud again</code>: hard questions" in text.html
    assert "<code>!route big again</code>" in text.html


@pytest.mark.parametrize("prefixes", [("/route", "!route"), ("!route",), ("/ai", "?ai")])
def test_every_suggested_command_parses_back_to_again_on_its_target(
    prefixes: tuple[str, ...],
) -> None:
    text = failure_suggestion("m", None, [CLOUD, BIG], typable_prefix(prefixes))
    commands = COMMAND_SPAN.findall(text.plain)
    assert [parse_command(c, prefixes) for c in commands] == [
        RouteTo(target="cloud", again=True),
        RouteTo(target="big", again=True),
    ]


@settings(max_examples=100, deadline=None)
@given(
    st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True).filter(
        lambda name: name not in RESERVED_WORDS
    )
)
def test_the_command_for_any_target_name_parses_back(name: str) -> None:
    text = failure_suggestion("m", None, [Target(name, "m2")], "!route")
    (command,) = COMMAND_SPAN.findall(text.plain)
    assert parse_command(command) == RouteTo(target=name, again=True)


def test_failure_detail_is_shown_as_it_is_on_one_line_and_cut() -> None:
    detail = "upstream said:\n<b>overloaded</b> `retry` **later** " + "x" * 500
    text = failure_suggestion("m", detail, [CLOUD], "!route")
    assert "&lt;b&gt;overloaded&lt;/b&gt; `retry` **later**" in text.html
    assert "<code>retry</code>" not in text.html and "<b>later</b>" not in text.html
    assert "upstream said: <b>overloaded</b>" in text.plain
    assert f"({excerpt(detail, DETAIL_CHARS)})" in text.plain
    assert "x" * 300 not in text.plain
    assert "\n" not in text.plain.splitlines()[0] and "…" in text.plain.splitlines()[0]


def test_failure_suggestion_without_targets_says_to_ask_the_admin() -> None:
    text = failure_suggestion("m", None, [], "!route")
    assert "ask the admin" in text.plain
    assert " again`" not in text.plain
    assert "()" not in text.plain  # no empty detail


def test_hostile_model_detail_and_targets_never_appear_unescaped_in_new_replies() -> None:
    hostile_target = Target(HOSTILE, HOSTILE, (), 0, HOSTILE)
    hostile_turn = PastTurn(T0, (Call(HOSTILE, "error", 1),), HOSTILE)
    routed_turn = PastTurn(T0, (Call(HOSTILE, "ok", 1),), HOSTILE, HOSTILE, "other", 1)
    texts = [
        failure_suggestion(HOSTILE, HOSTILE, [hostile_target], HOSTILE),
        failure_suggestion(HOSTILE, HOSTILE, [], HOSTILE),
        history([hostile_turn, routed_turn], HOSTILE),
        history([], HOSTILE),
        nothing_to_reask(HOSTILE, HOSTILE, timedelta(minutes=15)),
        reask_confirmation(
            intent_for(target=HOSTILE, model=HOSTILE), HOSTILE, HOSTILE, T0, None, "!"
        ),
    ]
    for text in texts:
        assert "<script>" not in text.html, text.html
        assert no_raw_html(text.html), text.html


# --- `/route history` ----------------------------------------------------------------------

LOCAL_MODEL = "glm-4.7-flash:q4_K_M"
CLOUD_MODEL = "ollama-cloud/glm-5.1"


def past(
    minutes: int,
    calls: list[tuple[str, str, int | None]],
    who: str | None = ALICE,
    target: str | None = "cloud",
    claims: int = 1,
) -> PastTurn:
    return PastTurn(
        at=T0 + timedelta(minutes=minutes),
        calls=tuple(Call(m, s, ms) for m, s, ms in calls),
        who=who,
        target=target,
        model=CLOUD_MODEL if target else None,
        claims=claims,
    )


def history_lines(turns: list[PastTurn]) -> list[str]:
    return history(turns, "!route").plain.splitlines()


def test_empty_history_says_how_to_route_a_turn() -> None:
    text = history([], "!route")
    assert "No routed or failed turn" in text.plain
    assert "`!route <target>`" in text.plain


def test_a_routed_turn_served_as_asked_shows_model_calls_and_time() -> None:
    (line,) = history_lines([past(0, [(CLOUD_MODEL, "ok", 1200), (CLOUD_MODEL, "ok", 1800)])])[1:]
    assert line.startswith("• 11:00:00 UTC · ")
    assert f"routed to cloud by {ALICE}: served `{CLOUD_MODEL}`, 2 call(s), 3.0 s" in line
    assert "⚠" not in line


def test_a_routed_turn_served_by_another_model_is_flagged() -> None:
    (line,) = history_lines([past(0, [(LOCAL_MODEL, "ok", 500)])])[1:]
    assert "⚠" in line
    assert f"asked for `{CLOUD_MODEL}`" in line and f"served `{LOCAL_MODEL}`" in line


def test_a_routed_turn_served_partly_by_another_model_is_flagged() -> None:
    (line,) = history_lines([past(0, [(CLOUD_MODEL, "ok", 1), (LOCAL_MODEL, "ok", 1)])])[1:]
    assert "⚠" in line and LOCAL_MODEL in line


def test_a_routed_turn_without_outcomes_says_none_was_reported() -> None:
    (line,) = history_lines([past(0, [], claims=3)])[1:]
    assert "routed to cloud" in line
    assert "no outcome reported (3 claim(s))" in line


def test_a_routed_turn_that_failed_is_flagged_with_its_errors() -> None:
    (line,) = history_lines([past(0, [(CLOUD_MODEL, "ok", 100), (CLOUD_MODEL, "error", 100)])])[1:]
    assert "⚠ failed" in line
    assert "2 call(s), 1 failed" in line


def test_a_routed_turn_with_a_recovered_error_counts_it() -> None:
    (line,) = history_lines([past(0, [(CLOUD_MODEL, "error", None), (CLOUD_MODEL, "ok", None)])])[
        1:
    ]
    assert "⚠" not in line
    assert line.endswith("2 call(s), 1 failed")  # no latency reported, none shown


def test_a_failed_turn_on_automatic_routing_names_who_asked_and_the_model() -> None:
    turn = past(0, [(LOCAL_MODEL, "ok", 1000), (LOCAL_MODEL, "error", 500)], who=BOB, target=None)
    (line,) = history_lines([turn])[1:]
    assert "⚠ failed on automatic routing" in line
    assert f"`{LOCAL_MODEL}`" in line and f"asked by {BOB}" in line
    assert "2 call(s), the last one an error, 1.5 s" in line


def test_a_latency_under_a_second_is_shown_in_milliseconds() -> None:
    (line,) = history_lines([past(0, [(CLOUD_MODEL, "ok", 250), (CLOUD_MODEL, "ok", 200)])])[1:]
    assert line.endswith("2 call(s), 450 ms")


def test_a_failed_turn_with_no_known_asker_says_someone() -> None:
    (line,) = history_lines([past(0, [(LOCAL_MODEL, "error", None)], who=None, target=None)])[1:]
    assert "asked by someone" in line and "None" not in line


def test_history_keeps_the_order_it_is_given() -> None:
    turns = [
        past(9, [(CLOUD_MODEL, "ok", 1)]),
        past(5, [(LOCAL_MODEL, "error", 1)], who=BOB, target=None),
        past(1, [], target="local"),
    ]
    lines = history_lines(turns)
    assert lines[0].startswith("Last routed and failed turns here")
    assert [line[2:14] for line in lines[1:]] == ["11:09:00 UTC", "11:05:00 UTC", "11:01:00 UTC"]
    assert (
        "<b>Last routed and failed turns here</b>, newest first:" in history(turns, "!route").html
    )


# --- help ----------------------------------------------------------------------------------


def test_help_lists_again_and_history() -> None:
    text = help_text("!route", ["/route", "!route"])
    assert "`!route <target> again`" in text.plain and "`retry`" in text.plain
    assert "`!route history`" in text.plain
