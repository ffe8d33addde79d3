"""Secrets and files (issue 14): every file the side-car writes is readable by its own
user only, whatever the shell's umask, and files earlier versions left readable by
others are tightened at start; the example's placeholders, short secrets and one secret
used for two purposes are refused from the file and from the environment alike."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from ruamel.yaml import YAML

from route_sidecar.config import ConfigError, encryption_available, parse_config
from route_sidecar.crypto_db import crypto_store_path, pickle_key_path

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.yaml"
AS_TOKEN = "as-token-" + "a" * 32
HS_TOKEN = "hs-token-" + "h" * 32
API_TOKEN = "api-token-" + "t" * 32
PLACEHOLDER_API_TOKEN = "change-me-to-a-long-random-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wide_umask() -> None:
    os.umask(0o022)  # a usual login shell's


def side_car(*args: str) -> list[str]:
    return [sys.executable, "-m", "route_sidecar", *args]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ROUTE_SIDECAR_")}


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def example() -> dict[str, Any]:
    loaded: dict[str, Any] = YAML(typ="safe", pure=True).load(EXAMPLE.read_text(encoding="utf-8"))
    return loaded


def config_file(folder: Path, encryption: bool) -> tuple[Path, int]:
    """A config whose database is in `folder` and whose homeserver is not there (the
    side-car serves its API and retries the Matrix side in the background)."""
    raw = example()
    api_port = free_port()
    raw["homeserver"]["address"] = f"http://127.0.0.1:{free_port()}"
    raw["appservice"].update(
        as_token=AS_TOKEN, hs_token=HS_TOKEN, listen={"host": "127.0.0.1", "port": free_port()}
    )
    raw["api"].update(tokens=[API_TOKEN], listen={"host": "127.0.0.1", "port": api_port})
    raw["encryption"]["enabled"] = encryption
    path = folder / "config.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")
    path.chmod(0o644)
    return path, api_port


@contextmanager
def running(config: Path, api_port: int) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m route_sidecar run -c config`, started from a shell whose umask is 022."""
    log = config.parent / "sidecar.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            side_car("run", "-c", str(config)),
            cwd=REPO,
            env=clean_env(),
            stdout=out,
            stderr=out,
            preexec_fn=wide_umask,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            try:
                if httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=1).is_success:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def database_files(database: Path) -> dict[str, int]:
    return {
        f"{database.name}{suffix}": mode(f"{database}{suffix}")
        for suffix in ("", "-wal", "-shm", "-journal")
        if os.path.exists(f"{database}{suffix}")
    }


def leave_a_crashed_database(database: Path) -> None:
    """The files an earlier version left when it was killed: the database with its -wal
    and -shm beside it, all 0644."""
    script = (
        "import os, sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('PRAGMA journal_mode=WAL')\n"
        "db.execute('CREATE TABLE leftover (x)')\n"
        "db.execute('INSERT INTO leftover VALUES (1)')\n"
        "os._exit(0)\n"  # no close: the WAL stays
    )
    subprocess.run([sys.executable, "-c", script, str(database)], check=True)
    for suffix in ("", "-wal", "-shm"):
        os.chmod(f"{database}{suffix}", 0o644)


# --- files -------------------------------------------------------------------------------


def test_every_file_the_sidecar_writes_is_private_whatever_the_umask(tmp_path: Path) -> None:
    encryption = encryption_available()
    config, api_port = config_file(tmp_path, encryption)
    registration = tmp_path / "registration.yaml"
    registration.write_text("# an older registration\n", encoding="utf-8")
    registration.chmod(0o644)
    done = subprocess.run(
        side_car("generate-registration", "-c", str(config), "-o", str(registration)),
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        preexec_fn=wide_umask,
    )
    assert done.returncode == 0, done.stderr
    assert {"config": mode(config), "registration": mode(registration)} == {
        "config": 0o600,
        "registration": 0o600,
    }
    database = tmp_path / "route-sidecar.db"
    with running(config, api_port):
        files = database_files(database)
        assert {"route-sidecar.db", "route-sidecar.db-wal", "route-sidecar.db-shm"} <= set(files)
        if encryption:
            files["pickle key"] = mode(pickle_key_path(database))
            crypto = database_files(crypto_store_path(database))
            assert "route-sidecar-crypto.db" in crypto  # made before mautrix opens it
            files.update(crypto)
        assert files == dict.fromkeys(files, 0o600)
    assert database_files(database) == dict.fromkeys(database_files(database), 0o600)


