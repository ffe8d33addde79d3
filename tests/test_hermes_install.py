"""SPEC "Integrations", issue 13 item 4: the Hermes plugin installs the ecosystem's way.

The pip steps of integrations/hermes/README.md, run from the README with bash against
this venv's Hermes (`make test` runs this module in the venv of every supported Hermes
version): `pip install ./integrations/hermes` adds the plugin and nothing else (none of
the side-car's server dependencies), Hermes's own loader finds it through the entry-point
group `hermes_agent.plugins`, and the documented way of enabling it works on this
version. pip's target is redirected (PIP_TARGET) to a folder put on sys.path, so the
install stays out of the shared venv.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import sys
import tomllib
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

from .hermes_support import REPO, readme_block, run_readme_block

PLUGIN = "route-sidecar"
DISTRIBUTION = "route-sidecar-hermes"
PACKAGE = "route_sidecar_hermes"
HOOK = "pre_gateway_dispatch"
HERMES_BIN = Path(sys.executable).parent
HERMES_VERSION = importlib.metadata.version("hermes-agent")
QUESTION = "Why did the deploy fail?"


def side_car_dependencies() -> set[str]:
    """The side-car's own requirements (pyproject.toml), as normalised names."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {
        normal(re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0]) for req in project["dependencies"]
    }


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's pip step, run once; its files land in the returned folder."""
    site = tmp_path_factory.mktemp("site")
    home = tmp_path_factory.mktemp("hermes-home")
    run_readme_block(
        "route-sidecar: install with pip",
        HERMES_BIN,
        home,
        {"PIP_TARGET": str(site), "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    return site


@pytest.fixture
def on_path(installed: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The installed plugin visible to this process (and to the `hermes` it starts), the
    side-car's own modules not: the plugin must work without them."""
    monkeypatch.syspath_prepend(str(installed))
    monkeypatch.setenv("PYTHONPATH", str(installed))
    for name in (
        "route_sidecar",
        "route_sidecar.core",
        "route_sidecar.core.commands",
        "route_sidecar.core.questions",
        "integrations",
        "integrations.hermes",
    ):
        monkeypatch.setitem(sys.modules, name, None)
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
        monkeypatch.delitem(sys.modules, name)
    importlib.invalidate_caches()
    yield installed
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
        del sys.modules[name]


def test_pip_installs_the_plugin_and_none_of_the_side_cars_server_dependencies(
    installed: Path,
) -> None:
    top_level = {path.name for path in installed.iterdir()}
    dist_info = [name for name in top_level if name.endswith(".dist-info")]
    assert top_level == {PACKAGE, *dist_info}, top_level
    assert [normal(name.split("-")[0]) for name in dist_info] == [normal(PACKAGE)]
    # ... and it asks for nothing, so pip pulls nothing into Hermes's environment.
    metadata = importlib.metadata.Distribution.at(installed / dist_info[0]).metadata
    assert metadata.get_all("Requires-Dist") is None
    assert {"mautrix", "aiohttp", "aiosqlite", "ruamel-yaml"} <= side_car_dependencies()
    for dependency in side_car_dependencies():
        assert not any(normal(name).startswith(dependency) for name in top_level), dependency
    # The side-car's rules came along as copies of route_sidecar/core/commands.py and
    # route_sidecar/core/questions.py.
    for name in ("commands", "questions"):
        copied = (installed / PACKAGE / f"{name}.py").read_text()
        assert copied == (REPO / "route_sidecar" / "core" / f"{name}.py").read_text()


def load(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fresh Hermes plugin manager, as the gateway makes at start; our plugin's entry."""
    monkeypatch.setattr(hermes_plugins, "_plugin_manager", None)
    manager = hermes_plugins.get_plugin_manager()
    manager.discover_and_load()
    entries = [p for p in manager.list_plugins() if p["key"] == PLUGIN]
    assert len(entries) == 1, manager.list_plugins()
    entry: dict[str, Any] = entries[0]
    return entry


def enable_as_documented(home: Path) -> None:
    """README step 2 on this Hermes version: `hermes plugins enable`, or on a Hermes whose
    command does not find pip-installed plugins (0.13), the config.yaml lines by hand."""
    if HERMES_VERSION == "0.13.0":
        with pytest.raises(AssertionError, match="is not installed or bundled"):
            run_readme_block("route-sidecar: enable", HERMES_BIN, home)
        (home / "config.yaml").write_text(readme_block("route-sidecar: enable by hand"))
    else:
        run_readme_block("route-sidecar: enable", HERMES_BIN, home)


def dispatch(text: str) -> list[Any]:
    source = SessionSource(
        platform=Platform.MATRIX,
        chat_id="!deploys:example.org",
        chat_type="group",
        user_id="@alice:example.org",
        user_name="Alice",
        thread_id="$event1",
    )
    event = MessageEvent(
        text=text,
        message_type=MessageType.COMMAND if text.startswith("/") else MessageType.TEXT,
        source=source,
        raw_message={"msgtype": "m.text", "body": text},
        message_id="$event1",
    )
    results: list[Any] = hermes_plugins.invoke_hook(
        HOOK, event=event, gateway=None, session_store=None
    )
    return results


def test_hermes_loads_the_pip_installed_plugin_once_enabled_as_documented(
    on_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HERMES_HOME", str(tmp_path))
    for name in ("ROUTE_SIDECAR_PREFIXES", "ROUTE_SIDECAR_QUESTION_TTL", "HERMES_SAFE_MODE"):
        monkeypatch.delenv(name, raising=False)
    entry = load(monkeypatch)
    assert (entry["source"], entry["enabled"]) == ("entrypoint", False)  # opt-in: not yet

    enable_as_documented(tmp_path)
    entry = load(monkeypatch)
    assert (entry["source"], entry["enabled"], entry["error"]) == ("entrypoint", True, None)
    assert entry["hooks"] == 1
    plugin = sys.modules[PACKAGE]
    assert plugin.__file__ is not None
    assert Path(plugin.__file__).parent == on_path / PACKAGE
    assert plugin.commands.__name__ == f"{PACKAGE}.commands"  # its own copy, not bot's
    assert [r["action"] for r in dispatch("!route cloud")] == ["skip"]
    assert dispatch(f"/route cloud\n{QUESTION}") == [{"action": "rewrite", "text": QUESTION}]
    assert dispatch("/route big again") == [{"action": "rewrite", "text": QUESTION}]
    assert dispatch("hello") == []


def test_with_the_linked_folder_too_hermes_loads_the_pip_installed_plugin(
    on_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HERMES_HOME", str(tmp_path))
    run_readme_block("route-sidecar: install as a linked folder", HERMES_BIN, tmp_path)
    run_readme_block("route-sidecar: enable", HERMES_BIN, tmp_path)  # finds the folder
    entry = load(monkeypatch)
    assert (entry["source"], entry["enabled"], entry["error"]) == ("entrypoint", True, None)
