"""nanobot 0.3.5 (PyPI `nanobot-ai`), a third real agent with no plugin and the first that
reads encrypted rooms itself (matrix-nio with vodozemac), run as its own process from its
own venv (`.venv-nanobot`, `make setup`) against the tests' Synapse, its OpenAI-compatible
provider pointed at the reference dispatcher.

Offline it needs tiktoken's `cl100k_base`: `make setup` copies the encoding files litellm
ships into `.venv-nanobot/tiktoken-cache` (as for gptbot), and the process gets
`TIKTOKEN_CACHE_DIR`. Its own system prompt is about 7,900 tokens: the model's context
window must be larger (131072 here), or it answers nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .agent_support import AgentProcess, agent_python
from .harness import REPO_ROOT, free_port

VERSION = "0.3.5"
VENV = REPO_ROOT / ".venv-nanobot"
TIKTOKEN_CACHE = VENV / "tiktoken-cache"
PRESET = "dispatcher"


def nanobot_python() -> Path:
    """The nanobot venv's Python (`NANOBOT_PYTHON` overrides it); fails or skips, saying
    why, when it is missing (agent_support.agent_python)."""
    python = Path(os.environ.get("NANOBOT_PYTHON") or VENV / "bin" / "python")
    return agent_python(python, [TIKTOKEN_CACHE], f"nanobot {VERSION}")


def nanobot_config(
    homeserver: str,
    user_id: str,
    password: str,
    dispatcher_url: str,
    model: str,
    group_policy: str = "open",
) -> dict[str, Any]:
    """nanobot's config as README "Agents" tells an admin to write it: the dispatcher as
    its OpenAI-compatible provider, the Matrix channel answering every message in a room
    (`group_policy` "open") or only those that mention it ("mention"), encryption on, and
    its background LLM calls (memory "dream", heartbeat) off."""
    return {
        "providers": {
            # the reference dispatcher does not check the key
            "custom": {"apiKey": "any-non-empty-string", "apiBase": f"{dispatcher_url}/v1"}
        },
        "modelPresets": {
            PRESET: {
                "model": model,  # the default model; a route replaces it per turn
                "provider": "custom",
                "maxTokens": 200,
                "contextWindowTokens": 131072,  # its own prompt is about 7,900 tokens
            }
        },
        "agents": {"defaults": {"modelPreset": PRESET, "dream": {"enabled": False}}},
        "gateway": {"heartbeat": {"enabled": False}},
        "channels": {
            "matrix": {
                "enabled": True,
                "homeserver": homeserver,
                "userId": user_id,
                "password": password,
                "allowFrom": ["*"],
                "groupPolicy": group_policy,
                "e2eeEnabled": True,
            },
            # on by default, on a fixed port (8765): not needed here
            "websocket": {"enabled": False},
        },
    }


def start_nanobot(python: Path, work: Path, config: dict[str, Any]) -> AgentProcess:
    """`nanobot gateway` in the foreground with `config`, its home and workspace in `work`
    (its Matrix store, session and device live there); returns once it has logged in."""
    path = work / "nanobot.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    (work / "workspace").mkdir(exist_ok=True)
    nanobot = AgentProcess(
        "nanobot",
        [
            str(python.parent / "nanobot"),
            "gateway",
            "--foreground",
            "--port",
            str(free_port()),
            "-c",
            str(path),
            "-w",
            str(work / "workspace"),
        ],
        cwd=work,
        log_path=work / "nanobot.log",
        env={"HOME": str(work), "TIKTOKEN_CACHE_DIR": str(TIKTOKEN_CACHE)},
    )
    try:
        nanobot.wait_for_log("Logged in using a password", timeout=60)
    except RuntimeError:
        nanobot.stop()
        raise
    return nanobot