def test_files_earlier_versions_left_readable_by_others_are_tightened_at_start(
    tmp_path: Path,
) -> None:
    config, api_port = config_file(tmp_path, encryption=False)
    database = tmp_path / "route-sidecar.db"
    leave_a_crashed_database(database)
    assert database_files(database) == dict.fromkeys(database_files(database), 0o644)
    with running(config, api_port):
        files = database_files(database)
        assert {"route-sidecar.db", "route-sidecar.db-wal", "route-sidecar.db-shm"} <= set(files)
        assert files == dict.fromkeys(files, 0o600)


# --- secrets -----------------------------------------------------------------------------


def with_tokens(as_token: str = AS_TOKEN, hs_token: str = HS_TOKEN, api: Any = None) -> Any:
    raw = copy.deepcopy(example())
    raw["appservice"]["as_token"] = as_token
    raw["appservice"]["hs_token"] = hs_token
    raw["api"]["tokens"] = [API_TOKEN] if api is None else api
    return raw


def refusal(raw: Any, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, environ or {})
    assert len(str(caught.value).splitlines()) == 1
    return str(caught.value)


WEAK = [
    # (case, config, environment, the key the error names)
    ("placeholder API token in the file", with_tokens(api=[PLACEHOLDER_API_TOKEN]), {}, "api"),
    ("placeholder as_token in the file", with_tokens(as_token="generate-me"), {}, "as"),
    (
        "placeholder API token from the environment",
        with_tokens(),
        {"ROUTE_SIDECAR_API_TOKENS": PLACEHOLDER_API_TOKEN},
        "api",
    ),
    ("short hs_token from the environment", with_tokens(), {"ROUTE_SIDECAR_HS_TOKEN": "x"}, "hs"),
    (
        "placeholder as_token from the environment",
        with_tokens(),
        {"ROUTE_SIDECAR_AS_TOKEN": "generate-me"},
        "as",
    ),
    ("hs_token equal to as_token", with_tokens(hs_token=AS_TOKEN), {}, "hs"),
    (
        "hs_token from the environment equal to as_token",
        with_tokens(),
        {"ROUTE_SIDECAR_HS_TOKEN": AS_TOKEN},
        "hs",
    ),
    ("API token equal to hs_token", with_tokens(api=[API_TOKEN, HS_TOKEN]), {}, "api"),
    (
        "API token from the environment equal to as_token",
        with_tokens(),
        {"ROUTE_SIDECAR_API_TOKENS": f"{API_TOKEN},{AS_TOKEN}"},
        "api",
    ),
    ("one API token listed twice", with_tokens(api=[API_TOKEN, API_TOKEN]), {}, "api"),
]
KEYS = {"as": "appservice.as_token", "hs": "appservice.hs_token", "api": "api.tokens"}


@pytest.mark.parametrize(("case", "raw", "environ", "key"), WEAK, ids=[w[0] for w in WEAK])
def test_weak_or_reused_secrets_are_refused_naming_the_key(
    case: str, raw: Any, environ: dict[str, str], key: str
) -> None:
    message = refusal(raw, environ)
    assert message.startswith(f"{KEYS[key]}: "), message
    for secret in (AS_TOKEN, HS_TOKEN, API_TOKEN, PLACEHOLDER_API_TOKEN):
        assert secret not in message  # the error names the key, never the value


def test_the_example_after_generate_registration_holds_no_placeholder(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    checked = subprocess.run(
        side_car("check-config", "-c", str(config)),
        cwd=REPO,
        env={**clean_env(), "ROUTE_SIDECAR_AS_TOKEN": AS_TOKEN, "ROUTE_SIDECAR_HS_TOKEN": HS_TOKEN},
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 2 and checked.stderr.count("\n") == 1, checked.stderr
    assert "api.tokens: " in checked.stderr and "generate-registration" in checked.stderr
    done = subprocess.run(
        side_car("generate-registration", "-c", str(config), "-o", "reg.yaml"),
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "api.tokens" in done.stdout
    [token] = YAML(typ="safe", pure=True).load(config.read_text(encoding="utf-8"))["api"]["tokens"]
    assert token != PLACEHOLDER_API_TOKEN and len(token) >= 32
    checked = subprocess.run(
        side_car("check-config", "-c", str(config)),
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0 and "config OK" in checked.stdout, checked.stderr
