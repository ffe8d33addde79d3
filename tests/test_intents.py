"""SPEC "Intents": the state machine, with explicit times (the core never reads the clock)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from route_sidecar.core.commands import Scope
from route_sidecar.core.intents import (
    BoundTurn,
    Claimed,
    ClaimedTurn,
    ClaimResult,
    EndReason,
    Intent,
    IntentState,
    Timing,
    advance,
    cancel,
    cancel_on_redaction,
    claim,
    claim_among,
    continue_turn,
    current_of,
    expires_at,
    expiry_second_holds_until,
    latest_bound,
    new_intent,
    unused_part_cancelled,
    whole_second,
    with_turn,
)
from route_sidecar.core.turns import Placement, TurnKey

ROOM = "!abc:example.org"
T0 = datetime(2026, 5, 9, 11, 0, tzinfo=UTC)  # the command reaches the room
TTL = timedelta(minutes=15)
IDLE = timedelta(minutes=5)
TIMING = Timing(intent_ttl=TTL, turn_idle=IDLE)
TICK = timedelta(microseconds=1)
QUESTION_HASH = "q" * 64


def at(seconds: float = 0, minutes: float = 0) -> datetime:
    return T0 + timedelta(seconds=seconds, minutes=minutes)


def make(
    scope: Scope | None = None,
    question_hash: str | None = None,
    command_at: datetime = T0,
    now: datetime = T0,
) -> Intent:
    return new_intent(
        intent_id="intent-1",
        room_id=ROOM,
        target="cloud",
        model="ollama-cloud/glm-5.1",
        scope=scope or Scope.once(),
        sender="@alice:example.org",
        command_event_id="$cmd",
        command_thread_id=None,
        command_at=command_at,
        now=now,
        question_hash=question_hash,
    )


def key(name: str) -> TurnKey:
    return TurnKey(turn_id=f"${name}", message_hash=f"hash-{name}")


def turn(
    name: str | None,
    arrived_at: datetime | None = None,
    is_command: bool = False,
) -> ClaimedTurn:
    """A turn whose user message arrived one second after the command, unless told."""
    return ClaimedTurn(
        key=key(name) if name is not None else None,
        placement=Placement(arrived_at=arrived_at or at(seconds=1), is_command=is_command),
    )


def unplaced(name: str | None) -> ClaimedTurn:
    return ClaimedTurn(key=key(name) if name is not None else None)


def claims(intent: Intent, *calls: tuple[ClaimedTurn, datetime]) -> tuple[Intent, list[Claimed]]:
    """Apply claims in order, threading the intent through; return the last intent too."""
    results = []
    for claimed_turn, now in calls:
        result = claim(intent, claimed_turn, now, TIMING)
        results.append(result)
        intent = result.intent
    return intent, results


def results(answers: list[Claimed]) -> list[ClaimResult]:
    return [a.result for a in answers]


# --- a new intent ------------------------------------------------------------------------


def test_new_intent_is_pending_and_bound_to_nothing() -> None:
    intent = make(now=at(seconds=2))
    assert intent.state is IntentState.PENDING
    assert intent.bound_turns == ()
    assert intent.command_at == T0
    assert intent.created_at == at(seconds=2)
    assert not intent.is_prebound
    assert expires_at(intent, TIMING) == at(seconds=2) + TTL


# --- one-shot ----------------------------------------------------------------------------


def test_one_shot_binds_the_first_turn_after_the_command() -> None:
    answer = claim(make(), turn("a"), at(seconds=5), TIMING)
    assert answer.result is ClaimResult.BOUND
    assert answer.override
    assert answer.turn_position == 0
    assert answer.intent.state is IntentState.ACTIVE
    assert answer.intent.bound_turns == (
        BoundTurn(key=key("a"), bound_at=at(seconds=5), last_claim_at=at(seconds=5)),
    )


def test_one_shot_covers_every_call_of_its_turn() -> None:
    intent, answers = claims(
        make(),
        (turn("a"), at(seconds=5)),
        (turn("a"), at(seconds=20)),
        (turn("a"), at(minutes=3)),
        (turn("a"), at(minutes=7)),  # tool rounds keep the turn open
    )
    assert results(answers) == [ClaimResult.BOUND] + [ClaimResult.CONTINUED] * 3
    assert all(a.override and a.turn_position == 0 for a in answers)
    assert intent.bound_turns[0].claims == 4
    assert intent.bound_turns[0].last_claim_at == at(minutes=7)


def test_claim_from_another_turn_gets_nothing_and_leaves_the_bound_turn_alone() -> None:
    bound, _ = claims(make(), (turn("a"), at(seconds=5)))
    other = claim(bound, turn("b"), at(seconds=30), TIMING)
    assert other.result is ClaimResult.OTHER_TURN
    assert not other.override
    assert other.intent == bound
    again = claim(other.intent, turn("a"), at(seconds=40), TIMING)
    assert again.result is ClaimResult.CONTINUED


def test_a_turn_with_the_same_id_but_another_message_is_another_turn() -> None:
    bound, _ = claims(make(), (turn("a"), at(seconds=5)))
    same_thread = ClaimedTurn(TurnKey("$a", "hash-other"), Placement(at(seconds=6), False))
    assert claim(bound, same_thread, at(seconds=7), TIMING).result is ClaimResult.OTHER_TURN


def test_bound_turn_ends_after_turn_idle_without_a_claim() -> None:
    bound, _ = claims(make(), (turn("a"), at(seconds=5)), (turn("a"), at(seconds=65)))
    end = at(seconds=65) + IDLE
    assert expires_at(bound, TIMING) == end
    assert advance(bound, end - TICK, TIMING) == bound
    done = advance(bound, end, TIMING)
    assert done.state is IntentState.DONE
    assert done.ended_at == end
    assert done.end_reason is EndReason.DONE
    assert expires_at(done, TIMING) is None


def test_bound_turn_still_claiming_just_before_idle_keeps_the_override() -> None:
    bound, _ = claims(make(), (turn("a"), at(seconds=5)))
    assert claim(bound, turn("a"), at(seconds=5) + IDLE - TICK, TIMING).override


def test_claim_after_the_bound_turn_went_idle_gets_no_intent() -> None:
    bound, _ = claims(make(), (turn("a"), at(seconds=5)))
    late = claim(bound, turn("a"), at(seconds=5) + IDLE, TIMING)
    assert late.result is ClaimResult.NO_INTENT
    assert late.intent.state is IntentState.DONE
    assert claim(late.intent, turn("b"), at(minutes=30), TIMING).result is ClaimResult.NO_INTENT


# --- pending expiry ----------------------------------------------------------------------


def test_pending_intent_expires_after_intent_ttl() -> None:
    intent = make(now=at(seconds=3))
    end = at(seconds=3) + TTL
    assert expires_at(intent, TIMING) == end
    assert advance(intent, end - TICK, TIMING) == intent
    expired = advance(intent, end, TIMING)
    assert expired.state is IntentState.EXPIRED
    assert expired.end_reason is EndReason.EXPIRED
    assert expired.ended_at == end
    assert expired.bound_turns == ()


def test_pending_intent_binds_a_turn_just_before_the_ttl() -> None:
    end = T0 + TTL
    assert claim(make(), turn("a", at(minutes=14)), end - TICK, TIMING).result is ClaimResult.BOUND


def test_claim_on_an_expired_intent_gets_no_intent() -> None:
    answer = claim(make(), turn("a", at(minutes=14)), T0 + TTL, TIMING)
    assert answer.result is ClaimResult.NO_INTENT
    assert answer.intent.state is IntentState.EXPIRED


def test_ttl_and_idle_come_from_the_timing_given() -> None:
    short = Timing(intent_ttl=timedelta(seconds=30), turn_idle=timedelta(seconds=10))
    assert expires_at(make(), short) == at(seconds=30)
    bound = claim(make(), turn("a"), at(seconds=5), short).intent
    assert expires_at(bound, short) == at(seconds=15)


# --- "next" means next -------------------------------------------------------------------


@pytest.mark.parametrize(
    "arrived", [at(minutes=-3), T0 - TICK, T0], ids=["minutes-before", "just-before", "same-time"]
)
def test_turn_whose_message_arrived_before_the_command_never_binds(arrived: datetime) -> None:
    intent = make()
    earlier = claim(intent, turn("old", arrived_at=arrived), at(seconds=10), TIMING)
    assert earlier.result is ClaimResult.EARLIER_TURN
    assert not earlier.override
    assert earlier.intent == intent
    later = claim(earlier.intent, turn("new", arrived_at=at(seconds=20)), at(seconds=21), TIMING)
    assert later.result is ClaimResult.BOUND
    assert later.intent.bound_turns[0].key == key("new")


def test_earlier_turns_tool_rounds_never_bind_however_many_they_are() -> None:
    intent, answers = claims(
        make(),
        *[(turn("old", arrived_at=at(minutes=-1)), at(seconds=s)) for s in range(1, 200, 20)],
    )
    assert set(results(answers)) == {ClaimResult.EARLIER_TURN}
    assert intent.state is IntentState.PENDING


def test_unplaced_turn_binds() -> None:
    answer = claim(make(), unplaced("a"), at(seconds=5), TIMING)
    assert answer.result is ClaimResult.BOUND


def test_next_is_measured_from_the_command_not_from_when_it_was_recorded() -> None:
    # The side-car records the intent 10 s after the command reached the room (slow
    # delivery); a message sent in between still comes after the command.
    intent = make(command_at=T0, now=at(seconds=10))
    assert claim(intent, turn("a", at(seconds=5)), at(seconds=11), TIMING).override


# --- command turns -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "scope", [Scope.once(), Scope.next_turns(3), Scope.lasting(timedelta(minutes=30))]
)
def test_command_turn_never_binds_nor_consumes(scope: Scope) -> None:
    intent = make(scope=scope)
    command_turn = turn("cmd", arrived_at=at(seconds=30), is_command=True)
    answer = claim(intent, command_turn, at(seconds=31), TIMING)
    assert answer.result is ClaimResult.COMMAND_TURN
    assert not answer.override
    assert answer.intent == intent
    assert claim(intent, turn("a"), at(seconds=40), TIMING).result is ClaimResult.BOUND


def test_command_turn_does_not_bind_a_prebound_intent_either() -> None:
    intent = make(question_hash=QUESTION_HASH)
    command_turn = ClaimedTurn(TurnKey("$cmd", "hash-cmd"), Placement(T0, is_command=True))
    assert claim(intent, command_turn, at(seconds=1), TIMING).result is ClaimResult.COMMAND_TURN


# --- request-scoped claims ---------------------------------------------------------------


def test_request_scoped_claim_consumes_a_one_shot_with_that_single_call() -> None:
    answer = claim(make(), unplaced(None), at(seconds=5), TIMING)
    assert answer.result is ClaimResult.BOUND
    assert answer.override
    assert answer.intent.state is IntentState.DONE
    assert answer.intent.ended_at == at(seconds=5)
    following = claim(answer.intent, unplaced(None), at(seconds=6), TIMING)
    assert following.result is ClaimResult.NO_INTENT


def test_request_scoped_claims_each_take_one_of_n_turns() -> None:
    intent, answers = claims(
        make(scope=Scope.next_turns(2)),
        (unplaced(None), at(seconds=1)),
        (unplaced(None), at(seconds=2)),
        (unplaced(None), at(seconds=3)),
    )
    assert results(answers) == [ClaimResult.BOUND, ClaimResult.BOUND, ClaimResult.NO_INTENT]
    assert intent.state is IntentState.DONE


# --- --turns N ---------------------------------------------------------------------------


def test_turns_n_binds_up_to_n_distinct_turns_then_refuses() -> None:
    intent, answers = claims(
        make(scope=Scope.next_turns(3)),
        (turn("a"), at(seconds=10)),
        (turn("a"), at(seconds=11)),
        (turn("b", at(seconds=20)), at(seconds=21)),
        (turn("c", at(seconds=30)), at(seconds=31)),
        (turn("d", at(seconds=40)), at(seconds=41)),
        (turn("b"), at(seconds=42)),
    )
    assert results(answers) == [
        ClaimResult.BOUND,
        ClaimResult.CONTINUED,
        ClaimResult.BOUND,
        ClaimResult.BOUND,
        ClaimResult.OTHER_TURN,
        ClaimResult.CONTINUED,
    ]
    assert [a.turn_position for a in answers] == [0, 0, 1, 2, None, 1]
    assert [t.key for t in intent.bound_turns] == [key("a"), key("b"), key("c")]


def test_turns_n_with_all_turns_bound_ends_when_the_last_goes_idle() -> None:
    intent, _ = claims(
        make(scope=Scope.next_turns(2)),
        (turn("a"), at(seconds=10)),
        (turn("b", at(seconds=20)), at(seconds=21)),
        (turn("a"), at(minutes=3)),
    )
    assert expires_at(intent, TIMING) == at(minutes=3) + IDLE
    assert advance(intent, at(minutes=3) + IDLE, TIMING).state is IntentState.DONE


def test_turns_n_with_turns_left_waits_intent_ttl_after_last_activity() -> None:
    intent, _ = claims(
        make(scope=Scope.next_turns(3)),
        (turn("a"), at(seconds=10)),
        (turn("a"), at(minutes=2)),
    )
    end = at(minutes=2) + TTL
    assert expires_at(intent, TIMING) == end
    assert claim(intent, turn("b", end - TICK), end - TICK, TIMING).result is ClaimResult.BOUND
    done = advance(intent, end, TIMING)
    assert done.state is IntentState.DONE
    assert done.end_reason is EndReason.DONE
    assert done.ended_at == end


def test_idle_turn_of_a_waiting_turns_intent_gets_no_override() -> None:
    intent, _ = claims(make(scope=Scope.next_turns(3)), (turn("a"), at(seconds=10)))
    late = claim(intent, turn("a"), at(seconds=10) + IDLE, TIMING)
    assert late.result is ClaimResult.ENDED_TURN
    assert not late.override
    assert late.turn_position == 0
    assert late.intent.state is IntentState.ACTIVE
    assert late.intent.bound_turns == intent.bound_turns


def test_turns_n_never_binds_a_turn_from_before_the_command() -> None:
    intent = make(scope=Scope.next_turns(5))
    answer = claim(intent, turn("old", at(minutes=-1)), at(seconds=1), TIMING)
    assert answer.result is ClaimResult.EARLIER_TURN


# --- --for D -----------------------------------------------------------------------------

FOR_30M = Scope.lasting(timedelta(minutes=30))


def test_for_binds_every_new_turn_until_created_at_plus_d() -> None:
    names = [chr(ord("a") + i) for i in range(12)]
    calls = [
        (turn(n, at(minutes=2 * i)), at(minutes=2 * i, seconds=1)) for i, n in enumerate(names)
    ]
    intent, answers = claims(make(scope=FOR_30M, command_at=T0 - TICK), *calls)
    assert set(results(answers)) == {ClaimResult.BOUND}
    assert len(intent.bound_turns) == 12
    assert intent.until == T0 + timedelta(minutes=30)


def test_for_binds_no_new_turn_from_its_end_on() -> None:
    intent, _ = claims(make(scope=FOR_30M), (turn("a"), at(minutes=28)))
    answer = claim(intent, turn("b", at(minutes=30)), at(minutes=30), TIMING)
    assert answer.result is ClaimResult.OTHER_TURN
    assert not answer.override


def test_turn_bound_before_the_end_of_for_keeps_its_override_until_idle() -> None:
    intent, answers = claims(
        make(scope=FOR_30M),
        (turn("a", at(minutes=29)), at(minutes=29)),
        (turn("a"), at(minutes=31)),
        (turn("a"), at(minutes=34)),
    )
    assert results(answers) == [ClaimResult.BOUND, ClaimResult.CONTINUED, ClaimResult.CONTINUED]
    assert expires_at(intent, TIMING) == at(minutes=34) + IDLE
    after = claim(intent, turn("a"), at(minutes=34) + IDLE, TIMING)
    assert after.result is ClaimResult.NO_INTENT
    assert after.intent.state is IntentState.DONE


def test_for_intent_ends_at_its_end_when_no_turn_is_open() -> None:
    intent, _ = claims(make(scope=FOR_30M), (turn("a"), at(minutes=1)))
    assert expires_at(intent, TIMING) == at(minutes=30)
    done = advance(intent, at(minutes=30), TIMING)
    assert (done.state, done.ended_at) == (IntentState.DONE, at(minutes=30))


def test_for_intent_never_claimed_expires_at_its_end() -> None:
    intent = make(scope=FOR_30M)
    assert expires_at(intent, TIMING) == at(minutes=30)
    assert advance(intent, at(minutes=30) - TICK, TIMING).state is IntentState.PENDING
    assert advance(intent, at(minutes=30), TIMING).state is IntentState.EXPIRED


def test_for_covers_a_new_message_repeating_an_idle_turns_text_in_the_same_thread() -> None:
    intent, _ = claims(make(scope=FOR_30M), (turn("yes", at(minutes=1)), at(minutes=1)))
    repeated = turn("yes", arrived_at=at(minutes=12))  # same thread, same text: same key
    assert claim(intent, repeated, at(minutes=12), TIMING).override


def test_for_is_measured_from_when_the_intent_was_recorded() -> None:
    intent = make(scope=FOR_30M, now=at(seconds=10))
    assert intent.until == at(minutes=30, seconds=10)


# --- pre-bound (multi-line form, again) --------------------------------------------------


def test_prebound_binds_the_command_message_turn_even_at_the_command_time() -> None:
    intent = make(question_hash=QUESTION_HASH)
    assert intent.is_prebound
    own = ClaimedTurn(TurnKey("$cmd", "hash-of-rewritten-text"), Placement(T0, False))
    answer = claim(intent, own, at(seconds=2), TIMING)
    assert answer.result is ClaimResult.BOUND
    assert answer.intent.bound_turns[0].key == own.key


def test_prebound_binds_a_turn_whose_message_hash_is_the_question() -> None:
    # Inside a thread the turn id is the root: the question's hash finds the turn.
    intent = make(question_hash=QUESTION_HASH)
    in_thread = ClaimedTurn(TurnKey("$thread", QUESTION_HASH), Placement(T0, False))
    assert claim(intent, in_thread, at(seconds=3), TIMING).result is ClaimResult.BOUND
    no_id = ClaimedTurn(TurnKey(None, QUESTION_HASH), Placement(T0, False))
    assert claim(intent, no_id, at(seconds=3), TIMING).result is ClaimResult.BOUND
    unplaced = ClaimedTurn(TurnKey("$thread", QUESTION_HASH))
    assert claim(intent, unplaced, at(seconds=3), TIMING).result is ClaimResult.BOUND


def test_prebound_never_binds_the_same_question_asked_before_the_command() -> None:
    # `again`: the turn that first answered the question (still running, or its late
    # tool rounds) has the question's hash too, but its message came before the command.
    intent = make(question_hash=QUESTION_HASH)
    first = ClaimedTurn(TurnKey("$asked", QUESTION_HASH), Placement(at(minutes=-4), False))
    answer = claim(intent, first, at(seconds=3), TIMING)
    assert answer.result is ClaimResult.EARLIER_TURN
    assert answer.intent == intent
    own = ClaimedTurn(TurnKey("$cmd", QUESTION_HASH), Placement(T0, False))
    assert claim(intent, own, at(seconds=4), TIMING).result is ClaimResult.BOUND


@pytest.mark.parametrize(
    "other",
    [
        ClaimedTurn(TurnKey("$later", "hash-later"), Placement(at(seconds=5), False)),
        ClaimedTurn(TurnKey("$later", "hash-later")),
        ClaimedTurn(TurnKey(None, "hash-later")),
        ClaimedTurn(None),
    ],
    ids=["placed-later", "unplaced", "hash-only", "request-scoped"],
)
def test_prebound_ignores_every_other_turn(other: ClaimedTurn) -> None:
    intent = make(question_hash=QUESTION_HASH)
    answer = claim(intent, other, at(seconds=6), TIMING)
    assert answer.result is ClaimResult.OTHER_TURN
    assert answer.intent == intent


def test_prebound_turn_once_bound_is_an_ordinary_one_shot() -> None:
    own = ClaimedTurn(TurnKey("$cmd", "h"), Placement(T0, False))
    intent, answers = claims(
        make(question_hash=QUESTION_HASH),
        (own, at(seconds=2)),
        (own, at(seconds=30)),
        (ClaimedTurn(TurnKey(None, QUESTION_HASH)), at(seconds=31)),
    )
    assert results(answers) == [ClaimResult.BOUND, ClaimResult.CONTINUED, ClaimResult.OTHER_TURN]
    assert advance(intent, at(seconds=30) + IDLE, TIMING).state is IntentState.DONE


def test_prebound_intent_nobody_claims_expires_after_the_ttl() -> None:
    intent = make(question_hash=QUESTION_HASH)
    assert advance(intent, T0 + TTL, TIMING).state is IntentState.EXPIRED


# --- cancel ------------------------------------------------------------------------------


def active_intent() -> Intent:
    return claim(make(), turn("a"), at(seconds=5), TIMING).intent


def ended_intents() -> list[Intent]:
    done = advance(active_intent(), at(minutes=10), TIMING)
    expired = advance(make(), T0 + TTL, TIMING)
    cancelled = cancel(make(), at(seconds=1), EndReason.CLEARED, TIMING)
    return [done, expired, cancelled]


@pytest.mark.parametrize("reason", [EndReason.SUPERSEDED, EndReason.CLEARED, EndReason.API])
@pytest.mark.parametrize("live", ["pending", "active-idle"])
def test_cancel_ends_a_live_intent_with_no_turn_in_progress(reason: EndReason, live: str) -> None:
    intent, now = make(), at(seconds=9)
    if live == "active-idle":  # a --turns 2 intent whose first turn went idle
        intent = claims(make(scope=Scope.next_turns(2)), (turn("a"), at(seconds=5)))[0]
        now = at(seconds=5) + IDLE + TICK
    cancelled = cancel(intent, now, reason, TIMING)
    assert cancelled.state is IntentState.CANCELLED
    assert cancelled.end_reason is reason
    assert cancelled.ended_at == now
    assert cancelled.bound_turns == intent.bound_turns
    assert not cancelled.is_closed
    assert expires_at(cancelled, TIMING) is None


@pytest.mark.parametrize("reason", [EndReason.SUPERSEDED, EndReason.CLEARED, EndReason.API])
def test_cancel_lets_the_turn_in_progress_finish_on_its_route(reason: EndReason) -> None:
    active = active_intent()  # turn a bound at 5 s
    closed = cancel(active, at(seconds=9), reason, TIMING)
    assert closed.state is IntentState.ACTIVE and closed.is_closed
    assert (closed.closed_at, closed.closed_by) == (at(seconds=9), reason)
    # Every later call of the turn keeps the override until the turn ends.
    later = claim(closed, turn("a"), at(minutes=3), TIMING)
    assert later.result is ClaimResult.CONTINUED and later.override
    assert expires_at(later.intent, TIMING) == at(minutes=3) + IDLE
    # No other turn binds it, placed or not.
    for other in (turn("b"), unplaced("c")):
        assert claim(later.intent, other, at(minutes=4), TIMING).result is ClaimResult.OTHER_TURN
    # The turn ends: the intent is cancelled then, for the reason given at the command.
    ended = advance(later.intent, at(minutes=3) + IDLE, TIMING)
    assert ended.state is IntentState.CANCELLED
    assert (ended.ended_at, ended.end_reason) == (at(minutes=3) + IDLE, reason)
    assert claim(ended, turn("a"), at(minutes=9), TIMING).result is ClaimResult.NO_INTENT
    # Cancelling a closed intent again changes nothing.
    assert cancel(later.intent, at(minutes=4), EndReason.CLEARED, TIMING) == later.intent


@pytest.mark.parametrize("reason", list(EndReason))
def test_cancel_changes_nothing_once_an_intent_has_ended(reason: EndReason) -> None:
    for ended in ended_intents():
        assert cancel(ended, at(minutes=20), reason, TIMING) == ended


@pytest.mark.parametrize(
    ("scope", "bound", "unused"),
    [
        (Scope.once(), 0, True),  # pending: nothing used yet
        (Scope.once(), 1, False),  # its one turn served or being answered
        (Scope.next_turns(3), 1, True),  # two turns it would still have given
        (Scope.next_turns(2), 2, False),
        (Scope.lasting(timedelta(minutes=30)), 1, True),  # time left
    ],
)
def test_an_older_route_counts_as_replaced_only_for_a_part_no_turn_used(
    scope: Scope, bound: int, unused: bool
) -> None:
    intent = make(scope=scope)
    for index, name in enumerate("ab"[:bound]):
        intent = claim(intent, turn(name), at(seconds=5 + index), TIMING).intent
    after = cancel(intent, at(seconds=9), EndReason.SUPERSEDED, TIMING)
    assert unused_part_cancelled(intent, after) is unused


def test_redaction_cancels_a_pending_intent() -> None:
    redacted = cancel_on_redaction(make(), at(seconds=4), TIMING)
    assert redacted.state is IntentState.CANCELLED
    assert redacted.end_reason is EndReason.REDACTED
    assert redacted.ended_at == at(seconds=4)


def test_redaction_leaves_an_active_or_ended_intent_alone() -> None:
    active = active_intent()
    assert cancel_on_redaction(active, at(seconds=6), TIMING) == active
    for ended in ended_intents():
        assert cancel_on_redaction(ended, at(minutes=20), TIMING) == ended


@pytest.mark.parametrize("index", [0, 1, 2], ids=["done", "expired", "cancelled"])
def test_claim_on_an_ended_intent_gets_no_intent(index: int) -> None:
    ended = ended_intents()[index]
    answer = claim(ended, unplaced("z"), at(minutes=20), TIMING)
    assert answer.result is ClaimResult.NO_INTENT
    assert answer.intent == ended
    assert answer.turn_position is None


def test_advance_does_not_touch_an_ended_intent() -> None:
    for ended in ended_intents():
        assert advance(ended, at(minutes=500), TIMING) == ended


# --- continue_turn (the claim path's shortcut) ------------------------------------------


def test_continue_turn_only_for_an_open_bound_turn() -> None:
    intent, _ = claims(make(scope=Scope.next_turns(2)), (turn("a"), at(seconds=5)))
    continued = continue_turn(intent, key("a"), at(seconds=6), TIMING)
    assert continued is not None
    assert (continued.result, continued.turn_position) == (ClaimResult.CONTINUED, 0)
    assert continued.intent.bound_turns[0].last_claim_at == at(seconds=6)
    assert continued.intent.bound_turns[0].claims == 2
    assert continue_turn(intent, key("b"), at(seconds=6), TIMING) is None
    assert continue_turn(intent, None, at(seconds=6), TIMING) is None
    assert continue_turn(intent, key("a"), at(seconds=5) + IDLE, TIMING) is None
    assert continue_turn(make(), key("a"), at(seconds=6), TIMING) is None


def test_a_call_counts_only_while_the_turn_is_open() -> None:
    bound = BoundTurn(key("a"), bound_at=at(seconds=1), last_claim_at=at(seconds=4), claims=3)
    called = bound.called(at(seconds=9), TIMING)
    assert called == BoundTurn(key("a"), at(seconds=1), at(seconds=9), 4)
    assert bound.called(at(seconds=4) + IDLE - TICK, TIMING) is not None
    assert bound.called(at(seconds=4) + IDLE, TIMING) is None
    request_scoped = BoundTurn(None, bound_at=at(seconds=1), last_claim_at=at(seconds=1))
    assert request_scoped.called(at(seconds=1), TIMING) is None


def test_latest_bound_and_with_turn() -> None:
    once_more = (turn("a", arrived_at=at(minutes=10)), at(minutes=11))
    intent, _ = claims(
        make(scope=Scope.next_turns(3)),
        (turn("a"), at(seconds=5)),
        (turn("b"), at(seconds=6)),
        once_more,  # the same text asked again later: a new turn with the same key
    )
    assert [t.key for t in intent.bound_turns] == [key("a"), key("b"), key("a")]
    assert latest_bound(intent, key("a")) == 2
    assert latest_bound(intent, key("b")) == 1
    assert latest_bound(intent, key("c")) is None
    assert latest_bound(intent, None) is None
    replaced = BoundTurn(key("b"), at(seconds=6), at(seconds=8), 2)
    changed = with_turn(intent, 1, replaced)
    assert changed.bound_turns == (intent.bound_turns[0], replaced, intent.bound_turns[2])
    assert changed.id == intent.id and changed.state is intent.state


def test_whole_second_drops_the_fraction() -> None:
    assert whole_second(at(seconds=3.999999)) == at(seconds=3)
    assert whole_second(at(seconds=3)) == at(seconds=3)


def test_expiry_second_holds_until_now_for_an_ended_intent() -> None:
    ended = cancel(make(), at(seconds=1), EndReason.CLEARED, TIMING)
    assert expiry_second_holds_until(ended, at(seconds=2), TIMING) == at(seconds=2)


# --- results -----------------------------------------------------------------------------


def test_only_bound_and_continued_carry_an_override() -> None:
    overriding = {r for r in ClaimResult if r.override}
    assert overriding == {ClaimResult.BOUND, ClaimResult.CONTINUED}
    for result in ClaimResult:
        assert Claimed(make(), result).override is result.override


def test_states_are_live_only_while_pending_or_active() -> None:
    assert {s for s in IntentState if s.is_live} == {IntentState.PENDING, IntentState.ACTIVE}


# --- sequences ---------------------------------------------------------------------------

TURN_NAMES = ["a", "b", "c", "d", None]
steps = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=400),  # seconds since the previous claim
        st.sampled_from(TURN_NAMES),
        st.none() | st.integers(min_value=-600, max_value=3600),  # arrival after the command
        st.sampled_from([False, False, False, True]),  # is_command, now and then
    ),
    max_size=40,
)


def run_sequence(
    intent: Intent, sequence: list[tuple[int, str | None, int | None, bool]]
) -> list[tuple[TurnKey | None, Claimed]]:
    now = T0
    answered = []
    for gap, name, arrival, is_command in sequence:
        now += timedelta(seconds=gap)
        arrived_at = None if arrival is None else T0 + timedelta(seconds=arrival)
        claimed_turn = ClaimedTurn(
            key=key(name) if name is not None else None,
            placement=Placement(arrived_at=arrived_at, is_command=is_command),
        )
        answer = claim(intent, claimed_turn, now, TIMING)
        answered.append((claimed_turn.key, answer))
        intent = answer.intent
    return answered


@settings(max_examples=200, deadline=None)
@given(steps)
def test_one_shot_overrides_at_most_one_distinct_turn(
    sequence: list[tuple[int, str | None, int | None, bool]],
) -> None:
    answered = run_sequence(make(), sequence)
    overridden = [k for k, answer in answered if answer.override]
    assert len(set(overridden)) <= 1
    if overridden:
        bound = answered[-1][1].intent.bound_turns
        assert [t.key for t in bound] == [overridden[0]]
        if overridden[0] is None:
            assert len(overridden) == 1, "a request-scoped claim is consumed by its single call"


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=4), steps)
def test_turns_n_overrides_at_most_n_distinct_turns(
    n: int, sequence: list[tuple[int, str | None, int | None, bool]]
) -> None:
    answered = run_sequence(make(scope=Scope.next_turns(n)), sequence)
    bound_calls = [answer for _, answer in answered if answer.result is ClaimResult.BOUND]
    assert len(bound_calls) <= n
    if answered:
        bound_keys = {t.key for t in answered[-1][1].intent.bound_turns}
        assert {k for k, answer in answered if answer.override} <= bound_keys


@settings(max_examples=100, deadline=None)
@given(steps)
def test_prebound_overrides_only_its_own_turn(
    sequence: list[tuple[int, str | None, int | None, bool]],
) -> None:
    own = key("a")
    intent = make(question_hash=own.message_hash)
    answered = run_sequence(intent, sequence)
    assert {k for k, answer in answered if answer.override} <= {own}


@settings(max_examples=100, deadline=None)
@given(steps)
def test_no_override_ever_goes_to_a_turn_from_before_the_command_or_a_command_turn(
    sequence: list[tuple[int, str | None, int | None, bool]],
) -> None:
    # Every call of a turn is placed the same way: the placement belongs to the turn.
    placed: dict[str | None, tuple[int | None, bool]] = {}
    consistent = []
    for gap, name, arrival, is_command in sequence:
        placed.setdefault(name, (arrival, is_command))
        consistent.append((gap, name, *placed[name]))
    for scope in (Scope.once(), Scope.next_turns(3), FOR_30M):
        for k, answer in run_sequence(make(scope=scope), consistent):
            if answer.override and k is not None:
                assert k.turn_id is not None
                arrival, is_command = placed[k.turn_id[1:]]
                assert not is_command
                assert arrival is None or arrival > 0


def test_a_bound_turn_is_never_rebound_to_another_key() -> None:
    intent, _ = claims(make(), (turn("a"), at(seconds=1)))
    bound = intent.bound_turns[0]
    for name in ("b", "c", None):
        intent = claim(intent, turn(name), at(seconds=2), TIMING).intent
    assert intent.bound_turns == (bound,)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([Scope.once(), Scope.next_turns(3), Scope.lasting(timedelta(minutes=6))]),
    steps,
    st.integers(min_value=0, max_value=400),
    st.sampled_from(TURN_NAMES),
)
def test_continue_turn_answers_exactly_as_claim_does(
    scope: Scope,
    sequence: list[tuple[int, str | None, int | None, bool]],
    gap: int,
    name: str | None,
) -> None:
    answered = run_sequence(make(scope=scope), sequence)
    intent = answered[-1][1].intent if answered else make(scope=scope)
    now = T0 + timedelta(seconds=sum(step[0] for step in sequence) + gap)
    probe = key(name) if name is not None else None
    full = claim(intent, ClaimedTurn(probe), now, TIMING)
    short = continue_turn(intent, probe, now, TIMING)
    if full.result is ClaimResult.CONTINUED:
        assert short == full
    else:
        assert short is None


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([Scope.once(), Scope.next_turns(3), Scope.lasting(timedelta(minutes=6))]),
    steps,
    st.sampled_from(TURN_NAMES[:-1]),
    st.integers(min_value=1, max_value=900_000),  # turn_idle, in milliseconds
    st.integers(min_value=1, max_value=1_800_000),  # intent_ttl, in milliseconds
    st.lists(st.integers(min_value=0, max_value=1_500_000), max_size=8),  # later calls, µs
)
def test_the_expiry_second_holds_for_later_calls_of_the_turn_until_the_bound(
    scope: Scope,
    sequence: list[tuple[int, str | None, int | None, bool]],
    name: str,
    idle_ms: int,
    ttl_ms: int,
    offsets: list[int],
) -> None:
    """What lets the service give a later call of a turn the answer of the call before:
    `expires_at` to the whole second stays as it was until `expiry_second_holds_until`,
    whatever the timing (fractional seconds included) and however many calls come."""
    timing = Timing(
        intent_ttl=timedelta(milliseconds=ttl_ms), turn_idle=timedelta(milliseconds=idle_ms)
    )
    intent = make(scope=scope)
    now = T0
    for gap, step_name, arrival, is_command in sequence:
        now += timedelta(seconds=gap)
        arrived_at = None if arrival is None else T0 + timedelta(seconds=arrival)
        placed = Placement(arrived_at=arrived_at, is_command=is_command)
        intent = claim(
            intent, ClaimedTurn(key(step_name) if step_name else None, placed), now, timing
        ).intent
    now += timedelta(microseconds=offsets[0] if offsets else 1)
    first = claim(intent, ClaimedTurn(key(name), Placement(now, False)), now, timing)
    if not first.override or not first.intent.state.is_live:
        return
    first_expiry = expires_at(first.intent, timing)
    assert first_expiry is not None  # live
    second = whole_second(first_expiry)
    holds_until = expiry_second_holds_until(first.intent, now, timing)
    assert holds_until > now
    intent, at_call = first.intent, now
    for offset in sorted(offsets):
        at_call = now + timedelta(microseconds=offset)
        if at_call >= holds_until:
            break
        later = continue_turn(intent, key(name), at_call, timing)
        if later is None:
            break  # the turn went idle (a short turn_idle): not a later call of it
        intent = later.intent
        expiry = expires_at(intent, timing)
        assert expiry is not None
        assert whole_second(expiry) == second
        assert expiry >= first_expiry


# --- a room: commands, claims and turn ends in every order ---------------------------------

room_steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("route"),
            st.integers(min_value=0, max_value=200),
            st.sampled_from([Scope.once(), Scope.next_turns(2), Scope.lasting(IDLE)]),
        ),
        st.tuples(st.just("auto"), st.integers(min_value=0, max_value=200), st.none()),
        st.tuples(st.just("ask"), st.integers(min_value=0, max_value=200), st.sampled_from("abc")),
        st.tuples(
            st.just("claim"), st.integers(min_value=0, max_value=400), st.sampled_from("abcd")
        ),
    ),
    max_size=30,
)


def live_in(room: list[Intent]) -> list[Intent]:
    return [intent for intent in room if intent.state.is_live]


def update(room: list[Intent], changed: Intent) -> None:
    room[:] = [changed if intent.id == changed.id else intent for intent in room]


@settings(max_examples=400, deadline=None)
@given(room_steps)
def test_a_newer_route_never_switches_the_answer_in_progress(
    steps: list[tuple[str, int, object]],
) -> None:
    """SPEC "Intents": a turn bound to a route keeps it for every call until the turn ends,
    whatever commands come in between; a newer route binds only turns begun after its
    command; a closed route binds nothing new; the room has at most one current route."""
    room: list[Intent] = []
    asked: dict[str, datetime] = {}  # each turn's message (the latest with that text)
    routed: dict[str, tuple[str, datetime]] = {}  # turn → (intent, its last routed call)
    now = T0
    for number, (kind, gap, arg) in enumerate(steps):
        now += timedelta(seconds=gap)
        for intent in list(room):
            update(room, advance(intent, now, TIMING))
        current = current_of(live_in(room))
        if kind in ("route", "auto"):
            if current is not None:
                reason = EndReason.SUPERSEDED if kind == "route" else EndReason.CLEARED
                after = cancel(current, now, reason, TIMING)
                assert after.state is IntentState.CANCELLED or after.is_closed
                update(room, after)
            if kind == "route":
                assert isinstance(arg, Scope)
                room.append(replace(make(scope=arg, command_at=now, now=now), id=f"i{number}"))
        elif kind == "ask":
            asked[str(arg)] = now
        else:
            name = str(arg)
            claimed = claim_among(
                live_in(room),
                ClaimedTurn(key(name), Placement(asked.get(name), False)),
                now,
                TIMING,
            )
            before = routed.get(name)
            if before is not None and now < before[1] + IDLE:
                assert claimed is not None and claimed.override, "the answer switched midway"
                assert claimed.intent.id == before[0]
            if claimed is None:
                continue
            update(room, claimed.intent)
            if claimed.result is ClaimResult.BOUND:
                assert not claimed.intent.is_closed or claimed.intent.closed_at is None
                original = next(i for i in room if i.id == claimed.intent.id)
                arrived = asked.get(name)
                assert arrived is None or arrived > original.command_at
            if claimed.override:
                routed[name] = (claimed.intent.id, now)
        assert len([i for i in live_in(room) if not i.is_closed]) <= 1
        for intent in live_in(room):
            if intent.is_closed:  # closed only while a turn of it is being answered
                assert intent.state is IntentState.ACTIVE


def test_claim_among_prefers_the_turn_in_progress_then_the_current_route() -> None:
    older = claim(make(), turn("a"), at(seconds=5), TIMING).intent
    closed = cancel(older, at(seconds=9), EndReason.SUPERSEDED, TIMING)
    newer = replace(make(command_at=at(seconds=9), now=at(seconds=9)), id="intent-2")
    room = [closed, newer]
    running = claim_among(room, turn("a"), at(seconds=20), TIMING)
    assert running is not None and running.intent.id == closed.id
    assert running.result is ClaimResult.CONTINUED
    fresh = claim_among(room, turn("b", arrived_at=at(seconds=30)), at(seconds=31), TIMING)
    assert fresh is not None and fresh.intent.id == newer.id
    assert fresh.result is ClaimResult.BOUND
    # The older turn ended: its text asked again now binds the newer route, as a new turn.
    late = claim_among(room, turn("a", arrived_at=at(minutes=7)), at(minutes=7), TIMING)
    assert late is not None and (late.intent.id, late.result) == (newer.id, ClaimResult.BOUND)
    assert claim_among([closed], turn("b"), at(seconds=20), TIMING) is None
    assert current_of([closed, newer]) == newer and current_of([closed]) is None
