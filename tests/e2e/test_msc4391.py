"""SPEC "Chat commands", MSC4391 ("Simplified in-room bot commands"), end to end on a
real Synapse: the bot describes `route` in rooms where it may send state events (the
MSC's state key, content valid against the MSC's schema), keeps it current and removes
it when it leaves; a structured invocation that mentions the bot routes; a room where
the bot lacks the power level works as before."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from typing import Any
from urllib.parse import quote

import pytest
from jsonschema import Draft202012Validator

from .conftest import open_room
from .harness import BOT, LookupClient, MatrixUser, Sidecar, hermes_request, joined

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]
CLOUD = "ollama-cloud/glm-5.1"
DESCRIPTION_EVENT = "org.matrix.msc4391.command_description"
INVOCATION_KEY = "org.matrix.msc4391.command"
# MSC4391: "The state_key MUST be a padded base64 encoded SHA256 digest of the `command`
# property of the command description AND the mxid of the sender."
STATE_KEY = base64.b64encode(hashlib.sha256(f"route{BOT}".encode()).digest()).decode()
NOT_DESCRIBED = "command description not published room={room}"
CHECKED = "command descriptions checked"  # logged once the start-up pass is done

# The MSC's "implied schema" of a command description's content, as a JSON schema.
_TEXT = {
    "type": "object",
    "required": ["m.text"],
    "properties": {
        "m.text": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["body"],
                "properties": {"body": {"type": "string"}, "mimetype": {"type": "string"}},
            },
        }
    },
}
_PRIMITIVE = {
    "type": "object",
    "required": ["schema_type", "type"],
    "properties": {
        "schema_type": {"const": "primitive"},
        "type": {
            "enum": [
                "string",
                "integer",
                "boolean",
                "user_id",
                "server_name",
                "room_alias",
                "room_id",
                "event_id",
            ]
        },
    },
    "additionalProperties": False,
}
_LITERAL = {  # "only boolean, integer, and string may be provided for the value"
    "type": "object",
    "required": ["schema_type", "value"],
    "properties": {
        "schema_type": {"const": "literal"},
        "value": {"type": ["string", "integer", "boolean"]},
        "literal_type": {"enum": ["string", "integer", "boolean"]},
    },
    "additionalProperties": False,
}
_UNION = {  # variants: primitive or literal only (no nested unions, no arrays)
    "type": "object",
    "required": ["schema_type", "variants"],
    "properties": {
        "schema_type": {"const": "union"},
        "variants": {"type": "array", "minItems": 1, "items": {"oneOf": [_PRIMITIVE, _LITERAL]}},
    },
    "additionalProperties": False,
}
_ARRAY = {  # top level only; items: union, primitive or literal
    "type": "object",
    "required": ["schema_type", "items"],
    "properties": {
        "schema_type": {"const": "array"},
        "items": {"oneOf": [_PRIMITIVE, _LITERAL, _UNION]},
    },
    "additionalProperties": False,
}
DESCRIPTION_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["command"],
    "properties": {
        "command": {"type": "string", "minLength": 1},
        "parameters": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "schema"],
                "properties": {
                    "key": {"type": "string", "minLength": 1},
                    "schema": {"oneOf": [_PRIMITIVE, _LITERAL, _UNION, _ARRAY]},
                    "optional": {"type": "boolean"},
                    "description": _TEXT,
                },
                "additionalProperties": False,
            },
        },
        "description": _TEXT,
    },
    "additionalProperties": False,
}


def assert_valid_description(content: dict[str, Any]) -> None:
    Draft202012Validator.check_schema(DESCRIPTION_SCHEMA)
    Draft202012Validator(DESCRIPTION_SCHEMA).validate(content)
    keys = [p["key"] for p in content.get("parameters", [])]
    assert len(keys) == len(set(keys)), "duplicate parameter keys make a description invalid"


async def create_room(owner: MatrixUser, power_levels: dict[str, Any]) -> str:
    body = {
        "preset": "private_chat",
        "name": "msc4391 test",
        "invite": [BOT],
        "power_level_content_override": power_levels,
    }
    room_id = str((await owner.request("POST", "/createRoom", body))["room_id"])
    await owner.wait_for(room_id, joined(BOT), what="the bot to join")
    return room_id


async def description_in(user: MatrixUser, room_id: str) -> dict[str, Any] | None:
    """The description's current content; None when the room has none (never had one,
    or it was removed: an empty content)."""
    path = f"/rooms/{quote(room_id)}/state/{DESCRIPTION_EVENT}/{quote(STATE_KEY, safe='')}"
    response = await user.client.get("/_matrix/client/v3" + path)
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    content: dict[str, Any] = response.json()
    return content or None


async def wait_description(
    user: MatrixUser, room_id: str, done: Any, timeout: float = 15.0
) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = await description_in(user, room_id)
        if done(content):
            return content
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for the description in {room_id}")


async def wait_log(sidecar: Sidecar, done: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done(sidecar.log_path.read_text(errors="replace")):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("timed out waiting for the side-car's log")


async def published(user: MatrixUser, room_id: str) -> dict[str, Any]:
    """The description once the bot has published it, checked against the MSC."""
    content = await wait_description(user, room_id, lambda c: c is not None)
    assert content is not None
    assert_valid_description(content)
    return content


async def described_events(user: MatrixUser, room_id: str) -> list[dict[str, Any]]:
    """Every description event the room's timeline holds (each one sent)."""
    return [
        e
        for e in await user.events(room_id)
        if e["type"] == DESCRIPTION_EVENT and e.get("state_key") == STATE_KEY
    ]


