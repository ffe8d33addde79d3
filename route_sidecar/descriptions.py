"""The command's MSC4391 description in the bot's rooms (core/describe.py builds it):
published when the bot joins a room and at start, updated when it differs (the targets
changed), removed before the bot leaves. The room's state is read first, so an
unchanged description is never sent again, and a room where the bot may not send state
events is said once in the log and otherwise left as it is: commands work there as
typed."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mautrix.api import Method, Path
from mautrix.appservice import IntentAPI
from mautrix.errors import MatrixRequestError

from .config import Config
from .core import describe, policy

log = logging.getLogger("route_sidecar.matrix")


class CommandDescriptions:
    def __init__(self, config: Config, intent: Callable[[], IntentAPI]) -> None:
        self.config = config
        self._intent = intent
        prefixes = config.routing.prefixes
        self.state_key = describe.state_key(describe.command_name(prefixes), config.bot_user_id)
        # Off: nothing is described, and a description published before is removed.
        self.wanted: dict[str, Any] = (
            describe.description(prefixes, list(config.targets), config.routing.raw_models.allowed)
            if config.routing.describe_command
            else {}
        )
        self._said: set[str] = set()  # rooms where a missing power level was logged

    async def publish(self, room_id: str) -> None:
        """The room's description made current (the bot joined, or started)."""
        if policy.room_allowed(room_id, self.config):
            await self._make(room_id, self.wanted)

    async def publish_all(self, rooms: Iterable[str]) -> None:
        """Every room made current, at start (the targets may have changed)."""
        count = 0
        for room_id in rooms:
            await self.publish(room_id)
            count += 1
        log.info("command descriptions checked rooms=%d", count)

    async def withdraw(self, room_id: str) -> None:
        """The description removed (an empty content, MSC4391's state key): before the
        bot leaves, since it cannot after."""
        await self._make(room_id, {})

    async def _make(self, room_id: str, wanted: Mapping[str, Any]) -> None:
        intent = self._intent()
        rooms = Path.v3.rooms[room_id]
        try:
            state = await intent.api.request(Method.GET, rooms.state)
        except Exception as error:  # network or homeserver trouble: next join or start
            log.warning(
                "command description not checked room=%s error=%s",
                room_id,
                getattr(error, "errcode", None) or type(error).__name__,
            )
            return
        state = state if isinstance(state, list) else []
        current = describe.current_description(state, self.state_key)
        if not describe.needs_update(current, wanted):
            return
        if not policy.may_send_state(self.config.bot_user_id, state, describe.DESCRIPTION_EVENT):
            self._cannot(room_id, "power-level")
            return
        try:
            await intent.api.request(
                Method.PUT, rooms.state[describe.DESCRIPTION_EVENT][self.state_key], dict(wanted)
            )
        except MatrixRequestError as error:
            if error.errcode == "M_FORBIDDEN":
                self._cannot(room_id, error.errcode)
            else:
                log.warning("command description not sent room=%s error=%s", room_id, error.errcode)
            return
        except Exception as error:  # network or homeserver trouble: next join or start
            log.warning(
                "command description not sent room=%s error=%s", room_id, type(error).__name__
            )
            return
        self._said.discard(room_id)
        log.info("command description %s room=%s", "published" if wanted else "removed", room_id)

    def _cannot(self, room_id: str, reason: str) -> None:
        """Said once a room (and process): the room works as before, by typed commands."""
        if room_id in self._said:
            return
        self._said.add(room_id)
        log.info(
            "command description not published room=%s reason=%s "
            "(the bot may not send state events there; typed commands work as before)",
            room_id,
            reason,
        )
