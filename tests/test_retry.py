"""SPEC "Retry": `/route <target> again`, `POST /v1/outcome`, the failure suggestion and
`/route history`, on the real side-car over HTTP (every response checked against
route_sidecar/openapi.json). The room side is the appservice's path into the service; the bot's
replies are read from the outbox, since no homeserver runs here (tests/e2e does that)."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from route_sidecar.core.commands import RouteTo, parse_command
from tests.api_support import (
    AGENT,
    ALICE,
    AUTH,
    ROOM,
    Api,
    OpenApi,
    outcome_path,
    room_path,
    start_api,
    stop_api,
)

QUESTION = "Why did the deploy of build 4711 fail?"
LOCAL = "glm-4.7-flash:q4_K_M"
CLOUD = "ollama-cloud/glm-5.1"
BOB = "@bob:example.org"


def hermes_request(thread: str, question: str, room_id: str = ROOM) -> dict[str, Any]:
    """A chat-completions body as the Hermes gateway sends it for a turn in a thread."""
    system = f"You are Hermes.\n**Matrix Room ID:** {room_id}\n**Matrix Thread:** {thread}\n"
    return {
        "model": LOCAL,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": f"[Alice] {question}"},
        ],
    }


def effects(api: Api, prefix: str) -> list[dict[str, Any]]:
    db = sqlite3.connect(f"file:{api.db_path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute(
            "SELECT * FROM effects WHERE substr(key, 1, ?) = ? ORDER BY id", (len(prefix), prefix)
        ).fetchall()
    finally:
        db.close()
    return [dict(row) | {"content": json.loads(row["content"])} for row in rows]


def reply_to(api: Api, event_id: str) -> str:
    """The stored reply to a command (what survives a restart)."""
    (row,) = effects(api, f"reply:{event_id}")
    return str(row["content"]["body"])


async def live_intent(api: Api) -> dict[str, Any] | None:
    response = await api.client.get(room_path(ROOM), headers=AUTH)
    return response.json() if response.status_code == 200 else None


async def claim(api: Api, thread: str, question: str) -> dict[str, Any]:
    response = await api.claim({"request": hermes_request(thread, question)})
    assert response.status_code == 200
    answer: dict[str, Any] = response.json()
    return answer


async def report(api: Api, thread: str, question: str, status: str, model: str = LOCAL) -> None:
    body = {
        "request": hermes_request(thread, question),
        "model": model,
        "status": status,
        "latency_ms": 120,
        "detail": "upstream answered 500" if status == "error" else None,
    }
    response = await api.client.post("/v1/outcome", json=body, headers=AUTH)
    assert response.status_code == 204, response.text


# ---- again ------------------------------------------------------------------------------


async def test_again_records_a_one_shot_intent_prebound_to_the_command(api: Api) -> None:
    await api.say(ROOM, QUESTION, event_id="$question", ago=30)
    command = await api.say(ROOM, "!route cloud again", event_id="$again", ago=1)
    intent = await live_intent(api)
    assert intent is not None
    assert (intent["target"], intent["command_event_id"], intent["prebound"]) == (
        "cloud",
        command,
        True,
    )
    assert (intent["scope"]["kind"], intent["state"]) == ("once", "pending")


async def test_the_re_asked_turn_and_only_it_goes_to_the_target(api: Api) -> None:
    await api.say(ROOM, QUESTION, event_id="$question", ago=30)
    await api.say(ROOM, "/route cloud retry", event_id="$again", ago=1)
    # The first turn of the question (a late tool round) is not the re-asked one.
    first = await claim(api, "$question", QUESTION)
    assert (first["override"], first["reason"]) == (False, "earlier_turn")
    # The agent plugin rewrote the command to the question: a new turn in its own thread.
    answers = [await claim(api, "$again", QUESTION) for _ in range(3)]
    assert [a["override"] for a in answers] == [True, True, True], [a["reason"] for a in answers]
    assert {a["model"] for a in answers} == {CLOUD}
    assert [a["reason"] for a in answers] == ["bound", "continued", "continued"]
    later = await api.say(ROOM, "and what now?", event_id="$later", ago=0)
    after = await claim(api, later, "and what now?")
    assert (after["override"], after["reason"]) == (False, "other_turn")


async def test_again_re_asks_the_last_question_not_an_older_one(api: Api) -> None:
    await api.say(ROOM, "an older question", event_id="$older", ago=40)
    await api.say(ROOM, QUESTION, event_id="$question", ago=30, sender=BOB)
    await api.say(ROOM, "!route status", ago=20)  # a command is not a question
    await api.say(ROOM, "here is my answer", sender=AGENT, ago=10)  # nor is the agent's
    await api.say(ROOM, "!route cloud again", event_id="$again", ago=1)
    quoted = api.sidecar.service.outbox.unstored["reply:$again"]["body"]
    assert QUESTION in quoted and BOB in quoted
    assert "older" not in quoted
    # The older question's text does not bind the intent; the re-asked one does.
    assert (await claim(api, "$again", "an older question"))["override"] is False
    assert (await claim(api, "$again", QUESTION))["override"] is True


async def test_the_multi_line_question_is_a_question_to_re_ask(api: Api) -> None:
    await api.say(ROOM, f"/route local\n{QUESTION}", event_id="$multi", ago=30)
    await api.say(ROOM, "!route cloud again", event_id="$again", ago=1)
    assert QUESTION in api.sidecar.service.outbox.unstored["reply:$again"]["body"]
    assert (await live_intent(api) or {})["target"] == "cloud"


@pytest.mark.parametrize(
    "before",
    [
        [],
        [("!route status", 30)],
        [(QUESTION, 16 * 60)],  # older than the intent TTL (15 min)
    ],
    ids=["no-question-yet", "only-commands", "question-too-old"],
)
async def test_again_with_nothing_to_re_ask_says_so_and_records_nothing(
    api: Api, before: list[tuple[str, float]]
) -> None:
    for text, ago in before:
        await api.say(ROOM, text, ago=ago)
    snapshot = await api.snapshot()
    command = await api.say(ROOM, "!route cloud again", ago=1)
    assert await live_intent(api) is None
    after = await api.snapshot()
    assert (after.intents, after.bound_turns) == (snapshot.intents, snapshot.bound_turns)
    assert "Nothing to re-ask" in reply_to(api, command)
    assert "Nothing was routed" in reply_to(api, command)


async def test_again_after_a_restart_has_nothing_to_re_ask(
    api: Api, tmp_path: Path, openapi: OpenApi
) -> None:
    await api.say(ROOM, QUESTION, ago=30)
    await stop_api(api)
    restarted = await start_api(tmp_path, openapi)
    try:
        command = await restarted.say(ROOM, "!route cloud again", ago=1)
        assert "Nothing to re-ask" in reply_to(restarted, command)
        assert await live_intent(restarted) is None
    finally:
        await stop_api(restarted)
        api.sidecar = restarted.sidecar  # the fixture's stop is then a no-op
        api.client = restarted.client


async def test_a_refused_again_records_nothing(api: Api) -> None:
    await api.say(ROOM, QUESTION, ago=30)
    command = await api.say(ROOM, "!route nowhere again", ago=1)
    assert await live_intent(api) is None
    assert "Unknown target" in reply_to(api, command)


async def test_the_question_text_is_never_written_to_the_database(api: Api) -> None:
    secret = "Is the password hunter2 still valid for the staging box?"
    await api.say(ROOM, secret, event_id="$secret", ago=30)
    await api.say(ROOM, "!route cloud again", event_id="$again", ago=1)
    await claim(api, "$again", secret)
    await report(api, "$again", secret, "error", model=CLOUD)
    await report(api, "$secret", secret, "error")
    await api.say(ROOM, "!route history", ago=0)
    assert secret in api.sidecar.service.outbox.unstored["reply:$again"]["body"]  # memory only
    await api.sidecar.service.flush()
    for path in api.db_path.parent.iterdir():
        if path.name.startswith(api.db_path.name):
            data = path.read_bytes()
            for needle in (secret, "hunter2", secret.lower()):
                assert needle.encode() not in data, f"{needle!r} found in {path.name}"


# ---- POST /v1/outcome and the failure suggestion ----------------------------------------


async def test_an_ok_call_without_an_override_stores_nothing(api: Api) -> None:
    await api.say(ROOM, QUESTION, event_id="$question", ago=5)
    before = await api.snapshot()
    await report(api, "$question", QUESTION, "ok")
    assert await api.snapshot() == before


async def test_a_failed_turn_gets_one_suggestion_in_its_thread(api: Api) -> None:
    await api.say(ROOM, QUESTION, event_id="$question", ago=5)
    started = datetime.now(UTC)
    for _ in range(3):  # the agent retries: still one suggestion
        await report(api, "$question", QUESTION, "error")
    (suggestion,) = effects(api, "suggest:")
    content = suggestion["content"]
    assert content["msgtype"] == "m.notice"
    relation = content["m.relates_to"]
    assert (relation["rel_type"], relation["event_id"]) == ("m.thread", "$question")
    assert relation["m.in_reply_to"]["event_id"] == "$question"
    # What failed, and the exact command for each other target (not the one that failed).
    assert LOCAL in content["body"] and "upstream answered 500" in content["body"]
    commands = [line.split("`")[1] for line in content["body"].splitlines() if "again`" in line]
    assert commands == ["!route cloud again"]
    assert parse_command(commands[0]) == RouteTo(target="cloud", again=True)
    # Held back until the turn has been quiet for routing.failure_grace (15 s).
    held = datetime.fromtimestamp(suggestion["not_before"] / 1000, UTC)
    assert started + timedelta(seconds=14) < held < datetime.now(UTC) + timedelta(seconds=16)
    rows = api.rows("outcomes")
    assert [(r["intent_id"], r["status"], r["model"], r["asker"]) for r in rows] == [
        (None, "error", LOCAL, ALICE)
    ] * 3


async def test_a_later_successful_call_withdraws_the_suggestion(api: Api) -> None:
    await api.say(ROOM, QUESTION, event_id="$question", ago=5)
    await report(api, "$question", QUESTION, "error")
    assert len(effects(api, "suggest:")) == 1
    await report(api, "$question", QUESTION, "ok")
    assert effects(api, "suggest:") == []
    assert [r["status"] for r in api.rows("outcomes")] == ["error", "ok"]


async def test_each_failed_turn_gets_its_own_suggestion(api: Api) -> None:
    await api.say(ROOM, QUESTION, event_id="$q1", ago=5)
    await api.say(ROOM, "second question", event_id="$q2", ago=4)
    await report(api, "$q1", QUESTION, "error")
    await report(api, "$q2", "second question", "error")
    threads = [e["content"]["m.relates_to"]["event_id"] for e in effects(api, "suggest:")]
    assert threads == ["$q1", "$q2"]


async def test_a_failed_routed_turn_suggests_the_other_targets(api: Api) -> None:
    intent_id = await api.route(command="/route cloud")
    await api.say(ROOM, QUESTION, event_id="$question", ago=1)
    assert (await claim(api, "$question", QUESTION))["override"] is True
    response = await api.client.post(
        outcome_path(intent_id),
        json={"model": CLOUD, "status": "error", "detail": "upstream timed out"},
        headers=AUTH,
    )
    assert response.status_code == 204
    (suggestion,) = effects(api, "suggest:")
    body = suggestion["content"]["body"]
    assert CLOUD in body and "upstream timed out" in body
    assert "!route local again" in body and "!route cloud again" not in body


async def test_an_outcome_for_a_room_nobody_can_tell_is_204_and_stores_nothing(api: Api) -> None:
    before = await api.snapshot()
    response = await api.client.post(
        "/v1/outcome",
        json={"last_user_message": "never said anywhere", "model": LOCAL, "status": "error"},
        headers=AUTH,
    )
    assert response.status_code == 204
    assert await api.snapshot() == before


BAD_TURN_OUTCOMES: list[tuple[str, Any]] = [
    ("no turn at all", {"model": LOCAL, "status": "error"}),
    ("no model", {"room_id": ROOM, "status": "error"}),
    ("bad status", {"room_id": ROOM, "model": LOCAL, "status": "failed"}),
    ("room_id without !", {"room_id": "#r:x", "model": LOCAL, "status": "error"}),
    ("request a list", {"request": [], "model": LOCAL, "status": "error"}),
    ("latency negative", {"room_id": ROOM, "model": LOCAL, "status": "ok", "latency_ms": -5}),
    ("broken JSON", b'{"room_id": "!r:x", "model": '),
]


@pytest.mark.parametrize(
    ("label", "body"), BAD_TURN_OUTCOMES, ids=[label for label, _ in BAD_TURN_OUTCOMES]
)
async def test_a_malformed_turn_outcome_is_400_and_changes_nothing(
    api: Api, label: str, body: Any
) -> None:
    await api.say(ROOM, QUESTION, event_id="$question", ago=5)
    await report(api, "$question", QUESTION, "error")  # a failing turn, to be disturbed
    before = await api.snapshot()
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await api.post_raw("/v1/outcome", raw)
    assert response.status_code == 400, label
    assert response.json()["error"]["code"] == "bad_request"
    assert await api.snapshot() == before
    assert len(effects(api, "suggest:")) == 1


# ---- /route history ---------------------------------------------------------------------


async def test_history_shows_routed_and_failed_turns_with_what_served(api: Api) -> None:
    command = await api.say(ROOM, "!route history", ago=60)
    assert "No routed or failed turn" in reply_to(api, command)
    intent_id = await api.route(command="/route cloud")
    await api.say(ROOM, QUESTION, event_id="$question", ago=1)
    await claim(api, "$question", QUESTION)
    await claim(api, "$question", QUESTION)
    for _ in range(2):
        response = await api.client.post(
            outcome_path(intent_id),
            json={"model": CLOUD, "status": "ok", "latency_ms": 1500, "turn_id": "$question"},
            headers=AUTH,
        )
        assert response.status_code == 204
    await api.say(ROOM, "second question", event_id="$q2", ago=0.5, sender=BOB)
    await report(api, "$q2", "second question", "error")
    await api.say(ROOM, "third question, fine", event_id="$q3", ago=0.4)
    await report(api, "$q3", "third question, fine", "ok")
    command = await api.say(ROOM, "/route history", ago=0)
    lines = reply_to(api, command).splitlines()
    assert len(lines) == 3, lines  # the heading, the failed turn, the routed turn
    assert "failed" in lines[1] and BOB in lines[1] and LOCAL in lines[1]
    assert "routed to cloud by " + ALICE in lines[2]
    assert CLOUD in lines[2] and "2 call(s)" in lines[2] and "3.0 s" in lines[2]
