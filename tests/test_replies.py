"""What the bot says: one m.notice per command, HTML with a plain fallback, never raw HTML
from users or config, and the relations that put it in reply and in the thread."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.commands import Scope
from bot.config import Target
from bot.intents import ClaimedTurn, Intent, Timing, claim, new_intent
from bot.replies import (
    Text,
    cleared,
    command_error,
    confirmation,
    edit_content,
    expired,
    help_text,
    notice_content,
    reaction_content,
    receipt,
    refusal,
    render,
    status,
    targets_list,
)
from bot.turns import TurnKey

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
        status(hostile, T0, TIMING, "/route"),
        status(active, T0, TIMING, "/route"),
        cleared(hostile, "/route"),
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


def test_status_without_intent_says_how_to_set_one() -> None:
    text = status(None, T0, TIMING, "/route")
    assert "`/route <target>`" in text.plain


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
