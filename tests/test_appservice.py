"""The transaction listener in-process (the end-to-end tests drive it through Synapse):
transaction ids are remembered per registration, across restarts; an encrypted room
with encryption switched off gets one plain notice."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from route_sidecar.app import start_sidecar

from .api_support import ROOM, live_command, sidecar_config


def command_event(event_id: str) -> dict[str, Any]:
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
    assert live_command(sidecar, ROOM) == "$first"
    await sidecar.stop()

    sidecar = await start_sidecar(config)  # same registration: txn 1 is a retry, skipped
    await push(port, config.appservice.hs_token, "1", "$second")
    assert live_command(sidecar, ROOM) == "$first"
    await sidecar.stop()

    new_token = "a-new-hs-token-0123456789"  # a new registration counts from 1 again
    renewed = dataclasses.replace(
        config, appservice=dataclasses.replace(config.appservice, hs_token=new_token)
    )
    sidecar = await start_sidecar(renewed)
    await push(port, new_token, "1", "$third")
    assert live_command(sidecar, ROOM) == "$third"
    await sidecar.stop()


async def test_with_encryption_off_an_encrypted_room_gets_one_plain_notice(
    tmp_path: Path,
) -> None:
    config = sidecar_config(tmp_path)  # encryption.enabled: false
    assert config.encryption.enabled is False
    sidecar = await start_sidecar(config)
    try:
        encrypted = [
            {
                "type": "m.room.encrypted",
                "room_id": ROOM,
                "sender": "@alice:example.org",
                "event_id": f"$secret{i}",
                "origin_server_ts": int(time.time() * 1000),
                "content": {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AwgA"},
            }
            for i in range(3)
        ]
        async with httpx.AsyncClient() as client:
            for txn, event in enumerate(encrypted):
                response = await client.put(
                    f"http://127.0.0.1:{config.appservice.listen.port}"
                    f"/_matrix/app/v1/transactions/{txn}",
                    json={"events": [event]},
                    headers={"Authorization": f"Bearer {config.appservice.hs_token}"},
                )
                assert response.status_code == 200, response.text
        db = sqlite3.connect(f"file:{config.database_path}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT key, content FROM effects").fetchall()
        finally:
            db.close()
        assert [key for key, _ in rows] == [f"unreadable:{ROOM}"]
        content = json.loads(rows[0][1])
        assert content["msgtype"] == "m.notice" and "encryption.enabled" in content["body"]
    finally:
        await sidecar.stop()


# ---- bad transaction bodies and Matrix-style errors (issue 14) --------------------------


async def raw_exchange(
    port: int, request: bytes, timeout: float = 5.0
) -> tuple[int, dict[str, Any]]:
    """Raw bytes to the listener; the status and JSON body of its answer."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        length = int(
            next(
                line.split(b":", 1)[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
        )
        body = await asyncio.wait_for(reader.readexactly(length), timeout)
        return int(head.split(b" ", 2)[1]), json.loads(body)
    finally:
        writer.close()


async def test_bad_bodies_get_400_and_refusals_are_matrix_errors(tmp_path: Path) -> None:
    config = sidecar_config(tmp_path)
    port = config.appservice.listen.port
    auth = {"Authorization": f"Bearer {config.appservice.hs_token}"}
    sidecar = await start_sidecar(config)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            deep = b"[" * 1000 + b"]" * 1000  # json.loads: RecursionError
            for body in (deep, b'{"events": ' + deep + b"}", b"\xff\xfe{", b"{"):
                response = await client.put(
                    "/_matrix/app/v1/transactions/deep", content=body, headers=auth
                )
                assert response.status_code == 400, response.text
                assert response.json()["errcode"] == "M_NOT_JSON"
            response = await client.get("/_matrix/app/v1/nothing-here", headers=auth)
            assert response.status_code == 404
            assert response.json() == {"errcode": "M_UNRECOGNIZED", "error": "Not Found"}
            response = await client.post("/_matrix/app/v1/transactions/1", headers=auth)
            assert response.status_code == 405 and "PUT" in response.headers["Allow"]
            assert response.json()["errcode"] == "M_UNRECOGNIZED"
            # Over the limit without a length given: refused as it is read.
            too_big = b" " * (64 * 1024 * 1024 + 1)

            async def chunks() -> AsyncIterator[bytes]:
                for start in range(0, len(too_big), 1 << 20):
                    yield too_big[start : start + (1 << 20)]

            response = await client.put(
                "/_matrix/app/v1/transactions/big", content=chunks(), headers=auth
            )
            assert response.status_code == 413
            assert response.json()["errcode"] == "M_TOO_LARGE"
        # Over the limit by its Content-Length: refused before a byte of the body is sent.
        status, error = await raw_exchange(
            port,
            b"PUT /_matrix/app/v1/transactions/huge HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + config.appservice.hs_token.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 67108865\r\n\r\n",
        )
        assert (status, error["errcode"]) == (413, "M_TOO_LARGE")
    finally:
        await sidecar.stop()
