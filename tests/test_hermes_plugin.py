"""SPEC "Integrations": the Hermes Agent plugin keeps route-sidecar's commands out of the agent.

The plugin is installed the way integrations/hermes/README.md says (its linked-folder
steps, run from the README with bash: a symlink in `$HERMES_HOME/plugins/`, then Hermes's
own `hermes plugins enable`), loaded by Hermes's own plugin loader, and driven through
Hermes's own `invoke_hook("pre_gateway_dispatch", ...)` with real `MessageEvent`s built as
Hermes's Matrix adapter builds them. SPEC "Retry": the plugin answers `/route <target>
again` with the room's last question. The pip way is tests/test_hermes_install.py.

`make test` runs this module in the venv of every supported Hermes version (0.13.0 and
0.19.0, tests/hermes_support.py). Set ROUTE_SIDECAR_SKIP_HERMES=1 to skip this module
where Hermes is deliberately not installed; otherwise a missing install fails loudly
instead of skipping.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

if os.environ.get("ROUTE_SIDECAR_SKIP_HERMES") == "1":
    pytest.skip(
        "ROUTE_SIDECAR_SKIP_HERMES=1: Hermes Agent is not installed here on purpose",
        allow_module_level=True,
    )

import hermes_cli.plugins as hermes_plugins
from gateway.config import Platform
from gateway.platforms.base import MessageEvent, MessageType
from gateway.session import SessionSource

from .hermes_support import PLUGIN_DIR, install_plugin, run_readme_block, stamping_hermes

PLUGIN = "route-sidecar"
HOOK = "pre_gateway_dispatch"
MODULE = "hermes_plugins.route_sidecar"
ROOM = "!deploys:example.org"
OTHER_ROOM = "!support:example.org"
QUESTION = "Why did the deploy fail?"
OLDER_QUESTION = "Which host runs the build?"
ENV = ("ROUTE_SIDECAR_PREFIXES", "ROUTE_SIDECAR_QUESTION_TTL")
_event_ids = itertools.count(1)


class Clock:
    """The plugin's wall clock, under the test's control."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


HERMES_BIN = Path(sys.executable).parent  # this Hermes version's `hermes` command


def load_plugins(mp: pytest.MonkeyPatch, clock: Clock | None = None) -> dict[str, Any]:
    """A fresh Hermes plugin manager, discovered from HERMES_HOME; our plugin's entry.
    Loading runs the plugin module again: no room has a last question yet."""
    mp.setattr(hermes_plugins, "_plugin_manager", None)
    hermes_plugins.discover_plugins()
    entries = [p for p in hermes_plugins.get_plugin_manager().list_plugins() if p["key"] == PLUGIN]
    assert len(entries) == 1, "Hermes did not discover the plugin in $HERMES_HOME/plugins"
    if clock is not None and entries[0]["enabled"]:
        mp.setattr(plugin_module(), "utcnow", clock)
    entry: dict[str, Any] = entries[0]
    return entry


def has_hook() -> bool:
    """Whether a plugin registered the hook (Hermes 0.13 has no module-level `has_hook`)."""
    return bool(hermes_plugins.get_plugin_manager()._hooks.get(HOOK))


def plugin_module() -> ModuleType:
    return sys.modules[MODULE]


@pytest.fixture(scope="module", autouse=True)
def hermes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("hermes-home")
        mp.setenv("HERMES_HOME", str(home))
        for name in (*ENV, "HERMES_SAFE_MODE", "HERMES_ENABLE_PROJECT_PLUGINS"):
            mp.delenv(name, raising=False)
        install_plugin(home, HERMES_BIN)
        entry = load_plugins(mp)
        assert entry["enabled"], entry["error"]
        assert entry["hooks"] == 1
        assert has_hook()
        yield


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(autouse=True)
def fresh_plugin(hermes: None, monkeypatch: pytest.MonkeyPatch, clock: Clock) -> None:
    """Each test starts with the plugin just loaded: no room has a last question."""
    assert load_plugins(monkeypatch, clock)["enabled"]


