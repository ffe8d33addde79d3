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
