"""README "Deploying", followed as written: the commands of its `deploy-commands` block,
run by an unprivileged user (`nobody`, who cannot write `/`) in a fresh folder, with the
example config and its relative `database`; then a command in an encrypted room on a real
Synapse gets its encrypted reply. Again with `-c sub/config.yaml` from the folder above.
And deployments that earlier versions left with their encryption store elsewhere (at the
filesystem root, or in the side-car's own database) get it moved to its file, keeping
the bot's device."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from mautrix.types import UserID

from demo.encrypted_user import EncryptedUser
from route_sidecar.config import load_config
from route_sidecar.crypto_db import (
    MAUTRIX_TABLE_PREFIXES,
    PICKLE_KEY_META,
    crypto_store_path,
    device_in,
    pickle_key_path,
)

from .harness import (
    API_TOKEN,
    BOT,
    REPO_ROOT,
    Sidecar,
    free_port,
    joined,
    local_synapse,
    synapse_and_sidecar,
    synapse_python,
)

pytestmark = [pytest.mark.e2e]
in_session_loop = pytest.mark.asyncio(loop_scope="session")
README = REPO_ROOT / "README.md"
DEPLOY_VENV = REPO_ROOT / ".venv-deploy"  # `make setup`: pip install '.[encryption]'
NOBODY = 65534
PASSWORD = "pw-alice-secret"


def readme_deploy_block() -> str:
    """The shell block that follows the `deploy-commands` marker in README.md."""
    text = README.read_text(encoding="utf-8")
    assert "<!-- deploy-commands" in text, "README.md lost its deploy-commands block"
    after = text.split("<!-- deploy-commands", 1)[1]
    return after.split("```sh\n", 1)[1].split("```", 1)[0]


def deploy_steps(config: str = "config.yaml") -> tuple[str, str]:
    """(everything up to the Synapse step, the run command), with the config and
    registration at `config`'s folder. The install line is left out: `make setup` runs
    the same `pip install` into .venv-deploy."""
    block = readme_deploy_block()
    folder = str(Path(config).parent)
    if folder != ".":
        block = re.sub(r"(?<![\w/.-])(config|registration)\.yaml\b", rf"{folder}/\1.yaml", block)
    lines = block.splitlines()
    [install] = [line for line in lines if line.startswith("pip install ")]
    assert '"$CHECKOUT[encryption]"' in install, "README installs otherwise than make setup"
    [run] = [line for line in lines if line.startswith("route-sidecar run ")]
    assert lines[-1] == run, "the run command is the block's last"
    setup = [line for line in lines if line not in (install, run)]
    assert any(line.startswith("route-sidecar generate-registration") for line in setup)
    assert any(line.startswith("route-sidecar check-config") for line in setup)
    return "\n".join(setup), run


def test_the_readme_block_is_what_the_steps_below_it_describe() -> None:
    setup, run = deploy_steps()
    order = [
        "cp ",
        '"${EDITOR:-vi}" config.yaml',
        "route-sidecar generate-registration -c config.yaml",
        "route-sidecar check-config -c config.yaml",
    ]
    commands = [line for line in setup.splitlines() if line and not line.startswith("#")]
    assert [next(o for o in order if c.startswith(o)) for c in commands] == order
    assert run.startswith("route-sidecar run -c config.yaml")
    sub_setup, sub_run = deploy_steps("sub/config.yaml")
    assert "-c sub/config.yaml -o sub/registration.yaml" in sub_setup
    assert '"$CHECKOUT/config.example.yaml" sub/config.yaml' in sub_setup
    assert sub_run.startswith("route-sidecar run -c sub/config.yaml")


class Deployer:
    """Who runs the README's commands: `nobody` where this machine allows it (root with
    setpriv, and a deploy venv that `nobody` may run), else the current user; either
    way, what lands outside the side-car's folder is checked."""

    def __init__(self) -> None:
        python = DEPLOY_VENV / "bin" / "python"
        if not python.exists():
            if os.environ.get("ROUTE_SIDECAR_REQUIRE_SYNAPSE"):
                pytest.fail(f"{DEPLOY_VENV} is missing: `make setup` installs it")
            pytest.skip(f"{DEPLOY_VENV} is missing: run `make test`, which installs it")
        self.python = python
        self.unprivileged = (
            os.geteuid() == 0
            and shutil.which("setpriv") is not None
            and subprocess.run([*self._nobody(), str(python), "-c", "pass"]).returncode == 0
        )

    @staticmethod
    def _nobody() -> list[str]:
        return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

    def command(self, script: str) -> list[str]:
        shell = ["/bin/sh", "-e", "-c", script]
        return [*self._nobody(), *shell] if self.unprivileged else shell

    def folder(self) -> Path:
        base = Path(tempfile.mkdtemp(prefix="route-sidecar-deploy-"))
        if self.unprivileged:
            os.chown(base, NOBODY, NOBODY)
        return base


