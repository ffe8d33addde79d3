"""Issue 6, point 4 (second half): random transaction bodies pushed to the appservice
listener over real HTTP, as Synapse would push them: random event shapes, unicode, huge
bodies, missing fields, wrong types. Never a server error, and never a reply to anything
that is not a command."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from route_sidecar.app import Sidecar, start_sidecar
from route_sidecar.core.commands import parse_command

from .api_support import ROOM, sidecar_config

NOW_MS = int(time.time() * 1000)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False),
    st.text(max_size=40),
)
BODIES = st.one_of(
    st.sampled_from(["!route cloud", "/route status", "!route", "/ROUTE help", "hello"]),
    st.text(max_size=200),
    st.builds(lambda s: "!route " + s, st.text(max_size=60)),
    st.builds(lambda n: "x" * n, st.integers(min_value=60_000, max_value=200_000)),
    SCALARS,
)
CONTENT = st.one_of(
    st.fixed_dictionaries(
        {"msgtype": st.sampled_from(["m.text", "m.notice", "m.emote", 7]), "body": BODIES},
        optional={"m.relates_to": st.dictionaries(st.text(max_size=12), SCALARS, max_size=3)},
    ),
    st.dictionaries(st.text(max_size=12), SCALARS, max_size=4),
    SCALARS,
)
EVENTS = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(
                ["m.room.message", "m.room.member", "m.room.redaction", "m.room.encrypted"]
            ),
            "room_id": st.one_of(st.just(ROOM), st.text(max_size=20), SCALARS),
            "sender": st.one_of(st.just("@alice:example.org"), st.text(max_size=20), SCALARS),
            "event_id": st.one_of(st.builds(lambda n: f"$fuzz{n}", st.integers(0, 10**9)), SCALARS),
            "origin_server_ts": st.one_of(st.just(NOW_MS), SCALARS),
            "content": CONTENT,
        },
        optional={"state_key": SCALARS, "redacts": SCALARS},
    ),
    st.dictionaries(st.text(max_size=10), SCALARS, max_size=5),
    SCALARS,
)


class Running:
    """The side-car in-process on its own loop and thread; tests push to it over HTTP."""

    def __init__(self, tmp_path: Path) -> None:
        self.config = sidecar_config(tmp_path)
        self.loop = asyncio.new_event_loop()
        self.sidecar: Sidecar | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sidecar = asyncio.run_coroutine_threadsafe(
            start_sidecar(self.config), self.loop
        ).result(30)
        self.url = (
            f"http://127.0.0.1:{self.config.appservice.listen.port}/_matrix/app/v1/transactions"
        )
        self.headers = {"Authorization": f"Bearer {self.config.appservice.hs_token}"}

    def close(self) -> None:
        assert self.sidecar is not None
        asyncio.run_coroutine_threadsafe(self.sidecar.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def replies(self) -> set[str]:
        db = sqlite3.connect(f"file:{self.config.database_path}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT key FROM effects WHERE key LIKE 'reply:%'").fetchall()
        finally:
            db.close()
        return {key.removeprefix("reply:") for (key,) in rows}


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    side = Running(tmp_path_factory.mktemp("txn-fuzz"))
    yield side
    side.close()


COUNTER = iter(range(10**9))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(events=st.lists(EVENTS, max_size=8))
@example(
    events=[
        {
            "type": "m.room.message",
            "room_id": ROOM,
            "sender": "@alice:example.org",
            "event_id": "$fuzz-known-command",
            "origin_server_ts": NOW_MS,
            "content": {"msgtype": "m.text", "body": "!route cloud"},
        }
    ]
)
def test_random_transactions_never_fail_and_only_commands_get_replies(
    running: Running, events: list[Any]
) -> None:
    response = httpx.put(
        f"{running.url}/fuzz-{next(COUNTER)}",
        content=json.dumps(events and {"events": events}).encode(),
        headers=running.headers | {"Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code in (200, 400), response.text
    commands = {
        e["event_id"]
        for e in events
        if isinstance(e, dict)
        and isinstance(e.get("event_id"), str)
        and isinstance(e.get("content"), dict)
        and isinstance(e["content"].get("body"), str)
        and parse_command(e["content"]["body"]) is not None
    }
    answered = {event_id for event_id in running.replies() if event_id.startswith("$fuzz")}
    assert answered <= commands | PREVIOUS_COMMANDS, answered - commands
    PREVIOUS_COMMANDS.update(commands)


PREVIOUS_COMMANDS: set[str] = set()


def test_the_commands_among_them_were_answered(running: Running) -> None:
    # The control: the listener did handle commands (the check above is not vacuous).
    assert "$fuzz-known-command" in running.replies()


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[]", b'{"events": {}}', b'{"events": "x"}', b"\xff\xfe", b"null"],
)
def test_a_transaction_body_that_is_not_a_list_of_events_is_400(
    running: Running, body: bytes
) -> None:
    response = httpx.put(
        f"{running.url}/broken-{next(COUNTER)}",
        content=body,
        headers=running.headers | {"Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["errcode"] in ("M_NOT_JSON", "M_BAD_JSON")
