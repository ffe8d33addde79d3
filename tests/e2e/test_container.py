"""README "Deploying", the container way, followed as written: the commands of its
`container-commands` block build the Containerfile with podman and run the side-car from
the image against a real Synapse. `generate-registration` through the image writes 0600
files, owned by the image's user, into the volume; the container answers a command in a
plain and in an encrypted room and a dispatcher's claim, stops cleanly on SIGTERM, and a
new container on the same volume comes back with the same device.

No registry is reachable from CI: the image is built on a base made locally (`make
container-base`: Debian bookworm with Python 3.11, as python:3.11-slim has), given with
`--build-arg BASE`, so the Containerfile built is the one people build elsewhere. This
machine's container quirks live here, never in the Containerfile: a containers.conf of
the test's own (open-file limits, the runtime) and, for pip during the build, the host's
CA bundle (HTTPS goes through a proxy whose CA the base lacks).
"""

from __future__ import annotations

import asyncio
import os
import resource
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from demo.encrypted_user import EncryptedUser
from route_sidecar.cli import registration_for
from route_sidecar.config import load_config

from .deploy_support import (
    alice_on,
    bot_devices,
    command_is_answered,
    editor,
    readme_block,
    step2_edits,
    wait_for_log,
    wait_healthy,
)
from .harness import API_TOKEN, REPO_ROOT, LookupClient, free_port, local_synapse, synapse_python

pytestmark = [pytest.mark.e2e]
in_session_loop = pytest.mark.asyncio(loop_scope="session")
BASE_IMAGE = "localhost/route-sidecar-base:bookworm"  # Makefile: CONTAINER_BASE
IMAGE_USER = 10001  # the Containerfile's USER
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
REQUIRE_ENV = "ROUTE_SIDECAR_REQUIRE_CONTAINER"  # `make test` as root sets it


@dataclass(frozen=True)
class ContainerSteps:
    """The README block: what runs before the Synapse step, and the run command."""

    setup: list[str]
    run: str


def container_steps() -> ContainerSteps:
    lines = [line for line in readme_block("container-commands").splitlines() if line]
    commands = [line for line in lines if not line.startswith("#")]
    [run] = [line for line in commands if line.startswith("podman run -d ")]
    assert commands[-1] == run, "the run command is the block's last"
    return ContainerSteps(commands[:-1], run)


def test_the_readme_container_block_builds_registers_checks_and_runs() -> None:
    steps = container_steps()
    volume = '-v "$PWD/data:/data"'
    order = [
        "podman build --format docker -t route-sidecar ",
        "mkdir ",
        'cp "$CHECKOUT/config.example.yaml" data/config.yaml',
        '"${EDITOR:-vi}" data/config.yaml',
        f"chown -R {IMAGE_USER}:{IMAGE_USER} data",
        f"podman run --rm {volume} route-sidecar generate-registration",
        f"podman run --rm {volume} route-sidecar check-config",
    ]
    assert [next(o for o in order if c.startswith(o)) for c in steps.setup] == order
    assert volume in steps.run and "--network host" in steps.run
    assert steps.run.endswith(" route-sidecar"), "the image's default command: run"
    containerfile = (REPO_ROOT / "Containerfile").read_text(encoding="utf-8")
    assert f"USER {IMAGE_USER}:{IMAGE_USER}" in containerfile
    assert "\nARG BASE=docker.io/library/python:3.11-slim\nFROM ${BASE}\n" in containerfile
    # This machine's quirks stay in this test.
    for quirk in ("ulimit", "nofile", "runc", "host-ca", "PIP_CERT", "pip.conf"):
        assert quirk not in containerfile, quirk


class Podman:
    """podman as root, with this machine's quirks in a containers.conf of the test's own."""

    def __init__(self, work: Path) -> None:
        if os.geteuid() != 0 or shutil.which("podman") is None:
            self.unavailable("podman as root")
        if subprocess.run(["podman", "image", "exists", BASE_IMAGE]).returncode != 0:
            self.unavailable(f"the base image {BASE_IMAGE}")
        work.mkdir(parents=True, exist_ok=True)
        self.conf = work / "containers.conf"
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # the hard limit, kept
        self.conf.write_text(
            "# The machine's quirks (FACTS.md): root may not raise resource limits, and\n"
            "# crun does not run on its hybrid cgroups.\n"
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=32768:32768"]\n'
            "[engine]\n"
            'runtime = "runc"\n',
            encoding="utf-8",
        )
        self.build_options = [f"--build-arg BASE={BASE_IMAGE}"]
        if HOST_CA.exists():
            pip_conf = work / "pip.conf"
            pip_conf.write_text("[global]\ncert = /etc/host-ca.crt\n", encoding="utf-8")
            self.build_options += [
                f"-v {HOST_CA}:/etc/host-ca.crt:ro",
                f"-v {pip_conf}:/etc/pip.conf:ro",
            ]

    @staticmethod
    def unavailable(what: str) -> None:
        hint = "`make container-base` (as root) installs podman and makes the base"
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{what} is missing: {hint}")
        pytest.skip(f"{what} is missing: {hint}")

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "CONTAINERS_CONF": str(self.conf),
            **extra,
        }

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["podman", *args], env=self.env(), capture_output=True, text=True, timeout=120
        )
        if check:
            assert done.returncode == 0, f"podman {' '.join(args)}: {done.stdout}{done.stderr}"
        return done

    def with_build_options(self, line: str) -> str:
        """The README's build line, built on the local base (and pip trusting the proxy)."""
        assert line.startswith("podman build ")
        return line.replace("podman build ", f"podman build {' '.join(self.build_options)} ", 1)


