"""SPEC "Chat commands" and "Intents", end to end: a person types in the room, the
dispatcher claims over HTTP, on a real Synapse with the side-car as its own process."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from .conftest import open_room
from .harness import (
    BOT,
    LookupClient,
    MatrixUser,
    edits_of,
    hermes_request,
    reactions_on,
    receipts_in,
    shown_text,
)

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]
CLOUD = "ollama-cloud/glm-5.1"


async def turn_claim(
    lookup: LookupClient, room_id: str, event_id: str, text: str, name: str = "alice"
) -> dict[str, Any]:
    """One LLM call of the agent's turn answering `event_id`, as Hermes sends it."""
    return await lookup.claim(request=hermes_request(room_id, event_id, f"[{name}] {text}"))


async def test_route_cloud_confirms_and_binds_exactly_the_next_turn(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    alice = users["alice"]
    command = await alice.say(room, "!route cloud")
    reply = await alice.wait_reply(room, command)
    content = reply["content"]
    assert content["msgtype"] == "m.notice"
    assert "cloud" in content["body"] and CLOUD in content["body"]
    assert (
        content["format"] == "org.matrix.custom.html"
        and "<b>cloud</b>" in content["formatted_body"]
    )
    assert (await lookup.live_intent(room))["state"] == "pending"

    question = await alice.say(room, "Why did the deploy fail?")
    answers = [await turn_claim(lookup, room, question, "Why did the deploy fail?")]
    # An unrelated turn in between (another thread) gets nothing and disturbs nothing.
    unrelated = await turn_claim(lookup, room, "$someone-else", "unrelated question")
    answers += [
        await turn_claim(lookup, room, question, "Why did the deploy fail?") for _ in range(2)
    ]
    assert [a["override"] for a in answers] == [True, True, True]
    assert {a["model"] for a in answers} == {CLOUD}
    assert {a["intent_id"] for a in answers} == {answers[0]["intent_id"]}
    assert answers[0]["metadata"]["matrix_sender"] == alice.user_id
    assert answers[0]["metadata"]["route_turn_id"] == question
    assert unrelated["override"] is False and unrelated["model"] is None

    next_question = await alice.say(room, "And what now?")
    later = await turn_claim(lookup, room, next_question, "And what now?")
    assert later["override"] is False

    # The room shows the true state: the command got a reaction when the turn claimed it.
    events = await alice.events(room)
    assert reactions_on(events, command) == ["✅"]
    assert len(await alice.bot_replies(room, command)) == 1


async def test_what_served_a_turn_edits_the_confirmation_and_leaves_the_thread_alone(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    """SPEC "POST /v1/intents/{intent_id}/outcome": by default the command's confirmation
    says what served each routed turn; the agent's answer thread gets nothing."""
    alice = users["alice"]
    command = await alice.say(room, "!route cloud")
    confirmation = (await alice.wait_reply(room, command))["event_id"]
    question = await alice.say(room, "Summarise the incident")
    claim = await turn_claim(lookup, room, question, "Summarise the incident")
    assert claim["override"] is True
    for latency in (1200, 800):
        response = await lookup.outcome(
            claim["intent_id"], model=CLOUD, status="ok", latency_ms=latency
        )
        assert response.status_code == 204
    shown = await alice.wait_shown(
        room, confirmation, lambda text: "2 call" in text, what="the confirmation's account"
    )
    assert f"Answered by cloud (`{CLOUD}`): 2 call(s), 2.0 s." in shown
    assert "later turns are routed automatically" in shown and "answering" not in shown
    await asyncio.sleep(1.0)  # let a notice in the thread (there must be none) arrive
    assert receipts_in(await alice.events(room), question) == []


async def answered_route(
    alice: MatrixUser, room: str, lookup: LookupClient, question_text: str
) -> tuple[str, str]:
    """`!route cloud`, a question, the dispatcher's claim and its report: the answer is
    done. (The confirmation's event id, the question's.)"""
    command = await alice.say(room, "!route cloud")
    confirmation = (await alice.wait_reply(room, command))["event_id"]
    question = await alice.say(room, question_text)
    claim = await turn_claim(lookup, room, question, question_text)
    assert claim["override"] is True
    await lookup.outcome(claim["intent_id"], model=CLOUD, status="ok", latency_ms=900)
    await alice.wait_shown(room, confirmation, lambda text: "Answered by" in text)
    return confirmation, question


async def final_text(alice: MatrixUser, room: str, event_id: str) -> str:
    await asyncio.sleep(1.5)  # any later edit (there must be none that says otherwise)
    shown = shown_text(await alice.events(room), event_id)
    assert shown is not None
    return shown


async def test_after_an_answered_turn_a_newer_route_never_says_an_answer_is_in_progress(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    """SPEC "Intents": what the room reads stays true; the answer was done long before."""
    alice = users["alice"]
    older, _ = await answered_route(alice, room, lookup, "first question 61c2")
    newer_command = await alice.say(room, "!route local")
    newer = (await alice.wait_reply(room, newer_command))["content"]["body"]
    assert "replaces" not in newer  # its turn was served: nothing was replaced
    text = await final_text(alice, room, older)
    assert "in progress" not in text and "answering" not in text
    assert "Answered by cloud" in text
    status_command = await alice.say(room, "!route status")
    status = (await alice.wait_reply(room, status_command))["content"]["body"]
    assert "Route to local" in status and "waiting for the agent's next turn" in status


async def test_after_an_answered_turn_auto_says_no_answer_is_in_progress(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    alice = users["alice"]
    confirmation, _ = await answered_route(alice, room, lookup, "second question 61c2")
    status_command = await alice.say(room, "!route status")
    status = (await alice.wait_reply(room, status_command))["content"]["body"]
    assert "State: used for 1 turn; later turns are routed automatically." in status
    auto = await alice.say(room, "!route auto")
    reply = (await alice.wait_reply(room, auto))["content"]["body"]
    assert "in progress" not in reply
    text = await final_text(alice, room, confirmation)
    assert "in progress" not in text and "Answered by cloud" in text


async def test_an_answer_in_flight_is_said_to_finish_and_the_edit_is_redone_when_it_has(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    """A newer route while a call of the turn is in flight: the older confirmation says
    the answer finishes on its route, then, once the call is reported, no longer does."""
    alice = users["alice"]
    command = await alice.say(room, "!route cloud")
    confirmation = (await alice.wait_reply(room, command))["event_id"]
    question = await alice.say(room, "a long question 61c2")
    claim = await turn_claim(lookup, room, question, "a long question 61c2")
    newer = await alice.say(room, "!route local")
    await alice.wait_reply(room, newer)
    await alice.wait_shown(room, confirmation, lambda t: "answer in progress finishes" in t)
    await lookup.outcome(claim["intent_id"], model=CLOUD, status="ok", latency_ms=900)
    shown = await alice.wait_shown(room, confirmation, lambda t: "Answered by cloud" in t)
    assert "in progress" not in shown and "later turns follow the newer route" in shown


async def test_multi_line_form_binds_its_own_message_only(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    alice = users["alice"]
    earlier = await alice.say(room, "an earlier question")
    command = await alice.say(room, "/route cloud\nWhat is the capital of Peru?")
    reply = await alice.wait_reply(room, command)
    assert "this question" in reply["content"]["body"]
    # The agent's tool rounds for the earlier question never take the override.
    assert (await turn_claim(lookup, room, earlier, "an earlier question"))["override"] is False
    # A later, different turn does not either: the intent waits for its question.
    other = await alice.say(room, "something else")
    assert (await turn_claim(lookup, room, other, "something else"))["override"] is False
    # The agent answering the rewritten message: turn id is the command's own event id.
    bound = await turn_claim(lookup, room, command, "What is the capital of Peru?")
    assert bound["override"] is True and bound["model"] == CLOUD
    again = await turn_claim(lookup, room, command, "What is the capital of Peru?")
    assert again["override"] is True


async def test_multi_line_form_matches_the_question_text_without_a_turn_id(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    alice = users["alice"]
    command = await alice.say(room, "!route cloud\nHow many moons has Mars?")
    await alice.wait_reply(room, command)
    # A DM-style call: no thread line; Hermes prefixes the name and appends a note.
    body = hermes_request(room, None, "[alice] How many moons has Mars?\n\n[System note: hi]")
    assert (await lookup.claim(request=body))["override"] is True
    other = hermes_request(room, None, "[alice] How many moons has Venus?")
    assert (await lookup.claim(request=other))["override"] is False


async def test_turns_2_binds_two_distinct_turns_then_stops(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    alice = users["alice"]
    command = await alice.say(room, "!route cloud --turns 2")
    await alice.wait_reply(room, command)
    results = []
    for text in ("first", "second", "third"):
        event = await alice.say(room, text)
        results.append(await turn_claim(lookup, room, event, text))
        results.append(await turn_claim(lookup, room, event, text))  # a tool round
    assert [r["override"] for r in results] == [True, True, True, True, False, False]


async def test_for_duration_routes_every_turn_until_it_ends(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    alice = users["alice"]
    command = await alice.say(room, "!route cloud --for 4s")
    await alice.wait_reply(room, command)
    first = await alice.say(room, "one")
    second = await alice.say(room, "two")
    assert (await turn_claim(lookup, room, first, "one"))["override"] is True
    assert (await turn_claim(lookup, room, second, "two"))["override"] is True
    await asyncio.sleep(4.5)
    late = await alice.say(room, "three")
    assert (await turn_claim(lookup, room, late, "three"))["override"] is False


async def test_route_auto_clears_the_intent(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    alice = users["alice"]
    command = await alice.say(room, "!route cloud")
    await alice.wait_reply(room, command)
    clear = await alice.say(room, "!route auto")
    reply = await alice.wait_reply(room, clear)
    assert "cancelled" in reply["content"]["body"]
    assert await lookup.room_intent(room) is None
    question = await alice.say(room, "q")
    assert (await turn_claim(lookup, room, question, "q"))["override"] is False


async def test_a_new_route_supersedes_the_previous_one(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    alice = users["alice"]
    first = await alice.say(room, "!route cloud")
    await alice.wait_reply(room, first)
    second = await alice.say(room, "!route local")
    reply = await alice.wait_reply(room, second)
    assert "replaces" in reply["content"]["body"]
    question = await alice.say(room, "q")
    claim = await turn_claim(lookup, room, question, "q")
    assert claim["override"] is True and claim["target"] == "local"
    first_reply = (await alice.bot_replies(room, first))[0]
    await alice.wait_for(
        room,
        lambda e: bool(edits_of([e], first_reply["event_id"])),
        what="the superseded confirmation's edit",
    )


async def test_a_user_without_permission_is_refused_and_nothing_is_recorded(
    users: dict[str, MatrixUser], lookup: LookupClient
) -> None:
    room = await open_room(users, others=("bob", "mallory"))
    mallory, bob = users["mallory"], users["bob"]
    command = await mallory.say(room, "!route cloud")
    reply = await mallory.wait_reply(room, command)
    assert "not allowed" in reply["content"]["body"]
    assert await lookup.room_intent(room) is None
    # bob has level 0; `big` needs 50.
    command = await bob.say(room, "!route big")
    reply = await bob.wait_reply(room, command)
    assert "needs permission level 50" in reply["content"]["body"]
    assert await lookup.room_intent(room) is None


async def test_an_unknown_target_gets_a_reply_listing_the_valid_ones(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    bob = users["bob"]
    command = await bob.say(room, "!route nonsense")
    body = (await bob.wait_reply(room, command))["content"]["body"]
    assert "Unknown target `nonsense`" in body
    assert "`cloud`" in body and "`local`" in body and "`big`" not in body
    assert await lookup.room_intent(room) is None


async def test_every_command_gets_exactly_one_notice_reply(
    users: dict[str, MatrixUser], room: str
) -> None:
    alice = users["alice"]
    commands = [
        "!route",
        "!route status",
        "/route targets",
        "!ROUTE help",
        "!route cloud --turns",
        "/route cloud why is it slow?",
        "!route history",
    ]
    sent = [await alice.say(room, text) for text in commands]
    for event_id in sent:
        reply = await alice.wait_reply(room, event_id)
        assert reply["content"]["msgtype"] == "m.notice"
        assert reply["content"]["formatted_body"]
    await asyncio.sleep(1.0)
    for event_id in sent:
        assert len(await alice.bot_replies(room, event_id)) == 1


async def test_a_command_in_a_thread_is_answered_in_that_thread(
    users: dict[str, MatrixUser], room: str
) -> None:
    alice = users["alice"]
    root = await alice.say(room, "a thread about the deploy")
    command = await alice.say(room, "!route status", thread_root=root)
    reply = await alice.wait_reply(room, command)
    relates = reply["content"]["m.relates_to"]
    assert relates["rel_type"] == "m.thread" and relates["event_id"] == root


async def test_agents_notices_and_the_bot_itself_are_ignored(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    alice, agent = users["alice"], users["agent"]
    from_agent = await agent.say(room, "!route cloud")
    notice = await alice.say(room, "!route cloud", msgtype="m.notice")
    marker = await alice.say(room, "!route status")  # answered: the bot is listening
    await alice.wait_reply(room, marker)
    await asyncio.sleep(0.5)
    assert await alice.bot_replies(room, from_agent) == []
    assert await alice.bot_replies(room, notice) == []
    assert await lookup.room_intent(room) is None


async def test_a_turn_answering_the_command_message_itself_gets_no_override(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    alice = users["alice"]
    command = await alice.say(room, "!route cloud")
    await alice.wait_reply(room, command)
    # An agent without the plugin answers `!route cloud` as if it were a question.
    assert (await turn_claim(lookup, room, command, "!route cloud"))["override"] is False
    question = await alice.say(room, "the real question")
    assert (await turn_claim(lookup, room, question, "the real question"))["override"] is True


async def test_redacting_a_pending_command_cancels_its_intent(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    alice = users["alice"]
    command = await alice.say(room, "!route cloud")
    await alice.wait_reply(room, command)
    await alice.redact(room, command)
    for _ in range(50):
        if await lookup.room_intent(room) is None:
            break
        await asyncio.sleep(0.1)
    assert await lookup.room_intent(room) is None
    question = await alice.say(room, "q")
    assert (await turn_claim(lookup, room, question, "q"))["override"] is False


async def test_the_room_is_resolved_from_message_hashes_when_no_room_id_is_sent(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    alice = users["alice"]
    command = await alice.say(room, "!route cloud")
    await alice.wait_reply(room, command)
    text = "a question only this room has seen 7f3a"
    await alice.say(room, text)
    await asyncio.sleep(0.3)  # the side-car sees the message through Synapse
    answer = await lookup.claim(last_user_message=f"[alice] {text}")
    assert answer["override"] is True and answer["room_id"] == room


async def test_a_claim_naming_a_joined_room_belongs_to_it_before_any_message_arrives(
    users: dict[str, MatrixUser], lookup: LookupClient
) -> None:
    """SPEC "The turn key": every room the bot has joined is a room it is in. The same text
    seen in a routed room never gives that room's route to a call that names another room
    the bot is in, even when no message has arrived there yet (a new or a quiet room, or
    the claim overtaking its message)."""
    alice = users["alice"]
    routed = await open_room(users)
    quiet = await open_room(users)  # the bot joined it; nobody has written there
    command = await alice.say(routed, "!route cloud")
    await alice.wait_reply(routed, command)
    text = "the same question asked in two rooms 5d1c"
    await alice.say(routed, text)
    await asyncio.sleep(0.3)  # the side-car sees the message through Synapse
    elsewhere = await lookup.claim(request=hermes_request(quiet, None, f"[alice] {text}"))
    assert elsewhere["override"] is False and elsewhere["room_id"] == quiet
    assert (await lookup.live_intent(routed))["state"] == "pending"
    own = await lookup.claim(request=hermes_request(routed, None, f"[alice] {text}"))
    assert own["override"] is True and own["room_id"] == routed


async def test_invites_from_users_without_permission_are_declined(
    users: dict[str, MatrixUser],
) -> None:
    mallory = users["mallory"]
    room_id = await mallory.create_room(invite=[BOT])
    await mallory.wait_for(
        room_id,
        lambda e: (
            e.get("type") == "m.room.member"
            and e.get("state_key") == BOT
            and e["content"].get("membership") == "leave"
        ),
        what="the bot to decline",
    )
    assert (await mallory.members(room_id)).get(BOT) == "leave"


async def test_the_turn_still_being_answered_when_route_is_typed_never_takes_it(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    alice = users["alice"]
    # The agent is answering this (with a mention it strips) when /route arrives.
    earlier = await alice.say(room, "@hermes why is the build red?")
    first_round = await turn_claim(lookup, room, earlier, "why is the build red?")
    command = await alice.say(room, "!route cloud")
    await alice.wait_reply(room, command)
    tool_round = await turn_claim(lookup, room, earlier, "why is the build red?")
    assert first_round["override"] is False and tool_round["override"] is False
    assert (await lookup.live_intent(room))["state"] == "pending"
    await alice.say(room, "@hermes:localhost and how do I fix it?")
    await asyncio.sleep(0.3)
    # Without a room id or thread: the room is found from the message, mention and all.
    answer = await lookup.claim(last_user_message="[alice] and how do I fix it?")
    assert answer["override"] is True and answer["room_id"] == room


async def edit_text(alice: MatrixUser, room: str, reply: dict[str, Any], needle: str) -> str:
    """The latest edit of the bot's reply that holds `needle`, as the room shows it."""

    def edited(event: dict[str, Any]) -> bool:
        return any(
            needle in e["content"]["m.new_content"]["body"]
            for e in edits_of([event], reply["event_id"])
        )

    event = await alice.wait_for(room, edited, timeout=20, what=f"an edit saying {needle!r}")
    return str(event["content"]["m.new_content"]["body"])


async def test_a_newer_route_never_switches_the_answer_in_progress(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    """SPEC "Intents": `!route cloud`, a question bound to cloud; while the agent still
    answers it, `!route local`: the turn's later tool rounds stay on cloud, the next
    question goes to local, and the older confirmation says what it served, not that it
    was replaced. `!route auto` ends a route the same way."""
    alice, bob = users["alice"], users["bob"]
    first = await alice.say(room, "!route cloud")
    first_reply = await alice.wait_reply(room, first)
    question = await bob.say(room, "Why is the build red?")
    opening = await turn_claim(lookup, room, question, "Why is the build red?", "bob")
    assert (opening["override"], opening["target"], opening["reason"]) == (True, "cloud", "bound")

    second = await alice.say(room, "!route local")
    second_reply = await alice.wait_reply(room, second)
    # The cloud route's one turn is being answered: nothing of it was replaced.
    assert "replaces" not in second_reply["content"]["body"]
    rounds = [await turn_claim(lookup, room, question, "Why is the build red?", "bob")]
    rounds.append(await turn_claim(lookup, room, question, "Why is the build red?", "bob"))
    assert [(r["override"], r["target"], r["reason"]) for r in rounds] == [
        (True, "cloud", "continued")
    ] * 2
    assert {r["intent_id"] for r in rounds} == {opening["intent_id"]}
    body = await edit_text(alice, room, first_reply, "used for 1 turn")
    assert "later turns follow the newer route" in body and "replaced" not in body
    assert (await lookup.room_intent(room) or {}).get("target") == "local"

    next_question = await bob.say(room, "And the deploy?")
    newer = await turn_claim(lookup, room, next_question, "And the deploy?", "bob")
    assert (newer["override"], newer["target"]) == (True, "local")
    # The older turn is still answered on cloud after the newer route bound its turn.
    still = await turn_claim(lookup, room, question, "Why is the build red?", "bob")
    assert (still["override"], still["target"]) == (True, "cloud")

    clear = await alice.say(room, "!route auto")
    clear_reply = await alice.wait_reply(room, clear)
    assert "answer in progress finishes on local" in clear_reply["content"]["body"]
    body = await edit_text(alice, room, second_reply, "used for 1 turn")
    assert "later turns are routed automatically" in body
    finishing = await turn_claim(lookup, room, next_question, "And the deploy?", "bob")
    assert (finishing["override"], finishing["target"]) == (True, "local")
    after = await bob.say(room, "Anything else?")
    assert (await turn_claim(lookup, room, after, "Anything else?", "bob"))["override"] is False
    assert await lookup.room_intent(room) is None
