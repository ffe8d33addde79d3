"""SPEC "The lookup API": the real side-car, driven over HTTP the way a dispatcher does.

Every response any test here receives is checked against route_sidecar/openapi.json (status
documented for the path and method, body valid against its schema): see
`tests.api_support.OpenApi.check`, installed as the client's response hook.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from route_sidecar.api import ROUTES
from tests.api_support import (
    ALICE,
    AUTH,
    MAX_BODY_BYTES,
    OPENAPI_PATH,
    OTHER_TOKEN,
    ROOM,
    TOKEN,
    Api,
    OpenApi,
    Snapshot,
    outcome_path,
    room_path,
    start_api,
    stop_api,
)

SPEC_METADATA_KEYS = {
    "matrix_room_id",
    "matrix_sender",
    "route_target",
    "route_intent_id",
    "route_origin",
    "route_set_by",
    "route_turn_id",
}
BOB = "@bob:example.org"


@pytest.fixture
async def pending(api: Api) -> str:
    """A `/route cloud` in ROOM, not yet claimed: its intent id."""
    return await api.route()


async def assert_changed_nothing(api: Api, before: Snapshot, what: str) -> None:
    after = await api.snapshot()
    assert after == before, f"{what} changed the stored state"


async def assert_still_binds(api: Api, intent_id: str) -> None:
    """The pending intent is still pending and binds the next valid claim."""
    shown = await api.client.get(room_path(ROOM), headers=AUTH)
    assert (shown.json()["id"], shown.json()["state"]) == (intent_id, "pending")
    claimed = await api.claim({"room_id": ROOM, "turn_id": "$after", "last_user_message": "hi"})
    assert claimed.json()["override"] is True
    assert (claimed.json()["reason"], claimed.json()["intent_id"]) == ("bound", intent_id)


def claim_body(
    turn_id: str = "$question", text: str = "Why did the deploy fail?"
) -> dict[str, Any]:
    return {"room_id": ROOM, "turn_id": turn_id, "last_user_message": text}


# ---- POST /v1/claim ---------------------------------------------------------------------


async def test_claim_without_an_intent_gets_no_override(api: Api) -> None:
    await api.sidecar.service.on_bot_membership(ROOM, joined=True)  # a room the bot is in
    before = await api.snapshot()
    answer = (await api.claim(claim_body())).json()
    assert answer == {
        "override": False,
        "model": None,
        "target": None,
        "intent_id": None,
        "room_id": ROOM,
        "turn_id": "$question",
        "expires_at": None,
        "reason": "no_intent",
        "metadata": {"matrix_room_id": ROOM, "route_turn_id": "$question"},
    }
    await assert_changed_nothing(api, before, "a claim without an intent")


async def test_a_claim_naming_a_room_the_bot_is_not_in_is_placed_in_none(api: Api) -> None:
    """SPEC "The turn key": such a hint counts as absent; the answer never names it."""
    answer = (await api.claim(claim_body())).json()
    assert (answer["override"], answer["room_id"], answer["reason"]) == (False, None, "no_intent")
    assert answer["metadata"] == {"route_turn_id": "$question"}


async def test_claim_after_route_overrides_with_the_target_model(api: Api, pending: str) -> None:
    await api.say(ROOM, "Why did the deploy fail?", sender=BOB, event_id="$question", ago=0)
    answer = (await api.claim(claim_body())).json()
    assert answer["override"] is True
    assert (answer["model"], answer["target"]) == ("ollama-cloud/glm-5.1", "cloud")
    assert (answer["intent_id"], answer["reason"]) == (pending, "bound")
    assert (answer["room_id"], answer["turn_id"]) == (ROOM, "$question")
    assert answer["expires_at"] is not None
    # The asker is who sent the turn's message; the route names who set it.
    assert answer["metadata"] == {
        "matrix_room_id": ROOM,
        "matrix_sender": BOB,
        "route_target": "cloud",
        "route_intent_id": pending,
        "route_origin": "/route",
        "route_set_by": ALICE,
        "route_turn_id": "$question",
    }
    assert set(answer["metadata"]) == SPEC_METADATA_KEYS
    shown = (await api.client.get(room_path(ROOM), headers=AUTH)).json()
    assert (shown["state"], shown["bound_turns"]) == ("active", 1)


async def test_every_claim_of_the_bound_turn_gets_the_same_override(api: Api, pending: str) -> None:
    answers = [(await api.claim(claim_body())).json() for _ in range(3)]
    assert [a["override"] for a in answers] == [True, True, True]
    assert [a["reason"] for a in answers] == ["bound", "continued", "continued"]
    assert {(a["intent_id"], a["model"]) for a in answers} == {(pending, "ollama-cloud/glm-5.1")}


async def test_another_turn_gets_no_override_and_does_not_disturb_the_bound_turn(
    api: Api, pending: str
) -> None:
    assert (await api.claim(claim_body())).json()["override"] is True
    before = await api.snapshot()
    other = (await api.claim(claim_body("$other", "Something else entirely"))).json()
    assert (other["override"], other["reason"], other["model"]) == (False, "other_turn", None)
    assert set(other["metadata"]) == {"matrix_room_id", "route_turn_id"}
    await assert_changed_nothing(api, before, "a claim from another turn")
    again = (await api.claim(claim_body())).json()
    assert (again["override"], again["reason"], again["intent_id"]) == (True, "continued", pending)


async def test_a_misspelt_field_is_named_in_the_answer_and_changes_nothing_else(
    api: Api, pending: str
) -> None:
    """SPEC "The turn key": a dispatcher that sends `body` for `request` sees why no
    override came; the answer is otherwise what it is without the field."""
    request = {"messages": [{"role": "user", "content": "Why did the deploy fail?"}]}
    answer = (await api.claim({"room_id": ROOM, "body": request, "Turn_ID": "$q"})).json()
    assert answer["override"] is True and answer["turn_id"] is None  # request-scoped
    assert answer["warnings"][:2] == [
        "ignored field 'body': not a field of this request",
        "ignored field 'Turn_ID': not a field of this request",
    ]
    assert "request" in answer["warnings"][-1] and "turn_id" in answer["warnings"][-1]
    plain = (await api.claim(claim_body())).json()
    assert "warnings" not in plain
    # With nothing it reads, the 400 names the field it did not read.
    refused = await api.claim({"body": request})
    assert refused.status_code == 400
    assert "'body'" in refused.json()["error"]["message"]


async def test_warnings_are_capped_and_hostile_names_stay_data(api: Api) -> None:
    body = {f"<b>{'x' * 70}{n}": n for n in range(40)} | {"room_id": ROOM}
    answer = (await api.claim(body)).json()
    assert "warnings" in answer, answer
    assert len(answer["warnings"]) == 10 and "32 more" in answer["warnings"][-2]
    assert all(len(w) < 200 for w in answer["warnings"][:-1])


async def test_session_id_is_an_alias_of_turn_id(api: Api, pending: str) -> None:
    first = await api.claim({"room_id": ROOM, "session_id": "$s", "last_user_message": "q"})
    same = await api.claim(
        {"room_id": ROOM, "turn_id": "$s", "session_id": "$s", "last_user_message": "q"}
    )
    assert (first.json()["turn_id"], first.json()["reason"]) == ("$s", "bound")
    assert (same.json()["turn_id"], same.json()["reason"]) == ("$s", "continued")


def hermes_request(room_id: str, thread: str, question: str) -> dict[str, Any]:
    """An OpenAI chat-completions body as the Hermes gateway sends it."""
    system = (
        "You are Hermes.\n\n## Current Session Context\n"
        f"**Source:** Matrix\n**Matrix Room ID:** {room_id}\n**Matrix Thread:** {thread}\n"
    )
    return {
        "model": "glm-4.7-flash:q4_K_M",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "[Alice] an earlier question"},
            {"role": "assistant", "content": "an earlier answer"},
            {"role": "user", "content": [{"type": "text", "text": f"[Alice] {question}"}]},
        ],
    }


async def test_claim_reads_room_and_turn_from_the_hermes_system_message(
    api: Api, pending: str
) -> None:
    body = {"request": hermes_request(ROOM, "$thread-root", "Why is CI red?")}
    answers = [(await api.claim(body)).json() for _ in range(2)]
    for answer in answers:
        assert (answer["room_id"], answer["turn_id"]) == (ROOM, "$thread-root")
        assert (answer["override"], answer["intent_id"]) == (True, pending)
    assert [a["reason"] for a in answers] == ["bound", "continued"]
    assert answers[0]["metadata"]["route_turn_id"] == "$thread-root"


async def test_claim_resolves_the_room_from_the_last_user_message(api: Api, pending: str) -> None:
    await api.say(ROOM, "Which  region is the outage in?", ago=2.0)
    await api.say("!elsewhere:example.org", "unrelated chatter", ago=2.0)
    # Hermes shows the agent the message with its `[Display Name] ` prefix.
    answer = (
        await api.claim({"last_user_message": "[Alice] which region is the outage in?"})
    ).json()
    assert (answer["room_id"], answer["turn_id"]) == (ROOM, None)
    assert (answer["override"], answer["intent_id"], answer["reason"]) == (True, pending, "bound")


async def test_a_message_seen_in_no_room_resolves_no_room(api: Api, pending: str) -> None:
    before = await api.snapshot()
    answer = (await api.claim({"last_user_message": "never said in any room"})).json()
    assert (answer["override"], answer["room_id"], answer["reason"]) == (False, None, "no_intent")
    await assert_changed_nothing(api, before, "a claim resolving no room")


async def test_a_message_seen_in_two_rooms_resolves_no_room(api: Api, pending: str) -> None:
    await api.say(ROOM, "deploy status?", ago=2.0)
    await api.say("!other:example.org", "Deploy status?", ago=2.0)
    before = await api.snapshot()
    answer = (await api.claim({"last_user_message": "deploy status?"})).json()
    assert (answer["override"], answer["room_id"]) == (False, None)
    await assert_changed_nothing(api, before, "an ambiguous claim")


async def test_concurrent_claims_from_many_turns_bind_a_one_shot_intent_once(
    api: Api, pending: str
) -> None:
    answers = await asyncio.gather(
        *(api.claim(claim_body(f"$turn{n}", f"question {n}")) for n in range(20))
    )
    winners = [a.json() for a in answers if a.json()["override"]]
    assert len(winners) == 1
    assert winners[0]["reason"] == "bound"
    losers = {a.json()["reason"] for a in answers if not a.json()["override"]}
    assert losers == {"other_turn"}


async def test_a_bound_turn_keeps_its_override_after_a_restart(
    tmp_path: Path, openapi: OpenApi
) -> None:
    first = await start_api(tmp_path, openapi)
    try:
        intent_id = await first.route()
        assert (await first.claim(claim_body())).json()["override"] is True
    finally:
        await stop_api(first)
    second = await start_api(tmp_path, openapi)  # the same database file
    try:
        other = (await second.claim(claim_body("$other", "another question"))).json()
        assert (other["override"], other["reason"]) == (False, "other_turn")
        same = (await second.claim(claim_body())).json()
        assert (same["override"], same["reason"], same["intent_id"]) == (
            True,
            "continued",
            intent_id,
        )
    finally:
        await stop_api(second)


# ---- POST /v1/intents/{intent_id}/outcome -----------------------------------------------


async def test_outcome_for_a_known_intent_is_recorded(api: Api, pending: str) -> None:
    await api.claim(claim_body())
    before = await api.snapshot()
    response = await api.client.post(
        outcome_path(pending),
        headers=AUTH,
        json={
            "model": "ollama-cloud/glm-5.1",
            "status": "ok",
            "latency_ms": 6816,
            "detail": "served",
            "turn_id": "$question",
        },
    )
    assert response.status_code == 204
    after = await api.snapshot()
    assert after.rows["outcomes"] == before.rows["outcomes"] + 1
    minimal = await api.client.post(
        outcome_path(pending), headers=AUTH, json={"model": "m", "status": "error"}
    )
    assert minimal.status_code == 204


async def test_outcome_for_an_unknown_intent_is_404(api: Api, pending: str) -> None:
    before = await api.snapshot()
    response = await api.client.post(
        outcome_path("no-such-intent"), headers=AUTH, json={"model": "m", "status": "ok"}
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    await assert_changed_nothing(api, before, "an outcome for an unknown intent")
    await assert_still_binds(api, pending)


# ---- GET and DELETE /v1/rooms/{room_id}/intent ------------------------------------------


async def test_get_room_intent_reads_it_without_claiming(api: Api, pending: str) -> None:
    before = await api.snapshot()
    response = await api.client.get(room_path(ROOM), headers=AUTH)
    assert response.status_code == 200
    intent = response.json()
    assert (intent["id"], intent["room_id"], intent["target"], intent["model"]) == (
        pending,
        ROOM,
        "cloud",
        "ollama-cloud/glm-5.1",
    )
    assert intent["scope"] == {"kind": "once", "turns": 1, "seconds": None}
    assert (intent["sender"], intent["state"], intent["bound_turns"]) == (ALICE, "pending", 0)
    assert intent["prebound"] is False
    await assert_changed_nothing(api, before, "reading the room's intent")
    await assert_still_binds(api, pending)


async def test_get_room_intent_shows_the_scope_of_turns_and_durations(api: Api) -> None:
    await api.route(command="/route cloud --turns 3")
    shown = (await api.client.get(room_path(ROOM), headers=AUTH)).json()
    assert shown["scope"] == {"kind": "turns", "turns": 3, "seconds": None}
    await api.route(command="/route local --for 30m")
    shown = (await api.client.get(room_path(ROOM), headers=AUTH)).json()
    assert shown["scope"] == {"kind": "for", "turns": None, "seconds": 1800}
    assert (shown["target"], shown["model"]) == ("local", "glm-4.7-flash:q4_K_M")


async def test_get_room_intent_without_one_is_404(api: Api) -> None:
    response = await api.client.get(room_path(ROOM), headers=AUTH)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_delete_room_intent_cancels_it(api: Api, pending: str) -> None:
    response = await api.client.delete(room_path(ROOM), headers=AUTH)
    assert response.status_code == 204
    assert (await api.client.get(room_path(ROOM), headers=AUTH)).status_code == 404
    again = await api.client.delete(room_path(ROOM), headers=AUTH)
    assert again.status_code == 404
    claimed = (await api.claim(claim_body())).json()
    assert (claimed["override"], claimed["reason"]) == (False, "no_intent")
    snapshot = await api.snapshot()
    assert snapshot.intents == ((pending, "cancelled"),)


# ---- errors: each one changes nothing ---------------------------------------------------

WRONG_AUTHORIZATION: list[dict[str, Any]] = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer wrong-token-0123456789abcdef"},
    {"Authorization": f"Bearer {TOKEN.upper()}"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": TOKEN},
    {"Authorization": b"Bearer \xff\xfe" + TOKEN.encode()},
]


def v1_requests(intent_id: str) -> list[tuple[str, str, Any]]:
    """One request per authenticated endpoint, each one that would change the state."""
    return [
        ("POST", "/v1/claim", claim_body()),
        ("POST", outcome_path(intent_id), {"model": "m", "status": "ok"}),
        ("POST", "/v1/outcome", {"room_id": ROOM, "model": "m", "status": "error"}),
        ("GET", room_path(ROOM), None),
        ("DELETE", room_path(ROOM), None),
    ]


async def test_every_v1_endpoint_needs_a_configured_bearer_token(api: Api, pending: str) -> None:
    before = await api.snapshot()
    for method, path, body in v1_requests(pending):
        for headers in WRONG_AUTHORIZATION:
            response = await api.client.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["error"]["code"] == "unauthorized"
            await assert_changed_nothing(api, before, f"{method} {path} with {headers}")
    await assert_still_binds(api, pending)


async def test_any_configured_token_is_accepted(api: Api) -> None:
    other = {"Authorization": f"Bearer {OTHER_TOKEN}"}
    assert (await api.claim(claim_body(), headers=other)).status_code == 200


@pytest.mark.parametrize("path", ["/v1/claim", "/v1/intents/{intent}/outcome", "/v1/outcome"])
async def test_a_body_not_sent_as_application_json_is_415(
    api: Api, pending: str, path: str
) -> None:
    path = path.format(intent=pending)
    body = json.dumps(claim_body() | {"model": "m", "status": "ok"}).encode()
    before = await api.snapshot()
    for content_type in (
        "text/plain",
        None,
        "application/x-www-form-urlencoded",
        "application/jsonx",
        "multipart/form-data; boundary=x",
    ):
        response = await api.post_raw(path, body, content_type)
        assert response.status_code == 415, content_type
        assert response.json()["error"]["code"] == "unsupported_media_type"
        await assert_changed_nothing(api, before, f"content type {content_type}")
    await assert_still_binds(api, pending)


BAD_CLAIMS: list[tuple[str, bytes]] = (
    [
        ("broken JSON", b'{"room_id": "!routed:example.org", '),
        ("empty body", b""),
        ("JSON array", json.dumps([claim_body()]).encode()),
        ("JSON string", b'"!routed:example.org"'),
        ("JSON null", b"null"),
        ("JSON number", b"42"),
        ("not UTF-8", b'{"room_id": "!routed:example.org", "turn_id": "$\xff"}'),
        ("lone surrogate", b'{"room_id": "!routed:example.org", "turn_id": "$\\ud800"}'),
        (
            "lone surrogate in request",
            b'{"request": {"messages": [{"role": "system", "content": '
            b'"**Matrix Room ID:** !routed:example.org\\n**Matrix Thread:** $\\udfff"}]}}',
        ),
        (
            "room_id not starting with !",
            json.dumps(claim_body() | {"room_id": "#routed:x"}).encode(),
        ),
        ("room_id empty", json.dumps(claim_body() | {"room_id": ""}).encode()),
        ("room_id 300 chars", json.dumps(claim_body() | {"room_id": "!" + "r" * 299}).encode()),
        ("turn_id 300 chars", json.dumps(claim_body("$" + "t" * 299)).encode()),
        (
            "session_id 300 chars",
            json.dumps(claim_body() | {"session_id": "$" + "s" * 299}).encode(),
        ),
        (
            "requested_model 300 chars",
            json.dumps(claim_body() | {"requested_model": "m" * 300}).encode(),
        ),
        (
            "turn_id and session_id differ",
            json.dumps(claim_body() | {"session_id": "$different"}).encode(),
        ),
        ("none of room_id, request, last_user_message", b'{"turn_id": "$question"}'),
        ("only nulls", b'{"room_id": null, "request": null, "last_user_message": null}'),
        ("empty object", b"{}"),
        (
            "request.messages not a list",
            json.dumps({"room_id": ROOM, "request": {"messages": {"role": "user"}}}).encode(),
        ),
        (
            "request.messages a string",
            json.dumps({"room_id": ROOM, "request": {"messages": "hi"}}).encode(),
        ),
    ]
    + [
        (f"{field} is {kind}", json.dumps(claim_body() | {field: value}).encode())
        for field in ("room_id", "turn_id", "session_id", "last_user_message", "requested_model")
        for kind, value in (
            ("a number", 7),
            ("a bool", True),
            ("a list", ["!x"]),
            ("an object", {"id": "!x"}),
        )
    ]
    + [
        (f"request is {kind}", json.dumps(claim_body() | {"request": value}).encode())
        for kind, value in (("a string", "{}"), ("a list", []), ("a number", 1), ("a bool", False))
    ]
)


@pytest.mark.parametrize(("label", "body"), BAD_CLAIMS, ids=[label for label, _ in BAD_CLAIMS])
async def test_a_malformed_claim_is_400_and_changes_nothing(
    api: Api, pending: str, label: str, body: bytes
) -> None:
    before = await api.snapshot()
    response = await api.post_raw("/v1/claim", body)
    assert response.status_code == 400, label
    assert response.json()["error"]["code"] == "bad_request"
    await assert_changed_nothing(api, before, label)
    await assert_still_binds(api, pending)


BAD_OUTCOMES: list[tuple[str, Any]] = [
    ("broken JSON", b'{"model": "m", "status": '),
    ("empty body", b""),
    ("not UTF-8", b'{"model": "m\xff", "status": "ok"}'),
    ("lone surrogate", b'{"model": "m", "status": "ok", "detail": "\\udc00"}'),
    ("no model", {"status": "ok"}),
    ("empty model", {"model": "", "status": "ok"}),
    ("model a number", {"model": 5, "status": "ok"}),
    ("model 300 chars", {"model": "m" * 300, "status": "ok"}),
    ("no status", {"model": "m"}),
    ("status null", {"model": "m", "status": None}),
    ("status upper case", {"model": "m", "status": "OK"}),
    ("status neither ok nor error", {"model": "m", "status": "failed"}),
    ("status a bool", {"model": "m", "status": True}),
    ("negative latency", {"model": "m", "status": "ok", "latency_ms": -1}),
    ("bool latency", {"model": "m", "status": "ok", "latency_ms": True}),
    ("fractional latency", {"model": "m", "status": "ok", "latency_ms": 1.5}),
    ("latency a string", {"model": "m", "status": "ok", "latency_ms": "5"}),
    ("latency over 2**31", {"model": "m", "status": "ok", "latency_ms": 2**31}),
    ("detail a number", {"model": "m", "status": "ok", "detail": 1}),
    ("detail over 2000 chars", {"model": "m", "status": "ok", "detail": "d" * 2001}),
    ("turn_id a list", {"model": "m", "status": "ok", "turn_id": ["$q"]}),
    ("turn_id 300 chars", {"model": "m", "status": "ok", "turn_id": "$" + "t" * 299}),
    ("JSON array", [{"model": "m", "status": "ok"}]),
]


@pytest.mark.parametrize(("label", "body"), BAD_OUTCOMES, ids=[lb for lb, _ in BAD_OUTCOMES])
async def test_a_malformed_outcome_is_400_and_changes_nothing(
    api: Api, pending: str, label: str, body: Any
) -> None:
    await api.claim(claim_body("$bound"))  # an outcome is for a bound turn
    before = await api.snapshot()
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await api.post_raw(outcome_path(pending), raw)
    assert response.status_code == 400, label
    assert response.json()["error"]["code"] == "bad_request"
    await assert_changed_nothing(api, before, label)


async def test_an_error_names_the_field_at_fault(api: Api) -> None:
    answers = {
        field: (await api.claim(claim_body() | {field: 1})).json()["error"]["message"]
        for field in ("room_id", "turn_id", "session_id", "last_user_message")
    }
    for field, message in answers.items():
        assert message.startswith(f"{field}:"), message
    latency = await api.client.post(
        outcome_path("x"), json={"model": "m", "status": "ok", "latency_ms": -5}, headers=AUTH
    )
    assert latency.json()["error"]["message"].startswith("latency_ms:")


@pytest.mark.parametrize("room_id", ["routed:example.org", "#alias:example.org", "!" + "r" * 299])
async def test_a_bad_room_id_in_the_path_is_400(api: Api, pending: str, room_id: str) -> None:
    before = await api.snapshot()
    for method in ("GET", "DELETE"):
        response = await api.client.request(method, room_path(room_id), headers=AUTH)
        assert response.status_code == 400, (method, room_id)
        await assert_changed_nothing(api, before, f"{method} {room_id}")
    await assert_still_binds(api, pending)


async def oversized(first: bytes, filler: bytes, count: int, last: bytes) -> AsyncIterator[bytes]:
    yield first
    for _ in range(count):
        yield filler
    yield last


@pytest.mark.parametrize("path", ["/v1/claim", "/v1/intents/{intent}/outcome", "/v1/outcome"])
async def test_a_body_over_the_limit_is_413_with_or_without_content_length(
    api: Api, pending: str, path: str
) -> None:
    path = path.format(intent=pending)
    head = b'{"room_id": "!routed:example.org", "model": "m", "status": "ok", "detail": "'
    before = await api.snapshot()
    sized = await api.post_raw(path, head + b"x" * MAX_BODY_BYTES + b'"}')
    assert "content-length" in sized.request.headers
    chunked = await api.client.post(
        path,
        content=oversized(head, b"x" * 512, MAX_BODY_BYTES // 512 + 1, b'"}'),
        headers=AUTH | {"Content-Type": "application/json"},
    )
    assert chunked.request.headers.get("transfer-encoding") == "chunked"
    for response in (sized, chunked):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"
    await assert_changed_nothing(api, before, "an oversized body")
    await assert_still_binds(api, pending)


async def test_a_body_just_within_the_limit_is_read(api: Api) -> None:
    head = b'{"room_id": "!routed:example.org", "last_user_message": "'
    body = head + b"q" * (MAX_BODY_BYTES - len(head) - 2) + b'"}'
    assert len(body) == MAX_BODY_BYTES
    assert (await api.post_raw("/v1/claim", body)).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/nope"),
        ("POST", "/v2/claim"),
        ("POST", "/v1/claim/extra"),
        ("GET", "/v1/rooms"),
        ("POST", "/v1/intents//outcome"),
        ("GET", "/"),
        ("GET", "/v1/rooms/%21routed%3Aexample.org/intent/extra"),
    ],
)
async def test_an_unknown_path_is_404(api: Api, pending: str, method: str, path: str) -> None:
    before = await api.snapshot()
    response = await api.client.request(method, path, headers=AUTH, json=claim_body())
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    await assert_changed_nothing(api, before, f"{method} {path}")
    await assert_still_binds(api, pending)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/claim", "POST"),
        ("PUT", "/v1/claim", "POST"),
        ("GET", "/v1/intents/{intent}/outcome", "POST"),
        ("POST", "/v1/rooms/%21routed%3Aexample.org/intent", "DELETE"),
        ("PATCH", "/v1/rooms/%21routed%3Aexample.org/intent", "GET"),
        ("POST", "/healthz", "GET"),
        ("DELETE", "/metrics", "GET"),
        ("POST", "/v1/openapi.json", "GET"),
    ],
)
async def test_a_method_a_path_does_not_serve_is_405(
    api: Api, pending: str, method: str, path: str, allowed: str
) -> None:
    before = await api.snapshot()
    response = await api.client.request(
        method, path.format(intent=pending), headers=AUTH, json=claim_body()
    )
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert allowed in response.headers["Allow"]
    await assert_changed_nothing(api, before, f"{method} {path}")
    await assert_still_binds(api, pending)


# ---- GET /healthz, /metrics, /v1/openapi.json -------------------------------------------


async def test_healthz_reports_the_database(api: Api) -> None:
    response = await api.client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


async def test_healthz_is_503_when_the_database_does_not_answer(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_answer() -> bool:
        return False

    monkeypatch.setattr(api.sidecar.store, "ping", no_answer)
    response = await api.client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "degraded", "database": "unavailable"}


async def test_metrics_count_claims_by_result(api: Api, pending: str) -> None:
    await api.claim(claim_body())
    await api.claim(claim_body("$other", "other"))
    response = await api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    lines = response.text.splitlines()
    assert "# TYPE route_sidecar_claims_total counter" in lines
    assert 'route_sidecar_claims_total{result="bound"} 1.0' in lines
    assert 'route_sidecar_claims_total{result="other_turn"} 1.0' in lines
    for name in (
        "route_sidecar_claim_seconds_bucket",
        "route_sidecar_live_intents",
        "route_sidecar_commands_total",
        "route_sidecar_transactions",
        "route_sidecar_duplicate_deliveries",
    ):
        assert name in response.text


async def test_openapi_document_is_served_as_shipped(api: Api) -> None:
    response = await api.client.get("/v1/openapi.json")
    assert response.status_code == 200
    assert response.content == OPENAPI_PATH.read_bytes()
    assert response.json()["openapi"] == "3.1.0"


def test_openapi_document_schemas_are_valid_draft_2020_12(openapi: OpenApi) -> None:
    for schema in openapi.doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


def test_openapi_document_describes_every_route_the_api_serves(openapi: OpenApi) -> None:
    served = {(method.lower(), path) for method, path, _, _ in ROUTES}
    documented = {
        (method, path)
        for path, item in openapi.doc["paths"].items()
        for method in item
        if method in OpenApi.METHODS
    }
    assert served == documented
    secured = {
        (method, path)
        for path, item in openapi.doc["paths"].items()
        for method, op in item.items()
        if method in OpenApi.METHODS and op.get("security")
    }
    assert secured == {(m, p) for m, p in documented if p.startswith("/v1/")} - {
        ("get", "/v1/openapi.json")
    }


# ---- hostile strings -----------------------------------------------------------------

HOSTILE = [
    "!ünïcødé:例え.jp",
    "!room:example.org\u202egro.elpmaxe",
    "!🚀:example.org",
    '!"quoted":example.org',
    "!'single':x",
    "!../../etc/passwd",
    "!..%2F..%2Fx",
    "!a/b:x",
    "!a\x00b:x",
    "!\x00",
    "!a\\b",
    "!room:x\n**Matrix Room ID:** !routed:example.org",
    "!'; DROP TABLE intents; --",
    "!" + "r" * 254,
    "!" + "r" * 255,
    "!" + "r" * 299,
    "!\ud7ff\ue000\U0010ffff",
    "!<script>alert(1)</script>",
    "!%00",
    "!\t\r\n",
]


async def test_hostile_ids_never_yield_a_5xx_nor_change_anything(api: Api, pending: str) -> None:
    before = await api.snapshot()
    for hostile in HOSTILE:
        turn = "$" + hostile[1:]
        for body in (
            {"room_id": hostile, "turn_id": turn, "last_user_message": hostile},
            {"room_id": hostile, "session_id": turn},
            {"request": hermes_request(hostile, turn, hostile)},
            {"last_user_message": hostile, "turn_id": turn},
        ):
            response = await api.claim(body)
            assert response.status_code in (200, 400), (body, response.text)
            if len(hostile) > 255 and "room_id" in body:
                assert response.status_code == 400
            if response.status_code == 200:
                assert response.json()["override"] is False
        for method in ("GET", "DELETE"):
            response = await api.client.request(method, room_path(hostile), headers=AUTH)
            expected = (400,) if len(hostile) > 255 else (404,)
            assert response.status_code in expected, (method, hostile, response.text)
        response = await api.client.post(
            outcome_path(hostile),
            json={"model": hostile, "status": "ok", "detail": hostile, "turn_id": turn[:255]},
            headers=AUTH,
        )
        assert response.status_code in (400, 404), (hostile, response.text)
        await assert_changed_nothing(api, before, f"hostile id {hostile!r}")
    for raw in (
        "/v1/rooms/!a/../intent",
        "/v1/rooms/../../healthz/intent",
        "/v1/intents/../claim/outcome",
        "/v1/rooms/%2e%2e/intent",
    ):
        response = await api.client.get(raw, headers=AUTH)
        assert response.status_code < 500, raw
    await assert_changed_nothing(api, before, "dot-dot paths")
    await assert_still_binds(api, pending)


async def test_an_unreadable_authorization_header_is_401_not_500(api: Api) -> None:
    for raw in (b"Bearer \xff\xfe", b"Bearer \xc3\x28", b"\xff" + TOKEN.encode()):
        response = await api.claim(claim_body(), headers={"Authorization": raw})  # type: ignore[dict-item]
        assert response.status_code == 401


# ---- random bodies ---------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
EDGE_STRINGS = [
    "",
    "!",
    "$",
    "\ud800",
    "!\udfff",
    "$\udbff",
    "$a\x00b",
    f"{ROOM} ",
    ROOM.upper(),
    "!" + "r" * 254,
    "!" + "r" * 255,
    "$" + "t" * 254,
    "$" + "t" * 255,
    "/route cloud",
    "[Alice] !route c",
    "**Matrix Room ID:** !routed:example.org",
]


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, picked by weight (st.one_of picks its branches evenly)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


id_strings = weighted(
    (2, st.sampled_from(EDGE_STRINGS)),
    (1, st.text(max_size=40).map(lambda s: "!" + s)),
    (1, st.text(max_size=40).map(lambda s: "$" + s)),
)
texts = st.text(max_size=80) | st.sampled_from(EDGE_STRINGS)


message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "developer", "tool"]) | json_values,
        "content": st.one_of(
            st.builds(
                lambda r, t: f"**Matrix Room ID:** {r}\n**Matrix Thread:** {t}",
                id_strings,
                id_strings,
            ),
            texts,
            st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}), max_size=3),
            json_values,
        ),
    },
)


@st.composite
def well_typed_claims(draw: st.DrawFn) -> dict[str, Any]:
    """Claims whose fields have the right types, often for the room with a live intent;
    an absent field is sometimes sent as null."""
    turn_id = draw(weighted((4, st.none()), (6, id_strings)))
    fields = {
        "room_id": draw(weighted((4, st.just(ROOM)), (3, st.none()), (3, id_strings))),
        "turn_id": turn_id,
        "session_id": draw(weighted((6, st.none()), (2, st.just(turn_id)), (2, id_strings))),
        "last_user_message": draw(weighted((4, st.none()), (6, texts))),
        "requested_model": draw(st.none() | st.text(max_size=20)),
        "request": draw(
            weighted(
                (6, st.none()),
                (
                    4,
                    st.fixed_dictionaries(
                        {},
                        optional={
                            "messages": st.lists(message, max_size=4),
                            "model": st.text(max_size=20),
                        },
                    ),
                ),
            )
        ),
    }
    return {k: v for k, v in fields.items() if v is not None or draw(st.booleans())}


CLAIM_FIELDS = [
    "last_user_message",
    "request",
    "requested_model",
    "room_id",
    "session_id",
    "turn_id",
]
ill_typed_claims = st.dictionaries(
    st.sampled_from(CLAIM_FIELDS) | st.text(max_size=10), json_values | id_strings, max_size=6
)
claim_bodies = weighted((6, well_typed_claims()), (2, ill_typed_claims), (1, json_values))


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=claim_bodies)
async def test_random_claim_bodies_never_yield_a_5xx_nor_change_state_without_override(
    api: Api, body: Any
) -> None:
    before = await api.snapshot()
    if before.intent[0] == 404:  # keep a live intent in ROOM: claims reach the store
        await api.route()
        before = await api.snapshot()
    response = await api.client.post(
        "/v1/claim",
        content=json.dumps(body).encode(),
        headers=AUTH | {"Content-Type": "application/json"},
    )
    assert response.status_code in (200, 400, 413), response.text  # 413: over 4 KiB
    if response.status_code != 200 or not response.json()["override"]:
        await assert_changed_nothing(api, before, f"claim {body!r}")


async def test_a_text_seen_in_two_rooms_is_answered_ambiguous_room_and_counted(
    api: Api, pending: str
) -> None:
    """Issue 18: a question asked word for word in two rooms placed the claim nowhere,
    silently; the answer and /metrics now say why."""
    await api.say(ROOM, "Is the staging database up?", ago=2.0)
    await api.say("!elsewhere:example.org", "Is the staging database up?", ago=2.0)
    response = await api.claim({"last_user_message": "is the staging database up?"})
    answer = response.json()
    assert (answer["override"], answer["reason"], answer["room_id"]) == (
        False,
        "ambiguous_room",
        None,
    )
    lines = (await api.client.get("/metrics")).text.splitlines()
    assert 'route_sidecar_claims_total{result="ambiguous_room"} 1.0' in lines


async def test_a_call_claimed_and_reported_twice_by_its_call_id_counts_once(
    api: Api, pending: str
) -> None:
    """The agent plugin and the dispatcher behind it both ask for one call and both
    report it: one binding, one claim counted, one outcome row."""
    question = await api.say(ROOM, "Why did the deploy fail?", ago=0, event_id="$question")
    stamp: dict[str, str] = {"room_id": ROOM, "event_id": question, "call_id": "c0ffee" * 5}
    request: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Why did the deploy fail?"}],
        "matrix_context": stamp,
    }
    first, second = [(await api.claim({"request": request})).json() for _ in range(2)]
    assert first == second and first["reason"] == "bound"
    for _ in range(2):
        reported = await api.client.post(
            outcome_path(pending),
            json={"model": "ollama-cloud/glm-5.1", "status": "ok", "call_id": stamp["call_id"]},
            headers=AUTH,
        )
        assert reported.status_code == 204
    assert [row["intent_id"] for row in api.rows("outcomes")] == [pending]
    other_call = {**request, "matrix_context": {**stamp, "call_id": "c2"}}
    another = (await api.claim({"request": other_call})).json()
    assert another["reason"] == "continued"  # a second call of the same turn
