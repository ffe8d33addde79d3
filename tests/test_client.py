"""SPEC "Integrations": `route_sidecar.client.RouteClient`, the dispatcher's side of the lookup API.

Against the real side-car it returns the decisions the API gives; against a side-car
that is down, slow or answering garbage it fails open (no override, a warning, never an
exception); it keeps one connection; it needs nothing of the server's dependencies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from route_sidecar.client import Decision, RouteClient
from tests.api_support import ALICE, ROOM, TOKEN, Api, free_port

REPO = Path(__file__).resolve().parent.parent
CLOUD = "ollama-cloud/glm-5.1"
# Distinctive, so a leak into a log record cannot be a coincidence.
FAKE_TOKEN = "client-test-token-5f0c2a9e7b"
TIMEOUT = 0.5
SLACK = 0.5


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
            {"role": "user", "content": f"[Alice] {question}"},
        ],
    }


# ---- against the real side-car -----------------------------------------------------------


def api_url(api: Api) -> str:
    listen = api.sidecar.config.api.listen
    return f"http://{listen.host}:{listen.port}"


@pytest.fixture
async def client(api: Api) -> AsyncIterator[RouteClient]:
    # Generous: these tests are about the answers, not the deadline.
    async with RouteClient(api_url(api), TOKEN, timeout=5.0) as route_client:
        yield route_client


async def test_claim_with_hermes_lines_gets_the_rooms_override(
    api: Api, client: RouteClient
) -> None:
    intent_id = await api.route()
    await api.say(ROOM, "Why CI red?", event_id="$thread-root", ago=0)
    decision = await client.claim(request=hermes_request(ROOM, "$thread-root", "Why CI red?"))
    assert decision.override is True
    assert (decision.model, decision.target, decision.intent_id) == (CLOUD, "cloud", intent_id)
    assert (decision.room_id, decision.turn_id, decision.reason) == (ROOM, "$thread-root", "bound")
    assert decision.metadata == {
        "matrix_room_id": ROOM,
        "matrix_sender": ALICE,
        "route_target": "cloud",
        "route_intent_id": intent_id,
        "route_origin": "/route",
        "route_set_by": ALICE,
        "route_turn_id": "$thread-root",
    }


async def test_claim_without_an_intent_is_no_override_for_no_intent(
    api: Api, client: RouteClient
) -> None:
    await api.sidecar.service.on_bot_membership(ROOM, joined=True)
    decision = await client.claim(request=hermes_request(ROOM, "$thread-root", "Hello?"))
    assert (decision.override, decision.model, decision.target) == (False, None, None)
    assert (decision.intent_id, decision.reason) == (None, "no_intent")
    assert (decision.room_id, decision.turn_id) == (ROOM, "$thread-root")


async def test_outcome_is_accepted_for_a_known_intent_and_refused_for_an_unknown_one(
    api: Api, client: RouteClient
) -> None:
    intent_id = await api.route()
    decision = await client.claim(room_id=ROOM, turn_id="$q", last_user_message="Why?")
    assert decision.intent_id == intent_id
    reported = await client.outcome(intent_id, model=CLOUD, status="ok", latency_ms=812)
    assert reported is True
    unknown = await client.outcome("no-such-intent", model=CLOUD, status="ok")
    assert unknown is False


async def test_report_sends_a_routed_calls_outcome_to_its_intent(
    api: Api, client: RouteClient
) -> None:
    intent_id = await api.route()
    body = hermes_request(ROOM, "$routed", "Why is CI red?")
    decision = await client.claim(request=body)
    assert decision.override
    assert await client.report(decision, model=CLOUD, status="ok", request=body) is True
    rows = api.rows("outcomes")
    assert [(r["intent_id"], r["model"], r["status"]) for r in rows] == [(intent_id, CLOUD, "ok")]


async def test_report_sends_an_unrouted_failure_to_the_turn_outcome(
    api: Api, client: RouteClient
) -> None:
    await api.say(ROOM, "Why is CI red?", event_id="$plain", ago=1)
    body = hermes_request(ROOM, "$plain", "Why is CI red?")
    decision = await client.claim(request=body)
    assert not decision.override
    reported = await client.report(
        decision, model="glm-4.7-flash:q4_K_M", status="error", request=body, latency_ms=40
    )
    assert reported is True
    rows = api.rows("outcomes")
    assert [(r["intent_id"], r["room_id"], r["status"], r["asker"]) for r in rows] == [
        (None, ROOM, "error", ALICE)
    ]


async def test_turn_outcome_sends_only_the_turn_fields_of_the_request(fake: FakeSidecar) -> None:
    seen: list[Any] = []

    async def record(request: web.Request) -> web.StreamResponse:
        seen.append(await request.json())
        return web.Response(status=204)

    fake.handler = record
    body = hermes_request(ROOM, "$t", "Why?") | {"tools": [{"type": "function"}] * 50}
    async with RouteClient(fake.url, FAKE_TOKEN) as client:
        assert await client.turn_outcome(model="m", status="error", request=body) is True
        # Nothing tells the turn: no request is made at all.
        assert await client.turn_outcome(model="m", status="ok", turn_id="$t") is False
    assert seen == [
        {
            "model": "m",
            "status": "error",
            "room_id": ROOM,
            "turn_id": "$t",
            "last_user_message": "[Alice] Why?",
        }
    ]


async def test_report_to_a_side_car_that_is_down_is_false_never_an_error() -> None:
    async with RouteClient(f"http://127.0.0.1:{free_port()}", FAKE_TOKEN, timeout=TIMEOUT) as c:
        started = time.monotonic()
        unrouted = Decision(room_id=ROOM, turn_id="$t")
        assert await c.report(unrouted, model="m", status="error") is False
        routed = Decision(override=True, model="m", intent_id="i-1", room_id=ROOM)
        assert await c.report(routed, model="m", status="ok") is False
    assert time.monotonic() - started < 2 * (TIMEOUT + SLACK)


async def test_intent_returns_the_rooms_intent_or_none(api: Api, client: RouteClient) -> None:
    assert await client.intent(ROOM) is None
    intent_id = await api.route()
    shown = await client.intent(ROOM)
    assert shown is not None
    assert (shown["id"], shown["state"], shown["room_id"]) == (intent_id, "pending", ROOM)
    assert await client.intent("!elsewhere:example.org") is None


async def test_a_token_the_side_car_refuses_is_no_override(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    await api.route()
    async with RouteClient(api_url(api), "not-a-configured-token") as refused:
        with caplog.at_level(logging.WARNING, logger="route_sidecar.client"):
            decision = await refused.claim(room_id=ROOM, last_user_message="Why?")
    assert (decision.override, decision.reason) == (False, "http_401")
    assert any(r.levelno == logging.WARNING for r in caplog.records)


# ---- a fake side-car that answers what a test says ----------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class FakeSidecar:
    """An aiohttp server on a free port: answers with `handler`, records what it saw and
    counts the TCP connections it accepted."""

    handler: Handler | None = None
    connections: int = 0
    authorizations: list[str | None] = field(default_factory=list)
    peers: set[Any] = field(default_factory=set)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.authorizations.append(request.headers.get("Authorization"))
        if request.transport is not None:
            self.peers.add(request.transport.get_extra_info("peername"))
        await request.read()
        assert self.handler is not None, "the test set no handler"
        return await self.handler(request)


@pytest.fixture
async def fake() -> AsyncIterator[FakeSidecar]:
    sidecar = FakeSidecar()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", sidecar.handle)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    protocol_factory = runner.server
    assert protocol_factory is not None

    def counting_factory() -> asyncio.Protocol:
        sidecar.connections += 1
        return protocol_factory()

    port = free_port()
    server = await asyncio.get_running_loop().create_server(counting_factory, "127.0.0.1", port)
    sidecar.url = f"http://127.0.0.1:{port}"
    try:
        yield sidecar
    finally:
        sidecar.release.set()
        server.close()
        await runner.cleanup()
        await server.wait_closed()


def answer(status: int, body: bytes, content_type: str = "application/json") -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, content_type=content_type)

    return handler


NO_INTENT = {
    "override": False,
    "model": None,
    "target": None,
    "intent_id": None,
    "room_id": ROOM,
    "turn_id": None,
    "expires_at": None,
    "reason": "no_intent",
    "metadata": {"matrix_room_id": ROOM},
}


def json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


# (status, body, content type, what `intent` may return for it)
GARBAGE: dict[str, tuple[int, bytes, str, Any]] = {
    "not_json": (200, b"<html>oops</html>", "text/html", None),
    "empty_body": (200, b"", "application/json", None),
    "json_array": (200, b"[1, 2]", "application/json", None),
    "json_string": (200, b'"override"', "application/json", None),
    "override_not_a_bool": (
        200,
        json_bytes({"override": "yes", "model": CLOUD}),
        "application/json",
        {"override": "yes", "model": CLOUD},
    ),
    "override_without_model": (
        200,
        json_bytes({"override": True}),
        "application/json",
        {"override": True},
    ),
    "override_with_empty_model": (
        200,
        json_bytes({"override": True, "model": ""}),
        "application/json",
        {"override": True, "model": ""},
    ),
    "metadata_not_an_object": (
        200,
        json_bytes({"override": True, "model": CLOUD, "metadata": ["x"]}),
        "application/json",
        {"override": True, "model": CLOUD, "metadata": ["x"]},
    ),
    "invalid_utf8": (200, b'{"override": "\xff\xfe"}', "application/json", None),
    "nested_past_the_recursion_limit": (200, b"[" * 200_000, "application/json", None),
    "server_error": (
        500,
        json_bytes({"error": {"code": "oops", "message": "x"}}),
        "application/json",
        None,
    ),
    "unauthorized": (
        401,
        json_bytes({"error": {"code": "unauthorized", "message": "x"}}),
        "application/json",
        None,
    ),
    "not_found": (404, b"", "text/plain", None),
    "redirect": (302, b"", "text/plain", None),
}


@pytest.mark.parametrize("kind", GARBAGE)
async def test_claim_answered_with_garbage_is_no_override_and_a_warning(
    fake: FakeSidecar, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    status, body, content_type, _ = GARBAGE[kind]
    fake.handler = answer(status, body, content_type)
    async with RouteClient(fake.url, FAKE_TOKEN, timeout=TIMEOUT) as client:
        with caplog.at_level(logging.WARNING, logger="route_sidecar.client"):
            decision = await client.claim(room_id=ROOM, last_user_message="Why?")
    assert (decision.override, decision.model, decision.intent_id) == (False, None, None)
    assert fake.authorizations, "the claim never reached the server"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings, "no warning logged"
    assert all(FAKE_TOKEN not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", GARBAGE)
async def test_outcome_and_intent_answered_with_garbage_never_raise(
    fake: FakeSidecar, kind: str
) -> None:
    status, body, content_type, shown = GARBAGE[kind]
    fake.handler = answer(status, body, content_type)
    async with RouteClient(fake.url, FAKE_TOKEN, timeout=TIMEOUT) as client:
        assert await client.outcome("intent-1", model=CLOUD, status="ok") is False
        assert await client.intent(ROOM) == shown


async def test_a_well_formed_answer_from_the_fake_is_understood(fake: FakeSidecar) -> None:
    # The control for the garbage cases: the same server, a valid body.
    fake.handler = answer(200, json_bytes(NO_INTENT))
    async with RouteClient(fake.url, FAKE_TOKEN) as client:
        decision = await client.claim(room_id=ROOM)
    assert decision == Decision(
        override=False, room_id=ROOM, metadata={"matrix_room_id": ROOM}, reason="no_intent"
    )


# ---- a side-car that is down or slow -------------------------------------------------------


async def test_nothing_listening_is_no_override_and_a_warning_without_the_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with RouteClient(url, FAKE_TOKEN, timeout=TIMEOUT) as client:
        with caplog.at_level(logging.DEBUG):
            decision = await client.claim(request=hermes_request(ROOM, "$t", "Why?"))
            reported = await client.outcome("intent-1", model=CLOUD, status="error")
            shown = await client.intent(ROOM)
    assert (decision.override, decision.model, decision.reason) == (False, None, "unavailable")
    assert (reported, shown) == (False, None)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.name for r in warnings] == ["route_sidecar.client"] * 3
    for record in caplog.records:
        assert FAKE_TOKEN not in record.getMessage()
        assert FAKE_TOKEN not in repr(record.args)


async def test_a_connection_dropped_without_an_answer_is_no_override() -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with RouteClient(f"http://127.0.0.1:{port}", FAKE_TOKEN) as client:
            decision = await client.claim(room_id=ROOM)
            assert (
                await client.outcome("i", model=CLOUD, status="ok"),
                await client.intent(ROOM),
            ) == (False, None)
    finally:
        server.close()
        await server.wait_closed()
    assert (decision.override, decision.reason) == (False, "unavailable")


async def test_a_side_car_slower_than_the_timeout_is_no_override_within_the_timeout(
    fake: FakeSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    async def sleep_past_the_timeout(request: web.Request) -> web.StreamResponse:
        await asyncio.wait_for(fake.release.wait(), timeout=10 * TIMEOUT)
        return web.json_response(NO_INTENT)

    fake.handler = sleep_past_the_timeout
    async with RouteClient(fake.url, FAKE_TOKEN, timeout=TIMEOUT) as client:
        with caplog.at_level(logging.WARNING, logger="route_sidecar.client"):
            started = time.monotonic()
            decision = await client.claim(room_id=ROOM, last_user_message="Why?")
            elapsed = time.monotonic() - started
    assert (decision.override, decision.reason) == (False, "timeout")
    assert elapsed < TIMEOUT + SLACK, f"the claim took {elapsed:.2f}s"
    assert any(r.levelno == logging.WARNING for r in caplog.records)


async def test_a_side_car_trickling_its_answer_is_cut_off_at_the_timeout(
    fake: FakeSidecar,
) -> None:
    # Each byte arrives well within the timeout, the whole answer far past it.
    async def trickle(request: web.Request) -> web.StreamResponse:
        body = json_bytes(NO_INTENT)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        for index in range(len(body)):
            await response.write(body[index : index + 1])
            await asyncio.sleep(TIMEOUT / 5)
        return response

    fake.handler = trickle
    async with RouteClient(fake.url, FAKE_TOKEN, timeout=TIMEOUT) as client:
        started = time.monotonic()
        decision = await client.claim(room_id=ROOM)
        elapsed = time.monotonic() - started
    assert (decision.override, decision.reason) == (False, "timeout")
    assert elapsed < TIMEOUT + SLACK, f"the claim took {elapsed:.2f}s"


async def test_outcome_and_intent_of_a_slow_side_car_return_within_the_timeout(
    fake: FakeSidecar,
) -> None:
    async def sleep_past_the_timeout(request: web.Request) -> web.StreamResponse:
        await asyncio.wait_for(fake.release.wait(), timeout=10 * TIMEOUT)
        return web.Response(status=204)

    fake.handler = sleep_past_the_timeout
    async with RouteClient(fake.url, FAKE_TOKEN, timeout=TIMEOUT) as client:
        started = time.monotonic()
        reported = await client.outcome("intent-1", model=CLOUD, status="ok")
        shown = await client.intent(ROOM)
        elapsed = time.monotonic() - started
    assert (reported, shown) == (False, None)
    assert elapsed < 2 * TIMEOUT + SLACK, f"outcome and intent took {elapsed:.2f}s"


# ---- the connection and the token ----------------------------------------------------------


async def test_several_calls_over_one_client_open_one_connection(fake: FakeSidecar) -> None:
    async def by_path(request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/claim":
            return web.json_response(NO_INTENT)
        if request.path.endswith("/outcome"):
            return web.Response(status=204)
        return web.json_response({"error": {"code": "not_found", "message": "x"}}, status=404)

    fake.handler = by_path
    async with RouteClient(fake.url, FAKE_TOKEN) as client:
        for _ in range(5):
            assert (await client.claim(room_id=ROOM)).reason == "no_intent"
        assert await client.outcome("intent-1", model=CLOUD, status="ok") is True
        assert await client.intent(ROOM) is None
    assert len(fake.authorizations) == 7
    assert fake.connections == 1
    assert len(fake.peers) == 1


async def test_the_token_is_sent_as_a_bearer_authorization(fake: FakeSidecar) -> None:
    fake.handler = answer(200, json_bytes(NO_INTENT))
    async with RouteClient(fake.url, FAKE_TOKEN) as client:
        await client.claim(room_id=ROOM)
        await client.outcome("intent-1", model=CLOUD, status="ok")
        await client.intent(ROOM)
    assert fake.authorizations == [f"Bearer {FAKE_TOKEN}"] * 3


# ---- what the dispatcher has to install ----------------------------------------------------


def test_bot_client_imports_none_of_the_servers_dependencies() -> None:
    probe = (
        "import sys, route_sidecar.client; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " {'mautrix','aiohttp','aiosqlite','prometheus_client'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


async def test_a_request_body_that_is_not_json_is_automatic_routing_not_an_error() -> None:
    async with RouteClient("http://127.0.0.1:9", "token-0123456789abcdef") as client:
        decision = await client.claim(request={"messages": [object()]})
    assert decision.override is False and decision.reason == "unavailable"


@pytest.mark.parametrize(
    ("reason", "worth"),
    [
        ("no_intent", True),
        ("bound", True),
        ("", True),
        ("http_413", True),
        ("timeout", False),
        ("unavailable", False),
        ("http_401", False),
        ("http_500", False),
        ("no_answer", False),
    ],
)
def test_only_a_claim_the_side_car_answered_is_worth_reporting(reason: str, worth: bool) -> None:
    assert Decision(reason=reason).worth_reporting is worth
