"""The whole chain on a real Synapse: a user's message → the stand-in agent → the reference
dispatcher → the side-car's claim → the right upstream; receipts in the room."""

from __future__ import annotations

import pytest

from demo.upstream import ModelStack

from .conftest import Chain
from .harness import MatrixUser, agent_answer_in, receipts_in

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


async def test_route_cloud_sends_every_call_of_the_next_turn_to_cloud_then_back_to_local(
    users: dict[str, MatrixUser], room: str, chain: Chain
) -> None:
    alice, agent_id = users["alice"], chain.agent.user_id

    async def ask(text: str) -> tuple[str, str]:
        event_id = await alice.say(room, text)
        answer = await alice.wait_for(
            room, agent_answer_in(event_id, agent_id), timeout=30, what="the agent's answer"
        )
        return event_id, answer["content"]["body"]

    _, first = await ask("What is 2+2?")
    assert first == "answer from local"
    command = await alice.say(room, "!route cloud")
    confirmation = (await alice.wait_reply(room, command))["event_id"]
    local_calls, cloud_calls = len(chain.local.seen), len(chain.cloud.seen)
    routed, second = await ask("Why is the sky blue?")
    assert second == "answer from cloud"
    assert len(chain.cloud.seen) == cloud_calls + 2  # the tool round and the answer
    assert len(chain.local.seen) == local_calls
    _, third = await ask("And 3+3?")
    assert third == "answer from local"

    # What served the routed turn is told beside the command, from the dispatcher's
    # reports of both calls; the agent's answer thread is left to the agent.
    shown = await alice.wait_shown(
        room, confirmation, lambda text: "2 call" in text, timeout=30, what="the account"
    )
    assert f"Answered by cloud (`{ModelStack.CLOUD}`): 2 call(s)" in shown
    assert receipts_in(await alice.events(room), routed) == []


async def test_the_multi_line_form_is_answered_on_the_target_as_its_own_turn(
    users: dict[str, MatrixUser], room: str, chain: Chain
) -> None:
    alice = users["alice"]
    command = await alice.say(room, "!route cloud\nWhat is the capital of Peru?")
    answer = await alice.wait_for(
        room, agent_answer_in(command, chain.agent.user_id), timeout=30, what="the answer"
    )
    assert answer["content"]["body"] == "answer from cloud"
    later = await alice.say(room, "and of Chile?")
    after = await alice.wait_for(
        room, agent_answer_in(later, chain.agent.user_id), timeout=30, what="the next answer"
    )
    assert after["content"]["body"] == "answer from local"
