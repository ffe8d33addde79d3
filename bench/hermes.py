"""What the Hermes plugin's asking costs each LLM call (issue 25; an extra figure, no
target): Hermes 0.19's own middleware runners, `apply_llm_request_middleware` then
`run_llm_execution_middleware`, around a call that does nothing, as agent/
conversation_loop.py runs them for every call of the agent's main loop, inside the
session context the gateway sets for a Matrix message. Three cases, alternating call by
call in one process: no plugin; the plugin asking a real side-car (`route-sidecar run`,
its own process) in a room with no route; and in a room whose turn a route serves (the
claim overrides the model, the report lands on the route's account).

The measured part is what the call waits for: Hermes's copies of the request (made only
when some middleware is registered), the stamp, the claim over loopback HTTP, the timing
around the call. The report is sent by the plugin's background thread; it is let finish
before the next call, outside the timing, as it does between real LLM calls (seconds
apart).

Hermes pins its own libraries, so this part runs in Hermes 0.19's venv
(`.venv-hermes/0.19.0`, `make setup`) as `python -m bench.hermes --calls N`, its
samples back as JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .claims import ROOM_ACTIVE, ROOM_IDLE, TURN, seed_active_turn
from .report import Row, median
from .servers import LOAD_CPU, REPO, SERVER_CPU, SidecarConfig, pinned, start_sidecar

VERSION = "0.19.0"
LOCAL = "glm-4.7-flash:q4_K_M"
CLOUD = "ollama-cloud/glm-5.1"  # the seeded route's target, bench/servers.py's "cloud"
IDLE_EVENT = "$hello"  # bench/claims.py's message in the idle room
ASKER = "@alice:bench"
WARMUP = 100
SYSTEM_CHARS = 8000  # about a Hermes system prompt with its session context
HISTORY = 8  # earlier messages of the conversation, 400 characters each
CASES = ("without", "no_route", "route")


def hermes_request() -> dict[str, Any]:
    """A main-loop call's chat-completions kwargs, of a realistic size."""
    system = ("You are Hermes Agent, an assistant in a Matrix room. " * 200)[:SYSTEM_CHARS]
    history = [
        {"role": "user" if n % 2 == 0 else "assistant", "content": f"message {n} " + "x" * 390}
        for n in range(HISTORY)
    ]
    return {
        "model": LOCAL,
        "messages": [
            {"role": "system", "content": system},
            *history,
            {"role": "user", "content": "[Alice] why did the deploy fail on the build host?"},
        ],
        "stream": True,
    }


def measure(calls: int) -> dict[str, list[float]]:
    """In Hermes's venv: milliseconds per call of each case, `calls` each after a
    warm-up, the cases alternating call by call."""
    plugins: Any = importlib.import_module("hermes_cli.plugins")
    middleware: Any = importlib.import_module("hermes_cli.middleware")
    session: Any = importlib.import_module("gateway.session_context")
    plugins.discover_plugins()
    with_plugin = plugins.get_plugin_manager()
    executions = with_plugin._middleware.get("llm_execution", [])
    if len(executions) != 1:
        raise RuntimeError("the plugin registered no llm_execution middleware")
    asker = executions[0].__self__
    managers = {"without": plugins.PluginManager(), "no_route": with_plugin, "route": with_plugin}
    places = {
        "without": (ROOM_IDLE, IDLE_EVENT),
        "no_route": (ROOM_IDLE, IDLE_EVENT),
        "route": (ROOM_ACTIVE, TURN),
    }
    expected = {"without": LOCAL, "no_route": LOCAL, "route": CLOUD}
    request = hermes_request()

    def endpoint(sent: dict[str, Any]) -> Any:
        return SimpleNamespace(model=sent["model"], choices=[])

    samples: dict[str, list[float]] = {case: [] for case in CASES}
    for n in range(WARMUP + calls):
        for case in CASES:
            plugins._plugin_manager = managers[case]
            room, event = places[case]
            context = {
                "task_id": "task",
                "turn_id": "turn",
                "api_request_id": f"req-{case}-{n}",
                "session_id": "session",
                "platform": "matrix",
                "model": LOCAL,
                "provider": "custom",
                "base_url": "http://127.0.0.1:1/v1",
                "api_mode": "chat_completions",
                "api_call_count": 1,
            }
            tokens = session.set_session_vars(
                platform="matrix", chat_id=room, message_id=event, thread_id=event, user_id=ASKER
            )
            try:
                started = time.perf_counter()
                sent = middleware.apply_llm_request_middleware(request, **context).payload
                middleware.run_llm_execution_middleware(
                    sent, endpoint, original_request=request, **context
                )
                elapsed = time.perf_counter() - started
            finally:
                session.clear_session_vars(tokens)
            asker._reports.join()  # the background report, done before the next call
            if sent["model"] != expected[case]:
                raise RuntimeError(f"{case}: the call went out for {sent['model']}")
            if n >= WARMUP:
                samples[case].append(elapsed * 1000)
    return samples


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else float("nan")


def hermes_figures(work: Path, calls: int, pin: bool) -> tuple[list[Row], dict[str, Any]]:
    from tests.hermes_support import HERMES_VENVS, install_plugin

    bin_dir = HERMES_VENVS / VERSION / "bin"
    if not (bin_dir / "python").exists():
        raise RuntimeError(f"no Hermes {VERSION} venv at {bin_dir.parent}: make setup")
    work = work / "hermes"
    home = work / "hermes-home"
    home.mkdir(parents=True)
    install_plugin(home, bin_dir)
    sidecar = start_sidecar(
        SidecarConfig(work, work / "sidecar.db"), cpu=SERVER_CPU if pin else None
    )
    try:
        sidecar.wait_ready()
        seed_active_turn(sidecar)
        env = {
            **os.environ,
            "HERMES_HOME": str(home),
            "ROUTE_SIDECAR_URL": sidecar.url,
            "ROUTE_SIDECAR_TOKEN": sidecar.token,
        }
        command = [str(bin_dir / "python"), "-m", "bench.hermes", "--calls", str(calls)]
        done = subprocess.run(
            pinned(command, LOAD_CPU if pin else None),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"Hermes's part failed:\n{done.stderr[-2000:]}")
        samples: dict[str, list[float]] = json.loads(done.stdout)
    finally:
        sidecar.stop()
    p50s = {case: median(values) for case, values in samples.items()}
    p99s = {case: p99(values) for case, values in samples.items()}
    how = (
        f"{calls} calls per case, alternating, Hermes {VERSION}'s middleware runners around "
        f"a no-op call ({SYSTEM_CHARS // 1000} KB system prompt, {HISTORY} earlier messages)"
    )
    rows = []
    for case, label in (("no_route", "no route"), ("route", "a route")):
        for stat, values in (("median", p50s), ("p99", p99s)):
            rows.append(
                Row(
                    f"12 Hermes LLM call, the plugin asking, {label}: {stat}",
                    values[case],
                    "ms",
                    values["without"],
                    "no plugin",
                    note=f"{how}; the plugin adds {values[case] - values['without']:.2f} ms",
                )
            )
    return rows, {"p50_ms": p50s, "p99_ms": p99s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, required=True)
    json.dump(measure(parser.parse_args().calls), sys.stdout)


if __name__ == "__main__":
    main()
