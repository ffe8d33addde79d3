"""route_sidecar/outbox.py's keys: each builder's key names its kind, keys keep the form earlier
versions stored (rows outlive an upgrade: a queued reply written by the last version
must still be recognised, sent in clear or edited by this one), and a key no version
writes is delivered as it is, never a crash."""

from __future__ import annotations

import json

import pytest

from route_sidecar import outbox
from route_sidecar.outbox import EffectKind, Outbox, PendingEffect

CONTENT = {"msgtype": "m.notice", "body": "hi"}
C = CONTENT


def pending(key: str, content: dict[str, str] | None = None) -> PendingEffect:
    return PendingEffect(
        1, key, "!r:test", "m.room.message", json.dumps(content or CONTENT), None, 0
    )


@pytest.mark.parametrize(
    ("effect", "key", "kind"),
    [
        (outbox.reply("$c", "!r", CONTENT), "reply:$c", "reply"),
        (outbox.leave("$c", "!r"), "route_sidecar.leave:$c", "route_sidecar.leave"),
        (outbox.reaction("i1", "!r", CONTENT), "react:i1", "react"),
        (outbox.receipt("i1", 0, "!r", CONTENT), "receipt:i1:0", "receipt"),
        (outbox.receipt("i1", None, "!r", CONTENT), "receipt:i1:None", "receipt"),
        (outbox.receipt_edit("receipt:i1:0", 2, "!r", C), "receipt:i1:0:edit:2", "receipt"),
        (outbox.account("i1", 2, "$c", "!r", CONTENT), "account:i1:2", "account"),
        (outbox.unpicked("i1", "$c", "!r", CONTENT), "unpicked:i1", "unpicked"),
        (outbox.suggestion("!r", "t:$q", CONTENT), "suggest:!r:t:$q", "suggest"),
        (outbox.undecryptable("!r", "@a:x", 7, C), "undecryptable:!r:@a:x:7", "undecryptable"),
        (outbox.unreadable("!r", CONTENT), "unreadable:!r", "unreadable"),
    ],
)  # fmt: skip
def test_each_key_has_the_form_earlier_versions_stored(
    effect: outbox.Effect, key: str, kind: str
) -> None:
    assert effect.key == key
    assert effect.kind == kind
    assert pending(key).kind == kind


def test_a_confirmations_edit_queued_by_an_earlier_version_is_still_known() -> None:
    assert pending("ended:i1").kind == outbox.EffectKind.ENDED  # before the account edits
    assert outbox.account_number("account:i1:2:late-edit") == 2


def test_edits_name_the_event_they_edit() -> None:
    assert outbox.account("i1", 2, "$c", "!r", CONTENT).edits == "reply:$c"
    assert outbox.unpicked("i1", "$c", "!r", CONTENT).edits == "reply:$c"
    assert outbox.receipt_edit("receipt:i1:0", 2, "!r", CONTENT).edits == "receipt:i1:0"
    late = outbox.late_edit(pending("receipt:i1:0"), CONTENT)
    assert (late.key, late.edits) == ("receipt:i1:0:late-edit", "receipt:i1:0")


def test_only_notices_about_unread_messages_go_out_in_clear() -> None:
    in_clear = {kind for kind in EffectKind if pending(f"{kind}:x").sent_in_clear}
    assert in_clear == {EffectKind.UNDECRYPTABLE, EffectKind.UNREADABLE}


@pytest.mark.parametrize("key", ["", "zzz:1", "Reply:$c", ":reply", "replies:$c"])
def test_a_key_no_version_writes_has_no_kind_and_is_not_sent_in_clear(key: str) -> None:
    assert outbox.kind_of(key) is None
    assert not pending(key).sent_in_clear


def test_a_content_kept_in_memory_is_sent_until_settled() -> None:
    queued = Outbox()
    quoted = {"msgtype": "m.notice", "body": "> the question"}
    queued.send_from_memory("reply:$c", quoted)
    assert queued.content_of(pending("reply:$c")) == quoted
    assert queued.content_of(pending("reply:$other")) == CONTENT
    queued.settled("reply:$c")
    assert queued.content_of(pending("reply:$c")) == CONTENT


def test_replies_are_sent_first_then_the_rest_oldest_first() -> None:
    rows = [
        PendingEffect(n, key, "!r", "m.room.message", "{}", None, 0)
        for n, key in enumerate(
            ["ended:i1", "reply:$b", "receipt:i0:0", "reply:$a", "route_sidecar.leave:$a"], 1
        )
    ]
    order = [effect.key for effect in outbox.in_sending_order(rows)]
    assert order == ["reply:$b", "reply:$a", "ended:i1", "receipt:i0:0", "route_sidecar.leave:$a"]
