"""Issue 18: a second real agent with no plugin, matrix-gptbot 0.3.21, on a real Synapse,
through the reference dispatcher: which model served each answer is read from the fake
upstreams (each answers with its own name), as a user would see it in the room.

Its own Synapse and side-car (module-scoped): gptbot in `agents`, `routing.again_wait`
short, encryption off (gptbot has none without Pantalaimon). The claim without any room
hint that answers `ambiguous_room` cannot be made through gptbot, which always sends its
room id in `user`: it is tested in tests/test_agents_without_plugin.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from demo.upstream import ModelStack

from .agent_support import (
    AgentProcess,
    is_message_from,
    joined_by_bot_and,
    reply_of,
    served_by,
    synapse_for_agents,
)
from .gptbot_support import config_ini, gptbot_python, start_gptbot
from .harness import (
    API_TOKEN,
    BOT,
    MatrixUser,
    Sidecar,
    edits_of,
    local_synapse,
    reactions_on,
)

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]
GPTBOT = "@gptbot:localhost"
ANSWER_TIMEOUT = 40.0  # gptbot's sync loop, the dispatcher and two fake models


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Sidecar]]:
    gptbot_python()  # fail or skip (saying why) before starting anything
    work = tmp_path_factory.mktemp("gptbot")
    with synapse_for_agents(work, [GPTBOT], encryption={"enabled": False}) as (hs, sidecar):
        yield hs, sidecar


@dataclass
class World:
    alice: MatrixUser
    models: ModelStack
    gptbot: AgentProcess


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(
    stack: tuple[Any, Sidecar], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    hs, sidecar = stack
    hs_url: str = hs.base_url
    alice_data = local_synapse.register_user(hs_url, "alice", "pw-alice-secret")
    bot_data = local_synapse.register_user(hs_url, "gptbot", "pw-gptbot-secret")
    alice = MatrixUser(hs_url, alice_data["user_id"], alice_data["access_token"])
    models = await ModelStack().start(sidecar.api_url, API_TOKEN)
    work: Path = tmp_path_factory.mktemp("gptbot-agent")
    config = config_ini(
        work, hs_url, bot_data["user_id"], bot_data["access_token"], models.dispatcher_url,
        ModelStack.LOCAL,
    )  # fmt: skip
    gptbot = start_gptbot(gptbot_python(), config)
    try:
        yield World(alice, models, gptbot)
    finally:
        gptbot.stop()
        await models.stop()
        await alice.close()


async def new_room(world: World) -> str:
    room_id = await world.alice.create_room(invite=[BOT, GPTBOT])
    return await joined_by_bot_and(world.alice, room_id, GPTBOT)


def from_gptbot(event: dict[str, Any]) -> bool:
    return is_message_from(GPTBOT, event)


async def answer_to(world: World, room_id: str, after: str) -> str:
    """gptbot's next answer after the event `after`."""
    answer = await reply_of(world.alice, world.gptbot, GPTBOT, room_id, after, ANSWER_TIMEOUT)
    return str(answer["content"]["body"])


async def ask(world: World, room_id: str, text: str) -> str:
    """Send `text` and return which fake model answered it ("local" or "cloud")."""
    event_id = await world.alice.say(room_id, text)
    return served_by(await answer_to(world, room_id, event_id))


async def test_route_then_question_is_served_by_the_target_and_the_command_says_so(
    world: World,
) -> None:
    room = await new_room(world)
    alice = world.alice
    assert await ask(world, room, "What is 2+2?") == "local"
    command = await alice.say(room, "!route cloud")
    reply = await alice.wait_reply(room, command)
    assert "cloud" in reply["content"]["body"]
    assert await ask(world, room, "Why is the sky blue?") == "cloud"
    await alice.wait_for(
        room, lambda e: bool(reactions_on([e], command)), what="the ✅ on the command"
    )
    shown = await alice.wait_shown(
        room, reply["event_id"], lambda text: "Answered by" in text, what="the account"
    )
    assert ModelStack.CLOUD in shown
    assert await ask(world, room, "And 3+3?") == "local"