def message(text: str, room: str = ROOM, content: dict[str, Any] | None = None) -> MessageEvent:
    """A Matrix text message as Hermes's Matrix adapter hands it to the gateway."""
    event_id = f"$event{next(_event_ids)}"
    source = SessionSource(
        platform=Platform.MATRIX,
        chat_id=room,
        chat_name="Deploys",
        chat_type="group",
        user_id="@alice:example.org",
        user_name="Alice",
        thread_id=event_id,
        parent_chat_id=room,
        message_id=event_id,
    )
    return MessageEvent(
        text=text,
        message_type=MessageType.COMMAND if text.startswith("/") else MessageType.TEXT,
        source=source,
        raw_message=content if content is not None else {"msgtype": "m.text", "body": text},
        message_id=event_id,
    )


def dispatch(text: str, room: str = ROOM, content: dict[str, Any] | None = None) -> list[Any]:
    """What the gateway's `_handle_message` gets back from the plugins for this message."""
    event = message(text, room, content)
    results: list[Any] = hermes_plugins.invoke_hook(
        HOOK, event=event, gateway=None, session_store=None
    )
    return results


def reasks(question: str) -> list[dict[str, str]]:
    return [{"action": "rewrite", "text": question}]


def assert_skipped(results: list[Any]) -> None:
    assert [r["action"] for r in results] == ["skip"], results
    assert isinstance(results[0]["reason"], str) and results[0]["reason"]


# --- single-line commands: the side-car answers them, the agent never sees them -----------


@pytest.mark.parametrize(
    "text",
    [
        "/route cloud",
        "!route cloud",
        "!ROUTE status",
        "/route",
        "!route",
        "/Route Cloud --turns 3",
        "!route cloud --for 30m",
        "/route auto",
        "/route help",
        "/route cloud   ",
    ],
)
def test_a_single_line_command_is_dropped(text: str) -> None:
    assert_skipped(dispatch(text))


def test_a_malformed_command_with_a_question_is_dropped_the_side_car_explains_it() -> None:
    # `/route status` takes no question: the side-car replies with what to type instead.
    assert_skipped(dispatch(f"/route status\n{QUESTION}"))
    assert_skipped(dispatch(f"!route cloud --turns many\n{QUESTION}"))


# --- the multi-line form: the agent answers the question ---------------------------------


@pytest.mark.parametrize(
    ("text", "question"),
    [
        (f"/route cloud\n{QUESTION}", QUESTION),
        (f"!route cloud\n{QUESTION}", QUESTION),
        (f"/ROUTE Cloud\n{QUESTION}", QUESTION),
        (f"/route cloud  \n\n\n   {QUESTION}   \n\n", QUESTION),
        (
            f"/route big --turns 2\n{QUESTION}\n\nThe log says:\n  exit 137",
            QUESTION + "\n\nThe log says:\n  exit 137",
        ),
    ],
)
def test_the_multi_line_form_is_rewritten_to_its_question(text: str, question: str) -> None:
    assert dispatch(text) == [{"action": "rewrite", "text": question}]


def test_the_rewritten_message_is_no_longer_a_command_to_hermes() -> None:
    event = message(f"/route cloud\n{QUESTION}")
    assert event.get_command() == "route"  # what made Hermes reply "Unknown command"
    (result,) = hermes_plugins.invoke_hook(HOOK, event=event, gateway=None, session_store=None)
    rewritten = dataclasses.replace(event, text=result["text"])  # as gateway/run.py applies it
    assert rewritten.get_command() is None
    assert rewritten.text == QUESTION


# --- again: the agent answers the room's last question again -------------------------------


@pytest.mark.parametrize(
    "command",
    [
        "/route cloud again",
        "!route cloud again",
        "/route cloud retry",
        "!route big retry",
        "/ROUTE Cloud AGAIN",
        "!Route cloud Retry   ",
        "/route model:ollama/glm-5.1 again",
    ],
)
def test_again_is_rewritten_to_the_rooms_last_question(command: str) -> None:
    assert dispatch(OLDER_QUESTION) == []
    assert dispatch(f"  {QUESTION}\n\n") == []
    assert dispatch(command) == reasks(QUESTION)


