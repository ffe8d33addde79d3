"""Encrypted rooms on a real Synapse (appservice encryption: MSC2409, MSC3202, MSC4190)
with a real encrypting client as the user (demo/encrypted_user.py: mautrix's OlmMachine).
`/route` works there exactly as in a plain room: the bot decrypts the command, its reply
decrypts for the user, the claim gets the override; the bot keeps its device and keys
across a restart; a room switched to encryption midway keeps working; a message whose
room key never reached the bot is decrypted all the same, the key asked for by an
`m.room_key_request` that the user's client answers as Element does (also after a crash
during the wait); a message it cannot decrypt gets one plain notice."""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
import pytest_asyncio
from mautrix.types import JSON, DeviceID, EventType, RoomID, TrustState, UserID

from demo.encrypted_user import EncryptedUser

from .harness import BOT, LookupClient, MatrixUser, Sidecar, failing_on, is_bot_reply_to, joined

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]
CLOUD = "ollama-cloud/glm-5.1"


@pytest_asyncio.fixture(loop_scope="session")
async def alice(hs_url: str, users: dict[str, MatrixUser]) -> AsyncIterator[EncryptedUser]:
    """Alice on a new, encrypting device (the `users` fixture registered her)."""
    person = await EncryptedUser.login(hs_url, "alice", "pw-alice-secret", key_wait=10.0)
    yield person
    await person.close()


async def room_with_bot(alice: EncryptedUser, encrypted: bool) -> str:
    room_id = await alice.create_room(invite=[BOT], encrypted=encrypted, name="encrypted test")
    await alice.wait_for(
        room_id,
        joined(BOT),
        timeout=20,
        what="the bot to join",
    )
    return room_id


async def command(alice: EncryptedUser, room_id: str, text: str) -> dict[str, Any]:
    """Send a command; the bot's reply as alice's client decrypted it."""
    event_id = await alice.say(room_id, text)
    return await alice.wait_reply(room_id, event_id, timeout=20)


async def bot_devices(alice: EncryptedUser) -> list[str]:
    keys = await alice.client.query_keys([UserID(BOT)])
    return sorted(keys.device_keys.get(UserID(BOT), {}))


async def test_route_in_a_room_created_encrypted_decrypts_both_ways_and_routes(
    alice: EncryptedUser, lookup: LookupClient
) -> None:
    room = await room_with_bot(alice, encrypted=True)
    reply = await command(alice, room, "!route cloud")
    assert reply["encrypted"] is True, reply  # sent encrypted, and alice's client read it
    assert reply["type"] == "m.room.message"
    assert reply["content"]["msgtype"] == "m.notice"
    assert "Routing the next turn" in reply["content"]["body"]
    intent = await lookup.room_intent(room)
    assert intent is not None and intent["target"] == "cloud"
    # The turn key from a decrypted body: the room is resolved from the message's hash.
    question = "Which node runs the encrypted build?"
    await alice.say(room, question)
    await asyncio.sleep(1)
    answer = await lookup.claim(last_user_message=f"[alice] {question}")
    assert (answer["override"], answer["room_id"], answer["model"]) == (True, room, CLOUD)


async def test_the_bot_keeps_its_device_and_keys_across_a_restart(
    alice: EncryptedUser, sidecar: Sidecar
) -> None:
    room = await room_with_bot(alice, encrypted=True)
    first = await command(alice, room, "!route status")
    assert first["encrypted"] is True
    devices = await bot_devices(alice)
    assert len(devices) == 1
    sidecar.restart()
    second = await command(alice, room, "!route cloud")
    assert second["encrypted"] is True and "Routing" in second["content"]["body"]
    assert await bot_devices(alice) == devices  # no new device per start
    sidecar.restart()  # and once more: a command after the restart decrypts both ways
    third = await command(alice, room, "!route auto")
    assert third["encrypted"] is True and "Automatic routing" in third["content"]["body"]
    assert await bot_devices(alice) == devices
    assert not [e for e in await alice.events(room) if e.get("decryption_error")]
    # Its device is cross-signed by its owner: Element shows no "not verified by its
    # owner" warning on the bot's messages.
    device = await alice.crypto.get_or_fetch_device(UserID(BOT), DeviceID(devices[0]))
    assert device is not None
    assert await alice.crypto.resolve_trust(device) >= TrustState.CROSS_SIGNED_UNTRUSTED


async def test_a_room_switched_to_encryption_midway_keeps_working(
    alice: EncryptedUser, lookup: LookupClient
) -> None:
    room = await room_with_bot(alice, encrypted=False)
    plain = await command(alice, room, "!route status")
    assert plain["encrypted"] is False
    await alice.enable_encryption(room)
    await asyncio.sleep(1)
    reply = await command(alice, room, "!route cloud --turns 2")
    assert reply["encrypted"] is True and "next 2 turns" in reply["content"]["body"]
    assert (await lookup.room_intent(room) or {}).get("target") == "cloud"


