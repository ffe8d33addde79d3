#!/usr/bin/env python3
"""Throwaway local Synapse runner for the demo and the test suite.

Standard library only: it runs under any python3. Synapse itself runs under a separate
interpreter (``synapse_python``) that has ``matrix-synapse`` installed.

Library use::

    import local_synapse
    hs = local_synapse.start(Path("/tmp/hs"), synapse_python="/path/to/venv/bin/python")
    alice = local_synapse.register_user(hs.base_url, "alice", "secret")
    local_synapse.stop(hs.data_dir)

CLI use: see ``python3 local_synapse.py --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "SynapseError",
    "SynapseHandle",
    "api_request",
    "default_synapse_python",
    "register_user",
    "start",
    "stop",
]

CONFIG_NAME = "homeserver.yaml"
LOG_CONFIG_NAME = "log.config.yaml"
LOG_NAME = "homeserver.log"
OUT_NAME = "synapse.out"
PID_NAME = "synapse.pid"
SIGNING_KEY_NAME = "signing.key"

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SYNAPSE_PYTHON = REPO_ROOT / ".venv-synapse" / "bin" / "python"
INSTALL_HINT = (
    "Synapse not found: set SYNAPSE_PYTHON or pass --synapse-python, or install it with "
    "`python3 -m venv .venv-synapse && .venv-synapse/bin/pip install matrix-synapse`"
)

# Effectively "no rate limit" for a local test server.
_UNLIMITED = {"per_second": 10000, "burst_count": 100000}
_SECRET_KEYS = ("registration_shared_secret", "macaroon_secret_key", "form_secret")

# Never route requests to the local homeserver through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class SynapseError(RuntimeError):
    """Synapse could not be started, or an API call failed."""


@dataclass(frozen=True)
class SynapseHandle:
    """A running local Synapse."""

    data_dir: Path
    pid: int
    base_url: str
    server_name: str
    config_path: Path


# --------------------------------------------------------------------------- config


def _rate_limits() -> dict[str, Any]:
    """All ``rc_*`` settings Synapse 1.163 reads, raised far beyond anything a test does."""
    u = _UNLIMITED
    return {
        "rc_message": dict(u),
        "rc_registration": dict(u),
        "rc_registration_token_validity": dict(u),
        "rc_login": {"address": dict(u), "account": dict(u), "failed_attempts": dict(u)},
        "rc_admin_redaction": dict(u),
        "rc_joins": {"local": dict(u), "remote": dict(u)},
        "rc_joins_per_room": dict(u),
        "rc_3pid_validation": dict(u),
        "rc_invites": {"per_room": dict(u), "per_user": dict(u), "per_issuer": dict(u)},
        "rc_third_party_invite": dict(u),
        "rc_media_create": dict(u),
        "rc_presence": {"per_user": dict(u)},
        "rc_delayed_event_mgmt": dict(u),
        "rc_room_creation": dict(u),
        "rc_reports": dict(u),
        "rc_user_directory": dict(u),
        "rc_profile": dict(u),
        "rc_key_requests": dict(u),
    }


def _log_config(log_file: Path) -> dict[str, Any]:
    """Python logging dictConfig: INFO to ``log_file``, nothing to stdout."""
    return {
        "version": 1,
        "formatters": {
            "precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - "
                "%(request)s - %(message)s"
            }
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": str(log_file),
                "encoding": "utf8",
            }
        },
        "loggers": {"synapse.storage.SQL": {"level": "INFO"}},
        "root": {"level": "INFO", "handlers": ["file"]},
        "disable_existing_loggers": False,
    }


def _load_json(path: Path) -> dict[str, Any]:
    """Load a JSON file, or return {} if it is missing or not JSON."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON (which is valid YAML) atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_config(
    data_dir: Path,
    *,
    port: int = 8008,
    server_name: str = "localhost",
    registrations: Sequence[Path] = (),
) -> Path:
    """(Re)write ``homeserver.yaml`` and the log config; keep secrets of an existing config."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    config_path = data_dir / CONFIG_NAME
    old = _load_json(config_path)
    old_name = old.get("server_name")
    if old_name and old_name != server_name:
        raise SynapseError(
            f"{data_dir} belongs to server_name {old_name!r}, not {server_name!r}; "
            "use a fresh data dir"
        )
    log_config_path = data_dir / LOG_CONFIG_NAME
    _write_json(log_config_path, _log_config(data_dir / LOG_NAME))
    (data_dir / "media_store").mkdir(exist_ok=True)

    config: dict[str, Any] = {
        "server_name": server_name,
        "public_baseurl": f"http://127.0.0.1:{port}/",
        "pid_file": str(data_dir / "homeserver.pid"),
        "listeners": [
            {
                "port": port,
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "bind_addresses": ["127.0.0.1"],
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "database": {"name": "sqlite3", "args": {"database": str(data_dir / "homeserver.db")}},
        "media_store_path": str(data_dir / "media_store"),
        "log_config": str(log_config_path),
        "signing_key_path": str(data_dir / SIGNING_KEY_NAME),
        "report_stats": False,
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "enable_registration": True,
        "enable_registration_without_verification": True,
        "app_service_config_files": [str(Path(p).resolve()) for p in registrations],
        "presence": {"enabled": False},
        "url_preview_enabled": False,
        "enable_metrics": False,
        # Appservice end-to-end encryption (route-sidecar's `encryption`): transactions
        # carry to-device events, device list changes and one-time key counts.
        "experimental_features": {
            "msc3202_transaction_extensions": True,
            "msc2409_to_device_messages_enabled": True,
        },
    }
    for key in _SECRET_KEYS:
        value = old.get(key)
        config[key] = value if isinstance(value, str) and value else secrets.token_urlsafe(32)
    config.update(_rate_limits())
    _write_json(config_path, config)
    return config_path


def base_url_of(data_dir: Path) -> str:
    """The client base URL of the Synapse configured in ``data_dir``."""
    config = _load_json(Path(data_dir) / CONFIG_NAME)
    try:
        port = int(config["listeners"][0]["port"])
    except (KeyError, IndexError, TypeError, ValueError):
        raise SynapseError(f"no usable {CONFIG_NAME} in {data_dir}") from None
    return f"http://127.0.0.1:{port}"


# --------------------------------------------------------------------------- processes


def _tail(path: Path, lines: int = 30) -> str:
    """Last ``lines`` lines of a file, or '' if it does not exist."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _diagnostics(data_dir: Path) -> str:
    """Tails of synapse.out and homeserver.log for error messages."""
    parts = []
    for name in (OUT_NAME, LOG_NAME):
        tail = _tail(data_dir / name)
        if tail:
            parts.append(f"--- tail of {data_dir / name} ---\n{tail}")
    return "\n".join(parts) or "(no output from Synapse)"


