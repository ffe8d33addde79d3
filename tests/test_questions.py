"""SPEC "Retry": the side-car remembers, per room, the last question (in memory only, for
`intent_ttl`), so that `/route <target> again` can re-ask it."""

from __future__ import annotations

import ast
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from route_sidecar.core.questions import LastQuestions, Question

TTL = timedelta(minutes=15)
T0 = datetime(2026, 5, 9, 11, 0, tzinfo=UTC)
ROOM = "!abc:example.org"
OTHER = "!other:example.org"
QUESTIONS_FILE = Path(__file__).resolve().parent.parent / "route_sidecar" / "core" / "questions.py"


def asked(text: str, minutes: float = 0, sender: str = "@alice:example.org") -> Question:
    return Question(
        text=text,
        asked_at=T0 + timedelta(minutes=minutes),
        event_id=f"${text[:8]}",
        sender=sender,
    )


# --- the last question of a room ---------------------------------------------------------


def test_a_room_with_no_question_has_none() -> None:
    assert LastQuestions(TTL).last(ROOM, T0) is None


def test_the_last_question_remembered_is_the_one_returned() -> None:
    questions = LastQuestions(TTL)
    first, second = asked("Why did it fail?", 0), asked("And now?", 1)
    questions.remember(ROOM, first)
    assert questions.last(ROOM, T0 + timedelta(minutes=1)) == first
    questions.remember(ROOM, second)
    assert questions.last(ROOM, T0 + timedelta(minutes=2)) == second


def test_an_older_question_never_replaces_a_newer_one() -> None:
    questions = LastQuestions(TTL)
    newer = asked("newer", 5)
    questions.remember(ROOM, newer)
    questions.remember(ROOM, asked("older, delivered late", 4))
    assert questions.last(ROOM, T0 + timedelta(minutes=6)) == newer


def test_a_question_asked_at_the_same_moment_replaces_the_kept_one() -> None:
    questions = LastQuestions(TTL)
    questions.remember(ROOM, asked("first", 1))
    second = asked("second", 1)
    questions.remember(ROOM, second)
    assert questions.last(ROOM, T0 + timedelta(minutes=1)) == second


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=20, unique=True))
def test_whatever_the_arrival_order_the_newest_question_is_kept(seconds: list[int]) -> None:
    questions = LastQuestions(TTL)
    for s in seconds:
        questions.remember(ROOM, Question(text=str(s), asked_at=T0 + timedelta(seconds=s)))
    kept = questions.last(ROOM, T0 + timedelta(seconds=max(seconds)))
    assert kept is not None and kept.text == str(max(seconds))


def test_rooms_are_kept_apart() -> None:
    questions = LastQuestions(TTL)
    here, there = asked("here", 0), asked("there", 1)
    questions.remember(ROOM, here)
    questions.remember(OTHER, there)
    now = T0 + timedelta(minutes=2)
    assert questions.last(ROOM, now) == here
    assert questions.last(OTHER, now) == there
    assert questions.last("!third:example.org", now) is None
    assert len(questions) == 2


def test_where_the_question_came_from_is_kept_with_it() -> None:
    questions = LastQuestions(TTL)
    question = Question("Why?", T0, "$ev", "@bob:example.org", "$root")
    questions.remember(ROOM, question)
    kept = questions.last(ROOM, T0)
    assert kept is not None
    assert (kept.text, kept.asked_at, kept.event_id, kept.sender, kept.thread_id) == (
        "Why?",
        T0,
        "$ev",
        "@bob:example.org",
        "$root",
    )


# --- the TTL -----------------------------------------------------------------------------


def test_a_question_exactly_ttl_old_is_still_there() -> None:
    questions = LastQuestions(TTL)
    question = asked("Why?", 0)
    questions.remember(ROOM, question)
    assert questions.last(ROOM, T0 + TTL) == question


def test_a_question_older_than_the_ttl_is_gone() -> None:
    questions = LastQuestions(TTL)
    questions.remember(ROOM, asked("Why?", 0))
    assert questions.last(ROOM, T0 + TTL + timedelta(microseconds=1)) is None


def test_the_ttl_is_the_one_given() -> None:
    questions = LastQuestions(timedelta(minutes=2))
    questions.remember(ROOM, asked("Why?", 0))
    assert questions.last(ROOM, T0 + timedelta(minutes=2)) is not None
    assert questions.last(ROOM, T0 + timedelta(minutes=2, seconds=1)) is None


