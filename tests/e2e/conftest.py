"""Session fixtures: one real Synapse on loopback, one side-car process, four users."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from demo.agent import StandInAgent
from demo.upstream import FakeUpstream, ModelStack

from .harness import (
    API_TOKEN,
    BOT,
    LookupClient,
    MatrixUser,
    Sidecar,
    joined,
    register,
    synapse_and_sidecar,
    synapse_python,
)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, Sidecar]]:
    python = synapse_python()
    if python is None:
        if os.environ.get("ROUTE_SIDECAR_REQUIRE_SYNAPSE"):
            pytest.fail("Synapse is required (ROUTE_SIDECAR_REQUIRE_SYNAPSE) but not installed")
        pytest.skip("Synapse venv not found (.venv-synapse): run `make test`, which installs it")
    with synapse_and_sidecar(tmp_path_factory.mktemp("e2e"), python) as (hs, sidecar):
        yield hs, sidecar


@pytest.fixture(scope="session")
def sidecar(stack: tuple[object, Sidecar]) -> Sidecar:
    return stack[1]


@pytest.fixture(scope="session")
def hs_url(stack: tuple[object, Sidecar]) -> str:
    return str(stack[0].base_url)  # type: ignore[attr-defined]


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def users(hs_url: str) -> AsyncIterator[dict[str, MatrixUser]]:
    made = {name: register(hs_url, name) for name in ("alice", "bob", "carol", "mallory", "agent")}
    yield made
    for user in made.values():
        await user.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def lookup(sidecar: Sidecar) -> AsyncIterator[LookupClient]:
    client = LookupClient(sidecar.api_url)
    yield client
    await client.close()


async def open_room(
    users: dict[str, MatrixUser],
    creator: str = "alice",
    others: tuple[str, ...] = ("bob", "carol", "agent"),
) -> str:
    """A fresh room with the bot and the others in it, as the creator would set it up."""
    owner = users[creator]
    room_id = await owner.create_room(invite=[BOT, *(users[o].user_id for o in others)])
    for other in others:
        await users[other].join(room_id)
    await owner.wait_for(
        room_id,
        joined(BOT),
        what="the bot to join",
    )
    return room_id


@pytest_asyncio.fixture(loop_scope="session")
async def room(users: dict[str, MatrixUser]) -> str:
    return await open_room(users)


class Chain:
    """The models, the reference dispatcher and the stand-in agent, talking to the room."""

    def __init__(self, local: FakeUpstream, cloud: FakeUpstream, agent: StandInAgent) -> None:
        self.local, self.cloud, self.agent = local, cloud, agent


@pytest_asyncio.fixture(loop_scope="session")
async def chain(
    users: dict[str, MatrixUser], sidecar: Sidecar, hs_url: str
) -> AsyncIterator[Chain]:
    models = await ModelStack().start(sidecar.api_url, API_TOKEN)
    agent_user = users["agent"]
    agent = StandInAgent(hs_url, agent_user.token, agent_user.user_id, models.dispatcher_url)
    agent.ignore(BOT)
    await agent.start()
    yield Chain(models.local, models.cloud, agent)
    await agent.stop()
    await models.stop()


def tail_log(sidecar: Sidecar) -> str:
    return sidecar.log_tail()


__all__ = ["Chain", "Path", "open_room"]
