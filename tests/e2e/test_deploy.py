"""README "Deploying", followed as written: the commands of its `deploy-commands` block,
run by an unprivileged user (`nobody`, who cannot write `/`) in a fresh folder, with the
example config and its relative `database`; then a command in an encrypted room on a real
Synapse gets its encrypted reply. Again with `-c sub/config.yaml` from the folder above.
And deployments that earlier versions left with their encryption store elsewhere (at the
filesystem root, or in the side-car's own database) get it moved to its file, keeping
the bot's device."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from route_sidecar.config import load_config
from route_sidecar.crypto_db import (
    MAUTRIX_TABLE_PREFIXES,
    PICKLE_KEY_META,
    crypto_store_path,
    device_in,
    pickle_key_path,
)

from .deploy_support import (
    alice_on,
    bot_devices,
    editor,
    encrypted_command_is_answered,
    readable_checkout,
    readme_block,
    running,
    step2_edits,
    wait_for_log,
    wait_healthy,
)
from .harness import (
    REPO_ROOT,
    Sidecar,
    free_port,
    local_synapse,
    synapse_and_sidecar,
    synapse_python,
)

pytestmark = [pytest.mark.e2e]
in_session_loop = pytest.mark.asyncio(loop_scope="session")
DEPLOY_VENV = REPO_ROOT / ".venv-deploy"  # `make setup`: pip install '.[encryption]'
NOBODY = 65534


def deploy_steps(config: str = "config.yaml") -> tuple[str, str]:
    """(everything up to the Synapse step, the run command), with the config and
    registration at `config`'s folder. The install line is left out: `make setup` runs
    the same `pip install` into .venv-deploy."""
    block = readme_block("deploy-commands")
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
    setpriv), else the current user; either way, what lands outside the side-car's folder
    is checked. `nobody` gets copies of what the steps take from the checkout (the deploy
    venv, the example config), since it may not enter the checkout itself when that is
    under a folder only its owner may enter (/root, a 0700 home folder)."""

    def __init__(self, venv: Path) -> None:
        self.venv = venv
        self.python = venv / "bin" / "python"
        self.unprivileged = (
            os.geteuid() == 0
            and shutil.which("setpriv") is not None
            and subprocess.run(
                [*self._nobody(), str(self.python), "-c", "import route_sidecar"]
            ).returncode
            == 0
        )

    @staticmethod
    def _nobody() -> list[str]:
        return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

    def command(self, script: str) -> list[str]:
        shell = ["/bin/sh", "-e", "-c", script]
        return [*self._nobody(), *shell] if self.unprivileged else shell

    @property
    def owner(self) -> int | None:
        """Who is given what the steps read: `nobody` when it runs them."""
        return NOBODY if self.unprivileged else None

    def folder(self) -> Path:
        base = Path(tempfile.mkdtemp(prefix="route-sidecar-deploy-"))
        if self.unprivileged:
            os.chown(base, NOBODY, NOBODY)
        return base


def readable_venv(venv: Path, folder: Path) -> Path:
    """A copy of `venv` in `folder` that any user may run: its scripts' `#!` lines point
    at the copy's python (a venv finds its packages from where its python is run)."""
    copy = folder / venv.name
    shutil.copytree(venv, copy, symlinks=True)
    old, new = f"#!{venv}/bin/".encode(), f"#!{copy}/bin/".encode()
    for script in (copy / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            text = script.read_bytes()
            if text.startswith(old):
                script.write_bytes(new + text[len(old) :])
    for path in (copy, *copy.rglob("*")):
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
    folder.chmod(0o755)
    return copy


@pytest.fixture(scope="session")
def deploy_venv() -> Iterator[Path]:
    """`make setup`'s deploy venv (pip install '.[encryption]'), copied where any user
    may run it (not under pytest's temporary folder, which only its owner may enter)."""
    if not (DEPLOY_VENV / "bin" / "python").exists():
        if os.environ.get("ROUTE_SIDECAR_REQUIRE_SYNAPSE"):
            pytest.fail(f"{DEPLOY_VENV} is missing: `make setup` installs it")
        pytest.skip(f"{DEPLOY_VENV} is missing: run `make test`, which installs it")
    folder = Path(tempfile.mkdtemp(prefix="route-sidecar-deploy-venv-"))
    try:
        yield readable_venv(DEPLOY_VENV, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def deployer(deploy_venv: Path) -> Deployer:
    return Deployer(deploy_venv)


@contextmanager
def fresh_folder(deployer: Deployer) -> Iterator[Path]:
    base = deployer.folder()
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


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
            "PATH": f"{deployer.venv / 'bin'}:/usr/bin:/bin",
            "HOME": str(folder),
            "LANG": "C.UTF-8",
            # What the steps read from the checkout, copied where `nobody` may read it
            # wherever the checkout is (a clone under /root or a 0700 home folder).
            "CHECKOUT": str(readable_checkout(base, ("config.example.yaml",), deployer.owner)),
            "EDITOR": str(editor(base, deployer.python, step2_edits(hs_port, as_port, api_port))),
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
