"""Hermes Agent 0.19.0's real Matrix gateway (`hermes gateway run`), run as its own process
from its own venv (`.venv-hermes/0.19.0`, with Hermes's `matrix` extra: `make setup`)
against the tests' Synapse: the route-sidecar plugin installed and enabled as
integrations/hermes/README.md says, its model provider (`custom`) pointed at the reference
dispatcher or straight at the fake models (demo/upstream.py's `ModelServer`), the plugin
asking the side-car itself when given its URL and token (`plugin_asks`).

Offline: no tools on Matrix but those asked for (`todo` works offline), no Tirith (its
binary is fetched from GitHub at start), no lazy installs (Hermes would fetch a missing
Matrix dependency from PyPI when the gateway starts), the context length given (no probe
of the model's metadata), no proxy for its loopback traffic. What the dispatcher is asked,
and what the side-car answers, is recorded by wrapping the dispatcher's
`RouteClient.claim` (`record_claims`): the dispatcher itself is unchanged.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from route_sidecar_client import Decision

from demo.upstream import FakeUpstream, ModelStack

from ..hermes_support import HERMES_VENVS, install_plugin, run_in_hermes
from .agent_support import AgentProcess, agent_python, joined_by_bot_and, unavailable
from .harness import API_TOKEN, BOT, MatrixUser, Sidecar

VERSION = "0.19.0"
CONNECTED = "Matrix: initial sync complete"  # the adapter's log line once it syncs
DROPPED = "pre_gateway_dispatch skip: reason=route-sidecar command"  # the plugin's log line
ROOM_LINE = "**Matrix Room ID:**"
THREAD_LINE = "**Matrix Thread:**"
CONTEXT_FIELD = "matrix_context"  # the plugin's stamp (route_sidecar.core.turns)
# Set empty: Hermes's Matrix adapter sends even loopback traffic through a proxy it finds.
NO_PROXY = dict.fromkeys(
    ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"), ""
)

# Hermes's own list of what its Matrix adapter needs (tools/lazy_deps.py).
_MATRIX_MISSING = """
import json, sys
from tools.lazy_deps import feature_missing

