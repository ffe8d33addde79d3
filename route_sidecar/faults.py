"""Kill points for the crash-consistency tests (issue 6): with ROUTE_SIDECAR_CRASH_AT set
to `<point>` or `<point>@<n>`, the process kills itself with SIGKILL the n-th time (1st
by default) it reaches that point. Unset, `crash_point` returns at once.

Fail points for the poison-event tests (issue 14): with ROUTE_SIDECAR_FAIL_EVENT set to
`<point>:<marker>`, handling an event whose body holds the marker raises there, every
time. Unset, `fail_point` returns at once.

Nothing else reads these variables; production never sets them.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "ROUTE_SIDECAR_CRASH_AT"
POINTS = (
    "transaction-received",  # a transaction arrived, nothing handled yet
    "transaction-handled",  # its events handled and committed, its id not yet stored
    "command-committed",  # a command's intent and reply committed, nothing sent
    "event-sent",  # a room event sent to the homeserver, not yet marked sent
    "claim-bound",  # a turn's binding committed, the claim not yet answered
    "outcome-committed",  # an outcome and its receipt committed, not yet answered
)


def _parse(raw: str | None) -> tuple[str, int] | None:
    if not raw:
        return None
    point, _, count = raw.partition("@")
    if point not in POINTS:
        raise SystemExit(f"{CRASH_ENV}: unknown point {point!r}; one of {', '.join(POINTS)}")
    return point, int(count) if count.isdigit() and int(count) > 0 else 1


_TARGET = _parse(os.environ.get(CRASH_ENV))
_reached: dict[str, int] = {}


def crash_point(point: str) -> None:
    """Die here, as `kill -9` would, when the environment asks for this point."""
    if _TARGET is None or _TARGET[0] != point:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == _TARGET[1]:
        os.kill(os.getpid(), signal.SIGKILL)


FAIL_ENV = "ROUTE_SIDECAR_FAIL_EVENT"
FAIL_POINTS = (
    "event-received",  # an event about to be handed to the service
    "event-handled",  # an event handled by the service, its changes committed
)


class InjectedFault(RuntimeError):
    """The failure a fail point raises."""


def parse_fail(raw: str | None) -> tuple[str, str] | None:
    if not raw:
        return None
    point, _, marker = raw.partition(":")
    if point not in FAIL_POINTS or not marker:
        raise SystemExit(f"{FAIL_ENV}: expected <point>:<marker>, point one of {FAIL_POINTS}")
    return point, marker


FAIL_TARGET = parse_fail(os.environ.get(FAIL_ENV))


def fail_point(point: str, event: object) -> None:
    """Raise here when the environment names this point and the body of `event` (a raw
    event or a typed message) holds its marker."""
    if FAIL_TARGET is None or FAIL_TARGET[0] != point:
        return
    if isinstance(event, dict):
        content = event.get("content")
        body = content.get("body") if isinstance(content, dict) else None
    else:
        body = getattr(event, "body", None)
    if isinstance(body, str) and FAIL_TARGET[1] in body:
        raise InjectedFault(f"fault injected at {point}")
