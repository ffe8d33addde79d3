"""Memory (figure 7): the side-car's resident set right after start, and its curve over a
long run of claims driven by wrk, sampled every `step` claims.

The claims of the long run name a new turn each, in one of 10,000 rooms with no intent:
a side-car that kept anything per turn or per room it was asked about would grow.
"""

from __future__ import annotations

import json
from typing import Any

from .claims import LAST_USER_MESSAGE
from .http import Load, Wrk
from .report import AT_MOST, Row, Target
from .servers import Server

ROOMS = 10_000
GROWTH_LIMIT_MB = 2.0


def varying_body() -> bytes:
    """A claim template for wrk (two %d: room number, request number)."""
    question = json.dumps(LAST_USER_MESSAGE).replace("%", "%%")
    return (
        f'{{"room_id": "!memory-%d:bench", "turn_id": "$turn-%d", "last_user_message": {question}}}'
    ).encode()


def memory_figures(
    wrk: Wrk, sidecar: Server, rss_at_start: float, claims: int, step: int, connections: int
) -> tuple[list[Row], dict[str, Any]]:
    load = Load(sidecar, varying_body(), connections, vary_rooms=ROOMS)
    curve = [(0, sidecar.rss_mb())]
    errors = 0
    done = 0
    while done < claims:
        result = wrk.run(load, 3600, stop_after=step)
        done += result.requests
        errors += result.errors
        curve.append((done, sidecar.rss_mb()))
        print(f"  {done:,} claims: RSS {curve[-1][1]:.1f} MB", flush=True)
    # Growth after the first step (caches and pools are full by then).
    reference = curve[1][1]
    growth = max(rss for _, rss in curve[1:]) - reference
    shape = ", ".join(f"{n // 1000}k {rss:.1f}" for n, rss in curve)
    rows = [
        Row(
            "7a memory: RSS after start",
            rss_at_start,
            "MB",
            target=Target(AT_MOST, 80, on="value"),
            note="VmRSS of the side-car process 0.5 s after /healthz first answered",
        ),
        Row(
            f"7b memory: RSS growth over {done:,} claims",
            growth,
            "MB",
            target=Target(AT_MOST, GROWTH_LIMIT_MB, on="value"),
            note=(
                f"highest RSS minus RSS after the first {step:,} claims; curve (claims MB): "
                f"{shape}; each claim a new turn in one of {ROOMS:,} rooms"
            ),
            failed=f"{errors} errors or non-2xx answers" if errors else "",
        ),
    ]
    return rows, {"curve": curve}
