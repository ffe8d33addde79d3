"""Issue 14: both listeners against clients that are broken or hostile, over raw sockets.
No request, however malformed, puts a token in the log or in the answer; a connection
that never completes a request is closed; and idle connections, however many, never use
up the open files: the listeners still answer under a lowered `ulimit -n`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from route_sidecar import listeners
from route_sidecar.app import Sidecar, start_sidecar

from .api_support import TOKEN, free_port, sidecar_config

REPO_ROOT = Path(__file__).resolve().parent.parent
HS_TOKEN = "hs-token-0123456789abcdef"  # sidecar_config's
FILLER = b"A" * 9000  # past aiohttp's 8,190-byte limit on a request line or header


async def exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes; everything the listener answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def long_header(token: str) -> bytes:
    return (
        b"PUT /_matrix/app/v1/transactions/1 HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + token.encode() + FILLER + b"\r\nContent-Length: 2\r\n\r\n{}"
    )


def nul_after_token(token: str) -> bytes:
    return (
        b"POST /v1/claim HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + token.encode()
        + b"\x00tail\r\nContent-Length: 2\r\n\r\n{}"
    )


def long_url(token: str) -> bytes:
    return (
        b"PUT /_matrix/app/v1/transactions/1?access_token="
        + token.encode()
        + b"&pad="
        + FILLER
        + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    )


def bad_chunk(token: str) -> bytes:
    return (
        b"POST /v1/claim HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token.encode() + b"\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz" + token.encode() + b"\r\n{}\r\n0\r\n\r\n"
    )


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[Sidecar]:
    running = await start_sidecar(sidecar_config(tmp_path))
    try:
        yield running
    finally:
        await running.stop()


@pytest.mark.parametrize("probe", [long_header, nul_after_token, long_url, bad_chunk])
@pytest.mark.parametrize("listener", ["api", "appservice"])
async def test_no_request_puts_a_token_in_the_log_or_the_answer(
    sidecar: Sidecar,
    caplog: pytest.LogCaptureFixture,
    probe: Callable[[str], bytes],
    listener: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    config = sidecar.config
    port = config.api.listen.port if listener == "api" else config.appservice.listen.port
    answers = [await exchange(port, probe(token)) for token in (TOKEN, HS_TOKEN)]
    await asyncio.sleep(0.1)
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    for token in (TOKEN, HS_TOKEN):
        assert token not in logged, "a token in the log"
        assert not any(token.encode() in answer for answer in answers), "a token in the answer"
    assert "malformed request refused" in logged
    for answer in answers:  # the listener's own error shape, not aiohttp's text
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b" 400 " in head.split(b"\r\n")[0], answer[:200]
        error = json.loads(body)
        assert ("errcode" in error) == (listener == "appservice"), error


async def test_a_connection_without_a_whole_request_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listeners, "IDLE_SECONDS", 0.5)
    running = await start_sidecar(sidecar_config(tmp_path))
    try:
        for port in (running.config.api.listen.port, running.config.appservice.listen.port):
            idle = await asyncio.open_connection("127.0.0.1", port)
            slow = await asyncio.open_connection("127.0.0.1", port)
            slow[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            for reader, writer in (idle, slow):
                assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the side-car
                writer.close()
    finally:
        await running.stop()


def test_connection_limit_follows_the_open_files_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = max(8, min(listeners.MAX_CONNECTIONS, (soft - listeners.FILES_KEPT) // 4))
    assert listeners.connection_limit() == expected
    assert 2 * expected <= max(soft - listeners.FILES_KEPT, 16)


# ---- many idle connections, under a lowered open-files limit (its own process) -----------


OPEN_FILES = 256
IDLE_CONNECTIONS = 1100  # per listener: over the whole open-files limit


def run_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "homeserver": {"address": f"http://127.0.0.1:{free_port()}", "domain": "example.org"},
        "appservice": {
            "address": "http://127.0.0.1:29333",
            "listen": {"host": "127.0.0.1", "port": free_port()},
            "as_token": "as-token-" + os.urandom(16).hex(),
            "hs_token": "hs-token-" + os.urandom(16).hex(),
        },
        "api": {"listen": {"host": "127.0.0.1", "port": free_port()}, "tokens": [TOKEN]},
        "database": f"sqlite:///{tmp_path / 'sidecar.db'}",
        "targets": {"cloud": {"model": "ollama-cloud/glm-5.1"}},
        "permissions": {"*": 0},
        "encryption": {"enabled": False},
    }


def lowered_open_files() -> None:  # in the child, before exec
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, hard))


@pytest.fixture
def small_sidecar(tmp_path: Path) -> Iterator[dict[str, Any]]:
    config = run_config(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    log = (tmp_path / "sidecar.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "route_sidecar", "run", "-c", str(path)],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=lowered_open_files,
    )
    api = f"http://127.0.0.1:{config['api']['listen']['port']}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, (tmp_path / "sidecar.log").read_text()
            try:
                if httpx.get(api + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "side-car did not start"
            time.sleep(0.1)
        yield config
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


def hold_idle(port: int, count: int) -> list[socket.socket]:
    """Connections that send nothing (the kernel's backlog may take some unaccepted)."""
    held = []
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(2)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:  # the backlog is full: a connection no one accepts
            sock.close()
            continue
        held.append(sock)
    return held


def test_idle_connections_do_not_stop_either_listener(small_sidecar: dict[str, Any]) -> None:
    config = small_sidecar
    api_port = config["api"]["listen"]["port"]
    as_port = config["appservice"]["listen"]["port"]
    held = hold_idle(api_port, IDLE_CONNECTIONS) + hold_idle(as_port, IDLE_CONNECTIONS)
    try:
        time.sleep(0.5)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        hs_auth = {"Authorization": f"Bearer {config['appservice']['hs_token']}"}
        with httpx.Client(timeout=5) as client:
            for attempt in range(3):  # each answer on a fresh connection
                api = f"http://127.0.0.1:{api_port}"
                assert (
                    client.get(api + "/healthz", headers={"Connection": "close"}).status_code == 200
                )
                claim = client.post(
                    api + "/v1/claim",
                    json={"room_id": "!r:example.org", "last_user_message": "hi"},
                    headers={**auth, "Connection": "close"},
                )
                assert claim.status_code == 200, claim.text
                put = client.put(
                    f"http://127.0.0.1:{as_port}/_matrix/app/v1/transactions/t{attempt}",
                    json={"events": []},
                    headers={**hs_auth, "Connection": "close"},
                )
                assert put.status_code == 200, put.text
    finally:
        for sock in held:
            sock.close()
