"""Hermes Agent as the tests use it: each supported version in its own venv (the Makefile's
`.venv-hermes/<version>`), asked through a subprocess what it really writes.

The side-car's tests run in `.venv`, which has no Hermes (Hermes pins its own versions of
shared libraries); these helpers run Hermes's own functions in Hermes's venv and bring
back their results as JSON, so a test compares the side-car against Hermes's real output,
never against a hand-written imitation of it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PLUGIN_DIR = REPO / "integrations" / "hermes"
PLUGIN_README = PLUGIN_DIR / "README.md"
# Every version the plugin and the side-car are tested with: the oldest on PyPI (close to
# the seed deployment) and the current one. The Makefile builds a venv for each.
HERMES_VERSIONS = ("0.13.0", "0.19.0")
HERMES_VENVS = REPO / ".venv-hermes"


def hermes_python(version: str) -> Path:
    """The Python of Hermes `version`'s venv; fails loudly (never skips) when it is missing."""
    python = HERMES_VENVS / version / "bin" / "python"
    if not python.exists():
        raise AssertionError(
            f"no Hermes {version} venv at {python.parent.parent}: run `make setup`"
        )
    return python


_SESSION_PROMPT = """
import json, sys
from gateway.config import GatewayConfig, Platform
from gateway.session import (
    SessionSource, build_session_context, build_session_context_prompt,
    is_shared_multi_user_session,
)
from importlib.metadata import version

args = json.load(sys.stdin)
source = SessionSource(
    platform=Platform.MATRIX,
    chat_id=args["room_id"],
    chat_name=args["room_name"],
    chat_type=args["chat_type"],
    user_id=args["user_id"],
    user_name=args["user_name"],
    thread_id=args["thread_id"],
)
config = GatewayConfig()
context = build_session_context(source, config)
json.dump(
    {
        "version": version("hermes-agent"),
        "prompt": build_session_context_prompt(context, redact_pii=args["redact_pii"]),
        "shared": is_shared_multi_user_session(
            source,
            group_sessions_per_user=getattr(config, "group_sessions_per_user", True),
            thread_sessions_per_user=getattr(config, "thread_sessions_per_user", False),
        ),
    },
    sys.stdout,
)
"""

_HASH_CHAT_ID = """
import json, sys
from gateway.session import _hash_chat_id

json.dump([_hash_chat_id(value) for value in json.load(sys.stdin)], sys.stdout)
"""


def run_in_hermes(version: str, code: str, payload: Any) -> Any:
    """Run `code` with Hermes `version`'s Python: `payload` as JSON on stdin, JSON back."""
    done = subprocess.run(
        [str(hermes_python(version)), "-c", code],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
        env={**os.environ, "HERMES_HOME": str(REPO / ".run" / "hermes-home-unused")},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@dataclass(frozen=True)
class HermesMessage:
    """One Matrix message as the Hermes gateway hands it to the LLM."""

    version: str
    system_prompt: str  # the session-context block Hermes puts in the system prompt
    user_message: str  # the text, with `[Display Name] ` in shared sessions

    def request(self) -> dict[str, Any]:
        """The OpenAI chat-completions body of the turn's main-loop call."""
        return {
            "model": "glm-4.7-flash:q4_K_M",
            "stream": True,
            "messages": [
                {"role": "system", "content": f"You are Hermes Agent.\n\n{self.system_prompt}"},
                {"role": "user", "content": self.user_message},
            ],
        }


def hermes_message(
    version: str,
    *,
    room_id: str,
    text: str,
    user_id: str,
    user_name: str,
    thread_id: str | None,
    chat_type: str = "group",
    room_name: str | None = "route test",
    redact_pii: bool = False,
) -> HermesMessage:
    """What Hermes `version` sends the LLM for `text` in a Matrix room: its own
    `build_session_context_prompt` output, and the user message prefixed with
    `[Display Name] ` when Hermes's `is_shared_multi_user_session` says the session is
    shared (threads; never a DM), as gateway/run.py does."""
    answer = run_in_hermes(
        version,
        _SESSION_PROMPT,
        {
            "room_id": room_id,
            "room_name": room_name,
            "chat_type": chat_type,
            "user_id": user_id,
            "user_name": user_name,
            "thread_id": thread_id,
            "redact_pii": redact_pii,
        },
    )
    assert answer["version"] == version, answer["version"]
    user_message = f"[{user_name}] {text}" if answer["shared"] else text
    return HermesMessage(version, answer["prompt"], user_message)


def hash_chat_ids(version: str, values: list[str]) -> list[str]:
    """Hermes's own `gateway.session._hash_chat_id` (what `privacy.redact_pii` writes)."""
    hashed: list[str] = run_in_hermes(version, _HASH_CHAT_ID, values)
    return hashed


def readme_block(marker: str, path: Path = PLUGIN_README) -> str:
    """The fenced code block of the plugin README whose first line is the comment
    `# <marker>`: the tests run the documented steps themselves, not a copy of them."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), flags=re.DOTALL)
    found = [b for b in blocks if b.splitlines() and b.splitlines()[0] == f"# {marker}"]
    assert len(found) == 1, f"{path.name}: {len(found)} code blocks start with '# {marker}'"
    return str(found[0])


def run_readme_block(
    marker: str, hermes_bin: Path, home: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a documented step (`readme_block(marker)`) with bash from the checkout, as a
    user would: Hermes's `bin/` first on PATH, `HERMES_HOME` set, Enter for any question
    (Hermes 0.19's `plugins enable` asks whether the plugin may replace built-in tools;
    Enter answers no)."""
    env = {
        **os.environ,
        "PATH": f"{hermes_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "HERMES_HOME": str(home),
        **(extra_env or {}),
    }
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_block(marker)],
        input="\n",
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, f"{marker}: {done.stdout}\n{done.stderr}"
    return done


def install_plugin(home: Path, hermes_bin: Path) -> None:
    """The linked-folder steps of integrations/hermes/README.md, under a throwaway
    HERMES_HOME, with the CLI in `hermes_bin` (a Hermes version's `bin/`)."""
    run_readme_block("route-sidecar: install as a linked folder", hermes_bin, home)
    assert (home / "plugins" / "route-sidecar").resolve() == PLUGIN_DIR
    run_readme_block("route-sidecar: enable", hermes_bin, home)


def stamping_hermes() -> bool:
    """Whether the Hermes installed here has the `llm_request` middleware (0.17.0 on)."""
    installed = importlib.metadata.version("hermes-agent")
    return tuple(int(part) for part in installed.split(".")[:2]) >= (0, 17)