def _read_pid(data_dir: Path) -> int | None:
    """The pid from ``synapse.pid``, or None."""
    try:
        return int((Path(data_dir) / PID_NAME).read_text().strip())
    except (OSError, ValueError):
        return None


def _is_synapse(pid: int) -> bool:
    """True if ``pid`` is a live (non-zombie) Synapse homeserver process."""
    try:
        # Reap it if it is our own child, so that it does not linger as a zombie.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():  # Linux: guard against zombies and pid reuse.
        try:
            stat = (proc / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            return False
        return b"synapse.app.homeserver" in cmdline
    return True


def _port_free(port: int) -> bool:
    """True if 127.0.0.1:port can be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _versions_ok(base_url: str) -> bool:
    """True if ``/_matrix/client/versions`` answers 200."""
    try:
        with _OPENER.open(f"{base_url}/_matrix/client/versions", timeout=2) as resp:
            return bool(resp.status == 200)
    except (OSError, ValueError):
        return False


def start(
    data_dir: Path,
    *,
    synapse_python: str,
    port: int = 8008,
    server_name: str = "localhost",
    registrations: Sequence[Path] = (),
    timeout: float = 60.0,
) -> SynapseHandle:
    """Configure and start Synapse in ``data_dir``; return once the client API answers."""
    data_dir = Path(data_dir).resolve()
    old_pid = _read_pid(data_dir)
    if old_pid is not None and _is_synapse(old_pid):
        raise SynapseError(f"Synapse already running in {data_dir} (pid {old_pid}); stop it first")
    if not _port_free(port):
        raise SynapseError(f"port {port} on 127.0.0.1 is already in use")
    config_path = write_config(
        data_dir, port=port, server_name=server_name, registrations=registrations
    )
    base_url = f"http://127.0.0.1:{port}"
    out_path = data_dir / OUT_NAME

    deadline = time.monotonic() + timeout
    if not (data_dir / SIGNING_KEY_NAME).exists():
        try:
            gen = subprocess.run(
                [
                    synapse_python,
                    "-m",
                    "synapse.app.homeserver",
                    "-c",
                    str(config_path),
                    "--generate-keys",
                ],
                cwd=data_dir,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except FileNotFoundError:
            raise SynapseError(f"{synapse_python}: not found. {INSTALL_HINT}") from None
        except subprocess.TimeoutExpired:
            raise SynapseError(f"generating the signing key took over {timeout:g}s") from None
        if gen.returncode != 0:
            raise SynapseError(
                f"generating signing key failed (exit {gen.returncode}):\n"
                f"{gen.stdout}{gen.stderr}".rstrip()
            )

    with out_path.open("ab") as out:
        try:
            proc = subprocess.Popen(
                [synapse_python, "-m", "synapse.app.homeserver", "-c", str(config_path)],
                cwd=data_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except FileNotFoundError:
            raise SynapseError(f"{synapse_python}: not found. {INSTALL_HINT}") from None
    (data_dir / PID_NAME).write_text(f"{proc.pid}\n")

    while True:
        code = proc.poll()
        if code is not None:
            (data_dir / PID_NAME).unlink(missing_ok=True)
            raise SynapseError(f"Synapse exited with code {code}\n{_diagnostics(data_dir)}")
        if _versions_ok(base_url):
            break
        if time.monotonic() > deadline:
            stop(data_dir)
            raise SynapseError(
                f"Synapse did not answer on {base_url} within {timeout:g}s\n"
                f"{_diagnostics(data_dir)}"
            )
        time.sleep(0.1)
    return SynapseHandle(data_dir, proc.pid, base_url, server_name, config_path)


def stop(data_dir: Path, timeout: float = 15.0) -> None:
    """Stop the Synapse started in ``data_dir`` (SIGTERM, then SIGKILL); no-op if not running."""
    pid_path = Path(data_dir) / PID_NAME
    pid = _read_pid(Path(data_dir))
    if pid is None or not _is_synapse(pid):
        pid_path.unlink(missing_ok=True)
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)  # start_new_session=True: the pgid is the pid
        except ProcessLookupError:
            break
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _is_synapse(pid):
            time.sleep(0.05)
        if not _is_synapse(pid):
            break
    _reap(pid)
    pid_path.unlink(missing_ok=True)


def _reap(pid: int, timeout: float = 5.0) -> None:
    """Collect the exited process when it is our own child, so no zombie keeps its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return  # not our child (or already collected): its parent reaps it
        if done:
            return
        time.sleep(0.02)


# --------------------------------------------------------------------------- client API


def api_request(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict[str, Any]]:
    """Send a JSON request; return (status, JSON body) without raising on HTTP errors."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        parsed = json.loads(raw) if raw else {}
    except ValueError:
        parsed = {"raw": raw.decode(errors="replace")}
    return status, parsed if isinstance(parsed, dict) else {"value": parsed}


def _login(base_url: str, localpart: str, password: str) -> dict[str, Any]:
    """Password login; returns the login response."""
    status, body = api_request(
        "POST",
        f"{base_url}/_matrix/client/v3/login",
        {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": password,
        },
    )
    if status != 200:
        raise SynapseError(f"login of {localpart!r} failed: {status} {body}")
    return body


def register_user(base_url: str, localpart: str, password: str) -> dict[str, Any]:
    """Register ``localpart`` (m.login.dummy), or log in if it exists; return the JSON body.

    The result has at least ``user_id``, ``access_token`` and ``device_id``.
    """
    base_url = base_url.rstrip("/")
    url = f"{base_url}/_matrix/client/v3/register"
    req: dict[str, Any] = {"username": localpart, "password": password}
    status, body = api_request("POST", url, req)
    if status == 401 and "session" in body:
        req["auth"] = {"type": "m.login.dummy", "session": body["session"]}
        status, body = api_request("POST", url, req)
    if status == 200:
        return body
    if body.get("errcode") == "M_USER_IN_USE":
        return _login(base_url, localpart, password)
    raise SynapseError(f"registration of {localpart!r} failed: {status} {body}")


# --------------------------------------------------------------------------- CLI


def default_synapse_python() -> str:
    """``$SYNAPSE_PYTHON``, else ``<repo>/.venv-synapse/bin/python``; SynapseError if neither."""
    env = os.environ.get("SYNAPSE_PYTHON")
    if env:
        return env
    if DEFAULT_SYNAPSE_PYTHON.exists():
        return str(DEFAULT_SYNAPSE_PYTHON)
    raise SynapseError(INSTALL_HINT)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run a throwaway local Synapse.")
    sub = parser.add_subparsers(dest="command", required=True)

    p_start = sub.add_parser("start", help="configure and start Synapse in DATA_DIR")
    p_start.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    p_start.add_argument("--port", type=int, default=8008)
    p_start.add_argument("--server-name", default="localhost")
    p_start.add_argument(
        "--registration",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="appservice registration file (repeatable)",
    )
    p_start.add_argument(
        "--synapse-python",
        metavar="PATH",
        help="python with matrix-synapse installed "
        "(default: $SYNAPSE_PYTHON, else .venv-synapse/bin/python)",
    )
    p_start.add_argument("--timeout", type=float, default=60.0)

    p_stop = sub.add_parser("stop", help="stop the Synapse running in DATA_DIR")
    p_stop.add_argument("data_dir", type=Path, metavar="DATA_DIR")

    p_reg = sub.add_parser(
        "register",
        help="register a user (or log in if it exists); prints the JSON response",
        usage="%(prog)s (DATA_DIR | --base-url URL) LOCALPART PASSWORD",
    )
    p_reg.add_argument("--base-url", metavar="URL")
    p_reg.add_argument("args", nargs="+", metavar="ARG")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            python = args.synapse_python or default_synapse_python()
            hs = start(
                args.data_dir,
                synapse_python=python,
                port=args.port,
                server_name=args.server_name,
                registrations=args.registration,
                timeout=args.timeout,
            )
            print(f"Synapse running: {hs.base_url} (pid {hs.pid}, server_name {hs.server_name})")
        elif args.command == "stop":
            stop(args.data_dir)
            print(f"Synapse in {args.data_dir} stopped")
        else:
            rest = list(args.args)
            if args.base_url:
                if len(rest) != 2:
                    parser.error("usage: register --base-url URL LOCALPART PASSWORD")
                base_url = args.base_url
            else:
                if len(rest) != 3:
                    parser.error("usage: register DATA_DIR LOCALPART PASSWORD")
                base_url = base_url_of(Path(rest.pop(0)))
            print(json.dumps(register_user(base_url, rest[0], rest[1]), indent=2))
    except SynapseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
