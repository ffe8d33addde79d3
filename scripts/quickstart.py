"""Quick start: a local Synapse, the side-car with a generated config and registration,
a user and a room, one `!route cloud` and one claim, then how to talk to it yourself.

Run through `make run` (which sets up the venvs first). Everything lives in
.run/quickstart/; `--exit` stops everything after the scripted part instead of waiting.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "synapse-example"))

import local_synapse  # noqa: E402

WORK = REPO / ".run" / "quickstart"
BOT = "@route:localhost"


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def pick_port(preferred: int) -> int:
    if port_free(preferred):
        return preferred
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(hs_port: int, as_port: int, api_port: int, api_token: str) -> Path:
    """config.example.yaml, comments kept, with the local values filled in."""
    yaml = YAML()
    yaml.indent(mapping=2, sequence=4, offset=2)
    config = yaml.load((REPO / "config.example.yaml").read_text(encoding="utf-8"))
    config["homeserver"]["address"] = f"http://127.0.0.1:{hs_port}"
    config["homeserver"]["domain"] = "localhost"
    config["appservice"]["address"] = f"http://127.0.0.1:{as_port}"
    config["appservice"]["listen"]["port"] = as_port
    config["api"]["listen"]["port"] = api_port
    config["api"]["tokens"] = [api_token]
    config["database"] = "sqlite:///route-sidecar.db"
    path = WORK / "config.yaml"
    with path.open("w", encoding="utf-8") as handle:
        yaml.dump(config, handle)
    return path


def matrix(method: str, hs: str, path: str, token: str, body: Any = None) -> dict[str, Any]:
    status, data = local_synapse.api_request(
        method, f"{hs}/_matrix/client/v3{path}", body, token=token
    )
    if status >= 400:
        raise SystemExit(f"quickstart: {method} {path} failed: {status} {data}")
    return data


def wait_for(hs: str, token: str, room: str, predicate, what: str, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = matrix(
            "GET", hs, f"/rooms/{urllib.parse.quote(room)}/messages?dir=b&limit=50", token
        )["chunk"]
        for event in chunk:
            if predicate(event):
                return event
        time.sleep(0.2)
    raise SystemExit(f"quickstart: timed out waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exit", action="store_true", help="stop everything at the end")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    python = local_synapse.default_synapse_python()
    hs_port, as_port, api_port = pick_port(8008), pick_port(29333), pick_port(29334)
    api_token = secrets.token_urlsafe(24)
    config = write_config(hs_port, as_port, api_port, api_token)
    registration = WORK / "registration.yaml"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bot",
            "generate-registration",
            "-c",
            str(config),
            "-o",
            str(registration),
        ],
        check=True,
        cwd=REPO,
    )
    local_synapse.stop(WORK / "synapse")
    print(f"starting Synapse on 127.0.0.1:{hs_port} …")
    hs = local_synapse.start(
        WORK / "synapse", synapse_python=python, port=hs_port, registrations=[registration]
    )
    log = (WORK / "sidecar.log").open("ab")
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "bot", "run", "-c", str(config)], cwd=REPO, stdout=log, stderr=log
    )
    try:
        api = f"http://127.0.0.1:{api_port}"
        for _ in range(150):
            try:
                if local_synapse.api_request("GET", f"{api}/healthz", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise SystemExit(f"quickstart: side-car did not start, see {WORK / 'sidecar.log'}")
        print(f"side-car running: appservice on :{as_port}, lookup API on :{api_port}")
        alice = local_synapse.register_user(hs.base_url, "alice", "alice-password")
        token = alice["access_token"]
        room = matrix(
            "POST",
            hs.base_url,
            "/createRoom",
            token,
            {"name": "route-sidecar quick start", "invite": [BOT]},
        )["room_id"]
        wait_for(
            hs.base_url,
            token,
            room,
            lambda e: (
                e.get("state_key") == BOT and e.get("content", {}).get("membership") == "join"
            ),
            "the bot to join",
        )
        print(f"\nroom {room}: alice invited {BOT}, it joined.")
        quoted = urllib.parse.quote(room)
        command = matrix(
            "PUT",
            hs.base_url,
            f"/rooms/{quoted}/send/m.room.message/{uuid.uuid4().hex}",
            token,
            {"msgtype": "m.text", "body": "!route cloud"},
        )["event_id"]
        print("alice> !route cloud")
        reply = wait_for(
            hs.base_url,
            token,
            room,
            lambda e: (
                e.get("sender") == BOT
                and e.get("content", {})
                .get("m.relates_to", {})
                .get("m.in_reply_to", {})
                .get("event_id")
                == command
            ),
            "the bot's reply",
        )
        print(f"route> {reply['content']['body']}")
        question = matrix(
            "PUT",
            hs.base_url,
            f"/rooms/{quoted}/send/m.room.message/{uuid.uuid4().hex}",
            token,
            {"msgtype": "m.text", "body": "Why did the deploy fail?"},
        )["event_id"]
        print("alice> Why did the deploy fail?")
        claim_body = {
            "room_id": room,
            "turn_id": question,
            "last_user_message": "[alice] Why did the deploy fail?",
        }
        _, answer = local_synapse.api_request(
            "POST", f"{api}/v1/claim", claim_body, token=api_token
        )
        print(f"\ndispatcher POST /v1/claim → {json.dumps(answer, indent=2)}")
        print(f"""
Everything is running. Talk to it yourself:
  homeserver   http://127.0.0.1:{hs_port}   (any Matrix client; user alice / alice-password)
  room         {room}   (invite {BOT} to any room of yours)
  commands     !route cloud · !route status · !route targets · !route help
  lookup API   curl -s -H 'Authorization: Bearer {api_token}' \\
                 -H 'Content-Type: application/json' \\
                 -d '{{"room_id": "{room}", "last_user_message": "hi"}}' {api}/v1/claim
  files        {WORK} (config.yaml, registration.yaml, sidecar.log)
""")
        if not args.exit:
            print("Press Ctrl-C to stop.")
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        sidecar.send_signal(signal.SIGTERM)
        sidecar.wait(10)
        local_synapse.stop(WORK / "synapse")
        print("stopped Synapse and the side-car.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