@contextmanager
def following(podman: Podman, name: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The container's output into `log`; the process ends when the container does."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            ["podman", "logs", "--follow", name], env=podman.env(), stdout=out, stderr=out
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(10)


def private_files_of_the_image_user(folder: Path) -> list[str]:
    """The files in `folder` that are not 0600 or not the image user's."""
    return [
        f"{path.name}: {path.stat().st_mode & 0o777:o} {path.stat().st_uid}"
        for path in folder.iterdir()
        if path.is_file()
        and (path.stat().st_mode & 0o777 != 0o600 or path.stat().st_uid != IMAGE_USER)
    ]


@in_session_loop
async def test_the_readme_container_steps_run_the_side_car_from_its_image(
    tmp_path: Path,
) -> None:
    python = synapse_python()
    if python is None:
        pytest.fail("Synapse is required: run `make test`, which installs it")
    podman = Podman(tmp_path / "podman")
    steps = container_steps()
    name = f"route-sidecar-test-{secrets.token_hex(4)}"
    run = steps.run.replace("--name route-sidecar ", f"--name {name} ")
    assert run != steps.run, "the README names its container route-sidecar"
    folder = tmp_path / "deploy"
    folder.mkdir()
    hs_port, as_port, api_port = free_port(), free_port(), free_port()
    edits = step2_edits(hs_port, as_port, api_port)
    script = "\n".join(
        podman.with_build_options(line) if line.startswith("podman build ") else line
        for line in steps.setup
    )
    env = podman.env(
        CHECKOUT=str(REPO_ROOT),
        EDITOR=str(editor(tmp_path, Path(sys.executable), edits)),
    )
    before = podman("image", "inspect", "--format", "{{.Id}}", "route-sidecar", check=False)
    started = time.monotonic()
    done = await asyncio.to_thread(
        subprocess.run,
        ["/bin/sh", "-e", "-x", "-c", script],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    print(f"\nbuild, registration and check through the image: {time.monotonic() - started:.1f}s")
    built = podman("image", "inspect", "--format", "{{.Id}} {{.Size}}", "route-sidecar")
    image, size = built.stdout.split()
    if before.returncode == 0 and before.stdout.strip() != image:
        podman("image", "rm", before.stdout.strip(), check=False)  # the one it replaced
    print(f"image localhost/route-sidecar: {int(size) / 1e6:.0f} MB")
    assert "config OK" in done.stdout, done.stdout + done.stderr

    data = folder / "data"
    # Written through the image, by its user, readable by it alone.
    assert {"config.yaml", "registration.yaml"} <= {p.name for p in data.iterdir()}
    assert private_files_of_the_image_user(data) == []
    config = load_config(data / "config.yaml")
    registration = YAML(typ="safe").load((data / "registration.yaml").read_text())
    assert registration == registration_for(config)

    hs = local_synapse.start(
        tmp_path / "synapse",
        synapse_python=python,
        port=hs_port,
        server_name="localhost",
        registrations=[data / "registration.yaml"],
    )
    log = tmp_path / "container.log"

    def start() -> None:
        """The README's run command: a detached container."""
        subprocess.run(["/bin/sh", "-e", "-c", run], cwd=folder, env=env, check=True)

    try:
        await asyncio.to_thread(start)
        with following(podman, name, log) as container:
            await asyncio.to_thread(wait_healthy, api_port, container, log)
            await asyncio.to_thread(wait_for_log, log, "encryption ready", container, 90)
            # The image's own health check finds the API from the config.
            podman("healthcheck", "run", name)
            async with alice_on(hs.base_url) as alice:
                plain = await command_is_answered(alice, encrypted=False)
                await claim_is_routed(alice, plain, api_port)
                room = await command_is_answered(alice, encrypted=True)
                devices = await bot_devices(alice)
                assert len(devices) == 1

                stopping = time.monotonic()
                podman("stop", "--time", "30", name)
                took = time.monotonic() - stopping
                state = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout
                assert state.strip() == "0", log.read_text(errors="replace")[-3000:]
                assert took < 25, f"SIGTERM took {took:.1f}s: the container was killed"
                container.wait(10)  # `podman logs --follow` has copied the last lines
                text = log.read_text(errors="replace")
                assert "stopping" in text and "stopped" in text, text[-3000:]

                # A new container on the same volume: the same device, the room still read.
                podman("rm", name)
                await asyncio.to_thread(start)
                log2 = tmp_path / "container-2.log"
                with following(podman, name, log2) as again:
                    await asyncio.to_thread(wait_healthy, api_port, again, log2)
                    await asyncio.to_thread(wait_for_log, log2, "encryption ready", again, 90)
                    await command_is_answered(alice, room, encrypted=True)
                    assert await bot_devices(alice) == devices
    finally:
        podman("rm", "--force", "--time", "10", name, check=False)
        local_synapse.stop(hs.data_dir)
    assert private_files_of_the_image_user(data) == []
    for line in log.read_text(errors="replace").splitlines():
        for token in (API_TOKEN, config.appservice.as_token, config.appservice.hs_token):
            assert token not in line, "a token in the log"


async def claim_is_routed(alice: EncryptedUser, room: str, api_port: int) -> None:
    """A dispatcher's claim for the room's next question gets the route just set."""
    question = "why did the deploy fail?"
    event_id = await alice.say(room, question)
    lookup = LookupClient(f"http://127.0.0.1:{api_port}")
    try:
        answer = await lookup.claim(room_id=room, turn_id=event_id, last_user_message=question)
    finally:
        await lookup.close()
    assert answer["override"] is True and answer["target"] == "cloud", answer
