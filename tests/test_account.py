"""SPEC "Intents" and "POST /v1/intents/{intent_id}/outcome": the command's confirmation is
the route's running account, and what the room reads stays true as time passes. The
service over a real store on a simulated clock; the room's text is read from the outbox
(the latest edit of the confirmation)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from route_sidecar import outbox
from route_sidecar.core.turns import Turn
from route_sidecar.service import RouteService

from .test_service import ROOM, Clock, make_service, message

CLOUD = "ollama-cloud/glm-5.1"


async def shown(service: RouteService, intent_id: str) -> str:
    """What the confirmation reads now: its latest edit, or the reply itself."""
    async with service.store.atomic(durable=False) as tx:
        latest = await tx.latest_effect(outbox.account_prefix(intent_id))
        if latest is not None:
            return str(latest[1]["m.new_content"]["body"])
        reply = await tx._one("SELECT content FROM effects WHERE key = 'reply:$cmd'")
    assert reply is not None
    return str(json.loads(reply[0])["body"])


async def routed_turn(service: RouteService, clock: Clock, report: bool) -> str:
    """`!route cloud`, a question, its claim, and (`report`) the dispatcher's report."""
    await service.on_message(message("!route cloud", "$cmd", clock.now))
    clock.now += timedelta(seconds=1)
    await service.on_message(message("why?", "$q", clock.now))
    answer = await service.claim(Turn(room_id=ROOM, turn_id="$q", last_user_message="why?"))
    assert answer.route is not None
    if report:
        await service.record_outcome(answer.route.intent_id, CLOUD, "ok", 900, None, "$q")
    return answer.route.intent_id


async def test_a_served_route_says_so_once_its_turn_has_ended(tmp_path: Path) -> None:
    clock = Clock()
    service = await make_service(tmp_path / "db.sqlite", clock)
    intent_id = await routed_turn(service, clock, report=True)
    assert "Answered by cloud" in await shown(service, intent_id)
    clock.now += service.timing.turn_idle + timedelta(seconds=1)
    await service.sweep()  # the turn went idle: the route is done
    text = await shown(service, intent_id)
    assert "used for 1 turn; later turns are routed automatically." in text
    assert "expires" not in text and "answering" not in text
    await service.store.close()


async def test_a_route_whose_dispatcher_reports_nothing_stops_saying_it_answers(
    tmp_path: Path,
) -> None:
    """The case seen in Element: a used, unreplaced confirmation kept "If no turn uses it
    by …, it expires" after its answer. Now it says it answers only moments after its
    claim, is edited again when that stops being true, and says it was used."""
    clock = Clock()
    service = await make_service(tmp_path / "db.sqlite", clock)
    intent_id = await routed_turn(service, clock, report=False)
    assert "answering now" in await shown(service, intent_id)
    clock.now += timedelta(seconds=61)
    await service.sweep()
    text = await shown(service, intent_id)
    assert "answering" not in text and "If no turn uses it" not in text
    assert "no outcome reported, so I cannot say which model answered" in text
    clock.now += service.timing.turn_idle
    await service.sweep()
    assert "later turns are routed automatically" in await shown(service, intent_id)
    await service.store.close()


async def test_a_recheck_owed_before_a_restart_is_made_after_it(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "db.sqlite"
    service = await make_service(path, clock)
    intent_id = await routed_turn(service, clock, report=False)
    await service.store.close()
    clock.now += timedelta(seconds=61)
    restarted = await make_service(path, clock)
    await restarted.sweep()
    assert "answering" not in await shown(restarted, intent_id)
    await restarted.store.close()


async def test_an_unchanged_account_is_not_edited_again(tmp_path: Path) -> None:
    clock = Clock()
    service = await make_service(tmp_path / "db.sqlite", clock)
    intent_id = await routed_turn(service, clock, report=True)
    async with service.store.atomic(durable=False) as tx:
        before = await tx.latest_effect(outbox.account_prefix(intent_id))
    for _ in range(3):
        clock.now += timedelta(seconds=2)
        await service.sweep()
    async with service.store.atomic(durable=False) as tx:
        assert await tx.latest_effect(outbox.account_prefix(intent_id)) == before
    await service.store.close()
