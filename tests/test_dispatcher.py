"""The reference dispatcher in front of two fake OpenAI-compatible upstreams, consulting a
real side-car over HTTP: routing follows the room, bytes pass through untouched, every
call's outcome is reported (routed or not), and a side-car that is down means the default
model."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from aiohttp import web

from demo.upstream import FakeUpstream
from integrations.dispatcher.dispatcher import Dispatcher, DispatcherConfig, Upstream

from .api_support import (
    MAX_BODY_BYTES,
    ROOM,
    TOKEN,
    Api,
    OpenApi,
    free_port,
    start_api,
    stop_api,
)

LOCAL = "glm-4.7-flash:q4_K_M"
CLOUD = "ollama-cloud/glm-5.1"


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def chat(
    thread: str | None, text: str, history: tuple[dict[str, Any], ...] = (), **extra: Any
) -> dict[str, Any]:
    """A Hermes call: the system prompt's Matrix lines, earlier messages, the question."""
    system = f"You are Hermes.\n**Matrix Room ID:** {ROOM}\n"
    if thread:
        system += f"**Matrix Thread:** {thread}\n"
    return {
        "model": LOCAL,
        "messages": [
            {"role": "system", "content": system},
            *history,
            {"role": "user", "content": f"[alice] {text}"},
        ],
        **extra,
    }


class Stack:
    def __init__(
        self, api: Api, local: FakeUpstream, cloud: FakeUpstream, dispatcher: Dispatcher, url: str
    ) -> None:
        self.api, self.local, self.cloud, self.dispatcher, self.url = (
            api,
            local,
            cloud,
            dispatcher,
            url,
        )
        self.http = httpx.AsyncClient(base_url=url, timeout=10)

    async def ask(self, thread: str | None, text: str, **extra: Any) -> httpx.Response:
        return await self.http.post("/v1/chat/completions", json=chat(thread, text, **extra))

    def outcomes(self) -> list[tuple[str, str]]:
        return [(model, status) for _, model, status, _ in self.outcome_rows()]

    def outcome_rows(self) -> list[tuple[Any, ...]]:
        """(intent_id, model, status, detail) of every stored outcome."""
        return self.query("SELECT intent_id, model, status, detail FROM outcomes ORDER BY id")

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(f"file:{self.api.db_path}?mode=ro", uri=True)
        try:
            return list(db.execute(sql))
        finally:
            db.close()


def dispatcher_for(sidecar_url: str, local_url: str, cloud_url: str) -> Dispatcher:
    return Dispatcher(
        DispatcherConfig(
            host="127.0.0.1",
            port=0,
            default_model=LOCAL,
            upstreams={
                LOCAL: Upstream(local_url),
                CLOUD: Upstream(cloud_url, api_key="k" * 20, model="glm-5.1"),
            },
            sidecar_url=sidecar_url,
            sidecar_token=TOKEN,
            sidecar_timeout=0.5,
            upstream_timeout=1.0,
        )
    )


@pytest_asyncio.fixture(loop_scope="session")
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    api = await start_api(tmp_path, OpenApi())
    local = await FakeUpstream("local").start()
    cloud = await FakeUpstream("cloud").start()
    sidecar_url = f"http://127.0.0.1:{api.sidecar.config.api.listen.port}"
    dispatcher = dispatcher_for(sidecar_url, local.base_url, cloud.base_url)
    runner, port = await serve(dispatcher.make_app())
    stack = Stack(api, local, cloud, dispatcher, f"http://127.0.0.1:{port}")
    yield stack
    await stack.http.aclose()
    await runner.cleanup()
    await local.stop()
    await cloud.stop()
    if not api.sidecar.stopping.is_set():  # one test stops it itself
        await stop_api(api)


