"""The demo: the whole chain on one machine, scripted.

A local Synapse, the side-car (generated config and registration), the reference
dispatcher in front of two fake models ("local" and "cloud", each answering with its own
name), a stand-in agent that answers the room through the dispatcher the way Hermes
does, and a user who asks a question, types `!route cloud`, asks again, and asks a third
time; then the local model fails a question, the bot suggests `!route cloud again`, and
the user types it. It prints the conversation, the dispatcher's log and the bot's
receipts, then stops everything (`--keep` leaves it running and prints how to connect a client).

Run it with `make run` (which sets up the venvs first).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from demo.agent import StandInAgent
from demo.matrix_user import BOT, MatrixUser, in_thread, joined, shown_text
from demo.upstream import ModelStack, free_port

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "synapse-example"))

import local_synapse  # noqa: E402

WORK = REPO / ".run" / "demo"


class DispatcherLog(logging.Handler):
    """The dispatcher's one line per call, kept to print after the conversation; with
    `--keep`, printed as they come from then on (which model served each call of your
    own client or agent)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.live = False

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        self.lines.append(line)
        if self.live:
            print(f"  dispatcher │ {line}", flush=True)


def write_config(hs_port: int, as_port: int, api_port: int, api_token: str) -> Path:
    """config.example.yaml, comments kept, with the demo's values filled in."""
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
    config["agents"] = ["@agent:localhost"]
    # The stand-in agent does not retry a failed call: no need to wait 15 s to suggest.
    config["routing"]["failure_grace"] = "2s"
    path = WORK / "config.yaml"
    with path.open("w", encoding="utf-8") as handle:
        yaml.dump(config, handle)
    return path


def port_or_free(preferred: int) -> int:
    import socket

    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", preferred)) != 0:
            return preferred
    return free_port()


async def wait_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    import httpx

    async with httpx.AsyncClient() as client:
        for _ in range(150):
            if process.poll() is not None:
                raise SystemExit(f"demo: the side-car exited; see {WORK / 'sidecar.log'}")
            try:
                if (await client.get(url + "/healthz", timeout=1)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"demo: the side-car did not start; see {WORK / 'sidecar.log'}")


def show(who: str, text: str) -> None:
    first, *rest = text.splitlines() or [""]
    print(f"  {who:>8} │ {first}")
    for line in rest:
        print(f"  {'':>8} │ {line}")


FAILING = "Why is the disk on the build host full?"


async def conversation(
    alice: MatrixUser, agent_id: str, room: str, models: ModelStack
) -> list[str]:
    """The scripted user. Steps 1-3: a question, `!route cloud`, a question (answered on
    cloud), a question (back to local). Step 4: the local model fails a question, the bot
    suggests `!route cloud again`, the user types it, and cloud answers the question.
    Returns the bot's confirmations of the two routes (each edited to say what served)."""
    confirmations: list[str] = []

    async def ask(text: str) -> str:
        show("alice", text)
        event_id = await alice.say(room, text)
        answer = await alice.wait_for(room, in_thread(event_id, agent_id), 30, "the answer")
        show("agent", answer["content"]["body"])
        return event_id

    async def command(text: str) -> str:
        show("alice", text)
        event_id = await alice.say(room, text)
        reply = await alice.wait_reply(room, event_id)
        show("route", reply["content"]["body"])
        confirmations.append(reply["event_id"])
        return event_id

    await ask("Why did the deploy fail?")
    await command("!route cloud")
    await ask("Why did the deploy fail, really?")
    await ask("Thanks. And how do I roll back?")

    print("\n  (the local model now fails one question)\n")
    models.local.fail_on = FAILING
    failed = await ask(FAILING)
    suggestion = await alice.wait_for(room, in_thread(failed, BOT), 30, "the bot's suggestion")
    show("route", suggestion["content"]["body"])
    suggested = next(
        line.split("`")[1]
        for line in suggestion["content"]["body"].splitlines()
        if "again`" in line and "cloud" in line
    )
    event_id = await command(suggested)
    answer = await alice.wait_for(room, in_thread(event_id, agent_id), 30, "the answer")
    show("agent", answer["content"]["body"])
    models.local.fail_on = None
    return confirmations


async def final_confirmations(alice: MatrixUser, room: str, confirmations: list[str]) -> list[str]:
    """What each route's confirmation reads in the end: edited, beside the command, to
    say which model really served its turn (the agent's thread is left to the agent)."""
    shown = []
    for confirmation in confirmations:
        text = await alice.wait_shown(
            room, confirmation, lambda t: "Answered by" in t, 30, "what served the turn"
        )
        await asyncio.sleep(0.5)  # a later outcome of the turn edits it again
        shown.append(shown_text(await alice.events(room), confirmation) or text)
    return shown


