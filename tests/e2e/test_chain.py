"""The whole chain on a real Synapse: a user's message → the stand-in agent → the reference
dispatcher → the side-car's claim → the right upstream; receipts in the room."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from demo.agent import StandInAgent
from demo.upstream import FakeUpstream, ModelStack

from .harness import API_TOKEN, BOT, MatrixUser, Sidecar, edits_of

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


class Chain:
    def __init__(self, local: FakeUpstream, cloud: FakeUpstream, agent: StandInAgent) -> None:
        self.local, self.cloud, self.agent = local, cloud, agent


@pytest_asyncio.fixture(loop_scope="session")
async def chain(
    users: dict[str, MatrixUser], sidecar: Sidecar, hs_url: str
) -> AsyncIterator[Chain]:
    models = await ModelStack().start(sidecar.api_url, API_TOKEN)
    agent_user = users["agent"]
    agent = StandInAgent(hs_url, agent_user.token, agent_user.user_id, models.dispatcher_url)
    agent.ignore(BOT)
    await agent.start()
    yield Chain(models.local, models.cloud, agent)
    await agent.stop()
    await models.stop()


def agent_answer_in(thread: str, agent_id: str):  # type: ignore[no-untyped-def]
    def match(event: dict) -> bool:
        relates = event.get("content", {}).get("m.relates_to", {})
        return (
            event.get("sender") == agent_id
            and relates.get("rel_type") == "m.thread"
            and relates.get("event_id") == thread
        )

    return match


def receipts_in(events: list[dict], thread: str) -> list[dict]:
    return [
        e
        for e in events
        if e.get("sender") == BOT
        and e["content"].get("m.relates_to", {}).get("rel_type") == "m.thread"
        and e["content"]["m.relates_to"].get("event_id") == thread
    ]


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

    def shows_both_calls(event: dict) -> bool:  # the receipt itself, or its latest edit
        if event["event_id"] == receipt["event_id"]:
            return "2 call" in event["content"]["body"]
        return bool(edits_of([event], receipt["event_id"])) and (
            "2 call" in event["content"]["m.new_content"]["body"]
        )

    final = await alice.wait_for(room, shows_both_calls, what="the receipt counting both calls")
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
