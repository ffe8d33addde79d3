"""SPEC "The turn key", issue 13: the side-car routes Hermes 0.13's turns, end to end.

Hermes 0.13.0 (the oldest on PyPI, close to the seed deployment) writes no
`**Matrix Room ID:**` and no `**Matrix Thread:**` line: the side-car must find the room
from the message hash alone. Each request here carries the system prompt Hermes 0.13
really writes for the message (its own `build_session_context_prompt`, run in its venv)
and the user message as its gateway builds it (`[Display Name] ` in threads, none in a
DM); people type in rooms of a real Synapse, the side-car runs as its own process.
"""

from __future__ import annotations

from typing import Any

import pytest

from ..hermes_support import hermes_message
from .conftest import open_room
from .harness import LookupClient, MatrixUser

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]
CLOUD = "ollama-cloud/glm-5.1"
OLD = "0.13.0"


async def route_cloud(user: MatrixUser, room: str) -> str:
    command = await user.say(room, "!route cloud")
    await user.wait_reply(room, command)
    return command


def hermes_013(
    user: MatrixUser, room: str, text: str, thread: str | None, chat_type: str = "group"
) -> dict[str, Any]:
    """Hermes 0.13's request for `text`, sent by `user` in `room` (`thread`: its thread
    root, the message itself for a top-level message, as Hermes auto-threads)."""
    message = hermes_message(
        OLD,
        room_id=room,
        text=text,
        user_id=user.user_id,
        user_name="Alice Liddell",
        thread_id=thread,
        chat_type=chat_type,
    )
    assert "**Matrix Room ID:**" not in message.system_prompt  # 0.13 names no room ...
    assert room not in message.system_prompt  # ... nor its id anywhere
    assert "**Matrix Thread:**" not in message.system_prompt
    if chat_type == "dm":
        assert message.user_message == text  # no `[Name] ` in a DM
    else:
        assert message.user_message == f"[Alice Liddell] {text}"
    return message.request()


async def test_a_top_level_message_binds_by_its_text_alone(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    alice = users["alice"]
    other = await open_room(users)
    await route_cloud(alice, room)
    text = "Why did the 0.13 deploy fail?"
    question = await alice.say(room, text)
    await alice.say(other, "something else entirely")
    request = hermes_013(alice, room, text, thread=question)
    answers = [await lookup.claim(request=request) for _ in range(3)]  # tool rounds
    assert [a["override"] for a in answers] == [True, True, True]
    assert [a["reason"] for a in answers] == ["bound", "continued", "continued"]
    assert {a["room_id"] for a in answers} == {room}
    assert {a["model"] for a in answers} == {CLOUD}
    assert answers[0]["turn_id"] is None  # no thread line: the turn is its text
    # One-shot: the next question of the room is automatic again.
    later_text = "And the one after?"
    later = await alice.say(room, later_text)
    answer = await lookup.claim(request=hermes_013(alice, room, later_text, thread=later))
    assert (answer["override"], answer["room_id"]) == (False, room)


async def test_the_same_text_in_two_rooms_gets_no_override_and_consumes_nothing(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    alice, bob = users["alice"], users["bob"]
    other = await open_room(users, creator="bob", others=("alice", "carol", "agent"))
    await route_cloud(alice, room)
    text = "deploy status?"
    question = await alice.say(room, text)
    await bob.say(other, "Deploy status?")  # the same text once normalised
    answer = await lookup.claim(request=hermes_013(alice, room, text, thread=question))
    # What the side-car does today: no room resolves, no override (SPEC wants the reason
    # `ambiguous_room` here; today it says `no_intent`).
    assert (answer["override"], answer["room_id"], answer["model"]) == (False, None, None)
    assert (await lookup.live_intent(room))["state"] == "pending"
    # A text said in one room only then binds the intent still waiting.
    text = "deploy status of the eu cluster?"
    question = await alice.say(room, text)
    answer = await lookup.claim(request=hermes_013(alice, room, text, thread=question))
    assert (answer["override"], answer["room_id"]) == (True, room)


async def test_a_dm_binds_without_a_prefix_or_thread(
    users: dict[str, MatrixUser], lookup: LookupClient
) -> None:
    alice = users["alice"]
    dm = await open_room(users, others=())  # Alice and the bot; Hermes sees a DM
    await route_cloud(alice, dm)
    text = "Summarise yesterday's incident for me"
    await alice.say(dm, text)
    answer = await lookup.claim(request=hermes_013(alice, dm, text, None, chat_type="dm"))
    assert (answer["override"], answer["room_id"], answer["model"]) == (True, dm, CLOUD)


async def test_a_follow_up_in_a_thread_binds_by_its_text(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    alice = users["alice"]
    root_text = "The build broke on main"
    root = await alice.say(room, root_text)
    first = await lookup.claim(request=hermes_013(alice, room, root_text, thread=root))
    assert first["override"] is False  # nothing set yet
    await route_cloud(alice, room)
    text = "Which commit did it?"
    await alice.say(room, text, thread_root=root)
    # Inside the thread Hermes's thread is the root, shared by every message of it.
    answer = await lookup.claim(request=hermes_013(alice, room, text, thread=root))
    assert (answer["override"], answer["room_id"], answer["model"]) == (True, room, CLOUD)
    # The thread's first message, answered again, is another turn: not this intent's.
    again = await lookup.claim(request=hermes_013(alice, room, root_text, thread=root))
    assert again["override"] is False
