"""A stand-in for Hermes Agent's Matrix gateway, for the demo and the end-to-end tests.

It answers every text message in its rooms through an OpenAI-compatible dispatcher, the
way Hermes does: each top-level message starts a thread (its event id is the thread
id), the system prompt carries `**Matrix Room ID:**` and `**Matrix Thread:**`, the user
text is prefixed `[Name] `, and each turn makes two LLM calls (a tool round, then the
answer). Like Hermes with the route-sidecar plugin, it drops single-line `/route` and
`!route` messages and answers the question of the multi-line form.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any
from urllib.parse import quote

import httpx

from bot.commands import DEFAULT_PREFIXES, command_prefix, split_first_line

log = logging.getLogger("demo.agent")


def agent_text(body: str, prefixes: tuple[str, ...] = DEFAULT_PREFIXES) -> str | None:
    """What the agent answers: the body, the question of a multi-line /route, or None."""
    first, question = split_first_line(body)
    if command_prefix(first, prefixes) is None:
        return body
    return question  # None for a single-line command: the side-car answers it


class StandInAgent:
    def __init__(self, homeserver: str, token: str, user_id: str, dispatcher: str) -> None:
        self.user_id = user_id
        self.matrix = httpx.AsyncClient(
            base_url=homeserver.rstrip("/") + "/_matrix/client/v3",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        self.llm = httpx.AsyncClient(base_url=dispatcher.rstrip("/"), timeout=60)
        self.ignored = {user_id}
        self._task: asyncio.Task[None] | None = None
        self.turns = 0

    def ignore(self, *user_ids: str) -> None:
        """Senders never answered (the route bot, other agents)."""
        self.ignored.update(user_ids)

    async def start(self) -> None:
        since = await self._sync(None, timeout=0)  # history before the start is not answered
        self._task = asyncio.create_task(self._run(since))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.matrix.aclose()
        await self.llm.aclose()

    async def _run(self, since: str) -> None:
        while True:
            try:
                since = await self._sync(since, timeout=5000)
            except httpx.HTTPError as error:
                log.warning("sync failed: %s", type(error).__name__)
                await asyncio.sleep(1)

    async def _sync(self, since: str | None, timeout: int) -> str:
        params: dict[str, Any] = {"timeout": timeout}
        if since:
            params["since"] = since
        response = await self.matrix.get("/sync", params=params)
        response.raise_for_status()
        data = response.json()
        rooms = data.get("rooms", {})
        for room_id in rooms.get("invite", {}):
            await self.matrix.post(f"/join/{quote(room_id)}", json={})
        if since is not None:
            for room_id, room in rooms.get("join", {}).items():
                for event in room.get("timeline", {}).get("events", []):
                    await self._on_event(room_id, event)
        return data["next_batch"]

    async def _on_event(self, room_id: str, event: dict[str, Any]) -> None:
        content = event.get("content", {})
        if (
            event.get("type") != "m.room.message"
            or event.get("sender") in self.ignored
            or content.get("msgtype") != "m.text"
            or content.get("m.relates_to", {}).get("rel_type") == "m.replace"
        ):
            return
        text = agent_text(content.get("body", ""))
        if text is None:
            return
        relates = content.get("m.relates_to", {})
        thread = relates.get("event_id") if relates.get("rel_type") == "m.thread" else None
        thread = thread or event["event_id"]  # auto-thread, as Hermes does
        name = event["sender"].split(":")[0].lstrip("@")
        answer = await self.answer(room_id, thread, f"[{name}] {text}")
        await self.say(room_id, thread, answer)
        self.turns += 1

    async def answer(self, room_id: str, thread: str, user_text: str) -> str:
        """One turn: a tool round, then the answer; both calls carry the same turn."""
        system = (
            "You are a helpful agent.\n\n"
            f"**Matrix Room ID:** {room_id}\n**Matrix Thread:** {thread}\n"
        )
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": system},
            {"role": "user", "content": user_text},
        ]
        await self._complete(messages)
        messages += [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "search", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "(search results)"},
        ]
        return await self._complete(messages)

    async def _complete(self, messages: list[dict[str, Any]]) -> str:
        response = await self.llm.post(
            "/v1/chat/completions", json={"model": "default", "messages": messages}
        )
        if response.status_code != 200:
            return f"(the model failed: HTTP {response.status_code})"
        return response.json()["choices"][0]["message"]["content"]

    async def say(self, room_id: str, thread: str, text: str) -> None:
        content = {
            "msgtype": "m.text",
            "body": text,
            "m.relates_to": {
                "rel_type": "m.thread",
                "event_id": thread,
                "is_falling_back": True,
                "m.in_reply_to": {"event_id": thread},
            },
        }
        path = f"/rooms/{quote(room_id)}/send/m.room.message/{uuid.uuid4().hex}"
        (await self.matrix.put(path, json=content)).raise_for_status()
