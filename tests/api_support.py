"""The lookup API under test: a real side-car started in-process, an httpx client that
checks every response against route_sidecar/openapi.json, and a snapshot of the stored state."""

from __future__ import annotations

import itertools
import json
import re
import socket
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from route_sidecar.app import Sidecar, start_sidecar
from route_sidecar.config import parse_config
from route_sidecar.core.events import RoomMessage

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "route_sidecar" / "openapi.json"
TOKEN = "lookup-token-0123456789abcdef"
OTHER_TOKEN = "second-lookup-token-fedcba9876"
MAX_BODY_BYTES = 4096
ROOM = "!routed:example.org"
ALICE = "@alice:example.org"
AGENT = "@agent:example.org"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TABLES = ("intents", "bound_turns", "outcomes", "effects")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def room_path(room_id: str) -> str:
    return f"/v1/rooms/{quote(room_id, safe='')}/intent"


def outcome_path(intent_id: str) -> str:
    return f"/v1/intents/{quote(intent_id, safe='')}/outcome"


# ---- the OpenAPI document as a response checker ----------------------------------------


class OpenApi:
    """route_sidecar/openapi.json: which statuses each path and method documents, and
    their bodies."""

    URI = "urn:route-sidecar:openapi"
    METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

    def __init__(self, path: Path = OPENAPI_PATH) -> None:
        self.raw = path.read_bytes()
        self.doc: dict[str, Any] = json.loads(self.raw)
        resource = Resource.from_contents(self.doc, default_specification=DRAFT202012)
        self.registry: Registry = Registry().with_resource(self.URI, resource)
        self._paths = [
            (re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))), template)
            for template in self.doc["paths"]
        ]

    def check(self, method: str, raw_path: str, response: httpx.Response) -> None:
        """The status is documented for the path and method, and the body, its media type
        and the required headers are those the document gives for that status."""
        status = response.status_code
        template = next((t for rx, t in self._paths if rx.fullmatch(raw_path)), None)
        if template is None:
            where = "/components/responses/NotFound"
            assert status == 404, f"{method} {raw_path}: unknown path answered {status}"
        elif method.lower() not in self.doc["paths"][template]:
            where = "/components/responses/MethodNotAllowed"
            assert status == 405, f"{method} {template}: unserved method answered {status}"
        else:
            responses = self.doc["paths"][template][method.lower()]["responses"]
            assert str(status) in responses, (
                f"{method} {template}: status {status} is not documented: {response.text[:300]}"
            )
            where = "/paths/" + _escape(template) + f"/{method.lower()}/responses/{status}"
        where, documented = self._follow(where)
        for name, header in documented.get("headers", {}).items():
            if header.get("required"):
                assert name in response.headers, f"{method} {raw_path} {status}: no {name}"
        content = documented.get("content")
        if not content:
            assert response.content == b"", f"{method} {raw_path} {status}: body not documented"
            return
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        assert media_type in content, (
            f"{method} {raw_path} {status}: media type {media_type!r} not in {list(content)}"
        )
        if media_type != "application/json":
            response.content.decode("utf-8")  # text: at least valid UTF-8
            return
        pointer = f"{where}/content/{_escape(media_type)}/schema"
        self.validate(response.json(), pointer)

    def validate(self, instance: Any, pointer: str) -> None:
        """Validate against the schema at a JSON pointer into the document ($refs resolve
        within the document)."""
        validator = Draft202012Validator(
            {"$ref": f"{self.URI}#{pointer}"},
            registry=self.registry,
            format_checker=Draft202012Validator.FORMAT_CHECKER,
        )
        errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
        assert not errors, f"{pointer}: {[e.message for e in errors]} in {instance!r}"

    def _follow(self, pointer: str) -> tuple[str, dict[str, Any]]:
        """The response object at `pointer`, following a `$ref` (and where it led)."""
        node = self.resolve(pointer)
        while "$ref" in node:
            pointer = node["$ref"].removeprefix("#")
            node = self.resolve(pointer)
        return pointer, node

    def resolve(self, pointer: str) -> Any:
        return self.registry.resolver().lookup(f"{self.URI}#{pointer}").contents


def _escape(segment: str) -> str:
    return segment.replace("~", "~0").replace("/", "~1")


