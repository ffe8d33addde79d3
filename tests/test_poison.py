"""Issue 14, poison events: an event whose handling always fails is tried
MAX_EVENT_ATTEMPTS times (the homeserver resends its transaction after each 500), then
given up: a command gets a reply with a reference, the log names room, event and
reference, and the transaction is acknowledged, so the rooms after it go on. Nothing is
ever applied twice. The failure comes from a fail point (route_sidecar/faults.py)."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from route_sidecar import faults
from route_sidecar.app import start_sidecar
from route_sidecar.appservice import MAX_EVENT_ATTEMPTS

from .api_support import live_command, sidecar_config

ROOM_A = "!poisoned:example.org"
ROOM_B = "!healthy:example.org"
MARKER = "POISON-7f3a"


def message(event_id: str, room_id: str, body: str) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "room_id": room_id,
        "sender": "@alice:example.org",
        "event_id": event_id,
        "origin_server_ts": int(time.time() * 1000) - 1000,
        "content": {"msgtype": "m.text", "body": body},
    }


def rows(db_path: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return list(db.execute(sql))
    finally:
        db.close()


async def put(client: httpx.AsyncClient, txn: str, events: list[dict[str, Any]]) -> int:
    response = await client.put(f"/_matrix/app/v1/transactions/{txn}", json={"events": events})
    return response.status_code


@pytest.mark.parametrize("point", faults.FAIL_POINTS)
async def test_a_poison_event_is_given_up_and_the_rooms_after_it_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, point: str
) -> None:
    monkeypatch.setattr(faults, "FAIL_TARGET", (point, MARKER))
    caplog.set_level(logging.INFO)
    config = sidecar_config(tmp_path)
    sidecar = await start_sidecar(config)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{config.appservice.listen.port}",
            headers={"Authorization": f"Bearer {config.appservice.hs_token}"},
        ) as client:
            events = [
                message("$before", ROOM_A, "just chatting"),
                message("$poison", ROOM_A, f"!route cloud {MARKER}"),
                message("$plain", ROOM_A, f"plain words {MARKER}"),
                message("$after", ROOM_B, "!route local"),
            ]
            # The homeserver resends the same transaction until it is acknowledged: each
            # poison event fails MAX_EVENT_ATTEMPTS times, the last time it is given up.
            answers = [await put(client, "t1", events) for _ in range(2 * MAX_EVENT_ATTEMPTS)]
            assert answers == [500] * (2 * MAX_EVENT_ATTEMPTS - 2) + [200, 200]
            # The room after it was handled, once; later transactions are handled as usual.
            assert live_command(sidecar, ROOM_B) == "$after"
            assert await put(client, "t2", [message("$next", ROOM_A, "!route local")]) == 200
            assert live_command(sidecar, ROOM_A) == "$next"
            assert await put(client, "t1", events) == 200  # a late resend: nothing again
    finally:
        await sidecar.stop()
    db = config.database_path
    failures = rows(db, "SELECT event_key, room_id, attempts, reference FROM event_failures")
    assert {(key, room, n) for key, room, n, _ in failures} == {
        ("$poison", ROOM_A, MAX_EVENT_ATTEMPTS),
        ("$plain", ROOM_A, MAX_EVENT_ATTEMPTS),
    }
    reference = dict((key, ref) for key, _, _, ref in failures)["$poison"]
    commands = [event for (event,) in rows(db, "SELECT event_id FROM commands ORDER BY rowid")]
    seen = [event for (event,) in rows(db, "SELECT event_id FROM seen_messages ORDER BY rowid")]
    replies = {
        key: json.loads(content)["body"]
        for key, content in rows(db, "SELECT key, content FROM effects WHERE key LIKE 'reply:%'")
    }
    assert sorted(replies) == ["reply:$after", "reply:$next", "reply:$poison"]  # one each
    assert len(seen) == len(set(seen))  # never applied twice
    assert commands.count("$after") == 1 and commands.count("$next") == 1
    if point == "event-received":  # it never reached the service: the reply says so
        assert "$poison" not in commands and "$plain" not in seen
        assert "Failed to handle command" in replies["reply:$poison"]
        assert f"reference: {reference}" in replies["reply:$poison"]
    else:  # it was applied, once, and had its own answer before the failure
        assert commands.count("$poison") == 1 and "$plain" in seen
        assert "Failed to handle command" not in replies["reply:$poison"]
    given_up = [r for r in caplog.records if r.getMessage().startswith("event given up")]
    assert [r.levelno for r in given_up] == [logging.ERROR] * 2
    assert f"room={ROOM_A} event=$poison" in given_up[0].getMessage()
    assert f"reference={reference}" in given_up[0].getMessage()


async def test_a_given_up_event_stays_given_up_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given up, then a crash before the acknowledgement: the resent transaction does not
    try it again (it might now succeed, after its 'failed' reply)."""
    monkeypatch.setattr(faults, "FAIL_TARGET", ("event-received", MARKER))
    config = sidecar_config(tmp_path)
    events = [message("$poison", ROOM_A, f"!route cloud {MARKER}")]
    headers = {"Authorization": f"Bearer {config.appservice.hs_token}"}
    base = f"http://127.0.0.1:{config.appservice.listen.port}"
    sidecar = await start_sidecar(config)
    try:
        async with httpx.AsyncClient(base_url=base, headers=headers) as client:
            for _ in range(MAX_EVENT_ATTEMPTS):
                await put(client, "t1", events)
    finally:
        await sidecar.stop()
    db = sqlite3.connect(config.database_path)
    db.execute("DELETE FROM transactions")  # as if the acknowledgement never happened
    db.commit()
    db.close()
    monkeypatch.setattr(faults, "FAIL_TARGET", None)  # it would succeed now
    sidecar = await start_sidecar(config)
    try:
        async with httpx.AsyncClient(base_url=base, headers=headers) as client:
            assert await put(client, "t1", events) == 200
        assert sidecar.service.live.current(ROOM_A) is None
    finally:
        await sidecar.stop()
    assert rows(config.database_path, "SELECT event_id FROM commands") == []