def test_a_question_timestamped_slightly_in_the_future_is_there() -> None:
    # A homeserver clock a little ahead of ours.
    questions = LastQuestions(TTL)
    question = asked("Why?", 1)
    questions.remember(ROOM, question)
    assert questions.last(ROOM, T0) == question


def test_forget_expired_drops_only_the_questions_older_than_the_ttl() -> None:
    questions = LastQuestions(TTL)
    questions.remember(ROOM, asked("old", 0))
    kept = asked("at the limit", 5)
    questions.remember(OTHER, kept)
    questions.forget_expired(T0 + timedelta(minutes=5) + TTL)
    assert len(questions) == 1
    assert questions.last(OTHER, T0 + timedelta(minutes=5) + TTL) == kept
    # Gone for good: asking with an earlier clock does not bring it back.
    assert questions.last(ROOM, T0) is None


def test_forget_expired_on_a_fresh_store_does_nothing() -> None:
    questions = LastQuestions(TTL)
    questions.forget_expired(T0)
    assert len(questions) == 0


# --- the memory bound --------------------------------------------------------------------


def test_the_room_bound_evicts_the_room_quiet_the_longest() -> None:
    questions = LastQuestions(TTL, max_rooms=2)
    questions.remember("!a:x", asked("a", 0))
    questions.remember("!b:x", asked("b", 1))
    questions.remember("!c:x", asked("c", 2))
    now = T0 + timedelta(minutes=3)
    assert len(questions) == 2
    assert questions.last("!a:x", now) is None
    assert questions.last("!b:x", now) is not None
    assert questions.last("!c:x", now) is not None


def test_a_room_that_asks_again_is_no_longer_the_quietest() -> None:
    questions = LastQuestions(TTL, max_rooms=2)
    questions.remember("!a:x", asked("a", 0))
    questions.remember("!b:x", asked("b", 1))
    questions.remember("!a:x", asked("a again", 2))
    questions.remember("!c:x", asked("c", 3))
    now = T0 + timedelta(minutes=4)
    assert questions.last("!b:x", now) is None
    kept = questions.last("!a:x", now)
    assert kept is not None and kept.text == "a again"


def test_a_late_older_question_does_not_make_its_room_look_recent() -> None:
    questions = LastQuestions(TTL, max_rooms=2)
    questions.remember("!a:x", asked("a", 5))
    questions.remember("!b:x", asked("b", 6))
    questions.remember("!a:x", asked("a, delivered late", 1))  # refused: older
    questions.remember("!c:x", asked("c", 7))
    now = T0 + timedelta(minutes=8)
    assert questions.last("!a:x", now) is None
    assert questions.last("!b:x", now) is not None


def test_reading_a_question_does_not_count_as_the_room_asking() -> None:
    questions = LastQuestions(TTL, max_rooms=2)
    questions.remember("!a:x", asked("a", 0))
    questions.remember("!b:x", asked("b", 1))
    assert questions.last("!a:x", T0 + timedelta(minutes=2)) is not None
    questions.remember("!c:x", asked("c", 2))
    assert questions.last("!a:x", T0 + timedelta(minutes=3)) is None


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=1, max_value=20), st.integers(min_value=0, max_value=60))
def test_never_more_rooms_than_the_bound(bound: int, rooms: int) -> None:
    questions = LastQuestions(TTL, max_rooms=bound)
    for i in range(rooms):
        questions.remember(f"!r{i}:x", Question(str(i), T0 + timedelta(seconds=i)))
    assert len(questions) == min(bound, rooms)
    if rooms:  # the newest room is always kept
        assert questions.last(f"!r{rooms - 1}:x", T0 + timedelta(seconds=rooms)) is not None


# --- loadable by the agent plugin --------------------------------------------------------


def test_the_module_imports_only_the_standard_library() -> None:
    # The Hermes plugin loads this file by path inside the agent's own environment.
    tree = ast.parse(QUESTIONS_FILE.read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import does not load by path"
            assert node.module is not None
            imported.add(node.module.partition(".")[0])
    assert imported <= sys.stdlib_module_names | {"__future__"}, imported
