"""Command to confirmation through a real Synapse on loopback (figure 6).

Figure 6 is the side-car's own time (issue 14): from a transaction's arrival at its
appservice listener to the start of the reply's send to Synapse, read from its DEBUG log
lines `transaction received` and `room event sending ... key=reply:<command>` (the
side-car runs at DEBUG here; millisecond timestamps). Synapse's own time for the two
sends (the user's command, the bot's reply) and the whole round trip through /sync are
reported beside it, as information.

A local Synapse (synapse-example/local_synapse.py) with the side-car registered as its
appservice, both started as the end-to-end tests start them (tests/e2e/harness.py), with
the tests' config: encryption on (the default where python-olm is installed), in an
unencrypted room. One user, alice, keeps a /sync long-poll open and, alternating:

- echo: sends a plain message and waits for it in her own /sync;
- command: sends `!route cloud` (or `!route auto`, in turn) and waits for the bot's reply
  in the same /sync.

Both are timed the same way, from just before the send to the /sync answer holding the
awaited event, so they compare: the command's extra is the appservice push, the side-car's
handling (a durable commit) and the bot's reply going back through Synapse.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from demo.matrix_user import MatrixUser, is_bot_reply_to, joined
from tests.e2e.harness import BOT, SERVER, local_synapse, synapse_and_sidecar, synapse_python

from .report import AT_MOST, Row, Target, median
from .servers import rss_mb

WARMUP = 3
PAUSE = 0.3  # between samples: the bot's outbox and Synapse settle


class SyncWatcher:
    """A /sync long-poll loop for one room; remembers when each event arrived."""

    def __init__(self, user: MatrixUser, room_id: str) -> None:
        self.user = user
        self.room_id = room_id
        self.arrived: list[tuple[float, dict[str, Any]]] = []
        self.changed = asyncio.Event()
        self.filter = json.dumps(
            {
                "room": {"rooms": [room_id], "timeline": {"limit": 50}},
                "presence": {"not_types": ["*"]},
                "account_data": {"not_types": ["*"]},
            }
        )
        self.since = ""
        self._task: asyncio.Task[None] | None = None

    async def _sync(self, timeout_ms: int) -> dict[str, Any]:
        params = {"timeout": str(timeout_ms), "filter": self.filter}
        if self.since:
            params["since"] = self.since
        response = await self.user.client.get(
            "/_matrix/client/v3/sync", params=params, timeout=timeout_ms / 1000 + 30
        )
        response.raise_for_status()
        batch: dict[str, Any] = response.json()
        return batch

    async def start(self) -> None:
        self.since = (await self._sync(0))["next_batch"]
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            data = await self._sync(30_000)
            at = time.perf_counter()
            self.since = data["next_batch"]
            room = data.get("rooms", {}).get("join", {}).get(self.room_id, {})
            for event in room.get("timeline", {}).get("events", []):
                self.arrived.append((at, event))
            self.changed.set()

    async def wait(
        self, match: Callable[[dict[str, Any]], bool], after: float, timeout: float = 30.0
    ) -> tuple[float, dict[str, Any]]:
        """The first matching event arrived not before `after`, and when it arrived."""
        deadline = time.perf_counter() + timeout
        while True:
            self.changed.clear()
            for at, event in self.arrived:
                if at >= after and match(event):
                    return at, event
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError("the awaited event did not come through /sync")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclass
class CommandSample:
    """One command: wall-clock times, to line up with the side-car's log."""

    sent_at: float
    seen_at: float
    command_id: str
    reply_id: str


