"""SPEC "The appservice side" and the durability rules of "Intents": redelivered
transactions, restarts and crashes, stale commands, expiry, the rate limit."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
import uuid
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from .harness import LookupClient, MatrixUser, Sidecar, edits_of, hermes_request

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


async def claim_for(lookup: LookupClient, room: str, event_id: str, text: str) -> dict[str, Any]:
    return await lookup.claim(request=hermes_request(room, event_id, f"[alice] {text}"))


def db_count(sidecar: Sidecar, sql: str, *params: object) -> int:
    with sqlite3.connect(f"file:{sidecar.db_path}?mode=ro", uri=True) as db:
        return int(db.execute(sql, params).fetchone()[0])


async def push_transaction(
    sidecar: Sidecar, txn_id: str, events: list[dict[str, Any]], token: str | None = None
) -> httpx.Response:
    """What Synapse does: PUT the transaction with the hs_token."""
    token = sidecar.tokens["hs_token"] if token is None else token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient() as client:
        return await client.put(
            f"{sidecar.as_url}/_matrix/app/v1/transactions/{quote(txn_id)}",
            json={"events": events},
            headers=headers,
        )


async def fetch_event(user: MatrixUser, room: str, event_id: str) -> dict[str, Any]:
    event = await user.request("GET", f"/rooms/{quote(room)}/event/{quote(event_id)}")
    event.setdefault("room_id", room)
    fetched: dict[str, Any] = event
    return fetched


async def forged_command(user: MatrixUser, room: str, body: str, label: str) -> dict[str, Any]:
    """A real event of the room (the bot answers it first), copied with a new event id and
    a new body: what the test pushes itself, as Synapse would."""
    marker = await user.say(room, "!route status")
    await user.wait_reply(room, marker)
    event = await fetch_event(user, room, marker)
    event["event_id"] = f"${label}-{uuid.uuid4().hex}"
    event["content"] = {"msgtype": "m.text", "body": body}
    return event


async def test_a_transaction_delivered_twice_creates_one_intent_and_one_reply(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient, sidecar: Sidecar
) -> None:
    alice = users["alice"]
    command = await alice.say(room, "!route cloud")
    await alice.wait_reply(room, command)
    intent_id = (await lookup.live_intent(room))["id"]
    event = await fetch_event(alice, room, command)
    txn = f"replay-{uuid.uuid4().hex}"
    for txn_id in (txn, txn, f"{txn}-other"):  # the same transaction, then the same event
        response = await push_transaction(sidecar, txn_id, [event])
        assert response.status_code == 200 and response.json() == {}
    await asyncio.sleep(1.0)
    assert (await lookup.live_intent(room))["id"] == intent_id
    assert (
        db_count(sidecar, "SELECT COUNT(*) FROM intents WHERE command_event_id = ?", command) == 1
    )
    assert len(await alice.bot_replies(room, command)) == 1


async def test_transactions_need_the_hs_token_and_a_refused_one_changes_nothing(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient, sidecar: Sidecar
) -> None:
    event = await forged_command(users["alice"], room, "!route cloud", "forged")
    missing = await push_transaction(sidecar, "forged-1", [event], token="")
    wrong = await push_transaction(sidecar, "forged-2", [event], token="not-the-hs-token")
    assert missing.status_code == 401 and missing.json()["errcode"] == "M_UNAUTHORIZED"
    assert wrong.status_code == 403 and wrong.json()["errcode"] == "M_FORBIDDEN"
    assert await lookup.room_intent(room) is None
    assert (
        db_count(sidecar, "SELECT COUNT(*) FROM transactions WHERE txn_id LIKE '%:forged-%'") == 0
    )


async def test_a_broken_transaction_body_is_refused_without_a_server_error(
    sidecar: Sidecar,
) -> None:
    async with httpx.AsyncClient() as client:
        url = f"{sidecar.as_url}/_matrix/app/v1/transactions/broken-1"
        headers = {"Authorization": f"Bearer {sidecar.tokens['hs_token']}"}
        not_json = await client.put(url, content=b"{nope", headers=headers)
        no_events = await client.put(url, json={"events": "x"}, headers=headers)
        odd_events = await client.put(
            url, json={"events": [1, None, {"type": 3}, []]}, headers=headers
        )
    assert not_json.status_code == 400 and no_events.status_code == 400
    assert odd_events.status_code == 200  # shapes it cannot use are skipped, not fatal


async def test_restart_between_route_and_claim_still_applies_the_override_exactly_once(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient, sidecar: Sidecar
) -> None:
    alice = users["alice"]
    command = await alice.say(room, "!route cloud")
    await alice.wait_reply(room, command)
    sidecar.restart(signal.SIGKILL)  # a crash, not a clean stop
    question = await alice.say(room, "after the crash")
    assert (await claim_for(lookup, room, question, "after the crash"))["override"] is True
    sidecar.restart(signal.SIGTERM)
    # The bound turn keeps its override across the restart; no other turn ever gets it.
    assert (await claim_for(lookup, room, question, "after the crash"))["override"] is True
    other = await alice.say(room, "another turn")
    assert (await claim_for(lookup, room, other, "another turn"))["override"] is False
    sidecar.restart(signal.SIGKILL)
    assert (await claim_for(lookup, room, other, "another turn"))["override"] is False


async def test_a_command_sent_while_the_side_car_is_down_is_answered_when_it_returns(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient, sidecar: Sidecar
) -> None:
    alice = users["alice"]
    sidecar.stop(signal.SIGKILL)
    try:
        command = await alice.say(room, "!route cloud")
    finally:
        sidecar.start()
    # Synapse retries the transaction (with back-off); the command is not lost.
    reply = await alice.wait_reply(room, command, timeout=60)
    assert "cloud" in reply["content"]["body"]
    assert (await lookup.live_intent(room))["state"] == "pending"


async def test_commands_older_than_the_intent_ttl_on_arrival_are_ignored(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient, sidecar: Sidecar
) -> None:
    alice = users["alice"]
    old = await forged_command(alice, room, "!route cloud", "stale")
    old["origin_server_ts"] = int((time.time() - 20 * 60) * 1000)  # TTL is 15 min
    response = await push_transaction(sidecar, f"stale-{uuid.uuid4().hex}", [old])
    assert response.status_code == 200
    await asyncio.sleep(0.5)
    assert await lookup.room_intent(room) is None
    assert await alice.bot_replies(room, old["event_id"]) == []


@pytest.fixture
def short_timers(sidecar: Sidecar):  # type: ignore[no-untyped-def]
    """The side-car restarted with short timers and a low rate limit, then restored."""
    original = sidecar.config
    changed = {
        **original,
        # Short, but not so short that a loaded CI machine misses the window.
        "routing": {"intent_ttl": "6s", "turn_idle": "2s"},
    }
    sidecar.stop()
    sidecar.write_config(changed)
    sidecar.start()
    yield sidecar
    sidecar.stop()
    sidecar.write_config(original)
    sidecar.start()


async def test_an_unused_intent_expires_and_its_confirmation_is_edited_to_say_so(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient, short_timers: Sidecar
) -> None:
    bob = users["bob"]
    command = await bob.say(room, "!route cloud")
    reply = await bob.wait_reply(room, command)
    edit = await bob.wait_for(
        room, lambda e: bool(edits_of([e], reply["event_id"])), timeout=20, what="the expiry edit"
    )
    assert "expired unused" in edit["content"]["m.new_content"]["body"]
    assert await lookup.room_intent(room) is None
    question = await bob.say(room, "too late")
    assert (await claim_for(lookup, room, question, "too late"))["override"] is False


async def test_a_bound_turn_ends_after_turn_idle_without_a_claim(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient, short_timers: Sidecar
) -> None:
    carol = users["carol"]
    command = await carol.say(room, "!route cloud")
    await carol.wait_reply(room, command)
    question = await carol.say(room, "slow turn")
    assert (await claim_for(lookup, room, question, "slow turn"))["override"] is True
    await asyncio.sleep(2.5)
    assert (await claim_for(lookup, room, question, "slow turn"))["override"] is False


@pytest.fixture
def low_rate_limit(sidecar: Sidecar):  # type: ignore[no-untyped-def]
    """The side-car restarted with a limit two routes above what bob set this hour (earlier
    tests, the crash loop among them, route as bob too), then restored."""
    original = sidecar.config
    hour_ago = int((time.time() - 3600) * 1000)
    recent = db_count(
        sidecar,
        "SELECT count(*) FROM intents WHERE sender = ? AND created_at > ?",
        "@bob:localhost",
        hour_ago,
    )
    sidecar.stop()
    sidecar.write_config({**original, "limits": {"routes_per_hour": recent + 2}})
    sidecar.start()
    yield sidecar
    sidecar.stop()
    sidecar.write_config(original)
    sidecar.start()


async def test_the_per_user_rate_limit_holds_across_a_restart(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient, low_rate_limit: Sidecar
) -> None:
    bob = users["bob"]
    bodies = []
    for _ in range(3):  # two more routes reach the limit; the third is refused
        command = await bob.say(room, "!route local")
        bodies.append((await bob.wait_reply(room, command))["content"]["body"])
    assert ["limit" in body for body in bodies] == [False, False, True]
    low_rate_limit.restart()
    command = await bob.say(room, "!route local")
    assert "limit" in (await bob.wait_reply(room, command))["content"]["body"]


async def test_neither_the_log_nor_the_database_holds_a_token_or_message_text(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient, sidecar: Sidecar
) -> None:
    alice = users["alice"]
    secret_text = "my secret question about payroll 93c1"
    command = await alice.say(room, f"!route cloud\n{secret_text}")
    await alice.wait_reply(room, command)
    claim = await lookup.claim(request=hermes_request(room, command, f"[alice] {secret_text}"))
    assert claim["override"] is True
    await alice.say(room, secret_text + " (plain)")
    await asyncio.sleep(0.5)
    log = sidecar.log_path.read_text(errors="replace")
    assert "command handled" in log and "turn bound" in log  # the log is really written
    for secret in (
        sidecar.tokens["as_token"],
        sidecar.tokens["hs_token"],
        *sidecar.config["api"]["tokens"],
        "payroll",
    ):
        assert secret not in log
    with sqlite3.connect(f"file:{sidecar.db_path}?mode=ro", uri=True) as db:
        dump = "\n".join(db.iterdump())
    assert "CREATE TABLE intents" in dump and "payroll" not in dump


async def test_commands_queued_while_down_apply_in_order_the_later_one_wins(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient, sidecar: Sidecar
) -> None:
    alice, bob = users["alice"], users["bob"]
    sidecar.stop(signal.SIGKILL)
    try:  # Synapse queues both and retries: they arrive in the homeserver's order
        first = await alice.say(room, "!route cloud")
        second = await bob.say(room, "!route local")
    finally:
        sidecar.start()
    await alice.wait_reply(room, first, timeout=60)
    await alice.wait_reply(room, second, timeout=60)
    intent = await lookup.room_intent(room)
    assert intent is not None
    assert (intent["target"], intent["command_event_id"]) == ("local", second)

    first_reply = await alice.wait_reply(room, first)

    def superseded(event: dict[str, Any]) -> bool:
        return any(
            "replaced by a newer route" in e["content"]["m.new_content"]["body"]
            for e in edits_of([event], first_reply["event_id"])
        )

    await alice.wait_for(room, superseded, timeout=20, what="the first route marked superseded")


def bot_membership(event: dict[str, Any], membership: str) -> bool:
    return (
        event.get("type") == "m.room.member"
        and event.get("state_key") == "@route:localhost"
        and event["content"].get("membership") == membership
    )


@pytest.fixture
def allow_list(sidecar: Sidecar):  # type: ignore[no-untyped-def]
    """The side-car restarted with an allow-list that does not hold the test's room."""
    original = sidecar.config
    sidecar.stop()
    sidecar.write_config({**original, "rooms": ["!only-this-room:localhost"]})
    sidecar.start()
    yield sidecar
    sidecar.stop()
    sidecar.write_config(original)
    sidecar.start()


