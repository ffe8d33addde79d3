"""route_sidecar/matrix.py's outbox against a stand-in homeserver (a unit test of that module): a
notice replaced while it is being sent (a turn's receipt, when the turn's next outcome
arrives meanwhile) is followed by an edit, so the room never keeps the older text."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from mautrix.types import EventID

from route_sidecar.core.turns import Turn
from route_sidecar.matrix import MatrixBot
from route_sidecar.metrics import Metrics
from route_sidecar.service import RouteService

from .test_service import RAW, ROOM, Clock, make_service, message


class StandInIntent:
    """Records what is sent; `during_send` runs while a send is in flight."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.during_send: Callable[[dict[str, Any]], Awaitable[None]] | None = None

    async def send_message_event(
        self, room_id: str, event_type: Any, content: dict[str, Any], txn_id: str | None = None
    ) -> EventID:
        self.sent.append((str(event_type), json.loads(json.dumps(content))))
        if self.during_send is not None:
            await self.during_send(content)
        return EventID(f"$sent{len(self.sent)}")


class OfflineBot(MatrixBot):
    stand_in = StandInIntent()

    @property
    def intent(self) -> Any:
        return self.stand_in


THREAD_RECEIPTS = {**RAW, "routing": {"receipts": "thread"}}


async def second_outcome_while_sending(
    tmp_path: Path, raw: dict[str, Any] | None = None
) -> tuple[RouteService, OfflineBot]:
    """A routed turn's first outcome is shown (sent), and its second lands while that is
    being sent; then the outbox is delivered until the room has caught up."""
    clock = Clock()
    service = await make_service(tmp_path / "db.sqlite", clock, raw)
    bot = OfflineBot(service.config, service.store, Metrics(), "test", clock=clock)
    bot.stand_in = StandInIntent()
    await service.on_message(message("!route cloud", "$cmd", clock.now))
    clock.now += timedelta(seconds=1)
    await service.on_message(message("why?", "$q", clock.now))
    answer = await service.claim(Turn(room_id=ROOM, turn_id="$q", last_user_message="why?"))
    assert answer.route is not None
    intent_id = answer.route.intent_id
    await bot.deliver_outbox()  # the confirmation and the ✅ (and the account's first edit)
    await service.record_outcome(intent_id, "ollama-cloud/glm-5.1", "ok", 900, None, "$q")

    async def second_outcome(content: dict[str, Any]) -> None:
        if "Answered by" in content.get("body", "") and bot.stand_in.during_send:
            bot.stand_in.during_send = None
            await service.record_outcome(intent_id, "ollama-cloud/glm-5.1", "ok", 700, None, "$q")

    bot.stand_in.during_send = second_outcome
    await bot.deliver_outbox()  # what shows 1 call goes out while the 2nd call lands
    clock.now += timedelta(seconds=1)
    await bot.deliver_outbox()
    return service, bot


async def test_a_receipt_replaced_while_being_sent_is_edited_to_the_latest(
    tmp_path: Path,
) -> None:
    service, bot = await second_outcome_while_sending(tmp_path, THREAD_RECEIPTS)
    bodies = [c.get("m.new_content", c).get("body", "") for _, c in bot.stand_in.sent]
    receipts = [i for i, body in enumerate(bodies) if "Answered by" in body]
    assert "1 call" in bodies[receipts[0]], bodies
    assert "2 call" in bodies[receipts[-1]], "the room must end on the latest receipt"
    edit = bot.stand_in.sent[receipts[-1]][1]
    assert edit["m.relates_to"]["rel_type"] == "m.replace"
    assert edit["m.relates_to"]["event_id"] == f"$sent{receipts[0] + 1}"
    await service.store.close()


async def test_an_account_replaced_while_being_sent_edits_the_confirmation_again(
    tmp_path: Path,
) -> None:
    """The default: what served the turn edits the command's confirmation. An account
    replaced while its edit was being sent is caught up by an edit of the confirmation
    itself (never an edit of an edit)."""
    service, bot = await second_outcome_while_sending(tmp_path)
    sent = bot.stand_in.sent
    confirmation = next(i for i, (_, c) in enumerate(sent) if "Routing the next turn" in c["body"])
    edits = [c for _, c in sent if c.get("m.relates_to", {}).get("rel_type") == "m.replace"]
    assert edits and all(
        e["m.relates_to"]["event_id"] == f"$sent{confirmation + 1}" for e in edits
    ), "every account edits the confirmation"
    assert "2 call" in edits[-1]["m.new_content"]["body"], "the room ends on the latest account"
    assert not any("m.thread" in str(c.get("m.relates_to")) for _, c in sent), "no thread post"
    await service.store.close()
