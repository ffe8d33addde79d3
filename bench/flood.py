"""Claims while the room says a lot (issue 14): claim latency at 4 connections, alone and
while a flood of big room messages is pushed to the appservice listener as Synapse would
push it: 64 KB messages of the worst pattern for normalising (`" ."` repeated), from a
member with no permission, one per transaction, sent back to back for the whole run
(at least FLOOD_MESSAGES of them). Alternating rounds: quiet, flood, quiet, flood, ...
Target: claim p99 under 10 ms during the flood.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict
from typing import Any

from .claims import ROOM_IDLE, explicit_body
from .http import Load, Wrk, WrkResult
from .ingest import message_event, put_transaction
from .report import AT_MOST, Row, Target, median
from .servers import Server

FLOOD_MESSAGES = 100
MESSAGE_CHARS = 64 * 1024
FLOOD_ROOM = "!flood:bench"
CONNECTIONS = 4


class Flood:
    """Pushes big messages back to back from a thread until stopped; counts them."""

    def __init__(self, sidecar: Server, tag: str) -> None:
        self.sidecar = sidecar
        self.tag = tag
        self.sent = 0
        self.push_ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.text = " ." * (MESSAGE_CHARS // 2)

    def _run(self) -> None:
        while not self._stop.is_set() or self.sent < FLOOD_MESSAGES:
            n = self.sent
            event = message_event(FLOOD_ROOM, "@mallory:bench", f"${self.tag}-{n}", self.text)
            self.push_ms.append(
                1000 * put_transaction(self.sidecar, f"flood-{self.tag}-{n}", [event])
            )
            self.sent += 1

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(120)


def flood_figures(
    wrk: Wrk, sidecar: Server, rounds: int, seconds: int
) -> tuple[list[Row], dict[str, Any]]:
    sidecar.resume()
    load = Load(sidecar, json.dumps(explicit_body(ROOM_IDLE)).encode(), CONNECTIONS)
    run = f"{time.time_ns():x}"
    wrk.run(load, 30, stop_after=2000)  # warm-up
    quiet: list[WrkResult] = []
    flooded: list[WrkResult] = []
    floods: list[Flood] = []
    for r in range(rounds):
        quiet.append(wrk.run(load, seconds))
        with Flood(sidecar, f"{run}-{r}") as flood:
            flooded.append(wrk.run(load, seconds))
        floods.append(flood)
    errors = sum(x.errors for x in quiet + flooded)
    messages = [f.sent for f in floods]
    rate = median([f.sent / seconds for f in floods])
    pushes = [ms for f in floods for ms in f.push_ms]
    how = (
        f"median of {rounds} rounds × {seconds} s, wrk -t1 -c{CONNECTIONS}, claims for a "
        f"room with no intent; flood: {median(messages):.0f} messages of {MESSAGE_CHARS // 1024}"
        f' KB (" ." repeated) per round, {rate:.0f}/s, one per transaction, each acknowledged'
        f" in {median(pushes):.1f} ms (median)"
    )
    rows = [
        Row(
            "10a claim p99 while 64 KB messages flood in",
            median([x.p99_ms for x in flooded]),
            "ms",
            baseline=median([x.p99_ms for x in quiet]),
            baseline_label="no flood",
            target=Target(AT_MOST, 10, on="value"),
            note=how,
            failed=f"{errors} errors or non-2xx answers" if errors else "",
        ),
        Row(
            "10b claim p50 while 64 KB messages flood in",
            median([x.p50_ms for x in flooded]),
            "ms",
            baseline=median([x.p50_ms for x in quiet]),
            baseline_label="no flood",
            note=how,
        ),
    ]
    raw = {
        "quiet": [asdict(x) for x in quiet],
        "flooded": [asdict(x) for x in flooded],
        "messages": messages,
        "push_ms": pushes,
    }
    return rows, raw
