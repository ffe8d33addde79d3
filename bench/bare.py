"""The yardstick: the least an aiohttp server can do for `POST /v1/claim`. Default asyncio
event loop, standard-library json, no middleware: it checks the same bearer token
(constant time), parses the same JSON body and answers a constant body shaped like the
side-car's answer for a room with no intent.

Run by the bench as its own process: `python -m bench.bare --port N`, the token in the
environment variable BENCH_BARE_TOKEN.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os

from aiohttp import web

ANSWER = json.dumps(
    {
        "override": False,
        "model": None,
        "target": None,
        "intent_id": None,
        "room_id": "!idle-room:bench",
        "turn_id": "$turn-event",
        "expires_at": None,
        "reason": "no_intent",
        "metadata": {"matrix_room_id": "!idle-room:bench", "route_turn_id": "$turn-event"},
    }
).encode()
UNAUTHORIZED = json.dumps(
    {"error": {"code": "unauthorized", "message": "missing or wrong bearer token"}}
).encode()
BAD_REQUEST = json.dumps(
    {"error": {"code": "bad_request", "message": "body must be a JSON object"}}
).encode()


def make_app(token: str) -> web.Application:
    expected = f"Bearer {token}".encode()

    async def claim(request: web.Request) -> web.Response:
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            return web.Response(status=401, body=UNAUTHORIZED, content_type="application/json")
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return web.Response(status=400, body=BAD_REQUEST, content_type="application/json")
        return web.Response(body=ANSWER, content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(body=b'{"status": "ok"}', content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/claim", claim)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = make_app(os.environ["BENCH_BARE_TOKEN"])
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
