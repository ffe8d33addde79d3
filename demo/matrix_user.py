"""A Matrix user over the client-server API, the way Element acts for a person: sends,
replies in threads, redacts, reads the room. Used by the demo and the end-to-end tests."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

BOT = "@route:localhost"  # the side-car's bot in the demo and the tests


@dataclass
class MatrixUser:
    """A person in Element: sends messages, replies in threads, redacts, reads the room."""

    base_url: str
    user_id: str
    token: str
    client: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
        )

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """The answer's JSON (an object, or a list for /state)."""
        response = await self.client.request(method, "/_matrix/client/v3" + path, json=body)
        if response.status_code >= 400:
            raise AssertionError(f"{method} {path}: {response.status_code} {response.text}")
        return response.json()

    async def create_room(
        self, invite: list[str], name: str | None = "route test", is_direct: bool = False
    ) -> str:
        """A private room; `is_direct` (and no name) as Element starts a DM."""
        body: dict[str, Any] = {"preset": "private_chat", "invite": invite}
        if name is not None:
            body["name"] = name
        if is_direct:
            body["is_direct"] = True
        return str((await self.request("POST", "/createRoom", body))["room_id"])

    async def join(self, room_id: str) -> None:
        await self.request("POST", f"/join/{quote(room_id)}", {})

    async def send(
        self, room_id: str, content: dict[str, Any], event_type: str = "m.room.message"
    ) -> str:
        txn = uuid.uuid4().hex
        path = f"/rooms/{quote(room_id)}/send/{event_type}/{txn}"
        return str((await self.request("PUT", path, content))["event_id"])

    async def say(
        self, room_id: str, body: str, thread_root: str | None = None, msgtype: str = "m.text"
    ) -> str:
        return await self.send(room_id, text_content(body, thread_root, msgtype))

    async def redact(self, room_id: str, event_id: str) -> None:
        path = f"/rooms/{quote(room_id)}/redact/{quote(event_id)}/{uuid.uuid4().hex}"
        await self.request("PUT", path, {})

    async def events(self, room_id: str, limit: int = 100) -> list[dict[str, Any]]:
        path = f"/rooms/{quote(room_id)}/messages?dir=b&limit={limit}"
        chunk: list[dict[str, Any]] = (await self.request("GET", path))["chunk"]
        return chunk

    async def members(self, room_id: str) -> dict[str, str]:
        state = await self.request("GET", f"/rooms/{quote(room_id)}/state")
        return {
            e["state_key"]: e["content"].get("membership")
            for e in state
            if e["type"] == "m.room.member"
        }

    async def wait_for(
        self,
        room_id: str,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 15.0,
        what: str = "event",
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in await self.events(room_id):
                if predicate(event):
                    return event
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what} in {room_id}")

    async def wait_shown(
        self,
        room_id: str,
        event_id: str,
        predicate: Callable[[str], bool],
        timeout: float = 15.0,
        what: str = "the bot's notice to read so",
    ) -> str:
        """The text a bot notice shows once it satisfies `predicate` (as edited)."""
        deadline = time.monotonic() + timeout
        shown = None
        while time.monotonic() < deadline:
            shown = shown_text(await self.events(room_id), event_id)
            if shown is not None and predicate(shown):
                return shown
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what} in {room_id}; it reads {shown!r}")

    async def bot_replies(self, room_id: str, event_id: str) -> list[dict[str, Any]]:
        return [e for e in await self.events(room_id) if is_bot_reply_to(e, event_id)]

    async def wait_reply(
        self, room_id: str, event_id: str, timeout: float = 15.0
    ) -> dict[str, Any]:
        """The bot's reply to a command: its first reply (a turn the command started, as
        `again` does, gets a receipt in reply to the command too, later)."""
        await self.wait_for(
            room_id, lambda e: is_bot_reply_to(e, event_id), timeout, "the bot's reply"
        )
        replies = [e for e in await self.events(room_id) if is_bot_reply_to(e, event_id)]
        return min(replies, key=lambda e: e.get("origin_server_ts", 0))

    async def close(self) -> None:
        await self.client.aclose()


def is_bot_reply_to(event: dict[str, Any], event_id: str, bot: str = BOT) -> bool:
    if event.get("sender") != bot or event.get("type") != "m.room.message":
        return False
    relates = event.get("content", {}).get("m.relates_to", {})
    if relates.get("rel_type") == "m.replace":
        return False
    return bool(relates.get("m.in_reply_to", {}).get("event_id") == event_id)


def edits_of(events: list[dict[str, Any]], event_id: str, bot: str = BOT) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e.get("sender") == bot
        and e.get("content", {}).get("m.relates_to", {}).get("rel_type") == "m.replace"
        and e["content"]["m.relates_to"].get("event_id") == event_id
    ]


def shown_text(events: list[dict[str, Any]], event_id: str, bot: str = BOT) -> str | None:
    """What a notice of the bot reads now: its latest edit's text, else its own; None
    when it is not among `events`."""
    edits = edits_of(events, event_id, bot)
    if edits:
        latest = max(edits, key=lambda e: e.get("origin_server_ts", 0))
        return str(latest["content"]["m.new_content"]["body"])
    original = next((e for e in events if e.get("event_id") == event_id), None)
    return str(original["content"]["body"]) if original is not None else None


def reactions_on(events: list[dict[str, Any]], event_id: str, bot: str = BOT) -> list[str]:
    return [
        e["content"]["m.relates_to"]["key"]
        for e in events
        if e.get("type") == "m.reaction"
        and e.get("sender") == bot
        and e["content"].get("m.relates_to", {}).get("event_id") == event_id
    ]


def in_thread(thread: str, sender: str) -> Callable[[dict[str, Any]], bool]:
    """A matcher for a message `sender` posted in `thread` (Hermes answers in the thread;
    the bot's receipts and suggestions are posted there too)."""

    def match(event: dict[str, Any]) -> bool:
        relates = event.get("content", {}).get("m.relates_to", {})
        return (
            event.get("sender") == sender
            and relates.get("rel_type") == "m.thread"
            and relates.get("event_id") == thread
        )

    return match


def text_content(
    body: str, thread_root: str | None = None, msgtype: str = "m.text"
) -> dict[str, Any]:
    """A text message as Element sends it, inside `thread_root`'s thread when given."""
    content: dict[str, Any] = {"msgtype": msgtype, "body": body}
    if thread_root is not None:
        content["m.relates_to"] = {
            "rel_type": "m.thread",
            "event_id": thread_root,
            "is_falling_back": True,
            "m.in_reply_to": {"event_id": thread_root},
        }
    return content


def joined(user_id: str) -> Callable[[dict[str, Any]], bool]:
    """A matcher for `user_id` joining the room."""

    def match(event: dict[str, Any]) -> bool:
        return (
            event.get("type") == "m.room.member"
            and event.get("state_key") == user_id
            and event.get("content", {}).get("membership") == "join"
        )

    return match
