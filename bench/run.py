"""route-sidecar benchmark (issue 7): every figure in one run, printed as a table
(figure, value, baseline, ratio, target, pass/fail), as text and as Markdown.

    make bench                       # full run (about 15 minutes)
    make bench ARGS=--quick          # smoke run (about 25 s): small counts, no Synapse
    .venv/bin/python -m bench --only claims,scale --json bench.json

Figures: 1-2 claims against a bare aiohttp yardstick (2a's instructions per claim under
callgrind), 3 flat in scale, 4 a 200 KB OpenAI body, 5 appservice ingest, 6 the
side-car's own time from a command's arrival to its reply's send, through Synapse, 7
memory, 8 start-up, 9 the reference dispatcher's latency with and without the side-car,
10 claims during a flood of 64 KB messages, 11 the database's size over days of traffic
with pruning, 12 what the Hermes plugin's claim adds to each LLM call (in Hermes 0.19's
venv).

HTTP load comes from wrk (one thread); with 2+ cores the servers run pinned to CPU 0
and wrk to CPU 1. Not a test: targets missed are reported, not raised; the exit status
is 1 only when a figure could not be measured. The last line says PASS when every
target is met, else FAIL and which.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import report
from .claims import ClaimsPlan, claims_figures
from .dispatcher import dispatcher_figures
from .flood import flood_figures
from .growth import growth_figures
from .hermes import hermes_figures
from .http import Wrk
from .ingest import ingest_figures
from .instructions import instruction_figures
from .memory import memory_figures
from .report import Row
from .scale import ScalePlan, scale_figures
from .servers import SERVER_CPU, Server, SidecarConfig, pinning_available, start_bare
from .servers import start_sidecar as spawn_sidecar

FIGURES = (
    "claims",
    "memory",
    "ingest",
    "flood",
    "scale",
    "instructions",
    "matrix",
    "dispatcher",
    "growth",
    "hermes",
)
NEEDS_MAIN_SIDECAR = {"claims", "memory", "ingest", "flood"}


@dataclass(frozen=True, slots=True)
class Plan:
    quick: bool
    rounds: int  # alternating rounds per wrk comparison
    seconds: int  # per wrk measurement
    connections: int  # for throughput (latency is measured at 4)
    warmup_requests: int
    memory_claims: int
    memory_step: int
    past_intents: int
    rooms: int
    starts: int
    ingest_repeats: int
    matrix_samples: int
    dispatcher_requests: int
    growth_days: int
    growth_turns: int
    instruction_claims: int
    instruction_rounds: int
    hermes_calls: int


FULL = Plan(
    quick=False,
    rounds=5,
    seconds=5,
    connections=16,
    warmup_requests=5000,
    memory_claims=1_000_000,
    memory_step=100_000,
    past_intents=1_000_000,
    rooms=10_000,
    starts=3,
    ingest_repeats=7,
    matrix_samples=30,
    dispatcher_requests=1000,
    growth_days=12,
    growth_turns=100,
    instruction_claims=3000,
    instruction_rounds=3,
    hermes_calls=2000,
)
QUICK = Plan(
    quick=True,
    rounds=1,
    seconds=1,
    connections=16,
    warmup_requests=300,
    memory_claims=10_000,
    memory_step=2_500,
    past_intents=20_000,
    rooms=500,
    starts=1,
    ingest_repeats=3,
    matrix_samples=0,
    dispatcher_requests=0,
    growth_days=6,
    growth_turns=5,
    instruction_claims=300,
    instruction_rounds=1,
    hermes_calls=200,
)
SKIPPED_WHEN_QUICK = {"matrix", "dispatcher", "instructions"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: small counts")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated figures to run, of: {', '.join(FIGURES)} (default: all; "
        "--quick leaves out matrix and dispatcher unless named here)",
    )
    parser.add_argument("--rounds", type=int, help="alternating rounds per comparison")
    parser.add_argument("--seconds", type=int, help="seconds per wrk measurement")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the table")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and wrk")
    return parser.parse_args(argv)


def choose(args: argparse.Namespace) -> tuple[Plan, list[str]]:
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = replace(plan, rounds=args.rounds)
    if args.seconds:
        plan = replace(plan, seconds=args.seconds)
    if args.only:
        figures = [f.strip() for f in args.only.split(",") if f.strip()]
        unknown = set(figures) - set(FIGURES)
        if unknown:
            raise SystemExit(f"bench: unknown figures {sorted(unknown)}; choose from {FIGURES}")
        if args.quick:  # named explicitly: measured, with a few samples
            plan = replace(plan, matrix_samples=5, dispatcher_requests=200)
    else:
        figures = [f for f in FIGURES if not (args.quick and f in SKIPPED_WHEN_QUICK)]
    return plan, figures


class Bench:
    """One run: the work folder, the load generator, the rows and raw data gathered."""

    def __init__(self, work: Path, plan: Plan, pin: bool) -> None:
        self.work = work
        self.plan = plan
        self.pin = pin
        self.rows: list[Row] = []
        self.raw: dict[str, Any] = {}
        self.errors = 0
        self.sidecar_libraries: list[str] | None = None  # read from a running side-car
        self._wrk: Wrk | None = None

    @property
    def wrk(self) -> Wrk:
        if self._wrk is None:
            self._wrk = Wrk(self.work, self.pin)
        return self._wrk

    @property
    def cpu(self) -> int | None:
        return SERVER_CPU if self.pin else None

    def figure(self, name: str, measure: Callable[[], tuple[list[Row], Any]]) -> None:
        """Measure one figure; a failure becomes a failed row, and the run goes on."""
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        try:
            rows, raw = measure()
        except Exception as error:
            traceback.print_exc()
            self.errors += 1
            rows, raw = [Row(f"{name}: not measured", float("nan"), "", failed=str(error))], None
        self.rows += rows
        self.raw[name] = raw
        print(f"   {time.perf_counter() - started:.0f} s", flush=True)

    def start_sidecar(self, name: str) -> Server:
        server = spawn_sidecar(SidecarConfig(self.work, self.work / f"{name}.db"), name, self.cpu)
        server.wait_ready()
        if self.sidecar_libraries is None:
            self.sidecar_libraries = report.loaded_libraries(server.pid, report.SIDECAR_LIBRARIES)
        return server

    def main_sidecar_figures(self, figures: list[str]) -> None:
        """Claims, memory and ingest share one side-car (and the yardstick)."""
        plan = self.plan
        sidecar = self.start_sidecar("sidecar")
        bare = start_bare(self.work, self.cpu) if "claims" in figures else None
        try:
            time.sleep(0.5)
            rss_at_start = sidecar.rss_mb()
            if bare is not None:
                bare.wait_ready()
                bare.pause()
            if "memory" in figures:
                self.figure(
                    "memory",
                    lambda: memory_figures(
                        self.wrk,
                        sidecar,
                        rss_at_start,
                        plan.memory_claims,
                        plan.memory_step,
                        plan.connections,
                    ),
                )
            if bare is not None:
                claims_plan = ClaimsPlan(
                    plan.rounds, plan.seconds, plan.connections, plan.warmup_requests
                )
                self.figure("claims", lambda: claims_figures(self.wrk, bare, sidecar, claims_plan))
                bare.pause()
            if "ingest" in figures:
                self.figure("ingest", lambda: ingest_figures(sidecar, plan.ingest_repeats))
            if "flood" in figures:
                self.figure(
                    "flood", lambda: flood_figures(self.wrk, sidecar, plan.rounds, plan.seconds)
                )
        finally:
            if bare is not None:
                bare.stop()
            sidecar.stop()

    def run(self, figures: list[str]) -> None:
        plan = self.plan
        if NEEDS_MAIN_SIDECAR & set(figures):
            self.main_sidecar_figures(figures)
        else:  # the machine lines name the side-car's libraries: read them from one
            self.start_sidecar("probe").stop()
        if "scale" in figures:
            scale_plan = ScalePlan(
                plan.past_intents,
                plan.rooms,
                plan.starts,
                plan.rounds,
                plan.seconds,
                plan.connections,
                plan.warmup_requests,
            )
            self.figure("scale", lambda: scale_figures(self.wrk, self.work, scale_plan, self.pin))
        if "instructions" in figures:
            self.figure(
                "instructions",
                lambda: instruction_figures(
                    self.wrk, self.work, plan.instruction_claims, plan.instruction_rounds
                ),
            )
        if "matrix" in figures:
            from .matrix import matrix_figures

            self.figure("matrix", lambda: matrix_figures(self.work, plan.matrix_samples))
        if "dispatcher" in figures:
            self.figure(
                "dispatcher", lambda: dispatcher_figures(self.work, plan.dispatcher_requests)
            )
        if "growth" in figures:
            self.figure("growth", lambda: growth_figures(plan.growth_days, plan.growth_turns))
        if "hermes" in figures:
            self.figure("hermes", lambda: hermes_figures(self.work, plan.hermes_calls, self.pin))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan, figures = choose(args)
    pin = pinning_available() and not args.no_pin
    pinning = (
        "side-car and yardstick on CPU 0, wrk on CPU 1 (taskset); Synapse figure not pinned"
        if pin
        else "none"
    )
    load_at_start = report.machine(None, pinning)["load_average"]
    mode = "quick (smoke: small counts, not for comparison)" if plan.quick else "full"
    print(f"route-sidecar bench, {mode}: {', '.join(figures)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="route-bench-") as tmp:
        bench = Bench(Path(tmp), plan, pin)
        bench.run(figures)
        info = report.machine(bench.sidecar_libraries, pinning)
    info["load_average"] = load_at_start
    info["mode"] = mode
    rows = sorted(bench.rows, key=lambda row: row.figure)
    header = f"{report.machine_text(info)}\nmode: {mode}"
    print()
    print(header)
    print()
    print(report.text_table(rows))
    print()
    print(report.notes(rows))
    markdown = f"{header}\n\n{report.markdown_table(rows)}\n\n{report.notes(rows)}\n"
    print("\nMarkdown (for docs/performance.md):\n")
    print(markdown)
    if args.markdown:
        args.markdown.write_text(markdown, encoding="utf-8")
    if args.json:
        report.write_json(args.json, info, rows, bench.raw)
    print()
    print(report.verdict(rows))
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
