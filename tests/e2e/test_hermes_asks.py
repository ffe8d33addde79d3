"""Issue 25: the real Hermes Agent 0.19.0 Matrix gateway on Synapse, its route-sidecar
plugin asking the side-car itself (ROUTE_SIDECAR_URL and ROUTE_SIDECAR_TOKEN in Hermes's
environment: integrations/hermes/route.py), Hermes pointed straight at one base URL that
serves two fake models by model name (demo/upstream.py's `ModelServer`): no dispatcher,
no side-car client anywhere else.

The plugin claims each main-loop call and sets its `model` on an override, so which fake
received a call says where the route sent it; it reports what the server answered with,
so the room's account of the route names that model. The fake "cloud" answers with a
model name other than the one asked (`glm-5.1:cloud` for `ollama-cloud/glm-5.1`): the
account can only name it from the plugin's report. Tool rounds use Hermes's `todo` tool
(in memory, offline), asked for by the fake model before it answers.

Then the same with Hermes pointed at the reference dispatcher, which claims and reports
every call too: the side-car counts each call once (the plugin's `call_id`).

Its own Synapse and side-car; one gateway per configuration (the dispatcher's for its
class only). The side-car is stopped in the module's last test.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from demo.upstream import TOOL, FakeUpstream, ModelStack, Served

from . import hermes_gateway_support as support
from .agent_support import AgentProcess, is_message_from, reply_of, served_by, synapse_for_agents
from .harness import API_TOKEN, MatrixUser, Sidecar, register
from .hermes_gateway_support import (
    CONTEXT_FIELD,
    Claim,
    hermes_bin,
    hermes_home,
    plugin_asks,
    record_claims,
)

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]
HERMES = "@hermes:localhost"  # Hermes → the model server, the plugin asking
VIA_DISPATCHER = "@hermes-d:localhost"  # Hermes → the dispatcher, the plugin asking too
LOCAL, CLOUD = ModelStack.LOCAL, ModelStack.CLOUD
CLOUD_ANSWERS = "glm-5.1:cloud"  # the model the fake cloud says answered
ANSWER_TIMEOUT = 60.0
ACCOUNT_TIMEOUT = 30.0
SOUNDS_WRONG = ("error", "fail", "⚠", "sorry", "unavailable", "route")
NOT_ANSWERING = "route-sidecar: the side-car is not answering"  # the plugin's warning


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Any, Sidecar]]:
    """Hermes's `bin/` (fails, or skips saying why, before anything starts), a Synapse
    and the side-car, both Hermes accounts among its agents."""
    bin_dir = hermes_bin()
    work = tmp_path_factory.mktemp("hermes-asks")
    agents = [HERMES, VIA_DISPATCHER]
    with synapse_for_agents(work, agents, encryption={"enabled": False}) as (hs, sidecar):
        yield bin_dir, hs, sidecar


@dataclass
class World:
    alice: MatrixUser
    models: ModelStack
    sidecar: Sidecar
    hs_url: str
    bin_dir: Path
    gateway: AgentProcess  # Hermes → the model server


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(
    stack: tuple[Path, Any, Sidecar], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    bin_dir, hs, sidecar = stack
    hs_url: str = hs.base_url
    alice, hermes = register(hs_url, "alice"), register(hs_url, "hermes")
    models = await ModelStack().start(sidecar.api_url, API_TOKEN)
    models.cloud.answers_as = CLOUD_ANSWERS
    home = hermes_home(
        tmp_path_factory.mktemp("hermes-home"), bin_dir, models.server.base_url, [TOOL]
    )
    try:
        async with support.running_gateway(
            bin_dir, home, hs_url, hermes, alice, plugin_asks(sidecar)
        ) as gateway:
            yield World(alice, models, sidecar, hs_url, bin_dir, gateway)
    finally:
        await models.stop()
        await alice.close()
        await hermes.close()


@dataclass(frozen=True)
class Turn:
    """Hermes's answer to a message of Alice's, and the calls the model server got for it."""

    room_id: str
    event_id: str  # the message Hermes answered (a question, or a command it rewrote)
    answer: dict[str, Any]
    calls: list[Served]  # main-loop calls stamped with this room, since the message

    @property
    def served(self) -> str:
        """The fake model that wrote the answer, as the room shows it."""
        return served_by(str(self.answer["content"]["body"]))


async def answered(world: World, room_id: str, event_id: str, before: int) -> Turn:
    answer = await reply_of(world.alice, world.gateway, HERMES, room_id, event_id, ANSWER_TIMEOUT)
    calls = [
        s
        for s in world.models.server.served[before:]
        if s.context is not None and s.context.get("room_id") == room_id
    ]
    assert calls, f"no call stamped with {room_id}: {world.models.server.served[before:]}"
    return Turn(room_id, event_id, answer, calls)


async def ask(world: World, room_id: str, text: str) -> Turn:
    """Alice says `text` (a question, or a command Hermes's plugin rewrites to one);
    Hermes answers. Waits for the answer and takes the calls it made."""
    before = len(world.models.server.served)
    event_id = await world.alice.say(room_id, text)
    return await answered(world, room_id, event_id, before)


def assert_served(turn: Turn, upstream: str, model: str, rounds: int = 1) -> None:
    """Every main-loop call of the turn was asked for `model` (the plugin set it, or left
    the default), was served by `upstream`, and was stamped with the message it
    answers; a call id each; the answer came from `upstream`."""
    assert len(turn.calls) == rounds, [c.body for c in turn.calls]
    for call in turn.calls:
        assert (call.upstream, call.body["model"]) == (upstream, model), call.body
        assert call.context is not None
        assert call.context["event_id"] == turn.event_id, call.context
    assert len({c.context["call_id"] for c in turn.calls if c.context}) == rounds
    assert turn.served == upstream, turn.answer


async def account(world: World, room_id: str, confirmation: str, calls: int) -> str:
    """The route's account, as the confirmation reads once `calls` are reported."""
    return await world.alice.wait_shown(
        room_id,
        confirmation,
        lambda text: f"{calls} call(s)" in text,
        timeout=ACCOUNT_TIMEOUT,
        what=f"the account of {calls} call(s)",
    )


def assert_account(shown: str, calls: int) -> None:
    """One turn, on cloud, its calls named by what the server answered with."""
    assert "used for 1 turn;" in shown, shown
    assert f"what answered was `{CLOUD_ANSWERS}`: {calls} call(s)" in shown, shown
    assert shown.count("call(s)") == 1, shown


def outcomes(sidecar: Sidecar, room_id: str) -> list[tuple[str | None, str]]:
    """The side-car's stored outcomes of a room (read-only): (intent, model) per call."""
    with sqlite3.connect(f"file:{sidecar.db_path}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT intent_id, model FROM outcomes WHERE room_id = ? ORDER BY id", (room_id,)
        ).fetchall()
    return [(str(i) if i is not None else None, str(m)) for i, m in rows]


@contextmanager
def tool_rounds(rounds: int, *upstreams: FakeUpstream) -> Iterator[None]:
    """The fake models ask for `rounds` tool calls in each turn before answering."""
    for upstream in upstreams:
        upstream.tool_rounds = rounds
    try:
        yield
    finally:
        for upstream in upstreams:
            upstream.tool_rounds = 0


async def test_a_route_serves_the_next_question_on_cloud_then_the_default_serves(
    world: World,
) -> None:
    """`!route cloud`, then a question: the plugin's claim sets the cloud model, which
    the model server serves; the account names the model the server answered with. The
    next question goes out as Hermes asked it (the default)."""
    room = await support.new_room(world.alice, HERMES)
    confirmation = await support.route(world.alice, world.gateway, room, "cloud")
    routed = await ask(world, room, "Why is the sky blue?")
    assert_served(routed, "cloud", CLOUD)
    assert_account(await account(world, room, confirmation, 1), 1)
    later = await ask(world, room, "And why are sunsets red?")
    assert_served(later, "local", LOCAL)
    stored = outcomes(world.sidecar, room)  # the plugin's report, of the routed call only
    assert [model for _, model in stored] == [CLOUD_ANSWERS] and stored[0][0], stored
    assert "route-sidecar: routed to cloud" in world.gateway.log_path.read_text()


async def test_the_one_message_form_is_answered_on_cloud(world: World) -> None:
    """`!route cloud` and the question in one message: the plugin hands Hermes the
    question, and its call goes to cloud; the next question to the default."""
    room = await support.new_room(world.alice, HERMES)
    routed = await ask(world, room, "!route cloud\nWhat is the capital of Peru?")
    assert_served(routed, "cloud", CLOUD)
    confirmation = (await world.alice.wait_reply(room, routed.event_id))["event_id"]
    assert_account(await account(world, room, confirmation, 1), 1)
    later = await ask(world, room, "And of Chile?")
    assert_served(later, "local", LOCAL)


async def test_again_re_asks_the_last_question_on_cloud(world: World) -> None:
    """A question answered by the default, then `!route cloud again`: the plugin hands
    Hermes the question again, answered on cloud; the account is the `again` reply's."""
    room = await support.new_room(world.alice, HERMES)
    question = "How many moons has Mars?"
    first = await ask(world, room, question)
    assert_served(first, "local", LOCAL)
    again = await ask(world, room, "!route cloud again")
    assert_served(again, "cloud", CLOUD)
    assert question in str(again.calls[0].body["messages"][-1]["content"])
    confirmation = (await world.alice.wait_reply(room, again.event_id))["event_id"]
    assert_account(await account(world, room, confirmation, 1), 1)


async def test_a_turn_of_several_tool_rounds_stays_on_its_route(world: World) -> None:
    """Both fakes ask for Hermes's `todo` tool twice before answering: the routed turn's
    three calls (two tool rounds, then the answer) all go to cloud, claimed as one turn;
    the default model serves none of them."""
    room = await support.new_room(world.alice, HERMES)
    confirmation = await support.route(world.alice, world.gateway, room, "cloud")
    with tool_rounds(2, world.models.local, world.models.cloud):
        routed = await ask(world, room, "Plan the release, step by step.")
    assert_served(routed, "cloud", CLOUD, rounds=3)
    for number, call in enumerate(routed.calls):  # Hermes ran the tool in between
        results = [m for m in call.body["messages"] if m.get("role") == "tool"]
        assert len(results) == number, call.body["messages"]
    assert_account(await account(world, room, confirmation, 3), 3)
    assert len(outcomes(world.sidecar, room)) == 3


@pytest_asyncio.fixture(scope="class", loop_scope="session")
async def via_dispatcher(
    world: World, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[AgentProcess, list[Claim]]]:
    """Hermes → the reference dispatcher, the plugin asking too (for one class's tests):
    its gateway, and the dispatcher's claims from now on."""
    hermes = register(world.hs_url, "hermes-d")
    home = hermes_home(
        tmp_path_factory.mktemp("hermes-d-home"),
        world.bin_dir,
        f"{world.models.dispatcher_url}/v1",
        [TOOL],
    )
    claims = record_claims(world.models)
    try:
        async with support.running_gateway(
            world.bin_dir, home, world.hs_url, hermes, world.alice, plugin_asks(world.sidecar)
        ) as gateway:
            yield gateway, claims
    finally:
        await hermes.close()


class TestWithTheDispatcherAlsoClaiming:
    """Hermes → the reference dispatcher, which claims and reports each call as well, the
    plugin asking too: one binding per turn, each call counted once."""

    async def test_nothing_is_doubled(
        self, world: World, via_dispatcher: tuple[AgentProcess, list[Claim]]
    ) -> None:
        gateway, claims = via_dispatcher
        alice, models = world.alice, world.models
        room = await support.new_room(alice, VIA_DISPATCHER)
        confirmation = await support.route(alice, gateway, room, "cloud")
        before, forwarded = len(claims), len(models.cloud.seen)
        with tool_rounds(1, models.local, models.cloud):
            question = await alice.say(room, "Which port does SSH use?")
            answer = await reply_of(alice, gateway, VIA_DISPATCHER, room, question, 60)
        assert served_by(answer["content"]["body"]) == "cloud"
        calls = [c for c in claims[before:] if (c.stamp or {}).get("room_id") == room]
        # The dispatcher's claims carry the plugin's call ids: the side-car answered each
        # as it had answered the plugin, one binding for the turn.
        assert [c.decision.reason for c in calls] == ["bound", "continued"], calls
        assert all(c.decision.override and c.request["model"] == CLOUD for c in calls)
        assert all(c.served_by([models.local, models.cloud]) == "cloud" for c in calls)
        assert len({c.stamp["call_id"] for c in calls}) == 2
        assert all(CONTEXT_FIELD not in body for body in models.cloud.seen[forwarded:])
        shown = await account(world, room, confirmation, 2)
        assert "used for 1 turn;" in shown and shown.count("call(s)") == 1, shown
        # Who reported first is counted (the dispatcher names the model it chose; the
        # plugin what the dispatcher's answer said); never both.
        stored = outcomes(world.sidecar, room)
        assert len(stored) == 2, stored
        assert {model for _, model in stored} <= {CLOUD, CLOUD_ANSWERS}, stored
        history = await alice.say(room, "!route history")
        rows = (await alice.wait_reply(room, history))["content"]["body"].splitlines()[1:]
        assert len(rows) == 1 and "2 call(s)" in rows[0], rows
        await asyncio.sleep(1)  # a late second report would land here: none does
        assert len(outcomes(world.sidecar, room)) == 2


async def test_the_side_car_stopped_mid_conversation_costs_only_the_route(world: World) -> None:
    """`!route cloud`, then the side-car stops: the next question is answered by the
    default model, with no error in the room; the plugin warns in Hermes's log. Once the
    side-car is back, the plugin asks it again. (Last: it stops the side-car.)"""
    room = await support.new_room(world.alice, HERMES)
    first = await ask(world, room, "What is 2+2?")
    assert_served(first, "local", LOCAL)
    await support.route(world.alice, world.gateway, room, "cloud")
    world.sidecar.stop()
    try:
        unrouted = await ask(world, room, "And 3+3?")
        assert_served(unrouted, "local", LOCAL)
        # Hermes says only its answers (and its notice that no home channel is set).
        said = [
            str(e["content"]["body"])
            for e in await world.alice.events(room)
            if is_message_from(HERMES, e) and "m.new_content" not in e["content"]
        ]
        assert sum("answer from local" in text for text in said) == 2, said
        assert not [t for t in said if any(w in t.lower() for w in SOUNDS_WRONG)], said
        assert world.gateway.log_path.read_text().count(NOT_ANSWERING) == 1  # said once
    finally:
        world.sidecar.start()
    # Synapse sends the side-car what it missed on its own backoff: once it has, a route
    # serves again, asked by the plugin.
    back = await support.new_room(world.alice, HERMES)
    command = await world.alice.say(back, "!route cloud")
    await world.alice.wait_reply(back, command, timeout=90)
    await asyncio.to_thread(support.wait_dropped, world.gateway, back)
    assert_served(await ask(world, back, "And 4+4?"), "cloud", CLOUD)
