"""MSC4391 in the bot's rooms (route_sidecar/descriptions.py), against a homeserver
stand-in: what is read, what is sent, and what is said in the log. The real thing, on
Synapse: tests/e2e/test_msc4391.py."""

from __future__ import annotations

import logging
from typing import Any, cast
from urllib.parse import quote

import pytest
from mautrix.api import Method
from mautrix.appservice import IntentAPI
from mautrix.errors import MForbidden

from route_sidecar.config import parse_config
from route_sidecar.core.describe import DESCRIPTION_EVENT, state_key
from route_sidecar.descriptions import CommandDescriptions

from .test_service import RAW, ROOM

BOT = "@route:test"
KEY = state_key("route", BOT)


class Homeserver:
    """The two requests the describer makes: the room's state, and one state event put."""

    def __init__(self, bot_level: int, forbid: bool = False) -> None:
        self.state: list[dict[str, Any]] = [
            {
                "type": "m.room.power_levels",
                "state_key": "",
                "content": {"users": {BOT: bot_level}, "state_default": 50},
            }
        ]
        self.forbid = forbid
        self.puts: list[dict[str, Any]] = []
        self.api = self

    async def request(self, method: Method, path: Any, content: Any = None) -> Any:
        if method is Method.GET:
            return self.state
        if self.forbid:
            raise MForbidden(403, "no")
        # The state key is quoted whole into one path segment (it holds `/`, `+`, `=`).
        assert path.path.endswith(f"/state/{DESCRIPTION_EVENT}/{quote(KEY, safe='')}")
        self.puts.append(content)
        self.state = [e for e in self.state if e["type"] != DESCRIPTION_EVENT]
        self.state.append({"type": DESCRIPTION_EVENT, "state_key": KEY, "content": content})
        return {"event_id": "$x"}


def describer(homeserver: Homeserver, **routing: Any) -> CommandDescriptions:
    config = parse_config({**RAW, "routing": routing}, {})
    return CommandDescriptions(config, lambda: cast(IntentAPI, homeserver))


async def test_published_once_and_not_sent_again_when_unchanged() -> None:
    homeserver = Homeserver(bot_level=50)
    descriptions = describer(homeserver)
    await descriptions.publish(ROOM)
    await descriptions.publish_all([ROOM])
    assert len(homeserver.puts) == 1 and homeserver.puts[0]["command"] == "route"
    await descriptions.withdraw(ROOM)
    await descriptions.withdraw(ROOM)
    assert homeserver.puts[1:] == [{}]


async def test_switched_off_a_description_published_before_is_removed() -> None:
    homeserver = Homeserver(bot_level=50)
    await describer(homeserver).publish(ROOM)
    await describer(homeserver, describe_command=False).publish_all([ROOM])
    assert homeserver.puts[-1] == {}
    await describer(homeserver, describe_command=False).publish(ROOM)
    assert len(homeserver.puts) == 2


@pytest.mark.parametrize(("level", "forbid"), [(0, False), (50, True)], ids=["level", "refused"])
async def test_without_the_power_level_it_is_said_once_a_room(
    level: int, forbid: bool, caplog: pytest.LogCaptureFixture
) -> None:
    homeserver = Homeserver(bot_level=level, forbid=forbid)
    descriptions = describer(homeserver)
    with caplog.at_level(logging.INFO, "route_sidecar.matrix"):
        for _ in range(3):
            await descriptions.publish(ROOM)
    said = [r for r in caplog.records if "not published" in r.getMessage()]
    assert len(said) == 1 and ROOM in said[0].getMessage()
    assert homeserver.puts == []


async def test_a_room_off_the_allow_list_is_not_described() -> None:
    homeserver = Homeserver(bot_level=50)
    config = parse_config({**RAW, "rooms": ["!other:test"]}, {})
    await CommandDescriptions(config, lambda: cast(IntentAPI, homeserver)).publish(ROOM)
    assert homeserver.puts == []
