"""SPEC "Integrations": the LiteLLM proxy hook claims, rewrites the model group, adds the
metadata and reports what really served every call (routed or not, SPEC "Retry"), with
real litellm, a real side-car and real HTTP.

The hook is loaded the way the proxy loads `litellm_settings: callbacks:` from
integrations/litellm/proxy.example.yaml (`get_instance_fn`, then `litellm.callbacks`).
`litellm.Router` never calls `async_pre_call_hook` (a proxy hook), so each call runs the
proxy's own pre-call path, `litellm.proxy.utils.ProxyLogging.pre_call_hook`, then
`Router.acompletion(**data)` with what it returned, as the chat-completions endpoint does.
The upstream is one fake OpenAI-compatible server answering for models "local" and "cloud".

Needs litellm (and the four packages `litellm.proxy.utils` imports: fastapi, backoff,
redis, orjson); ROUTE_SIDECAR_SKIP_LITELLM=1 skips the module where they are not installed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("ROUTE_SIDECAR_SKIP_LITELLM") == "1":
    pytest.skip(
        "ROUTE_SIDECAR_SKIP_LITELLM=1: litellm is not installed in this environment",
        allow_module_level=True,
    )

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no cost-map download

import litellm
import pytest_asyncio
from aiohttp import web
from litellm.caching.caching import DualCache
from litellm.integrations.custom_logger import CustomLogger
from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER
from litellm.proxy._types import UserAPIKeyAuth
from litellm.proxy.types_utils.utils import get_instance_fn
from litellm.proxy.utils import ProxyLogging
from litellm.responses.streaming_iterator import drain_logging_tasks
from ruamel.yaml import YAML

from .api_support import ALICE, ROOM, TOKEN, Api, OpenApi, free_port, room_path, start_api, stop_api

BOB = "@bob:example.org"

EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "integrations/litellm/proxy.example.yaml"
TARGETS = '{"cloud": "cloud-model", "local": "local-model"}'
SIDECAR_CLOUD_MODEL = "ollama-cloud/glm-5.1"  # tests.api_support's target "cloud"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Upstream:
    """One OpenAI-compatible server: every answer names the model it was asked for;
    `fail_with` makes it answer that status instead. Remembers every body it received."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.fail_with: int | None = None
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append(body)
        if self.fail_with:
            return web.json_response({"error": {"message": "boom"}}, status=self.fail_with)
        return web.json_response(
            {
                "id": f"cmpl-{len(self.seen)}",
                "object": "chat.completion",
                "created": 1,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": f"answer from {body['model']}"},
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
            }
        )

    async def start(self) -> Upstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def deployment(group: str, model: str, upstream: Upstream) -> dict[str, Any]:
    return {
        "model_name": group,
        "litellm_params": {
            "model": f"openai/{model}",
            "api_base": upstream.base_url,
            "api_key": "k",
        },
        "model_info": {"id": f"{model}-deployment"},
    }


def load_hook_as_the_proxy_does() -> CustomLogger:
    """`litellm_settings.callbacks` of the example config, resolved next to that file."""
    settings = YAML(typ="safe").load(EXAMPLE_CONFIG.read_text())["litellm_settings"]
    hook = get_instance_fn(value=settings["callbacks"], config_file_path=str(EXAMPLE_CONFIG))
    assert isinstance(hook, CustomLogger)
    return hook