def test_commands_never_become_the_last_question() -> None:
    assert dispatch(QUESTION) == []
    for command in (
        "/route status",
        "!route cloud",
        "/route cloud --turns 2",
        "/route auto",
        "!route nonsense --turns many",
        f"/route status\n{OLDER_QUESTION}",  # malformed: takes no question
        "/route again",  # malformed: no target
        f"/route cloud again\n{OLDER_QUESTION}",  # malformed: again takes no new question
    ):
        assert_skipped(dispatch(command))
    assert dispatch("/route cloud again") == reasks(QUESTION)


def test_the_question_of_the_multi_line_form_is_the_last_question() -> None:
    assert dispatch(OLDER_QUESTION) == []
    assert dispatch(f"/route local\n{QUESTION}") == reasks(QUESTION)
    assert dispatch("!route cloud again") == reasks(QUESTION)


def test_again_after_again_asks_the_same_question_again() -> None:
    assert dispatch(QUESTION) == []
    assert dispatch("/route local again") == reasks(QUESTION)
    assert dispatch("!route cloud retry") == reasks(QUESTION)
    assert dispatch("/route big again") == reasks(QUESTION)


def test_each_room_has_its_own_last_question() -> None:
    assert dispatch(QUESTION, room=ROOM) == []
    assert dispatch(OLDER_QUESTION, room=OTHER_ROOM) == []
    assert dispatch("/route cloud again", room=ROOM) == reasks(QUESTION)
    assert dispatch("/route cloud again", room=OTHER_ROOM) == reasks(OLDER_QUESTION)
    assert_skipped(dispatch("/route cloud again", room="!quiet:example.org"))


def test_with_no_question_yet_again_is_dropped_the_side_car_explains_it() -> None:
    assert_skipped(dispatch("/route cloud again"))
    assert_skipped(dispatch("!route cloud retry"))
    assert_skipped(dispatch("/route cloud"))
    assert_skipped(dispatch("/route cloud again"))  # a command is no question to re-ask


def test_a_question_older_than_the_ttl_is_not_asked_again(clock: Clock) -> None:
    assert dispatch(QUESTION) == []
    clock.advance(timedelta(minutes=15))  # the default TTL, the side-car's intent_ttl
    assert dispatch("/route cloud again") == reasks(QUESTION)
    clock.advance(timedelta(seconds=1))
    assert_skipped(dispatch("/route cloud again"))
    # A newer question is fresh again; `again` itself never made the old one fresh.
    assert dispatch(OLDER_QUESTION) == []
    assert dispatch("/route cloud again") == reasks(OLDER_QUESTION)


def test_the_rewritten_again_is_no_longer_a_command_to_hermes() -> None:
    assert dispatch(QUESTION) == []
    event = message("/route cloud again")
    assert event.get_command() == "route"
    (result,) = hermes_plugins.invoke_hook(HOOK, event=event, gateway=None, session_store=None)
    rewritten = dataclasses.replace(event, text=result["text"])  # as gateway/run.py applies it
    assert rewritten.get_command() is None
    assert rewritten.text == QUESTION


def test_notices_and_edits_are_never_the_last_question() -> None:
    # Hermes drops both before the hook, unless MATRIX_PROCESS_NOTICES lets notices through;
    # the side-car ignores both, so the plugin must not remember them either.
    assert dispatch(QUESTION) == []
    notice = {"msgtype": "m.notice", "body": OLDER_QUESTION}
    assert dispatch(OLDER_QUESTION, content=notice) == []
    edit = {
        "msgtype": "m.text",
        "body": f"* {OLDER_QUESTION}",
        "m.new_content": {"msgtype": "m.text", "body": OLDER_QUESTION},
        "m.relates_to": {"rel_type": "m.replace", "event_id": "$event1"},
    }
    assert dispatch(OLDER_QUESTION, content=edit) == []
    assert dispatch("/route cloud again") == reasks(QUESTION)
    # The side-car records no intent for a notice's `again`: nothing for Hermes to answer.
    again_notice = {"msgtype": "m.notice", "body": "/route cloud again"}
    assert_skipped(dispatch("/route cloud again", content=again_notice))