@dataclass
class Servers:
    """What runs as its own process: Synapse and the side-car."""

    hs: Any
    sidecar: subprocess.Popen[bytes]
    api_port: int
    api_token: str
    started: float


def start_servers() -> Servers:
    # A fresh start every time: a new homeserver, a new side-car database.
    local_synapse.stop(WORK / "synapse")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    hs_port, as_port, api_port = port_or_free(8008), port_or_free(29333), port_or_free(29334)
    api_token = secrets.token_urlsafe(24)
    config = write_config(hs_port, as_port, api_port, api_token)
    registration = WORK / "registration.yaml"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "route_sidecar",
            "generate-registration",
            "-c",
            str(config),
            "-o",
            str(registration),
        ],
        check=True,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )
    local_synapse.stop(WORK / "synapse")
    started = time.monotonic()
    hs = local_synapse.start(
        WORK / "synapse",
        synapse_python=local_synapse.default_synapse_python(),
        port=hs_port,
        registrations=[registration],
    )
    log_file = (WORK / "sidecar.log").open("ab")
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "route_sidecar", "run", "-c", str(config)],
        cwd=REPO,
        stdout=log_file,
        stderr=log_file,
    )
    return Servers(hs, sidecar, api_port, api_token, started)


def stop_servers(servers: Servers) -> None:
    servers.sidecar.send_signal(signal.SIGTERM)
    servers.sidecar.wait(10)
    local_synapse.stop(WORK / "synapse")
    print("stopped Synapse, the side-car, the dispatcher and the fake models.")


async def demo(servers: Servers, keep: bool) -> None:
    hs, sidecar, api_port, api_token = (
        servers.hs,
        servers.sidecar,
        servers.api_port,
        servers.api_token,
    )
    hs_port = int(hs.base_url.rsplit(":", 1)[1])
    started = servers.started
    dispatcher_log = DispatcherLog()
    logging.getLogger("dispatcher").addHandler(dispatcher_log)
    logging.getLogger("dispatcher").setLevel(logging.INFO)
    models = await ModelStack().start(f"http://127.0.0.1:{api_port}", api_token)
    dispatcher_url = models.dispatcher_url
    agent = alice = None
    try:
        await wait_healthy(f"http://127.0.0.1:{api_port}", sidecar)
        accounts = {
            name: local_synapse.register_user(hs.base_url, name, f"{name}-password")
            for name in ("alice", "agent")
        }
        alice = MatrixUser(
            hs.base_url, accounts["alice"]["user_id"], accounts["alice"]["access_token"]
        )
        agent = StandInAgent(
            hs.base_url,
            accounts["agent"]["access_token"],
            accounts["agent"]["user_id"],
            dispatcher_url,
        )
        agent.ignore(BOT)
        await agent.start()
        room = await alice.create_room(invite=[BOT, agent.user_id], name="route-sidecar demo")
        for member in (BOT, agent.user_id):
            await alice.wait_for(
                room,
                joined(member),
                what=f"{member} to join",
            )
        ready = time.monotonic()
        print(
            f"\nSynapse, side-car, dispatcher, agent up in {ready - started:.1f} s. Room {room}:\n"
        )
        routed = await conversation(alice, agent.user_id, room, models)
        shown = await final_confirmations(alice, room, routed)
        print("\nthe bot's confirmations, as they read in the end:")
        for text in shown:
            show("route", text)
        print("\ndispatcher log (one line per LLM call; each turn makes two):")
        for line in dispatcher_log.lines:
            print(f"  {line}")
        print(f"\ndemo conversation took {time.monotonic() - ready:.1f} s")
        if keep:
            print(f"""
Everything keeps running. Connect any Matrix client:
  homeserver  http://127.0.0.1:{hs_port}   user alice / alice-password
  room        {room}
  try         !route cloud · !route status · !route targets · !route help
  dispatcher  {dispatcher_url}/v1 (OpenAI-compatible; point your own agent's base URL here)
  models      {ModelStack.LOCAL} (default, "local") · {ModelStack.CLOUD} ("cloud")
  lookup API  curl -s -H 'Authorization: Bearer {api_token}' -H 'Content-Type: application/json' \\
                -d '{{"room_id": "{room}", "last_user_message": "hi"}}' http://127.0.0.1:{api_port}/v1/claim
  files       {WORK}
Press Ctrl-C to stop. The dispatcher's lines follow, one per LLM call:""")
            dispatcher_log.live = True
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
    finally:
        if agent is not None:
            await agent.stop()
        if alice is not None:
            await alice.close()
        await models.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep", action="store_true", help="keep everything running")
    args = parser.parse_args()
    servers = start_servers()
    try:
        asyncio.run(demo(servers, args.keep))
    finally:
        stop_servers(servers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
