"""The throwaway Synapse runner in synapse-example/ starts, serves the client API and stops."""

from __future__ import annotations

import os
import secrets
import socket
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "synapse-example"))

import local_synapse  # noqa: E402


def _synapse_python() -> str:
    env = os.environ.get("SYNAPSE_PYTHON")
    if env:
        return env
    default = REPO_ROOT / ".venv-synapse" / "bin" / "python"
    if not default.exists():
        pytest.skip("Synapse venv not found: run make test")
    return str(default)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _write_registration(path: Path, as_token: str, hs_token: str) -> None:
    path.write_text(
        f"""\
id: route-sidecar-test
url: http://127.0.0.1:{_free_port()}
as_token: {as_token}
hs_token: {hs_token}
sender_localpart: route
rate_limited: false
namespaces:
  users:
    - exclusive: true
      regex: "@route:localhost"
  aliases: []
  rooms: []
""",
        encoding="utf-8",
    )


@pytest.mark.e2e
def test_local_synapse_lifecycle(tmp_path: Path) -> None:
    python = _synapse_python()
    data_dir = tmp_path / "hs"
    as_token = secrets.token_hex(16)
    registration = tmp_path / "registration.yaml"
    _write_registration(registration, as_token, secrets.token_hex(16))
    port = _free_port()

    hs = local_synapse.start(
        data_dir, synapse_python=python, port=port, registrations=[registration]
    )
    try:
        assert hs.base_url == f"http://127.0.0.1:{port}"
        assert hs.server_name == "localhost"
        assert hs.config_path == data_dir.resolve() / "homeserver.yaml"
        assert _pid_alive(hs.pid)

        alice = local_synapse.register_user(hs.base_url, "alice", "alice-pw")
        bob = local_synapse.register_user(hs.base_url, "bob", "bob-pw")
        assert alice["user_id"] == "@alice:localhost"
        assert bob["user_id"] == "@bob:localhost"

        status, body = local_synapse.api_request(
            "GET", f"{hs.base_url}/_matrix/client/v3/account/whoami", token=bob["access_token"]
        )
        assert (status, body.get("user_id")) == (200, "@bob:localhost")

        status, body = local_synapse.api_request(
            "POST",
            f"{hs.base_url}/_matrix/client/v3/createRoom",
            {"name": "lifecycle", "invite": [bob["user_id"]]},
            token=alice["access_token"],
        )
        assert status == 200, body
        assert body["room_id"].startswith("!")

        # The appservice registration is loaded: its as_token authenticates as the sender.
        status, body = local_synapse.api_request(
            "GET", f"{hs.base_url}/_matrix/client/v3/account/whoami", token=as_token
        )
        assert (status, body.get("user_id")) == (200, "@route:localhost")

        # An existing user falls back to a password login.
        again = local_synapse.register_user(hs.base_url, "alice", "alice-pw")
        assert again["user_id"] == "@alice:localhost"
        assert again["access_token"] != alice["access_token"]
    finally:
        local_synapse.stop(data_dir)

    assert not _pid_alive(hs.pid)
    assert not (data_dir / "synapse.pid").exists()
    local_synapse.stop(data_dir)  # stopping twice is harmless