def test_the_filter_forgets_expired_questions_and_works_outside_hermes(clock: Clock) -> None:
    plugin = plugin_module()
    route_filter = plugin.RouteFilter(("/route", "!route"), timedelta(minutes=5), clock=clock)
    assert route_filter.action(ROOM, QUESTION) is None
    assert route_filter.action(OTHER_ROOM, OLDER_QUESTION) is None
    assert route_filter.action(ROOM, "/route cloud again") == reasks(QUESTION)[0]
    clock.advance(timedelta(minutes=5, seconds=1))
    assert route_filter.action(ROOM, "!route cloud") == {
        "action": "skip",
        "reason": plugin.SKIP_REASON,
    }
    assert len(route_filter.last_questions) == 0  # both rooms' questions are gone from memory


# --- everything else reaches the agent untouched ------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        QUESTION,
        "/model ollama/glm-4.7-flash",
        "/model x",
        "/help",
        "/new",
        "please /route cloud this one",
        "I typed !route cloud and nothing happened",
        f"{QUESTION}\n/route cloud",
        "/router status",
        "!routes",
        "route cloud",
        "",
    ],
)
def test_other_messages_are_left_alone(text: str) -> None:
    assert dispatch(text) == []


# --- configuration ------------------------------------------------------------------------


def test_prefixes_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTE_SIDECAR_PREFIXES", " !rt, /rt ,")
    assert load_plugins(monkeypatch)["enabled"]
    assert_skipped(dispatch("!rt cloud"))
    assert_skipped(dispatch("/RT status"))
    assert dispatch(f"!Rt cloud\n{QUESTION}") == [{"action": "rewrite", "text": QUESTION}]
    assert dispatch("/rt cloud again") == reasks(QUESTION)
    # The configured prefixes replace the defaults, as the side-car's routing.prefixes does.
    assert dispatch(f"/route cloud\n{QUESTION}") == []
    assert dispatch("!route cloud") == []
    # ... so `!route cloud` was a question to Hermes, as it is to the side-car.
    assert dispatch("!rt big again") == reasks("!route cloud")


@pytest.mark.parametrize(
    ("value", "ttl"),
    [("90s", timedelta(seconds=90)), (" 1H30m ", timedelta(hours=1, minutes=30)), ("", None)],
)
def test_the_question_ttl_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, clock: Clock, value: str, ttl: timedelta | None
) -> None:
    monkeypatch.setenv("ROUTE_SIDECAR_QUESTION_TTL", value)
    assert load_plugins(monkeypatch, clock)["enabled"]
    ttl = ttl or timedelta(minutes=15)  # unset or blank: the side-car's default intent_ttl
    assert dispatch(QUESTION) == []
    clock.advance(ttl)
    assert dispatch("/route cloud again") == reasks(QUESTION)
    clock.advance(timedelta(seconds=1))
    assert_skipped(dispatch("/route cloud again"))


