"""Who may do what: permission levels, target resolution, caps, the rate limit, which
messages the bot listens to at all. Pure: config values and facts in, a decision out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..config import Config, Target
from .commands import RouteTo, Scope, ScopeKind, format_duration

RATE_WINDOW = timedelta(hours=1)


def user_level(user_id: str, permissions: Mapping[str, int]) -> int | None:
    """Exact user id, then server name, then `*`; None: the user is not permitted at all."""
    if user_id in permissions:
        return permissions[user_id]
    server = user_id.partition(":")[2]
    if server and server in permissions:
        return permissions[server]
    return permissions.get("*")


def may_invite(user_id: str, config: Config) -> bool:
    return user_level(user_id, config.permissions) is not None


CREATOR_POWER = 2**53  # room versions 12+: a creator outranks every power level
# Room versions whose creators hold only the power level the power_levels event gives.
_CREATORS_NOT_PRIVILEGED = {str(version) for version in range(1, 12)}


def _level(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def room_power(user_id: str, state: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """The user's power level in a room and the level needed to kick, read from the
    room's state events as the homeserver returns them (`GET /rooms/{id}/state`)."""
    level, levels = _power(user_id, state)
    return level, _level(levels.get("kick"), 50)


def may_send_state(user_id: str, state: Sequence[Mapping[str, Any]], event_type: str) -> bool:
    """Whether the user's power level lets it send a state event of this type (the
    room's `events` level for the type, else `state_default`), read from the room's state."""
    level, levels = _power(user_id, state)
    events = levels.get("events")
    by_type: Mapping[str, Any] = events if isinstance(events, Mapping) else {}
    # With no power_levels event at all, anyone may send state (the spec's defaults).
    default = _level(levels.get("state_default"), 50) if levels else 0
    return level >= _level(by_type.get(event_type), default)


def _power(user_id: str, state: Sequence[Mapping[str, Any]]) -> tuple[int, Mapping[str, Any]]:
    """The user's power level and the room's power_levels content."""
    create: Mapping[str, Any] = {}
    levels: Mapping[str, Any] = {}
    for event in state:
        if event.get("state_key") != "":
            continue
        if event.get("type") == "m.room.create":
            create = event
        elif event.get("type") == "m.room.power_levels":
            found = event.get("content")
            levels = found if isinstance(found, Mapping) else {}
    content = create.get("content") or {}
    if str(content.get("room_version", "1")) not in _CREATORS_NOT_PRIVILEGED:
        additional = content.get("additional_creators")
        creators = {create.get("sender"), *(additional if isinstance(additional, list) else ())}
        if user_id in creators:
            return CREATOR_POWER, levels
    users_field = levels.get("users")
    users: Mapping[str, Any] = users_field if isinstance(users_field, Mapping) else {}
    return _level(users.get(user_id), _level(levels.get("users_default"), 0)), levels


def may_ask_to_leave(power_level: int, kick_level: int) -> bool:
    """`/route leave` is for the room's admins: whoever could remove the bot (kick it)
    may ask it to go."""
    return power_level >= kick_level


def room_allowed(room_id: str, config: Config) -> bool:
    return not config.rooms or room_id in config.rooms


def find_target(name: str, targets: Mapping[str, Target]) -> Target | None:
    lowered = name.lower()
    for target in targets.values():
        if target.name == lowered or lowered in target.aliases:
            return target
    return None


def usable_targets(user_id: str, config: Config) -> list[Target]:
    level = user_level(user_id, config.permissions)
    if level is None:
        return []
    return [t for t in config.targets.values() if level >= t.level]


def retry_targets(
    asker: str | None, failed_model: str, failed_target: str | None, config: Config
) -> list[Target]:
    """The targets a failed turn's suggestion offers: those the asker may use (anyone's,
    the `*` level, when the asker is unknown), other than the one that failed."""
    level = user_level(asker, config.permissions) if asker else config.permissions.get("*")
    if level is None:
        return []
    return [
        t
        for t in config.targets.values()
        if level >= t.level and t.model != failed_model and t.name != failed_target
    ]


@dataclass(frozen=True, slots=True)
class Resolved:
    """A route command checked against the config: the target name and the model id."""

    target: str
    model: str
    scope: Scope


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str


def resolve_route(command: RouteTo, sender: str, config: Config, prefix: str) -> Resolved | Refused:
    """Check target, permission level and caps for a route command."""
    level = user_level(sender, config.permissions)
    if level is None:
        return Refused("You are not allowed to route this room's agent. Ask the admin.")
    scope = command.scope
    if scope.kind is ScopeKind.TURNS and scope.turns > config.routing.max_turns:
        return Refused(
            f"`--turns` is capped at {config.routing.max_turns} here. "
            f"Try `{prefix} {command.target} --turns {config.routing.max_turns}`."
        )
    if scope.kind is ScopeKind.DURATION and scope.duration is not None:
        cap = config.routing.max_duration
        if scope.duration > cap:
            return Refused(
                f"`--for` is capped at {format_duration(cap)} here. "
                f"Try `{prefix} {command.target} --for {format_duration(cap)}`."
            )
    raw_model = command.raw_model
    if raw_model is not None:
        raw = config.routing.raw_models
        if not raw.allowed:
            return Refused(
                f"Raw model ids are not allowed here. Type `{prefix} targets` "
                "for the targets you may use."
            )
        if not any(p.fullmatch(raw_model) for p in raw.patterns):
            return Refused(
                f"Model `{raw_model}` is not on this room's allow-list. Type `{prefix} targets`."
            )
        if level < raw.level:
            return Refused(f"Raw model ids need permission level {raw.level}; yours is {level}.")
        return Resolved(target=command.target, model=raw_model, scope=scope)
    target = find_target(command.target, config.targets)
    if target is None:
        valid = ", ".join(f"`{t.name}`" for t in usable_targets(sender, config)) or "none"
        return Refused(
            f"Unknown target `{command.target}`. Targets you may use: {valid}. "
            f"Example: `{prefix} {next(iter(config.targets))}`."
        )
    if level < target.level:
        valid = ", ".join(f"`{t.name}`" for t in usable_targets(sender, config)) or "none"
        return Refused(
            f"Target `{target.name}` needs permission level {target.level}; yours is {level}. "
            f"Targets you may use: {valid}."
        )
    return Resolved(target=target.name, model=target.model, scope=scope)


def rate_limited(recent_routes: int, config: Config) -> bool:
    """`recent_routes`: intents this user created in the last RATE_WINDOW."""
    return config.routes_per_hour > 0 and recent_routes >= config.routes_per_hour


def is_stale(sent_at: datetime, now: datetime, config: Config) -> bool:
    """A command older than the intent TTL when it arrives (after downtime) is ignored."""
    return now - sent_at > config.routing.intent_ttl


def listens_to(sender: str, msgtype: str | None, is_edit: bool, config: Config) -> bool:
    """Messages the bot reads at all: not its own, not an agent's, no notices, no edits."""
    return is_from_people(sender, msgtype, config) and not is_edit


def is_from_people(sender: str, msgtype: str | None, config: Config) -> bool:
    """Not the bot's, not an agent's, not a notice: a message an agent may answer (an edit
    of one too: agents answer an edit as a new question)."""
    return not (sender == config.bot_user_id or sender in config.agents or msgtype == "m.notice")
