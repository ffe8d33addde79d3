"""route_sidecar/core/live.py: the live intents in memory, by room (the current one and
those a newer command closed while a turn was being answered). Each room's open turn is
kept apart from its intent and folded in on read; whatever the order of calls, reads, writes and
supersedes, what it holds and answers is what the core's `claim_among` gives on the
intents themselves."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from route_sidecar.core.commands import Scope
from route_sidecar.core.intents import (
    ClaimedTurn,
    ClaimResult,
    EndReason,
    Intent,
    Timing,
    cancel,
    claim,
    claim_among,
    current_of,
    new_intent,
)
from route_sidecar.core.live import LiveIntents
from route_sidecar.core.turns import Placement, TurnKey

T0 = datetime(2026, 5, 9, 11, 0, tzinfo=UTC)
ROOMS = ("!a:test", "!b:test")
TIMING = Timing(intent_ttl=timedelta(minutes=15), turn_idle=timedelta(seconds=90))


def make(room_id: str, scope: Scope, intent_id: str = "i1", at: datetime = T0) -> Intent:
    return new_intent(
        intent_id=f"{intent_id}-{room_id}",
        room_id=room_id,
        target="cloud",
        model="m",
        scope=scope,
        sender="@alice:test",
        command_event_id="$cmd",
        command_thread_id=None,
        command_at=at,
        now=at,
    )


def key(name: str | None) -> TurnKey | None:
    return None if name is None else TurnKey(f"${name}", f"hash-{name}")


def apply(live: LiveIntents, room_id: str, turn: ClaimedTurn, now: datetime) -> ClaimResult:
    """As the service claims: the open-turn path first, else `claim_among` on the room's
    intents read from `live`, the one it changed written back."""
    if live.continue_turn(room_id, turn.key, now, TIMING) is not None:
        return ClaimResult.CONTINUED
    claimed = claim_among(live.room(room_id), turn, now, TIMING)
    if claimed is None:
        return ClaimResult.NO_INTENT
    write(live, claimed.intent)
    return claimed.result


def write(live: LiveIntents, intent: Intent) -> None:
    if intent.state.is_live:
        live.set(intent)
    else:
        live.pop(intent)


def write_reference(reference: dict[str, list[Intent]], intent: Intent) -> None:
    """The reference's room with `intent` written: replaced, appended, or dropped once ended."""
    room = [i for i in reference.get(intent.room_id, []) if i.id != intent.id]
    if intent.state.is_live:
        known = [i.id for i in reference.get(intent.room_id, [])]
        position = known.index(intent.id) if intent.id in known else len(room)
        room.insert(position, intent)
    if room:
        reference[intent.room_id] = room
    else:
        reference.pop(intent.room_id, None)


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
    reference = {room_id: [make(room_id, scope)] for room_id in ROOMS}
    live = LiveIntents(make(room_id, scope) for room_id in ROOMS)
    called_since_take: set[str] = set()
    now = T0
    for number, (room_id, gap_ms, name, arrival, action) in enumerate(sequence):
        now += timedelta(milliseconds=gap_ms)
        if action == "read":
            assert list(live.room(room_id)) == reference.get(room_id, [])
            assert live.current(room_id) == current_of(reference.get(room_id, []))
        elif action == "take":
            taken = sorted(live.take_unsaved(), key=lambda i: (i.room_id, i.created_at))
            assert taken == [i for r in sorted(called_since_take) for i in reference.get(r, [])]
            called_since_take.clear()
        elif action == "supersede":
            current = current_of(reference.get(room_id, []))
            if current is not None:  # as the service does: the older one cancelled first
                after = cancel(current, now, EndReason.SUPERSEDED, TIMING)
                write_reference(reference, after)
                write(live, after)
                if room_id not in reference:  # its last intent ended, written with its calls
                    called_since_take.discard(room_id)
            newer = make(room_id, scope, intent_id=f"i{number}", at=now)
            write_reference(reference, newer)
            live.set(newer)
        else:
            arrived_at = None if arrival is None else T0 + timedelta(seconds=arrival)
            turn = ClaimedTurn(key(name), Placement(arrived_at=arrived_at, is_command=False))
            expected = claim_among(reference.get(room_id, []), turn, now, TIMING)
            result = apply(live, room_id, turn, now)
            if expected is None:
                assert result is ClaimResult.NO_INTENT
                continue
            assert result is expected.result
            write_reference(reference, expected.intent)
            if room_id not in reference:
                called_since_take.discard(room_id)
            if result is ClaimResult.CONTINUED:
                called_since_take.add(room_id)
        assert len(live) == sum(len(intents) for intents in reference.values())
        assert {r for r in ROOMS if r in live} == set(reference)
    assert {r: list(live.room(r)) for r in ROOMS if r in live} == reference


