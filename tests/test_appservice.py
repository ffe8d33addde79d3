"""The transaction listener in-process (the end-to-end tests drive it through Synapse):
transaction ids are remembered per registration, across restarts."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import httpx

from bot.app import start_sidecar

from .api_support import ROOM, sidecar_config


def command_event(event_id: str) -> dict:
    return {
        "type": "m.room.message",
        "room_id": ROOM,
        "sender": "@alice:example.org",
        "event_id": event_id,
        "origin_server_ts": int(time.time() * 1000) - 1000,
        "content": {"msgtype": "m.text", "body": "!route cloud"},
    }


async def push(port: int, token: str, txn_id: str, event_id: str) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.put(
            f"http://127.0.0.1:{port}/_matrix/app/v1/transactions/{txn_id}",
            json={"events": [command_event(event_id)]},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert response.status_code == 200, response.text


async def test_transaction_ids_are_remembered_per_registration_across_restarts(
    tmp_path: Path,
) -> None:
    config = sidecar_config(tmp_path)
    port = config.appservice.listen.port
    sidecar = await start_sidecar(config)
    await push(port, config.appservice.hs_token, "1", "$first")
    assert sidecar.service.live[ROOM].command_event_id == "$first"
    await sidecar.stop()

    sidecar = await start_sidecar(config)  # same registration: txn 1 is a retry, skipped
    await push(port, config.appservice.hs_token, "1", "$second")
    assert sidecar.service.live[ROOM].command_event_id == "$first"
    await sidecar.stop()

    new_token = "a-new-hs-token-0123456789"  # a new registration counts from 1 again
    renewed = dataclasses.replace(
        config, appservice=dataclasses.replace(config.appservice, hs_token=new_token)
    )
    sidecar = await start_sidecar(renewed)
    await push(port, new_token, "1", "$third")
    assert sidecar.service.live[ROOM].command_event_id == "$third"
    await sidecar.stop()