# ---- the side-car and its state ---------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What a request could change: the room's intent as the API shows it, and the rows
    (with intent states and bound turns) of the tables the core writes."""

    intent: tuple[int, Any]
    rows: dict[str, int]
    intents: tuple[tuple[Any, ...], ...]
    bound_turns: tuple[tuple[Any, ...], ...]


class Api:
    """A running side-car, an httpx client on its lookup API, and ways to act as a room."""

    def __init__(self, sidecar: Sidecar, client: httpx.AsyncClient, openapi: OpenApi) -> None:
        self.sidecar = sidecar
        self.client = client
        self.openapi = openapi
        self.db_path = sidecar.config.database_path
        self._events = itertools.count(1)

    async def say(
        self,
        room_id: str,
        body: str,
        *,
        ago: float = 5.0,
        sender: str = ALICE,
        thread: str | None = None,
        event_id: str | None = None,
    ) -> str:
        """A room message reaches the side-car (the path the appservice takes)."""
        event_id = event_id or f"$event{next(self._events)}"
        moment = datetime.now(UTC) - timedelta(seconds=ago)
        # Whole milliseconds, as a homeserver's origin_server_ts gives them.
        sent_at = moment.replace(microsecond=moment.microsecond // 1000 * 1000)
        await self.sidecar.service.on_message(
            RoomMessage(
                room_id=room_id,
                event_id=event_id,
                sender=sender,
                body=body,
                msgtype="m.text",
                thread_root=thread,
                is_edit=False,
                sent_at=sent_at,
            )
        )
        return event_id

    async def route(self, room_id: str = ROOM, command: str = "/route cloud") -> str:
        """Set an intent with a command; returns its id."""
        await self.say(room_id, command, ago=10.0)
        response = await self.client.get(room_path(room_id), headers=AUTH)
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    async def claim(self, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.client.post("/v1/claim", json=body, headers=headers or AUTH)

    async def post_raw(
        self,
        path: str,
        content: bytes,
        content_type: str | None = "application/json",
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        sent = dict(headers or AUTH)
        if content_type is not None:
            sent["Content-Type"] = content_type
        return await self.client.post(path, content=content, headers=sent)

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of a table, in insertion order (read-only, beside the side-car)."""
        db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in db.execute(f"SELECT * FROM {table} ORDER BY rowid")]
        finally:
            db.close()

    async def snapshot(self, room_id: str = ROOM) -> Snapshot:
        response = await self.client.get(room_path(room_id), headers=AUTH)
        intent = (response.status_code, response.json())
        db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
        try:
            rows = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
            intents = tuple(db.execute("SELECT id, state FROM intents ORDER BY id"))
            # Not the claim counts and times: the side-car writes those behind, at its sweep.
            bound = tuple(
                db.execute(
                    "SELECT intent_id, position, turn_id, message_hash, bound_at FROM bound_turns"
                    " ORDER BY intent_id, position"
                )
            )
        finally:
            db.close()
        return Snapshot(intent, rows, intents, bound)


def live_command(sidecar: Sidecar, room_id: str) -> str | None:
    """The command event of the room's live intent, None when it has none."""
    intent = sidecar.service.live.current(room_id)
    return intent.command_event_id if intent is not None else None


def sidecar_config(tmp_path: Path) -> Any:
    return parse_config(
        {
            # Nothing listens there: the Matrix side retries in the background.
            "homeserver": {"address": f"http://127.0.0.1:{free_port()}", "domain": "example.org"},
            "appservice": {
                "address": "http://127.0.0.1:29333",
                "listen": {"host": "127.0.0.1", "port": free_port()},
                "as_token": "as-token-0123456789abcdef",
                "hs_token": "hs-token-0123456789abcdef",
            },
            "api": {
                "listen": {"host": "127.0.0.1", "port": free_port()},
                "tokens": [TOKEN, OTHER_TOKEN],
                "max_body_bytes": MAX_BODY_BYTES,
            },
            "database": f"sqlite:///{tmp_path / 'sidecar.db'}",
            "targets": {
                "cloud": {"model": "ollama-cloud/glm-5.1", "aliases": ["c"]},
                "local": {"model": "glm-4.7-flash:q4_K_M"},
            },
            "permissions": {"*": 0},
            "agents": [AGENT],
            # No homeserver here: the bot's device could not be created (tests/e2e has it).
            "encryption": {"enabled": False},
            "limits": {"routes_per_hour": 0},
        },
        {},
    )


async def start_api(tmp_path: Path, openapi: OpenApi) -> Api:
    """Start the side-car; every response its client receives is checked against the
    OpenAPI document."""
    config = sidecar_config(tmp_path)
    sidecar = await start_sidecar(config)

    async def conforms(response: httpx.Response) -> None:
        await response.aread()
        path = response.request.url.raw_path.decode("ascii").split("?")[0]
        openapi.check(response.request.method, path, response)

    client = httpx.AsyncClient(
        base_url=f"http://{config.api.listen.host}:{config.api.listen.port}",
        event_hooks={"response": [conforms]},
        timeout=10,
    )
    return Api(sidecar, client, openapi)


async def stop_api(api: Api) -> None:
    await api.client.aclose()
    await api.sidecar.stop()
