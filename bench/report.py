"""What the bench prints: one row per figure (value, baseline, ratio, target, pass/fail),
the machine it ran on, as a text table, as Markdown (for docs/performance.md) and as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Target:
    """`ratio <= limit` (or `>=`), or the same on the value when there is no baseline."""

    op: str  # "<=" or ">="
    limit: float
    on: str = "ratio"  # "ratio" or "value"

    def text(self, unit: str) -> str:
        sign = "≤" if self.op == "<=" else "≥"
        if self.on == "ratio":
            return f"{sign} {self.limit:g}x"
        return f"{sign} {self.limit:g} {unit}".rstrip()

    def met(self, value: float, ratio: float | None) -> bool:
        measured = ratio if self.on == "ratio" else value
        if measured is None:
            return False
        return measured <= self.limit if self.op == "<=" else measured >= self.limit


AT_MOST = "<="
AT_LEAST = ">="


@dataclass(slots=True)
class Row:
    """One figure. `passed` is None for a figure that is reported but has no target.

    `ratio` is value / baseline, unless given: alternating rounds give it as the median
    of the per-round ratios, which a load drifting over the run does not skew."""

    figure: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    target: Target | None = None
    note: str = ""
    failed: str = ""  # set when the measurement itself went wrong (errors, wrong answers)
    ratio: float | None = None
    passed: bool | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.ratio is None and self.baseline:
            self.ratio = self.value / self.baseline
        if self.failed:
            self.passed = False
        elif self.target is not None:
            self.passed = self.target.met(self.value, self.ratio)

    def cells(self) -> list[str]:
        baseline = ""
        if self.baseline is not None:
            baseline = _number(self.baseline, self.unit)
            if self.baseline_label:
                baseline += f" ({self.baseline_label})"
        verdict = "info" if self.passed is None else "PASS" if self.passed else "FAIL"
        if self.failed:
            verdict = f"FAIL: {self.failed if len(self.failed) < 60 else self.failed[:57] + '...'}"
        return [
            self.figure,
            _number(self.value, self.unit),
            baseline,
            "" if self.ratio is None else f"{self.ratio:.2f}x",
            "" if self.target is None else self.target.text(self.unit),
            verdict,
        ]


HEADER = ["figure", "value", "baseline", "ratio", "target", "pass/fail"]


def _number(value: float, unit: str) -> str:
    if value != value:  # NaN: not measured
        return "n/a"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".rstrip()


def text_table(rows: Sequence[Row]) -> str:
    cells = [HEADER, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADER))]
    lines = []
    for n, line in enumerate(cells):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
        if n == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(rows: Sequence[Row]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    out = [line(HEADER), "| " + " | ".join("---" for _ in HEADER) + " |"]
    out += [line(row.cells()) for row in rows]
    return "\n".join(out)


def verdict(rows: Sequence[Row]) -> str:
    """One line: PASS when every figure with a target met it (and none failed to be
    measured), else FAIL with the figures that did not."""
    judged = [row for row in rows if row.passed is not None]
    missed = [row.figure for row in judged if not row.passed]
    met = len(judged) - len(missed)
    if not missed:
        return f"bench: PASS ({met} of {len(judged)} targets met)"
    return f"bench: FAIL ({met} of {len(judged)} targets met; missed: {'; '.join(missed)})"


def notes(rows: Sequence[Row]) -> str:
    lines = []
    for row in rows:
        text = "; ".join(x for x in (row.note, row.failed and f"failed: {row.failed}") if x)
        if text:
            lines.append(f"- {row.figure}: {text}")
    return "\n".join(lines)


def write_json(path: Path, machine: dict[str, Any], rows: Sequence[Row], raw: Any) -> None:
    data = {
        "machine": machine,
        "figures": [{**asdict(row), "target": row.target and asdict(row.target)} for row in rows],
        "raw": raw,
    }
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


# ---- the machine ----------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loaded_libraries(pid: int, names: Sequence[str]) -> list[str]:
    """Which of `names` a running process has loaded (its extension modules in
    /proc/PID/maps): tells the side-car's event loop and JSON library from outside."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return []
    return [name for name in names if f"/{name}/" in maps or f"/{name}." in maps]


SIDECAR_LIBRARIES = ("uvloop", "orjson", "ujson", "msgspec")


def machine(sidecar_libraries: list[str] | None, pinning: str) -> dict[str, Any]:
    """The machine, and the side-car's event loop and JSON library when known (from
    `loaded_libraries(pid, SIDECAR_LIBRARIES)` read while it ran)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "kernel": platform.release(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "pinning": pinning,
    }
    if sidecar_libraries is not None:
        libs = sidecar_libraries
        info["sidecar_event_loop"] = "uvloop" if "uvloop" in libs else "asyncio (default)"
        info["sidecar_json"] = ", ".join(x for x in libs if x != "uvloop") or "json (stdlib)"
    return info


def machine_text(info: dict[str, Any]) -> str:
    load = ", ".join(str(x) for x in info["load_average"])
    lines = [
        f"machine: {info['cpu']}, {info['cores']} cores, Linux {info['kernel']}, "
        f"Python {info['python']}, load average at start {load}",
        f"pinning: {info['pinning']}",
    ]
    if "sidecar_event_loop" in info:
        lines.append(
            f"side-car: event loop {info['sidecar_event_loop']}, JSON {info['sidecar_json']} "
            "(read from the modules its process has loaded)"
        )
    return "\n".join(lines)


# ---- small statistics -------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
