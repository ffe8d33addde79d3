"""SPEC "Chat commands" and "Intents": who may route to what, caps, rate limit, what the bot
listens to."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from route_sidecar.config import Config, parse_config
from route_sidecar.core.commands import RESERVED_WORDS, RouteTo, Scope, parse_command
from route_sidecar.core.policy import (
    Refused,
    Resolved,
    find_target,
    is_stale,
    listens_to,
    may_ask_to_leave,
    may_invite,
    rate_limited,
    resolve_route,
    retry_targets,
    room_allowed,
    room_power,
    usable_targets,
    user_level,
)

TOKEN = "t" * 32
ALICE = "@alice:example.org"  # level 50 by her user id
BOB = "@bob:example.org"  # level 10 by the server name
CAROL = "@carol:other.org"  # level 0 by "*"
AGENT = "@hermes:example.org"
NOW = datetime(2026, 5, 9, 11, 0, tzinfo=UTC)


def make_config(**overrides: Any) -> Config:
    raw: dict[str, Any] = {
        "homeserver": {"address": "http://127.0.0.1:8008", "domain": "example.org"},
        "appservice": {
            "address": "http://127.0.0.1:29333",
            "as_token": "as-" + TOKEN,
            "hs_token": "hs-" + TOKEN,
        },
        "api": {"tokens": ["api-" + TOKEN]},
        "database": "sqlite:///x.db",
        "targets": {
            "cloud": {"model": "ollama-cloud/glm-5.1", "aliases": ["c", "Remote"]},
            "local": {"model": "glm-4.7-flash:q4_K_M", "aliases": ["l"]},
            "big": {"model": "ollama-cloud/kimi-k2", "level": 50},
        },
        "routing": {"max_turns": 10, "max_duration": "4h", "intent_ttl": "15m"},
        "permissions": {ALICE: 50, "example.org": 10, "*": 0},
        "agents": [AGENT],
        "limits": {"routes_per_hour": 5},
    }
    for section, value in overrides.items():
        raw[section] = value
    return parse_config(raw, {})


CONFIG = make_config()
RAW_ALLOWED = make_config(
    routing={
        "raw_models": {"allowed": True, "patterns": [r"ollama-cloud/.+", "gpt-4o"], "level": 50}
    }
)


def route(text: str) -> RouteTo:
    command = parse_command(text)
    assert isinstance(command, RouteTo), command
    return command


# --- user_level --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "permissions", "level"),
    [
        (ALICE, {ALICE: 50, "example.org": 10, "*": 0}, 50),
        (ALICE, {ALICE: 0, "example.org": 10, "*": 100}, 0),  # exact wins, even when lower
        (BOB, {ALICE: 50, "example.org": 10, "*": 0}, 10),
        (BOB, {"example.org": 0, "*": 100}, 0),  # server wins over *, even when lower
        (CAROL, {ALICE: 50, "example.org": 10, "*": 0}, 0),
        (CAROL, {ALICE: 50, "example.org": 10}, None),
        ("@dave:sub.example.org", {"example.org": 10}, None),  # no suffix matching
        ("@eve:example.org:8448", {"example.org": 10, "example.org:8448": 20}, 20),
        ("@x:example.org", {}, None),
        ("not-a-user-id", {"*": 1}, 1),
    ],
)
def test_user_level_is_exact_user_then_server_then_star(
    user: str, permissions: dict[str, int], level: int | None
) -> None:
    assert user_level(user, permissions) == level


def state(version: str, users: dict[str, int], **extra: Any) -> list[dict[str, Any]]:
    create = {"room_version": version, **extra}
    return [
        {"type": "m.room.create", "state_key": "", "sender": "@creator:x", "content": create},
        {"type": "m.room.power_levels", "state_key": "", "content": {"users": users}},
        {"type": "m.room.member", "state_key": "@creator:x", "content": {"membership": "join"}},
    ]


def test_room_power_reads_levels_and_the_kick_level() -> None:
    levels = state("11", {"@creator:x": 100, "@mod:x": 50})
    assert room_power("@creator:x", levels) == (100, 50)
    assert room_power("@mod:x", levels) == (50, 50)
    assert room_power("@nobody:x", levels) == (0, 50)
    levels[1]["content"].update(kick=75, users_default=10)
    assert room_power("@nobody:x", levels) == (10, 75)
    assert room_power("@nobody:x", []) == (0, 50)
    broken = [{"type": "m.room.power_levels", "state_key": "", "content": {"users": []}}]
    assert room_power("@nobody:x", broken) == (0, 50)


def test_room_power_gives_creators_of_version_12_rooms_more_than_any_level() -> None:
    # Room versions 12+ leave the creators out of `users`: they outrank everyone.
    levels = state("12", {"@mod:x": 50}, additional_creators=["@co:x"])
    assert room_power("@creator:x", levels)[0] > 2**31
    assert room_power("@co:x", levels)[0] > 2**31
    assert room_power("@mod:x", levels) == (50, 50)
    assert room_power("@creator:x", state("11", {}))[0] == 0  # not so before version 12


def test_only_who_could_kick_the_bot_may_ask_it_to_leave() -> None:
    assert may_ask_to_leave(100, 50)
    assert may_ask_to_leave(50, 50)
    assert not may_ask_to_leave(49, 50)
    assert not may_ask_to_leave(0, 50)
    assert may_ask_to_leave(0, 0)


def test_only_permitted_users_may_invite() -> None:
    closed = make_config(permissions={ALICE: 0})
    assert may_invite(ALICE, closed)
    assert not may_invite(BOB, closed)
    assert may_invite(CAROL, CONFIG)


def test_empty_room_list_allows_every_room_and_a_list_only_its_rooms() -> None:
    assert room_allowed("!any:example.org", CONFIG)
    listed = make_config(rooms=["!one:example.org"])
    assert room_allowed("!one:example.org", listed)
    assert not room_allowed("!two:example.org", listed)


# --- targets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "target", "model"),
    [
        ("/route cloud", "cloud", "ollama-cloud/glm-5.1"),
        ("/route c", "cloud", "ollama-cloud/glm-5.1"),
        ("/route remote", "cloud", "ollama-cloud/glm-5.1"),
        ("/route REMOTE", "cloud", "ollama-cloud/glm-5.1"),
        ("/route l", "local", "glm-4.7-flash:q4_K_M"),
    ],
)
def test_names_and_aliases_resolve_to_the_target_and_its_model(
    text: str, target: str, model: str
) -> None:
    assert resolve_route(route(text), CAROL, CONFIG, "/route") == Resolved(
        target=target, model=model, scope=Scope.once()
    )


@settings(max_examples=50, deadline=None)
@given(
    st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True).filter(
        lambda name: name not in RESERVED_WORDS and name not in ("cloud", "c", "remote", "l")
    )
)
def test_every_name_the_config_accepts_can_be_typed(name: str) -> None:
    config = make_config(targets={"cloud": {"model": "m1"}, name: {"model": "m2"}})
    assert resolve_route(route(f"!route {name.upper()}"), CAROL, config, "/route") == Resolved(
        target=name, model="m2", scope=Scope.once()
    )


def test_unknown_target_reply_lists_the_targets_the_user_may_use() -> None:
    refused = resolve_route(route("/route clod"), CAROL, CONFIG, "/route")
    assert isinstance(refused, Refused)
    assert "`clod`" in refused.reason
    assert "`cloud`" in refused.reason and "`local`" in refused.reason
    assert "`big`" not in refused.reason  # above Carol's level
    assert re.search(r"`/route \w+`", refused.reason), "says what to type instead"


def test_target_above_the_users_level_is_refused() -> None:
    refused = resolve_route(route("/route big"), BOB, CONFIG, "/route")
    assert isinstance(refused, Refused)
    assert "50" in refused.reason and "10" in refused.reason
    assert "`cloud`" in refused.reason
    allowed = resolve_route(route("/route big"), ALICE, CONFIG, "/route")
    assert allowed == Resolved("big", "ollama-cloud/kimi-k2", Scope.once())


def test_user_without_any_level_is_refused_everything() -> None:
    closed = make_config(permissions={ALICE: 50})
    assert isinstance(resolve_route(route("/route cloud"), CAROL, closed, "/route"), Refused)
    assert usable_targets(CAROL, closed) == []


def test_usable_targets_follow_the_level() -> None:
    assert [t.name for t in usable_targets(CAROL, CONFIG)] == ["cloud", "local"]
    assert [t.name for t in usable_targets(ALICE, CONFIG)] == ["cloud", "local", "big"]


def test_find_target_is_case_insensitive_and_knows_aliases() -> None:
    assert find_target("CLOUD", CONFIG.targets) is CONFIG.targets["cloud"]
    assert find_target("remote", CONFIG.targets) is CONFIG.targets["cloud"]
    assert find_target("nope", CONFIG.targets) is None


# --- caps --------------------------------------------------------------------------------


def test_turns_up_to_the_cap_are_accepted() -> None:
    resolved = resolve_route(route("/route cloud --turns 10"), CAROL, CONFIG, "/route")
    assert isinstance(resolved, Resolved) and resolved.scope == Scope.next_turns(10)


def test_turns_over_the_cap_are_refused_with_the_cap_to_type() -> None:
    refused = resolve_route(route("/route cloud --turns 11"), CAROL, CONFIG, "!route")
    assert isinstance(refused, Refused)
    assert "`!route cloud --turns 10`" in refused.reason


def test_duration_up_to_the_cap_is_accepted() -> None:
    resolved = resolve_route(route("/route cloud --for 4h"), CAROL, CONFIG, "/route")
    assert isinstance(resolved, Resolved)
    assert resolved.scope == Scope.lasting(timedelta(hours=4))


def test_duration_over_the_cap_is_refused_with_the_cap_to_type() -> None:
    refused = resolve_route(route("/route cloud --for 4h1s"), CAROL, CONFIG, "/route")
    assert isinstance(refused, Refused)
    assert "`/route cloud --for 4h`" in refused.reason


# --- raw model ids -----------------------------------------------------------------------


def test_raw_model_ids_are_refused_unless_allowed() -> None:
    refused = resolve_route(route("/route model:gpt-4o"), ALICE, CONFIG, "/route")
    assert isinstance(refused, Refused)
    assert "`/route targets`" in refused.reason


def test_raw_model_id_must_match_a_pattern_in_full() -> None:
    for model in ("gpt-4o-mini", "xgpt-4o", "other/model"):
        refused = resolve_route(route(f"/route model:{model}"), ALICE, RAW_ALLOWED, "/route")
        assert isinstance(refused, Refused), model


def test_raw_model_id_needs_the_configured_level() -> None:
    refused = resolve_route(route("/route model:gpt-4o"), BOB, RAW_ALLOWED, "/route")
    assert isinstance(refused, Refused)
    assert "50" in refused.reason


@pytest.mark.parametrize("model", ["gpt-4o", "ollama-cloud/glm-5.1", "ollama-cloud/Qwen3:32B"])
def test_allowed_raw_model_id_resolves_to_itself(model: str) -> None:
    resolved = resolve_route(route(f"/route model:{model}"), ALICE, RAW_ALLOWED, "/route")
    assert resolved == Resolved(target=f"model:{model}", model=model, scope=Scope.once())


# --- rate limit, staleness, what the bot listens to -------------------------------------


@pytest.mark.parametrize(("recent", "limited"), [(0, False), (4, False), (5, True), (99, True)])
def test_rate_limit_counts_routes_in_the_last_hour(recent: int, limited: bool) -> None:
    assert rate_limited(recent, CONFIG) is limited


@pytest.mark.parametrize("recent", [0, 1, 10_000])
def test_rate_limit_zero_means_unlimited(recent: int) -> None:
    assert not rate_limited(recent, make_config(limits={"routes_per_hour": 0}))


@pytest.mark.parametrize(
    ("age", "stale"),
    [
        (timedelta(0), False),
        (timedelta(minutes=15), False),
        (timedelta(minutes=15, microseconds=1), True),
        (timedelta(hours=3), True),
        (timedelta(seconds=-30), False),  # a homeserver clock slightly ahead
    ],
)
def test_command_older_than_the_intent_ttl_is_stale(age: timedelta, stale: bool) -> None:
    assert is_stale(NOW - age, NOW, CONFIG) is stale


@pytest.mark.parametrize(
    ("sender", "msgtype", "is_edit", "listens"),
    [
        (ALICE, "m.text", False, True),
        (CAROL, None, False, True),
        (ALICE, "m.emote", False, True),
        ("@route:example.org", "m.text", False, False),  # the bot itself
        (AGENT, "m.text", False, False),
        (ALICE, "m.notice", False, False),
        (ALICE, "m.text", True, False),
    ],
)
def test_bot_ignores_itself_agents_notices_and_edits(
    sender: str, msgtype: str | None, is_edit: bool, listens: bool
) -> None:
    assert listens_to(sender, msgtype, is_edit, CONFIG) is listens


# --- retry_targets (SPEC "Retry": the failure suggestion's commands) --------------------


def names(targets: list[Any]) -> list[str]:
    return [t.name for t in targets]


@pytest.mark.parametrize(
    ("asker", "failed_model", "failed_target", "expected"),
    [
        # Automatic routing failed on the local model: every other usable target.
        (CAROL, "glm-4.7-flash:q4_K_M", None, ["cloud"]),
        (ALICE, "glm-4.7-flash:q4_K_M", None, ["cloud", "big"]),
        (BOB, "glm-4.7-flash:q4_K_M", None, ["cloud"]),
        # A model no target serves: every usable target.
        (ALICE, "some/unknown-model", None, ["cloud", "local", "big"]),
        # A routed turn failed on its target: the others.
        (ALICE, "ollama-cloud/glm-5.1", "cloud", ["local", "big"]),
        # The target failed though the dispatcher served another model: neither.
        (ALICE, "glm-4.7-flash:q4_K_M", "cloud", ["big"]),
        # A raw model target is no config target: only the failed model is left out.
        (ALICE, "ollama-cloud/kimi-k2", "model:ollama-cloud/kimi-k2", ["cloud", "local"]),
    ],
)
def test_retry_targets_are_the_askers_targets_but_the_one_that_failed(
    asker: str, failed_model: str, failed_target: str | None, expected: list[str]
) -> None:
    assert names(retry_targets(asker, failed_model, failed_target, CONFIG)) == expected


def test_retry_targets_leave_out_every_target_of_the_failed_model() -> None:
    config = make_config(
        targets={
            "cloud": {"model": "ollama-cloud/glm-5.1"},
            "glm": {"model": "ollama-cloud/glm-5.1"},
            "local": {"model": "glm-4.7-flash:q4_K_M"},
        }
    )
    assert names(retry_targets(CAROL, "ollama-cloud/glm-5.1", None, config)) == ["local"]


@pytest.mark.parametrize("asker", [None, ""])
def test_unknown_asker_gets_the_targets_of_the_star_level(asker: str | None) -> None:
    assert names(retry_targets(asker, "glm-4.7-flash:q4_K_M", None, CONFIG)) == ["cloud"]
    generous = make_config(permissions={ALICE: 0, "*": 50})
    assert names(retry_targets(asker, "glm-4.7-flash:q4_K_M", None, generous)) == [
        "cloud",
        "big",
    ]


def test_unknown_asker_without_a_star_level_gets_no_target() -> None:
    closed = make_config(permissions={ALICE: 50, "example.org": 10})
    assert retry_targets(None, "glm-4.7-flash:q4_K_M", None, closed) == []
    assert names(retry_targets(ALICE, "glm-4.7-flash:q4_K_M", None, closed)) == ["cloud", "big"]


def test_an_asker_who_may_not_route_gets_no_target() -> None:
    closed = make_config(permissions={ALICE: 50})
    assert retry_targets(CAROL, "glm-4.7-flash:q4_K_M", None, closed) == []


def test_retry_targets_follow_the_askers_own_level_not_the_star_level() -> None:
    config = make_config(permissions={BOB: 0, "*": 50})
    assert names(retry_targets(BOB, "glm-4.7-flash:q4_K_M", None, config)) == ["cloud"]


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([None, ALICE, BOB, CAROL, "@dave:elsewhere.org"]),
    st.sampled_from([t.model for t in CONFIG.targets.values()] + ["other/model"]),
    st.none() | st.sampled_from([*CONFIG.targets, "model:x"]),
)
def test_retry_targets_are_always_usable_by_the_asker_and_never_the_failed_one(
    asker: str | None, failed_model: str, failed_target: str | None
) -> None:
    targets = retry_targets(asker, failed_model, failed_target, CONFIG)
    # "*" looked up as a user id matches the `*` level exactly: anyone's targets.
    usable = usable_targets(asker, CONFIG) if asker else usable_targets("*", CONFIG)
    assert set(names(targets)) <= set(names(usable))
    assert all(t.model != failed_model and t.name != failed_target for t in targets)
    assert names(targets) == [
        t.name for t in usable if t.model != failed_model and t.name != failed_target
    ]