json.dump(list(feature_missing("platform.matrix")), sys.stdout)
"""


def hermes_bin() -> Path:
    """The `bin/` of Hermes 0.19.0's venv, with its Matrix adapter's dependencies; fails
    or skips, saying why, when either is missing (agent_support.unavailable)."""
    bin_dir = HERMES_VENVS / VERSION / "bin"
    agent_python(bin_dir / "python", [bin_dir / "hermes"], f"Hermes Agent {VERSION}")
    lacking = run_in_hermes(VERSION, _MATRIX_MISSING, None)
    if lacking:
        unavailable(f"Hermes {VERSION} lacks its Matrix extra ({', '.join(lacking)}): make setup")
    return bin_dir


def hermes_home(home: Path, bin_dir: Path, base_url: str, toolsets: Sequence[str] = ()) -> Path:
    """A fresh HERMES_HOME: config.yaml with `base_url` (the dispatcher's or the model
    server's `/v1`) as the `custom` provider and only `toolsets` on Matrix, then the
    plugin installed and enabled with Hermes's own CLI."""
    config = {
        "model": {
            "provider": "custom",
            "default": ModelStack.LOCAL,
            "base_url": base_url,
            "api_key": "any-non-empty-string",  # neither the dispatcher nor the fakes check it
            "context_length": 65536,
        },
        "platform_toolsets": {"matrix": list(toolsets)},
        # Tirith (the command scanner) downloads its binary from GitHub at start.
        "security": {"tirith_enabled": False},
    }
    # JSON is YAML; `hermes plugins enable` then rewrites the file as YAML.
    (home / "config.yaml").write_text(json.dumps(config, indent=2), encoding="utf-8")
    install_plugin(home, bin_dir)
    return home


def plugin_asks(sidecar: Sidecar) -> dict[str, str]:
    """Hermes's environment for the plugin to ask the side-car itself (route.py)."""
    return {"ROUTE_SIDECAR_URL": sidecar.api_url, "ROUTE_SIDECAR_TOKEN": API_TOKEN}


def start_hermes_gateway(
    bin_dir: Path,
    home: Path,
    *,
    homeserver: str,
    user_id: str,
    token: str,
    allowed_user: str,
    env: Mapping[str, str] | None = None,
) -> AgentProcess:
    """`hermes gateway run` as a Matrix bot answering `allowed_user` in every room it is
    invited to, without a mention (`env`: more of its environment); returns once it has
    synced."""
    gateway = AgentProcess(
        "Hermes's gateway",
        [str(bin_dir / "hermes"), "gateway", "run", "-v"],
        cwd=home,
        log_path=home / "gateway-run.log",
        env={
            **NO_PROXY,
            "PYTHONPATH": "",
            "VIRTUAL_ENV": str(bin_dir.parent),
            "HERMES_HOME": str(home),
            "HERMES_DISABLE_LAZY_INSTALLS": "1",
            "MATRIX_HOMESERVER": homeserver,
            "MATRIX_USER_ID": user_id,
            "MATRIX_ACCESS_TOKEN": token,
            "MATRIX_DEVICE_ID": "HERMESTEST",
            "MATRIX_E2EE_MODE": "off",
            "MATRIX_ALLOWED_USERS": allowed_user,
            "MATRIX_REQUIRE_MENTION": "false",
            **(env or {}),
        },
    )
    try:
        gateway.wait_for_log(CONNECTED, timeout=90)
    except BaseException:
        gateway.stop()
        raise
    return gateway


@asynccontextmanager
async def running_gateway(
    bin_dir: Path,
    home: Path,
    hs_url: str,
    hermes: MatrixUser,
    alice: MatrixUser,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[AgentProcess]:
    """`start_hermes_gateway` as `hermes`, answering `alice`; stopped at the end."""
    gateway = await asyncio.to_thread(
        start_hermes_gateway,
        bin_dir,
        home,
        homeserver=hs_url,
        user_id=hermes.user_id,
        token=hermes.token,
        allowed_user=alice.user_id,
        env=env,
    )
    try:
        yield gateway
    finally:
        gateway.stop()


def wait_dropped(gateway: AgentProcess, room_id: str, timeout: float = 20.0) -> None:
    """Until Hermes has dropped a route-sidecar command in `room_id` (the plugin's
    `pre_gateway_dispatch` hook): its adapter has handled the message on its own, not
    joined to the next one (it joins the plain-text messages of a session that arrive
    within 0.6 s, HERMES_MATRIX_TEXT_BATCH_DELAY_SECONDS)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in gateway.log_path.read_text(errors="replace").splitlines():
            if DROPPED in line and line.endswith(f"chat={room_id}"):
                return
        time.sleep(0.1)
    raise AssertionError(f"Hermes did not drop the command in {room_id}:\n{gateway.log_tail()}")


async def new_room(alice: MatrixUser, hermes_id: str) -> str:
    """A room of Alice's with the side-car and Hermes in it (Hermes auto-threads there)."""
    room_id = await alice.create_room(invite=[BOT, hermes_id])
    return await joined_by_bot_and(alice, room_id, hermes_id)


async def route(alice: MatrixUser, gateway: AgentProcess, room_id: str, target: str) -> str:
    """`!route <target>`: the side-car confirms it; Hermes's plugin drops it (nothing
    reaches the model). Alice then asks, as a person does, once both have handled it.
    Returns the confirmation's event id (edited into the route's account)."""
    command = await alice.say(room_id, f"!route {target}")
    reply = await alice.wait_reply(room_id, command)
    assert target in reply["content"]["body"], reply["content"]["body"]
    await asyncio.to_thread(wait_dropped, gateway, room_id)
    return str(reply["event_id"])


@dataclass(frozen=True)
class Claim:
    """One call Hermes made to the dispatcher, and the side-car's answer to its claim."""

    request: dict[str, Any]  # the body as Hermes sent it (a copy)
    decision: Decision

    @property
    def system_prompt(self) -> str:
        return "\n".join(
            str(m.get("content"))
            for m in self.request.get("messages") or []
            if m.get("role") in ("system", "developer")
        )

    @property
    def names_room(self) -> str | None:
        """The room of Hermes's `**Matrix Room ID:**` line: only main-loop calls have it
        (title generation and compression do not)."""
        for line in self.system_prompt.splitlines():
            if line.strip().startswith(ROOM_LINE):
                return line.strip()[len(ROOM_LINE) :].strip()
        return None

    @property
    def stamp(self) -> Any:
        return self.request.get(CONTEXT_FIELD)

    def served_by(self, upstreams: list[FakeUpstream]) -> str:
        """Which fake model received this call (the dispatcher forwards the messages as
        they are): read from what each upstream recorded, not from the answer."""
        messages = self.request.get("messages")
        names = [u.name for u in upstreams if any(b.get("messages") == messages for b in u.seen)]
        assert len(names) == 1, f"served by {names or 'no upstream'}: {self.request}"
        return names[0]


def record_claims(models: ModelStack) -> list[Claim]:
    """The dispatcher's claims from now on, each with its request and the side-car's
    answer, in order: a test hook around its RouteClient (no change to what it does)."""
    route = models.dispatcher.route
    claim: Callable[..., Awaitable[Decision]] = route.claim
    claims: list[Claim] = []

    async def recording_claim(**kwargs: Any) -> Decision:
        request = copy.deepcopy(kwargs.get("request") or {})
        decision = await claim(**kwargs)
        claims.append(Claim(request, decision))
        return decision

    route.claim = recording_claim
    return claims
