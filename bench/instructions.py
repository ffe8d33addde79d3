"""Instructions per claim (the second half of target 2a, issue 14): the yardstick and the
side-car each run under valgrind's callgrind with instrumentation off; after a warm-up,
instrumentation is switched on (`callgrind_control --instr=on`), wrk sends a fixed
number of claims for a room with no intent at 4 connections, and the counters are
dumped. Instructions executed in user space (`Ir`), divided by the claims: the same on
every run whatever else the machine does, which timings on this shared VM are not (and
its perf cannot count instructions). The side-car's once-a-second sweep runs inside the
window and is counted with it; the yardstick has none.

Counts still move by a few percent between two starts of the same server (hash
seeds, the garbage collector's timing): both run with PYTHONHASHSEED=0, in alternating
rounds (yardstick, side-car, yardstick, ...), each a fresh process, and the ratio is
the median of the per-round ratios.

callgrind_control's commands reach a program only while it runs code, so each is sent
while /healthz is being polled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from .claims import ROOM_IDLE, explicit_body, seed_active_turn
from .http import Load, Wrk
from .report import AT_MOST, Row, Target, median
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


def count_bare(wrk: Wrk, work: Path, claims: int) -> float:
    out = work / f"bare-{time.time_ns()}.out"
    bare = start_bare(work, wrapper=callgrind(out))
    try:
        bare.wait_ready(timeout=300)
        return instructions_per_claim(wrk, bare, out, claims)
    finally:
        bare.stop()


def count_sidecar(wrk: Wrk, work: Path, claims: int) -> float:
    out = work / f"sidecar-{time.time_ns()}.out"
    config = SidecarConfig(work, work / f"callgrind-{time.time_ns()}.db")
    sidecar = start_sidecar(config, "sidecar-cg", wrapper=callgrind(out))
    try:
        sidecar.wait_ready(timeout=300)
        seed_active_turn(sidecar)  # the same rooms as figure 2: the idle one is known
        return instructions_per_claim(wrk, sidecar, out, claims)
    finally:
        sidecar.stop()


def instruction_figures(
    wrk: Wrk, work: Path, claims: int, rounds: int
) -> tuple[list[Row], dict[str, Any]]:
    figure = "2a instructions per claim, room with no intent"
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        return [Row(figure, float("nan"), "", failed="valgrind not installed")], {}
    work = work / "callgrind"
    work.mkdir(parents=True, exist_ok=True)
    bare: list[float] = []
    sidecar: list[float] = []
    saved = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = "0"
    try:
        for _ in range(rounds):
            bare.append(count_bare(wrk, work, claims))
            sidecar.append(count_sidecar(wrk, work, claims))
    finally:
        if saved is None:
            del os.environ["PYTHONHASHSEED"]
        else:
            os.environ["PYTHONHASHSEED"] = saved
    ratios = [s / b for s, b in zip(sidecar, bare, strict=True)]
    rows = [
        Row(
            figure,
            median(sidecar),
            "",
            baseline=median(bare),
            baseline_label="bare",
            ratio=median(ratios),
            target=Target(AT_MOST, 1.0),
            note=(
                f"callgrind's Ir (user-space instructions) over {claims:,} claims at "
                f"{CONNECTIONS} connections after a warm-up, divided by the claims; the "
                f"side-car's sweep included; median of {rounds} alternating rounds, each a "
                "fresh process with PYTHONHASHSEED=0; per-round ratios "
                + ", ".join(f"{r:.3f}" for r in ratios)
            ),
        )
    ]
    return rows, {"bare": bare, "sidecar": sidecar}
