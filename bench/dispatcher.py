"""What the side-car costs a dispatcher (an extra figure, no target in issue 7): latency of
chat completions through the reference dispatcher with the side-car in the path, against
the same dispatcher without it, and against the fake upstream called directly; all in
one run, alternating, one request at a time, on loopback.

Every server is its own process: the fake upstream (`python -m bench.dispatcher
--serve-upstream PORT`), the side-car, and two dispatchers (one consulting the side-car).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from .claims import ROOM_ACTIVE, ROOM_IDLE, TURN, seed_active_turn
from .report import Row, median
from .servers import REPO, Server, SidecarConfig, free_port, start_sidecar

MODEL = "glm-4.7-flash:q4_K_M"
CLOUD = "ollama-cloud/glm-5.1"
WARMUP = 50


async def serve_upstream(port: int) -> None:
    from aiohttp import web

    from demo.upstream import FakeUpstream

    upstream = FakeUpstream("local")
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def start_dispatcher(
    work: Path, name: str, upstream: str, sidecar: dict[str, Any] | None
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "default_model": MODEL,
        "upstreams": {MODEL: {"base_url": upstream}, CLOUD: {"base_url": upstream}},
    }
    if sidecar is not None:
        config["sidecar"] = sidecar
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    path.chmod(0o600)
    log = (work / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "integrations.dispatcher.dispatcher", "-c", str(path)],
        cwd=REPO,
        stdout=log,
        stderr=log,
    )
    return process, f"http://127.0.0.1:{port}/v1"


def completion_body(room: str) -> dict[str, Any]:
    system = f"**Matrix Room ID:** {room}\n**Matrix Thread:** {TURN}"
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "[alice] why did the deploy fail on the build host?"},
        ],
    }


async def wait_up(url: str) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            try:
                await client.get(url, timeout=0.5)
                return
            except httpx.HTTPError:
                await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not start")


async def sample(cases: list[tuple[str, str, str]], requests: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    async with httpx.AsyncClient(timeout=10) as client:
        for n in range(WARMUP + requests):  # alternating, so noise hits every case alike
            for name, url, room in cases:
                started = time.perf_counter()
                response = await client.post(f"{url}/chat/completions", json=completion_body(room))
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    raise RuntimeError(f"{name}: {response.status_code} {response.text[:200]}")
                if n >= WARMUP:
                    samples[name].append(elapsed * 1000)
    return samples


def dispatcher_figures(work: Path, requests: int) -> tuple[list[Row], dict[str, Any]]:
    work = work / "dispatcher"
    work.mkdir(parents=True, exist_ok=True)
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "bench.dispatcher", "--serve-upstream", str(upstream_port)],
        cwd=REPO,
    )
    sidecar: Server = start_sidecar(SidecarConfig(work, work / "sidecar.db"))
    upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
    plain, plain_url = start_dispatcher(work, "plain", upstream_url, None)
    routed, routed_url = start_dispatcher(
        work,
        "routed",
        upstream_url,
        {"url": sidecar.url, "token": sidecar.token, "timeout": 0.5},
    )
    try:
        sidecar.wait_ready()
        seed_active_turn(sidecar)
        for url in (upstream_url, plain_url, routed_url):
            asyncio.run(wait_up(url))
        cases = [
            ("upstream", upstream_url, ROOM_IDLE),
            ("plain", plain_url, ROOM_IDLE),
            ("idle", routed_url, ROOM_IDLE),
            ("active", routed_url, ROOM_ACTIVE),
        ]
        got = asyncio.run(sample(cases, requests))
    finally:
        for process in (routed, plain, upstream):
            process.terminate()
            process.wait(10)
        sidecar.stop()
    p50 = {name: median(values) for name, values in got.items()}
    how = (
        f"{requests} sequential chat completions per case, alternating; upstream alone "
        f"{p50['upstream']:.2f} ms"
    )
    rows = [
        Row(
            "9a dispatcher + side-car, no intent: p50 per call",
            p50["idle"],
            "ms",
            p50["plain"],
            "no side-car",
            note=f"{how}; the side-car adds {p50['idle'] - p50['plain']:.2f} ms",
        ),
        Row(
            "9b dispatcher + side-car, active turn: p50 per call",
            p50["active"],
            "ms",
            p50["plain"],
            "no side-car",
            note=f"{how}; the side-car adds {p50['active'] - p50['plain']:.2f} ms",
        ),
    ]
    return rows, {"p50_ms": p50}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve-upstream", type=int, required=True, metavar="PORT")
    asyncio.run(serve_upstream(parser.parse_args().serve_upstream))


if __name__ == "__main__":
    main()