def broken_content(alice: EncryptedUser, name: str) -> dict[str, Any]:
    """Ciphertext under a session the bot never received a key for."""
    return {
        "algorithm": "m.megolm.v1.aes-sha2",
        "sender_key": "x" * 43,
        "device_id": alice.device_id,
        "session_id": f"no-such-session-{name}-" + "s" * 20,
        "ciphertext": "AwgAEnB" + "A" * 100,
    }


async def test_a_message_the_bot_cannot_decrypt_gets_one_notice(alice: EncryptedUser) -> None:
    room = await room_with_bot(alice, encrypted=True)
    await command(alice, room, "!route status")  # the bot reads this room
    broken = broken_content(alice, "notice")
    sent = []
    for _ in range(2):
        event_id = await alice.client.send_message_event(
            RoomID(room), EventType.ROOM_ENCRYPTED, cast(JSON, broken)
        )
        sent.append(str(event_id))
    notice = await alice.wait_for(
        room,
        lambda e: is_bot_reply_to(e, sent[0]) and "could not decrypt" in e["content"]["body"],
        timeout=20,
        what="the notice about the message the bot cannot read",
    )
    assert notice["encrypted"] is False  # readable even when keys do not get through
    assert re.search(r"/discardsession.*send the command again", notice["content"]["body"])
    await asyncio.sleep(4)  # past the key wait of the second one
    notices = [
        e
        for e in await alice.events(room)
        if e.get("sender") == BOT and "could not decrypt" in e["content"].get("body", "")
    ]
    assert len(notices) == 1  # one per room and ten minutes, not one per message


async def test_each_sender_whose_message_went_unread_is_told(
    alice: EncryptedUser, hs_url: str, users: dict[str, MatrixUser]
) -> None:
    """One sender's notice never stands for another's (it did: one per room)."""
    bob = await EncryptedUser.login(hs_url, "bob", "pw-bob-secret", key_wait=10.0)
    try:
        room = await room_with_bot(alice, encrypted=True)
        await alice.invite(room, bob.user_id)
        await bob.join(room)
        await command(alice, room, "!route status")
        sent = {}
        for person in (alice, bob):
            broken = broken_content(person, f"each-{person.user_id}")
            sent[person.user_id] = str(
                await person.client.send_message_event(
                    RoomID(room), EventType.ROOM_ENCRYPTED, cast(JSON, broken)
                )
            )

        def notice_to(user_id: str) -> Callable[[dict[str, Any]], bool]:
            return lambda e: is_bot_reply_to(e, sent[user_id]) and user_id in e["content"]["body"]

        for person in (alice, bob):
            notice = await alice.wait_for(
                room,
                notice_to(person.user_id),
                timeout=30,
                what=f"the notice to {person.user_id}",
            )
            assert "could not decrypt" in notice["content"]["body"]
    finally:
        await bob.close()


def waiting_for_key(sidecar: Sidecar) -> list[str]:
    db = sqlite3.connect(f"file:{sidecar.db_path}?mode=ro", uri=True)
    try:
        return [row[0] for row in db.execute("SELECT event_id FROM undecrypted")]
    finally:
        db.close()


async def test_a_message_waiting_for_its_key_is_not_lost_in_a_crash(
    alice: EncryptedUser, sidecar: Sidecar
) -> None:
    room = await room_with_bot(alice, encrypted=True)
    await command(alice, room, "!route status")
    event_id = str(
        await alice.client.send_message_event(
            RoomID(room), EventType.ROOM_ENCRYPTED, cast(JSON, broken_content(alice, "crash"))
        )
    )
    for _ in range(50):  # the transaction is acknowledged once the event is stored
        if event_id in waiting_for_key(sidecar):
            break
        await asyncio.sleep(0.1)
    assert event_id in waiting_for_key(sidecar)
    sidecar.restart(signal.SIGKILL)  # during the key wait
    notice = await alice.wait_for(
        room,
        lambda e: is_bot_reply_to(e, event_id) and "could not decrypt" in e["content"]["body"],
        timeout=20,
        what="the notice, after the restart",
    )
    assert notice["encrypted"] is False
    assert waiting_for_key(sidecar) == []


@contextmanager
def room_keys_lost_on_the_way(user: EncryptedUser, recipient: str) -> Iterator[list[str]]:
    """The Olm messages (room keys) `user`'s client sends to `recipient` meanwhile never
    arrive, as Synapse loses those it pushes to an appservice that is down or dying; the
    client believes them delivered. Yields the recipients whose message was lost."""
    client = user.client
    send = client.send_to_device
    lost: list[str] = []

    async def lossy(event_type: EventType, messages: dict[Any, Any]) -> None:
        if event_type == EventType.TO_DEVICE_ENCRYPTED and recipient in messages:
            lost.append(recipient)
            messages = {u: devices for u, devices in messages.items() if u != recipient}
            if not messages:
                return
        await send(event_type, messages)

    client.send_to_device = lossy  # type: ignore[method-assign]
    try:
        yield lost
    finally:
        del client.send_to_device  # the class's method again


def cannot_decrypt_notices(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e.get("sender") == BOT and "could not decrypt" in e.get("content", {}).get("body", "")
    ]


def answered_for_bot(alice: EncryptedUser) -> list[str]:
    """The sessions alice's client forwarded to the bot's device on its request."""
    return [session for user, _, session in alice.crypto.forwarded if user == BOT]


