"""The whole chain on a real Synapse: a user's message → the stand-in agent → the reference
dispatcher → the side-car's claim → the right upstream; receipts in the room."""

from __future__ import annotations

from typing import Any

import pytest

from demo.upstream import ModelStack

from .conftest import Chain
from .harness import MatrixUser, agent_answer_in, edits_of, receipts_in

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
    await alice.wait_reply(room, command)
    local_calls, cloud_calls = len(chain.local.seen), len(chain.cloud.seen)
    routed, second = await ask("Why is the sky blue?")
    assert second == "answer from cloud"
    assert len(chain.cloud.seen) == cloud_calls + 2  # the tool round and the answer
    assert len(chain.local.seen) == local_calls
    _, third = await ask("And 3+3?")
    assert third == "answer from local"

    receipt = await alice.wait_for(
        room, lambda e: bool(receipts_in([e], routed)), what="the receipt"
    )

    def shows_both_calls(event: dict[str, Any]) -> bool:  # the receipt itself, or its latest edit
        if event["event_id"] == receipt["event_id"]:
            return "2 call" in event["content"]["body"]
        return bool(edits_of([event], receipt["event_id"])) and (
            "2 call" in event["content"]["m.new_content"]["body"]
        )

    final = await alice.wait_for(
        room, shows_both_calls, timeout=30, what="the receipt counting both calls"
    )
    assert ModelStack.CLOUD in final["content"].get("m.new_content", final["content"])["body"]
    assert len(receipts_in(await alice.events(room), routed)) == 1


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