async def test_with_an_allow_list_the_bot_leaves_rooms_not_on_it(
    users: dict[str, MatrixUser], room: str, allow_list: Sidecar
) -> None:
    alice = users["alice"]
    left = await alice.wait_for(
        room,
        lambda e: bot_membership(e, "leave"),
        timeout=20,
        what="the bot to leave the room off the allow-list",
    )
    assert "allow-list" in left["content"].get("reason", "")
    # And an invite to a room off the list is declined.
    other = await alice.create_room(invite=["@route:localhost"])
    declined = await alice.wait_for(
        other,
        lambda e: bot_membership(e, "leave"),
        timeout=20,
        what="the invite to be declined",
    )
    assert declined["sender"] == "@route:localhost"


async def test_a_command_that_synapse_retries_after_the_ttl_is_not_applied(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient, short_timers: Sidecar
) -> None:
    alice = users["alice"]
    short_timers.stop(signal.SIGKILL)
    try:
        stale = await alice.say(room, "!route cloud")
        await asyncio.sleep(7)  # down for longer than the 6 s intent TTL
    finally:
        short_timers.start()
    # Synapse retries the queued transaction (with back-off): the command arrives, is seen
    # (its hash is stored, as for every message), and is not applied.
    seen = "SELECT count(*) FROM seen_messages WHERE event_id = ?"
    for _ in range(600):
        if db_count(short_timers, seen, stale):
            break
        await asyncio.sleep(0.1)
    assert db_count(short_timers, seen, stale) == 1, "Synapse did not redeliver the command"
    await asyncio.sleep(1)
    assert await lookup.room_intent(room) is None
    assert await alice.bot_replies(room, stale) == []
    assert db_count(short_timers, "SELECT count(*) FROM commands WHERE event_id = ?", stale) == 0