async def _sample_pairs(
    hs_url: str, samples: int
) -> tuple[list[float], list[float], list[CommandSample]]:
    account = local_synapse.register_user(hs_url, "alice", "pw-alice-bench")
    alice = MatrixUser(hs_url, account["user_id"], account["access_token"])
    watcher: SyncWatcher | None = None
    try:
        room = await alice.create_room(invite=[BOT], name="route-sidecar bench")
        await alice.wait_for(room, joined(BOT), timeout=60, what="the bot to join")
        watcher = SyncWatcher(alice, room)
        await watcher.start()
        details: list[CommandSample] = []

        async def echo(n: int) -> float:
            started = time.perf_counter()
            event_id = await alice.say(room, f"a plain message, number {n}")
            at, _ = await watcher.wait(lambda e: e.get("event_id") == event_id, started)
            return at - started

        async def command(n: int) -> float:
            started, wall = time.perf_counter(), time.time()
            event_id = await alice.say(room, "!route cloud" if n % 2 == 0 else "!route auto")
            at, reply = await watcher.wait(lambda e: is_bot_reply_to(e, event_id), started)
            details.append(CommandSample(wall, wall + at - started, event_id, reply["event_id"]))
            return at - started

        echoes: list[float] = []
        commands: list[float] = []
        for n in range(WARMUP + samples):
            for measure, into in ((echo, echoes), (command, commands)):
                into.append(await measure(n))
                await asyncio.sleep(PAUSE)
        return echoes[WARMUP:], commands[WARMUP:], details[WARMUP:]
    finally:
        if watcher is not None:
            await watcher.stop()
        await alice.close()


_LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ \S+ "
    r"(command handled|room event sent) .*? event=(\S+)"
)
_OWN_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ \S+ "
    r"(?:(transaction received) txn=\S+|(command handled) .*? event=(\S+)"
    r"|(room event sending) .*? key=reply:(\S+))"
)