class Proxy:
    """The proxy's chat-completions path, minus FastAPI: pre-call hooks, then the Router."""

    def __init__(self, api: Api, upstream: Upstream, hook: Any, router: litellm.Router) -> None:
        self.api, self.upstream, self.hook, self.router = api, upstream, hook, router
        self.logging = ProxyLogging(user_api_key_cache=DualCache())
        self.key = UserAPIKeyAuth(api_key="sk-hermes-agent", user_id="hermes")
        self.routed: list[dict[str, Any]] = []  # each call's data as the hooks left it

    async def ask(
        self,
        text: str,
        thread: str | None,
        model: str = "local-model",
        call_id: str = "",
        context: dict[str, Any] | None = None,
    ) -> Any:
        """One call of the agent: Hermes's system prompt lines, then the user's message;
        `context`: the `matrix_context` the Hermes plugin stamps (Hermes 0.17 and later)."""
        system = f"You are Hermes.\n**Matrix Room ID:** {ROOM}\n"
        if thread:
            system += f"**Matrix Thread:** {thread}\n"
        data: dict[str, Any] = {
            "model": model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"[alice] {text}"},
            ],
            "litellm_call_id": call_id or str(uuid.uuid4()),
            "metadata": {"headers": {"user-agent": "hermes"}, "user_api_key_user_id": "hermes"},
        }
        if context is not None:
            data["matrix_context"] = context
        data = await self.logging.pre_call_hook(
            user_api_key_dict=self.key, data=data, call_type="acompletion"
        )
        # A copy: the Router adds its own keys to this metadata dict as it routes.
        self.routed.append({**data, "metadata": dict(data["metadata"])})
        return await self.router.acompletion(**data)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(f"file:{self.api.db_path}?mode=ro", uri=True)
        try:
            return list(db.execute(sql))
        finally:
            db.close()

    async def outcomes(self) -> list[tuple[Any, ...]]:
        """The side-car's outcome rows, once LiteLLM's success callbacks have run."""
        await settle()
        db = sqlite3.connect(f"file:{self.api.db_path}?mode=ro", uri=True)
        try:
            return list(
                db.execute(
                    "SELECT intent_id, model, status, latency_ms, detail FROM outcomes ORDER BY id"
                )
            )
        finally:
            db.close()


async def settle() -> None:
    """LiteLLM logs after answering: a task it spawns queues the success callbacks on its
    logging worker, which runs them later."""
    await drain_logging_tasks()
    await GLOBAL_LOGGING_WORKER.flush()


@asynccontextmanager
async def proxy_stack(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    targets: str = TARGETS,
    extra_groups: tuple[tuple[str, str], ...] = (),
) -> AsyncIterator[Proxy]:
    api = await start_api(tmp_path, OpenApi())
    upstream = await Upstream().start()
    port = api.sidecar.config.api.listen.port
    monkeypatch.setenv("ROUTE_SIDECAR_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("ROUTE_SIDECAR_TOKEN", TOKEN)
    monkeypatch.setenv("ROUTE_SIDECAR_TARGETS", targets)
    hook = load_hook_as_the_proxy_does()
    monkeypatch.setattr(litellm, "callbacks", [hook])
    groups = (("local-model", "local"), ("cloud-model", "cloud"), *extra_groups)
    router = litellm.Router(
        model_list=[deployment(group, model, upstream) for group, model in groups],
        num_retries=0,
        disable_cooldowns=True,
    )
    try:
        yield Proxy(api, upstream, hook, router)
    finally:
        await settle()
        litellm.logging_callback_manager.remove_callback_from_all_lists(hook)
        await hook.aclose()
        await upstream.stop()
        if not api.sidecar.stopping.is_set():  # one test stops it itself
            await stop_api(api)


@pytest_asyncio.fixture(loop_scope="session")
async def proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Proxy]:
    async with proxy_stack(tmp_path, monkeypatch) as running:
        yield running


