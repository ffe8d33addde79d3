"""SPEC "The lookup API", fuzzed: schemathesis against the OpenAPI document the side-car
serves (`GET /v1/openapi.json`), every operation, over real HTTP to a real side-car.

Each case schemathesis generates (its examples, coverage and fuzzing phases; valid and
schema-violating data) is sent

- once without a valid bearer token (no header, a wrong token, a near miss, another
  scheme: one per case, in turn),
- once as generated with a valid token,
- once more with a valid token and the live room and intent ids put in place of the
  generated ones, so that requests reach stored state (a random room id never does).

Every response must be no 5xx, have a status, content type, headers and body the
document gives for the operation (schemathesis's checks and the repo's own
`OpenApi.check`), and every rejected request (status >= 400) and every GET must leave
the stored state as it was (`Api.snapshot()` before and after). Valid requests may
change it: claims bind, outcomes are stored, DELETE cancels.

ROUTE_SIDECAR_FUZZ_EXAMPLES sets hypothesis's examples per operation and generation mode
(default 25, the CI setting: about 1,800 requests in 40 s, most of them from the coverage
phase, whose size does not depend on it; 250 is the full setting). The last test prints
the figures of the run (`pytest -s`): requests per operation, token and status.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import threading
from collections import Counter
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config import SchemathesisConfig

from tests.api_support import (
    AUTH,
    OPENAPI_PATH,
    OTHER_TOKEN,
    ROOM,
    TOKEN,
    Api,
    OpenApi,
    Snapshot,
    start_api,
    stop_api,
)

EXAMPLES = int(os.environ.get("ROUTE_SIDECAR_FUZZ_EXAMPLES", "25"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Authorization headers that must not get through (None: no header at all).
REFUSED_AUTH: list[str | None] = [
    None,
    "Bearer wrong-token-0123456789abcdef",
    f"Bearer {TOKEN[:-1]}",
    f"Bearer {TOKEN}x",
    f"Basic {TOKEN}",
    "Bearer",
    "Bearer ",
    TOKEN,
]
VALID_AUTH = [f"Bearer {TOKEN}", f"Bearer {OTHER_TOKEN}"]
# Commands that set the room's intent when it has none: every scope.
COMMANDS = ["/route cloud", "/route local --turns 3", "/route c --for 10m", "/route cloud"]
STEER_RENEW = 25  # a fresh intent (superseding the last) every so many steered requests

T = TypeVar("T")


class Served:
    """The in-process side-car, on its own event loop in a thread: schemathesis sends its
    requests synchronously (requests), and the side-car answers them meanwhile."""

    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.api: Api = self.run(start_api(tmp_path, OpenApi()))
        listen = self.api.sidecar.config.api.listen
        self.base_url = f"http://{listen.host}:{listen.port}"
        self.session = requests.Session()
        self.stats: Counter[tuple[str, str, int]] = Counter()
        self.failures: list[str] = []
        self._commands = itertools.cycle(COMMANDS)
        self._refused = itertools.cycle(REFUSED_AUTH)
        self._valid = itertools.cycle(VALID_AUTH)
        self._steered = 0
        self.last: Snapshot | None = None  # the state after the last request

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def close(self) -> None:
        self.session.close()
        try:
            self.run(stop_api(self.api))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()

    def snapshot(self) -> Snapshot:
        return self.run(self.api.snapshot())

    def state_before(self) -> Snapshot:
        """The stored state now: as the last request left it (nothing else writes what a
        snapshot holds while the fuzzer runs, but `live_intent`, which forgets it)."""
        if self.last is None:
            self.last = self.snapshot()
        return self.last

    def live_intent(self) -> str:
        """The id of ROOM's live intent; a new one when it has none, or every so often."""
        self._steered += 1
        before = self.state_before()
        if before.intent[0] == 200 and self._steered % STEER_RENEW:
            return str(before.intent[1]["id"])
        self.last = None
        return self.run(self.api.route(ROOM, next(self._commands)))

    def refused_auth(self) -> str | None:
        return next(self._refused)

    def valid_auth(self) -> str:
        return next(self._valid)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    running = Served(tmp_path_factory.mktemp("fuzz"))
    try:
        yield running
    finally:
        running.close()


DOCUMENT = json.loads(OPENAPI_PATH.read_bytes())
# Loaded when the module is (schemathesis parametrizes at collection, before any side-car
# runs; its lazy `from_fixture` loader does not work with pytest 9). The first test
# asserts the side-car serves this very document.
schema = schemathesis.openapi.from_dict(
    DOCUMENT,
    config=SchemathesisConfig.from_dict({"generation": {"max-examples": EXAMPLES, "mode": "all"}}),
)