def test_a_call_of_an_open_turn_copies_no_intent_until_it_is_read() -> None:
    intent = claim(
        make(ROOMS[0], Scope.once()), ClaimedTurn(key("a")), T0 + timedelta(seconds=1), TIMING
    ).intent
    live = LiveIntents([intent])
    for seconds in (2, 3, 4):
        open_turn = live.continue_turn(ROOMS[0], key("a"), T0 + timedelta(seconds=seconds), TIMING)
        assert open_turn is not None and open_turn.position == 0
    assert live._rooms[ROOMS[0]][0].bound_turns[0].claims == 2, "only the first call copied it"
    read = live.room(ROOMS[0])[0]
    assert (read.bound_turns[0].claims, read.bound_turns[0].last_claim_at) == (
        4,
        T0 + timedelta(seconds=4),
    )
    assert live.room(ROOMS[0])[0] is read, "folded once"
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
    assert live.room(ROOMS[0]) == (intent,) and live.room(ROOMS[0])[0] is intent
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
    open_turn.answer = "the service's cache"  # type: ignore[assignment]  # any value: it is dropped
    changed = claim(
        live.room(ROOMS[0])[0], ClaimedTurn(key("b")), T0 + timedelta(seconds=3), TIMING
    )
    live.set(changed.intent)
    again = live.continue_turn(ROOMS[0], key("a"), T0 + timedelta(seconds=4), TIMING)
    assert again is not None and again is not open_turn and again.answer is None
    live.pop(changed.intent)
    assert ROOMS[0] not in live and live.current(ROOMS[0]) is None and live.room(ROOMS[0]) == ()
    assert live.continue_turn(ROOMS[0], key("a"), T0 + timedelta(seconds=5), TIMING) is None
    assert live.take_unsaved() == []


def test_a_closed_intent_keeps_its_open_turn_beside_the_newer_one() -> None:
    older = claim(
        make(ROOMS[0], Scope.once()), ClaimedTurn(key("a")), T0 + timedelta(seconds=1), TIMING
    ).intent
    live = LiveIntents([older])
    assert live.continue_turn(ROOMS[0], key("a"), T0 + timedelta(seconds=2), TIMING) is not None
    closed = cancel(live.room(ROOMS[0])[0], T0 + timedelta(seconds=3), EndReason.SUPERSEDED, TIMING)
    assert closed.is_closed and closed.bound_turns[0].claims == 2
    live.set(closed)
    newer = make(ROOMS[0], Scope.once(), intent_id="i2")
    live.set(newer)
    assert live.current(ROOMS[0]) == newer and live.room(ROOMS[0]) == (closed, newer)
    open_turn = live.continue_turn(ROOMS[0], key("a"), T0 + timedelta(seconds=4), TIMING)
    assert open_turn is not None and open_turn.intent_id == closed.id
    assert live.intent(ROOMS[0], closed.id).bound_turns[0].claims == 3  # type: ignore[union-attr]
    live.pop(closed)
    assert live.room(ROOMS[0]) == (newer,) and len(live) == 1