async def test_a_room_key_lost_on_the_way_is_requested_and_the_command_handled(
    alice: EncryptedUser, sidecar: Sidecar
) -> None:
    room = await room_with_bot(alice, encrypted=True)
    answered = len(answered_for_bot(alice))
    with room_keys_lost_on_the_way(alice, BOT) as lost:
        event_id = await alice.say(room, "!route cloud")  # a new session: shared, but lost
    assert lost == [BOT]
    reply = await alice.wait_reply(room, event_id, timeout=20)
    assert reply["encrypted"] is True and "Routing the next turn" in reply["content"]["body"]
    assert len(answered_for_bot(alice)) == answered + 1  # the bot asked, alice's client answered
    log = sidecar.log_path.read_text(errors="replace")
    assert f"room key requested room={room} event={event_id}" in log
    assert f"forwarded room key accepted room={room}" in log
    # The same session goes on working, and nothing was posted about an unreadable message.
    again = await command(alice, room, "!route status")
    assert again["encrypted"] is True
    assert cannot_decrypt_notices(await alice.events(room)) == []


async def test_a_message_waiting_for_its_key_in_a_crash_gets_it_by_request_after_the_restart(
    alice: EncryptedUser, sidecar: Sidecar
) -> None:
    room = await room_with_bot(alice, encrypted=True)
    alice.crypto.room_key_forwarding_enabled = False  # the first process asks in vain, if at all
    try:
        with room_keys_lost_on_the_way(alice, BOT):
            event_id = await alice.say(room, "!route cloud")
        for _ in range(50):  # stored while it waits for its key (2 s)
            if event_id in waiting_for_key(sidecar):
                break
            await asyncio.sleep(0.05)
        assert event_id in waiting_for_key(sidecar)
        sidecar.stop(signal.SIGKILL)  # during the key wait
    finally:
        alice.crypto.room_key_forwarding_enabled = True
    answered = len(answered_for_bot(alice))
    sidecar.start()  # resumes the wait, and asks again
    reply = await alice.wait_reply(room, event_id, timeout=20)
    assert reply["encrypted"] is True and "Routing the next turn" in reply["content"]["body"]
    assert len(answered_for_bot(alice)) == answered + 1
    assert waiting_for_key(sidecar) == []
    assert cannot_decrypt_notices(await alice.events(room)) == []


async def test_an_encrypted_command_that_always_fails_gets_a_reference_encrypted(
    alice: EncryptedUser, lookup: LookupClient, sidecar: Sidecar
) -> None:
    """A poison event in an encrypted room: given up after MAX_EVENT_ATTEMPTS like a plain
    one, and its sender told so with the reference (decrypted again for the reply)."""
    marker = f"POISON-{uuid.uuid4().hex[:8]}"
    room = await room_with_bot(alice, encrypted=True)
    # The bot holds the room key before the poison command: it is then decrypted in its
    # transaction, where failures are counted (not after a wait for a late key).
    await command(alice, room, "!route status")
    with failing_on(sidecar, marker):
        poison = await alice.say(room, f"!route cloud {marker}")
        reply = await alice.wait_reply(room, poison, timeout=90)
        assert reply["encrypted"] is True, reply
        body = reply["content"]["body"]
        assert "Failed to handle command" in body and "(reference: " in body, body
        reference = body.split("(reference: ", 1)[1].split(")", 1)[0]
        assert await lookup.room_intent(room) is None  # never applied
        log = sidecar.log_path.read_text(errors="replace")
        assert f"event given up room={room} event={poison}" in log
        assert f"reference={reference}" in log
    later = await command(alice, room, "!route local")  # the room goes on
    assert "Routing the next turn" in later["content"]["body"]


async def test_a_command_that_fails_after_waiting_for_its_key_is_given_up_at_once(
    alice: EncryptedUser, sidecar: Sidecar
) -> None:
    """Decrypted off its transaction (its room key came later, by request), a command
    whose handling fails has nothing to retry it but a restart: it is given up at once,
    its sender gets the reference, and it does not wait to fail again at every start."""
    marker = f"POISON-{uuid.uuid4().hex[:8]}"
    room = await room_with_bot(alice, encrypted=True)
    with failing_on(sidecar, marker):
        with room_keys_lost_on_the_way(alice, BOT) as lost:
            poison = await alice.say(room, f"!route cloud {marker}")  # a new session, lost
        assert lost == [BOT]
        reply = await alice.wait_reply(room, poison, timeout=30)
        assert reply["encrypted"] is True, reply
        body = reply["content"]["body"]
        assert "Failed to handle command" in body and "(reference: " in body, body
        log = sidecar.log_path.read_text(errors="replace")
        assert f"room key requested room={room} event={poison}" in log
        assert f"event given up room={room} event={poison} attempts=1" in log
        assert poison not in waiting_for_key(sidecar)
    later = await command(alice, room, "!route local")  # and nothing of it after a restart
    assert "Routing the next turn" in later["content"]["body"]
    assert len(await alice.bot_replies(room, poison)) == 1
