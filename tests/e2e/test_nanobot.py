"""Issue 27: a third real agent with no plugin, nanobot 0.3.5, on a real Synapse, through
the reference dispatcher, in plain and in encrypted rooms: which model served each answer
is read from nanobot's reply (each fake upstream answers with its own name), as a user
would see it in the room, decrypted by her own client in an encrypted room.

nanobot decrypts with its own device (matrix-nio with vodozemac), so the side-car sees
only ciphertext from the user and must place nanobot's calls from the text it decrypted
itself, as in a plain room: the room is found by the last user message's hash (nanobot's
requests name no room, `nanobot_support`).

One Synapse, side-car (encryption on, `routing.again_wait` short) and two nanobot
processes serve the whole module: one answering every message of its rooms (`groupPolicy`
"open", as most rooms run it), one answering only messages that mention it ("mention").
Each test opens its own rooms (a room is a session of nanobot's, so no history leaks
between tests). nanobot offers no way to keep a message from its command router or its
model (README "Agents"): open, it answers `!route cloud` as a question and refuses
`/route`; the mention policy is the one setting that keeps both forms from it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from demo.encrypted_user import EncryptedUser
from demo.upstream import ModelStack

from .agent_support import (
    AgentProcess,
    is_message_from,
    joined_by_bot_and,
    reply_of,
    served_by,
    synapse_for_agents,
)
from .harness import (
    API_TOKEN,
    BOT,
    LookupClient,
    Sidecar,
    edits_of,
    local_synapse,
)
from .nanobot_support import nanobot_config, nanobot_python, start_nanobot

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]
NANOBOT = "@nanobot:localhost"
MENTIONED = "@nanobotm:localhost"  # the nanobot that answers only when mentioned
ANSWER_TIMEOUT = 60.0  # nanobot's sync loop, its agent loop, the dispatcher, a fake model
ROOMS = pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
UNKNOWN_ROUTE = 'Unknown command "/route"'


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Sidecar]]:
    nanobot_python()  # fail or skip (saying why) before starting anything
    work = tmp_path_factory.mktemp("nanobot")
    with synapse_for_agents(work, [NANOBOT, MENTIONED]) as (hs, sidecar):
        yield hs, sidecar  # encryption on, as harness.base_config has it


@dataclass
class World:
    alice: EncryptedUser
    models: ModelStack
    nanobot: AgentProcess
    mentioned: AgentProcess
    lookup: LookupClient


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(
    stack: tuple[Any, Sidecar], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    hs, sidecar = stack
    hs_url: str = hs.base_url
    local_synapse.register_user(hs_url, "alice", "pw-alice-secret")
    alice = await EncryptedUser.login(hs_url, "alice", "pw-alice-secret", key_wait=20.0)
    models = await ModelStack().start(sidecar.api_url, API_TOKEN)
    lookup = LookupClient(sidecar.api_url)
    agents: list[AgentProcess] = []
    try:
        for user_id, policy in ((NANOBOT, "open"), (MENTIONED, "mention")):
            localpart = user_id[1:].split(":")[0]
            password = f"pw-{localpart}-secret"
            local_synapse.register_user(hs_url, localpart, password)
            config = nanobot_config(
                hs_url, user_id, password, models.dispatcher_url, ModelStack.LOCAL, policy
            )
            work: Path = tmp_path_factory.mktemp(f"{localpart}-agent")
            agents.append(start_nanobot(nanobot_python(), work, config))
        yield World(alice, models, agents[0], agents[1], lookup)
    finally:
        for agent in agents:
            agent.stop()
        await models.stop()
        await lookup.close()
        await alice.close()


async def new_room(world: World, encrypted: bool, agent: str = NANOBOT) -> str:
    room_id = await world.alice.create_room(invite=[BOT, agent], encrypted=encrypted)
    return await joined_by_bot_and(world.alice, room_id, agent)


async def reply(
    world: World, room_id: str, after: str, answers_only: bool = True, agent: str = NANOBOT
) -> str:
    """nanobot's next message after `after`, as alice's client read it: encrypted exactly
    when the room is (nanobot encrypts with its own device)."""
    process = world.nanobot if agent == NANOBOT else world.mentioned
    event = await reply_of(
        world.alice, process, agent, room_id, after, ANSWER_TIMEOUT, answers_only
    )
    assert event["encrypted"] is await world.alice.is_encrypted(room_id), event
    return str(event["content"]["body"])


async def ask(world: World, room_id: str, text: str) -> str:
    """Send `text` and return which fake model answered it ("local" or "cloud")."""
    return served_by(await reply(world, room_id, await world.alice.say(room_id, text)))


async def route(world: World, room_id: str, text: str) -> str:
    """Send a command; the event id, once the side-car confirmed it (a notice nanobot
    ignores)."""
    command = await world.alice.say(room_id, text)
    confirmation = await world.alice.wait_reply(room_id, command, timeout=20)
    assert "cloud" in confirmation["content"]["body"], confirmation
    return command


def asked_in(encrypted: bool, question: str) -> str:
    """The question as asked in a plain or an encrypted room: the two variants of a test
    share the side-car, and the same text in two rooms would place neither call."""
    return f"{question[:-1]} ({'encrypted' if encrypted else 'plain'} room)?"


async def ambiguous_claims(lookup: LookupClient) -> float:
    page = (await lookup.client.get("/metrics")).text
    found = re.search(r'route_sidecar_claims_total\{result="ambiguous_room"\} ([0-9.]+)', page)
    return float(found.group(1)) if found else 0.0


@ROOMS
async def test_bang_route_then_a_question_is_served_by_the_target_once(
    world: World, encrypted: bool
) -> None:
    """nanobot answers the `!route cloud` line itself, as a question: a turn answering a
    command never takes a route, so it is served by the default; the next question by
    cloud, and the one after by the default again."""
    room = await new_room(world, encrypted)
    command = await route(world, room, "!route cloud")
    assert served_by(await reply(world, room, command)) == "local"
    assert await ask(world, room, asked_in(encrypted, "Why is the sky blue?")) == "cloud"
    assert await ask(world, room, asked_in(encrypted, "And why are sunsets red?")) == "local"


@ROOMS
async def test_bang_route_with_the_question_in_one_message_is_served_by_the_target(
    world: World, encrypted: bool
) -> None:
    """nanobot answers the whole text; the side-car knows a multi-line command by its
    whole text too, and the route ends with that turn."""
    room = await new_room(world, encrypted)
    assert (
        await ask(
            world, room, "!route cloud\n" + asked_in(encrypted, "What is the capital of Peru?")
        )
        == "cloud"
    )
    assert await ask(world, room, asked_in(encrypted, "And of Chile?")) == "local"


@ROOMS
async def test_slash_route_with_a_question_is_refused_by_nanobot_and_the_retyped_question_routed(
    world: World, encrypted: bool
) -> None:
    """`/route cloud` + newline + question: nanobot's command router answers `Unknown
    command "/route"` and no model sees the question; the route the side-car confirmed
    waits, and the question typed again is served by cloud."""
    room = await new_room(world, encrypted)
    seen = len(world.models.local.seen) + len(world.models.cloud.seen)
    question = asked_in(encrypted, "What is the tallest mountain?")
    command = await route(world, room, "/route cloud\n" + question)
    assert UNKNOWN_ROUTE in await reply(world, room, command, answers_only=False)
    await asyncio.sleep(1)
    assert len(world.models.local.seen) + len(world.models.cloud.seen) == seen
    assert await ask(world, room, question) == "cloud"
    assert await ask(world, room, asked_in(encrypted, "And the deepest lake?")) == "local"


@ROOMS
async def test_slash_route_alone_is_refused_by_nanobot_and_the_next_question_routed(
    world: World, encrypted: bool
) -> None:
    room = await new_room(world, encrypted)
    command = await route(world, room, "/route cloud")
    assert UNKNOWN_ROUTE in await reply(world, room, command, answers_only=False)
    assert await ask(world, room, asked_in(encrypted, "What is the speed of light?")) == "cloud"


@ROOMS
async def test_the_same_question_in_two_rooms_is_placed_in_neither(
    world: World, encrypted: bool
) -> None:
    """nanobot's requests name no room: the text of a question asked word for word in two
    rooms places its call nowhere (`ambiguous_room`), so the route set in one room serves
    neither, and stays pending."""
    routed, other = await new_room(world, encrypted), await new_room(world, encrypted)
    command = await route(world, routed, "!route cloud")
    assert served_by(await reply(world, routed, command)) == "local"
    question = asked_in(encrypted, "What is the boiling point of water?")
    assert await ask(world, other, question) == "local"  # seen in one room only, yet
    before = await ambiguous_claims(world.lookup)
    assert await ask(world, routed, question) == "local"
    assert await ambiguous_claims(world.lookup) > before
    assert (await world.lookup.live_intent(routed))["state"] == "pending"


@ROOMS
async def test_again_is_answered_as_a_question_on_the_default_and_a_retyped_question_routed(
    world: World, encrypted: bool
) -> None:
    """nanobot answers `!route cloud again` as a question (on the default: a command's
    turn never takes a route) and never sees the question re-asked; after `again_wait`
    the side-car's reply says so, and typing the question again sends it to cloud."""
    room = await new_room(world, encrypted)
    alice = world.alice
    question = asked_in(encrypted, "How far is the Moon?")
    assert await ask(world, room, question) == "local"
    command = await alice.say(room, "!route cloud again")
    confirmation = await alice.wait_reply(room, command, timeout=20)
    assert question in confirmation["content"]["body"]
    assert served_by(await reply(world, room, command)) == "local"
    edit = await alice.wait_for(
        room, lambda e: bool(edits_of([e], confirmation["event_id"])), timeout=20, what="edit"
    )
    assert "No agent picked up" in edit["content"]["m.new_content"]["body"]
    assert await ask(world, room, question) == "cloud"


@ROOMS
async def test_an_edited_question_is_served_by_the_pending_route(
    world: World, encrypted: bool
) -> None:
    """nanobot answers an edit (its `* ` fallback body) as a new question: routed like a
    new message of its sender."""
    room = await new_room(world, encrypted)
    alice = world.alice
    asked = await alice.say(room, asked_in(encrypted, "What is 5+5?"))
    assert served_by(await reply(world, room, asked)) == "local"
    command = await route(world, room, "!route cloud")
    assert served_by(await reply(world, room, command)) == "local"
    new_text = asked_in(encrypted, "What is 6+6?")
    edit = await alice.send(
        room,
        {
            "msgtype": "m.text",
            "body": f"* {new_text}",
            "m.new_content": {"msgtype": "m.text", "body": new_text},
            "m.relates_to": {"rel_type": "m.replace", "event_id": asked},
        },
    )
    assert served_by(await reply(world, room, edit)) == "cloud"


@ROOMS
async def test_with_the_mention_policy_nanobot_sees_no_command_and_a_mention_is_routed(
    world: World, encrypted: bool
) -> None:
    """`groupPolicy: "mention"`: nanobot reads only messages that mention it, so neither
    `!route cloud` nor `/route cloud` reaches its model or its command router; the next
    question that mentions it is served by cloud, the one after by the default."""
    room = await new_room(world, encrypted, agent=MENTIONED)
    await route(world, room, "!route cloud")
    await route(world, room, "/route cloud")  # replaces the first, unused
    await asyncio.sleep(3)
    assert not [e for e in await world.alice.events(room, 1000) if is_message_from(MENTIONED, e)]
    for question, model in (("What is 7+7?", "cloud"), ("And 8+8?", "local")):
        text = f"nanobotm: {asked_in(encrypted, question)}"  # as Element writes a mention
        asked = await world.alice.send(
            room, {"msgtype": "m.text", "body": text, "m.mentions": {"user_ids": [MENTIONED]}}
        )
        assert served_by(await reply(world, room, asked, agent=MENTIONED)) == model