def _stamp(date: str, ms: str) -> float:
    return time.mktime(time.strptime(date, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000


def own_times(log: str) -> list[float]:
    """Milliseconds from each command's transaction arriving to its reply's send
    starting: the last `transaction received` before `command handled event=<cmd>`,
    to `room event sending key=reply:<cmd>`."""
    arrived_at: float | None = None
    command_arrival: dict[str, float] = {}
    own: list[float] = []
    for line in log.splitlines():
        found = _OWN_LINE.match(line)
        if not found:
            continue
        at = _stamp(found.group(1), found.group(2))
        if found.group(3):
            arrived_at = at
        elif found.group(4) and arrived_at is not None:
            command_arrival[found.group(5)] = arrived_at
        elif found.group(6) and found.group(7) in command_arrival:
            own.append(1000 * (at - command_arrival.pop(found.group(7))))
    return own


def split_times(log: str, details: list[CommandSample]) -> dict[str, float]:
    """Median milliseconds of each leg of a command, from the side-car's log (INFO lines
    `command handled ... event=<command>` and `room event sent ... event=<reply>`, whose
    times have millisecond resolution)."""
    logged: dict[str, float] = {}
    for line in log.splitlines():
        found = _LOG_LINE.match(line)
        if found:
            stamp = time.mktime(time.strptime(found.group(1), "%Y-%m-%d %H:%M:%S"))
            logged[found.group(4)] = stamp + int(found.group(2)) / 1000
    legs: dict[str, list[float]] = {"handled": [], "reply sent": [], "in /sync": []}
    for d in details:
        handled, sent = logged.get(d.command_id), logged.get(d.reply_id)
        if handled is None or sent is None:
            continue
        legs["handled"].append(1000 * (handled - d.sent_at))
        legs["reply sent"].append(1000 * (sent - handled))
        legs["in /sync"].append(1000 * (d.seen_at - sent))
    return {leg: median(values) for leg, values in legs.items() if values}


_SEND_LINE = re.compile(
    r"\{(@[^}]+)\} Processed request: ([\d.]+)sec/.*\"PUT /_matrix/client/v3/rooms/[^/]+/send/"
)


def synapse_send_times(log: str) -> dict[str, float]:
    """Median milliseconds Synapse itself took to answer a room send (`PUT .../send/...`,
    from its `Processed request` log lines), by sender: the user's messages and the
    bot's replies. They show what no appservice can take out of a command's time."""
    times: dict[str, list[float]] = {}
    for found in _SEND_LINE.finditer(log):
        times.setdefault(found.group(1), []).append(1000 * float(found.group(2)))
    return {sender: median(values) for sender, values in times.items()}


def p99_of(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def synapse_version(python: str) -> str:
    """Read from the Synapse venv's metadata (no interpreter started)."""
    for found in Path(python).parent.parent.glob("lib/python*/site-packages/matrix_synapse-*"):
        return found.name.removeprefix("matrix_synapse-").removesuffix(".dist-info")
    return "?"


def matrix_figures(work: Path, samples: int) -> tuple[list[Row], dict[str, Any]]:
    figure = "6e command → bot's reply in /sync, vs plain echo (information)"
    python = synapse_python()
    if python is None:
        return [Row(figure, float("nan"), "ms", failed="Synapse not installed")], {}
    work = work / "matrix"
    work.mkdir(parents=True, exist_ok=True)
    with synapse_and_sidecar(work, python, logging={"level": "DEBUG"}) as (hs, sidecar):
        assert sidecar.process is not None
        echoes, commands, details = asyncio.run(_sample_pairs(hs.base_url, samples))
        rss = rss_mb(sidecar.process.pid)
        log = sidecar.log_path.read_text(errors="replace")
        legs = split_times(log, details)
        own = own_times(log)[WARMUP:]
        sends = synapse_send_times(
            (hs.data_dir / local_synapse.LOG_NAME).read_text(errors="replace")
        )
    echo_ms = [1000 * x for x in echoes]
    command_ms = [1000 * x for x in commands]

    def p90(values: list[float]) -> float:
        return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]

    user_send = sends.get(f"@alice:{SERVER}", float("nan"))
    bot_send = sends.get(BOT, float("nan"))
    own_note = (
        f"{len(own)} commands after {WARMUP} warm-up ones; the side-car's DEBUG log "
        "(ms timestamps): `transaction received` to `room event sending key=reply:...`: "
        "the transaction's parsing, the command's durable commit, the outbox's wake-up "
        "and the reply's building"
    )
    rows = [
        Row(
            "6 side-car's own time: command's transaction arrives → reply's send starts",
            median(own) if own else float("nan"),
            "ms",
            target=Target(AT_MOST, 10, on="value"),
            note=own_note,
            failed="" if own else "no command found in the side-car's log",
        ),
        Row(
            "6b side-car's own time, p99",
            p99_of(own) if own else float("nan"),
            "ms",
            note=own_note,
        ),
        Row(
            "6c Synapse: the user's send of the command, answered",
            user_send,
            "ms",
            note="Synapse's own time (its `Processed request` log line), median: information",
        ),
        Row(
            "6d Synapse: the bot's send of the reply, answered",
            bot_send,
            "ms",
            note="Synapse's own time (its `Processed request` log line), median: information",
        ),
        Row(
            figure,
            median(command_ms),
            "ms",
            median(echo_ms),
            "echo",
            None,
            (
                f"median of {samples} alternating pairs after {WARMUP} warm-up pairs; p90 "
                f"{p90(command_ms):.1f} vs {p90(echo_ms):.1f} ms; `!route cloud` and "
                f"`!route auto` in turn; Synapse {synapse_version(python)} on loopback "
                "(SQLite), not pinned; encryption on, room unencrypted; median legs of a "
                "command (side-car log, ms resolution): "
                + ", ".join(f"{leg} +{ms:.1f} ms" for leg, ms in legs.items())
                + "; Synapse's own time to answer a send (its log): "
                + ", ".join(f"{who} {ms:.1f} ms" for who, ms in sends.items())
            ),
        ),
        Row(
            "7c memory: RSS with Synapse, encryption on",
            rss,
            "MB",
            target=Target(AT_MOST, 80, on="value"),
            note="the side-car of figure 6 after its samples: registered, device set up, one room",
        ),
    ]
    raw = {
        "own_ms": own,
        "echo_ms": echo_ms,
        "command_ms": command_ms,
        "legs_ms": legs,
        "synapse_send_ms": sends,
        "rss_mb": rss,
    }
    return rows, raw