async def test_a_routed_turn_goes_to_the_cloud_group_and_reports_what_served(
    proxy: Proxy,
) -> None:
    intent_id = await proxy.api.route(ROOM, "/route cloud")
    question = await proxy.api.say(ROOM, "the hard question", ago=0)
    answers = [await proxy.ask("the hard question", question) for _ in range(2)]
    assert [a.choices[0].message.content for a in answers] == ["answer from cloud"] * 2
    assert [body["model"] for body in proxy.upstream.seen] == ["cloud", "cloud"]
    assert all("metadata" not in body for body in proxy.upstream.seen)  # kept in LiteLLM
    for data in proxy.routed:
        assert data["model"] == "cloud-model"
        metadata = data["metadata"]
        assert metadata["route_intent_id"] == intent_id
        assert metadata["route_target"] == "cloud"
        assert metadata["matrix_room_id"] == ROOM
        assert metadata["route_turn_id"] == question
        assert metadata["headers"] == {"user-agent": "hermes"}  # LiteLLM's own keys stay
        assert metadata["user_api_key_user_id"] == "hermes"
    outcomes = await proxy.outcomes()
    assert [(i, m, s) for i, m, s, _, _ in outcomes] == [(intent_id, "openai/cloud", "ok")] * 2
    for *_, latency_ms, detail in outcomes:
        assert isinstance(latency_ms, int) and 0 <= latency_ms < 10_000
        assert "model_group=cloud-model" in detail
        assert "model_id=cloud-deployment" in detail  # the x-litellm-model-id
        assert f"api_base={proxy.upstream.base_url}" in detail

    after = await proxy.api.say(ROOM, "an easy one", ago=0)
    third = await proxy.ask("an easy one", after)
    assert third.choices[0].message.content == "answer from local"
    assert proxy.upstream.seen[-1]["model"] == "local"
    assert proxy.routed[-1]["model"] == "local-model"
    assert "route_intent_id" not in proxy.routed[-1]["metadata"]
    # Reported too, but the side-car keeps no ok outcome of a turn that did not fail.
    assert len(await proxy.outcomes()) == 2


async def test_a_stamped_call_is_placed_by_its_stamp_attributed_and_never_forwarded_with_it(
    proxy: Proxy,
) -> None:
    await proxy.api.route(ROOM, "/route cloud")
    question = await proxy.api.say(ROOM, "the hard question", sender=BOB, ago=0)
    stamp = {"room_id": ROOM, "event_id": question, "thread_id": None, "sender": BOB}
    answer = await proxy.ask("the hard question", None, context=stamp)
    assert answer.choices[0].message.content == "answer from cloud"
    other = await proxy.api.say(ROOM, "another", sender=BOB, ago=0)
    unrouted = await proxy.ask("another", None, context={**stamp, "event_id": other})
    assert unrouted.choices[0].message.content == "answer from local"
    assert all("matrix_context" not in body for body in proxy.upstream.seen)
    routed, plain = (data["metadata"] for data in proxy.routed)
    # Where LiteLLM's logging reads who and where (Langfuse: user, session, tags).
    assert (routed["trace_user_id"], routed["session_id"]) == (BOB, ROOM)
    assert routed["tags"] == ["route:cloud"] and routed["route_turn_id"] == question
    assert (plain["trace_user_id"], plain["session_id"]) == (BOB, ROOM)
    assert "tags" not in plain and plain["route_turn_id"] == other


async def test_an_upstream_error_is_reported_as_an_error_outcome(proxy: Proxy) -> None:
    intent_id = await proxy.api.route(ROOM, "/route cloud")
    question = await proxy.api.say(ROOM, "this will fail", ago=0)
    proxy.upstream.fail_with = 500
    with pytest.raises(litellm.InternalServerError):
        await proxy.ask("this will fail", question)
    assert [body["model"] for body in proxy.upstream.seen] == ["cloud"]
    [(reported, model, status, latency_ms, detail)] = await proxy.outcomes()
    assert (reported, model, status) == (intent_id, "openai/cloud", "error")
    assert isinstance(latency_ms, int)
    assert "model_id=cloud-deployment" in detail
    assert "error=InternalServerError/500" in detail
    assert "boom" not in detail  # the error's text stays out of the side-car


