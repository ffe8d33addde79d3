"""Issue 23 item 2: the real Hermes Agent 0.19.0 Matrix gateway, the route-sidecar plugin
installed and enabled, on a real Synapse, its model provider the reference dispatcher.

Each call Hermes makes is recorded with the side-car's answer to its claim
(hermes_gateway_support.record_claims); which fake model served it is read from what each
upstream received, and the room shows it too (each answers with its own name). A call is
placed in its own room when the claim's answer names that room and the asker; none may be
answered `ambiguous_room`, even when the same text was typed in two rooms. Every
main-loop call carries the plugin's `matrix_context` stamp (room, event id, thread,
sender: Hermes 0.17+'s `llm_request` middleware), which the dispatcher strips before the
upstream; Hermes's title call carries neither the stamp nor the room line.

Its own Synapse and side-car (module-scoped): Hermes in `agents`, encryption off (Hermes
runs with E2EE off here). One gateway serves every test of the module.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import pytest_asyncio

from demo.upstream import ModelStack

from . import hermes_gateway_support as support
from .agent_support import AgentProcess, reply_of, served_by, synapse_for_agents
from .harness import API_TOKEN, BOT, MatrixUser, Sidecar, joined, register
from .hermes_gateway_support import (
    CONTEXT_FIELD,
    THREAD_LINE,
    Claim,
    hermes_bin,
    hermes_home,
    record_claims,
)

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]
HERMES = "@hermes:localhost"
ANSWER_TIMEOUT = 60.0  # Hermes's sync loop, its agent, the dispatcher and a fake model


@pytest.fixture(scope="module")
def bin_dir() -> Path:
    return hermes_bin()  # fails (or skips, saying why) before anything starts


@pytest.fixture(scope="module")
def stack(bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Sidecar]]:
    work = tmp_path_factory.mktemp("hermes-gateway")
    with synapse_for_agents(work, [HERMES], encryption={"enabled": False}) as (hs, sidecar):
        yield hs, sidecar


@dataclass
class World:
    alice: MatrixUser
    hermes: MatrixUser  # Hermes's own account (new_dm writes its `m.direct`)
    models: ModelStack
    claims: list[Claim]
    gateway: AgentProcess


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(
    stack: tuple[Any, Sidecar], bin_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    hs, sidecar = stack
    hs_url: str = hs.base_url
    alice, hermes = register(hs_url, "alice"), register(hs_url, "hermes")
    models = await ModelStack().start(sidecar.api_url, API_TOKEN)
    claims = record_claims(models)
    home = hermes_home(
        tmp_path_factory.mktemp("hermes-home"), bin_dir, f"{models.dispatcher_url}/v1"
    )
    try:
        async with support.running_gateway(bin_dir, home, hs_url, hermes, alice) as gateway:
            yield World(alice, hermes, models, claims, gateway)
    finally:
        await models.stop()
        await alice.close()
        await hermes.close()


async def new_room(world: World) -> str:
    return await support.new_room(world.alice, HERMES)


async def new_dm(world: World) -> str:
    """A direct chat Alice starts as Element does (unnamed, `is_direct`), the side-car's
    bot its third member: Hermes counts it as a DM by its `m.direct` (no auto-thread).

    Hermes 0.19 records an invite's `is_direct` in its `m.direct`, but its pending-invite
    reconciliation joins the room before its invite handler runs, and the DM is never
    recorded: the test writes Hermes's `m.direct` itself, as Hermes's `_record_dm_room`
    would, before inviting it (Hermes reads it again when it joins)."""
    alice = world.alice
    room_id = await alice.create_room(invite=[BOT], name=None, is_direct=True)
    await alice.wait_for(room_id, joined(BOT), timeout=30, what="the side-car to join")
    path = f"/user/{quote(HERMES)}/account_data/m.direct"
    try:
        direct: dict[str, list[str]] = await world.hermes.request("GET", path)
    except AssertionError:  # 404: Hermes has no DM yet
        direct = {}
    direct.setdefault(alice.user_id, []).append(room_id)
    await world.hermes.request("PUT", path, direct)
    await alice.request("POST", f"/rooms/{quote(room_id)}/invite", {"user_id": HERMES})
    await alice.wait_for(room_id, joined(HERMES), timeout=30, what="Hermes to join")
    return room_id


@dataclass(frozen=True)
class Answered:
    """A message Alice sent, Hermes's answer to it, and the calls Hermes made for it."""

    room_id: str
    event_id: str
    answer: dict[str, Any]  # Hermes's answer event
    calls: list[Claim]  # the main-loop calls naming this room, since the message

    @property
    def served(self) -> str:
        """The fake model that wrote the answer, as the room shows it."""
        return served_by(str(self.answer["content"]["body"]))

    @property
    def thread(self) -> str | None:
        relates = self.answer["content"].get("m.relates_to") or {}
        return relates.get("event_id") if relates.get("rel_type") == "m.thread" else None


