"""bot/live.py: the live intents in memory. Each room's open turn is kept apart from its
intent and folded in on read; whatever the order of calls, reads and writes, what it
holds and answers is what the core's `claim` gives on the intent itself."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.commands import Scope
from bot.intents import ClaimedTurn, ClaimResult, Intent, Timing, claim, new_intent
from bot.live import LiveIntents
from bot.turns import Placement, TurnKey

T0 = datetime(2026, 5, 9, 11, 0, tzinfo=UTC)
ROOMS = ("!a:test", "!b:test")
TIMING = Timing(intent_ttl=timedelta(minutes=15), turn_idle=timedelta(seconds=90))


def make(room_id: str, scope: Scope, intent_id: str = "i1") -> Intent:
    return new_intent(
        intent_id=f"{intent_id}-{room_id}",
        room_id=room_id,
        target="cloud",
        model="m",
        scope=scope,
        sender="@alice:test",
        command_event_id="$cmd",
        command_thread_id=None,
        command_at=T0,
        now=T0,
    )


def key(name: str | None) -> TurnKey | None:
    return None if name is None else TurnKey(f"${name}", f"hash-{name}")


def apply(live: LiveIntents, room_id: str, turn: ClaimedTurn, now: datetime) -> ClaimResult:
    """As the service claims: the open-turn path first, else `claim` on the intent read
    from `live`, written back when it changed."""
    if live.continue_turn(room_id, turn.key, now, TIMING) is not None:
        return ClaimResult.CONTINUED
    intent = live.get(room_id)
    if intent is None:
        return ClaimResult.NO_INTENT
    claimed = claim(intent, turn, now, TIMING)
    if claimed.intent != intent:
        if claimed.intent.state.is_live:
            live.set(claimed.intent)
        else:
            live.pop(room_id)
    return claimed.result


steps = st.lists(
    st.tuples(
        st.sampled_from(ROOMS),
        st.integers(min_value=0, max_value=120_000),  # milliseconds since the previous step
        st.sampled_from(["a", "b", "c", None]),
        st.none() | st.integers(min_value=-60, max_value=3600),  # arrival after the command
        st.sampled_from(["claim", "claim", "claim", "read", "take", "supersede"]),
    ),
    max_size=60,
)
scopes = st.sampled_from([Scope.once(), Scope.next_turns(2), Scope.lasting(timedelta(minutes=6))])


@settings(max_examples=300, deadline=None)
@given(scopes, steps)
def test_live_intents_hold_and_answer_what_the_core_gives(
    scope: Scope, sequence: list[tuple[str, int, str | None, int | None, str]]
) -> None:
    reference: dict[str, Intent] = {room_id: make(room_id, scope) for room_id in ROOMS}
    live = LiveIntents(reference.values())
    called_since_take: set[str] = set()
    now = T0
    for number, (room_id, gap_ms, name, arrival, action) in enumerate(sequence):
        now += timedelta(milliseconds=gap_ms)
        if action == "read":
            assert live.get(room_id) == reference.get(room_id)
        elif action == "take":
            taken = {intent.room_id: intent for intent in live.take_unsaved()}
            assert taken == {r: reference[r] for r in called_since_take if r in reference}
            called_since_take.clear()
        elif action == "supersede":
            reference[room_id] = make(room_id, scope, intent_id=f"i{number}")
            live.set(reference[room_id])
        else:
            arrived_at = None if arrival is None else T0 + timedelta(seconds=arrival)
            turn = ClaimedTurn(key(name), Placement(arrived_at=arrived_at, is_command=False))
            expected = (
                claim(reference[room_id], turn, now, TIMING) if room_id in reference else None
            )
            result = apply(live, room_id, turn, now)
            if expected is None:
                assert result is ClaimResult.NO_INTENT
                continue
            assert result is expected.result
            if expected.intent.state.is_live:
                reference[room_id] = expected.intent
            else:
                del reference[room_id]
            if result is ClaimResult.CONTINUED:
                called_since_take.add(room_id)
        assert len(live) == len(reference)
        assert {r for r in ROOMS if r in live} == set(reference)
    assert {r: live[r] for r in ROOMS if r in live} == reference


def test_a_call_of_an_open_turn_copies_no_intent_until_it_is_read() -> None:
    intent = claim(
        make(ROOMS[0], Scope.once()), ClaimedTurn(key("a")), T0 + timedelta(seconds=1), TIMING
    ).intent
    live = LiveIntents([intent])
    for seconds in (2, 3, 4):
        open_turn = live.continue_turn(ROOMS[0], key("a"), T0 + timedelta(seconds=seconds), TIMING)
        assert open_turn is not None and open_turn.position == 0
    assert live._intents[ROOMS[0]].bound_turns[0].claims == 2, "only the first call copied it"
    read = live[ROOMS[0]]
    assert (read.bound_turns[0].claims, read.bound_turns[0].last_claim_at) == (
        4,
        T0 + timedelta(seconds=4),
    )
    assert live[ROOMS[0]] is read, "folded once"
    assert live.take_unsaved() == [read]
    assert live.take_unsaved() == []


def test_nothing_changes_for_a_call_that_is_not_one_of_an_open_turn() -> None:
    intent = claim(
        make(ROOMS[0], Scope.once()), ClaimedTurn(key("a")), T0 + timedelta(seconds=1), TIMING
    ).intent
    live = LiveIntents([intent])
    late = T0 + timedelta(seconds=1) + TIMING.turn_idle
    for room_id, name, at in (
        (ROOMS[0], "b", T0 + timedelta(seconds=2)),
        (ROOMS[0], None, T0 + timedelta(seconds=2)),
        (ROOMS[1], "a", T0 + timedelta(seconds=2)),
        (ROOMS[0], "a", late),
    ):
        assert live.continue_turn(room_id, key(name), at, TIMING) is None
    assert live[ROOMS[0]] is intent
    assert live.take_unsaved() == []


def test_writing_an_intent_drops_the_open_turn_and_its_answer() -> None:
    intent = claim(
        make(ROOMS[0], Scope.next_turns(2)),
        ClaimedTurn(key("a")),
        T0 + timedelta(seconds=1),
        TIMING,
    ).intent
    live = LiveIntents([intent])
    open_turn = live.continue_turn(ROOMS[0], key("a"), T0 + timedelta(seconds=2), TIMING)
    assert open_turn is not None
    open_turn.answer = "the service's cache"
    changed = claim(live[ROOMS[0]], ClaimedTurn(key("b")), T0 + timedelta(seconds=3), TIMING)
    live.set(changed.intent)
    again = live.continue_turn(ROOMS[0], key("a"), T0 + timedelta(seconds=4), TIMING)
    assert again is not None and again is not open_turn and again.answer is None
    live.pop(ROOMS[0])
    assert ROOMS[0] not in live and live.get(ROOMS[0]) is None
    assert live.continue_turn(ROOMS[0], key("a"), T0 + timedelta(seconds=5), TIMING) is None
    assert live.take_unsaved() == []