class RecordingSidecar:
    """Stands in for the side-car where the real one cannot show a report was sent (it
    stores nothing for an ok call without an override): answers every claim with no
    override, after `claim_delay`, and records every outcome it is sent."""

    def __init__(self) -> None:
        self.claim_delay = 0.0
        self.reports: list[tuple[str, dict[str, Any]]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def claim(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.claim_delay)
        return web.json_response(
            {
                "override": False,
                "model": None,
                "target": None,
                "intent_id": None,
                "room_id": ROOM,
                "turn_id": "$question",
                "metadata": {"matrix_room_id": ROOM, "route_turn_id": "$question"},
            }
        )

    async def outcome(self, request: web.Request) -> web.Response:
        self.reports.append((request.path, await request.json()))
        return web.Response(status=204)

    async def start(self) -> RecordingSidecar:
        app = web.Application()
        app.router.add_post("/v1/claim", self.claim)
        app.router.add_post("/v1/outcome", self.outcome)
        app.router.add_post("/v1/intents/{intent_id}/outcome", self.outcome)
        self._runner, port = await serve(app)
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_routing_follows_the_room_for_every_call_of_the_turn_then_returns(
    stack: Stack,
) -> None:
    first = await stack.ask("$t0", "before any route")
    assert first.json()["choices"][0]["message"]["content"] == "answer from local"
    intent_id = await stack.api.route(ROOM, "/route cloud")
    question = await stack.api.say(ROOM, "the hard question", ago=0)
    answers = [await stack.ask(question, "the hard question") for _ in range(2)]
    assert [a.json()["choices"][0]["message"]["content"] for a in answers] == [
        "answer from cloud",
        "answer from cloud",
    ]
    assert stack.cloud.seen[-1]["model"] == "glm-5.1"  # the upstream's own name for it
    assert "metadata" not in stack.cloud.seen[-1]
    after = await stack.api.say(ROOM, "an easy one", ago=0)
    third = await stack.ask(after, "an easy one")
    assert third.json()["choices"][0]["message"]["content"] == "answer from local"
    await stack.dispatcher.settle()
    # The routed calls reach their intent; the ok calls without a route are not stored.
    assert stack.outcome_rows() == [(intent_id, CLOUD, "ok", None)] * 2
    # What served the turn is told by editing the command's confirmation (its account).
    accounts = stack.query("SELECT key FROM effects WHERE key LIKE 'account:%'")
    assert accounts and all(key.startswith(f"account:{intent_id}:") for (key,) in accounts)


async def test_streaming_and_plain_answers_pass_through_byte_for_byte(stack: Stack) -> None:
    streamed = await stack.ask(None, "stream please", stream=True)
    body = {"model": LOCAL, "messages": [{"role": "user", "content": "x"}], "stream": True}
    expected = b"".join(stack.local.chunks(body))
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.content == expected
    plain = await stack.ask(None, "plain please")
    direct = stack.local.completion({"model": LOCAL})
    assert plain.json() == direct


async def test_upstream_errors_pass_back_with_their_status_and_are_reported(
    stack: Stack,
) -> None:
    stack.cloud.fail_with = 500
    await stack.api.route(ROOM, "/route cloud")
    question = await stack.api.say(ROOM, "this will fail", ago=0)
    failed = await stack.ask(question, "this will fail")
    assert failed.status_code == 500 and failed.json()["error"]["message"] == "boom"
    stack.cloud.fail_with = None
    stack.cloud.delay = 2.0  # past the dispatcher's 1 s upstream timeout
    await stack.api.route(ROOM, "/route cloud")
    slow = await stack.api.say(ROOM, "this will time out", ago=0)
    timed_out = await stack.ask(slow, "this will time out")
    assert timed_out.status_code == 504
    await stack.dispatcher.settle()
    assert [(model, status, detail) for intent, model, status, detail in stack.outcome_rows()] == [
        (CLOUD, "error", "upstream answered 500"),
        (CLOUD, "error", "upstream timed out"),
    ]
    assert all(intent is not None for intent, *_ in stack.outcome_rows())


async def test_a_failed_call_without_a_route_is_reported_and_queues_a_suggestion(
    stack: Stack,
) -> None:
    question = await stack.api.say(ROOM, "the local model fails on this", ago=0)
    stack.local.fail_with = 503
    failed = await stack.ask(question, "the local model fails on this")
    assert failed.status_code == 503
    await stack.dispatcher.settle()
    assert stack.outcome_rows() == [(None, LOCAL, "error", "upstream answered 503")]
    [(room_id, turn)] = stack.query("SELECT room_id, turn FROM outcomes")
    assert room_id == ROOM and turn.startswith(f"{question}/")
    suggestions = stack.query("SELECT room_id FROM effects WHERE key LIKE 'suggest:%'")
    assert suggestions == [(ROOM,)]


async def test_a_turn_whose_call_then_succeeds_withdraws_its_suggestion(stack: Stack) -> None:
    question = await stack.api.say(ROOM, "flaky", ago=0)
    stack.local.fail_with = 500
    assert (await stack.ask(question, "flaky")).status_code == 500
    await stack.dispatcher.settle()
    assert stack.query("SELECT count(*) FROM effects WHERE key LIKE 'suggest:%'") == [(1,)]
    stack.local.fail_with = None
    assert (await stack.ask(question, "flaky")).status_code == 200
    await stack.dispatcher.settle()
    assert [(i, m, s) for i, m, s, _ in stack.outcome_rows()] == [
        (None, LOCAL, "error"),
        (None, LOCAL, "ok"),  # kept: the turn had failed
    ]
    assert stack.query("SELECT count(*) FROM effects WHERE key LIKE 'suggest:%'") == [(0,)]


async def test_a_timeout_without_a_route_is_reported_as_an_error_with_its_detail(
    stack: Stack,
) -> None:
    stack.local.delay = 2.0  # past the dispatcher's 1 s upstream timeout
    timed_out = await stack.ask("$slow", "the local model is too slow")
    assert timed_out.status_code == 504
    await stack.dispatcher.settle()
    assert stack.outcome_rows() == [(None, LOCAL, "error", "upstream timed out")]


async def test_an_upstream_that_stalls_mid_stream_is_logged_and_reported_as_such(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    stack.local.stall = 2.0  # after the first chunk, past the dispatcher's 1 s timeout
    with caplog.at_level(logging.INFO, logger="dispatcher"):
        cut = await stack.ask("$stalls", "a long answer", stream=True)
    assert cut.status_code == 200, "the status line was sent before the upstream stalled"
    assert cut.content.startswith(b"data: ") and b"[DONE]" not in cut.content
    await stack.dispatcher.settle()
    assert stack.outcome_rows() == [(None, LOCAL, "error", "upstream timed out mid-stream")]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "dispatcher"]
    assert "status=200 latency_ms=" in line and 'error="upstream timed out mid-stream"' in line


async def test_a_client_that_hangs_up_mid_stream_is_logged_and_reported(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    stack.local.stall = 0.3  # within the timeout: the stream goes on after the hang-up
    with caplog.at_level(logging.INFO, logger="dispatcher"):
        async with stack.http.stream(
            "POST", "/v1/chat/completions", json=chat("$hangs", "never mind", stream=True)
        ) as answer:
            assert answer.status_code == 200
            async for _chunk in answer.aiter_raw():
                break  # the first chunk, then the client goes away
        for _ in range(100):  # the dispatcher notices at its next write, 0.3 s on
            if any(r.name == "dispatcher" for r in caplog.records):
                break
            await asyncio.sleep(0.05)
    await stack.dispatcher.settle()
    assert stack.outcome_rows() == [(None, LOCAL, "error", "the client hung up mid-stream")]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "dispatcher"]
    assert 'error="the client hung up mid-stream"' in line


async def test_an_unreachable_upstream_is_reported_as_an_error(stack: Stack) -> None:
    sidecar_url = f"http://127.0.0.1:{stack.api.sidecar.config.api.listen.port}"
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    dispatcher = dispatcher_for(sidecar_url, nowhere, stack.cloud.base_url)
    runner, port = await serve(dispatcher.make_app())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            answer = await http.post("/v1/chat/completions", json=chat("$t", "hello?"))
        assert answer.status_code == 502
        await dispatcher.settle()
    finally:
        await runner.cleanup()
    assert stack.outcome_rows() == [(None, LOCAL, "error", "upstream unreachable: ConnectError")]


async def test_an_ok_call_without_a_route_stores_nothing(stack: Stack) -> None:
    question = await stack.api.say(ROOM, "an easy one", ago=0)
    answer = await stack.ask(question, "an easy one")
    assert answer.status_code == 200
    await stack.dispatcher.settle()
    assert stack.query("SELECT count(*) FROM outcomes") == [(0,)]
    assert stack.query("SELECT count(*) FROM effects WHERE key LIKE 'suggest:%'") == [(0,)]


async def test_a_call_too_large_to_claim_is_still_reported(stack: Stack) -> None:
    # The side-car refuses the claim (413 over api.max_body_bytes); the report is small.
    history = ({"role": "assistant", "content": "x" * MAX_BODY_BYTES},)
    stack.local.fail_with = 500
    failed = await stack.ask("$long", "after a long answer", history=history)
    assert failed.status_code == 500
    await stack.dispatcher.settle()
    assert stack.outcome_rows() == [(None, LOCAL, "error", "upstream answered 500")]


async def test_every_call_is_reported_with_only_its_turn_fields() -> None:
    sidecar = await RecordingSidecar().start()
    local = await FakeUpstream("local").start()
    dispatcher = dispatcher_for(sidecar.url, local.base_url, local.base_url)
    runner, port = await serve(dispatcher.make_app())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            answer = await http.post("/v1/chat/completions", json=chat("$question", "easy"))
            assert answer.json()["choices"][0]["message"]["content"] == "answer from local"
            await dispatcher.settle()
            [(path, report)] = sidecar.reports
            assert isinstance(report.pop("latency_ms"), int)
            assert (path, report) == (
                "/v1/outcome",
                {
                    "room_id": ROOM,
                    "turn_id": "$question",
                    "last_user_message": "[alice] easy",
                    "model": LOCAL,
                    "status": "ok",
                },
            )
            # A claim that timed out is not followed by a report: no second wait.
            sidecar.claim_delay = 1.0  # past the dispatcher's 0.5 s side-car timeout
            slow = await http.post("/v1/chat/completions", json=chat("$question", "again"))
            assert slow.json()["choices"][0]["message"]["content"] == "answer from local"
            await dispatcher.settle()
            assert len(sidecar.reports) == 1
    finally:
        await runner.cleanup()
        await local.stop()
        await sidecar.stop()


async def test_a_side_car_that_is_down_means_the_default_model_and_a_warning(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    await stack.api.route(ROOM, "/route cloud")
    await stop_api(stack.api)
    stack.local.fail_with = 500  # even a failing call: its report is not attempted
    with caplog.at_level(logging.WARNING, logger="route_sidecar.client"):
        failed = await stack.ask("$any", "is anyone there?")
        stack.local.fail_with = None
        answer = await stack.ask("$any", "is anyone there?")
        await stack.dispatcher.settle()
    assert failed.status_code == 500
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == "answer from local"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("automatic routing" in m for m in messages) == 2
    assert not any("outcome" in m for m in messages)  # no second try per call
    assert all(TOKEN not in m for m in messages)


async def test_models_are_listed_and_every_call_is_logged_on_one_line(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    models = (await stack.http.get("/v1/models")).json()
    assert {m["id"] for m in models["data"]} == {LOCAL, CLOUD}
    await stack.api.route(ROOM, "/route cloud")
    question = await stack.api.say(ROOM, "log me", ago=0)
    with caplog.at_level(logging.INFO, logger="dispatcher"):
        await stack.ask(question, "log me")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "dispatcher"]
    assert f"room={ROOM} turn={question} requested={LOCAL} served={CLOUD}" in line
    assert "override=true status=ok latency_ms=" in line