async def test_a_side_car_that_is_down_means_the_requested_model(
    proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    await proxy.api.route(ROOM, "/route cloud")
    question = await proxy.api.say(ROOM, "is anyone there?", ago=0)
    await stop_api(proxy.api)
    with caplog.at_level(logging.WARNING, logger="route_sidecar.client"):
        answer = await proxy.ask("is anyone there?", question)
        proxy.upstream.fail_with = 500
        with pytest.raises(litellm.InternalServerError):
            await proxy.ask("is anyone there?", question)
        await settle()
    assert answer.choices[0].message.content == "answer from local"
    assert [body["model"] for body in proxy.upstream.seen] == ["local", "local"]
    assert proxy.routed[-1]["model"] == "local-model"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("automatic routing" in m for m in messages) == 2
    # A claim without an answer is not followed by a report: no second wait per call.
    assert not any("outcome" in m for m in messages)
    assert not proxy.hook._calls
    assert await proxy.outcomes() == []


async def test_a_failed_call_without_a_route_is_reported_and_queues_a_suggestion(
    proxy: Proxy,
) -> None:
    question = await proxy.api.say(ROOM, "the local model fails on this", ago=0)
    proxy.upstream.fail_with = 500
    with pytest.raises(litellm.InternalServerError):
        await proxy.ask("the local model fails on this", question)
    [(intent_id, model, status, latency_ms, detail)] = await proxy.outcomes()
    assert (intent_id, model, status) == (None, "openai/local", "error")
    assert isinstance(latency_ms, int)
    assert "model_id=local-deployment" in detail
    assert "error=InternalServerError/500" in detail
    assert "boom" not in detail
    [(room_id, turn)] = proxy.query("SELECT room_id, turn FROM outcomes")
    assert room_id == ROOM and turn.startswith(f"{question}/")
    assert proxy.query("SELECT room_id FROM effects WHERE key LIKE 'suggest:%'") == [(ROOM,)]


async def test_a_call_without_a_route_that_then_succeeds_is_reported_and_forgotten(
    proxy: Proxy,
) -> None:
    question = await proxy.api.say(ROOM, "flaky", ago=0)
    call_id = str(uuid.uuid4())
    proxy.upstream.fail_with = 500
    with pytest.raises(litellm.InternalServerError):
        await proxy.ask("flaky", question, call_id=call_id)
    await settle()
    assert call_id in proxy.hook._calls  # a failure is not the end: a retry may follow
    proxy.upstream.fail_with = None
    answer = await proxy.ask("flaky", question, call_id=call_id)
    assert answer.choices[0].message.content == "answer from local"
    outcomes = await proxy.outcomes()
    # The ok outcome is stored because the turn had failed, and withdraws the suggestion.
    assert [(i, m, s) for i, m, s, _, _ in outcomes] == [
        (None, "openai/local", "error"),
        (None, "openai/local", "ok"),
    ]
    assert proxy.query("SELECT count(*) FROM effects WHERE key LIKE 'suggest:%'") == [(0,)]
    assert call_id not in proxy.hook._calls


async def test_every_claimed_call_is_remembered_with_its_turn_only_and_boundedly(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The proxy loads the hook outside sys.modules: patch the limit where the hook reads it.
    monkeypatch.setitem(type(proxy.hook)._remember.__globals__, "MAX_REMEMBERED_CALLS", 2)
    proxy.upstream.fail_with = 500  # failed calls stay remembered: a retry may follow
    call_ids = [str(uuid.uuid4()) for _ in range(3)]
    for n, call_id in enumerate(call_ids):
        with pytest.raises(litellm.InternalServerError):
            await proxy.ask(f"question {n}", f"$thread{n}", call_id=call_id)
    await settle()
    assert list(proxy.hook._calls) == call_ids[1:]  # the oldest went first
    remembered = proxy.hook._calls[call_ids[2]]
    assert remembered.last_user_message == "[alice] question 2"
    assert (remembered.decision.room_id, remembered.decision.turn_id) == (ROOM, "$thread2")
    assert remembered.decision.override is False
    assert remembered.decision.metadata == {}  # the report does not send it
    assert remembered.model_group == "local-model"
    assert len(await proxy.outcomes()) == 3  # each failure was reported all the same


async def test_the_messages_remembered_are_capped_in_total_not_only_the_calls(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = len("[alice] ") + 2 * 1000  # two of the questions below, whole
    monkeypatch.setitem(type(proxy.hook)._remember.__globals__, "MAX_REMEMBERED_CHARS", limit)
    proxy.upstream.fail_with = 500  # failed calls stay remembered: a retry may follow
    call_ids = [str(uuid.uuid4()) for _ in range(3)]
    for n, call_id in enumerate(call_ids):
        with pytest.raises(litellm.InternalServerError):
            await proxy.ask(str(n) * 1000, f"$thread{n}", call_id=call_id)
    await settle()
    assert list(proxy.hook._calls) == call_ids[2:], "the oldest went first"
    assert proxy.hook._calls[call_ids[2]].last_user_message == "[alice] " + "2" * 1000
    assert proxy.hook._remembered_chars == len("[alice] ") + 1000
    proxy.upstream.fail_with = None
    await proxy.ask("2" * 1000, "$thread2", call_id=call_ids[2])  # the retry succeeds
    await settle()
    assert not proxy.hook._calls and proxy.hook._remembered_chars == 0


async def test_a_target_without_a_model_group_uses_the_side_cars_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The operator named a model group after the side-car's model instead of mapping it.
    async with proxy_stack(
        tmp_path,
        monkeypatch,
        targets='{"local": "local-model"}',
        extra_groups=((SIDECAR_CLOUD_MODEL, "cloud-by-name"),),
    ) as proxy:
        intent_id = await proxy.api.route(ROOM, "/route cloud")
        question = await proxy.api.say(ROOM, "unmapped target", ago=0)
        answer = await proxy.ask("unmapped target", question)
        assert answer.choices[0].message.content == "answer from cloud-by-name"
        assert proxy.routed[-1]["model"] == SIDECAR_CLOUD_MODEL
        [(reported, model, status, _, detail)] = await proxy.outcomes()
        assert (reported, model, status) == (intent_id, "openai/cloud-by-name", "ok")
        assert "model_id=cloud-by-name-deployment" in detail


async def test_without_a_side_car_url_the_hook_leaves_calls_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with proxy_stack(tmp_path, monkeypatch) as proxy:
        intent_id = await proxy.api.route(ROOM, "/route cloud")
        monkeypatch.delenv("ROUTE_SIDECAR_URL")
        with caplog.at_level(logging.WARNING, logger="route_sidecar"):
            inert = load_hook_as_the_proxy_does()
            monkeypatch.setattr(litellm, "callbacks", [inert])
            try:
                question = await proxy.api.say(ROOM, "no url", ago=0)
                answer = await proxy.ask("no url", question)
            finally:
                litellm.logging_callback_manager.remove_callback_from_all_lists(inert)
        hook_loggers = {"route_sidecar.litellm", "route_sidecar.client"}
        warnings = [r.getMessage() for r in caplog.records if r.name in hook_loggers]
        assert warnings == ["ROUTE_SIDECAR_URL is not set: the route hook leaves every call alone"]
        assert answer.choices[0].message.content == "answer from local"
        assert proxy.routed[-1]["metadata"] == {
            "headers": {"user-agent": "hermes"},
            "user_api_key_user_id": "hermes",
        }
        pending = await proxy.api.client.get(room_path(ROOM), headers=AUTH)
        assert (pending.json()["id"], pending.json()["state"]) == (intent_id, "pending")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"ROUTE_SIDECAR_TARGETS": "{cloud: cloud-model}"}, "ROUTE_SIDECAR_TARGETS"),
        ({"ROUTE_SIDECAR_TARGETS": '["cloud-model"]'}, "ROUTE_SIDECAR_TARGETS"),
        ({"ROUTE_SIDECAR_TARGETS": '{"cloud": 3}'}, "ROUTE_SIDECAR_TARGETS"),
        ({"ROUTE_SIDECAR_TOKEN": ""}, "ROUTE_SIDECAR_TOKEN"),
        ({"ROUTE_SIDECAR_TIMEOUT": "soon"}, "ROUTE_SIDECAR_TIMEOUT"),
    ],
)
def test_a_bad_setting_stops_the_proxy_at_start_naming_it(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    monkeypatch.setenv("ROUTE_SIDECAR_URL", "http://127.0.0.1:29334")
    monkeypatch.setenv("ROUTE_SIDECAR_TOKEN", TOKEN)
    monkeypatch.setenv("ROUTE_SIDECAR_TARGETS", TARGETS)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=named):
        load_hook_as_the_proxy_does()