@pytest.mark.parametrize("value", ["15 minutes", "15", "0s", "-5m", "1d", "m", "15m,"])
def test_a_bad_question_ttl_stops_the_plugin_and_says_why(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("ROUTE_SIDECAR_QUESTION_TTL", value)
    entry = load_plugins(monkeypatch)
    assert not entry["enabled"]
    assert "ROUTE_SIDECAR_QUESTION_TTL" in (entry["error"] or "")
    assert not has_hook()


def test_a_bad_prefix_setting_stops_the_plugin_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ROUTE_SIDECAR_PREFIXES", "/route cloud,!route")
    entry = load_plugins(monkeypatch)
    assert not entry["enabled"]
    assert "ROUTE_SIDECAR_PREFIXES" in (entry["error"] or "")
    assert not has_hook()


def test_a_symlinked_plugin_needs_nothing_installed_in_hermes_venv(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Hermes's own venv usually lacks route-sidecar: the linked folder's commands.py and
    # questions.py are links to the checkout's route_sidecar/core/ files, loaded as the
    # plugin's own modules.
    for name in ("commands", "questions"):
        monkeypatch.setitem(sys.modules, f"route_sidecar.core.{name}", None)  # import fails
    entry = load_plugins(monkeypatch)
    assert entry["enabled"], entry["error"]
    for name in ("commands", "questions"):
        module = getattr(plugin_module(), name)
        assert module.__name__ == f"{MODULE}.{name}"
        linked = PLUGIN_DIR.parent.parent / "route_sidecar" / "core" / f"{name}.py"
        assert Path(module.__file__).resolve() == linked
    assert_skipped(dispatch("!route cloud"))
    assert dispatch(f"/route cloud\n{QUESTION}") == [{"action": "rewrite", "text": QUESTION}]
    assert dispatch("!route big again") == reasks(QUESTION)


def copy_plugin(home: Path, *, keep_links: bool) -> None:
    """The plugin folder copied into HERMES_HOME (not linked), then enabled as documented.
    `keep_links`: copied as `cp -r` does, its links to route_sidecar/ left dangling; otherwise as
    `cp -rL` does, with copies of the linked files."""
    shutil.copytree(
        PLUGIN_DIR,
        home / "plugins" / PLUGIN,
        symlinks=keep_links,
        ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"),
    )
    run_readme_block("route-sidecar: enable", HERMES_BIN, home)


def test_a_plugin_folder_copied_with_its_links_followed_works_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HERMES_HOME", str(tmp_path))
    copy_plugin(tmp_path, keep_links=False)
    for name in ("commands", "questions"):
        monkeypatch.setitem(sys.modules, f"route_sidecar.core.{name}", None)
    entry = load_plugins(monkeypatch)
    assert entry["enabled"], entry["error"]
    assert plugin_module().commands.__name__ == f"{MODULE}.commands"
    assert Path(plugin_module().commands.__file__).parent == tmp_path / "plugins" / PLUGIN
    assert_skipped(dispatch("/route cloud"))
    assert dispatch(QUESTION) == []
    assert dispatch("/route cloud again") == reasks(QUESTION)


def test_a_copied_plugin_with_dangling_links_uses_an_installed_side_car_or_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HERMES_HOME", str(tmp_path))
    copy_plugin(tmp_path, keep_links=True)
    assert not (tmp_path / "plugins" / PLUGIN / "commands.py").exists()  # a dangling link
    entry = load_plugins(monkeypatch)
    assert entry["enabled"], entry["error"]
    assert plugin_module().commands.__name__ == "route_sidecar.core.commands"
    assert plugin_module().questions.__name__ == "route_sidecar.core.questions"
    assert_skipped(dispatch("/route cloud"))
    assert dispatch(QUESTION) == []
    assert dispatch("/route cloud again") == reasks(QUESTION)

    for name in ("commands", "questions"):
        with monkeypatch.context() as mp:
            mp.setitem(sys.modules, f"route_sidecar.core.{name}", None)
            entry = load_plugins(mp)
            assert not entry["enabled"]
            assert f"cannot load {name}.py" in (entry["error"] or "")
            assert "install the plugin with pip" in (entry["error"] or "")
            assert "symlink the plugin folder" in (entry["error"] or "")


# --- Hermes 0.17 and later: every main-loop call says where it comes from ------------------

STAMPING_HERMES = stamping_hermes()  # `llm_request` middleware came in 0.17.0
SESSION = {
    "platform": "matrix",
    "chat_id": ROOM,
    "message_id": "$question",
    "thread_id": "$thread-root",
    "user_id": "@alice:example.org",
    "user_name": "Alice",
}
STAMP = {
    "room_id": ROOM,
    "event_id": "$question",
    "thread_id": "$thread-root",
    "sender": "@alice:example.org",
}


def main_loop_request() -> dict[str, Any]:
    """The OpenAI client's keyword arguments as Hermes's main loop builds them."""
    return {
        "model": "glm-4.7-flash:q4_K_M",
        "messages": [
            {"role": "system", "content": "You are Hermes Agent."},
            {"role": "user", "content": f"[Alice] {QUESTION}"},
        ],
        "stream": True,
        "extra_body": {"keep_alive": "5m"},
    }


def through_hermes_middleware(
    request: dict[str, Any], session: dict[str, str] | None, api_mode: str = "chat_completions"
) -> Any:
    """Hermes's own `apply_llm_request_middleware`, called as agent/conversation_loop.py
    calls it, inside the session context the gateway sets for a message."""
    from gateway.session_context import clear_session_vars, set_session_vars
    from hermes_cli.middleware import apply_llm_request_middleware

    tokens = set_session_vars(**session) if session is not None else None
    try:
        return apply_llm_request_middleware(
            request,
            task_id="task",
            turn_id="turn",
            api_request_id="req",
            session_id="session",
            platform="matrix",
            model=request["model"],
            provider="custom",
            base_url="http://127.0.0.1:8080/v1",
            api_mode=api_mode,
            api_call_count=1,
        )
    finally:
        if tokens is not None:
            clear_session_vars(tokens)


@pytest.mark.skipif(not STAMPING_HERMES, reason="Hermes before 0.17 has no llm_request middleware")
def test_every_main_loop_call_is_stamped_with_its_matrix_room_message_thread_and_sender() -> None:
    request = main_loop_request()
    result = through_hermes_middleware(request, SESSION)
    assert result.changed
    assert result.payload["extra_body"] == {"keep_alive": "5m", "matrix_context": STAMP}
    assert {k: v for k, v in result.payload.items() if k != "extra_body"} == {
        k: v for k, v in request.items() if k != "extra_body"
    }
    assert request == main_loop_request(), "the request Hermes passed in is left as it was"


@pytest.mark.skipif(not STAMPING_HERMES, reason="Hermes before 0.17 has no llm_request middleware")
def test_a_dm_message_is_stamped_without_a_thread() -> None:
    result = through_hermes_middleware(main_loop_request(), {**SESSION, "thread_id": ""})
    assert result.payload["extra_body"]["matrix_context"] == {**STAMP, "thread_id": None}


@pytest.mark.skipif(not STAMPING_HERMES, reason="Hermes before 0.17 has no llm_request middleware")
@pytest.mark.parametrize(
    ("session", "api_mode"),
    [
        (None, "chat_completions"),  # the CLI or cron: no message
        ({**SESSION, "platform": "telegram"}, "chat_completions"),
        ({**SESSION, "message_id": ""}, "chat_completions"),
        ({**SESSION, "chat_id": ""}, "chat_completions"),
        (SESSION, "anthropic_messages"),  # not an OpenAI-style body for a dispatcher
        (SESSION, "codex_responses"),
    ],
)
def test_calls_outside_a_matrix_message_or_not_chat_completions_are_left_alone(
    session: dict[str, str] | None, api_mode: str
) -> None:
    result = through_hermes_middleware(main_loop_request(), session, api_mode)
    assert not result.changed and result.payload == main_loop_request()


def test_the_stamp_is_registered_exactly_where_hermes_offers_the_middleware() -> None:
    manager = hermes_plugins.get_plugin_manager()
    registered = getattr(manager, "_middleware", {}).get("llm_request", [])
    names = [getattr(callback, "__name__", "") for callback in registered]
    if STAMPING_HERMES:
        assert names.count("stamp_llm_request") == 1
    else:  # Hermes 0.13 to 0.16: today's behaviour, the hook alone
        assert names == [] and not hasattr(hermes_plugins.PluginContext, "register_middleware")
    assert has_hook()


# --- MSC4391: a structured invocation (gomuks) ---------------------------------------------


def invocation(arguments: dict[str, Any], body: str = "/route@route:example.org cloud") -> Any:
    content = {
        "msgtype": "m.text",
        "body": body,
        "m.mentions": {"user_ids": ["@route:example.org"]},
        "org.matrix.msc4391.command": {"command": "route", "arguments": arguments},
    }
    return dispatch(body, content=content)


def test_a_structured_invocation_is_a_command_its_arguments_winning_over_its_body() -> None:
    assert_skipped(invocation({"target": "cloud"}))
    assert_skipped(invocation({"target": "status"}, body="/route@route:example.org"))
    assert_skipped(invocation({"target": 7}))  # unreadable: the side-car says what is wrong


def test_a_structured_again_is_rewritten_to_the_rooms_last_question() -> None:
    assert dispatch(QUESTION) == []
    assert invocation({"target": "cloud", "again": True}) == reasks(QUESTION)


def test_another_commands_invocation_is_left_alone() -> None:
    body = "/ban@draupnir:example.org @mallory:example.org"
    content: dict[str, Any] = {
        "msgtype": "m.text",
        "body": body,
        "org.matrix.msc4391.command": {"command": "ban", "arguments": {"user": "@m:x"}},
    }
    assert dispatch(body, content=content) == []
