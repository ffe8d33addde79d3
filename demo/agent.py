"""A stand-in for Hermes Agent's Matrix gateway, for the demo and the end-to-end tests.

It answers every text message in its rooms through an OpenAI-compatible dispatcher, the
way Hermes does: each top-level message starts a thread (its event id is the thread
id), the system prompt carries `**Matrix Room ID:**` and `**Matrix Thread:**`, the user
text is prefixed `[Name] `, and each turn makes two LLM calls (a tool round, then the
answer). It decides what to answer with the route-sidecar Hermes plugin's own
`RouteFilter`, as Hermes with that plugin does: it drops single-line `/route` and
`!route` messages, answers the question of the multi-line form, and answers
`/route <target> again` as the room's last question.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import httpx

from integrations.hermes import DEFAULT_QUESTION_TTL, RouteFilter, commands

log = logging.getLogger("demo.agent")
FAILED = "(the model failed"


class StandInAgent:
    def __init__(
        self,
        homeserver: str,
        token: str,
        user_id: str,
        dispatcher: str,
        prefixes: tuple[str, ...] = commands.DEFAULT_PREFIXES,
        question_ttl: timedelta = DEFAULT_QUESTION_TTL,
    ) -> None:
        self.user_id = user_id
        self.route_filter = RouteFilter(prefixes, question_ttl)
        self.matrix = httpx.AsyncClient(
            base_url=homeserver.rstrip("/") + "/_matrix/client/v3",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        self.llm = httpx.AsyncClient(base_url=dispatcher.rstrip("/"), timeout=60)
        self.ignored = {user_id}
        self._task: asyncio.Task[None] | None = None
        self.turns = 0
        self.started_ms = 0

    def ignore(self, *user_ids: str) -> None:
        """Senders never answered (the route bot, other agents)."""
        self.ignored.update(user_ids)

    def agent_text(self, room_id: str, body: str) -> str | None:
        """What the agent answers: the body, the text the plugin puts in its place, or None."""
        action = self.route_filter.action(room_id, body)
        if action is None:
            return body
        if action["action"] == "rewrite":
            return action["text"]
        return None  # skipped: the side-car answers the command

    async def start(self) -> None:
        # Like Hermes, nothing sent before the start is answered: neither the history of
        # the rooms it is in, nor that of a room it joins later.
        self.started_ms = int(time.time() * 1000)
        since = await self._sync(None, timeout=0)
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
        return str(data["next_batch"])

    async def _on_event(self, room_id: str, event: dict[str, Any]) -> None:
        content = event.get("content", {})
        if (
            event.get("type") != "m.room.message"
            or event.get("sender") in self.ignored
            or content.get("msgtype") != "m.text"
            or content.get("m.relates_to", {}).get("rel_type") == "m.replace"
            or event.get("origin_server_ts", 0) < self.started_ms
        ):
            return
        text = self.agent_text(room_id, content.get("body", ""))
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
        first = await self._complete(messages)
        if first.startswith(FAILED):
            return first  # the turn ends with the error, as Hermes's does once retries run out
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
            return f"{FAILED}: HTTP {response.status_code})"
        return str(response.json()["choices"][0]["message"]["content"])

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
