"""A fake OpenAI-compatible model server that answers with its own name: the demo's "local"
and "cloud" models, and the tests' upstreams; and one base URL serving both by the
request's `model`, as Ollama, a LiteLLM proxy or OpenRouter do (`ModelServer`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from dataclasses import dataclass
from typing import Any

from aiohttp import web

# A tool an agent has offline: Hermes's `todo` (its in-memory task list; called with no
# arguments it reads the list). A fake model with `tool_rounds` asks for it first.
TOOL = "todo"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def last_user_text(body: dict[str, Any]) -> str:
    users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
    content = users[-1].get("content") if users else None
    return content if isinstance(content, str) else json.dumps(content)


async def serve(handler: Any) -> tuple[web.AppRunner, int]:
    """`handler` as `POST /v1/chat/completions` on a free loopback port."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


class FakeUpstream:
    """Answers every chat completion with "answer from <name>"; remembers what it saw.
    `fail_with` makes it answer that HTTP status, `fail_on` only for calls whose last user
    message contains that text; `delay` makes it slow; a stream pauses `stall` seconds
    after its first chunk. `answers_as`: the model it says answered (default: the model
    asked for). `tool_rounds`: how many times in a turn it asks for `TOOL` (when the
    request offers it) before it answers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[dict[str, Any]] = []
        self.fail_with: int | None = None
        self.fail_on: str | None = None
        self.delay = 0.0
        self.stall = 0.0
        self.answers_as: str | None = None
        self.tool_rounds = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def model(self, body: dict[str, Any]) -> str:
        return self.answers_as or str(body["model"])

    def tool_call(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The call of `TOOL` to answer with: while the turn (since the last user message)
        has had fewer than `tool_rounds` tool results, and the request offers the tool."""
        offered = any(
            (tool.get("function") or {}).get("name") == TOOL for tool in body.get("tools") or []
        )
        messages = body.get("messages") or []
        users = [n for n, m in enumerate(messages) if m.get("role") == "user"]
        results = [m for m in messages[users[-1] if users else 0 :] if m.get("role") == "tool"]
        if not offered or len(results) >= self.tool_rounds:
            return None
        return {
            "id": f"call_{self.name}_{len(self.seen)}",
            "type": "function",
            "function": {"name": TOOL, "arguments": "{}"},
        }

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        call = self.tool_call(body)
        message: dict[str, Any] = {"role": "assistant", "content": f"answer from {self.name}"}
        if call is not None:
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
        return {
            "id": "cmpl-1",
            "object": "chat.completion",
            "model": self.model(body),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop" if call is None else "tool_calls",
                    "message": message,
                }
            ],
        }

    def chunks(self, body: dict[str, Any]) -> list[bytes]:
        model, call = self.model(body), self.tool_call(body)
        if call is None:
            words = ["answer", " from", f" {self.name}", " ✓"]
            deltas: list[dict[str, Any]] = [{"content": word} for word in words]
        else:
            deltas = [{"role": "assistant", "tool_calls": [{"index": 0, **call}]}]
        out = [
            b"data: "
            + json.dumps({"model": model, "choices": [{"index": 0, "delta": delta}]}).encode()
            + b"\n\n"
            for delta in deltas
        ]
        # The last chunk says why the answer ended, as OpenAI's do (nanobot retries a
        # stream without one, as cut short).
        end = {
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "delta": {},
                    "finish_reason": "stop" if call is None else "tool_calls",
                }
            ],
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
            with contextlib.suppress(ConnectionResetError):  # a client gone after [DONE]
                await response.write_eof()
            return response
        return web.json_response(self.completion(body))

    async def start(self) -> FakeUpstream:
        self._runner, self.port = await serve(self.handle)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass(frozen=True)
class Served:
    """A call `ModelServer` received, and the fake model it handed it to."""

    upstream: str  # its name
    body: dict[str, Any]

    @property
    def context(self) -> dict[str, Any] | None:
        """The `matrix_context` the agent's plugin put in the body (none for a call not
        answering a Matrix message, such as a title)."""
        context = self.body.get("matrix_context")
        return context if isinstance(context, dict) else None


class ModelServer:
    """One base URL serving several fake models by the request's `model`; a model it does
    not serve gets 404, as from Ollama. `served`: every call, in order."""

    def __init__(self, models: dict[str, FakeUpstream]) -> None:
        self.models = models
        self.served: list[Served] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()  # read once: the fake model reads it again
        model = str(body.get("model")) if isinstance(body, dict) else ""
        upstream = self.models.get(model)
        if upstream is None:
            message = f"model {model!r} not found"
            return web.json_response({"error": {"message": message}}, status=404)
        self.served.append(Served(upstream.name, body))
        return await upstream.handle(request)

    async def start(self) -> ModelServer:
        self._runner, self.port = await serve(self.handle)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class ModelStack:
    """The demo's two fake models with the reference dispatcher in front of them, and
    `server`: both behind one base URL, by model name (no dispatcher)."""

    LOCAL = "glm-4.7-flash:q4_K_M"
    CLOUD = "ollama-cloud/glm-5.1"

    def __init__(self) -> None:
        self.local = FakeUpstream("local")
        self.cloud = FakeUpstream("cloud")
        self.server = ModelServer({self.LOCAL: self.local, self.CLOUD: self.cloud})
        self.dispatcher: Any = None
        self._runner: web.AppRunner | None = None
        self.dispatcher_url = ""

    async def start(self, sidecar_url: str, sidecar_token: str) -> ModelStack:
        from integrations.dispatcher.dispatcher import Dispatcher, DispatcherConfig, Upstream

        await self.local.start()
        await self.cloud.start()
        await self.server.start()
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
        await self.server.stop()
        await self.local.stop()
        await self.cloud.stop()
