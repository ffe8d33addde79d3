"""What the side-car costs a dispatcher: latency of chat completions through the reference
dispatcher with the side-car in the path, against the same dispatcher without it, and
against the upstream called directly; all in one run, alternating, on loopback.

Not a test: it prints figures. `.venv/bin/python bench/dispatcher.py [--requests 2000]`.
Every server is its own process: the fake upstream, the side-car, and two dispatchers
(one consulting the side-car, one not); the client sends one request at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.claims import ROOM_ACTIVE, seed_active_turn, start_sidecar, wait_healthy  # noqa: E402
from demo.upstream import FakeUpstream, free_port  # noqa: E402

MODEL = "glm-4.7-flash:q4_K_M"
CLOUD = "ollama-cloud/glm-5.1"


async def serve_upstream(port: int) -> None:
    upstream = FakeUpstream("local")
    upstream.port = port
    from aiohttp import web

    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def start_dispatcher(work: Path, name: str, upstream: str, sidecar: dict | None) -> tuple:
    port = free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "default_model": MODEL,
        "upstreams": {MODEL: {"base_url": upstream}, CLOUD: {"base_url": upstream}},
    }
    if sidecar is not None:
        config["sidecar"] = sidecar
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(config))
    log = (work / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "integrations.dispatcher.dispatcher", "-c", str(path)],
        cwd=REPO,
        stdout=log,
        stderr=log,
    )
    return process, f"http://127.0.0.1:{port}/v1"


def body(room: str) -> dict:
    system = f"**Matrix Room ID:** {room}\n**Matrix Thread:** $turn-event"
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "[alice] a hard question"},
        ],
    }


async def wait_up(url: str) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            try:
                await client.get(url, timeout=0.5)
                return
            except httpx.HTTPError:
                await asyncio.sleep(0.05)
    raise SystemExit(f"{url} did not start")


async def run(requests: int) -> None:
    with TemporaryDirectory() as tmp:
        work = Path(tmp)
        upstream_port = free_port()
        upstream = subprocess.Popen(  # noqa: ASYNC220 (start-up, before any timing)
            [sys.executable, __file__, "--serve-upstream", str(upstream_port)], cwd=REPO
        )
        sidecar, config = start_sidecar(work)
        api = f"http://127.0.0.1:{config['api']['listen']['port']}"
        headers = {"Authorization": f"Bearer {config['api']['tokens'][0]}"}
        upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
        plain, plain_url = start_dispatcher(work, "plain", upstream_url, None)
        routed, routed_url = start_dispatcher(
            work,
            "routed",
            upstream_url,
            {"url": api, "token": config["api"]["tokens"][0], "timeout": 0.5},
        )
        try:
            await wait_healthy(api)
            await seed_active_turn(config, api, headers)
            for url in (upstream_url, plain_url, routed_url):
                await wait_up(url)
            cases = [
                ("upstream directly", upstream_url, "!idle:bench"),
                ("dispatcher, no side-car", plain_url, "!idle:bench"),
                ("dispatcher + side-car, no intent", routed_url, "!idle:bench"),
                ("dispatcher + side-car, active turn", routed_url, ROOM_ACTIVE),
            ]
            samples: dict[str, list[float]] = {name: [] for name, _, _ in cases}
            async with httpx.AsyncClient(timeout=10) as client:
                for _ in range(50):  # warm-up
                    for _, url, room in cases:
                        await client.post(f"{url}/chat/completions", json=body(room))
                for _ in range(requests):  # alternating, so noise hits every case alike
                    for name, url, room in cases:
                        started = time.perf_counter()
                        response = await client.post(f"{url}/chat/completions", json=body(room))
                        samples[name].append(time.perf_counter() - started)
                        assert response.status_code == 200, response.text
        finally:
            for process in (routed, plain, sidecar, upstream):
                process.terminate()
                process.wait(10)
    base = statistics.median(samples["dispatcher, no side-car"])
    print(f"{requests} sequential chat completions per case, alternating, loopback")
    print(f"{'case':<36} {'p50 ms':>8} {'p99 ms':>8} {'p50 vs no side-car':>19}")
    for name, values in samples.items():
        values.sort()
        p50 = statistics.median(values)
        p99 = values[int(len(values) * 0.99) - 1]
        print(f"{name:<36} {p50 * 1000:>8.2f} {p99 * 1000:>8.2f} {p50 / base:>18.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        asyncio.run(serve_upstream(args.serve_upstream))
        return 0
    asyncio.run(run(args.requests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
