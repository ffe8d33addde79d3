"""Instructions per claim (the second half of target 2a, issue 14): the yardstick and the
side-car each run under valgrind's callgrind with instrumentation off; after a warm-up,
instrumentation is switched on (`callgrind_control --instr=on`), wrk sends a fixed
number of claims for a room with no intent at 4 connections, and the counters are
dumped. Instructions executed in user space (`Ir`), divided by the claims: the same on
every run whatever else the machine does, which timings on this shared VM are not (and
its perf cannot count instructions). The side-car's once-a-second sweep runs inside the
window and is counted with it; the yardstick has none.

callgrind_control's commands reach a program only while it runs code, so each is sent
while /healthz is being polled.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from .claims import ROOM_IDLE, explicit_body, seed_active_turn
from .http import Load, Wrk
from .report import AT_MOST, Row, Target
from .servers import Server, SidecarConfig, http_status, start_bare, start_sidecar

CONNECTIONS = 4
_TOTAL = re.compile(r"^(?:summary|totals):\s+(\d+)", re.M)


def callgrind(out: Path) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
    ]


def control(server: Server, *args: str) -> None:
    """Run callgrind_control on the server, poking it until the command is taken."""
    command = subprocess.Popen(
        ["callgrind_control", *args, str(server.pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while command.poll() is None:
        if time.monotonic() > deadline:
            command.kill()
            raise RuntimeError(f"callgrind_control {' '.join(args)} was not taken")
        http_status(server.port, "/healthz", timeout=5.0)
        time.sleep(0.05)


def instructions_per_claim(wrk: Wrk, server: Server, out: Path, claims: int) -> float:
    body = json.dumps(explicit_body(ROOM_IDLE)).encode()
    load = Load(server, body, CONNECTIONS)
    wrk.run(load, 600, stop_after=max(200, claims // 10))  # warm-up, not counted
    control(server, "--instr=on")
    wrk.run(load, 600, stop_after=claims)
    control(server, "--dump")
    dumps = sorted(out.parent.glob(f"{out.name}*"), key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise RuntimeError(f"no callgrind dump for {server.name}")
    found = _TOTAL.search(dumps[-1].read_text(errors="replace"))
    if found is None:
        raise RuntimeError(f"no instruction total in {dumps[-1]}")
    return int(found.group(1)) / claims


def instruction_figures(wrk: Wrk, work: Path, claims: int) -> tuple[list[Row], dict[str, Any]]:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        figure = "2a instructions per claim, room with no intent"
        return [Row(figure, float("nan"), "", failed="valgrind not installed")], {}
    work = work / "callgrind"
    work.mkdir(parents=True, exist_ok=True)
    counts: dict[str, float] = {}
    bare_out, sidecar_out = work / "bare.out", work / "sidecar.out"
    bare = start_bare(work, wrapper=callgrind(bare_out))
    try:
        bare.wait_ready(timeout=300)
        counts["bare"] = instructions_per_claim(wrk, bare, bare_out, claims)
    finally:
        bare.stop()
    sidecar = start_sidecar(
        SidecarConfig(work, work / "callgrind.db"), "sidecar-cg", wrapper=callgrind(sidecar_out)
    )
    try:
        sidecar.wait_ready(timeout=300)
        seed_active_turn(sidecar)  # the same rooms as figure 2: the idle one is known
        counts["sidecar"] = instructions_per_claim(wrk, sidecar, sidecar_out, claims)
    finally:
        sidecar.stop()
    rows = [
        Row(
            "2a instructions per claim, room with no intent",
            counts["sidecar"],
            "",
            baseline=counts["bare"],
            baseline_label="bare",
            target=Target(AT_MOST, 1.0),
            note=(
                f"callgrind's Ir (user-space instructions) over {claims:,} claims at "
                f"{CONNECTIONS} connections after a warm-up, divided by the claims; the "
                "side-car's sweep included"
            ),
        )
    ]
    return rows, counts
