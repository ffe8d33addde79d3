"""Benchmark of `POST /v1/claim`: throughput and latency for a room with no intent and
for a room with an active turn, at a fixed rate, and the side-car's resident memory.

Not a test: it prints figures. Run with `make bench` (or `.venv/bin/python
bench/claims.py --seconds 5`). The side-car runs as its own process, exactly as
deployed; the load generator is another process (aiohttp client, keep-alive). No
homeserver is needed: the intent is created by pushing a transaction to the
appservice listener, as Synapse would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
ROOM_IDLE = "!idle-room:bench"
ROOM_ACTIVE = "!active-room:bench"
TURN = "$turn-event"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_sidecar(work: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    api_port, as_port = free_port(), free_port()
    config = {
        "homeserver": {"address": f"http://127.0.0.1:{free_port()}", "domain": "bench"},
        "appservice": {
            "address": f"http://127.0.0.1:{as_port}",
            "listen": {"host": "127.0.0.1", "port": as_port},
            "as_token": secrets.token_hex(16),
            "hs_token": secrets.token_hex(16),
        },
        "api": {
            "listen": {"host": "127.0.0.1", "port": api_port},
            "tokens": [secrets.token_hex(16)],
        },
        "database": f"sqlite:///{work / 'bench.db'}",
        "targets": {"cloud": {"model": "ollama-cloud/glm-5.1"}},
        "permissions": {"*": 0},
        "limits": {"routes_per_hour": 0},
        "logging": {"level": "WARNING"},
    }
    path = work / "config.yaml"
    path.write_text(json.dumps(config))
    log = (work / "sidecar.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "bot", "run", "-c", str(path)], cwd=REPO, stdout=log, stderr=log
    )
    return process, config


async def wait_healthy(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(url + "/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise SystemExit("side-car did not start")


async def seed_active_turn(config: dict[str, Any], api: str, headers: dict[str, str]) -> None:
    """`/route cloud --for 4h` pushed as Synapse would, then one claim binds the turn."""
    as_url = config["appservice"]["address"]
    event = {
        "type": "m.room.message",
        "room_id": ROOM_ACTIVE,
        "sender": "@alice:bench",
        "event_id": "$command",
        "origin_server_ts": int(time.time() * 1000) - 1000,
        "content": {"msgtype": "m.text", "body": "!route cloud --for 4h"},
    }
    async with aiohttp.ClientSession() as session:
        async with session.put(
            f"{as_url}/_matrix/app/v1/transactions/seed",
            json={"events": [event]},
            headers={"Authorization": f"Bearer {config['appservice']['hs_token']}"},
        ) as response:
            assert response.status == 200, await response.text()
        async with session.post(
            api + "/v1/claim", json=claim_body(ROOM_ACTIVE), headers=headers
        ) as response:
            answer = await response.json()
            assert answer["override"] is True, answer


def claim_body(room: str) -> dict[str, Any]:
    return {"room_id": room, "turn_id": TURN, "last_user_message": "[alice] a hard question"}


async def load(
    url: str,
    headers: dict[str, str],
    body: bytes,
    seconds: float,
    connections: int,
    rate: float | None,
) -> list[float]:
    """Closed loop over `connections` keep-alive connections, or an open loop at `rate`."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one() -> None:
            started = time.perf_counter()
            async with session.post(url, data=body) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"status {response.status}")
            latencies.append(time.perf_counter() - started)

        if rate is None:

            async def worker() -> None:
                while time.perf_counter() < deadline:
                    await one()

            await asyncio.gather(*(worker() for _ in range(connections)))
        else:
            interval, tasks = 1.0 / rate, []
            next_at = time.perf_counter()
            while next_at < deadline:
                tasks.append(asyncio.create_task(one()))
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            await asyncio.gather(*tasks)
    return latencies


def _run_load(args: tuple[Any, ...], queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    queue.put(asyncio.run(load(*args)))


def measure(
    url: str,
    headers: dict[str, str],
    room: str,
    seconds: float,
    connections: int,
    rate: float | None = None,
) -> dict[str, float]:
    """Run the load generator in its own process so it does not share the side-car's core."""
    body = json.dumps(claim_body(room)).encode()
    queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    started = time.perf_counter()
    worker = multiprocessing.Process(
        target=_run_load, args=((url, headers, body, seconds, connections, rate), queue)
    )
    worker.start()
    latencies = queue.get()
    worker.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "rps": len(latencies) / min(elapsed, seconds + 0.5),
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


async def count_claims(url: str, headers: dict[str, str], room: str, n: int) -> None:
    body = json.dumps(claim_body(room)).encode()
    connector = aiohttp.TCPConnector(limit=8)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def batch(count: int) -> None:
            for _ in range(count):
                async with session.post(url, data=body) as response:
                    await response.read()

        await asyncio.gather(*(batch(n // 8) for _ in range(8)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        process, config = start_sidecar(work)
        try:
            api = f"http://127.0.0.1:{config['api']['listen']['port']}"
            headers = {
                "Authorization": f"Bearer {config['api']['tokens'][0]}",
                "Content-Type": "application/json",
            }
            asyncio.run(wait_healthy(api))
            time.sleep(0.5)
            rss_start = rss_mb(process.pid)
            asyncio.run(seed_active_turn(config, api, headers))
            url = api + "/v1/claim"
            rows = []
            for label, room in (("no intent", ROOM_IDLE), ("active turn", ROOM_ACTIVE)):
                measure(url, headers, room, 1.0, args.connections)  # warm-up
                for conns in (args.connections, 4):
                    r = measure(url, headers, room, args.seconds, conns)
                    rows.append((label, f"closed loop, {conns} conns", r))
                r = measure(url, headers, room, args.seconds, 64, rate=1000)
                rows.append((label, "open loop, 1000/s", r))
            asyncio.run(count_claims(url, headers, ROOM_IDLE, 10_000))
            rss_after = rss_mb(process.pid)
        finally:
            process.terminate()
            process.wait(10)
    print(
        f"POST /v1/claim on {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
        f"{args.seconds:.0f} s per row"
    )
    print(f"{'room':<12} {'load':<24} {'requests':>9} {'claims/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for label, load_name, r in rows:
        print(
            f"{label:<12} {load_name:<24} {r['requests']:>9.0f} {r['rps']:>9.0f} "
            f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}"
        )
    print(
        f"resident memory: {rss_start:.1f} MB after start, "
        f"{rss_after:.1f} MB after the runs above + 10,000 more claims"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
