"""Issue 14, poison events, through a real Synapse: a command whose handling always fails
(a fail point, route_sidecar/faults.py) is answered 500 until Synapse has sent its transaction
MAX_EVENT_ATTEMPTS times; then the bot replies with a reference, the log names the room,
the event and the reference, and the commands queued behind it in other rooms are
answered."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator

import pytest

from route_sidecar.appservice import MAX_EVENT_ATTEMPTS

from .conftest import open_room
from .harness import LookupClient, MatrixUser, Sidecar, failing_on

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]
MARKER = f"POISON-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def poisoned_sidecar(sidecar: Sidecar) -> Iterator[Sidecar]:
    """The side-car restarted with a fail point on messages holding MARKER, then
    restarted without it."""
    with failing_on(sidecar, MARKER) as poisoned:
        yield poisoned


async def test_a_command_that_always_fails_gets_a_reference_and_other_rooms_go_on(
    users: dict[str, MatrixUser], lookup: LookupClient, poisoned_sidecar: Sidecar
) -> None:
    alice = users["alice"]
    poisoned, other = await open_room(users), await open_room(users)
    poison = await alice.say(poisoned, f"!route cloud {MARKER}")
    behind = await alice.say(other, "!route local")  # queued behind the failing transaction
    reply = await alice.wait_reply(poisoned, poison, timeout=90)
    body = reply["content"]["body"]
    assert "Failed to handle command" in body and "(reference: " in body, body
    reference = body.split("(reference: ", 1)[1].split(")", 1)[0]
    await alice.wait_reply(other, behind, timeout=30)
    assert (await lookup.live_intent(other))["target"] == "local"
    assert await lookup.room_intent(poisoned) is None  # never applied
    with sqlite3.connect(f"file:{poisoned_sidecar.db_path}?mode=ro", uri=True) as db:
        attempts = db.execute(
            "SELECT attempts, reference FROM event_failures WHERE event_key = ?", (poison,)
        ).fetchone()
    assert attempts == (MAX_EVENT_ATTEMPTS, reference)
    log = poisoned_sidecar.log_path.read_text(errors="replace")
    assert f"event given up room={poisoned} event={poison}" in log
    assert f"reference={reference}" in log
    # The room itself goes on too.
    later = await alice.say(poisoned, "!route local")
    await alice.wait_reply(poisoned, later, timeout=30)
    assert (await lookup.live_intent(poisoned))["target"] == "local"
    assert len(await alice.bot_replies(poisoned, poison)) == 1
