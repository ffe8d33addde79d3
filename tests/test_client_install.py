"""Issue 15, item 6: the dispatcher's client installs and imports with httpx alone. The
distribution `route-sidecar-client` (integrations/client), installed as a dispatcher
author installs it (`pip install ./integrations/client`, not editable, in .venv-client,
which `make setup` builds), brings httpx and nothing of the side-car's server; a
dispatcher that has only it claims from a real side-car and gets the room's override."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api_support import ROOM, TOKEN, Api

REPO = Path(__file__).resolve().parent.parent
CLIENT_PYTHON = REPO / ".venv-client" / "bin" / "python"
CLOUD = "ollama-cloud/glm-5.1"
# The side-car's own dependencies (pyproject.toml) and itself: none may come with the client.
SERVER_DISTRIBUTIONS = {
    "route-sidecar",
    "mautrix",
    "aiohttp",
    "aiosqlite",
    "prometheus-client",
    "ruamel.yaml",
    "uvloop",
    "orjson",
}
SERVER_MODULES = {"route_sidecar", "mautrix", "aiohttp", "aiosqlite", "prometheus_client", "ruamel"}
# httpx and what httpx 0.27/0.28 require, on Python 3.11.
HTTPX_CLOSURE = {"httpx", "httpcore", "h11", "anyio", "idna", "certifi", "sniffio"}
PACKAGING = {"pip", "setuptools", "wheel"}


def client_python() -> Path:
    if not CLIENT_PYTHON.exists():
        pytest.fail(".venv-client is missing: `make setup` (run by `make test`) installs it")
    return CLIENT_PYTHON


def run_in_client_venv(script: str, *args: str, cwd: Path) -> str:
    """A script in .venv-client, from a folder outside the checkout (so nothing of the
    side-car can be imported from the working directory)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(
        [str(client_python()), "-c", script, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_client_distribution_requires_httpx_and_brings_nothing_of_the_server(
    tmp_path: Path,
) -> None:
    probe = (
        "import json, importlib.metadata as m\n"
        "print(json.dumps({'requires': m.requires('route-sidecar-client'),"
        " 'installed': [d.metadata['Name'] for d in m.distributions()]}))\n"
    )
    found = json.loads(run_in_client_venv(probe, cwd=tmp_path))
    assert [re.split(r"[<>=!~;\s\[]", requirement)[0] for requirement in found["requires"]] == [
        "httpx"
    ]
    installed = {normalized(name) for name in found["installed"]}
    assert "route-sidecar-client" in installed
    assert not installed & {normalized(name) for name in SERVER_DISTRIBUTIONS}
    allowed = HTTPX_CLOSURE | PACKAGING | {"route-sidecar-client", "typing-extensions"}
    assert installed <= {normalized(name) for name in allowed}, installed


def test_the_installed_client_is_the_sidecars_own_source(tmp_path: Path) -> None:
    """One source for each rule: the wheel holds copies of route_sidecar/client.py and the
    two core modules it uses (integrations/client links to them)."""
    probe = (
        "import json, route_sidecar_client, route_sidecar_client.core.turns as t,"
        " route_sidecar_client.core.commands as c\n"
        "print(json.dumps([route_sidecar_client.__file__, t.__file__, c.__file__]))\n"
    )
    files = [Path(name) for name in json.loads(run_in_client_venv(probe, cwd=tmp_path))]
    assert all(".venv-client" in str(name) and not name.is_symlink() for name in files)
    sources = [
        REPO / "route_sidecar" / "client.py",
        REPO / "route_sidecar" / "core" / "turns.py",
        REPO / "route_sidecar" / "core" / "commands.py",
    ]
    assert [name.read_bytes() for name in files] == [name.read_bytes() for name in sources]


CLAIM = """
import asyncio, json, sys
from route_sidecar_client import RouteClient

async def main():
    url, token, room = sys.argv[1:4]
    body = {
        "model": "glm-4.7-flash:q4_K_M",
        "messages": [
            {"role": "system", "content": f"**Matrix Room ID:** {room}\\n**Matrix Thread:** $t"},
            {"role": "user", "content": "[Alice] Why is CI red?"},
        ],
    }
    async with RouteClient(url, token, timeout=5.0) as client:
        decision = await client.claim(request=body)
        down = await RouteClient("http://127.0.0.1:9", token, timeout=0.5).claim(room_id=room)
    print(json.dumps({
        "override": decision.override, "model": decision.model,
        "intent_id": decision.intent_id, "down": [down.override, down.reason],
        "server_modules": sorted(
            m for m in sys.modules if m.split(".")[0] in set(json.loads(sys.argv[4]))
        ),
    }))

asyncio.run(main())
"""


async def test_a_dispatcher_with_only_the_client_gets_the_rooms_override(
    api: Api, tmp_path: Path
) -> None:
    intent_id = await api.route()
    listen = api.sidecar.config.api.listen
    process = await asyncio.create_subprocess_exec(
        str(client_python()),
        "-c",
        CLAIM,
        f"http://{listen.host}:{listen.port}",
        TOKEN,
        ROOM,
        json.dumps(sorted(SERVER_MODULES)),
        cwd=tmp_path,
        env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    answer = json.loads(out)
    assert answer == {
        "override": True,
        "model": CLOUD,
        "intent_id": intent_id,
        "down": [False, "unavailable"],  # a side-car that is down: automatic, no error
        "server_modules": [],
    }


def test_the_reference_dispatcher_imports_the_client_not_the_server() -> None:
    probe = (
        "import sys, integrations.dispatcher.dispatcher\n"
        "print(sorted(m for m in sys.modules if m == 'route_sidecar'"
        " or m.startswith('route_sidecar.')), 'route_sidecar_client' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[] True"