def choices(content: dict[str, Any]) -> list[Any]:
    return [v.get("value") for v in content["parameters"][0]["schema"]["variants"]]


def invocation(arguments: dict[str, Any], mention: bool = True) -> dict[str, Any]:
    """A message as gomuks sends a structured command: its own body, the bot mentioned."""
    return {
        "msgtype": "m.text",
        "body": f"/route{BOT} " + " ".join(str(v) for v in arguments.values()),
        "m.mentions": {"user_ids": [BOT] if mention else []},
        INVOCATION_KEY: {"command": "route", "arguments": arguments},
    }


async def test_the_description_is_published_with_the_msc_state_key_and_schema(
    users: dict[str, MatrixUser], sidecar: Sidecar
) -> None:
    alice = users["alice"]
    room = await create_room(alice, {"users": {BOT: 50}})
    content = await published(alice, room)
    assert content["command"] == "route"
    assert choices(content) == [
        "cloud",
        "local",
        "big",
        "status",
        "targets",
        "history",
        "help",
        "leave",
        "auto",
    ]
    assert [p["key"] for p in content["parameters"]] == ["target", "turns", "for", "again"]
    events = await described_events(alice, room)
    assert [e["sender"] for e in events] == [BOT]
    assert NOT_DESCRIBED.format(room=room) not in sidecar.log_path.read_text()


async def test_the_description_follows_a_power_level_given_after_the_bot_joined(
    users: dict[str, MatrixUser],
) -> None:
    alice = users["alice"]
    room = await create_room(alice, {"users": {}})
    assert await description_in(alice, room) is None  # level 0: it may not
    levels_path = f"/rooms/{quote(room)}/state/m.room.power_levels"
    levels = await alice.request("GET", levels_path)
    levels["users"][BOT] = 50
    await alice.request("PUT", levels_path, levels)
    await published(alice, room)