async def test_route_leave_is_for_room_admins_and_cancels_the_route_before_leaving(
    users: dict[str, MatrixUser], room: str, lookup: LookupClient
) -> None:
    """SPEC "The appservice side": the bot leaves when a room admin asks. alice created
    the room (power level 100), bob is a member (0); kicking takes 50."""
    alice, bob = users["alice"], users["bob"]
    route = await alice.say(room, "!route cloud --for 1h")
    await alice.wait_reply(room, route)
    refused = await bob.say(room, "!route leave")
    reply = await bob.wait_reply(room, refused)
    assert "Only a room admin" in reply["content"]["body"]
    assert "power level 50" in reply["content"]["body"]
    assert (await alice.members(room))["@route:localhost"] == "join"
    probe = await alice.say(room, "still routed?")
    answer = await claim_for(lookup, room, probe, "still routed?")
    assert answer["override"] is True, "a refused leave changed the room's route"

    asked = await alice.say(room, "!route leave")
    reply = await alice.wait_reply(room, asked)
    assert "Leaving this room" in reply["content"]["body"]
    assert "The route to cloud is cancelled" in reply["content"]["body"]
    left = await alice.wait_for(
        room, lambda e: bot_membership(e, "leave"), timeout=20, what="the bot to leave"
    )
    assert "route leave" in left["content"].get("reason", "")
    assert left["origin_server_ts"] >= reply["origin_server_ts"], "left before replying"
    # The route ended with the bot's presence: no override for the room's next turn.
    after = await alice.say(room, "and now?")
    answer = await claim_for(lookup, room, after, "and now?")
    assert answer["override"] is False
