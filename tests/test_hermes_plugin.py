"""SPEC "Integrations": the Hermes Agent plugin keeps route-sidecar's commands out of the agent.

The plugin is installed the way integrations/hermes/README.md says (a symlink in
`$HERMES_HOME/plugins/`, then `hermes plugins enable`), loaded by Hermes's own plugin
loader, and driven through Hermes's own `invoke_hook("pre_gateway_dispatch", ...)` with
real `MessageEvent`s built as Hermes's Matrix adapter builds them.

Needs `hermes-agent==0.19.0` in the test environment. Set ROUTE_SIDECAR_SKIP_HERMES=1
to skip this module where Hermes is deliberately not installed; otherwise a missing
install fails loudly instead of skipping.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
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
from hermes_cli.plugins_cmd import cmd_enable

PLUGIN_DIR = Path(__file__).resolve().parent.parent / "integrations" / "hermes"
PLUGIN = "route-sidecar"
HOOK = "pre_gateway_dispatch"
ROOM = "!deploys:example.org"
QUESTION = "Why did the deploy fail?"


def install_plugin(home: Path) -> None:
    """The two steps of integrations/hermes/README.md, under a throwaway HERMES_HOME."""
    (home / "plugins").mkdir(parents=True)
    (home / "plugins" / PLUGIN).symlink_to(PLUGIN_DIR, target_is_directory=True)
    cmd_enable(PLUGIN, allow_tool_override=False)  # what `hermes plugins enable` runs


def load_plugins(mp: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fresh Hermes plugin manager, discovered from HERMES_HOME; our plugin's entry."""
    mp.setattr(hermes_plugins, "_plugin_manager", None)
    hermes_plugins.discover_plugins()
    entries = [p for p in hermes_plugins.get_plugin_manager().list_plugins() if p["key"] == PLUGIN]
    assert len(entries) == 1, "Hermes did not discover the plugin in $HERMES_HOME/plugins"
    return entries[0]


@pytest.fixture(scope="module", autouse=True)
def hermes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("hermes-home")
        mp.setenv("HERMES_HOME", str(home))
        for name in ("ROUTE_SIDECAR_PREFIXES", "HERMES_SAFE_MODE", "HERMES_ENABLE_PROJECT_PLUGINS"):
            mp.delenv(name, raising=False)
        install_plugin(home)
        entry = load_plugins(mp)
        assert entry["enabled"], entry["error"]
        assert entry["hooks"] == 1
        assert hermes_plugins.has_hook(HOOK)
        yield


def message(text: str, event_id: str = "$command") -> MessageEvent:
    """A Matrix text message as Hermes's Matrix adapter hands it to the gateway."""
    source = SessionSource(
        platform=Platform.MATRIX,
        chat_id=ROOM,
        chat_name="Deploys",
        chat_type="group",
        user_id="@alice:example.org",
        user_name="Alice",
        thread_id=event_id,
        parent_chat_id=ROOM,
        message_id=event_id,
    )
    return MessageEvent(
        text=text,
        message_type=MessageType.COMMAND if text.startswith("/") else MessageType.TEXT,
        source=source,
        raw_message={"msgtype": "m.text", "body": text},
        message_id=event_id,
    )


def dispatch(text: str) -> list[Any]:
    """What the gateway's `_handle_message` gets back from the plugins for this message."""
    return hermes_plugins.invoke_hook(HOOK, event=message(text), gateway=None, session_store=None)


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


def test_route_again_is_dropped_like_any_single_line_command() -> None:
    assert_skipped(dispatch("/route cloud again"))
    assert_skipped(dispatch("!route big retry"))


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
    # The configured prefixes replace the defaults, as the side-car's routing.prefixes does.
    assert dispatch("!route cloud") == []
    assert dispatch(f"/route cloud\n{QUESTION}") == []


def test_a_bad_prefix_setting_stops_the_plugin_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ROUTE_SIDECAR_PREFIXES", "/route cloud,!route")
    entry = load_plugins(monkeypatch)
    assert not entry["enabled"]
    assert "ROUTE_SIDECAR_PREFIXES" in (entry["error"] or "")
    assert not hermes_plugins.has_hook(HOOK)


def test_a_symlinked_plugin_needs_nothing_installed_in_hermes_venv(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Hermes's own venv usually lacks route-sidecar: the symlinked folder finds bot/commands.py.
    monkeypatch.setitem(sys.modules, "bot.commands", None)  # makes `import bot.commands` fail
    # The plugin registers its copy under this name; setitem makes the undo remove it again.
    monkeypatch.setitem(sys.modules, "route_sidecar_commands", None)
    entry = load_plugins(monkeypatch)
    assert entry["enabled"], entry["error"]
    assert sys.modules["hermes_plugins.route_sidecar"].commands.__name__ == "route_sidecar_commands"
    assert_skipped(dispatch("!route cloud"))
    assert dispatch(f"/route cloud\n{QUESTION}") == [{"action": "rewrite", "text": QUESTION}]


def test_a_copied_plugin_uses_an_installed_side_car_or_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HERMES_HOME", str(tmp_path))
    shutil.copytree(
        PLUGIN_DIR, tmp_path / "plugins" / PLUGIN, ignore=shutil.ignore_patterns("__pycache__")
    )
    cmd_enable(PLUGIN, allow_tool_override=False)
    entry = load_plugins(monkeypatch)
    assert entry["enabled"], entry["error"]
    assert sys.modules["hermes_plugins.route_sidecar"].commands.__name__ == "bot.commands"
    assert_skipped(dispatch("/route cloud"))

    monkeypatch.setitem(sys.modules, "bot.commands", None)
    entry = load_plugins(monkeypatch)
    assert not entry["enabled"]
    assert "symlink the plugin folder" in (entry["error"] or "")
