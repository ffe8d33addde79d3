"""What the deploy tests share (tests/e2e/test_deploy.py: the pip way, as an unprivileged
user; tests/e2e/test_container.py: the image): the README's command blocks, the step-2
edits a person makes with $EDITOR, a readable copy of what the steps take from the
checkout, waiting for the side-car, and alice, who talks to it from an encrypting
client."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
from mautrix.types import UserID

from demo.encrypted_user import EncryptedUser

from .harness import API_TOKEN, BOT, REPO_ROOT, joined, local_synapse

README = REPO_ROOT / "README.md"
PASSWORD = "pw-alice-secret"


def readme_block(marker: str) -> str:
    """The shell block that follows the `<!-- {marker}` comment in README.md."""
    text = README.read_text(encoding="utf-8")
    assert f"<!-- {marker}" in text, f"README.md lost its {marker} block"
    after = text.split(f"<!-- {marker}", 1)[1]
    return after.split("```sh\n", 1)[1].split("```", 1)[0]


def readable_checkout(base: Path, names: tuple[str, ...], owner: int | None = None) -> Path:
    """A copy of the checkout's files `names` in `base`/checkout, for steps run by a user
    who may not enter the checkout (a clone under /root, or a 0700 home folder): the
    folder and its files are given to `owner` (when given) and readable by everyone."""
    copy = base / "checkout"
    for name in names:
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)
        target.chmod(0o644)
    for path in (copy, *copy.rglob("*")):
        if path.is_dir():
            path.chmod(0o755)
        if owner is not None:
            os.chown(path, owner, owner)
    return copy


def editor(base: Path, python: Path, edits: dict[str, Any]) -> Path:
    """An $EDITOR that makes the step-2 edits a person makes, comments kept (run by
    `python`, which has ruamel.yaml)."""
    script = base / "edit-config"
    script.write_text(
        f"#!{python}\n"
        "import json, sys\n"
        "from ruamel.yaml import YAML\n"
        "yaml = YAML()\n"
        "yaml.indent(mapping=2, sequence=4, offset=2)\n"
        "with open(sys.argv[1], encoding='utf-8') as f:\n"
        "    data = yaml.load(f)\n"
        f"for dotted, value in json.loads({json.dumps(json.dumps(edits))}).items():\n"
        "    *parents, last = dotted.split('.')\n"
        "    node = data\n"
        "    for key in parents:\n"
        "        node = node[key]\n"
        "    node[last] = value\n"
        "with open(sys.argv[1], 'w', encoding='utf-8') as f:\n"
        "    yaml.dump(data, f)\n",
        encoding="utf-8",
    )
    script.chmod(0o755)
    return script


def step2_edits(hs_port: int, as_port: int, api_port: int) -> dict[str, Any]:
    return {
        "homeserver.address": f"http://127.0.0.1:{hs_port}",
        "homeserver.domain": "localhost",
        "appservice.address": f"http://127.0.0.1:{as_port}",
        "appservice.listen.port": as_port,
        "api.listen.port": api_port,
        "api.tokens": [API_TOKEN],
        "permissions": {"@alice:localhost": 100, "*": 0},
        "encryption.key_wait": "5s",
    }


def wait_for_log(log: Path, needle: str, process: subprocess.Popen[bytes], timeout: float) -> str:
    """The log's text once it holds `needle`; fails when `process` (what writes the log)
    ends first or the time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if needle in text:
            return text
        if process.poll() is not None:
            break
        time.sleep(0.2)
    tail = "\n".join((log.read_text(errors="replace") if log.exists() else "").splitlines()[-30:])
    raise AssertionError(f"no {needle!r} in the side-car's log within {timeout:g}s:\n{tail}")


@contextmanager
def running(
    command: list[str], cwd: Path, env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


def wait_healthy(api_port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"side-car not healthy:\n{log.read_text(errors='replace')[-3000:]}")


@asynccontextmanager
async def alice_on(hs_url: str) -> AsyncIterator[EncryptedUser]:
    local_synapse.register_user(hs_url, "alice", PASSWORD)
    person = await EncryptedUser.login(hs_url, "alice", PASSWORD, key_wait=10.0)
    try:
        yield person
    finally:
        await person.close()


async def command_is_answered(
    alice: EncryptedUser, room: str | None = None, *, encrypted: bool = True
) -> str:
    """`!route cloud` in `room` (a new room with the bot, encrypted or not, when None)
    gets the bot's confirmation, encrypted in an encrypted room; the room."""
    if room is None:
        room = await alice.create_room(invite=[BOT], encrypted=encrypted, name="deployed")
        await alice.wait_for(room, joined(BOT), timeout=30, what="the bot to join")
    event_id = await alice.say(room, "!route cloud")
    reply = await alice.wait_reply(room, event_id, timeout=30)
    assert reply["encrypted"] is encrypted, reply
    assert "Routing the next turn" in reply["content"]["body"], reply
    return room


async def encrypted_command_is_answered(alice: EncryptedUser, room: str | None = None) -> str:
    return await command_is_answered(alice, room, encrypted=True)


async def bot_devices(alice: EncryptedUser) -> list[str]:
    keys = await alice.client.query_keys([UserID(BOT)])
    return sorted(keys.device_keys.get(UserID(BOT), {}))
