"""Matrix events pushed by Synapse → typed values; any JSON at all never raises."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from route_sidecar.core.events import (
    MAX_BODY_CHARS,
    EncryptedMessage,
    Invite,
    Membership,
    PowerLevels,
    Redaction,
    RoomMessage,
    parse_event,
)

ROOM = "!abcdefghijklmnop:example.org"
ALICE = "@alice:example.org"
TS = 1_778_324_400_000  # 2026-05-09 11:00:00 UTC
SENT = datetime(2026, 5, 9, 11, 0, tzinfo=UTC)

# Shaped like the events Synapse pushes in PUT /_matrix/app/v1/transactions/{txnId}.
MESSAGE: dict[str, Any] = {
    "type": "m.room.message",
    "room_id": ROOM,
    "sender": ALICE,
    "event_id": "$Ab1_cd2-ef3",
    "origin_server_ts": TS,
    "content": {"msgtype": "m.text", "body": "/route cloud", "m.mentions": {}},
    "unsigned": {"age": 41, "transaction_id": "m1746788400000.0"},
    "user_id": ALICE,
    "age": 41,
}
THREADED: dict[str, Any] = {
    **MESSAGE,
    "event_id": "$in-thread",
    "content": {
        "msgtype": "m.text",
        "body": "!route cloud\nWhy did the deploy fail?",
        "m.relates_to": {
            "rel_type": "m.thread",
            "event_id": "$root",
            "is_falling_back": True,
            "m.in_reply_to": {"event_id": "$root"},
        },
    },
}
REPLY: dict[str, Any] = {
    **MESSAGE,
    "event_id": "$reply",
    "content": {
        "msgtype": "m.text",
        "body": "> <@bob:example.org> it failed\n\n/route cloud",
        "m.relates_to": {"m.in_reply_to": {"event_id": "$bob"}},
    },
}
EDIT: dict[str, Any] = {
    **MESSAGE,
    "event_id": "$edit",
    "content": {
        "msgtype": "m.text",
        "body": "* /route local",
        "m.new_content": {"msgtype": "m.text", "body": "/route local"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": "$Ab1_cd2-ef3"},
    },
}
NOTICE: dict[str, Any] = {
    **MESSAGE,
    "sender": "@hermes:example.org",
    "event_id": "$notice",
    "content": {"msgtype": "m.notice", "body": "Routing the next turn to cloud."},
}
INVITE: dict[str, Any] = {
    "type": "m.room.member",
    "room_id": ROOM,
    "sender": ALICE,
    "state_key": "@route:example.org",
    "event_id": "$invite",
    "origin_server_ts": TS,
    "content": {"membership": "invite", "displayname": "Route", "is_direct": False},
    "unsigned": {"age": 12, "invite_room_state": [{"type": "m.room.name", "content": {}}]},
}
REDACTION_V10: dict[str, Any] = {
    "type": "m.room.redaction",
    "room_id": ROOM,
    "sender": ALICE,
    "event_id": "$redaction",
    "origin_server_ts": TS,
    "redacts": "$Ab1_cd2-ef3",
    "content": {"reason": "typo"},
}
REDACTION_V11: dict[str, Any] = {
    "type": "m.room.redaction",
    "room_id": ROOM,
    "sender": ALICE,
    "event_id": "$redaction11",
    "origin_server_ts": TS,
    "content": {"redacts": "$Ab1_cd2-ef3"},
}
ENCRYPTED: dict[str, Any] = {
    "type": "m.room.encrypted",
    "room_id": ROOM,
    "sender": ALICE,
    "event_id": "$secret",
    "origin_server_ts": TS,
    "content": {
        "algorithm": "m.megolm.v1.aes-sha2",
        "ciphertext": "AwgAEnACgAkLmt6qF84IK++J7UDH2Za1YVchHyprqTqsg",
        "device_id": "RJYKSTBOIE",
        "sender_key": "IlRMeOPX2e0MurIyfWEucYBRVOEEUMrOHqn/8mLqMjA",
        "session_id": "X3lUlvLELLYxeTx4yOVu6UDpasGEVO0Jbu+QFnm0cKQ",
    },
}


def test_message_becomes_a_room_message() -> None:
    assert parse_event(MESSAGE) == RoomMessage(
        room_id=ROOM,
        event_id="$Ab1_cd2-ef3",
        sender=ALICE,
        body="/route cloud",
        msgtype="m.text",
        thread_root=None,
        is_edit=False,
        sent_at=SENT,
    )


def test_threaded_message_knows_its_thread_root() -> None:
    message = parse_event(THREADED)
    assert isinstance(message, RoomMessage)
    assert message.thread_root == "$root"
    assert message.body == "!route cloud\nWhy did the deploy fail?"
    assert not message.is_edit


def test_reply_outside_a_thread_has_no_thread_root() -> None:
    message = parse_event(REPLY)
    assert isinstance(message, RoomMessage)
    assert message.thread_root is None


def test_edit_is_marked_as_an_edit() -> None:
    message = parse_event(EDIT)
    assert isinstance(message, RoomMessage)
    assert message.is_edit
    new_content_only = copy.deepcopy(EDIT)
    del new_content_only["content"]["m.relates_to"]
    assert parse_event(new_content_only).is_edit  # type: ignore[union-attr]


def test_notice_keeps_its_msgtype() -> None:
    message = parse_event(NOTICE)
    assert isinstance(message, RoomMessage)
    assert message.msgtype == "m.notice"


def test_invite_of_the_bot_becomes_an_invite() -> None:
    assert parse_event(INVITE) == Invite(room_id=ROOM, sender=ALICE, invitee="@route:example.org")


@pytest.mark.parametrize("membership", ["join", "leave", "ban"])
def test_joins_leaves_and_bans_say_who_is_in_the_room(membership: str) -> None:
    event = copy.deepcopy(INVITE)
    event["content"]["membership"] = membership
    assert parse_event(event) == Membership(INVITE["room_id"], INVITE["state_key"], membership)


@pytest.mark.parametrize("membership", ["knock", None, 1, "JOIN"])
def test_other_memberships_are_ignored(membership: Any) -> None:
    event = copy.deepcopy(INVITE)
    event["content"]["membership"] = membership
    assert parse_event(event) is None


def test_redaction_with_top_level_redacts() -> None:
    assert parse_event(REDACTION_V10) == Redaction(
        room_id=ROOM, redacted_event_id="$Ab1_cd2-ef3", sender=ALICE
    )


def test_redaction_with_content_redacts_as_in_room_v11() -> None:
    assert parse_event(REDACTION_V11) == Redaction(
        room_id=ROOM, redacted_event_id="$Ab1_cd2-ef3", sender=ALICE
    )


def test_redaction_naming_no_event_is_ignored() -> None:
    event = copy.deepcopy(REDACTION_V11)
    event["content"] = {"redacts": 5}
    assert parse_event(event) is None


def test_encrypted_event_is_recognised_without_its_content() -> None:
    assert parse_event(ENCRYPTED) == EncryptedMessage(
        room_id=ROOM, event_id="$secret", sender=ALICE
    )


@pytest.mark.parametrize(
    "event_type", ["m.room.name", "m.reaction", "m.room.power_levels", "m.sticker", "org.x"]
)
def test_other_event_types_are_ignored(event_type: str) -> None:
    assert parse_event({**MESSAGE, "type": event_type}) is None


@pytest.mark.parametrize("field", ["type", "room_id", "sender", "event_id", "content"])
def test_event_missing_a_required_field_is_ignored(field: str) -> None:
    event = copy.deepcopy(MESSAGE)
    del event[field]
    assert parse_event(event) is None
    assert parse_event({**MESSAGE, field: ""}) is None


@pytest.mark.parametrize(
    "content",
    [
        {"msgtype": "m.text"},
        {"msgtype": "m.text", "body": None},
        {"msgtype": "m.text", "body": ["/route"]},
        "not a mapping",
    ],
)
def test_message_without_a_text_body_is_ignored(content: Any) -> None:
    assert parse_event({**MESSAGE, "content": content}) is None


@pytest.mark.parametrize(
    "ts",
    [
        None,
        "1778324400000",
        True,
        -1,
        float("nan"),
        float("inf"),
        2**53,
        2**63,
        253_402_300_800_000,  # year 10000
        2**52,
    ],
)
def test_message_with_an_unusable_timestamp_is_ignored(ts: Any) -> None:
    assert parse_event({**MESSAGE, "origin_server_ts": ts}) is None


def test_latest_representable_timestamp_is_accepted() -> None:
    message = parse_event({**MESSAGE, "origin_server_ts": 253_402_300_799_000})
    assert isinstance(message, RoomMessage)
    assert message.sent_at.year == 9999


def test_float_timestamp_is_accepted() -> None:
    message = parse_event({**MESSAGE, "origin_server_ts": float(TS)})
    assert isinstance(message, RoomMessage) and message.sent_at == SENT


def test_msgtype_that_is_not_a_string_is_dropped() -> None:
    message = parse_event({**MESSAGE, "content": {"msgtype": 7, "body": "hi"}})
    assert isinstance(message, RoomMessage) and message.msgtype is None


def test_huge_body_is_cut() -> None:
    message = parse_event({**MESSAGE, "content": {"msgtype": "m.text", "body": "x" * 10**6}})
    assert isinstance(message, RoomMessage)
    assert len(message.body) == MAX_BODY_CHARS


def test_odd_relations_are_tolerated() -> None:
    relates: object
    for relates in (
        None,
        "x",
        [],
        {"rel_type": "m.thread"},
        {"rel_type": "m.thread", "event_id": 5},
    ):
        content: dict[str, Any] = {"msgtype": "m.text", "body": "hi", "m.relates_to": relates}
        message = parse_event({**MESSAGE, "content": content})
        assert isinstance(message, RoomMessage)
        assert message.thread_root is None and not message.is_edit


# --- any JSON ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)


# Log-uniform over every magnitude: hypothesis alone favours small integers.
timestamps = st.integers(min_value=0, max_value=64).flatmap(
    lambda bits: st.integers(min_value=-(2**bits), max_value=2**bits)
)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return strategy | json_values


event_like = st.fixed_dictionaries(
    {},
    optional={
        "type": maybe(
            st.sampled_from(
                ["m.room.message", "m.room.member", "m.room.redaction", "m.room.encrypted"]
            )
        ),
        "room_id": maybe(st.just(ROOM)),
        "sender": maybe(st.just(ALICE)),
        "event_id": maybe(st.just("$e")),
        "state_key": maybe(st.just("@route:example.org")),
        "redacts": maybe(st.just("$r")),
        "origin_server_ts": maybe(timestamps | st.floats()),
        "content": maybe(
            st.fixed_dictionaries(
                {},
                optional={
                    "body": maybe(st.text()),
                    "msgtype": maybe(st.sampled_from(["m.text", "m.notice"])),
                    "membership": maybe(st.just("invite")),
                    "redacts": maybe(st.just("$r")),
                    "m.new_content": json_values,
                    "m.relates_to": maybe(
                        st.fixed_dictionaries(
                            {},
                            optional={
                                "rel_type": maybe(st.sampled_from(["m.thread", "m.replace"])),
                                "event_id": maybe(st.just("$root")),
                            },
                        )
                    ),
                },
            )
        ),
    },
)


@settings(max_examples=150, deadline=None)
@given(json_values | event_like)
def test_parse_event_never_raises_on_any_json(raw: Any) -> None:
    result = parse_event(raw)
    assert result is None or isinstance(result, RoomMessage | Invite | Redaction | EncryptedMessage)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([MESSAGE, THREADED, EDIT, NOTICE]), timestamps | st.floats())
def test_any_timestamp_gives_a_message_or_nothing(event: dict[str, Any], ts: Any) -> None:
    result = parse_event({**event, "origin_server_ts": ts})
    assert result is None or (isinstance(result, RoomMessage) and result.sent_at.tzinfo is UTC)


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([MESSAGE, THREADED, EDIT, INVITE, REDACTION_V10, REDACTION_V11, ENCRYPTED]),
    st.dictionaries(
        st.sampled_from(["origin_server_ts", "content", "redacts", "state_key", "event_id"]),
        timestamps | st.floats() | json_values,
        max_size=2,
    ),
)
def test_parse_event_never_raises_on_real_events_with_odd_fields(
    event: dict[str, Any], odd: dict[str, Any]
) -> None:
    result = parse_event({**event, **odd})
    assert result is None or isinstance(result, RoomMessage | Invite | Redaction | EncryptedMessage)


def test_ids_and_bodies_that_no_utf8_store_can_hold_are_made_safe() -> None:
    raw = {
        "type": "m.room.message",
        "room_id": "!r:x",
        "sender": "@a:x",
        "event_id": "$e",
        "origin_server_ts": 1,
        "content": {
            "msgtype": "m.text",
            "body": "!route cloud \ud800",
            "m.relates_to": {"rel_type": "m.thread", "event_id": "$root\ud800"},
        },
    }
    event = parse_event(raw)
    assert isinstance(event, RoomMessage)
    assert event.thread_root is None  # an unusable id counts as absent
    event.body.encode("utf-8")  # no lone surrogate left
    assert parse_event({**raw, "event_id": "$\udfff"}) is None


def test_an_msc4391_invocation_is_kept_with_the_users_it_mentions() -> None:
    content = {
        "msgtype": "m.text",
        "body": "/route@route:example.org cloud",
        "m.mentions": {"user_ids": ["@route:example.org", 7]},
        "org.matrix.msc4391.command": {"command": "route", "arguments": {"target": "cloud"}},
    }
    message = parse_event({**MESSAGE, "content": content})
    assert isinstance(message, RoomMessage) and message.invocation is not None
    assert message.invocation.command == "route"
    assert message.invocation.arguments == {"target": "cloud"}
    assert message.invocation.mentions == ("@route:example.org",)
    hash(message)  # arguments are any JSON; the message stays a value


@pytest.mark.parametrize(
    "block", [None, "route", [], {}, {"command": 5}, {"command": ""}, {"arguments": {}}]
)
def test_a_malformed_invocation_block_is_no_invocation(block: Any) -> None:
    content = {**MESSAGE["content"], "org.matrix.msc4391.command": block}
    message = parse_event({**MESSAGE, "content": content})
    assert isinstance(message, RoomMessage) and message.invocation is None


def test_a_power_levels_change_is_kept_as_such() -> None:
    """MSC4391: the bot re-checks whether it may describe its command there."""
    raw = {**MESSAGE, "type": "m.room.power_levels", "state_key": "", "content": {}}
    assert parse_event(raw) == PowerLevels(ROOM)
    assert parse_event({**raw, "state_key": "x"}) is None