def test_the_hook_imports_the_client_distribution_not_the_side_car(tmp_path: Path) -> None:
    """Issue 15, item 6: the proxy's environment needs route-sidecar-client (httpx alone),
    not the side-car: importing the hook loads `route_sidecar_client` and no module of
    the server's package."""
    probe = (
        "import sys\n"
        f"sys.path.insert(0, {str(EXAMPLE_CONFIG.parent)!r})\n"
        "import route_hook\n"
        "print(sorted(m for m in sys.modules if m == 'route_sidecar'"
        " or m.startswith('route_sidecar.')), route_hook.RouteClient.__module__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[] route_sidecar_client"


# ---- attribution in LiteLLM's own logging: its Langfuse callback with the real SDK --------


class LangfuseIngestion:
    """A local stand-in for Langfuse's ingestion endpoint: it keeps what the SDK exports
    (OTLP over HTTP, protobuf), so no Langfuse server is needed."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.runner: web.AppRunner | None = None
        self.port = free_port()

    async def handle(self, request: web.Request) -> web.Response:
        if request.path.endswith("/otel/v1/traces"):
            self.bodies.append(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def start(self) -> LangfuseIngestion:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def traces(self) -> list[dict[str, Any]]:
        """Each exported span's attributes whose trace names a user, session or tags."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        found: list[dict[str, Any]] = []
        for body in self.bodies:
            export = ExportTraceServiceRequest()
            export.ParseFromString(body)
            for resource in export.resource_spans:
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        found.append({a.key: _otel_value(a.value) for a in span.attributes})
        return found


def _otel_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_otel_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


async def test_langfuse_attributes_each_call_to_its_asker_room_and_route(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from litellm.integrations.langfuse.langfuse_sdk import flush_langfuse_tracing

    ingestion = await LangfuseIngestion().start()
    monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", "pk-lf-route-sidecar-test")
    monkeypatch.setenv("LANGFUSE_SECRET_KEY", "sk-lf-route-sidecar-test")
    monkeypatch.setenv("LANGFUSE_HOST", f"http://127.0.0.1:{ingestion.port}")
    try:
        async with proxy_stack(tmp_path, monkeypatch) as proxy:
            monkeypatch.setattr(litellm, "success_callback", ["langfuse"])
            await proxy.api.route(ROOM, "/route cloud")
            hard = await proxy.api.say(ROOM, "the hard question", sender=BOB, ago=0)
            stamp = {"room_id": ROOM, "event_id": hard, "thread_id": None, "sender": BOB}
            await proxy.ask("the hard question", None, context=stamp)  # routed, stamped
            easy = await proxy.api.say(ROOM, "an easy one", sender=ALICE, ago=0)
            await proxy.ask("an easy one", easy)  # unrouted, placed by its room line
            await settle()
            # In a thread: the exporter posts to this event loop's server meanwhile.
            assert await asyncio.to_thread(flush_langfuse_tracing, 10_000)
    finally:
        await ingestion.stop()
    traces = [
        (t.get("user.id"), t.get("session.id"), tuple(t.get("langfuse.trace.tags") or ()))
        for t in ingestion.traces()
        if "user.id" in t or "session.id" in t
    ]
    assert (BOB, ROOM, ("route:cloud",)) in traces
    assert (ALICE, ROOM, ()) in traces
    assert len(traces) == 2, traces