@pytest.fixture
def deployer() -> Deployer:
    return Deployer()


@contextmanager
def fresh_folder(deployer: Deployer) -> Iterator[Path]:
    base = deployer.folder()
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def editor(base: Path, deployer: Deployer, edits: dict[str, Any]) -> Path:
    """An $EDITOR that makes the step-2 edits a person makes, comments kept."""
    script = base / "edit-config"
    script.write_text(
        f"#!{deployer.python}\n"
        "import json, sys\n"
        "from ruamel.yaml import YAML\n"
        "yaml = YAML()\n"
        "yaml.indent(mapping=2, sequence=4, offset=2)\n"
        "with open(sys.argv[1], encoding='utf-8') as f:\n"
        "    data = yaml.load(f)\n"
        f"for dotted, value in json.loads({json.dumps(json.dumps(edits))}).items():\n"
        "    *parents, last = dotted.split('.')\n"
        "    node = data\n"
        "    for key in parents:\n"
        "        node = node[key]\n"
        "    node[last] = value\n"
        "with open(sys.argv[1], 'w', encoding='utf-8') as f:\n"
        "    yaml.dump(data, f)\n",
        encoding="utf-8",
    )
    script.chmod(0o755)
    return script


def step2_edits(hs_port: int, as_port: int, api_port: int) -> dict[str, Any]:
    return {
        "homeserver.address": f"http://127.0.0.1:{hs_port}",
        "homeserver.domain": "localhost",
        "appservice.address": f"http://127.0.0.1:{as_port}",
        "appservice.listen.port": as_port,
        "api.listen.port": api_port,
        "api.tokens": [API_TOKEN],
        "permissions": {"@alice:localhost": 100, "*": 0},
        "encryption.key_wait": "5s",
    }