async def test_the_one_message_form_is_served_by_the_target_and_the_route_ends(
    world: World,
) -> None:
    """Item 1: gptbot answers the whole text of `/route cloud` + newline + question."""
    room = await new_room(world)
    assert await ask(world, room, "/route cloud\nWhat is the capital of Peru?") == "cloud"
    assert await ask(world, room, "And of Chile?") == "local"  # not left pending


async def test_the_same_question_in_two_rooms_goes_by_the_room_gptbot_names(
    world: World,
) -> None:
    """Items 2 and 3: the text is seen in both rooms; the OpenAI `user` field (gptbot's
    room id) decides, so the route set in one room never serves the other."""
    routed, other = await new_room(world), await new_room(world)
    command = await world.alice.say(routed, "!route cloud")
    await world.alice.wait_reply(routed, command)
    question = "What is the boiling point of water?"
    assert await ask(world, other, question) == "local"
    assert await ask(world, routed, question) == "cloud"


async def test_an_edited_question_is_served_by_the_pending_route(world: World) -> None:
    """Item 4: gptbot answers an edit (its `* ` fallback body) as a new question."""
    room = await new_room(world)
    alice = world.alice
    asked = await alice.say(room, "What is 5+5?")
    assert served_by(await answer_to(world, room, asked)) == "local"
    command = await alice.say(room, "!route cloud")
    await alice.wait_reply(room, command)
    edit = await alice.send(
        room,
        {
            "msgtype": "m.text",
            "body": "* What is 6+6?",
            "m.new_content": {"msgtype": "m.text", "body": "What is 6+6?"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": asked},
        },
    )
    assert served_by(await answer_to(world, room, edit)) == "cloud"


async def test_again_that_no_agent_sees_edits_its_reply_and_a_retyped_question_is_routed(
    world: World,
) -> None:
    """Item 5 (and 6: gptbot's own answer, from an agent in `agents`, is never the
    question `again` re-asks): gptbot ignores `!` messages, so it never sees the
    re-asked question; after `again_wait` the reply says so; typing it again works."""
    room = await new_room(world)
    alice = world.alice
    question = "How far is the Moon?"
    assert await ask(world, room, question) == "local"
    command = await alice.say(room, "!route cloud again")
    reply = await alice.wait_reply(room, command)
    assert question in reply["content"]["body"]  # the question, not gptbot's answer
    edit = await alice.wait_for(
        room, lambda e: bool(edits_of([e], reply["event_id"])), timeout=20, what="the edit"
    )
    assert "No agent picked up" in edit["content"]["m.new_content"]["body"]
    assert await ask(world, room, question) == "cloud"
    assert await ask(world, room, "And the Sun?") == "local"


async def test_a_slash_command_line_is_answered_on_the_default_model_then_the_route_serves(
    world: World,
) -> None:
    """`/route cloud` alone: gptbot answers the command line too, as a question; a turn
    answering a command never takes a route, so the next question does."""
    room = await new_room(world)
    assert await ask(world, room, "/route cloud") == "local"
    assert await ask(world, room, "What is the speed of light?") == "cloud"


async def test_a_bang_command_with_a_question_is_not_seen_by_gptbot(world: World) -> None:
    """`!route cloud` + newline + question: gptbot ignores messages that start with `!`,
    so nobody answers; the route the side-car confirmed waits for that question."""
    room = await new_room(world)
    alice = world.alice
    command = await alice.say(room, "!route cloud\nWhat is the tallest mountain?")
    await alice.wait_reply(room, command)
    await asyncio.sleep(3)
    assert not [e for e in await alice.events(room) if from_gptbot(e)]
    assert await ask(world, room, "What is the tallest mountain?") == "cloud"
