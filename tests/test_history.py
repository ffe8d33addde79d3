"""SPEC "Chat commands" (`/route history`) and "Retry": the room's last routed turns and
failed turns, built from the calls the dispatcher reported."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from route_sidecar.core.history import (
    HISTORY_LENGTH,
    Call,
    PastTurn,
    TurnCall,
    failed_turns,
    latest,
)
from route_sidecar.store import Store

T0 = datetime(2026, 5, 9, 11, 0, tzinfo=UTC)
LOCAL = "glm-4.7-flash:q4_K_M"
CLOUD = "ollama-cloud/glm-5.1"
ALICE = "@alice:example.org"
BOB = "@bob:example.org"


def call(
    turn: str,
    seconds: int,
    status: str = "ok",
    asker: str | None = ALICE,
    model: str = LOCAL,
    latency_ms: int | None = 1000,
) -> TurnCall:
    return TurnCall(turn, T0 + timedelta(seconds=seconds), asker, Call(model, status, latency_ms))


def routed(minutes: int, target: str = "cloud") -> PastTurn:
    return PastTurn(
        at=T0 + timedelta(minutes=minutes),
        calls=(Call(CLOUD, "ok", 500),),
        who=ALICE,
        target=target,
        model=CLOUD,
        claims=1,
    )


def failed(minutes: int) -> PastTurn:
    return PastTurn(at=T0 + timedelta(minutes=minutes), calls=(Call(LOCAL, "error", 10),), who=BOB)


# --- PastTurn ----------------------------------------------------------------------------


def test_latency_is_the_sum_of_the_known_latencies() -> None:
    turn = PastTurn(
        T0, (Call(LOCAL, "ok", 1200), Call(LOCAL, "ok", None), Call(LOCAL, "ok", 300)), None
    )
    assert turn.latency_ms == 1500


@pytest.mark.parametrize("calls", [(), (Call(LOCAL, "ok", None), Call(LOCAL, "error", None))])
def test_latency_is_unknown_when_no_call_reported_one(calls: tuple[Call, ...]) -> None:
    assert PastTurn(T0, calls, None).latency_ms is None


def test_a_zero_latency_is_known() -> None:
    assert PastTurn(T0, (Call(LOCAL, "ok", 0),), None).latency_ms == 0


@pytest.mark.parametrize(
    ("statuses", "is_failed"),
    [
        ((), False),
        (("ok",), False),
        (("error",), True),
        (("error", "ok"), False),
        (("ok", "error"), True),
        (("error", "error"), True),
        (("ok", "timeout"), True),  # anything but "ok" is an error
    ],
)
def test_a_turn_failed_when_its_last_call_did(statuses: tuple[str, ...], is_failed: bool) -> None:
    turn = PastTurn(T0, tuple(Call(LOCAL, s, 1) for s in statuses), None)
    assert turn.failed is is_failed


def test_a_turn_is_routed_when_it_has_a_target() -> None:
    assert routed(0).routed
    assert not failed(0).routed


# --- failed_turns ------------------------------------------------------------------------


def test_a_turn_whose_last_call_failed_is_a_failed_turn() -> None:
    turns = failed_turns([call("t1", 0, "ok"), call("t1", 5, "error", latency_ms=30)])
    assert turns == [
        PastTurn(at=T0, calls=(Call(LOCAL, "ok", 1000), Call(LOCAL, "error", 30)), who=ALICE)
    ]


def test_a_turn_that_recovered_is_not_a_failed_turn() -> None:
    assert failed_turns([call("t1", 0, "error"), call("t1", 5, "ok")]) == []


def test_calls_are_grouped_by_turn_whatever_their_order() -> None:
    calls = [
        call("t2", 30, "error", asker=BOB),
        call("t1", 10, "error"),
        call("t2", 20, "ok", asker=BOB),
        call("t1", 0, "ok"),
        call("t3", 40, "error"),
        call("t3", 50, "ok"),
    ]
    turns = failed_turns(calls)
    by_date = {turn.at: turn for turn in turns}
    assert set(by_date) == {T0, T0 + timedelta(seconds=20)}
    assert [c.status for c in by_date[T0].calls] == ["ok", "error"]
    assert [c.status for c in by_date[T0 + timedelta(seconds=20)].calls] == ["ok", "error"]
    assert by_date[T0 + timedelta(seconds=20)].who == BOB


def test_newest_first_calls_as_the_store_reads_them_give_the_same_turns() -> None:
    oldest_first = [call("t1", 0, "ok"), call("t1", 5, "error"), call("t1", 9, "error")]
    assert failed_turns(list(reversed(oldest_first))) == failed_turns(oldest_first)
    (turn,) = failed_turns(oldest_first)
    assert turn.at == T0
    assert len(turn.calls) == 3


async def test_a_turn_that_recovered_in_the_same_millisecond_is_not_failed(
    tmp_path: Path,
) -> None:
    # The store reads calls newest first; two calls of a turn can share a timestamp (a fast
    # retry, a frozen clock). The call reported last must still decide.
    store = await Store.open(tmp_path / "history.db")
    try:
        async with store.atomic() as tx:
            for status in ("error", "ok"):
                await tx.add_outcome(
                    intent_id=None,
                    position=None,
                    room_id="!r:example.org",
                    turn="$t1/-",
                    asker=ALICE,
                    model=LOCAL,
                    status=status,
                    latency_ms=5,
                    detail=None,
                    now=T0,
                )
        async with store.atomic() as tx:
            calls = await tx.unrouted_calls("!r:example.org", 50)
    finally:
        await store.close()
    assert failed_turns(calls) == []


def test_a_failed_turn_is_dated_by_its_first_call() -> None:
    (turn,) = failed_turns([call("t1", 40, "error"), call("t1", 10, "ok"), call("t1", 25, "ok")])
    assert turn.at == T0 + timedelta(seconds=10)


def test_the_asker_is_the_first_one_known() -> None:
    (turn,) = failed_turns(
        [call("t1", 0, asker=None), call("t1", 1, asker=BOB), call("t1", 2, "error", asker=ALICE)]
    )
    assert turn.who == BOB


def test_a_failed_turn_with_no_known_asker_has_none() -> None:
    (turn,) = failed_turns([call("t1", 0, "error", asker=None)])
    assert turn.who is None


def test_failed_turns_are_never_routed() -> None:
    (turn,) = failed_turns([call("t1", 0, "error")])
    assert not turn.routed and turn.target is None and turn.model is None


def test_no_calls_no_failed_turns() -> None:
    assert failed_turns([]) == []


turn_refs = st.sampled_from(["$a/-", "$b/-", "-/abc", "$a/abc"])
statuses = st.sampled_from(["ok", "error"])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(turn_refs, statuses), min_size=0, max_size=12
    ),  # at distinct times, in order
    st.randoms(use_true_random=False),
)
def test_failed_turns_are_the_turns_whose_last_call_failed_in_any_order(
    reported: list[tuple[str, str]], rnd: random.Random
) -> None:
    calls = [call(ref, i, status) for i, (ref, status) in enumerate(reported)]
    shuffled = list(calls)
    rnd.shuffle(shuffled)
    turns = failed_turns(shuffled)
    last_status = {ref: status for ref, status in reported}
    first_at: dict[str, datetime] = {}
    for c in calls:
        first_at.setdefault(c.turn, c.at)
    expected = {first_at[ref] for ref, status in last_status.items() if status != "ok"}
    assert {t.at for t in turns} == expected
    assert all(t.failed for t in turns)
    assert sum(len(t.calls) for t in turns) == sum(1 for c in calls if last_status[c.turn] != "ok")


# --- latest ------------------------------------------------------------------------------


def test_latest_merges_both_kinds_newest_first() -> None:
    turns = latest([routed(5), routed(1)], [failed(3), failed(0)])
    assert [t.at for t in turns] == [T0 + timedelta(minutes=m) for m in (5, 3, 1, 0)]
    assert [t.routed for t in turns] == [True, False, True, False]


def test_latest_keeps_only_the_newest_up_to_the_limit() -> None:
    turns = latest([routed(m) for m in range(4)], [failed(m) for m in range(10, 14)], limit=3)
    assert [t.at for t in turns] == [T0 + timedelta(minutes=m) for m in (13, 12, 11)]


def test_latest_shows_five_turns_by_default() -> None:
    assert HISTORY_LENGTH == 5  # SPEC: "the room's last 5 routed turns"
    assert len(latest([routed(m) for m in range(4)], [failed(m) for m in range(4)])) == 5


def test_latest_of_nothing_is_nothing() -> None:
    assert latest([], []) == []
    assert latest([routed(0)], [], limit=0) == []


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=1000), max_size=8),
    st.lists(st.integers(min_value=0, max_value=1000), max_size=8),
    st.integers(min_value=0, max_value=10),
)
def test_latest_is_sorted_newest_first_and_never_longer_than_the_limit(
    routed_at: list[int], failed_at: list[int], limit: int
) -> None:
    turns = latest([routed(m) for m in routed_at], [failed(m) for m in failed_at], limit)
    assert len(turns) == min(limit, len(routed_at) + len(failed_at))
    assert [t.at for t in turns] == sorted((t.at for t in turns), reverse=True)
    everything = sorted(routed_at + failed_at, reverse=True)[:limit]
    assert [t.at for t in turns] == [T0 + timedelta(minutes=m) for m in everything]
