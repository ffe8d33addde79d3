"""SPEC "The turn key", issue 13 item 3: a `**Matrix Room ID:**` line the side-car cannot
match counts as absent; message-hash resolution is the fallback, never a refusal nor
another room.

The lines are what Hermes really writes: the session-context prompt of Hermes 0.19.0
(`build_session_context_prompt`, run in its venv), with the room id replaced by what
Hermes's own `_hash_chat_id` makes of it (what `privacy.redact_pii` writes on the
platforms it redacts), or cut short. Runs in `.venv` against the side-car in-process.
"""

from __future__ import annotations

from typing import Any

import pytest

from .api_support import ALICE, AUTH, Api, room_path
from .hermes_support import hash_chat_ids, hermes_message

HERMES = "0.19.0"  # the version that writes the room-id line
ROOM = "!routed:example.org"  # the room api_support's side-car is in
OTHER_ROOM = "!elsewhere:example.org"
QUESTION = "Why did the nightly deploy fail?"


def with_room_line(room_line_value: str, thread: str) -> dict[str, Any]:
    """Hermes 0.19's request for QUESTION in ROOM, its room-id line holding `value`."""
    message = hermes_message(
        HERMES, room_id=ROOM, text=QUESTION, user_id=ALICE, user_name="Alice", thread_id=thread
    )
    assert f"**Matrix Room ID:** {ROOM}\n" in message.system_prompt
    request = message.request()
    system = request["messages"][0]
    system["content"] = system["content"].replace(
        f"**Matrix Room ID:** {ROOM}\n", f"**Matrix Room ID:** {room_line_value}\n"
    )
    return request


def unmatched_room_lines() -> list[str]:
    (hashed,) = hash_chat_ids(HERMES, [ROOM])
    assert hashed.startswith("!routed:") and hashed != ROOM  # still looks like a room id
    return [hashed, ROOM[:-4], ROOM.upper()]


# Before `RouteService._known_room`, such a claim answered `no_intent`.
@pytest.mark.parametrize("index", range(3), ids=["hashed", "truncated", "other-case"])
async def test_an_unmatched_room_line_falls_back_to_the_message_hash(api: Api, index: int) -> None:
    value = unmatched_room_lines()[index]
    await api.route(ROOM, "/route cloud")
    question = await api.say(ROOM, QUESTION, ago=2.0)
    answer = (await api.claim({"request": with_room_line(value, question)})).json()
    assert (answer["override"], answer["room_id"], answer["reason"]) == (True, ROOM, "bound")
    assert answer["turn_id"] == question


async def test_an_unmatched_room_line_never_routes_to_another_room(api: Api) -> None:
    (hashed,) = hash_chat_ids(HERMES, [ROOM])
    await api.route(ROOM, "/route cloud")
    # The same text in two rooms: the hash names no single room, so no override at all.
    question = await api.say(ROOM, QUESTION, ago=2.0)
    await api.say(OTHER_ROOM, QUESTION, ago=2.0)
    answer = (await api.claim({"request": with_room_line(hashed, question)})).json()
    assert answer["override"] is False
    assert answer["room_id"] in (None, hashed)
    # And the intent still waits for its turn: the ambiguous claim consumed nothing.
    intent = (await api.client.get(room_path(ROOM), headers=AUTH)).json()
    assert intent["state"] == "pending"
