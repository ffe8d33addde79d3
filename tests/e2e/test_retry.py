"""SPEC "Retry" on a real Synapse: the whole chain (stand-in agent with the Hermes
plugin's logic, reference dispatcher, fake models, the side-car as its own process). A
failed turn gets one suggestion; `!route cloud again` re-asks the right question on cloud,
and only that turn; `again` with nothing to re-ask changes nothing; the question text is
never written to the side-car's database."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from demo.upstream import ModelStack, last_user_text

from .conftest import Chain, open_room
from .harness import (
    LookupClient,
    MatrixUser,
    Sidecar,
    agent_answer_in,
    receipts_in,
    shown_text,
)

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

ANSWER_TIMEOUT = 30


async def ask(user: MatrixUser, room: str, chain: Chain, text: str) -> tuple[str, str]:
    """A question in the room, and the agent's answer in its thread."""
    event_id = await user.say(room, text)
    answer = await user.wait_for(
        room,
        agent_answer_in(event_id, chain.agent.user_id),
        timeout=ANSWER_TIMEOUT,
        what=f"the agent's answer to {text!r}",
    )
    return event_id, answer["content"]["body"]


def suggestions(events: list[dict[str, Any]], thread: str) -> list[dict[str, Any]]:
    return [e for e in receipts_in(events, thread) if "failed" in e["content"]["body"]]


def asked_of(upstream: Any, since: int) -> list[str]:
    """The last user message of every call an upstream saw since call number `since`."""
    return [last_user_text(body) for body in upstream.seen[since:]]


async def test_a_failed_turn_gets_one_suggestion_and_again_answers_it_on_cloud(
    users: dict[str, MatrixUser], room: str, chain: Chain, sidecar: Sidecar
) -> None:
    alice = users["alice"]
    failing = "Why did build 4711 fail on the runner?"
    _, first = await ask(alice, room, chain, "What is 2+2?")
    assert first == "answer from local"
    chain.local.fail_on = "build 4711"
    try:
        question, answer = await ask(alice, room, chain, failing)
        assert "failed" in answer  # the agent says its model failed
        suggestion = await alice.wait_for(
            room, lambda e: bool(suggestions([e], question)), what="the retry suggestion"
        )
        body = suggestion["content"]["body"]
        assert suggestion["content"]["msgtype"] == "m.notice"
        assert ModelStack.LOCAL in body
        # Alice (level 100) may use cloud and big; local is what failed.
        assert "!route cloud again" in body and "!route big again" in body
        assert "!route local again" not in body

        cloud_before, local_before = len(chain.cloud.seen), len(chain.local.seen)
        command = await alice.say(room, "!route cloud again")
        reply = await alice.wait_reply(room, command)
        assert failing in reply["content"]["body"]  # it names the question it re-asks
        answer_event = await alice.wait_for(
            room,
            agent_answer_in(command, chain.agent.user_id),
            timeout=ANSWER_TIMEOUT,
            what="the re-asked answer",
        )
        assert answer_event["content"]["body"] == "answer from cloud"
        # Both calls of the re-asked turn went to cloud, with the failed question.
        assert asked_of(chain.cloud, cloud_before) == [f"[alice] {failing}"] * 2
        assert len(chain.local.seen) == local_before

        _, after = await ask(alice, room, chain, "And what is 3+3?")
        assert after == "answer from local"  # only that turn went to cloud
    finally:
        chain.local.fail_on = None

    await asyncio.sleep(3)  # past the grace and an outbox round: no second suggestion
    events = await alice.events(room, limit=200)
    assert len(suggestions(events, question)) == 1
    # What served the re-asked turn is told by editing the `again` reply, not in the thread.
    assert receipts_in(events, command) == []
    account = shown_text(events, reply["event_id"])
    assert account is not None and f"Answered by cloud (`{ModelStack.CLOUD}`)" in account
    # History: the re-asked turn (routed, served by cloud) above the failed one.
    shown = await alice.say(room, "!route history")
    lines = (await alice.wait_reply(room, shown))["content"]["body"].splitlines()
    routed = next(i for i, line in enumerate(lines) if "routed to cloud" in line)
    failed = next(i for i, line in enumerate(lines) if "failed on automatic routing" in line)
    assert routed < failed
    assert ModelStack.CLOUD in lines[routed] and "2 call(s)" in lines[routed]
    assert ModelStack.LOCAL in lines[failed] and "@alice:localhost" in lines[failed]
    # No question text anywhere in the side-car's files (database and its WAL).
    for path in sidecar.db_path.parent.iterdir():
        if path.name.startswith(sidecar.db_path.name):
            data = path.read_bytes()
            for text in (failing, "What is 2+2?", "And what is 3+3?"):
                assert text.encode() not in data, f"{text!r} written to {path.name}"


async def test_again_re_asks_the_last_question_not_an_older_one_nor_a_command(
    users: dict[str, MatrixUser], room: str, chain: Chain
) -> None:
    alice, bob = users["alice"], users["bob"]
    await ask(alice, room, chain, "Which region is the outage in?")
    await ask(bob, room, chain, "Is the database replica healthy?")
    status = await alice.say(room, "!route status")  # a command is not a question
    await alice.wait_reply(room, status)
    # The agent's own answers are in the room too, and are not questions either.
    cloud_before = len(chain.cloud.seen)
    command = await alice.say(room, "!route cloud again")
    reply = await alice.wait_reply(room, command)
    assert "Is the database replica healthy?" in reply["content"]["body"]
    assert "@bob:localhost" in reply["content"]["body"]
    answer = await alice.wait_for(
        room, agent_answer_in(command, chain.agent.user_id), timeout=ANSWER_TIMEOUT
    )
    assert answer["content"]["body"] == "answer from cloud"
    # The agent names the sender of the message it answers: the `again` command's.
    assert asked_of(chain.cloud, cloud_before) == ["[alice] Is the database replica healthy?"] * 2


async def test_again_with_nothing_to_re_ask_changes_nothing(
    users: dict[str, MatrixUser], chain: Chain, lookup: LookupClient
) -> None:
    alice = users["alice"]
    room = await open_room(users)
    calls = len(chain.local.seen) + len(chain.cloud.seen)
    command = await alice.say(room, "!route cloud again")
    reply = await alice.wait_reply(room, command)
    assert "Nothing to re-ask" in reply["content"]["body"]
    assert await lookup.room_intent(room) is None
    await asyncio.sleep(1)  # the agent drops the command: no turn, no call
    assert len(chain.local.seen) + len(chain.cloud.seen) == calls
    events = await alice.events(room)
    assert not [
        e
        for e in events
        if e.get("sender") == chain.agent.user_id and e["type"] == ("m.room.message")
    ]
    # A later question is answered as usual, on automatic routing.
    _, answer = await ask(alice, room, chain, "Anything new?")
    assert answer == "answer from local"
