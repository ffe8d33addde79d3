"""SPEC "Intents" ("next means next") against a race the end-to-end tests found: an agent
that syncs can see a message before the homeserver has pushed it to the side-car, so a
claim may arrive before the `/route` it answers. Such a claim waits briefly for its
message; a claim that has nothing to wait for never does."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from route_sidecar.claims import CLAIM_WAIT_SECONDS
from tests.api_support import ROOM, Api

QUESTION = "Why is the staging database read-only?"


async def claim(api: Api, turn_id: str, room_id: str = ROOM) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    response = await api.claim(
        {"room_id": room_id, "turn_id": turn_id, "last_user_message": f"[Alice] {QUESTION}"}
    )
    assert response.status_code == 200
    return response.json(), time.monotonic() - started


async def test_a_claim_that_overtakes_its_command_waits_for_it_and_binds(api: Api) -> None:
    await api.say(ROOM, "hello", ago=5)  # the bot is in the room
    early = asyncio.create_task(claim(api, "$command"))
    await asyncio.sleep(0.1)
    assert not early.done()  # waiting for its message
    await api.say(ROOM, f"!route cloud\n{QUESTION}", event_id="$command", ago=0)
    answer, _ = await early
    assert (answer["override"], answer["reason"]) == (True, "bound")


async def test_a_claim_whose_message_never_comes_waits_once_per_turn(api: Api) -> None:
    await api.say(ROOM, "hello", ago=5)
    first, waited = await claim(api, "$never")
    assert first["override"] is False
    assert waited >= CLAIM_WAIT_SECONDS * 0.9
    _, again = await claim(api, "$never")  # the turn's later calls do not wait again
    assert again < CLAIM_WAIT_SECONDS / 2


async def test_claims_with_nothing_to_wait_for_are_answered_at_once(api: Api) -> None:
    await api.say(ROOM, QUESTION, event_id="$seen", ago=5)
    for turn_id, room_id in (
        ("$seen", ROOM),  # its message arrived
        ("$other", "!a-room-the-bot-is-not-in:example.org"),
        ("not-an-event-id", ROOM),
    ):
        _, took = await claim(api, turn_id, room_id)
        assert took < CLAIM_WAIT_SECONDS / 2, (turn_id, room_id, took)
