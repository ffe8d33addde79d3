"""matrix-gptbot 0.3.21 (PyPI), a second real agent with no plugin, run as its own process
from its own venv (`.venv-gptbot`, `make setup`) against the tests' Synapse, its OpenAI
client pointed at the reference dispatcher.

Offline, gptbot cannot fetch tiktoken's encodings at start: `make setup` copies the
encoding files litellm ships (their file names are tiktoken's cache keys) into
`.venv-gptbot/tiktoken-cache`, and the process gets `TIKTOKEN_CACHE_DIR` pointing there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .harness import REPO_ROOT

VERSION = "0.3.21"
VENV = REPO_ROOT / ".venv-gptbot"
TIKTOKEN_CACHE = VENV / "tiktoken-cache"


def gptbot_python() -> Path:
    """The gptbot venv's Python; a missing venv fails the tests when Synapse is required
    (as in `make test`), and skips them, saying why, otherwise."""
    python = Path(os.environ.get("GPTBOT_PYTHON") or VENV / "bin" / "python")
    if not python.exists() or not TIKTOKEN_CACHE.is_dir():
        why = f"matrix-gptbot {VERSION} venv not found ({python}, {TIKTOKEN_CACHE}): make setup"
        if os.environ.get("ROUTE_SIDECAR_REQUIRE_SYNAPSE"):
            pytest.fail(why)
        pytest.skip(why)
    return python


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


class GptBot:
    """The gptbot process: started with its config, stopped at the end."""

    def __init__(self, python: Path, config: Path) -> None:
        self.log_path = config.with_suffix(".log")
        env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(TIKTOKEN_CACHE)}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(python), "-m", "gptbot", "-c", str(config)],
                cwd=config.parent,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        time.sleep(0.5)
        if self.process.poll() is not None:
            raise RuntimeError(f"gptbot exited at start:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
