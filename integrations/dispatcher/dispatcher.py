"""A reference dispatcher: a small OpenAI-compatible proxy that routes each call where the
room asked (through route-sidecar), or to its default model.

    python -m integrations.dispatcher.dispatcher -c dispatcher.yaml

For every `POST /v1/chat/completions` it claims (fail-open), picks the model, strips
what the upstream would refuse, forwards (SSE passed through chunk by chunk), logs one
line `ts=… room=… turn=… requested=… served=… override=… status=… latency_ms=…`, and
reports every call's outcome to the side-car, routed or not (in the background, never
delaying the answer): a routed call's receipt, and a failed turn's retry suggestion.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
from aiohttp import web
from route_sidecar_client import CONTEXT_FIELD, Decision, RouteClient
from ruamel.yaml import YAML

log = logging.getLogger("dispatcher")
# Fields an OpenAI-compatible upstream may refuse: OpenAI rejects `metadata` without
# `store: true`; the routing hints (an agent plugin's `matrix_context` among them) are the
# dispatcher's to consume.
STRIPPED_FIELDS = ("metadata", "route_sidecar", CONTEXT_FIELD)
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding"}


@dataclass(frozen=True, slots=True)
class Upstream:
    base_url: str
    api_key: str | None = None
    model: str | None = None  # the name the upstream knows the model by, if different


@dataclass(frozen=True, slots=True)
class DispatcherConfig:
    host: str
    port: int
    default_model: str
    upstreams: Mapping[str, Upstream]
    sidecar_url: str | None
    sidecar_token: str | None
    sidecar_timeout: float = 0.5
    upstream_timeout: float = 120.0


def load_config(path: Path) -> DispatcherConfig:
    raw = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    upstreams = {}
    for model, spec in (raw.get("upstreams") or {}).items():
        key = spec.get("api_key") or (
            os.environ.get(spec["api_key_env"]) if spec.get("api_key_env") else None
        )
        upstreams[str(model)] = Upstream(spec["base_url"].rstrip("/"), key, spec.get("model"))
    if raw["default_model"] not in upstreams:
        raise SystemExit(f"dispatcher: default_model {raw['default_model']!r} has no upstream")
    sidecar = raw.get("sidecar") or {}
    return DispatcherConfig(
        host=raw.get("listen", {}).get("host", "127.0.0.1"),
        port=int(raw.get("listen", {}).get("port", 4000)),
        default_model=raw["default_model"],
        upstreams=upstreams,
        sidecar_url=sidecar.get("url"),
        sidecar_token=sidecar.get("token") or os.environ.get("ROUTE_SIDECAR_TOKEN"),
        sidecar_timeout=float(sidecar.get("timeout", 0.5)),
        upstream_timeout=float(raw.get("upstream_timeout", 120)),
    )


class Dispatcher:
    def __init__(self, config: DispatcherConfig) -> None:
        self.config = config
        self.route = (
            RouteClient(config.sidecar_url, config.sidecar_token, config.sidecar_timeout)
            if config.sidecar_url and config.sidecar_token
            else None
        )
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(config.upstream_timeout))
        self._reports: set[asyncio.Task[bool]] = set()  # outcome reports under way

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, app: web.Application) -> None:
        await self.settle()
        await self.http.aclose()
        if self.route is not None:
            await self.route.aclose()

    async def settle(self) -> None:
        """Wait for the outcome reports still under way."""
        if self._reports:
            await asyncio.gather(*self._reports, return_exceptions=True)

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {"id": name, "object": "model", "owned_by": "dispatcher"}
            for name in self.config.upstreams
        ]
        return web.json_response({"object": "list", "data": data})

    def choose(self, requested: str | None, decision: Decision) -> str:
        """The room's override when the side-car gives one we can serve, else the request's
        model when we know it, else the default."""
        if decision.override and decision.model in self.config.upstreams:
            return decision.model  # type: ignore[return-value]
        if decision.override:
            log.warning("override model %r has no upstream: serving the default", decision.model)
        if requested in self.config.upstreams:
            return requested  # type: ignore[return-value]
        return self.config.default_model

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object")
        requested = body.get("model") if isinstance(body.get("model"), str) else None
        decision = await self.route.claim(request=body) if self.route else Decision()
        served = self.choose(requested, decision)
        upstream = self.config.upstreams[served]
        forward = {k: v for k, v in body.items() if k not in STRIPPED_FIELDS}
        forward["model"] = upstream.model or served
        headers = {"Content-Type": "application/json"}
        if upstream.api_key:
            headers["Authorization"] = f"Bearer {upstream.api_key}"
        status, response, finished = "error", None, False
        http_status, detail = 502, None
        try:
            upstream_request = self.http.build_request(
                "POST", f"{upstream.base_url}/chat/completions", json=forward, headers=headers
            )
            upstream_response = await self.http.send(upstream_request, stream=True)
            http_status = upstream_response.status_code
            try:
                response = web.StreamResponse(
                    status=upstream_response.status_code,
                    headers={
                        k: v
                        for k, v in upstream_response.headers.items()
                        if k.lower() not in HOP_HEADERS
                    },
                )
                await response.prepare(request)
                async for chunk in upstream_response.aiter_raw():
                    await response.write(chunk)
                await response.write_eof()
                finished = True
            finally:
                await upstream_response.aclose()
            status = "ok" if upstream_response.status_code < 400 else "error"
            detail = None if status == "ok" else f"upstream answered {http_status}"
        except httpx.TimeoutException:
            http_status, detail = 504, "upstream timed out"
        except httpx.HTTPError as error:
            http_status, detail = 502, f"upstream unreachable: {type(error).__name__}"
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError is one
            detail = "the client hung up"
        if response is not None and response.prepared and not finished:
            # The client already has the upstream's status line: what failed is the rest.
            http_status = response.status
            detail = f"{detail or 'failed'} mid-stream"
        latency_ms = int((time.perf_counter() - started) * 1000)
        log.info(
            "ts=%s room=%s turn=%s requested=%s served=%s override=%s status=%s latency_ms=%d%s",
            datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            decision.room_id or "-",
            decision.turn_id or "-",
            requested or "-",
            served,
            str(decision.override).lower(),
            status if status == "ok" else http_status,
            latency_ms,
            f' error="{detail}"' if status != "ok" and detail else "",
        )
        if self.route is not None and decision.worth_reporting:
            # Every call, routed or not: the side-car suggests a retry when a turn fails.
            # Reported off the response path: the caller does not wait for the side-car.
            report = asyncio.create_task(
                self.route.report(
                    decision,
                    model=served,
                    status=status,
                    request=body,
                    latency_ms=latency_ms,
                    detail=detail,
                )
            )
            self._reports.add(report)
            report.add_done_callback(self._reports.discard)
        if response is not None:
            return response
        return _error(http_status, detail or "upstream failed")


def _error(status: int, message: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": "dispatcher_error", "code": status}},
        status=status,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-c", "--config", default="dispatcher.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = load_config(Path(args.config))
    web.run_app(
        Dispatcher(config).make_app(),
        host=config.host,
        port=config.port,
        access_log=None,
        print=None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