async def ask(world: World, room_id: str, text: str, thread_root: str | None = None) -> Answered:
    """Alice asks; Hermes answers. Waits for the answer and the calls it took."""
    before = len(world.claims)
    event_id = await world.alice.say(room_id, text, thread_root=thread_root)
    return await answered(world, room_id, event_id, before)


async def answered(world: World, room_id: str, event_id: str, before: int) -> Answered:
    answer = await reply_of(world.alice, world.gateway, HERMES, room_id, event_id, ANSWER_TIMEOUT)
    calls = [c for c in world.claims[before:] if c.names_room == room_id]
    assert calls, f"no call of Hermes named {room_id}: {world.claims[before:]}"
    return Answered(room_id, event_id, answer, calls)


async def route(world: World, room_id: str, target: str) -> None:
    await support.route(world.alice, world.gateway, room_id, target)


def assert_placed(world: World, asked: Answered, model: str, thread: str | None) -> None:
    """Every main-loop call of the turn carried the plugin's stamp for Alice's message,
    was placed by it in its own room with Alice as the asker, and was served by `model`
    (the fake upstream that really received it); the answer came from `model` too."""
    stamp = {
        "room_id": asked.room_id,
        "event_id": asked.event_id,
        "thread_id": thread,
        "sender": world.alice.user_id,
    }
    upstreams = [world.models.local, world.models.cloud]
    for call in asked.calls:
        decision = call.decision
        assert call.stamp == stamp, call.request
        assert decision.room_id == asked.room_id, decision
        assert decision.turn_id == (thread or asked.event_id), decision  # the stamp's
        assert decision.metadata.get("matrix_sender") == world.alice.user_id, decision
        assert call.served_by(upstreams) == model, decision
    assert asked.served == model, asked.answer


def assert_every_call_sound(world: World) -> None:
    """No claim answered `ambiguous_room`; the stamp on every main-loop call (those with
    the room line) and on no other (Hermes's title calls), and never upstream."""
    ambiguous = [c.decision for c in world.claims if c.decision.reason == "ambiguous_room"]
    assert not ambiguous, ambiguous
    for call in world.claims:
        assert (call.stamp is None) == (call.names_room is None), call.request
    forwarded = [*world.models.local.seen, *world.models.cloud.seen]
    assert not [body for body in forwarded if CONTEXT_FIELD in body]


async def test_the_same_question_in_two_rooms_is_served_by_each_room_s_route(
    world: World,
) -> None:
    """(a) `!route cloud` in one room, then the same question in both: each call is placed
    in its own room by what Hermes sends, never by the text (seen in both rooms)."""
    routed, other = await new_room(world), await new_room(world)
    await route(world, routed, "cloud")
    question = "What is the boiling point of water?"
    before = len(world.claims)
    in_routed = await world.alice.say(routed, question)
    in_other = await world.alice.say(other, question)
    routed_turn, other_turn = await asyncio.gather(
        answered(world, routed, in_routed, before), answered(world, other, in_other, before)
    )
    # Hermes auto-threads a top-level message: the thread, and the turn, are the message's.
    assert_placed(world, routed_turn, "cloud", thread=in_routed)
    assert all(c.decision.override for c in routed_turn.calls)
    assert_placed(world, other_turn, "local", thread=in_other)
    assert not any(c.decision.override for c in other_turn.calls)
    assert (routed_turn.thread, other_turn.thread) == (in_routed, in_other)
    assert_every_call_sound(world)


async def test_a_follow_up_inside_a_thread_is_placed_in_its_room_and_routed(
    world: World,
) -> None:
    """(b) A message inside an existing thread (Hermes's session of that thread): its
    call is placed in the room, its turn the thread root, and a route typed since serves
    it."""
    room = await new_room(world)
    first = await ask(world, room, "What is the capital of Peru?")
    assert_placed(world, first, "local", thread=first.event_id)
    assert first.thread == first.event_id
    await route(world, room, "cloud")
    follow_up = await ask(world, room, "And of Chile?", thread_root=first.event_id)
    assert_placed(world, follow_up, "cloud", thread=first.event_id)
    assert follow_up.thread == first.event_id  # answered in the same thread
    assert all(f"{THREAD_LINE} {first.event_id}" in c.system_prompt for c in follow_up.calls)
    assert_every_call_sound(world)


async def test_a_dm_is_not_threaded_and_its_calls_are_placed_in_it(world: World) -> None:
    """(c) A DM: Hermes does not auto-thread there, and its prompt has no thread line; the
    calls are placed in the DM (each turn the message's own event, from the stamp), the
    route serves one turn, then the default again."""
    dm = await new_dm(world)
    await route(world, dm, "cloud")
    routed = await ask(world, dm, "How far is the Moon?")
    assert_placed(world, routed, "cloud", thread=None)
    assert routed.thread is None
    assert not any(THREAD_LINE in c.system_prompt for c in routed.calls)
    later = await ask(world, dm, "And the Sun?")
    assert_placed(world, later, "local", thread=None)
    assert_every_call_sound(world)
