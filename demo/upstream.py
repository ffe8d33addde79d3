"""A fake OpenAI-compatible model server that answers with its own name: the demo's "local"
and "cloud" models, and the tests' upstreams."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from aiohttp import web


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def last_user_text(body: dict[str, Any]) -> str:
    users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
    content = users[-1].get("content") if users else None
    return content if isinstance(content, str) else json.dumps(content)


class FakeUpstream:
    """Answers every chat completion with "answer from <name>"; remembers what it saw.
    `fail_with` makes it answer that HTTP status, `fail_on` only for calls whose last user
    message contains that text; `delay` makes it slow; a stream pauses `stall` seconds
    after its first chunk."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[dict[str, Any]] = []
        self.fail_with: int | None = None
        self.fail_on: str | None = None
        self.delay = 0.0
        self.stall = 0.0
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": "cmpl-1",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": f"answer from {self.name}"},
                }
            ],
        }

    def chunks(self, body: dict[str, Any]) -> list[bytes]:
        words = ["answer", " from", f" {self.name}", " ✓"]
        out = [
            b"data: "
            + json.dumps(
                {"model": body["model"], "choices": [{"index": 0, "delta": {"content": word}}]}
            ).encode()
            + b"\n\n"
            for word in words
        ]
        # The last chunk says why the answer ended, as OpenAI's do (nanobot retries a
        # stream without one, as cut short).
        end = {
            "model": body["model"],
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
        return [*out, b"data: " + json.dumps(end).encode() + b"\n\n", b"data: [DONE]\n\n"]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(body)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_with:
            return web.json_response({"error": {"message": "boom"}}, status=self.fail_with)
        if self.fail_on is not None and self.fail_on in last_user_text(body):
            return web.json_response({"error": {"message": "model crashed"}}, status=500)
        if body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for number, chunk in enumerate(self.chunks(body)):
                await response.write(chunk)
                await asyncio.sleep(self.stall if number == 0 and self.stall else 0.01)
            await response.write_eof()
            return response
        return web.json_response(self.completion(body))

    async def start(self) -> FakeUpstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class ModelStack:
    """The demo's two fake models with the reference dispatcher in front of them."""

    LOCAL = "glm-4.7-flash:q4_K_M"
    CLOUD = "ollama-cloud/glm-5.1"

    def __init__(self) -> None:
        self.local = FakeUpstream("local")
        self.cloud = FakeUpstream("cloud")
        self.dispatcher: Any = None
        self._runner: web.AppRunner | None = None
        self.dispatcher_url = ""

    async def start(self, sidecar_url: str, sidecar_token: str) -> ModelStack:
        from integrations.dispatcher.dispatcher import Dispatcher, DispatcherConfig, Upstream

        await self.local.start()
        await self.cloud.start()
        self.dispatcher = Dispatcher(
            DispatcherConfig(
                host="127.0.0.1",
                port=0,
                default_model=self.LOCAL,
                upstreams={
                    self.LOCAL: Upstream(self.local.base_url),
                    self.CLOUD: Upstream(self.cloud.base_url),
                },
                sidecar_url=sidecar_url,
                sidecar_token=sidecar_token,
            )
        )
        self._runner = web.AppRunner(self.dispatcher.make_app(), access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.dispatcher_url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.local.stop()
        await self.cloud.stop()
