"""Issue 18: agents without a plugin (matrix-gptbot) route as reliably as Hermes: the
one-message form's whole text, the OpenAI `user` field as a room hint, `ambiguous_room`,
edits, and the `again` an agent never saw. The service with a real store; the same
through real gptbot and Synapse in tests/e2e/test_gptbot.py."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from route_sidecar.config import config_warnings, parse_config
from route_sidecar.core.events import RoomMessage, parse_event
from route_sidecar.core.intents import ClaimResult
from route_sidecar.core.turns import Turn, extract_turn
from route_sidecar.metrics import Metrics
from route_sidecar.service import RouteService
from route_sidecar.store import Store

from .test_service import RAW, ROOM, Clock, message

OTHER_ROOM = "!other:test"


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def make_service(path: Path, clock: Clock, **routing: str) -> RouteService:
    raw = {**RAW, "routing": routing} if routing else RAW
    store = await Store.open(path)
    service = RouteService(parse_config(raw, {}), store, b"salt", Metrics(), clock=clock)
    await service.load()
    return service


def gptbot_request(text: str, user: str | None = ROOM) -> dict[str, Any]:
    """What matrix-gptbot sends: a system line, the history without names, the body as it
    is, and the room id as the OpenAI `user`."""
    body: dict[str, Any] = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": text},
        ],
    }
    if user is not None:
        body["user"] = user
    return body


async def test_the_one_message_form_is_known_by_its_whole_text(
    tmp_path: Path, clock: Clock
) -> None:
    service = await make_service(tmp_path / "db.sqlite", clock)
    command = "/route cloud\nWhy did the deploy fail?"
    await service.on_message(message(command, "$cmd", clock.now))
    clock.now += timedelta(seconds=2)
    # gptbot answers the whole text; no room in the claim: found by the whole text's hash.
    answer = await service.claim(Turn(last_user_message=command))
    assert (answer.result, answer.room_id) == (ClaimResult.BOUND, ROOM)
    # The route served its one turn: a later, different question is not taken.
    await service.on_message(message("And the next one?", "$q2", clock.now))
    later = await service.claim(Turn(last_user_message="And the next one?"))
    assert not later.result.override
    await service.store.close()


def test_the_openai_user_field_is_a_room_hint_when_it_holds_a_room_id() -> None:
    assert extract_turn(gptbot_request("hi")).room_id == ROOM
    assert extract_turn(gptbot_request("hi", user="!v12roomidwithoutserver")).room_id == (
        "!v12roomidwithoutserver"
    )
    for not_a_room in ("alice", "", "!", "! spaced", "!" + "x" * 300, None, 42):
        assert extract_turn(gptbot_request("hi", user=not_a_room)).room_id is None  # type: ignore[arg-type]
    # Hermes's room-id line wins over the field.
    body = gptbot_request("hi", user="!field:test")
    body["messages"][0]["content"] = "**Matrix Room ID:** !line:test"
    assert extract_turn(body).room_id == "!line:test"


async def test_the_same_text_in_two_rooms_is_placed_by_the_hint_or_said_ambiguous(
    tmp_path: Path, clock: Clock
) -> None:
    service = await make_service(tmp_path / "db.sqlite", clock)
    await service.on_message(message("!route cloud", "$cmd", clock.now))
    clock.now += timedelta(seconds=1)
    question = "What is the status of the build?"
    await service.on_message(message(question, "$q-here", clock.now))
    await service.on_message(replace(message(question, "$q-there", clock.now), room_id=OTHER_ROOM))
    ambiguous = await service.claim(Turn(last_user_message=question))
    assert (ambiguous.result, ambiguous.override) == (ClaimResult.AMBIGUOUS_ROOM, False)
    assert ambiguous.room_id is None
    assert service.live.current(ROOM) is not None  # nothing was bound
    # A hint the side-car knows decides; one naming no room it knows counts as absent.
    unknown = await service.claim(extract_turn(gptbot_request(question, "!unknown:test")))
    assert unknown.result is ClaimResult.AMBIGUOUS_ROOM
    there = await service.claim(extract_turn(gptbot_request(question, OTHER_ROOM)))
    assert not there.override and there.room_id in (OTHER_ROOM, None)
    here = await service.claim(extract_turn(gptbot_request(question, ROOM)))
    assert (here.result, here.room_id) == (ClaimResult.BOUND, ROOM)
    await service.store.close()


def edit_event(event_id: str, original: str, new_text: str, ts_ms: int) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "room_id": ROOM,
        "event_id": event_id,
        "sender": "@alice:test",
        "origin_server_ts": ts_ms,
        "content": {
            "msgtype": "m.text",
            "body": f"* {new_text}",
            "m.new_content": {"msgtype": "m.text", "body": new_text},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original},
        },
    }


@pytest.mark.parametrize("as_answered", ["new text", "fallback body"])
async def test_an_edited_question_is_a_new_message_of_its_sender(
    tmp_path: Path, clock: Clock, as_answered: str
) -> None:
    service = await make_service(tmp_path / "db.sqlite", clock)
    await service.on_message(message("Why is CI red?", "$q", clock.now))
    clock.now += timedelta(seconds=1)
    await service.on_message(message("!route cloud", "$cmd", clock.now))
    clock.now += timedelta(seconds=1)
    edit = parse_event(edit_event("$edit", "$q", "Why is CI red on main?", _ms(clock)))
    assert isinstance(edit, RoomMessage) and edit.new_body == "Why is CI red on main?"
    await service.on_message(edit)
    text = edit.new_body if as_answered == "new text" else edit.body
    answer = await service.claim(Turn(last_user_message=text))
    # Placed in the room, and after the command (the edit is newer than the command).
    assert (answer.result, answer.room_id) == (ClaimResult.BOUND, ROOM)
    await service.store.close()


async def test_an_edit_never_counts_as_a_command(tmp_path: Path, clock: Clock) -> None:
    service = await make_service(tmp_path / "db.sqlite", clock)
    await service.on_message(message("!route cloud", "$cmd", clock.now))
    clock.now += timedelta(seconds=1)
    await service.on_message(parse_event(edit_event("$e", "$cmd", "!route local", _ms(clock))))  # type: ignore[arg-type]
    intent = service.live.current(ROOM)
    assert intent is not None and intent.target == "cloud"
    async with service.store.atomic() as tx:
        assert not await tx.command_handled("$e")
    await service.store.close()


def _ms(clock: Clock) -> int:
    return int(clock.now.timestamp() * 1000)


async def test_an_again_no_agent_took_edits_its_reply_once(tmp_path: Path, clock: Clock) -> None:
    service = await make_service(tmp_path / "db.sqlite", clock, again_wait="30s")
    await service.on_message(message("Why is CI red?", "$q", clock.now))
    clock.now += timedelta(seconds=1)
    await service.on_message(message("!route cloud again", "$again", clock.now))
    clock.now += timedelta(seconds=29)
    await service.sweep()
    assert await unpicked(service) == []  # not yet
    clock.now += timedelta(seconds=1)
    await service.sweep()
    await service.sweep()
    [edit] = await unpicked(service)
    assert edit["edits"] == "reply:$again"
    assert "No agent picked up the question" in edit["content"]["m.new_content"]["body"]
    assert "Why is CI red" not in str(edit["content"])  # the question is never stored
    # The intent stays pending: retyping the question sends it to the target.
    await service.on_message(message("Why is CI red?", "$retyped", clock.now))
    answer = await service.claim(Turn(turn_id="$retyped", last_user_message="Why is CI red?"))
    assert answer.result is ClaimResult.BOUND
    # After a restart, no second edit.
    restarted = RouteService(service.config, service.store, b"salt", Metrics(), clock=clock)
    await restarted.load()
    await restarted.sweep()
    assert len(await unpicked(restarted)) == 1
    await service.store.close()


async def test_an_again_a_turn_took_is_not_edited(tmp_path: Path, clock: Clock) -> None:
    service = await make_service(tmp_path / "db.sqlite", clock, again_wait="30s")
    await service.on_message(message("Why is CI red?", "$q", clock.now))
    clock.now += timedelta(seconds=1)
    await service.on_message(message("!route cloud again", "$again", clock.now))
    # The plugin's agent answers the command as the re-asked question.
    answer = await service.claim(Turn(turn_id="$again", last_user_message="Why is CI red?"))
    assert answer.result is ClaimResult.BOUND
    clock.now += timedelta(minutes=2)
    await service.sweep()
    assert await unpicked(service) == []
    await service.store.close()


async def unpicked(service: RouteService) -> list[dict[str, Any]]:
    import json

    async with service.store.atomic() as tx:
        rows = await tx.unsent_effects(service.clock() + timedelta(days=1))
    return [
        {"edits": row.edits, "content": json.loads(row.content)}
        for row in rows
        if row.key.startswith("unpicked:")
    ]


def test_check_config_warns_when_no_agent_is_listed() -> None:
    assert any("agents" in w for w in config_warnings(parse_config(RAW, {})))
    listed = parse_config({**RAW, "agents": ["@gptbot:test"]}, {})
    assert config_warnings(listed) == []
