"""Issue 6, point 7 (backpressure): a burst of 10,000 plain messages in one transaction is
acknowledged well within the homeserver's timeout, in bounded memory, and a command in
the middle of it still applies. The side-car runs in-process; the transaction goes over
real HTTP to its appservice listener, as Synapse sends it."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path
from typing import Any

import httpx

from route_sidecar.app import start_sidecar

from .api_support import ROOM, sidecar_config

BURST = 10_000
# Synapse gives up on a transaction push after 60 s (and retries it); the side-car must
# answer far sooner, even on a busy shared machine.
ACK_LIMIT_SECONDS = 30.0
MEMORY_LIMIT_BYTES = 64 * 1024 * 1024


def message(i: int, body: str) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "room_id": ROOM,
        "sender": f"@user{i % 50}:example.org",
        "event_id": f"$burst{i}",
        "origin_server_ts": int(time.time() * 1000) - 1000,
        "content": {"msgtype": "m.text", "body": body},
    }


async def test_a_burst_of_ten_thousand_messages_is_acknowledged_and_its_command_applies(
    tmp_path: Path,
) -> None:
    config = sidecar_config(tmp_path)
    sidecar = await start_sidecar(config)
    try:
        events = [message(i, f"chatter number {i} about the deploy") for i in range(BURST)]
        events[BURST // 2] = message(BURST // 2, "!route cloud")
        tracemalloc.start(1)
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=120) as client:
            response = await client.put(
                f"http://127.0.0.1:{config.appservice.listen.port}"
                "/_matrix/app/v1/transactions/burst",
                json={"events": events},
                headers={"Authorization": f"Bearer {config.appservice.hs_token}"},
            )
        took = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert response.status_code == 200, response.text
        print(f"burst of {BURST}: acknowledged in {took:.2f} s, peak {peak / 2**20:.1f} MiB")
        assert took < ACK_LIMIT_SECONDS
        assert peak < MEMORY_LIMIT_BYTES
        intent = sidecar.service.live.current(ROOM)
        assert intent is not None and intent.command_event_id == f"$burst{BURST // 2}"
    finally:
        await sidecar.stop()
