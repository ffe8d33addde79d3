"""Appservice ingest (figure 5): transactions pushed to the side-car's appservice listener
as Synapse pushes them (`PUT /_matrix/app/v1/transactions/{txn}` with the hs_token),
timed from the request to its 200.

- 1,000 plain messages (10 rooms, 50 senders): the time to 200, median of several.
- 100 `!route cloud` commands, each from another user in another room (so each records
  an intent and none supersedes another): the time to 200, and right after each 200 the
  side-car's SQLite database is read (another connection, read-only) for the 100 intents,
  the 100 handled commands and the 100 replies the bot owes (the outbox). With no
  homeserver the bot never registers, so the outbox sends nothing during the measure.
"""

from __future__ import annotations

import http.client
import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import AT_LEAST, AT_MOST, Row, Target, median
from .servers import Server

PLAIN_EVENTS = 1000
COMMAND_EVENTS = 100


def message_event(
    room_id: str, sender: str, event_id: str, body: str, age_ms: int = 0
) -> dict[str, Any]:
    """An `m.room.message` as the homeserver pushes it."""
    return {
        "type": "m.room.message",
        "room_id": room_id,
        "sender": sender,
        "event_id": event_id,
        "origin_server_ts": int(time.time() * 1000) - age_ms,
        "content": {"msgtype": "m.text", "body": body},
    }


def put_transaction(server: Server, txn_id: str, events: Sequence[dict[str, Any]]) -> float:
    """Push one transaction; the seconds from sending it to its 200 (raises otherwise)."""
    assert server.config is not None, "a side-car"
    body = json.dumps({"events": list(events)}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", server.config.as_port, timeout=60)
    try:
        connection.connect()
        started = time.perf_counter()
        connection.request(
            "PUT",
            f"/_matrix/app/v1/transactions/{txn_id}",
            body=body,
            headers={
                "Authorization": f"Bearer {server.config.hs_token}",
                "Content-Type": "application/json",
            },
        )
        response = connection.getresponse()
        answer = response.read()
        elapsed = time.perf_counter() - started
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"transaction {txn_id}: {response.status} {answer[:200]!r}")
    return elapsed


def plain_messages(tag: str) -> list[dict[str, Any]]:
    return [
        message_event(
            f"!ingest-{i % 10}:bench",
            f"@user{i % 50}:bench",
            f"${tag}-{i}",
            f"message {i}: why did the deploy of build {i * 7} fail on host {i % 13}?",
        )
        for i in range(PLAIN_EVENTS)
    ]


def commands(tag: str) -> list[dict[str, Any]]:
    return [
        message_event(f"!{tag}-{i}:bench", f"@user{i}:bench", f"${tag}-{i}", "!route cloud")
        for i in range(COMMAND_EVENTS)
    ]


def durable_counts(database: Path, event_ids: Sequence[str]) -> dict[str, int]:
    """What is committed for these command events, read by a connection of our own."""
    marks = ",".join("?" * len(event_ids))
    replies = [f"reply:{e}" for e in event_ids]
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        return {
            "intents": db.execute(
                f"SELECT COUNT(*) FROM intents WHERE state = 'pending' "
                f"AND command_event_id IN ({marks})",
                event_ids,
            ).fetchone()[0],
            "commands": db.execute(
                f"SELECT COUNT(*) FROM commands WHERE event_id IN ({marks})", event_ids
            ).fetchone()[0],
            "replies": db.execute(
                f"SELECT COUNT(*) FROM effects WHERE key IN ({marks})", replies
            ).fetchone()[0],
        }


def ingest_figures(server: Server, repeats: int) -> tuple[list[Row], dict[str, Any]]:
    assert server.config is not None
    run = f"{time.time_ns():x}"
    put_transaction(server, f"warm-plain-{run}", plain_messages(f"warm-p{run}"))
    put_transaction(server, f"warm-cmd-{run}", commands(f"warm-c{run}"))
    plain_ms, command_ms, found = [], [], []
    for r in range(repeats):  # alternating: a plain transaction, then a command one
        plain_ms.append(
            1000 * put_transaction(server, f"p-{run}-{r}", plain_messages(f"p{run}{r}"))
        )
        events = commands(f"c{run}{r}")
        command_ms.append(1000 * put_transaction(server, f"c-{run}-{r}", events))
        found.append(durable_counts(server.config.database, [e["event_id"] for e in events]))
    complete = [min(f.values()) for f in found]
    rows = [
        Row(
            f"5a ingest: {PLAIN_EVENTS:,} plain messages, PUT → 200",
            median(plain_ms),
            "ms",
            target=Target(AT_MOST, 100, on="value"),
            note=f"median of {repeats}; each: {', '.join(f'{x:.0f}' for x in plain_ms)} ms",
        ),
        Row(
            f"5b ingest: {COMMAND_EVENTS} !route commands, PUT → 200",
            median(command_ms),
            "ms",
            note=(
                f"median of {repeats}; each: {', '.join(f'{x:.0f}' for x in command_ms)} ms; "
                "100 users in 100 rooms; no homeserver, so the outbox sends nothing meanwhile"
            ),
        ),
        Row(
            "5c ingest: commands committed when the 200 arrives",
            min(complete),
            f"of {COMMAND_EVENTS}",
            target=Target(AT_LEAST, COMMAND_EVENTS, on="value"),
            note=(
                "fewest, over the repeats, of intents (pending), handled commands and queued "
                "replies found in SQLite by a read-only connection right after each 200"
            ),
        ),
    ]
    return rows, {"plain_ms": plain_ms, "command_ms": command_ms, "durable": found}