def wait_for_log(log: Path, needle: str, process: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if needle in text:
            return text
        if process.poll() is not None:
            break
        time.sleep(0.2)
    tail = "\n".join((log.read_text(errors="replace") if log.exists() else "").splitlines()[-30:])
    raise AssertionError(f"no {needle!r} in the side-car's log within {timeout:g}s:\n{tail}")


@contextmanager
def running(
    command: list[str], cwd: Path, env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


def wait_healthy(api_port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"side-car not healthy:\n{log.read_text(errors='replace')[-3000:]}")


@asynccontextmanager
async def alice_on(hs_url: str) -> AsyncIterator[EncryptedUser]:
    local_synapse.register_user(hs_url, "alice", PASSWORD)
    person = await EncryptedUser.login(hs_url, "alice", PASSWORD, key_wait=10.0)
    try:
        yield person
    finally:
        await person.close()


async def encrypted_command_is_answered(alice: EncryptedUser, room: str | None = None) -> str:
    if room is None:
        room = await alice.create_room(invite=[BOT], encrypted=True, name="deployed")
        await alice.wait_for(room, joined(BOT), timeout=30, what="the bot to join")
    event_id = await alice.say(room, "!route cloud")
    reply = await alice.wait_reply(room, event_id, timeout=30)
    assert reply["encrypted"] is True, reply
    assert "Routing the next turn" in reply["content"]["body"], reply
    return room


async def bot_devices(alice: EncryptedUser) -> list[str]:
    keys = await alice.client.query_keys([UserID(BOT)])
    return sorted(keys.device_keys.get(UserID(BOT), {}))


@in_session_loop
@pytest.mark.parametrize("config", ["config.yaml", "sub/config.yaml"])
async def test_the_readme_deploy_steps_work_as_an_unprivileged_user(
    deployer: Deployer, config: str
) -> None:
    python = synapse_python()
    if python is None:
        pytest.fail("Synapse is required: run `make test`, which installs it")
    root_before = set(os.listdir("/"))
    setup, run = deploy_steps(config)
    with fresh_folder(deployer) as base:
        folder = base / "route-sidecar"
        folder.mkdir()
        (folder / Path(config).parent).mkdir(exist_ok=True)
        if deployer.unprivileged:
            for path in (folder, folder / Path(config).parent):
                os.chown(path, NOBODY, NOBODY)
        hs_port, as_port, api_port = free_port(), free_port(), free_port()
        env = {
            "PATH": f"{DEPLOY_VENV / 'bin'}:/usr/bin:/bin",
            "HOME": str(folder),
            "LANG": "C.UTF-8",
            "CHECKOUT": str(REPO_ROOT),
            "EDITOR": str(editor(base, deployer, step2_edits(hs_port, as_port, api_port))),
        }
        done = await asyncio.to_thread(
            subprocess.run,
            deployer.command(setup),
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "config OK" in done.stdout, done.stdout
        loaded = load_config(folder / config)  # as root: only to know where things go
        assert loaded.database_path == folder / Path(config).parent / "route-sidecar.db"
        assert loaded.misplaced_crypto_stores, "the example's database path is relative"
        for old in loaded.misplaced_crypto_stores:
            if old.exists():
                pytest.skip(f"{old} exists on this machine: the side-car would move it in")
        hs = local_synapse.start(
            base / "synapse",
            synapse_python=python,
            port=hs_port,
            server_name="localhost",
            registrations=[folder / Path(config).parent / "registration.yaml"],
        )
        log = base / "sidecar.log"
        try:
            with running(deployer.command(run), folder, env, log) as sidecar:
                wait_healthy(api_port, sidecar, log)
                wait_for_log(log, "encryption ready", sidecar, timeout=60)
                async with alice_on(hs.base_url) as alice:
                    await encrypted_command_is_answered(alice)
        finally:
            local_synapse.stop(hs.data_dir)
        text = log.read_text(errors="replace")
        assert "encryption setup failed" not in text, text[-3000:]
        # The device and its keys are in mautrix's own file beside the database, 0600
        # with its side files, and nowhere else.
        crypto = crypto_store_path(loaded.database_path)
        assert device_in(crypto) is not None and device_in(loaded.database_path) is None
        written = database_files(loaded.database_path, crypto)
        assert crypto in written
        assert [name for name in written if name.stat().st_mode & 0o077] == []
        assert not [old for old in loaded.misplaced_crypto_stores if old.exists()]
        assert set(os.listdir("/")) <= root_before, "the side-car wrote outside its folder"
        if deployer.unprivileged:
            assert {name.stat().st_uid for name in written} == {NOBODY}


def database_files(*databases: Path) -> list[Path]:
    """The databases with the side files SQLite made beside them."""
    names = (
        Path(f"{database}{suffix}") for database in databases for suffix in ("", "-wal", "-shm")
    )
    return [name for name in names if name.exists()]


async def started_moving_the_store(sidecar: Sidecar) -> list[str]:
    """Start the side-car, wait until its device is ready; its log lines of a move."""
    sidecar.start()
    await asyncio.to_thread(
        wait_for_log,
        sidecar.log_path,
        "encryption ready",
        sidecar.process,  # type: ignore[arg-type]
        60,
    )
    lines = sidecar.log_path.read_text().splitlines()
    return [line for line in lines if "encryption store moved" in line]


def split_like_earlier_versions(seed: Path, main: Path, misplaced: Path) -> None:
    """From a deployment of this version (`seed` and its crypto file), the layout the
    versions of issue 17 left: the side-car's tables in `main`, with the crypto pickle key
    in its `meta` table (not in a file of its own), mautrix's at `misplaced`."""
    key = pickle_key_path(seed).read_text(encoding="utf-8").strip()
    for target, keep_mautrix in ((main, False), (misplaced, True)):
        source = crypto_store_path(seed) if keep_mautrix else seed
        with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
            src.backup(dst)
            names = [r[0] for r in dst.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            for name in names:
                if (
                    not name.startswith("sqlite_")
                    and name.startswith(MAUTRIX_TABLE_PREFIXES) != keep_mautrix
                ):
                    dst.execute(f'DROP TABLE "{name}"')
            if not keep_mautrix:
                dst.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (PICKLE_KEY_META, key))
            dst.commit()


@in_session_loop
@pytest.mark.skipif(
    os.geteuid() != 0,
    reason="earlier versions put the store at the filesystem root; only root can put one there",
)
async def test_a_store_earlier_versions_put_at_the_root_is_moved_back_keeping_the_device(
    tmp_path: Path,
) -> None:
    python = synapse_python()
    if python is None:
        pytest.fail("Synapse is required: run `make test`, which installs it")
    name = f"route-sidecar-moved-{secrets.token_hex(4)}.db"
    misplaced, main = Path("/") / name, tmp_path / name
    seed = tmp_path / "seed.db"
    try:
        with synapse_and_sidecar(tmp_path, python, database=f"sqlite:///{seed}") as (hs, sidecar):
            async with alice_on(hs.base_url) as alice:
                room = await encrypted_command_is_answered(alice)
                devices = await bot_devices(alice)
                assert len(devices) == 1
                sidecar.stop()
                split_like_earlier_versions(seed, main, misplaced)
                # The config as such a deployment had it: `database` relative.
                sidecar.write_config({**sidecar.config, "database": f"sqlite:///{name}"})
                assert load_config(sidecar.config_path).misplaced_crypto_stores == (misplaced,)
                moved = await started_moving_the_store(sidecar)
                assert len(moved) == 1, sidecar.log_tail()
                crypto = crypto_store_path(main)
                assert f"from={misplaced}" in moved[0] and f"to={crypto}" in moved[0]
                assert f"device={devices[0]}" in moved[0]
                assert not misplaced.exists()
                assert device_in(crypto) == devices[0]
                # The pickle key left the database for a private file of its own.
                assert pickle_key_path(main).stat().st_mode & 0o777 == 0o600
                with closing(sqlite3.connect(main)) as db:
                    in_meta = "SELECT COUNT(*) FROM meta WHERE key = ?"
                    assert db.execute(in_meta, (PICKLE_KEY_META,)).fetchone() == (0,)
                await encrypted_command_is_answered(alice, room)
                assert await bot_devices(alice) == devices  # no new device
    finally:
        remove_database(misplaced)


def remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def join_like_earlier_versions(main: Path) -> None:
    """The layout of the versions before mautrix's stores had a file of their own: its
    tables in the side-car's database, beside the side-car's; no crypto file."""
    crypto = crypto_store_path(main)
    with closing(sqlite3.connect(main, isolation_level=None)) as db:
        db.execute("ATTACH DATABASE ? AS crypto", (str(crypto),))
        schema = db.execute(
            "SELECT type, name, sql FROM crypto.sqlite_master WHERE sql IS NOT NULL"
            " ORDER BY type = 'index', rowid"
        ).fetchall()
        db.execute("BEGIN")
        for kind, name, sql in schema:
            db.execute(sql)  # unqualified: created in main
            if kind == "table":
                db.execute(f'INSERT INTO main."{name}" SELECT * FROM crypto."{name}"')
        db.execute("COMMIT")
        db.execute("DETACH DATABASE crypto")
    remove_database(crypto)


@in_session_loop
async def test_a_store_earlier_versions_kept_in_the_database_moves_to_its_file_keeping_the_device(
    tmp_path: Path,
) -> None:
    python = synapse_python()
    if python is None:
        pytest.fail("Synapse is required: run `make test`, which installs it")
    with synapse_and_sidecar(tmp_path, python) as (hs, sidecar):
        main = sidecar.db_path
        crypto = crypto_store_path(main)
        async with alice_on(hs.base_url) as alice:
            room = await encrypted_command_is_answered(alice)
            devices = await bot_devices(alice)
            assert len(devices) == 1 and device_in(crypto) == devices[0]
            sidecar.stop()
            join_like_earlier_versions(main)
            assert device_in(main) == devices[0] and not crypto.exists()
            moved = await started_moving_the_store(sidecar)
            assert len(moved) == 1, sidecar.log_tail()
            assert f"from={main} to={crypto} device={devices[0]}" in moved[0]
            assert device_in(crypto) == devices[0] and device_in(main) is None
            # The bot still reads the room (its Megolm sessions came along) and answers
            # with the same device: nobody has to verify it again.
            await encrypted_command_is_answered(alice, room)
            assert await bot_devices(alice) == devices