def test_the_side_car_serves_the_document_fuzzed(served: Served) -> None:
    response = requests.get(f"{served.base_url}/v1/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == DOCUMENT


def steered(case: Any, intent_id: str) -> bool:
    """Put the live room and intent in place of generated ids; False if the case has
    none."""
    changed = False
    params = case.path_parameters
    if isinstance(params, dict):
        if "room_id" in params:
            params["room_id"] = ROOM
            changed = True
        if "intent_id" in params:
            params["intent_id"] = intent_id
            changed = True
    if isinstance(case.body, dict) and case.operation.path in ("/v1/claim", "/v1/outcome"):
        case.body["room_id"] = ROOM  # given or not: the body's other fields stay as generated
        changed = True
    return changed


def needs_token(case: Any, raw_path: str) -> bool:
    """Whether the request reaches an operation that needs a token (its method, and a path
    the router matches to it: a generated id may hold a '/' and match nothing)."""
    operation = case.operation
    if case.method.lower() != operation.method.lower() or not operation.path.startswith("/v1/"):
        return False
    if operation.path == "/v1/openapi.json":
        return False
    pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(operation.path))
    return re.fullmatch(pattern, raw_path) is not None


def as_httpx(response: Any) -> httpx.Response:
    """A schemathesis response as the httpx one `OpenApi.check` reads."""
    headers = [(name, value) for name, values in response.headers.items() for value in values]
    return httpx.Response(response.status_code, headers=headers, content=response.content)


def send(served: Served, case: Any, authorization: str | None, what: str) -> None:
    """Send the case with this Authorization header (none: without one), check the
    response, and check that a rejected request or a GET changed nothing."""
    case.headers = {
        k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"
    } or None
    headers = {} if authorization is None else {"Authorization": authorization}
    before = served.state_before()
    response = case.call(base_url=served.base_url, session=served.session, headers=headers)
    after = served.last = served.snapshot()
    # What was sent: schemathesis's coverage phase also drops the header itself.
    if response.request.headers.get("Authorization") not in VALID_AUTH:
        what = "refused"
    served.stats[(case.operation.label, what, response.status_code)] += 1
    raw_path = response.request.path_url.split("?")[0]
    try:
        case.validate_response(
            response,
            checks=CHECKS,
            headers=headers,
            transport_kwargs={"base_url": served.base_url, "headers": headers},
        )
        served.api.openapi.check(case.method, raw_path, as_httpx(response))
        if response.status_code >= 400 or case.method.upper() == "GET":
            assert after == before, (
                f"{case.method} {raw_path} answered {response.status_code} and changed the"
                f" stored state:\n  before {before}\n  after  {after}"
            )
        if needs_token(case, raw_path):
            if what == "refused":
                assert response.status_code == 401, f"no valid token: {response.status_code}"
            else:
                assert response.status_code != 401, "a valid token was refused"
    except BaseException as error:
        served.failures.append(
            f"{what}: {case.as_curl_command(headers=headers, base_url=served.base_url)}"
            f" -> {response.status_code} {response.content[:300]!r}: {error}"
        )
        raise


@schema.parametrize()
@settings(
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_conforms_and_rejected_requests_change_nothing(
    case: Any, served: Served
) -> None:
    send(served, case, served.refused_auth(), "refused")
    send(served, case, served.valid_auth(), "valid")
    if steered(case, served.live_intent()):
        send(served, case, served.valid_auth(), "steered")


def test_every_operation_was_fuzzed_with_and_without_a_valid_token(served: Served) -> None:
    labels = {result.ok().label for result in schema.get_all_operations()}  # type: ignore[union-attr]  # an Err fails here, as it should
    seen = {(label, what) for label, what, _ in served.stats}
    for label in labels:
        assert (label, "valid") in seen, f"{label} never sent with a valid token"
        assert (label, "refused") in seen, f"{label} never sent without a valid token"
    total = sum(served.stats.values())
    print(f"\nfuzzed the lookup API: {total} requests, {len(served.failures)} failures")
    by_op: dict[str, Counter[str]] = {}
    for (label, what, status), count in sorted(served.stats.items()):
        by_op.setdefault(label, Counter())[f"{what}:{status}"] += count
    for label, counts in by_op.items():
        print(f"  {label}: {dict(counts)}")
    for failure in served.failures:
        print(f"  FAILED {failure}")
    assert AUTH  # the valid header the other tests use is one of VALID_AUTH
    assert AUTH["Authorization"] in VALID_AUTH
