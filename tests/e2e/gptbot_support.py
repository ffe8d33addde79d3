"""matrix-gptbot 0.3.21 (PyPI), a second real agent with no plugin, run as its own process
from its own venv (`.venv-gptbot`, `make setup`) against the tests' Synapse, its OpenAI
client pointed at the reference dispatcher.

Offline, gptbot cannot fetch tiktoken's encodings at start: `make setup` copies the
encoding files litellm ships (their file names are tiktoken's cache keys) into
`.venv-gptbot/tiktoken-cache`, and the process gets `TIKTOKEN_CACHE_DIR` pointing there.
"""

from __future__ import annotations

import os
from pathlib import Path

from .agent_support import AgentProcess, agent_python
from .harness import REPO_ROOT

VERSION = "0.3.21"
VENV = REPO_ROOT / ".venv-gptbot"
TIKTOKEN_CACHE = VENV / "tiktoken-cache"


def gptbot_python() -> Path:
    """The gptbot venv's Python (`GPTBOT_PYTHON` overrides it); fails or skips, saying
    why, when it is missing (agent_support.agent_python)."""
    python = Path(os.environ.get("GPTBOT_PYTHON") or VENV / "bin" / "python")
    return agent_python(python, [TIKTOKEN_CACHE], f"matrix-gptbot {VERSION}")


def config_ini(
    work: Path, homeserver: str, user_id: str, token: str, dispatcher_url: str, model: str
) -> Path:
    """gptbot's config, as README "Agents" tells an admin to write it (comments on their
    own lines: configparser keeps an inline `; comment` in the value)."""
    path = work / "gptbot.ini"
    path.write_text(
        f"""[GPTBot]
DisplayName = GPTBot
LogLevel = info

[Database]
Path = {work / "gptbot.db"}

[OpenAI]
; the reference dispatcher does not check the key
APIKey = any-non-empty-string
; the dispatcher, not the model server
BaseURL = {dispatcher_url}/v1
; the default model; a route replaces it per turn
Model = {model}
MaxTokens = 200

[Matrix]
Homeserver = {homeserver}
UserID = {user_id}
AccessToken = {token}
DeviceID = GPTBOTTEST
""",
        encoding="utf-8",
    )
    return path


def start_gptbot(python: Path, config: Path) -> AgentProcess:
    """The gptbot process, started with its config (stop it at the end)."""
    return AgentProcess(
        "gptbot",
        [str(python), "-m", "gptbot", "-c", str(config)],
        cwd=config.parent,
        log_path=config.with_suffix(".log"),
        env={"TIKTOKEN_CACHE_DIR": str(TIKTOKEN_CACHE)},
    )
