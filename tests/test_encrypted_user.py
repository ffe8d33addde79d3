"""The encrypting test user (demo/encrypted_user.py) on a real Synapse: what one person sends
in an encrypted room reaches the server as ciphertext and the others read it decrypted,
as two people in Element would."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio

from demo.encrypted_user import EncryptedUser
from demo.matrix_user import MatrixUser, in_thread

from .e2e.harness import free_port, local_synapse, synapse_python

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.asyncio(loop_scope="session"),
    # mautrix's own decryption reads the deprecated Megolm sender_key/device_id fields
    pytest.mark.filterwarnings("ignore:The sender_key field:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def hs_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    python = synapse_python()
    if python is None:
        if os.environ.get("ROUTE_SIDECAR_REQUIRE_SYNAPSE"):
            pytest.fail("Synapse is required (ROUTE_SIDECAR_REQUIRE_SYNAPSE) but not installed")
        pytest.skip("Synapse venv not found (.venv-synapse): run `make test`, which installs it")
    work = tmp_path_factory.mktemp("encrypted-user")
    hs = local_synapse.start(work / "synapse", synapse_python=python, port=free_port())
    try:
        yield hs.base_url
    finally:
        local_synapse.stop(hs.data_dir)


async def _user(hs_url: str, name: str, key_wait: float = 10.0) -> EncryptedUser:
    session = local_synapse.register_user(hs_url, name, f"pw-{name}-secret")
    return await EncryptedUser.from_session(hs_url, session, key_wait=key_wait)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def people(hs_url: str) -> AsyncIterator[dict[str, EncryptedUser]]:
    made = {name: await _user(hs_url, name) for name in ("alice", "bob")}
    yield made
    for user in made.values():
        await user.close()


def event_id_is(event_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("event_id") == event_id and "decryption_pending" not in e


async def ciphertext_on_server(
    hs_url: str, user: EncryptedUser, room_id: str, event_id: str
) -> dict[str, Any]:
    """The event as the server stores it, read over the plain client-server API."""
    plain = MatrixUser(hs_url, user.user_id, user.token)
    try:
        return next(e for e in await plain.events(room_id) if e["event_id"] == event_id)
    finally:
        await plain.close()


async def test_an_encrypted_room_carries_ciphertext_that_members_decrypt_both_ways(
    people: dict[str, EncryptedUser], hs_url: str
) -> None:
    alice, bob = people["alice"], people["bob"]
    room = await alice.create_room(invite=[bob.user_id], encrypted=True)
    await bob.join(room)

    question = await alice.say(room, "Is the deploy green?")
    seen = await bob.wait_for(room, event_id_is(question), what="alice's message")
    assert seen["type"] == "m.room.message" and seen["encrypted"] is True
    assert seen["content"]["body"] == "Is the deploy green?"
    assert seen["sender"] == alice.user_id and "decryption_error" not in seen
    stored = await ciphertext_on_server(hs_url, alice, room, question)
    assert stored["type"] == "m.room.encrypted" and "body" not in stored["content"]

    answer = await bob.say(room, "Yes, since 10:02.", thread_root=question)
    read = await alice.wait_for(room, in_thread(question, bob.user_id), what="bob's answer")
    assert read["event_id"] == answer and read["encrypted"] is True
    assert read["content"]["body"] == "Yes, since 10:02."
    assert read["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == question
    own = await alice.wait_for(room, event_id_is(question), what="alice's own message")
    assert own["content"]["body"] == "Is the deploy green?"  # the sender reads itself too


async def test_a_plain_room_switched_to_encryption_keeps_both_directions_working(
    people: dict[str, EncryptedUser], hs_url: str
) -> None:
    alice, bob = people["alice"], people["bob"]
    room = await alice.create_room(invite=[bob.user_id], encrypted=False)
    await bob.join(room)
    before = await alice.say(room, "still in the clear")
    seen = await bob.wait_for(room, event_id_is(before), what="the plain message")
    assert seen["encrypted"] is False and seen["content"]["body"] == "still in the clear"

    await alice.enable_encryption(room)
    from_bob = await bob.say(room, "now secret")
    seen = await alice.wait_for(room, event_id_is(from_bob), what="bob's encrypted message")
    assert seen["encrypted"] is True and seen["content"]["body"] == "now secret"
    from_alice = await alice.say(room, "secret too")
    seen = await bob.wait_for(room, event_id_is(from_alice), what="alice's encrypted message")
    assert seen["encrypted"] is True and seen["content"]["body"] == "secret too"
    stored = await ciphertext_on_server(hs_url, bob, room, from_bob)
    assert stored["type"] == "m.room.encrypted"


async def test_a_member_who_joins_later_reads_what_follows_but_not_what_came_before(
    people: dict[str, EncryptedUser], hs_url: str
) -> None:
    alice, bob = people["alice"], people["bob"]
    room = await alice.create_room(invite=[bob.user_id], encrypted=True)
    await bob.join(room)
    early = await alice.say(room, "before carol")
    await bob.wait_for(room, event_id_is(early), what="the early message")

    carol = await _user(hs_url, "carol", key_wait=1.0)
    try:
        await alice.invite(room, carol.user_id)
        await carol.join(room)
        later = await alice.say(room, "carol can read this")  # same Megolm session as `early`
        seen = await carol.wait_for(room, event_id_is(later), what="the later message")
        assert seen["encrypted"] is True and seen["content"]["body"] == "carol can read this"
        stored = [await ciphertext_on_server(hs_url, alice, room, e) for e in (early, later)]
        assert stored[0]["content"]["session_id"] == stored[1]["content"]["session_id"]
        missed = await carol.wait_for(
            room, lambda e: e.get("event_id") == early and "decryption_error" in e, timeout=10
        )
        assert missed["type"] == "m.room.encrypted" and missed["encrypted"] is True
    finally:
        await carol.close()
