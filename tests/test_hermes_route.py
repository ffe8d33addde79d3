"""SPEC "Integrations": from Hermes 0.17 the plugin asks the side-car itself (route.py).

Driven through Hermes's own middleware runners (`apply_llm_request_middleware`, then
`run_llm_execution_middleware`, as agent/conversation_loop.py calls them), inside the
session context the gateway sets for a Matrix message, against a real side-car (its lookup
API over HTTP, its store). `make test` runs this module in the venv of every supported
Hermes version: on 0.13 (no middleware) the plugin says so once and does as before. The
real gateway, end to end, is tests/e2e/test_hermes_gateway.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_asyncio

if os.environ.get("ROUTE_SIDECAR_SKIP_HERMES") == "1":
    pytest.skip(
        "ROUTE_SIDECAR_SKIP_HERMES=1: Hermes Agent is not installed here on purpose",
        allow_module_level=True,
    )

import hermes_cli.plugins as hermes_plugins

from .api_support import AUTH, TOKEN, Api, OpenApi, free_port, start_api, stop_api
from .hermes_support import install_plugin, stamping_hermes

ROOM = "!routed:example.org"  # tests.api_support's room
CLOUD = "ollama-cloud/glm-5.1"  # tests.api_support's target "cloud"
ASKER = "@bob:example.org"
PLUGIN_LOGGER = "hermes_plugins.route_sidecar.route"
pytestmark = pytest.mark.asyncio(loop_scope="module")


def load_plugin(mp: pytest.MonkeyPatch, home: Path, url: str | None) -> Any:
    """Hermes's plugin manager, loaded afresh from HERMES_HOME with the side-car's URL."""
    if url is None:
        mp.delenv("ROUTE_SIDECAR_URL", raising=False)
    else:
        mp.setenv("ROUTE_SIDECAR_URL", url)
        mp.setenv("ROUTE_SIDECAR_TOKEN", TOKEN)
    mp.setattr(hermes_plugins, "_plugin_manager", None)
    hermes_plugins.discover_plugins()
    return hermes_plugins.get_plugin_manager()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("hermes-home")
        mp.setenv("HERMES_HOME", str(home))
        install_plugin(home, Path(sys.executable).parent)
        yield home


@pytest_asyncio.fixture(loop_scope="module")
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    running = await start_api(tmp_path, OpenApi())
    yield running
    await stop_api(running)


def api_url(api: Api) -> str:
    listen = api.sidecar.config.api.listen
    return f"http://{listen.host}:{listen.port}"


def session(event_id: str) -> dict[str, str]:
    return {
        "platform": "matrix",
        "chat_id": ROOM,
        "message_id": event_id,
        "thread_id": event_id,
        "user_id": ASKER,
    }


def one_call(
    event_id: str, text: str, served: str | None = None, fails: bool = False
) -> tuple[dict[str, Any], str]:
    """One main-loop call as Hermes makes it: the request middleware, then the call
    through the execution middleware to an endpoint answering with `served` (or the
    model asked for). (The request as sent, the model the endpoint saw.)"""
    from gateway.session_context import clear_session_vars, set_session_vars
    from hermes_cli.middleware import apply_llm_request_middleware, run_llm_execution_middleware

    request = {
        "model": "glm-4.7-flash:q4_K_M",
        "messages": [
            {"role": "system", "content": "You are Hermes Agent."},
            {"role": "user", "content": f"[Bob] {text}"},
        ],
    }
    context = {
        "task_id": "task",
        "turn_id": "turn",
        "api_request_id": f"req-{event_id}-{text}",
        "session_id": "session",
        "platform": "matrix",
        "model": request["model"],
        "provider": "custom",
        "base_url": "http://127.0.0.1:1/v1",
        "api_mode": "chat_completions",
        "api_call_count": 1,
    }
    seen: list[str] = []

    def endpoint(sent: dict[str, Any]) -> Any:
        seen.append(sent["model"])
        if fails:
            raise ConnectionError("the model server hung up")
        return SimpleNamespace(model=served or sent["model"], choices=[])

    tokens = set_session_vars(**session(event_id))
    try:
        sent = apply_llm_request_middleware(request, **context).payload
        try:
            run_llm_execution_middleware(sent, endpoint, original_request=request, **context)
        except ConnectionError:
            assert fails
    finally:
        clear_session_vars(tokens)
    return sent, seen[0]


def outcomes(api: Api) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{api.db_path}?mode=ro", uri=True)
    try:
        return list(db.execute("SELECT intent_id, model, status FROM outcomes ORDER BY id"))
    finally:
        db.close()


def asker_of(manager: Any) -> Any:
    callbacks = manager._middleware.get("llm_execution", [])
    assert len(callbacks) == 1, "the plugin registers one execution middleware"
    return callbacks[0].__self__


@pytest.mark.skipif(not stamping_hermes(), reason="Hermes before 0.17 has no middleware")
async def test_a_routed_call_gets_the_routes_model_and_its_report_names_what_answered(
    home: Path, api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = load_plugin(monkeypatch, home, api_url(api))
    intent_id = await api.route()
    question = await api.say(ROOM, "the hard question", sender=ASKER, ago=0)
    sent, asked = await asyncio.to_thread(
        one_call, question, "the hard question", "ollama/glm-5.1:cloud"
    )
    assert asked == CLOUD  # the endpoint is asked for the route's model by name
    context = sent["extra_body"]["matrix_context"]
    assert context["event_id"] == question and len(context["call_id"]) == 32
    later, asked_later = await asyncio.to_thread(one_call, "$later", "the next question")
    assert asked_later == "glm-4.7-flash:q4_K_M"  # the next turn: as asked
    assert await asyncio.to_thread(asker_of(manager).flush)
    await asyncio.sleep(0.2)
    # The report names the model the endpoint answered with, not the one asked for.
    assert outcomes(api) == [(intent_id, "ollama/glm-5.1:cloud", "ok")]
    assert later["model"] == "glm-4.7-flash:q4_K_M"


@pytest.mark.skipif(not stamping_hermes(), reason="Hermes before 0.17 has no middleware")
async def test_a_dispatcher_that_also_claims_and_reports_counts_the_call_once(
    home: Path, api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    from route_sidecar.client import RouteClient

    manager = load_plugin(monkeypatch, home, api_url(api))
    intent_id = await api.route()
    question = await api.say(ROOM, "asked twice", sender=ASKER, ago=0)
    sent, _ = await asyncio.to_thread(one_call, question, "asked twice", CLOUD)
    # The dispatcher behind Hermes sees the body as sent, matrix_context and all.
    body = {**{k: v for k, v in sent.items() if k != "extra_body"}, **sent["extra_body"]}
    async with RouteClient(api_url(api), TOKEN, timeout=5.0) as dispatcher:
        decision = await dispatcher.claim(request=body)
        assert (decision.override, decision.intent_id, decision.reason) == (
            True,
            intent_id,
            "bound",  # the plugin's answer, repeated: not a second call of the turn
        )
        assert await dispatcher.report(decision, model=CLOUD, status="ok", request=body)
    assert await asyncio.to_thread(asker_of(manager).flush)
    await asyncio.sleep(0.2)
    assert outcomes(api) == [(intent_id, CLOUD, "ok")]
    shown = (await api.client.get(f"/v1/rooms/{ROOM}/intent", headers=AUTH)).json()
    assert shown["bound_turns"] == 1


@pytest.mark.skipif(not stamping_hermes(), reason="Hermes before 0.17 has no middleware")
async def test_a_failed_call_is_reported_as_an_error_for_the_retry_suggestion(
    home: Path, api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = load_plugin(monkeypatch, home, api_url(api))
    question = await api.say(ROOM, "it breaks", sender=ASKER, ago=0)
    await asyncio.to_thread(one_call, question, "it breaks", None, True)
    assert await asyncio.to_thread(asker_of(manager).flush)
    await asyncio.sleep(0.2)
    assert outcomes(api) == [(None, "glm-4.7-flash:q4_K_M", "error")]


@pytest.mark.skipif(not stamping_hermes(), reason="Hermes before 0.17 has no middleware")
async def test_a_side_car_that_is_down_costs_the_route_only_and_warns_once_a_minute(
    home: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    load_plugin(monkeypatch, home, f"http://127.0.0.1:{free_port()}")
    caplog.set_level(logging.WARNING)
    for n in range(3):
        sent, asked = await asyncio.to_thread(one_call, f"$q{n}", "anything")
        assert asked == "glm-4.7-flash:q4_K_M" and sent["model"] == asked
    warnings = [r for r in caplog.records if "not answering" in r.getMessage()]
    assert len(warnings) == 1


def test_without_a_url_the_plugin_only_stamps(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = load_plugin(monkeypatch, home, None)
    assert getattr(manager, "_middleware", {}).get("llm_execution", []) == []


def test_before_hermes_017_the_plugin_says_once_that_asking_needs_it(
    home: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    manager = load_plugin(monkeypatch, home, "http://127.0.0.1:29334")
    said = [r.getMessage() for r in caplog.records if "needs Hermes 0.17" in r.getMessage()]
    if stamping_hermes():
        assert said == [] and len(manager._middleware["llm_execution"]) == 1
    else:
        assert len(said) == 1 and not getattr(manager, "_middleware", {}).get("llm_request")


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        ({"ROUTE_SIDECAR_URL": "127.0.0.1:29334", "ROUTE_SIDECAR_TOKEN": "t"}, "ROUTE_SIDECAR_URL"),
        ({"ROUTE_SIDECAR_URL": "http://127.0.0.1:29334"}, "ROUTE_SIDECAR_TOKEN"),
        (
            {
                "ROUTE_SIDECAR_URL": "http://127.0.0.1:29334",
                "ROUTE_SIDECAR_TOKEN": "t",
                "ROUTE_SIDECAR_TIMEOUT": "fast",
            },
            "ROUTE_SIDECAR_TIMEOUT",
        ),
    ],
)
def test_a_bad_setting_stops_the_plugin_and_says_which(
    home: Path, environ: dict[str, str], names: str
) -> None:
    route = __import__("hermes_plugins.route_sidecar.route", fromlist=["route"])
    with pytest.raises(ValueError, match=names):
        route.settings_from_env(environ)


def test_the_side_cars_url_is_read_with_its_port_and_path(home: Path) -> None:
    route = __import__("hermes_plugins.route_sidecar.route", fromlist=["route"])
    settings = route.settings_from_env(
        {"ROUTE_SIDECAR_URL": "https://sidecar.example:8443/base/", "ROUTE_SIDECAR_TOKEN": "t"}
    )
    assert (settings.host, settings.port, settings.https, settings.base_path) == (
        "sidecar.example",
        8443,
        True,
        "/base",
    )
    assert route.settings_from_env({}) is None
