"""SPEC "The turn key": every room the bot has joined is a room it is in, whether or not a
message arrived there since it started; its membership is persisted, and forgotten when
it leaves or is kicked. A claim naming such a room belongs there, never to another room
that saw the same text. And SPEC "The lookup API": every placed call names its asker."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from route_sidecar.core.intents import ClaimResult
from route_sidecar.core.turns import Turn
from route_sidecar.service import RouteService

from .test_service import ROOM, Clock, make_service, message

QUIET = "!quiet:test"  # a room the bot joined where nobody has written
TEXT = "the same question in two rooms"


async def routed_with_text(service: RouteService, clock: Clock) -> None:
    """ROOM has a pending route and has seen TEXT; nothing has arrived in QUIET."""
    await service.on_message(message("!route cloud", "$cmd", clock.now))
    clock.now += timedelta(seconds=1)
    await service.on_message(message(TEXT, "$q", clock.now))
    clock.now += timedelta(seconds=1)


def naming(room_id: str) -> Turn:
    return Turn(room_id=room_id, turn_id=None, last_user_message=f"[alice] {TEXT}")


async def test_a_claim_naming_a_joined_quiet_room_is_placed_there_not_by_its_text(
    tmp_path: Path,
) -> None:
    clock = Clock()
    service = await make_service(tmp_path / "db.sqlite", clock)
    await routed_with_text(service, clock)
    # Unknown room: resolved by the text, as SPEC says for a hint naming no room the bot is in.
    assert (await service.claim(naming(QUIET))).room_id == ROOM
    await service.on_bot_membership(QUIET, joined=True)
    answer = await service.claim(naming(QUIET))
    assert (answer.override, answer.room_id, answer.result) == (
        False,
        QUIET,
        ClaimResult.NO_INTENT,
    )
    assert (await service.claim(naming(ROOM))).override is True  # ROOM's route untouched
    await service.store.close()


async def test_membership_survives_a_restart_and_a_leave_forgets_the_room(
    tmp_path: Path,
) -> None:
    clock = Clock()
    path = tmp_path / "db.sqlite"
    service = await make_service(path, clock)
    await routed_with_text(service, clock)
    await service.on_bot_membership(QUIET, joined=True)
    await service.store.close()

    restarted = await make_service(path, clock)  # before any message arrives
    assert (await restarted.claim(naming(QUIET))).room_id == QUIET
    await restarted.on_bot_membership(QUIET, joined=False)  # left, or kicked
    assert (await restarted.claim(naming(QUIET))).room_id == ROOM
    await restarted.store.close()

    again = await make_service(path, clock)
    assert (await again.claim(naming(QUIET))).room_id == ROOM
    await again.store.close()


async def test_a_room_left_is_forgotten_even_where_its_messages_are_remembered(
    tmp_path: Path,
) -> None:
    clock = Clock()
    path = tmp_path / "db.sqlite"
    service = await make_service(path, clock)
    await service.on_message(message("hello", "$hello", clock.now))  # ROOM known by a message
    await service.on_bot_membership(ROOM, joined=False)
    await service.store.close()
    restarted = await make_service(path, clock)
    assert ROOM not in restarted.state.arrivals.rooms
    await restarted.store.close()


async def test_the_homeservers_list_at_start_is_the_truth_but_a_later_change_stands(
    tmp_path: Path,
) -> None:
    clock = Clock()
    service = await make_service(tmp_path / "db.sqlite", clock)
    await service.on_bot_membership("!stale:test", joined=True)  # before the list was read
    clock.now += timedelta(seconds=1)
    listed_at = clock.now
    clock.now += timedelta(seconds=1)
    await service.on_bot_membership("!new:test", joined=True)  # after: the list missed it
    await service.on_joined_rooms([QUIET], listed_at=listed_at)
    rooms = service.state.arrivals.rooms
    assert {QUIET, "!new:test"} <= rooms and "!stale:test" not in rooms
    async with service.store.atomic() as tx:
        joined, left = await tx.rooms_by_membership()
    assert (joined, left) == ({QUIET, "!new:test"}, {"!stale:test"})
    await service.store.close()


async def test_every_placed_call_names_its_asker_routed_or_not(tmp_path: Path) -> None:
    clock = Clock()
    service = await make_service(tmp_path / "db.sqlite", clock)
    await service.on_message(message("an unrouted question", "$u", clock.now, "@bob:test"))
    unrouted = await service.claim(Turn(room_id=ROOM, last_user_message="an unrouted question"))
    assert (unrouted.override, unrouted.asker) == (False, "@bob:test")
    assert unrouted.metadata()["matrix_sender"] == "@bob:test"
    # No room named: placed from the text (nothing is set anywhere), and the asker with it.
    by_text = await service.claim(Turn(last_user_message="[Bob] an unrouted question"))
    assert (by_text.room_id, by_text.asker) == (ROOM, "@bob:test")

    await service.on_message(message("!route cloud", "$cmd", clock.now, "@alice:test"))
    clock.now += timedelta(seconds=1)
    await service.on_message(message("a routed question", "$r", clock.now, "@carol:test"))
    routed = await service.claim(Turn(room_id=ROOM, turn_id="$r", last_user_message="x"))
    assert (routed.override, routed.asker) == (True, "@carol:test")
    metadata = routed.metadata()
    assert (metadata["matrix_sender"], metadata["route_set_by"]) == ("@carol:test", "@alice:test")
    # An agent's stamp names the asker itself.
    stamped = Turn(room_id=ROOM, turn_id="$s", event_id="$s", sender="@dave:test")
    assert (await service.claim(stamped)).asker == "@dave:test"
    await service.store.close()


async def test_a_text_seen_in_two_rooms_names_no_room_and_no_asker(tmp_path: Path) -> None:
    clock = Clock()
    service = await make_service(tmp_path / "db.sqlite", clock)
    await service.on_message(message(TEXT, "$a", clock.now, "@bob:test"))
    other = message(TEXT, "$b", clock.now, "@carol:test")
    await service.on_message(
        type(other)(**{**{f: getattr(other, f) for f in other.__slots__}, "room_id": QUIET})
    )
    answer = await service.claim(Turn(last_user_message=TEXT))
    assert (answer.room_id, answer.asker) == (None, None)
    await service.store.close()