async def test_the_description_is_kept_current_across_restarts_and_removed_on_leave(
    users: dict[str, MatrixUser], sidecar: Sidecar
) -> None:
    alice = users["alice"]
    room = await create_room(alice, {"users": {BOT: 50}})
    await published(alice, room)
    config = json.loads(json.dumps(sidecar.config))
    more = json.loads(json.dumps(config))
    more["targets"]["huge"] = {"model": "ollama-cloud/huge-2t"}
    try:
        sidecar.write_config(more)
        sidecar.restart()  # the targets changed: the description follows at start
        content = await wait_description(alice, room, lambda c: c and "huge" in choices(c))
        assert content is not None
        assert_valid_description(content)
        checked = sidecar.log_path.read_text().count(CHECKED)
        sidecar.restart()  # nothing changed: nothing is sent again
        await wait_log(sidecar, lambda log: log.count(CHECKED) > checked)
        assert len(await described_events(alice, room)) == 2
    finally:
        sidecar.write_config(config)
        sidecar.restart()
    await wait_description(alice, room, lambda c: c and "huge" not in choices(c))

    command = await alice.say(room, "!route leave")
    await alice.wait_reply(room, command)
    await wait_description(alice, room, lambda c: c is None)  # removed: an empty content
    await alice.wait_for(
        room,
        lambda e: (
            e["type"] == "m.room.member"
            and e.get("state_key") == BOT
            and e["content"].get("membership") == "leave"
        ),
        what="the bot to leave",
    )
    last = (await described_events(alice, room))[0]
    assert last["content"] == {} and last["sender"] == BOT


async def test_a_structured_invocation_that_mentions_the_bot_routes(
    users: dict[str, MatrixUser], lookup: LookupClient
) -> None:
    alice = users["alice"]
    room = await open_room(users)
    command = await alice.send(room, invocation({"target": "cloud"}))
    reply = await alice.wait_reply(room, command)
    assert "cloud" in reply["content"]["body"] and CLOUD in reply["content"]["body"]
    assert (await lookup.live_intent(room))["target"] == "cloud"
    question = await alice.say(room, "Why did the deploy fail?")
    claim = await lookup.claim(
        request=hermes_request(room, question, "[alice] Why did the deploy fail?")
    )
    assert claim["override"] is True and claim["model"] == CLOUD

    # Its arguments win over the body; malformed ones get an error and record nothing.
    await alice.wait_reply(room, await alice.send(room, invocation({"target": "auto"})))
    assert await lookup.room_intent(room) is None
    hostile = await alice.send(room, invocation({"target": "cloud --turns 9", "turns": "x"}))
    error = await alice.wait_reply(room, hostile)
    assert "one word" in error["content"]["body"]
    assert await lookup.room_intent(room) is None
    # Without the mention it is another bot's business: its body is read as typed.
    unmentioned = await alice.send(room, invocation({"target": "cloud"}, mention=False))
    # A command after it is handled after it: once that one is answered, so would it be.
    await alice.wait_reply(room, await alice.say(room, "!route status"))
    assert await alice.bot_replies(room, unmentioned) == []
    assert await lookup.room_intent(room) is None


async def test_a_room_where_the_bot_may_not_send_state_works_as_today(
    users: dict[str, MatrixUser], sidecar: Sidecar, lookup: LookupClient
) -> None:
    alice = users["alice"]
    room = await create_room(
        alice,
        {
            "users": {BOT: 50},
            "state_default": 100,
            "events": {DESCRIPTION_EVENT: 100},
        },
    )
    command = await alice.say(room, "!route cloud")
    reply = await alice.wait_reply(room, command)
    assert "cloud" in reply["content"]["body"]
    assert (await lookup.live_intent(room))["target"] == "cloud"
    # Another chance to describe (the power levels change, still too low): said once.
    levels_path = f"/rooms/{quote(room)}/state/m.room.power_levels"
    levels = await alice.request("GET", levels_path)
    levels["users"][BOT] = 60
    await alice.request("PUT", levels_path, levels)
    second = await alice.say(room, "!route auto")
    await alice.wait_reply(room, second)
    assert await description_in(alice, room) is None
    assert sidecar.log_path.read_text().count(NOT_DESCRIBED.format(room=room)) == 1
