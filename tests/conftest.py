"""Fixtures shared by the tests that run the side-car in-process (lookup API, client)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from .api_support import Api, OpenApi, start_api, stop_api


@pytest.fixture(scope="session")
def openapi() -> OpenApi:
    return OpenApi()


@pytest.fixture
async def api(tmp_path: Path, openapi: OpenApi) -> AsyncIterator[Api]:
    running = await start_api(tmp_path, openapi)
    try:
        yield running
    finally:
        await stop_api(running)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A test that failed before closing its database leaves aiosqlite's worker thread
    running (its frame keeps the connection alive), and the interpreter would wait for it
    at exit forever: a failure must end the run, not hang it."""
    import gc

    try:
        import aiosqlite
    except ImportError:
        return
    for leftover in gc.get_objects():
        if isinstance(leftover, aiosqlite.Connection) and leftover._running:
            leftover.stop()
