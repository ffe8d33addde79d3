"""The reference dispatcher in front of two fake OpenAI-compatible upstreams, consulting a
real side-car over HTTP: routing follows the room, bytes pass through untouched, failures
are reported, and a side-car that is down means the default model."""

from __future__ import annotations

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

from .api_support import ROOM, TOKEN, Api, OpenApi, free_port, start_api, stop_api

LOCAL = "glm-4.7-flash:q4_K_M"
CLOUD = "ollama-cloud/glm-5.1"


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


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
        system = f"You are Hermes.\n**Matrix Room ID:** {ROOM}\n"
        if thread:
            system += f"**Matrix Thread:** {thread}\n"
        body = {
            "model": LOCAL,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"[alice] {text}"},
            ],
            **extra,
        }
        return await self.http.post("/v1/chat/completions", json=body)

    def outcomes(self) -> list[tuple[str, str]]:
        db = sqlite3.connect(f"file:{self.api.db_path}?mode=ro", uri=True)
        try:
            return list(db.execute("SELECT model, status FROM outcomes ORDER BY id"))
        finally:
            db.close()


@pytest_asyncio.fixture(loop_scope="session")
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    api = await start_api(tmp_path, OpenApi())
    local = await FakeUpstream("local").start()
    cloud = await FakeUpstream("cloud").start()
    runners = []
    sidecar_url = f"http://127.0.0.1:{api.sidecar.config.api.listen.port}"
    dispatcher = Dispatcher(
        DispatcherConfig(
            host="127.0.0.1",
            port=0,
            default_model=LOCAL,
            upstreams={
                LOCAL: Upstream(local.base_url),
                CLOUD: Upstream(cloud.base_url, api_key="k" * 20, model="glm-5.1"),
            },
            sidecar_url=sidecar_url,
            sidecar_token=TOKEN,
            sidecar_timeout=0.5,
            upstream_timeout=1.0,
        )
    )
    runner, port = await serve(dispatcher.make_app())
    runners.append(runner)
    stack = Stack(api, local, cloud, dispatcher, f"http://127.0.0.1:{port}")
    yield stack
    await stack.http.aclose()
    for runner in reversed(runners):
        await runner.cleanup()
    await local.stop()
    await cloud.stop()
    if not api.sidecar.stopping.is_set():  # one test stops it itself
        await stop_api(api)


pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_routing_follows_the_room_for_every_call_of_the_turn_then_returns(
    stack: Stack,
) -> None:
    first = await stack.ask("$t0", "before any route")
    assert first.json()["choices"][0]["message"]["content"] == "answer from local"
    await stack.api.route(ROOM, "/route cloud")
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
    assert stack.outcomes() == [(CLOUD, "ok"), (CLOUD, "ok")]


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
    assert stack.outcomes() == [(CLOUD, "error"), (CLOUD, "error")]


async def test_a_side_car_that_is_down_means_the_default_model_and_a_warning(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    await stack.api.route(ROOM, "/route cloud")
    await stop_api(stack.api)
    with caplog.at_level(logging.WARNING, logger="route_sidecar.client"):
        answer = await stack.ask("$any", "is anyone there?")
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == "answer from local"
    assert any("automatic routing" in r.getMessage() for r in caplog.records)
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


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
