"""HTTP load from `wrk` (Debian's package, installed with apt-get when missing): one
thread, keep-alive connections, a Lua script that sends the POST body and bearer token
and prints wrk's own latency percentiles. Loads are run in alternating rounds, pausing
every other server, so noise on a shared machine falls on every case alike.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .report import median
from .servers import LOAD_CPU, Server, pinned

LUA = r"""
-- Written by bench/http.py. Body and token come from the environment (never argv).
local function env(name, default)
  local value = os.getenv(name)
  if value == nil or value == "" then return default end
  return value
end
local file = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
local template = file:read("*a")
file:close()
wrk.method = "POST"
wrk.body = template
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")

-- BENCH_VARY_ROOMS > 0: the body is a template with two %d (room number, request
-- number): every request names another turn, in one of that many rooms.
local vary_rooms = tonumber(env("BENCH_VARY_ROOMS", "0"))
if vary_rooms > 0 then
  local counter = 0
  request = function()
    counter = counter + 1
    return wrk.format(nil, nil, nil, string.format(template, counter % vary_rooms, counter))
  end
end

-- BENCH_STOP_AFTER > 0: wrk exits after that many responses (wrk itself would wait out
-- its whole duration), printing the count and the answers that were not 2xx.
local stop_after = tonumber(env("BENCH_STOP_AFTER", "0"))
if stop_after > 0 then
  local responses, bad = 0, 0
  response = function(status, headers, body)
    responses = responses + 1
    if status >= 300 then bad = bad + 1 end
    if responses >= stop_after then
      io.write(string.format("BENCH-STOPPED requests=%d status=%d\n", responses, bad))
      io.flush()
      os.exit(0)
    end
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH-RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d mean_us=%d " ..
    "connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    math.floor(latency.mean), e.connect, e.read, e.write, e.status, e.timeout))
end
"""
_RESULT = re.compile(r"BENCH-(RESULT|STOPPED) (.*)")


def ensure_wrk() -> str:
    """The path of `wrk`, installing Debian's package when it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk not found: installing Debian's package (apt-get install wrk)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "wrk"]

    def quietly(command: list[str], check: bool) -> int:
        done = subprocess.run(
            command, env=env, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        return done.returncode

    if quietly(install, check=False) != 0:
        quietly(["apt-get", "update", "-qq"], check=True)
        quietly(install, check=True)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("bench: wrk could not be installed; install it with apt-get install wrk")
    return found


@dataclass(frozen=True, slots=True)
class Load:
    """What one wrk run sends: `body` to `path` on `server`."""

    server: Server
    body: bytes
    connections: int
    path: str = "/v1/claim"
    vary_rooms: int = 0  # > 0: `body` is a template (see LUA)


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    errors: int  # socket errors, timeouts and answers other than 2xx/3xx
    # The server's CPU time (user + system, /proc) over the run, per request: this VM
    # exposes no hardware instruction counter (`perf stat -e instructions` is "not
    # supported"), so this stands for instructions per claim.
    cpu_us_per_request: float = float("nan")

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


class Wrk:
    """Runs wrk, pinned to the load generator's CPU when `pin` is set."""

    def __init__(self, work: Path, pin: bool) -> None:
        self.binary = ensure_wrk()
        self.work = work
        self.cpu = LOAD_CPU if pin else None
        self.script = work / "claim.lua"
        self.script.write_text(LUA, encoding="utf-8")

    def run(self, load: Load, seconds: int, stop_after: int = 0) -> WrkResult:
        """One run of `seconds` (whole seconds: wrk's unit), or until `stop_after`
        responses when that is set (then `seconds` is only a cap, and the time is the
        wall time of the wrk process, start-up included: a few milliseconds)."""
        with tempfile.NamedTemporaryFile(dir=self.work, suffix=".json") as body:
            body.write(load.body)
            body.flush()
            env = {
                **os.environ,
                "BENCH_BODY_FILE": body.name,
                "BENCH_TOKEN": load.server.token,
                "BENCH_STOP_AFTER": str(stop_after),
                "BENCH_VARY_ROOMS": str(load.vary_rooms),
            }
            command = [
                self.binary,
                "-t1",
                f"-c{load.connections}",
                f"-d{max(1, int(seconds))}s",
                "--timeout",
                "10s",
                "-s",
                str(self.script),
                load.server.url + load.path,
            ]
            cpu_before = cpu_seconds(load.server.pid)
            started = time.perf_counter()
            done = subprocess.run(
                pinned(command, self.cpu), env=env, capture_output=True, text=True, check=False
            )
            elapsed = time.perf_counter() - started
            cpu = cpu_seconds(load.server.pid) - cpu_before
        match = _RESULT.search(done.stdout)
        if done.returncode != 0 or match is None:
            raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
        fields = {k: int(v) for k, v in (pair.split("=") for pair in match.group(2).split())}
        if match.group(1) == "STOPPED":  # counted: wall time, no latency figures
            nan = float("nan")
            return WrkResult(fields["requests"], elapsed, nan, nan, nan, fields["status"])
        errors = sum(fields[k] for k in ("connect", "read", "write", "status", "timeout"))
        requests = fields["requests"]
        return WrkResult(
            requests=requests,
            seconds=fields["duration_us"] / 1e6,
            p50_ms=fields["p50_us"] / 1000,
            p99_ms=fields["p99_us"] / 1000,
            mean_ms=fields["mean_us"] / 1000,
            errors=errors,
            cpu_us_per_request=1e6 * cpu / requests if requests else float("nan"),
        )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its /proc stat, clock ticks)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    load: Load


@dataclass(frozen=True, slots=True)
class Summary:
    """Medians over the rounds of one case."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    rounds: list[WrkResult]


def alternate(
    wrk: Wrk,
    cases: Sequence[Case],
    rounds: int,
    seconds: int,
    warmup_requests: int,
) -> dict[str, Summary]:
    """Every case once per round, in order, for `rounds` rounds; while a case runs, every
    other server of the cases is paused. A warm-up of `warmup_requests` per case first."""
    servers = {id(case.load.server): case.load.server for case in cases}.values()

    def only(server: Server) -> None:
        for other in servers:
            if other is not server:
                other.pause()
        server.resume()
        time.sleep(0.05)  # let a resumed server run its due timers before the load

    for case in cases:
        only(case.load.server)
        wrk.run(case.load, 30, stop_after=warmup_requests)
    results: dict[str, list[WrkResult]] = {case.name: [] for case in cases}
    for _ in range(rounds):
        for case in cases:
            only(case.load.server)
            results[case.name].append(wrk.run(case.load, seconds))
    for server in servers:
        server.resume()
    return {
        name: Summary(
            rps=median([r.rps for r in runs]),
            p50_ms=median([r.p50_ms for r in runs]),
            p99_ms=median([r.p99_ms for r in runs]),
            errors=sum(r.errors for r in runs),
            rounds=runs,
        )
        for name, runs in results.items()
    }


def paired(case: Summary, base: Summary, get: Callable[[WrkResult], float]) -> float:
    """Median over the rounds of `get(case) / get(base)` measured in the same round."""
    return median([get(c) / get(b) for c, b in zip(case.rounds, base.rounds, strict=True)])


def rps(result: WrkResult) -> float:
    return result.rps


def p50(result: WrkResult) -> float:
    return result.p50_ms


def p99(result: WrkResult) -> float:
    return result.p99_ms


def cpu_per_request(result: WrkResult) -> float:
    return result.cpu_us_per_request
